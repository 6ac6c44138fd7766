"""attncc's benchmarks, one entry point: ``python -m bench CASE...`` (bench/run.py) times the cases
of bench/cases.py against their baselines (bench/impls.py) with the one timer (bench/timer.py);
``python -m bench TOOL ...`` runs a tool (``--list`` shows both); bench/gpu_session.sh runs the GPU
tests and the benchmarks in one GPU session. docs/performance.md, "Running the benchmarks", says
more. Importing this package imports nothing."""
