"""GPU check past 2**31 elements per tensor (issue 15): forward and backward at the issue's size,
decode over a page pool past 2**31 elements, and a packed (varlen) batch past 2**31 elements.

    python bench/big_check.py            # about 2 minutes on an H200 (mostly Triton compiling), < 60 GB

Before the fix these crashed with "CUDA error: an illegal memory access" (int32 products of batch /
head indices and strides). Each case compares a few (b, h) slices, the last ones included, with
torch's SDPA in float32 computed on those slices alone, and the LSE of sampled rows with a float32
log-sum-exp. Prints one line per check and PASS / FAIL per case; exits 1 on any failure.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generated.causal as causal  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
TOL = 2e-2  # ||o - ref|| / ||ref|| for bfloat16 inputs (tests/cases.py REL_TOL)
LSE_TOL = 5e-2
FAILURES = []


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def report(what, err, tol, extra=""):
    ok = math.isfinite(err) and err < tol
    print(f"    {what:44s} {err:9.2e}  (< {tol:.0e}) {'ok' if ok else 'FAIL'} {extra}", flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def sampled_lse(q, k, scale, rows, q_offset=0):
    """float32 log-sum-exp of query rows ``rows`` of one head (causal, keys 0..i)."""
    s = (q[rows].float() @ k.float().T) * scale  # [R, Nk]
    i = torch.as_tensor(rows, device=q.device)[:, None] + q_offset
    s = torch.where(torch.arange(k.shape[0], device=q.device)[None, :] <= i, s, -math.inf)
    return torch.logsumexp(s, -1)


def elements(*shape):
    return math.prod(shape)


def decode_reference(q, k, v):
    """float32 attention of q [Hq, Nq, D] over a cache k, v [Hkv, L, D], query t at position
    L - Nq + t seeing keys 0 .. L - Nq + t (causal), per kv head (no copy of the cache per query head)."""
    Hq, Nq, D = q.shape
    Hkv, L, _ = k.shape
    group = Hq // Hkv
    allowed = torch.arange(L, device=q.device)[None, :] <= (L - Nq + torch.arange(Nq, device=q.device))[:, None]
    out = []
    for hk in range(Hkv):
        s = (q[hk * group:(hk + 1) * group].float() @ k[hk].float().T) / math.sqrt(D)  # [group, Nq, L]
        p = torch.softmax(torch.where(allowed, s, -math.inf), -1)
        out.append(p @ v[hk].float())
    return torch.cat(out)


def case_small_wide():
    """Small calls through the paths issue 15 added, compiled for this GPU: positions past 2**31 (WIDE:
    int64 positions, RoPE angles in float64, dropout counters), int64 and strided kv_len / block
    tables, against attncc.reference (float64) on the whole call."""
    import importlib

    import attncc
    from attncc.spec import load_spec

    print("[0/3] small calls at positions past 2**31, int64 and strided index tensors", flush=True)
    torch.manual_seed(3)
    # (spec, offset, keywords, backward too): offsets below 2**31 that cross it (int32 arguments, WIDE
    # kernels) and past 2**32 (int64 arguments); each compiles its own kernels, so a few cases only
    cases = [("causal", 2**31 - 100, {}, True), ("rope_causal", 2**32 - 50, {}, True),
             ("causal_dropout", 2**31 - 100, {"seed": 5, "dropout_p": 0.2}, True),
             ("sliding_window", 2**32 - 50, {"window": 100}, False), ("padding", 2**31 - 100, None, False),
             # the walks of issue 16: chunks, two closed-form segments, exact block lists (their tile kernel)
             ("chunked_local", 2**31 - 100, {"chunk": 64}, True), ("sink_window", 2**32 - 50, {"sinks": 4, "window": 100}, True),
             ("neighborhood_2d", 2**31 - 100, {"width": 24, "radius": 2}, True)]
    for name, offset, kw, backward in cases:
        p, mod = load_spec(ROOT / "specs" / f"{name}.toml"), importlib.import_module(f"generated.{name}")
        q, k, v = (torch.randn(2, 4, 300, 64, device=DEV, dtype=BF16).requires_grad_(backward) for _ in range(3))
        args = dict(kw) if kw is not None else {"kv_len": torch.tensor([offset + 250, offset + 40], device=DEV)}
        ref_args = {n: x for n, x in args.items() if n not in ("seed", "dropout_p")}
        if "seed" in args:
            ref_args.update(keep_mask=mod.dropout_keep_mask(q, k, v, q_offset=offset, k_offset=offset, **args),
                            dropout_p=args["dropout_p"])
        o = mod.attention(q, k, v, q_offset=offset, k_offset=offset, **args)
        ref_in = [x.detach().double().requires_grad_(backward) for x in (q, k, v)]
        ref = attncc.reference(p, *ref_in, q_offset=offset, k_offset=offset, **ref_args)
        errs = [rel(o, ref)]
        if backward:
            do = torch.randn_like(o)
            grads = torch.autograd.grad(o, (q, k, v), do)
            errs += [rel(a, b) for a, b in zip(grads, torch.autograd.grad(ref, ref_in, do.double()))]
        report(f"{name} at offset {offset} ({'o, dq, dk, dv' if backward else 'o'}: max)", max(errs), TOL)
    q = torch.randn(3, 8, 2, 64, device=DEV, dtype=BF16)
    kp, vp = (torch.randn(40, 16, 2, 64, device=DEV, dtype=BF16) for _ in range(2))
    table = torch.randperm(40, device=DEV)[:36].view(3, 12)
    kv_len = torch.tensor([[190, 0], [77, 0], [5, 0]], device=DEV)[:, 0]  # int64, stride 2
    table_t = table.t().contiguous().t()  # int64, column-major
    o = causal.decode(q, kp, vp, kv_len=kv_len, block_table=table_t)
    for b in range(3):
        L = int(kv_len[b])
        k = kp[table[b]].reshape(-1, 2, 64)[:L].transpose(0, 1)
        v = vp[table[b]].reshape(-1, 2, 64)[:L].transpose(0, 1)
        report(f"decode, int64 strided kv_len and block table (b={b})", rel(o[b], decode_reference(q[b], k, v)), TOL)


def case_forward_backward(B=9, H=32, N=65536, D=128):
    """The issue's case: causal, bf16, B = 9, 32 heads, N = 65536, D = 128."""
    n = elements(B, H, N, D)
    print(f"[1/3] causal forward + backward, B={B} H={H} N={N} D={D} bf16: {n:.3g} elements per tensor "
          f"({n / 2**31:.2f} x 2**31)", flush=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=BF16).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, D, device=DEV, dtype=BF16)
    t = time.time()
    o, lse = causal.attention(q, k, v, return_lse=True)
    torch.cuda.synchronize()
    print(f"    forward: {time.time() - t:.1f} s (compile included)", flush=True)
    t = time.time()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    print(f"    backward: {time.time() - t:.1f} s (compile included); peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    scale = 1.0 / math.sqrt(D)
    rows = sorted({0, 1, min(777, N - 1), N // 2, N - 2, N - 1})
    for b, h in [(B - 1, H - 1), (B - 1, 0), (B // 2, min(H // 2 + 1, H - 1)), (0, 0)]:
        qs, ks, vs = (x.detach()[b, h].float()[None, None].requires_grad_() for x in (q, k, v))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
            ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), do[b, h].float()[None, None])
        where = f"(b={b}, h={h}; offset of q[b, h] = {(b * H + h) * N * D:.3g})"
        report(f"o    {where}", rel(o[b, h], ref[0, 0]), TOL)
        lse_ref = sampled_lse(q[b, h], k[b, h], scale, rows)
        report(f"lse  (b={b}, h={h}, sampled rows, max abs)", float((lse[b, h, rows] - lse_ref).abs().max()), LSE_TOL)
        for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            report(f"{name:4s} (b={b}, h={h})", rel(got[b, h], want[0, 0]), TOL)
        del qs, ks, vs, ref, rq, rk, rv
    del q, k, v, do, o, lse, dq, dk, dv
    torch.cuda.empty_cache()


def case_decode(B=4, Hq=32, Hkv=8, Nq=2, D=128, page=256, pages=8300):
    """decode over a paged cache whose pool holds more than 2**31 elements: rows read pages at the
    top of the pool (page * page stride past 2**31), and a contiguous cache past 2**31 too."""
    n = elements(pages, page, Hkv, D)
    print(f"[2/3] decode, paged pool [{pages}, {page}, {Hkv}, {D}] bf16: {n:.3g} elements ({n / 2**31:.2f} x 2**31)",
          flush=True)
    torch.manual_seed(1)
    kp = torch.randn(pages, page, Hkv, D, device=DEV, dtype=BF16)
    vp = torch.randn(pages, page, Hkv, D, device=DEV, dtype=BF16)
    q = torch.randn(B, Hq, Nq, D, device=DEV, dtype=BF16)
    kv_len = torch.tensor([40000, 1234, 65536, 20000][:B], dtype=torch.int32)
    per_row = -(-int(kv_len.max()) // page)
    # rows 0 and 2 from the top of the pool, rows 1 and 3 from anywhere
    table = torch.stack([torch.arange(pages - per_row, pages), torch.randperm(pages)[:per_row],
                         torch.arange(pages - per_row, pages).flip(0), torch.randperm(pages)[:per_row]][:B])
    table = table.to(torch.int32)
    t = time.time()
    o = causal.decode(q, kp, vp, kv_len=kv_len.to(DEV), block_table=table.to(DEV))
    torch.cuda.synchronize()
    print(f"    paged decode: {time.time() - t:.1f} s (compile included)", flush=True)
    for b in range(B):
        L = int(kv_len[b])
        used = table[b, :-(-L // page)].to(DEV).long()
        k = kp[used].reshape(-1, Hkv, D)[:L].transpose(0, 1)
        v = vp[used].reshape(-1, Hkv, D)[:L].transpose(0, 1)
        report(f"paged o (b={b}, kv_len={L}, top page {int(used.max())})", rel(o[b], decode_reference(q[b], k, v)), TOL)
    del kp, vp
    torch.cuda.empty_cache()
    # contiguous cache [B, Hkv, Nmax, D] past 2**31 elements
    Bc, Nmax = 3, 2**31 // (Hkv * D) // 3 + 4096
    n = elements(Bc, Hkv, Nmax, D)
    print(f"      contiguous cache [{Bc}, {Hkv}, {Nmax}, {D}] bf16: {n:.3g} elements ({n / 2**31:.2f} x 2**31)",
          flush=True)
    kc = torch.randn(Bc, Hkv, Nmax, D, device=DEV, dtype=BF16)
    vc = torch.randn(Bc, Hkv, Nmax, D, device=DEV, dtype=BF16)
    kv_len = torch.tensor([Nmax, Nmax // 3, Nmax - 5], dtype=torch.int32)
    o = causal.decode(q[:Bc], kc, vc, kv_len=kv_len.to(DEV))
    for b in range(Bc):
        L = int(kv_len[b])
        ref = decode_reference(q[b], kc[b, :, :L], vc[b, :, :L])
        report(f"contiguous o (b={b}, kv_len={L}, offset of k[b] = {b * Hkv * Nmax * D:.3g})", rel(o[b], ref), TOL)
    del kc, vc
    torch.cuda.empty_cache()


def case_varlen(H=32, D=128, lens=(65536, 1000, 131072, 70000, 98304, 100000, 60000)):
    """A packed batch [1, H, total, D] past 2**31 elements: h * stride_h and the sequence starts
    times the row stride pass 2**31."""
    total = sum(lens)
    n = elements(H, total, D)
    print(f"[3/3] varlen causal forward + backward, {len(lens)} sequences, total {total} rows, H={H} D={D} bf16: "
          f"{n:.3g} elements ({n / 2**31:.2f} x 2**31)", flush=True)
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, H, total, D, device=DEV, dtype=BF16).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, total, D, device=DEV, dtype=BF16)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    t = time.time()
    o = causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    torch.cuda.synchronize()
    print(f"    forward + backward: {time.time() - t:.1f} s (compile included)", flush=True)
    starts = cu.tolist()
    for s, h in [(len(lens) - 1, H - 1), (len(lens) - 2, min(3, H - 1)), (0, H - 1)]:
        rows = slice(starts[s], starts[s + 1])
        qs, ks, vs = (x.detach()[0, h, rows].float()[None, None].requires_grad_() for x in (q, k, v))
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
            ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        rq, rk, rv = torch.autograd.grad(ref, (qs, ks, vs), do[0, h, rows].float()[None, None])
        report(f"o    (sequence {s}, h={h}, row start {starts[s]})", rel(o[0, h, rows], ref[0, 0]), TOL)
        for name, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            report(f"{name:4s} (sequence {s}, h={h})", rel(got[0, h, rows], want[0, 0]), TOL)
    del q, k, v, do, o, dq, dk, dv
    torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        print("big_check: no CUDA device")
        return 2
    print(f"attncc big check on {torch.cuda.get_device_name()}: tensors past 2**31 elements", flush=True)
    start = time.time()
    for case in (case_small_wide, case_forward_backward, case_decode, case_varlen):
        before, t = len(FAILURES), time.time()
        try:
            case()
        except Exception as e:  # a crash is a failure of its case; later cases still run when they can
            FAILURES.append(f"{case.__name__}: {type(e).__name__}: {e}")
            print(f"    CRASH {type(e).__name__}: {str(e)[:500]}", flush=True)
            torch.cuda.empty_cache()
        print(f"    {'PASS' if len(FAILURES) == before else 'FAIL'} ({time.time() - t:.0f} s)", flush=True)
    print(f"big check: {'PASS' if not FAILURES else 'FAIL'} in {time.time() - start:.0f} s"
          + ("" if not FAILURES else "\n  " + "\n  ".join(FAILURES)), flush=True)
    return 0 if not FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())
