"""Tensors past 2**31 elements on the GPU (issue 15; formerly bench/big_check.py): forward and
backward at the issue's size, decode over a page pool and a contiguous cache past 2**31 elements,
a packed (varlen) batch past 2**31 elements, and small calls at positions past 2**31 through the
paths issue 15 added. Before the fix these crashed with "CUDA error: an illegal memory access"
(int32 products of batch / head indices and strides). Each case compares a few (b, h) slices, the
last ones included, with torch's SDPA in float32 on those slices alone. About 2 minutes on an H200
(mostly Triton compiling), < 60 GB. tests/test_int64_offsets.py checks the index arithmetic on the
CPU; with ATTNCC_GPU_TESTS_ON_CPU=1 these run at tiny sizes (the code paths, not the sizes).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_big.py
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS + [pytest.mark.slow]
LSE_TOL = 5e-2


def _sdpa_slice(q, k, v, do):
    """float32 causal SDPA of one [N, D] slice and its gradients."""
    qs, ks, vs = (x.detach().float()[None, None].requires_grad_() for x in (q, k, v))
    backend = torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION if DEV == "cuda" else torch.nn.attention.SDPBackend.MATH
    with torch.nn.attention.sdpa_kernel([backend]):
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    return (ref[0, 0], *(g[0, 0] for g in torch.autograd.grad(ref, (qs, ks, vs), do.float()[None, None])))


def _sampled_lse(q, k, scale, rows):
    """float32 log-sum-exp of query rows ``rows`` of one head (causal, keys 0..i)."""
    s = (q[rows].float() @ k.float().T) * scale
    i = torch.as_tensor(rows, device=q.device)[:, None]
    s = torch.where(torch.arange(k.shape[0], device=q.device)[None, :] <= i, s, -math.inf)
    return torch.logsumexp(s, -1)


def _decode_reference(q, k, v):
    """float32 attention of q [Hq, Nq, D] over a cache k, v [Hkv, L, D], query t at position
    L - Nq + t seeing keys 0 .. L - Nq + t, per kv head (no copy of the cache per query head)."""
    Hq, Nq, D = q.shape
    Hkv, L, _ = k.shape
    group = Hq // Hkv
    allowed = torch.arange(L, device=q.device)[None, :] <= (L - Nq + torch.arange(Nq, device=q.device))[:, None]
    out = []
    for hk in range(Hkv):
        s = (q[hk * group:(hk + 1) * group].float() @ k[hk].float().T) / math.sqrt(D)
        out.append(torch.softmax(torch.where(allowed, s, -math.inf), -1) @ v[hk].float())
    return torch.cat(out)


# (spec, offset, keywords, backward too): offsets below 2**31 that cross it (int32 arguments, WIDE
# kernels) and past 2**32 (int64 arguments); the walks of issue 16 (chunks, two closed-form
# segments, exact block lists) too
WIDE = [("causal", 2**31 - 100, {}, True), ("rope_causal", 2**32 - 50, {}, True),
        ("causal_dropout", 2**31 - 100, {"seed": 5, "dropout_p": 0.2}, True),
        ("sliding_window", 2**32 - 50, {"window": 100}, False), ("padding", 2**31 - 100, None, False),
        ("chunked_local", 2**31 - 100, {"chunk": 64}, True),
        ("sink_window", 2**32 - 50, {"sinks": 4, "window": 100}, True),
        ("neighborhood_2d", 2**31 - 100, {"width": 24, "radius": 2}, True)]


@pytest.mark.parametrize("name, offset, kw, backward", WIDE, ids=[w[0] for w in WIDE])
def test_positions_past_2_31(name, offset, kw, backward):
    p, mod = pattern(name), module(name)
    n = size(300, 40)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, size(64, 16), generator=gen).to(DEV, LOW).requires_grad_(backward)
               for _ in range(3))
    args = dict(kw) if kw is not None else {"kv_len": torch.tensor([offset + n - 50, offset + n // 7], device=DEV)}
    ref_args = {a: x for a, x in args.items() if a not in ("seed", "dropout_p")}
    if "seed" in args:
        ref_args.update(keep_mask=mod.dropout_keep_mask(q, k, v, q_offset=offset, k_offset=offset, **args),
                        dropout_p=args["dropout_p"])
    o = mod.attention(q, k, v, q_offset=offset, k_offset=offset, **args)
    ref_in = [x.detach().double().requires_grad_(backward) for x in (q, k, v)]
    ref = attncc.reference(p, *ref_in, q_offset=offset, k_offset=offset, **ref_args)
    assert rel(o, ref) < TOL
    if backward:
        do = torch.randn_like(o)
        for label, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), do),
                               torch.autograd.grad(ref, ref_in, do.double())):
            assert rel(a, b) < TOL, f"d{label}"


def test_decode_int64_strided_indices():
    """decode with an int64, strided kv_len and a column-major int64 block table."""
    causal = module("causal")
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 8, 2, 64, generator=gen).to(DEV, LOW)
    kp, vp = (torch.randn(40, 16, 2, 64, generator=gen).to(DEV, LOW) for _ in range(2))
    table = torch.randperm(40, generator=gen)[:36].view(3, 12).to(DEV)
    kv_len = torch.tensor([[190, 0], [77, 0], [5, 0]], device=DEV)[:, 0]  # int64, stride 2
    o = causal.decode(q, kp, vp, kv_len=kv_len, block_table=table.t().contiguous().t())
    for b in range(3):
        L = int(kv_len[b])
        k = kp[table[b]].reshape(-1, 2, 64)[:L].transpose(0, 1)
        v = vp[table[b]].reshape(-1, 2, 64)[:L].transpose(0, 1)
        assert rel(o[b], _decode_reference(q[b], k, v)) < TOL, b


def test_forward_backward_past_2_31():
    """The issue's case: causal, B = 9, 32 heads, N = 65536, D = 128 (1.13 x 2**31 elements a tensor)."""
    causal = module("causal")
    B, H, N, D = size((9, 32, 65536, 128), (2, 3, 80, 16))
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen)
    o, lse = causal.attention(q, k, v, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    rows = sorted({0, 1, min(777, N - 1), N // 2, N - 2, N - 1})
    for b, h in [(B - 1, H - 1), (B - 1, 0), (B // 2, min(H // 2 + 1, H - 1)), (0, 0)]:
        ref, rq, rk, rv = _sdpa_slice(q[b, h], k[b, h], v[b, h], do[b, h])
        where = f"b={b} h={h}"
        assert rel(o[b, h], ref) < TOL, where
        lse_ref = _sampled_lse(q[b, h].detach(), k[b, h].detach(), 1 / math.sqrt(D), rows)
        assert float((lse.detach()[b, h, rows] - lse_ref).abs().max()) < LSE_TOL, where
        for label, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            assert rel(got[b, h], want) < TOL, f"{label} {where}"
    del q, k, v, do, o, lse, dq, dk, dv
    release()


def test_decode_past_2_31():
    """decode over a paged pool past 2**31 elements (rows read pages at its top) and over a
    contiguous cache past 2**31 elements."""
    causal = module("causal")
    B, Hq, Hkv, Nq, D = 4, size(32, 4), size(8, 2), 2, size(128, 16)
    page, pages = size((256, 8300), (16, 40))
    gen = torch.Generator(device=DEV).manual_seed(1)
    kp = torch.randn(pages, page, Hkv, D, device=DEV, dtype=LOW, generator=gen)
    vp = torch.randn(pages, page, Hkv, D, device=DEV, dtype=LOW, generator=gen)
    q = torch.randn(B, Hq, Nq, D, device=DEV, dtype=LOW, generator=gen)
    kv_len = torch.tensor(size([40000, 1234, 65536, 20000], [150, 17, 160, 90]), dtype=torch.int32)
    per_row = -(-int(kv_len.max()) // page)
    cpu = torch.Generator().manual_seed(1)
    # rows 0 and 2 from the top of the pool, rows 1 and 3 from anywhere
    table = torch.stack([torch.arange(pages - per_row, pages), torch.randperm(pages, generator=cpu)[:per_row],
                         torch.arange(pages - per_row, pages).flip(0), torch.randperm(pages, generator=cpu)[:per_row]])
    table = table.to(torch.int32)
    o = causal.decode(q, kp, vp, kv_len=kv_len.to(DEV), block_table=table.to(DEV))
    for b in range(B):
        L = int(kv_len[b])
        used = table[b, :-(-L // page)].to(DEV).long()
        k = kp[used].reshape(-1, Hkv, D)[:L].transpose(0, 1)
        v = vp[used].reshape(-1, Hkv, D)[:L].transpose(0, 1)
        assert rel(o[b], _decode_reference(q[b], k, v)) < TOL, f"paged b={b} kv_len={L}"
    del kp, vp
    release()
    Bc, Nmax = 3, size(2**31 // (Hkv * D) // 3 + 4096, 200)
    kc = torch.randn(Bc, Hkv, Nmax, D, device=DEV, dtype=LOW, generator=gen)
    vc = torch.randn(Bc, Hkv, Nmax, D, device=DEV, dtype=LOW, generator=gen)
    kv_len = torch.tensor([Nmax, Nmax // 3, Nmax - 5], dtype=torch.int32)
    o = causal.decode(q[:Bc], kc, vc, kv_len=kv_len.to(DEV))
    for b in range(Bc):
        L = int(kv_len[b])
        assert rel(o[b], _decode_reference(q[b], kc[b, :, :L], vc[b, :, :L])) < TOL, f"contiguous b={b} kv_len={L}"
    del kc, vc
    release()


def test_varlen_past_2_31():
    """A packed batch [1, H, total, D] past 2**31 elements: h * stride_h and the sequence starts
    times the row stride pass 2**31."""
    causal = module("causal")
    H, D = size((32, 128), (3, 16))
    lens = size((65536, 1000, 131072, 70000, 98304, 100000, 60000), (40, 1, 70, 0, 33))
    total = sum(lens)
    gen = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = (torch.randn(1, H, total, D, device=DEV, dtype=LOW, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(1, H, total, D, device=DEV, dtype=LOW, generator=gen)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    o = causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    starts = cu.tolist()
    for s, h in [(len(lens) - 1, H - 1), (len(lens) - 2, min(3, H - 1)), (0, H - 1)]:
        rows = slice(starts[s], starts[s + 1])
        if starts[s] == starts[s + 1]:
            continue
        ref, rq, rk, rv = _sdpa_slice(q[0, h, rows], k[0, h, rows], v[0, h, rows], do[0, h, rows])
        assert rel(o[0, h, rows], ref) < TOL, f"sequence {s} h={h}"
        for label, got, want in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            assert rel(got[0, h, rows], want) < TOL, f"{label} sequence {s} h={h}"
    del q, k, v, do, o, dq, dk, dv
    release()


def test_linear_past_2_31():
    """Linear attention (linear_elu) forward and backward on tensors past 2**31 elements (B = 4, 16
    heads, N = 2**19 + 128, D = 64): each sampled (b, h) slice, the last one included, equals the same
    module's call on that slice alone (a tensor 64x smaller, whose indices fit int32 anyway)."""
    lin = module("linear_elu")
    B, H, N, D = size((4, 16, 2**19 + 128, 64), (2, 3, 80, 16))
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen)
    o = lin.attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    for b, h in [(B - 1, H - 1), (B - 1, 0), (B // 2, H // 2), (0, 0)]:
        leaves = [x[b:b + 1, h:h + 1].detach().clone().requires_grad_() for x in (q, k, v)]
        o1 = lin.attention(*leaves)
        g1 = torch.autograd.grad(o1, leaves, do[b:b + 1, h:h + 1])
        where = f"b={b} h={h}"
        assert rel(o[b, h], o1[0, 0]) < 1e-3, where
        for label, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), g1):
            assert rel(got[b, h], want[0, 0]) < 1e-3, f"{label} {where}"
    del q, k, v, do, o, dq, dk, dv
    release()
