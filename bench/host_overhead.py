"""Host overhead per call of attncc's generated attention, against SDPA (cuDNN) and FlexAttention.

    PYTHONPATH=. python bench/host_overhead.py --stub            # CPU: launches stubbed (no GPU needed)
    PYTHONPATH=. python bench/host_overhead.py --out $OUT        # GPU: host and GPU us/call, CSV and plot in $OUT

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
  what attncc's calls allocate (o and the LSE; delta, lse2 and the three gradients): torch's own
  share of a forward / forward+backward call. ``own`` = attncc's time less the floor (--stub), or
  less Triton's launches (GPU).
- On the GPU also attncc through ``torch.compile(fullgraph=True)`` (host us/call).
- On the GPU also ``gpu fwd`` / ``gpu f+b``: device microseconds per call (``do_bench``), and the
  same for SDPA (cuDNN backend) and FlexAttention (compiled, block mask built outside the timing).

Under ``--stub`` the CPU tensors run through ``TRITON_INTERPRET=1``'s code paths (the interpreter's
small tile config; float16 so that no operand is converted): the numbers are host time on this
CPU, not GPU numbers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

STUB = "--stub" in sys.argv
if STUB:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors pass the device check

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("causal", "document", "padding", "softcap", "gqa")
LENGTHS = (256, 1024, 4096, 16384)


class StubKernel:
    """Stands for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch
    and does nothing else: (kernel, grid) in the log, and the arguments too while ``log.keep_args``
    is set (kept arguments hold tensors alive, which would change what torch does: autograd
    copies a gradient that something else still references instead of taking it)."""

    def __init__(self, name: str, real, log: "LaunchLog"):
        self.name, self.real, self.log = name, real, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self, grid, args, kwargs) if self.log.keep_args else (self, grid))
        return launch


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
    """(module, q, k, v, keyword inputs) of one case at length ``n``."""
    module = importlib.import_module(f"generated.{name}")
    spec = module.SPEC
    hq = spec.heads_q or heads
    hkv = spec.heads_kv or hq
    q = torch.randn(batch, hq, n, head_dim, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, hkv, n, head_dim, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, hkv, n, head_dim, device=device, dtype=dtype, requires_grad=grad)
    kwargs = {}
    if name == "document":  # documents of about n / 4 tokens
        kwargs["doc"] = (torch.arange(n, device=device, dtype=torch.int32) // max(1, n // 4)).expand(batch, n).contiguous()
    if name == "padding":
        kwargs["kv_len"] = torch.tensor([n, n * 3 // 4][:batch] + [n] * max(0, batch - 2), device=device, dtype=torch.int32)
    return module, q, k, v, kwargs


def per_call_us(fn, calls: int, repeats: int = 7, sync=None, clock=time.perf_counter) -> float:
    """The fastest over ``repeats`` bursts of the microseconds per call of ``calls`` calls of
    ``fn`` (the minimum: other processes on the machine only ever add time). ``clock``: wall
    time on the GPU; the thread's CPU time with --stub, which a busy shared CPU distorts less."""
    fn()  # warm: binds, compiles, caches
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t = clock()
        for _ in range(calls):
            fn()
        times.append((clock() - t) / calls * 1e6)
        if sync:
            sync()
    return min(times)


class _Floor(torch.autograd.Function):
    """Allocates what an attention call returns and its backward the gradients; nothing else."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q), torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v = ctx.saved_tensors
        rows = q.shape[:-1]  # what attncc's backward allocates besides the gradients: delta, lse2
        torch.empty(rows, dtype=torch.float32, device=q.device), torch.empty(rows, dtype=torch.float32, device=q.device)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def host_times(name: str, n: int, device: str, dtype, calls: int, sync=None, clock=time.perf_counter):
    """{'fwd', 'f+b', 'launches fwd', 'launches f+b', 'floor fwd', 'floor f+b'} of one case."""
    module, q, k, v, kw = make_case(name, n, device, dtype, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device=device, dtype=dtype)
    log = getattr(module, "_STUB_LOG", None)
    out = {}

    def fwd():
        with torch.no_grad():
            module.attention(q, k, v, **kw)

    def fwd_bwd():
        module.attention(q, k, v, **kw).backward(g)
        q.grad = k.grad = v.grad = None

    for label, fn in (("fwd", fwd), ("f+b", fwd_bwd)):
        out[label] = per_call_us(fn, calls, sync=sync, clock=clock)
        if log is not None:
            log.clear()
            fn()
            out[f"launches {label}"] = len(log)
    out["floor fwd"] = per_call_us(lambda: _Floor.apply(q.detach(), k.detach(), v.detach()), calls, sync=sync, clock=clock)

    def floor_fb():
        o, _ = _Floor.apply(q, k, v)
        o.backward(g)
        q.grad = k.grad = v.grad = None
    out["floor f+b"] = per_call_us(floor_fb, calls, sync=sync, clock=clock)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stub", action="store_true", help="CPU: stub the Triton launches (see the module doc)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--n", default=",".join(map(str, LENGTHS)))
    p.add_argument("--calls", type=int, default=200, help="calls per timed burst (CPU); the GPU uses 20")
    p.add_argument("--out", default=None, help="folder for the CSV and the plot (GPU)")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    lengths = [int(x) for x in args.n.split(",") if x]
    if args.stub:
        return run_stub(cases, lengths, args.calls, args.out)
    return run_gpu(cases, lengths, args.out)


def run_stub(cases, lengths, calls, out=None) -> int:
    torch.set_num_threads(1)
    print(f"host overhead, launches stubbed, CPU: torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"B=2 H=16 D=128 float16, thread CPU time, fastest of 7 bursts of {calls} calls")
    print("| case | N | fwd us | f+b us | launches fwd / f+b | floor fwd us | floor f+b us | own fwd | own f+b |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in cases:
        module = importlib.import_module(f"generated.{name}")
        stub_launches(module)
        for n in lengths:
            r = host_times(name, n, "cpu", torch.float16, calls, clock=time.thread_time)
            own = {label: r[label] - r[f"floor {label}"] for label in ("fwd", "f+b")}
            print(f"| {name} | {n} | {r['fwd']:.1f} | {r['f+b']:.1f} | {r['launches fwd']} / {r['launches f+b']} | "
                  f"{r['floor fwd']:.1f} | {r['floor f+b']:.1f} | {own['fwd']:.1f} | {own['f+b']:.1f} |", flush=True)
            rows.append({"case": name, "N": n, "impl": "attncc (stubbed)", "host fwd": r["fwd"], "host f+b": r["f+b"]})
    if out:
        write_csv_and_plot(rows, ["case", "N", "impl", "host fwd", "host f+b"], Path(out))
    return 0


def triton_launch_us(name: str, n: int, calls: int = 20) -> dict:
    """Host microseconds of exactly the Triton launches of one forward and one forward+backward
    call (recorded by the stub, then replayed through the real kernels), per call."""
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
                for stub, grid, args, kwargs in launches:
                    stub.real[grid](*args, **kwargs)
            out[label] = per_call_us(replay, calls, sync=torch.cuda.synchronize)
    finally:
        log.keep_args = False
        unstub(module)
    return out


def flex_and_sdpa(name: str, n: int, calls: int):
    """{(impl, 'host fwd' | 'host f+b' | 'gpu fwd' | 'gpu f+b'): us} of SDPA (cuDNN, where the
    pattern is one SDPA has: causal, GQA) and FlexAttention (block mask made outside the timing)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
    g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)
    gqa = q.shape[1] != k.shape[1]
    impls = {}
    if name in ("causal", "gqa"):
        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        impls["sdpa cudnn"] = sdpa
    doc, kv_len = kw.get("doc"), kw.get("kv_len")
    masks = {"causal": lambda b, h, i, j: i >= j, "gqa": lambda b, h, i, j: i >= j,
             "softcap": lambda b, h, i, j: i >= j,
             "document": lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (i >= j),
             "padding": lambda b, h, i, j: j < kv_len[b]}
    score = (lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)) if name == "softcap" else None
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(masks[name], q.shape[0], None, n, n, device="cuda")
    impls["flex"] = lambda q, k, v: flex(q, k, v, score_mod=score, block_mask=block_mask, enable_gqa=gqa)
    out = {}
    for impl, fn in impls.items():
        try:
            def fwd():
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd():
                fn(q, k, v).backward(g)
                q.grad = k.grad = v.grad = None
            for label, step in (("fwd", fwd), ("f+b", fwd_bwd)):
                out[(impl, f"host {label}")] = per_call_us(step, calls, sync=torch.cuda.synchronize)
                out[(impl, f"gpu {label}")] = do_bench(step, warmup=20, rep=100, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001 - one comparison failing must not end the run
            print(f"  {impl} {name} N={n}: failed: {type(e).__name__}: {e}", flush=True)
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


def run_gpu(cases, lengths, out) -> int:  # pragma: no cover - needs a GPU
    """Every number of the module doc on the GPU: a markdown table on stdout, the rows as CSV and
    a plot (host and GPU us/call against N) in ``out``."""
    from triton.testing import do_bench

    calls = 20  # a burst short enough that the launch queue never fills: the time is the host's
    sync = torch.cuda.synchronize
    print(f"host overhead, GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}, {time.strftime('%Y-%m-%d %H:%M')}, B=2 H=16 D=128 bf16, "
          f"wall us/call: fastest of 7 bursts of {calls} calls without a sync; gpu: do_bench median")
    head = ["case", "N", "impl", "host fwd", "host f+b", "gpu fwd", "gpu f+b", "stub fwd", "stub f+b",
            "triton launch fwd", "triton launch f+b", "own fwd", "own f+b", "floor fwd", "floor f+b",
            "compiled host fwd", "compiled host f+b"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = []
    for name in cases:
        for n in lengths:
            module, q, k, v, kw = make_case(name, n, "cuda", torch.bfloat16, grad=True)
            g = torch.randn(q.shape[:-1] + (v.shape[-1],), device="cuda", dtype=torch.bfloat16)

            def fwd():
                with torch.no_grad():
                    module.attention(q, k, v, **kw)

            def fwd_bwd():
                module.attention(q, k, v, **kw).backward(g)
                q.grad = k.grad = v.grad = None
            r = {"case": name, "N": n, "impl": "attncc"}
            for label, fn in (("fwd", fwd), ("f+b", fwd_bwd)):
                r[f"host {label}"] = per_call_us(fn, calls, sync=sync)
                r[f"gpu {label}"] = do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3
            stubbed = host_times_stubbed(name, n, calls)
            launches = triton_launch_us(name, n)
            for label in ("fwd", "f+b"):
                r[f"stub {label}"] = stubbed[label]
                r[f"floor {label}"] = stubbed[f"floor {label}"]
                r[f"triton launch {label}"] = launches[label]
                r[f"own {label}"] = r[f"host {label}"] - launches[label]
            try:
                compiled = compiled_host_us(name, n, calls)
                r["compiled host fwd"], r["compiled host f+b"] = compiled["fwd"], compiled["f+b"]
            except Exception as e:  # noqa: BLE001
                print(f"  torch.compile {name} N={n}: failed: {type(e).__name__}: {e}", flush=True)
            rows.append(r)
            others = flex_and_sdpa(name, n, calls)
            for impl in sorted({i for i, _ in others}):
                rows.append({"case": name, "N": n, "impl": impl, **{m: t for (i, m), t in others.items() if i == impl}})
            for row in rows[-1 - len({i for i, _ in others}):]:
                print("| " + " | ".join(_cell(row.get(h)) for h in head) + " |", flush=True)
    if out:
        write_csv_and_plot(rows, head, Path(out))
    return 0


def host_times_stubbed(name: str, n: int, calls: int) -> dict:
    """Host us/call on the GPU with the Triton launches stubbed (CUDA tensors, no kernel)."""
    module = importlib.import_module(f"generated.{name}")
    stub_launches(module)
    try:
        return host_times(name, n, "cuda", torch.bfloat16, calls, sync=torch.cuda.synchronize)
    finally:
        unstub(module)


def _cell(x) -> str:
    return "" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def write_csv_and_plot(rows, head, out: Path) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "host_overhead.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no matplotlib: wrote {out / 'host_overhead.csv'} only)")
        return
    cases = sorted({r["case"] for r in rows})
    fig, axes = plt.subplots(2, len(cases), figsize=(4 * len(cases), 7), squeeze=False)
    for col, case in enumerate(cases):
        for row_i, label in enumerate(("fwd", "f+b")):
            ax = axes[row_i][col]
            for impl in sorted({r["impl"] for r in rows if r["case"] == case}):
                pts = sorted((r["N"], r.get(f"host {label}"), r.get(f"gpu {label}")) for r in rows
                             if r["case"] == case and r["impl"] == impl)
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
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "host_overhead.png", dpi=120)
    print(f"wrote {out / 'host_overhead.csv'} and {out / 'host_overhead.png'}")


if __name__ == "__main__":
    sys.exit(main())
