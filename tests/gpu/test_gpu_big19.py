"""Probe 19 on the GPU (tests/test_probe_big19.py checks the same on the CPU by recording grids):
calls with B x H past CUDA's 65535 cap on grid axes 1 and 2, which failed with "Triton Error [CUDA]:
invalid argument" before the grids became (blocks, H, B); and linear attention on a [B, N, H, D]
view whose row offsets passed 2**31 in the state scan's int32 arithmetic. Each test < 30 GB, < 60 s
(besides compiling); with ATTNCC_GPU_TESTS_ON_CPU=1 they run at tiny sizes (the code paths only).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_big19.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS + [pytest.mark.slow]


def _ref(name, q, k, v, **kw):
    ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    return ins, attncc.reference(pattern(name), *ins, **kw)


def test_batch_times_heads_past_65535():
    """causal forward and backward at B = 256, H = 257 (65792 (b, h) programs), N = 64, D = 64;
    a few (b, h) slices, the last included, against the reference on those slices."""
    causal = module("causal")
    B, H, N, D = size((256, 257, 64, 64), (2, 3, 20, 16))
    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen).requires_grad_() for _ in range(3))
    o = causal.attention(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for b, h in [(B - 1, H - 1), (B // 2, H // 3), (0, 0)]:
        sl = [x[b:b + 1, h:h + 1] for x in (q, k, v)]
        ins, ref = _ref("causal", *sl)
        assert rel(o[b:b + 1, h:h + 1], ref) < TOL, (b, h)
        want = torch.autograd.grad(ref, ins, do[b:b + 1, h:h + 1].double())
        for label, g, w in zip("qkv", grads, want):
            assert rel(g[b:b + 1, h:h + 1], w) < TOL, (label, b, h)
    release()


def test_packed_batch_of_4100_sequences_times_16_heads():
    """varlen: 4100 sequences x 16 heads = 65600 (sequence, head) pairs, forward and backward."""
    causal = module("causal")
    S, H, D = size((4100, 16, 64), (5, 2, 16))
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, size(40, 9), (S,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    total = int(cu[-1])
    q, k, v = (torch.randn(1, H, total, D, generator=gen).to(DEV, LOW).requires_grad_() for _ in range(3))
    cu_d = cu.to(DEV)
    o = causal.attention(q, k, v, cu_seqlens_q=cu_d, cu_seqlens_k=cu_d, max_seqlen_q=int(lens.max()),
                         max_seqlen_k=int(lens.max()))
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for s in (S - 1, S // 2, 0):
        r = slice(int(cu[s]), int(cu[s + 1]))
        sl = [x[:, :, r] for x in (q, k, v)]
        ins, ref = _ref("causal", *sl)
        assert rel(o[:, :, r], ref) < TOL, s
        want = torch.autograd.grad(ref, ins, do[:, :, r].double())
        for label, g, w in zip("qkv", grads, want):
            assert rel(g[:, :, r], w) < TOL, (label, s)
    release()


def test_decode_batch_times_kv_heads_past_65535():
    """decode of 2100 rows x 32 kv heads (67200 programs), contiguous cache of 256 positions."""
    causal = module("causal")
    B, Hkv, L, D = size((2100, 32, 256, 64), (3, 2, 40, 16))
    gen = torch.Generator(device=DEV).manual_seed(2)
    q = torch.randn(B, Hkv, 1, D, device=DEV, dtype=LOW, generator=gen)
    kc, vc = (torch.randn(B, Hkv, L, D, device=DEV, dtype=LOW, generator=gen) for _ in range(2))
    kv_len = torch.randint(1, L + 1, (B,), device=DEV, generator=gen)
    o = causal.decode(q, kc, vc, kv_len=kv_len)
    for b in (B - 1, B // 2, 0):
        n = int(kv_len[b])
        _, ref = _ref("causal", q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], q_offset=n - 1)
        assert rel(o[b:b + 1], ref) < TOL, b
    release()


def test_linear_batch_times_heads_past_65535():
    lin = module("linear_elu")
    B, H, N, D = size((256, 257, 64, 32), (2, 3, 20, 16))
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=LOW, generator=gen).requires_grad_() for _ in range(3))
    o = lin.attention(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    for b, h in [(B - 1, H - 1), (0, 0)]:
        leaves = [x[b:b + 1, h:h + 1].detach().clone().requires_grad_() for x in (q, k, v)]
        o1 = lin.attention(*leaves)
        g1 = torch.autograd.grad(o1, leaves, do[b:b + 1, h:h + 1])
        assert rel(o[b:b + 1, h:h + 1], o1) < 1e-3, (b, h)
        for label, g, w in zip("qkv", grads, g1):
            assert rel(g[b:b + 1, h:h + 1], w) < 1e-3, (label, b, h)
    release()


def test_linear_on_a_bnhd_view_past_2_31():
    """linear_elu forward on [1, N, 64, 64] transposed views (row stride 4096) with N = 2**19 + 64:
    the scan's row offsets pass 2**31 (4.3 GB a tensor in bf16; with o and the causal scan's per-chunk
    states (~8.6 GB in float32 at 64-row chunks) ~26 GB in all). The last head, and
    the first, equal the same call on that head alone (contiguous, indices far below 2**31)."""
    lin = module("linear_elu")
    N, H, D = size((2**19 + 64, 64, 64), (70, 3, 16))
    gen = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = (torch.randn(1, N, H, D, device=DEV, dtype=LOW, generator=gen).transpose(1, 2) for _ in range(3))
    o = lin.attention(q, k, v)
    for h in (H - 1, 0):
        o1 = lin.attention(*(x[:, h:h + 1].contiguous() for x in (q, k, v)))
        assert rel(o[:, h:h + 1], o1) < 1e-3, h
    del q, k, v, o
    release()
