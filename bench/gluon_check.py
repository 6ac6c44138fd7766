"""GPU check of the Gluon sm90 kernels (attncc/gluon, issue 20): correctness at real sizes, then
forward timing against cuDNN SDPA, the generated `tl` kernels and FlexAttention.

    PYTHONPATH=. python bench/gluon_check.py             # < 3 minutes on an H200, about half compiling
    PYTHONPATH=. python bench/gluon_check.py --skip-flex --kernels ws,pipelined

Kernels: "pipelined" (fwd_pipelined.py, one instruction stream), "ws-nopp" (fwd_ws.py without
ping-pong: producer warp, two consumer warpgroups, intra-warpgroup overlap, persistent tiles) and
"ws" (the same with ping-pong): the A/B of docs/gluon.md's structural steps.

1. Smoke: one tiny launch per kernel under a watchdog (a deadlocked persistent kernel would hang
   the process; the watchdog prints which launch and exits, which frees the GPU).
2. Correctness against attention in float32 torch (TF32 off, one (batch, head) slab at a time, O and
   the natural-log LSE; the same math as SDPA's float32 path, with the LSE): outputs poisoned with
   NaN first; O passes when its max error is within 3x that of torch's own SDPA in the same dtype
   (plus a small floor), the LSE within 2e-3; rows with no allowed key must give O = 0, LSE = -inf.
   Every case runs the "ws" kernel; the bf16 D = 128 dense and causal cases run all three.
3. Timing (bf16, D = 128; dense 4K B4 H16, causal 8K B2 H16, GQA 32/8 causal 8K B2): do_bench
   medians after a heat-up, implementations interleaved over 3 rounds (median of rounds);
   TFLOP/s = 4 * B * Hq * Nq * Nk * D * density / time.

Prints a table last; exits 1 on any failure. Not run yet: written in a session without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attncc.gluon import launch as gluon  # noqa: E402
from common import attention_flops, causal_density, heat_up, tflops  # noqa: E402

DEV = "cuda"
FAILURES = []
KERNEL_NAMES = ("pipelined", "ws-nopp", "ws")


def kernel_config(name: str, head_dim: int) -> gluon.GluonConfig:
    if name == "pipelined":
        return gluon.default_config(head_dim, "pipelined")
    cfg = gluon.default_config(head_dim, "ws")
    return dataclasses.replace(cfg, pingpong=(name == "ws"))


# ---------------------------------------------------------------------------------------------
# a watchdog for hangs


class Watchdog:
    """Exit the process when a launch does not complete within `seconds` (a deadlock in a
    warp-specialized kernel spins forever; exiting tears the context down)."""

    def __init__(self, seconds: float):
        self.seconds, self.what, self.deadline = seconds, None, None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            time.sleep(0.5)
            if self.deadline is not None and time.monotonic() > self.deadline:
                print(f"\nHANG: {self.what} did not finish within {self.seconds:.0f} s; exiting", flush=True)
                os._exit(3)

    def run(self, what, fn, seconds=None):
        self.what, self.deadline = what, time.monotonic() + (seconds or self.seconds)
        try:
            out = fn()
            torch.cuda.synchronize()
            return out
        finally:
            self.deadline = None


# ---------------------------------------------------------------------------------------------
# reference


def reference(q, k, v, causal, scale, q_offset=0, k_offset=0):
    """float32 attention (TF32 off): O and the natural-log LSE; rows with no allowed key give
    O = 0 and LSE = -inf. One batch row and a few heads at a time (the scores are materialized)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    o = torch.empty(B, Hq, Nq, D, device=DEV, dtype=torch.float32)
    lse = torch.empty(B, Hq, Nq, device=DEV, dtype=torch.float32)
    i = q_offset + torch.arange(Nq, device=DEV)
    j = k_offset + torch.arange(Nk, device=DEV)
    allowed = (j[None, :] <= i[:, None]) if causal else None
    heads = max(1, min(Hq, (1 << 30) // (Nq * Nk * 4)))
    for b in range(B):
        for h0 in range(0, Hq, heads):
            hs = torch.arange(h0, min(Hq, h0 + heads), device=DEV)
            s = q[b, hs].float() @ k[b, hs // group].float().transpose(-1, -2) * scale
            if allowed is not None:
                s.masked_fill_(~allowed, -math.inf)
            m = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
            o[b, hs] = p @ v[b, hs // group].float()
            lse[b, hs] = m
    return o, lse


def peer(q, k, v, causal, scale, q_offset, k_offset):
    """torch's own SDPA in the inputs' dtype (its default backend), for the error to compare with."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = None
    if causal and (q_offset, k_offset, Nq) != (0, 0, Nk):
        i = q_offset + torch.arange(Nq, device=DEV)
        j = k_offset + torch.arange(Nk, device=DEV)
        mask = j[None, :] <= i[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------
# correctness


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    pattern: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    dtype: torch.dtype = torch.bfloat16
    q_offset: int = 0
    k_offset: int = 0
    all_kernels: bool = False


CASES = (
    Case("dense 4K B4 H16 D128 bf16", "dense", 4, 16, 16, 4096, 4096, 128, all_kernels=True),
    Case("causal 8K B2 H16 D128 bf16", "causal", 2, 16, 16, 8192, 8192, 128, all_kernels=True),
    Case("GQA 32/8 causal 8K B1 D128 bf16", "causal", 1, 32, 8, 8192, 8192, 128),
    Case("dense 4K B4 H16 D64 bf16", "dense", 4, 16, 16, 4096, 4096, 64),
    Case("causal 8K B2 H16 D64 bf16", "causal", 2, 16, 16, 8192, 8192, 64),
    Case("causal 4K B2 H16 D128 fp16", "causal", 2, 16, 16, 4096, 4096, 128, torch.float16),
    Case("dense 4K B2 H16 D64 fp16", "dense", 2, 16, 16, 4096, 4096, 64, torch.float16),
    Case("causal 4K B2 H8 D256 bf16", "causal", 2, 8, 8, 4096, 4096, 256),
    # a chunk of a longer sequence: queries 3000..3999 against keys 0..3999, GQA 16/4, ragged ends
    Case("causal chunk q@3000 1000x4000 GQA", "causal", 2, 16, 4, 1000, 4000, 128, q_offset=3000),
    # keys all after the queries: every row sees no key (O = 0, LSE = -inf)
    Case("causal chunk k@1000 (all masked)", "causal", 1, 4, 4, 300, 512, 128, k_offset=1000),
    Case("dense ragged 777x1333", "dense", 2, 8, 8, 777, 1333, 128),
)


def qkv(case: Case, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = [(case.B, case.Hq, case.Nq, case.D), (case.B, case.Hkv, case.Nk, case.D),
              (case.B, case.Hkv, case.Nk, case.D)]
    return [torch.randn(*s, device=DEV, dtype=case.dtype, generator=g) for s in shapes]


def check_case(case: Case, kernels, dog: Watchdog):
    q, k, v = qkv(case)
    scale = case.D ** -0.5
    causal = case.pattern == "causal"
    ref_o, ref_lse = reference(q, k, v, causal, scale, case.q_offset, case.k_offset)
    seen = torch.isfinite(ref_lse)  # rows with at least one allowed key
    peer_o = peer(q, k, v, causal, scale, case.q_offset, case.k_offset).float()
    peer_err = float((peer_o - ref_o).abs()[seen].max()) if seen.any() else 0.0
    floor = 1e-3 if case.dtype == torch.bfloat16 else 2.5e-4
    for name in kernels:
        what = f"{name:9s} {case.name}"
        try:
            out = torch.full((case.B, case.Hq, case.Nq, case.D), math.nan, device=DEV, dtype=case.dtype)
            lse_out = torch.full((case.B, case.Hq, case.Nq), math.nan, device=DEV, dtype=torch.float32)
            dog.run(what, lambda: gluon.attention(
                q, k, v, pattern=case.pattern, scale=scale, q_offset=case.q_offset, k_offset=case.k_offset,
                return_lse=True, config=kernel_config(name, case.D), out=out, lse_out=lse_out), seconds=300)
            o = out.float()
            problems = []
            if torch.isnan(o).any() or torch.isnan(lse_out).any():
                problems.append("NaN left (unwritten or computed)")
            o_err = float((o - ref_o).abs()[seen].max()) if seen.any() else 0.0
            lse_err = float((lse_out - ref_lse).abs()[seen].max()) if seen.any() else 0.0
            if not o_err <= 3 * peer_err + floor:
                problems.append(f"O error {o_err:.2e} > 3 x SDPA's {peer_err:.2e} + {floor:.0e}")
            if not lse_err <= 2e-3:
                problems.append(f"LSE error {lse_err:.2e}")
            if (~seen).any():
                if not (torch.all(o[~seen] == 0) and torch.all(lse_out[~seen] == -math.inf)):
                    problems.append("rows without keys are not O = 0, LSE = -inf")
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            print(f"  {what:48s} O {o_err:8.2e} (SDPA {peer_err:8.2e})  LSE {lse_err:8.2e}  {status}", flush=True)
        except Exception as e:  # a compile error of one variant should not hide the others
            status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"  {what:48s} {status}", flush=True)
            traceback.print_exc(limit=3)
        if status != "ok":
            FAILURES.append(what)


def smoke(kernels, dog: Watchdog):
    """A tiny launch of each kernel (both patterns) first: a hang or a launch error shows here."""
    for name in kernels:
        for pattern in ("dense", "causal"):
            case = Case(f"smoke {pattern}", pattern, 1, 2, 1, 300, 300, 128)
            q, k, v = qkv(case)
            what = f"{name:9s} smoke {pattern} 300x300"
            try:
                t = time.perf_counter()
                o = dog.run(what, lambda: gluon.attention(q, k, v, pattern=pattern,
                                                          config=kernel_config(name, 128)), seconds=240)
                ref, _ = reference(q, k, v, pattern == "causal", 128 ** -0.5)
                err = float((o.float() - ref).abs().max())
                ok = err < 2e-2
                print(f"  {what:48s} max error {err:.2e} ({time.perf_counter() - t:.1f} s with compile) "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
            except Exception as e:
                ok = False
                print(f"  {what:48s} FAIL: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc(limit=3)
            if not ok:
                FAILURES.append(what)


# ---------------------------------------------------------------------------------------------
# timing


TIMED = (
    ("dense B4 H16 N4096", "dense", 4, 16, 16, 4096),
    ("causal B2 H16 N8192", "causal", 2, 16, 16, 8192),
    ("GQA 32/8 causal B2 N8192", "causal", 2, 32, 8, 8192),
)


def implementations(pattern, q, k, v, kernels, with_flex):
    """name -> zero-argument callable computing the forward (bf16, D = 128)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = pattern == "causal"
    impls = {}
    for name in kernels:
        cfg = kernel_config(name, q.shape[-1])
        impls[f"gluon {name}"] = (lambda cfg=cfg: gluon.attention(q, k, v, pattern=pattern, config=cfg))
    group = q.shape[1] // k.shape[1]
    # cuDNN's SDPA takes equal head counts: K/V repeated outside the timed region.
    k_rep, v_rep = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if group > 1 else (k, v)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=causal)
    impls["cuDNN SDPA"] = cudnn
    import generated.causal as tl_causal
    import generated.dense as tl_dense
    tl_module = tl_causal if causal else tl_dense
    impls["attncc tl"] = lambda: tl_module.attention(q, k, v)
    if with_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[2], k.shape[2],
                                           device=DEV)
        impls["FlexAttention"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=group > 1)
    return impls


def time_cases(kernels, with_flex, dog: Watchdog, rounds=3):
    from triton.testing import do_bench

    rows = []
    for label, pattern, B, Hq, Hkv, N in TIMED:
        case = Case(label, pattern, B, Hq, Hkv, N, N, 128)
        q, k, v = qkv(case, seed=1)
        flops = attention_flops(B, Hq, N, N, 128, causal_density(N) if pattern == "causal" else 1.0)
        impls = {}
        for name, fn in implementations(pattern, q, k, v, kernels, with_flex).items():
            try:  # compile and warm each one first, under the watchdog
                dog.run(f"{name} {label}", fn, seconds=300)
                impls[name] = fn
            except Exception as e:  # a peer that cannot run here is a missing column, not a failure of ours
                first_line = str(e).splitlines()[0][:160] if str(e) else ""
                print(f"  {name:18s} {label}: {'FAIL' if name.startswith('gluon') else 'unavailable'} "
                      f"{type(e).__name__}: {first_line}", flush=True)
                if name.startswith("gluon"):
                    FAILURES.append(f"{name} {label} (timing)")
        times = {name: [] for name in impls}
        for _ in range(rounds):  # interleaved: clock drift hits every implementation alike
            for name, fn in impls.items():
                times[name].append(dog.run(f"{name} {label} (timing)",
                                           lambda: do_bench(fn, warmup=25, rep=100, return_mode="median")))
        result = {name: tflops(flops, statistics.median(ts)) for name, ts in times.items()}
        rows.append((label, result))
        print(f"  {label:26s} " + "  ".join(f"{n} {t:6.1f}" for n, t in result.items()), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", default=",".join(KERNEL_NAMES),
                        help=f"comma-separated subset of {KERNEL_NAMES}")
    parser.add_argument("--skip-flex", action="store_true", help="no FlexAttention column (its compile is slow)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--heat", type=float, default=20.0, help="seconds of heat-up before timing")
    args = parser.parse_args()
    kernels = tuple(k for k in args.kernels.split(",") if k)
    unknown = set(kernels) - set(KERNEL_NAMES)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {KERNEL_NAMES}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("bench/gluon_check.py needs an sm90 GPU (H100/H200): the Gluon kernels use wgmma and TMA")
        return 2
    import triton
    print(f"Gluon sm90 check: torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dog = Watchdog(120)
    start = time.perf_counter()

    print("\n1. smoke", flush=True)
    smoke(kernels, dog)
    print(f"\n2. correctness against float32 torch ({time.perf_counter() - start:.0f} s)", flush=True)
    for case in CASES:
        check_case(case, [k for k in kernels if case.all_kernels or k == "ws"], dog)
    rows = []
    if not args.skip_timing:
        print(f"\n3. timing, bf16 D=128, TFLOP/s ({time.perf_counter() - start:.0f} s)", flush=True)
        heat_up(args.heat)
        rows = time_cases(kernels, not args.skip_flex, dog)

    print(f"\nSummary ({time.perf_counter() - start:.0f} s): "
          f"{'all checks passed' if not FAILURES else f'{len(FAILURES)} FAILED: ' + ', '.join(FAILURES)}")
    if rows:
        names = sorted({n for _, r in rows for n in r}, key=lambda n: (not n.startswith("gluon"), n))
        print("\n| case (fwd TFLOP/s, bf16, D=128) | " + " | ".join(names) + " | gluon ws / cuDNN |")
        print("|---|" + "---:|" * (len(names) + 1))
        for label, r in rows:
            ratio = r["gluon ws"] / r["cuDNN SDPA"] if "gluon ws" in r and "cuDNN SDPA" in r else float("nan")
            print(f"| {label} | " + " | ".join(f"{r[n]:.1f}" if n in r else "–" for n in names) + f" | {ratio:.2f} |")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
