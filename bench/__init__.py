"""attncc's benchmarks: ``python -m bench CASE...`` (bench/run.py) runs the cases of bench/cases.py
against their baselines; bench/README.md lists the rest. Importing this package imports nothing."""
