"""Host overhead per call of attncc's generated attention, against SDPA (cuDNN) and FlexAttention.

    python -m bench host --stub            # CPU: launches stubbed (no GPU needed)
    python -m bench host --ops             # CPU: torch ops and calls per call, launches stubbed
    python -m bench host --out $OUT        # GPU: host and GPU us/call; table, CSV and plot in $OUT

Both print a markdown table row by row and, with ``--out``, write it (host_overhead.md) and the CSV
after every row, the plot at the end; a part of a row that fails is its note, and the run goes on.

What is timed, per case (spec) and length N (B = 2, 16 query heads, head dim 128):

- ``host fwd`` / ``host f+b``: wall microseconds per call of ``attention(q, k, v)`` (and of
  ``attention(...).backward(g)``), many calls back to back without synchronizing. On the GPU a
  short burst (so that the launch queue never fills); with ``--stub`` every Triton kernel of the
  generated module is replaced by a no-op recorder (:func:`stub_launches`), so what remains is
  attncc's own host work plus torch's (allocations, autograd), and none of Triton's launch cost.
- ``launches``: Triton launches per call (recorded by the stub); on the GPU ``triton launch`` is
  the measured host cost of exactly those launches (replayed), so ``host - triton launch`` is
  attncc's own overhead.
- ``floor``: the same calls through a do-nothing ``torch.autograd.Function`` that only allocates
  what attncc's calls allocate (o and the LSE; delta, lse2 and the three gradients; the block
  lists' buffer of a data-dependent mask): torch's own share of a forward / forward+backward
  call, under the same conditions (the forward under
  ``torch.no_grad()``; the unused LSE's gradient not materialized, as attncc asks autograd).
  ``own`` = attncc's time less the floor (--stub), or less Triton's launches (GPU). attncc and the
  floor are timed in turn, ``--rounds`` times, and each keeps its fastest: a shared, busy CPU only
  ever adds time, and the subtraction of two minima taken side by side is the least noisy.
- On the GPU also attncc through ``torch.compile(fullgraph=True)`` (host us/call).
- On the GPU also ``plain host`` / ``plain gpu``: the same with ``ATTNCC_FAST_LAUNCH=0`` (every
  launch through Triton's ``JITFunction.run``; the default calls Triton's compiled kernels directly,
  attncc.runtime.launch.FastKernel), and ``fast same``: whether the default's outputs and gradients
  equal the plain launch's bitwise.
- On the GPU also ``gpu fwd`` / ``gpu f+b``: device microseconds per call (bench/timer.py), and the
  same for the baselines of bench/impls.py that have the spec: SDPA (cuDNN backend) and FlexAttention
  (compiled, block mask built outside the timing).

With ``--ops`` nothing is timed: one call of each phase (the forward under ``torch.no_grad()``, the
forward with gradients, the backward) is counted instead, launches stubbed, after warm-up calls of the
same signature (:func:`op_counts`): the aten ops torch dispatches (torch.profiler), the torch
functions, tensor methods and tensor attribute reads (a ``TorchFunctionMode``), and the calls from
outside torch into torch's Python and C functions (``sys.setprofile``: autograd's ``Function.apply``,
``torch.is_grad_enabled``, ``ctx.save_for_backward`` ...), each in a run of its own. On the GPU every
one of them costs host time (an aten op several us): the counts are what a change to the host path
adds or removes, independent of a busy CPU. SDPA (``F.scaled_dot_product_attention``, causal) is
the yardstick. tests/test_host_ops.py pins attncc's counts.

Under ``--stub`` the CPU tensors run through ``TRITON_INTERPRET=1``'s code paths (the interpreter's
small tile config; float16 so that no operand is converted): the numbers are host time on this
CPU, not GPU numbers. glibc is told to keep freed memory for reuse (:func:`caching_cpu_allocator`),
as the GPU's caching allocator does, so that large N measures attncc and not the OS's page handling.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

STUB = "--stub" in sys.argv or "--ops" in sys.argv
if STUB:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors pass the device check

import torch  # noqa: E402

from bench import timer  # noqa: E402
from bench.cases import Case  # noqa: E402
from bench.common import generated, note, qkv, short_error, spec_inputs, spec_pattern  # noqa: E402
from bench.impls import applies, implementations, prepare  # noqa: E402

CASES = ("causal", "document", "padding", "softcap", "gqa")
LENGTHS = (256, 1024, 4096, 16384)


class StubKernel:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch
    and does nothing else: (kernel, grid) in the log, and the arguments too while ``log.keep_args``
    is set (kept arguments hold tensors alive, which would change what torch does: autograd
    copies a gradient that something else still references instead of taking it)."""

    def __init__(self, name: str, real, log: "LaunchLog"):
        self.name, self.real, self.log = name, real, log
        self.grid = None

    def __getitem__(self, grid):
        self.grid = grid  # as cheap as can be: what it costs counts as attncc's own time
        return self.launch

    def launch(self, *args, **kwargs):
        self.log.append((self, self.grid, args, kwargs) if self.log.keep_args else (self, self.grid))


class LaunchLog(list):
    keep_args = False


def stub_launches(module) -> list:
    """Replace every Triton kernel of a generated ``module`` by a :class:`StubKernel`; returns the
    list the launches are recorded in. :func:`unstub` puts the kernels back."""
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = JITFunction
    from attncc.runtime.launch import FastKernel
    log = getattr(module, "_STUB_LOG", None)
    if log is not None:
        return log
    log = LaunchLog()
    for name, obj in list(vars(module).items()):
        if isinstance(obj, (JITFunction, InterpretedFunction, FastKernel)):
            setattr(module, name, StubKernel(name, obj, log))
    module._STUB_LOG = log
    return log


def unstub(module) -> None:
    for name, obj in list(vars(module).items()):
        if isinstance(obj, StubKernel):
            setattr(module, name, obj.real)
    module.__dict__.pop("_STUB_LOG", None)


def make_case(name: str, n: int, device: str, dtype, batch: int = 2, heads: int = 16, head_dim: int = 128,
              grad: bool = False):
    """(module, q, k, v, keyword inputs) of one case at length ``n``: the heads the spec declares
    (else ``heads``), documents of mean length n / 4 (bench/common.py spec_inputs)."""
    module, pattern = generated(name), spec_pattern(name)
    hq = pattern.heads_q or heads
    q, k, v = qkv(batch, hq, n, head_dim, Hkv=pattern.heads_kv or hq, dtype=dtype, device=device, grad=grad)
    return module, q, k, v, spec_inputs(pattern, batch, hq, n, doc_mean=max(1, n // 4), device=device)


def per_call_us(fn, calls: int, sync=None, clock=time.perf_counter) -> float:
    """Host microseconds per call: the fastest of 7 bursts of ``calls`` back-to-back calls
    (bench/timer.py bursts). ``clock``: wall time on the GPU; the thread's CPU time with --stub,
    which a busy shared CPU distorts less."""
    return timer.bursts(fn, calls, repeats=7, sync_fn=sync, clock=clock)[0] * 1e3


class _Floor(torch.autograd.Function):
    """Allocates what an attention call returns, and its backward the gradients, and what attncc
    allocates besides: the block lists' buffer of a data-dependent mask (``lists``: int32 entries,
    0 for none), delta and lse2 (alive while the gradients are made, as attncc's). Nothing else."""

    @staticmethod
    def forward(ctx, lists, q, k, v):
        o, lse = torch.empty_like(q), torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        buffer = torch.empty(lists, dtype=torch.int32, device=q.device) if lists else None
        ctx.save_for_backward(q, k, v)
        ctx.buffer = buffer  # kept for the backward, as attncc keeps the lists
        ctx.set_materialize_grads(False)  # as attncc: no zero gradient made for the unused LSE
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v = ctx.saved_tensors
        rows = q.shape[:-1]
        delta = torch.empty(rows, dtype=torch.float32, device=q.device)
        lse2 = torch.empty_like(delta)
        return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def list_entries(module, q, k, v, kw) -> tuple:
    """int32 entries of the block lists' buffer that a forward and a forward+backward call of a
    data-dependent spec allocate (its ``_tile_plan``): (0, 0) for the others."""
    if not hasattr(module, "_tile_plan"):
        return 0, 0
    from attncc import runtime as rt

    call = rt.bind(module.SPEC, q, k, v, kwargs=dict(kw))
    cfg = rt.pick_config(call)
    plans = [module._tile_plan(call, cfg.BLOCK_M, cfg.BLOCK_N, transposed) for transposed in (False, True)]
    return tuple(plan.size if plan is not None else 0 for plan in plans)


def attncc_calls(module, q, k, v, kw, g):
    """(forward, forward + backward): one call of the module's attention each, as the host timings
    make them (the forward under no_grad; the backward's gradients dropped after each call)."""
    def fwd():
        with torch.no_grad():
            module.attention(q, k, v, **kw)

    def fwd_bwd():
        module.attention(q, k, v, **kw).backward(g)
        q.grad = k.grad = v.grad = None
    return fwd, fwd_bwd


def host_times(name: str, n: int, device: str, dtype, calls: int, sync=None, clock=time.perf_counter,
               rounds: int = 1):
    """{'fwd', 'f+b', 'launches fwd', 'launches f+b', 'floor fwd', 'floor f+b'} of one case: attncc
    and the floor timed in turn, ``rounds`` times, the fastest of each."""
    module, q, k, v, kw = make_case(name, n, device, dtype, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device=device, dtype=dtype)
    log = getattr(module, "_STUB_LOG", None)
    out = {}
    fwd, fwd_bwd = attncc_calls(module, q, k, v, kw, g)
    lists_fwd, lists_fb = list_entries(module, q, k, v, kw)

    def floor_fwd():
        with torch.no_grad():
            _Floor.apply(lists_fwd, q, k, v)

    def floor_fb():
        o, _ = _Floor.apply(lists_fb, q, k, v)
        o.backward(g)
        q.grad = k.grad = v.grad = None

    timed = {"fwd": fwd, "floor fwd": floor_fwd, "f+b": fwd_bwd, "floor f+b": floor_fb}
    for _ in range(rounds):
        for label, fn in timed.items():
            t = per_call_us(fn, calls, sync=sync, clock=clock)
            out[label] = min(t, out.get(label, t))
    if log is not None:
        for label in ("fwd", "f+b"):
            log.clear()
            timed[label]()
            out[f"launches {label}"] = len(log)
    return out


# ---------------------------------------------------------------------------------------
# --ops: what one call dispatches and calls, counted (not timed)
# ---------------------------------------------------------------------------------------

PHASES = ("fwd", "fwd grad", "bwd")  # the forward under no_grad, the forward with gradients, its backward
KINDS = ("aten", "torch", "calls")  # what is counted: see OpCount


class _DispatchCount:
    """The aten ops dispatched from outside aten (torch.profiler's CPU events without an aten op
    above them: an op's own inner ops are its business). A ``TorchDispatchMode`` would count
    more than runs without it (autograd detaches the outputs it saves under one)."""

    def __init__(self, counter):
        self.counter = counter

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        for e in self._profile.events():
            parent = e.cpu_parent
            if e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
                self.counter[e.name] += 1


def _function_name(func) -> str:
    """A readable name of what a ``TorchFunctionMode`` saw: ``torch.empty``, ``Tensor.stride``,
    ``Tensor.shape`` (an attribute read: a descriptor's ``__get__``)."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:  # an attribute read
        return f"Tensor.{getattr(owner, '__name__', owner)}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
    return name.replace("_VariableFunctionsClass.", "torch.").replace("TensorBase.", "Tensor.")


class _FunctionCount:
    """A ``TorchFunctionMode`` counting torch functions, tensor methods and attribute reads."""

    def __new__(cls, counter):
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                counter[_function_name(func)] += 1
                return func(*args, **(kwargs or {}))
        return Mode()


_TORCH_DIR = str(Path(torch.__file__).parent)


class _CallCount:
    """``sys.setprofile``: calls from code outside torch's package into torch, Python functions
    (by file) and C functions (by module, or a tensor's method); torch's calls inside itself are
    its own business and not counted. Counts what the modes cannot see: ``Function.apply``,
    ``torch.is_grad_enabled()``, ``ctx.save_for_backward``, ``torch.no_grad()`` ..."""

    def __init__(self, counter):
        self.counter = counter

    def __enter__(self):
        counter, torch_dir = self.counter, _TORCH_DIR

        def profile(frame, event, arg):
            if event == "call":  # frame: the callee's
                back = frame.f_back
                if (frame.f_code.co_filename.startswith(torch_dir) and back is not None
                        and not back.f_code.co_filename.startswith(torch_dir)):
                    counter[frame.f_code.co_qualname] += 1
            elif event == "c_call" and not frame.f_code.co_filename.startswith(torch_dir):  # frame: the caller's
                owner = getattr(arg, "__self__", None)
                if ((getattr(arg, "__module__", None) or "").startswith("torch") or isinstance(owner, torch.Tensor)
                        or (type(owner).__module__ or "").startswith("torch")):
                    counter[_c_name(arg, owner)] += 1
        self._previous = sys.getprofile()
        sys.setprofile(profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(self._previous)


def _c_name(func, owner) -> str:
    name = getattr(func, "__name__", "?")
    if isinstance(owner, torch.Tensor):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None)
    if module:
        return f"{module}.{name}"
    return getattr(func, "__qualname__", name).replace("_VariableFunctionsClass.", "torch.")


@dataclasses.dataclass
class OpCount:
    """What one phase of one call did: ``aten`` ops dispatched (torch.profiler), ``torch``
    functions, tensor methods and attribute reads (``TorchFunctionMode``), ``calls`` into torch from
    outside it (``sys.setprofile``); each a {name: count}."""

    aten: dict
    torch: dict
    calls: dict

    def total(self, kind: str) -> int:
        return sum(getattr(self, kind).values())


def _counted(step, kind: str) -> dict:
    from collections import Counter

    counter = Counter()
    wrap = {"aten": _DispatchCount, "torch": _FunctionCount, "calls": _CallCount}[kind](counter)
    with wrap:
        step()
    return dict(counter)


def count_phases(forward, grad_out, leaves, warmup: int = 2) -> dict:
    """{phase: OpCount} of ``forward() -> output`` (the call) and of the backward of ``output``
    with gradient ``grad_out`` into ``leaves``: "fwd" (under torch.no_grad()), "fwd grad" and "bwd",
    each counted in a call of its own after ``warmup`` calls of each (the signature's caches
    filled). Three runs per phase, one per kind. The backward runs through autograd's engine
    directly, not ``Tensor.backward``: a TorchFunctionMode sees nothing inside a torch function it
    intercepts, and ``torch.autograd.backward`` is one."""
    from torch.autograd.graph import _engine_run_backward

    def fwd():
        with torch.no_grad():
            forward()

    def bwd(out):
        _engine_run_backward((out,), (grad_out,), False, False, (), allow_unreachable=True, accumulate_grad=True)

    for _ in range(warmup):
        fwd()
        bwd(forward())
        for t in leaves:
            t.grad = None
    phases = {"fwd": {}, "fwd grad": {}, "bwd": {}}
    for kind in KINDS:
        phases["fwd"][kind] = _counted(fwd, kind)
        box = []
        phases["fwd grad"][kind] = _counted(lambda: box.append(forward()), kind)
        phases["bwd"][kind] = _counted(lambda: bwd(box.pop()), kind)
        for t in leaves:
            t.grad = None  # (not counted) no accumulation into the next call's gradients
    return {phase: OpCount(**kinds) for phase, kinds in phases.items()}


def op_counts(name: str, n: int = 64, batch: int = 2, heads: int = 4, head_dim: int = 32) -> dict:
    """{phase: OpCount} of one call of the generated module ``name`` on CPU float16 tensors
    (launches stubbed: what remains is attncc's host path and torch's), or of SDPA (causal) for
    ``name == "sdpa"``, or of the floor (:class:`_Floor`: what any autograd.Function allocating o, the
    LSE and the gradients costs) for ``name == "floor"``. The counts do not depend on the sizes (tests use small ones)."""
    if name == "floor":  # a do-nothing autograd.Function allocating o, lse and the gradients
        q, k, v = qkv(batch, heads, n, head_dim, dtype=torch.float16, device="cpu", grad=True)
        g = torch.randn(batch, heads, n, head_dim, dtype=torch.float16)
        return count_phases(lambda: _Floor.apply(0, q, k, v)[0], g, (q, k, v))
    if name == "sdpa":
        q, k, v = qkv(batch, heads, n, head_dim, dtype=torch.float16, device="cpu", grad=True)
        g = torch.randn(batch, heads, n, head_dim, dtype=torch.float16)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        return count_phases(lambda: sdpa(q, k, v, is_causal=True), g, (q, k, v))
    module = generated(name)
    stubbed = getattr(module, "_STUB_LOG", None) is None
    stub_launches(module)
    try:
        module, q, k, v, kw = make_case(name, n, "cpu", torch.float16, batch=batch, heads=heads,
                                        head_dim=head_dim, grad=True)
        g = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float16)
        return count_phases(lambda: module.attention(q, k, v, **kw), g, (q, k, v))
    finally:
        if stubbed:
            unstub(module)


OPS_CASES = ("causal", "document", "sdpa", "floor")


def run_ops(cases, detail: bool = True) -> int:
    """``--ops``: a table of the counts per case and phase, and with ``detail`` each count by name."""
    head = ["case", "phase", *KINDS]
    print(f"torch ops and calls per call, launches stubbed, CPU float16, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')} (aten: dispatched ops; torch: functions, methods and "
          f"attribute reads; calls: calls into torch from outside it)\n" + table_head(head), flush=True)
    results = {}
    for name in cases:
        results[name] = op_counts(name)
        for phase, count in results[name].items():
            print(table_line({"case": name, "phase": phase, **{k: count.total(k) for k in KINDS}}, head), flush=True)
    if detail:
        for name, phases in results.items():
            for phase, count in phases.items():
                print(f"\n{name} {phase}:")
                for kind in KINDS:
                    items = sorted(getattr(count, kind).items(), key=lambda x: (-x[1], x[0]))
                    print(f"  {kind} ({count.total(kind)}): " + ", ".join(f"{k} {v}" for k, v in items))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench host", description=__doc__.split("\n\n")[0])
    p.add_argument("--stub", action="store_true", help="CPU: stub the Triton launches (see the module doc)")
    p.add_argument("--ops", action="store_true", help="CPU: count torch ops and calls per call (see the module doc)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--n", default=",".join(map(str, LENGTHS)))
    p.add_argument("--calls", type=int, default=200, help="calls per timed burst (CPU); the GPU uses 20")
    p.add_argument("--rounds", type=int, default=3, help="rounds of attncc and the floor timed in turn (CPU)")
    p.add_argument("--out", default=None, help="folder for host_overhead.md, .csv and .png")
    p.add_argument("--profile", action="store_true",
                   help="GPU: cProfile --calls forward+backward calls per case and length (no timing table)")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    lengths = [int(x) for x in args.n.split(",") if x]
    if args.ops:
        return run_ops([c for c in args.cases.split(",") if c] if "--cases" in (argv or sys.argv) else OPS_CASES)
    if args.stub:
        return run_stub(cases, lengths, args.calls, args.out, args.rounds)
    if args.profile:
        return run_profile(cases, lengths, args.calls, args.out)
    return run_gpu(cases, lengths, args.out)


def caching_cpu_allocator() -> str:
    """Make glibc keep freed memory for reuse, as the GPU's caching allocator does: no mmap for
    large blocks, no trimming. Otherwise every CPU tensor of 32 MB or more (N >= 4096 here) is an
    mmap and a munmap per call, whose page clearing and TLB flushes slow down everything after
    them, attncc's Python more than the floor's (the own time grew by ~15 us from N = 1024 to 4096
    with N-independent host work). Returns what was done, for the output."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1):
            return "glibc: no mmap, no trim (memory reused like a caching allocator)"
    except (OSError, AttributeError):
        pass
    return "allocator as is (no glibc mallopt)"


STUB_HEAD = ["case", "N", "impl", "host fwd", "host f+b", "launches fwd", "launches f+b", "floor fwd", "floor f+b",
             "own fwd", "own f+b", "note"]


def run_stub(cases, lengths, calls, out=None, rounds: int = 3) -> int:
    torch.set_num_threads(1)
    allocator = caching_cpu_allocator()
    title = (f"host overhead, launches stubbed, CPU: torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
             f"B=2 H=16 D=128 float16, us/call of thread CPU time, fastest of {rounds} rounds of 7 bursts of {calls} "
             f"calls, {allocator}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(title + "\n" + table_head(STUB_HEAD), flush=True)
    rows = []
    for name in cases:
        for n in lengths:
            r = {"case": name, "N": n, "impl": "attncc (stubbed)"}
            fill(r, "stubbed", lambda: _stub_times(name, n, calls, rounds))
            rows.append(r)
            print(table_line(r, STUB_HEAD), flush=True)
            write_tables(rows, STUB_HEAD, out, title)
    write_tables(rows, STUB_HEAD, out, title, plot=True)
    return 0


def _stub_times(name: str, n: int, calls: int, rounds: int) -> dict:
    """The fields of a --stub row: host us/call, launches, floor, own (host less floor)."""
    stub_launches(generated(name))
    r = host_times(name, n, "cpu", torch.float16, calls, clock=time.thread_time, rounds=rounds)
    out = {f"host {label}": r[label] for label in ("fwd", "f+b")}
    out.update({key: r[key] for key in ("launches fwd", "launches f+b", "floor fwd", "floor f+b")})
    out.update({f"own {label}": r[label] - r[f"floor {label}"] for label in ("fwd", "f+b")})
    return out


def triton_launch_us(name: str, n: int, calls: int = 20) -> dict:
    """Host microseconds of exactly the Triton launches of one forward and one forward+backward
    call (recorded by the stub, then replayed through the real kernels), per call."""
    from attncc.runtime.launch import ensure_allocator

    module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)
    log = stub_launches(module)
    log.keep_args = True
    out = {}
    try:
        for label, fn in (("fwd", lambda: module.attention(q.detach(), k.detach(), v.detach(), **kw)),
                          ("f+b", lambda: module.attention(q, k, v, **kw).backward(g))):
            log.clear()
            fn()
            launches = list(log)
            log.clear()

            def replay():
                ensure_allocator()  # (the backward's kernels ran on autograd's thread, which had it set)
                for stub, grid, args, kwargs in launches:
                    stub.real[grid](*args, **kwargs)
            out[label] = per_call_us(replay, calls, sync=torch.cuda.synchronize)
    finally:
        log.keep_args = False
        unstub(module)
    return out


def flex_and_sdpa(name: str, n: int, calls: int):
    """{(impl, 'host fwd' | 'host f+b' | 'gpu fwd' | 'gpu f+b'): us} of the baselines of
    bench/impls.py that have this spec (SDPA on cuDNN: causal, GQA; FlexAttention, its block mask
    made outside the timing) on the case of :func:`make_case`."""
    pattern = spec_pattern(name)
    hq = pattern.heads_q or 16
    case = Case(f"host-{name}-{n}", name, name, 2, n, Hq=hq, Hkv=pattern.heads_kv or hq, doc_mean=max(1, n // 4))
    case = dataclasses.replace(case, baselines=tuple(b for b in ("sdpa_cudnn", "flex") if applies(b, case) is None))
    try:
        impls, _, unavailable = implementations(prepare(case))
    except Exception as e:  # noqa: BLE001 - the attncc row stands without its baselines
        print(f"  baselines {name} N={n}: failed: {short_error(e, 200)}", flush=True)
        return {}
    for impl, why in unavailable.items():
        print(f"  {impl} {name} N={n}: unavailable: {why}", flush=True)
    out = {}
    for impl in impls[1:]:  # the baselines (attncc is timed by run_gpu)
        leaves = [t.detach().clone().requires_grad_() for t in impl.args]
        try:
            def fwd(impl=impl):
                with torch.no_grad():
                    impl.fn(*impl.args)

            def fwd_bwd(impl=impl, leaves=leaves):
                impl.fn(*leaves).backward(impl.grad_out)
                for t in leaves:
                    t.grad = None
            for label, step in (("fwd", fwd), ("f+b", fwd_bwd)):
                out[(impl.name, f"host {label}")] = per_call_us(step, calls, sync=torch.cuda.synchronize)
                out[(impl.name, f"gpu {label}")] = timer.time_ms(step, warmup=20, rep=100) * 1e3
        except Exception as e:  # noqa: BLE001 - one comparison failing must not end the run
            print(f"  {impl.name} {name} N={n}: failed: {short_error(e, 200)}", flush=True)
            out[(impl.name, "note")] = short_error(e)
    return out


def compiled_host_us(name: str, n: int, calls: int) -> dict:
    """Host us/call of attncc through ``torch.compile(fullgraph=True)`` (the custom ops)."""
    module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: module.attention(q, k, v, **kw), fullgraph=True)

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        fn(q, k, v).backward(g)
        q.grad = k.grad = v.grad = None
    return {label: per_call_us(step, calls, sync=torch.cuda.synchronize) for label, step in (("fwd", fwd), ("f+b", fwd_bwd))}


GPU_HEAD = ["case", "N", "impl", "host fwd", "host f+b", "gpu fwd", "gpu f+b", "plain host fwd", "plain host f+b",
            "plain gpu fwd", "plain gpu f+b", "fast same", "stub fwd", "stub f+b",
            "triton launch fwd", "triton launch f+b", "own fwd", "own f+b", "floor fwd", "floor f+b",
            "compiled host fwd", "compiled host f+b", "note"]


def run_gpu(cases, lengths, out) -> int:  # pragma: no cover - needs a GPU
    """Every number of the module doc on the GPU: a markdown table on stdout and in ``out``
    (host_overhead.md, rewritten after every case and length), the rows as CSV and a plot (host and
    GPU us/call against N). A part that fails is the row's note; the other parts still run."""
    calls = 20  # a burst short enough that the launch queue never fills: the time is the host's
    title = (f"host overhead, GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, {time.strftime('%Y-%m-%d %H:%M')}, B=2 H=16 D=128 bf16, "
             f"wall us/call: fastest of 7 bursts of {calls} calls without a sync; gpu: do_bench median")
    print(title + "\n" + table_head(GPU_HEAD), flush=True)
    rows = []
    for name in cases:
        for n in lengths:
            r = {"case": name, "N": n, "impl": "attncc"}
            fill(r, "attncc", lambda: _attncc_gpu_times(name, n, calls))
            fill(r, "plain launch", lambda: _plain_launch_times(name, n, calls))
            fill(r, "stubbed", lambda: _stub_columns(name, n, calls))
            fill(r, "triton launch", lambda: {f"triton launch {k}": t for k, t in triton_launch_us(name, n).items()})
            for label in ("fwd", "f+b"):
                if r.get(f"host {label}") is not None and r.get(f"triton launch {label}") is not None:
                    r[f"own {label}"] = r[f"host {label}"] - r[f"triton launch {label}"]
            fill(r, "torch.compile",
                 lambda: {f"compiled host {k}": t for k, t in compiled_host_us(name, n, calls).items()})
            new = [r] + baseline_rows(name, n, flex_and_sdpa(name, n, calls))
            rows += new
            for row in new:
                print(table_line(row, GPU_HEAD), flush=True)
            write_tables(rows, GPU_HEAD, out, title)
    write_tables(rows, GPU_HEAD, out, title, plot=True)
    return 0


def run_profile(cases, lengths, calls: int, out=None, top: int = 45) -> int:  # pragma: no cover - needs a GPU
    """Where the host time of a forward+backward call goes on CUDA tensors: cProfile over ``calls``
    calls (after warm-up), the functions sorted by their own time and by cumulative time, on stdout
    and in ``out``/profile_<case>_<n>.txt."""
    import cProfile
    import io
    import pstats

    for name in cases:
        for n in lengths:
            module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
            g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)
            _, fwd_bwd = attncc_calls(module, q, k, v, kw, g)
            for _ in range(10):
                fwd_bwd()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fwd_bwd()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(top)
            report = f"# {name} N={n}: cProfile of {calls} forward+backward calls on CUDA\n" + text.getvalue()
            print(report, flush=True)
            if out:
                Path(out).mkdir(parents=True, exist_ok=True)
                (Path(out) / f"profile_{name}_{n}.txt").write_text(report)
    return 0


def _attncc_gpu_times(name: str, n: int, calls: int) -> dict:  # pragma: no cover - needs a GPU
    module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)
    fwd, fwd_bwd = attncc_calls(module, q, k, v, kw, g)
    out = {}
    for label, fn in (("fwd", fwd), ("f+b", fwd_bwd)):
        out[f"host {label}"] = per_call_us(fn, calls, sync=torch.cuda.synchronize)
        out[f"gpu {label}"] = timer.time_ms(fn, warmup=20, rep=100) * 1e3
    return out


def _plain_launch_times(name: str, n: int, calls: int) -> dict:  # pragma: no cover - needs a GPU
    """``plain host`` / ``plain gpu`` fwd and f+b: :func:`_attncc_gpu_times` with ``ATTNCC_FAST_LAUNCH=0``
    (every launch through ``JITFunction.run``), and whether the fast launch's (the default:
    attncc.runtime.launch.FastKernel) outputs and gradients equal the plain launch's (``fast same``:
    bitwise, one call each)."""
    from bench.common import environment

    module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)

    def outputs():
        o = module.attention(q, k, v, **kw)
        return [o.detach(), *torch.autograd.grad(o, (q, k, v), g)]
    with environment({"ATTNCC_FAST_LAUNCH": "0"}):
        plain = outputs()
        times = _attncc_gpu_times(name, n, calls)
    with environment({"ATTNCC_FAST_LAUNCH": "1"}):
        fast = outputs()
    same = all(torch.equal(a, b) for a, b in zip(plain, fast))
    return {**{f"plain {key}": t for key, t in times.items()}, "fast same": "yes" if same else "NO"}


def _stub_columns(name: str, n: int, calls: int) -> dict:  # pragma: no cover - needs a GPU
    """stub and floor us/call, fwd and f+b, of the GPU run with the launches stubbed."""
    stubbed = host_times_stubbed(name, n, calls)
    return {f"{kind} {label}": stubbed[key] for label in ("fwd", "f+b")
            for kind, key in (("stub", label), ("floor", f"floor {label}"))}


def baseline_rows(name: str, n: int, times: dict) -> list:
    """Rows of :func:`flex_and_sdpa`'s {(impl, column): value}, one per implementation."""
    return [{"case": name, "N": n, "impl": impl, **{col: t for (i, col), t in times.items() if i == impl}}
            for impl in sorted({i for i, _ in times})]


def fill(row: dict, what: str, fn) -> None:
    """``row.update(fn())``; on an exception, ``what`` and the error in the row's note (and printed):
    one part of a row failing leaves the others measured."""
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001
        print(f"  {what} {row['case']} N={row['N']}: failed: {short_error(e, 200)}", flush=True)
        note(row, f"{what}: {short_error(e)}")


def host_times_stubbed(name: str, n: int, calls: int) -> dict:
    """Host us/call on the GPU with the Triton launches stubbed (CUDA tensors, no kernel)."""
    module = generated(name)
    stub_launches(module)
    try:
        return host_times(name, n, "cuda", torch.bfloat16, calls, sync=torch.cuda.synchronize)
    finally:
        unstub(module)


def _cell(x) -> str:
    if x is None:
        return ""
    text = f"{x:.1f}" if isinstance(x, float) else str(x)
    return text.replace("|", "/").replace("\n", " ")


def table_head(head) -> str:
    return "| " + " | ".join(head) + " |\n|" + "|".join("---" if h in ("case", "impl", "note") else "---:"
                                                        for h in head) + "|"


def table_line(row: dict, head) -> str:
    """One markdown line of ``row``: an empty cell where it has no such column."""
    return "| " + " | ".join(_cell(row.get(h)) for h in head) + " |"


def write_tables(rows, head, out, title: str, plot: bool = False) -> None:
    """host_overhead.md (``title`` and the table) and host_overhead.csv of ``rows`` in folder ``out``
    (nothing without one), and with ``plot`` host_overhead.png: rows may miss any column."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_overhead.md").write_text(
        title + "\n\n" + table_head(head) + "\n" + "".join(table_line(r, head) + "\n" for r in rows))
    import csv

    with open(out / "host_overhead.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if plot:
        plot_rows(rows, out)


def plot_rows(rows, out: Path) -> None:
    """host_overhead.png: host (dashed) and GPU us/call against N, per case and fwd / f+b; an
    implementation's line only where every point has the number."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no matplotlib: no {out / 'host_overhead.png'})")
        return
    if not rows:
        return
    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(2, len(cases), figsize=(4 * len(cases), 7), squeeze=False)
    for col, case in enumerate(cases):
        for row_i, label in enumerate(("fwd", "f+b")):
            ax = axes[row_i][col]
            for impl in sorted({r["impl"] for r in rows if r["case"] == case}):
                pts = sorted(((r["N"], r.get(f"host {label}"), r.get(f"gpu {label}")) for r in rows
                              if r["case"] == case and r["impl"] == impl), key=lambda p: p[0])
                ns = [p[0] for p in pts]
                if all(p[1] is not None for p in pts):
                    ax.plot(ns, [p[1] for p in pts], "--", marker="o", label=f"{impl} host")
                if all(p[2] is not None for p in pts):
                    ax.plot(ns, [p[2] for p in pts], "-", marker="s", label=f"{impl} gpu")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{case} {label}")
            ax.set_xlabel("N")
            ax.set_ylabel("us / call")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "host_overhead.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'host_overhead.md'}, {out / 'host_overhead.csv'} and {out / 'host_overhead.png'}")

