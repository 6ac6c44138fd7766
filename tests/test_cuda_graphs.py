"""The GPU side of the host path (issue 18), on a CUDA GPU only.

CUDA graphs: the forward and forward+backward of static and data-dependent specs are captured in
a ``torch.cuda.CUDAGraph`` and replayed with the same results as eager calls, with new values in
the captured input tensors before each replay (data-dependent block lists are made on the device
inside the graph). The fast launch path (``ATTNCC_FAST_LAUNCH=1``) gives the plain launch's
results. Run it with the interpreter off:

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/test_cuda_graphs.py
"""
from __future__ import annotations

import os

import pytest
import torch

from cases import module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="needs a CUDA GPU and TRITON_INTERPRET=0"),
]

B, H, N, D = 2, 8, 1000, 64  # N not a multiple of the tiles: masked edges included


def doc_ids(seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.rand(B, n, generator=gen) < 1 / 150, 1).to(torch.int32).cuda()


# name -> (spec heads (q, kv) or None, inputs for a seed): their tensors are refilled in place per replay
CASES = {
    "causal": (None, lambda seed: {}),
    "softcap": (None, lambda seed: {}),
    "gqa": ((32, 8), lambda seed: {}),
    "bigbird": (None, lambda seed: {}),  # static block lists, made by the warm-up
    "document": (None, lambda seed: {"doc": doc_ids(seed)}),  # data-dependent: lists on the device
    "padding": (None, lambda seed: {"kv_len": torch.tensor([N - 17 * seed, N // 2 + seed], dtype=torch.int32).cuda()}),
}


def _tensors(name, seed):
    heads, inputs = CASES[name]
    hq, hkv = heads or (H, H)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, hq, N, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(B, hkv, N, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(B, hkv, N, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = torch.randn(B, hq, N, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    return q, k, v, g, inputs(seed)


def _step(mod, q, k, v, g, kw, backward):
    if not backward:
        with torch.no_grad():
            return [mod.attention(q, k, v, **kw)]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = mod.attention(q, k, v, **kw)
    return [o.detach(), *torch.autograd.grad(o, (q, k, v), g)]


def _captured(mod, q, k, v, g, kw, backward):
    """(graph, its outputs) of one step captured after two warm-up steps on a side stream (they compile,
    bind and make static lists)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(mod, q, k, v, g, kw, backward)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(mod, q, k, v, g, kw, backward)
    return graph, captured


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_replay_matches_eager(name, backward):
    mod = module(name)
    q, k, v, g, kw = _tensors(name, 0)
    graph, captured = _captured(mod, q, k, v, g, kw, backward)
    previous = None
    for seed in (1, 2, 3):
        fresh_q, fresh_k, fresh_v, fresh_g, fresh_kw = _tensors(name, seed)
        with torch.no_grad():
            for static, fresh in zip((q, k, v, g, *kw.values()), (fresh_q, fresh_k, fresh_v, fresh_g, *fresh_kw.values())):
                static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager = _step(mod, fresh_q, fresh_k, fresh_v, fresh_g, fresh_kw, backward)
        for got, want in zip(captured, eager):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if previous is not None:  # the replay computed anew (not last replay's output)
            assert not torch.equal(captured[0], previous)
        previous = captured[0].clone()


@pytest.mark.parametrize("method", ["", "split"], ids=["default-ws", "split"])
@pytest.mark.parametrize("name", ["causal", "gqa", "softcap"])
def test_gluon_graph_replay_matches_eager(monkeypatch, name, method):
    """The same through the Gluon forward and backward (ATTNCC_BACKEND=gluon; the default backward, ws,
    and split): host-made TMA descriptors and the ws kernel's zeroed fp32 dQ accumulator inside the
    graph. dQ of ws is summed by reduce-adds in no fixed order: equal to eager's within fp32 rounding,
    the rest bitwise."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    mod = module(name)
    q, k, v, g, kw = _tensors(name, 0)
    graph, captured = _captured(mod, q, k, v, g, kw, True)
    for seed in (1, 2):
        fresh = _tensors(name, seed)[:4]
        with torch.no_grad():
            for static, new in zip((q, k, v, g), fresh):
                static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        eager = _step(mod, *fresh, kw, True)
        for label, got, want in zip(("o", "dq", "dk", "dv"), captured, eager):
            if label == "dq" and method == "":
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=label)


def test_static_lists_are_not_made_inside_a_capture():
    """A first call of a static pattern's shape inside a capture says to warm up (its lists
    would be cached unfilled: captured kernels run only at replay)."""
    mod = module("bigbird")
    q = torch.randn(1, 2, 777, 64, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up|before capturing"):
        with torch.cuda.graph(graph):
            mod.attention(q, q, q)


def test_varlen_without_max_seqlen_refused_in_a_capture():
    mod = module("causal")
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    mod.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="max_seqlen_q and max_seqlen_k under CUDA graph capture"):
        with torch.cuda.graph(graph):
            mod.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_varlen_with_max_seqlen_replays():
    mod = module("causal")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200)
    mod.attention(q, q, q, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = mod.attention(q, q, q, **kw)
    q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen))
    cu.copy_(torch.tensor([0, 180, 300], dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(o, mod.attention(q, q, q, **kw), rtol=0, atol=0)


# --- ATTNCC_FAST_LAUNCH=1: Triton's compiled kernels called directly (attncc.runtime.launch.FastKernel)


def _misaligned(t):
    """A copy of ``t`` whose data starts 2 elements past a 16-byte boundary (the strides unchanged)."""
    base = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = base[2:2 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("name", ["causal", "document", "padding", "causal_dropout", "bigbird"])
def test_fast_launch_matches_the_plain_launch(name, monkeypatch):
    """Same results with and without the fast path, forward and backward, across calls whose
    tensors differ in alignment (Triton specializes on it: part of the fast path's key), and the
    fast path really skips JITFunction.run after the first launch of a key."""
    from attncc.runtime.launch import FastKernel

    mod = module(name)
    q, k, v, g, kw = _tensors(name if name in CASES else "causal", 0)
    kw = dict(kw, **({"seed": 7} if name == "causal_dropout" else {}))

    def run(q, k, v):
        return _step(mod, q.detach().clone(), k.detach().clone(), v.detach().clone(), g, kw, True)

    monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "0")
    plain = run(q, k, v)
    monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "1")
    kernels = [obj for obj in vars(mod).values() if isinstance(obj, FastKernel)]
    assert len(kernels) == 3  # forward, dQ (with the rows' delta), dK/dV
    runs = []
    for kernel in kernels:
        real = kernel.fn.run
        monkeypatch.setattr(kernel.fn, "run", lambda *a, _real=real, **kw_: runs.append(1) or _real(*a, **kw_))
    for attempt in range(3):
        runs.clear()
        fast = run(q, k, v)
        for got, want in zip(fast, plain):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if attempt:
            assert not runs, "the fast path went through JITFunction.run"
    for args in ((_misaligned(q), k, v), (q, _misaligned(k), _misaligned(v))):
        monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "0")
        want = _step(mod, *args, g, kw, True)
        monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "1")
        got = _step(mod, *args, g, kw, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # What the call signature does not fix, each after calls that compiled the usual case: dO with
    # a row stride of 72 (Triton: not a multiple of 16, unlike 64), and for dropout a seed past
    # 2**31 (an i64 argument) after a small one (i32)
    padded = torch.zeros(*g.shape[:-1], D + 8, device="cuda", dtype=g.dtype)[..., :D]
    padded.copy_(g)
    variants = [(q, k, v, padded, kw)]
    if name == "causal_dropout":
        variants += [(q, k, v, g, dict(kw, seed=2**40 + 7)), (q, k, v, g, dict(kw, seed=1))]
    for q_, k_, v_, g_, kw_ in variants:
        monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "0")
        want = _step(mod, q_.detach().clone(), k_.detach().clone(), v_.detach().clone(), g_, kw_, True)
        monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "1")
        got = _step(mod, q_.detach().clone(), k_.detach().clone(), v_.detach().clone(), g_, kw_, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
