"""GPU check of the exactness fixes of issue 15's leftovers, compiled for the GPU (the tests run
them under the CPU interpreter): integer arithmetic past int32 (the host's WIDE guard, params and
the head count widened), integer powers, int64 gathers, position terms far into a sequence,
RoPE angles at 2**24, float64 tables with bfloat16 q/k/v, transforms that remove whole rows,
and the refusal of a divisor of 0. Forward and backward against attncc.reference (float64, CPU).

    PYTHONPATH=. python bench/exact_check.py        # a few minutes on an H200 (mostly compiling)

Prints one line per check and exits 1 on any failure. Not run yet on a GPU (written in a session
without one).
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import attncc  # noqa: E402
from cases import build_inline, module, pattern  # noqa: E402
from test_overflow_guard import SPECS as OVERFLOW_SPECS  # noqa: E402
from test_score_precision import SPECS as PRECISION_SPECS  # noqa: E402

DEV = "cuda"
FAILURES = []

# The specs of the tests that check these fixes under the interpreter, compiled for the GPU here.
SPECS = {**{name: OVERFLOW_SPECS[name] for name in ("int_product", "mid_sum", "square_param", "index_product",
                                                     "input_values", "power", "param_divisor")},
         **{name: PRECISION_SPECS[name] for name in ("alibi_far", "mod_linear", "bias_j", "f64_table", "some_rows")}}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def report(what, err, tol):
    ok = math.isfinite(err) and err < tol
    print(f"    {what:58s} {err:9.2e}  (< {tol:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        FAILURES.append(what)


def check(name, p, mod, *, N=(128, 128), H=4, dtype=torch.float32, backward=True, tol=None, **kw):
    tol = tol or (1e-3 if dtype == torch.float32 else 3e-2)
    gen = torch.Generator().manual_seed(len(name))
    q = torch.randn(1, H, N[0], 64, generator=gen)
    k, v = (torch.randn(1, H, N[1], 64, generator=gen) for _ in range(2))
    leaves = [t.to(DEV, dtype).requires_grad_() for t in (q, k, v)]
    gpu_kw = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    o = mod.attention(*leaves, **gpu_kw)
    ref_in = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *ref_in, **kw)
    report(f"{name} o {kw.get('q_offset', '')}", rel(o, ref), tol)
    if backward:
        g = torch.randn(o.shape, generator=gen)
        got = torch.autograd.grad((o * g.to(DEV, o.dtype)).sum(), leaves)
        want = torch.autograd.grad((ref * g.double()).sum(), ref_in)
        for label, a, b in zip("qkv", got, want):
            report(f"{name} d{label}", rel(a, b), tol * 10)


def main():
    built = build_inline(SPECS, Path(tempfile.mkdtemp(prefix="attncc_exact_")))
    gen = torch.Generator().manual_seed(0)
    check("int_product", *built["int_product"], q_offset=60000, k_offset=60000)
    check("mid_sum", *built["mid_sum"], q_offset=1_500_000_000, k_offset=1_500_000_000)
    check("square_param w=50000", *built["square_param"])
    check("square_param w=3", *built["square_param"], w=3)
    check("square_param w=1 (an int argument of 1)", *built["square_param"], w=1, q_offset=2**31 - 50,
          k_offset=2**31 - 50)
    check("index_product", *built["index_product"], q_offset=30000, k_offset=29990, t=torch.randn(4, 7, generator=gen))
    d = (2**31 - 1 - torch.randint(0, 1500, (1, 128), generator=gen)).to(torch.int32)
    check("input_values", *built["input_values"], d=d)
    check("power", *built["power"], q_offset=1000, k_offset=1000)
    for name in ("alibi_far", "mod_linear"):
        check(name, *built[name], q_offset=2**20 + 8, k_offset=2**20)
    check("bias_j (forward)", *built["bias_j"], q_offset=2**20 + 8, k_offset=2**20, backward=False)
    check("f64_table bf16", *built["f64_table"], dtype=torch.bfloat16, x=torch.tensor([0.8, -1.5, 0.3, 2.0],
                                                                                      dtype=torch.float64))
    check("some_rows", *built["some_rows"])
    for offset in (10**6, 2**24 - 40):
        check("rope_causal", pattern("rope_causal"), module("rope_causal"), q_offset=offset + 8, k_offset=offset)
    p, mod = built["param_divisor"]
    q = torch.randn(1, 2, 16, 64, device=DEV)
    try:
        mod.attention(q, q, q, w=0)
        report("param divisor 0 refused", math.inf, 1)
    except ValueError as e:
        ok = "division by zero" in str(e)
        report("param divisor 0 refused", 0.0 if ok else math.inf, 1)
    print("PASS" if not FAILURES else f"FAIL: {', '.join(FAILURES)}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
