"""Probe 20 (training-loop semantics of the autograd wiring): the generated modules' ``attention``
(softmax and linear) and ``attncc.compile``'s, called as a PyTorch training loop calls SDPA or
FlexAttention, against attncc.reference (float64) and against what torch's own ops do.

Probed clean (seeded random calls at tiny odd sizes, interpreter):
- tensors changed in place after the forward and before the backward (q, k, v, a learned table,
  o itself, a view of o, the LSE, the storage under a q that needs no gradient) raise autograd's
  "modified by an inplace operation" on causal, rope_causal, t5_bias, alibi_learned, softcap, mqa
  (41 cases);
- dO and dLSE contiguous, BNHD-transposed, stride-0 (expanded from [1, 1, 1, D] and from a scalar,
  what ``o.sum()`` gives), at a storage offset, stride 2 in the last dim, flipped; on o only, the LSE
  only, or both; float32 and bfloat16 operands, over causal, t5_bias, alibi_learned, softcap,
  rope_causal, mqa: 252 cases within 1e-4 (bfloat16: 3e-2); dO in float64 / bfloat16 for float32 o and
  in float32 for bfloat16 / float16 o (autograd casts it; gradients in the operands' dtype);
- backward twice with retain_graph=True (exactly twice the gradients), accumulation into an
  existing .grad, torch.autograd.grad of each leaf alone, every subset of q, k, v requiring grad,
  none (no graph), torch.no_grad, torch.inference_mode, torch.utils.checkpoint reentrant and not:
  gradients bitwise equal to the plain call's (5 modules);
- torch.func transforms and float64 (so gradcheck) stay refused with their clear errors (pinned in
  tests/test_probe_grads.py and tests/test_probe_api19.py).

Found and fixed:
- create_graph=True: the gradients were passed through _NoDoubleBackward anchored on q, k, v and dO
  only, so a second-order path through anything else never met its error: a gradient penalty on a
  learned table's gradient with q, k, v frozen (``dt = grad(o.sum(), t, create_graph=True)``, then
  ``(o.sum() + dt.pow(2).sum()).backward()``) left the penalty out without a word (t.grad's norm 5.91,
  the true one 10.10), and a second derivative through the LSE's or a linear attention state's
  cotangent (``(lse * w).sum()``, ``(S * w).sum()``) came back None with allow_unused=True. The
  anchors are now every differentiable input and every cotangent (runtime.autograd.no_double_backward,
  its callers in autograd, compiled, linear and distributed).
- Forward-mode AD: a tangent (torch.autograd.forward_ad.make_dual) on q, k, v, a learned table, a decode
  q or a linear attention's q / initial state needs no gradient, so the call ran its kernels on the
  primal values and returned o without a tangent (``unpack_dual(o).tangent`` None, read as zero;
  the reference's tangent has norm 7.2), silently: torch's ops without a forward derivative raise.
  bind / bind_decode / linear.check_state refuse a tangent now (runtime.call.refuse_tangents), at the
  cost of one global read per call outside a dual level.
- ``torch.autograd.grad(o, q, cotangents, is_grads_batched=True)`` (the backward vmapped over a batch of
  cotangents, legacy BatchedTensors without storage) failed inside the kernels' launch with torch's
  "Cannot access data pointer of Tensor that doesn't have storage" (linear attention: "Cannot access
  storage of BatchedTensorImpl"), naming neither attncc nor the cause: now a NotImplementedError naming
  the function's backward and what to do (runtime.call.refuse_transformed_backward; also context
  parallelism's backward).
- Memory under activation checkpointing and offloading: AttentionFunction (ctx.call) and
  LinearAttentionFunction (ctx.lc) kept the validated call with its q, k, v (and the linear initial
  state) beside save_for_backward, where saved-tensor hooks never see them: under non-reentrant
  torch.utils.checkpoint and under offloading hooks a block's q, k, v stayed alive from the forward to
  the backward (freed around SDPA), so checkpointing an attention block saved none of their memory.
  ctx keeps the call without them now (and their layouts, so that the signature memo still serves the
  saved ones); gradients unchanged (tests/test_saved_hooks.py, the checkpoint tests).
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module, pattern, rel_err


def _qkv(shapes, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(grad) for s in shapes]


# ---------------------------------------------------------------------------------------------
# create_graph=True: every second-order path meets the error
# ---------------------------------------------------------------------------------------------


def test_gradient_penalty_on_a_learned_table_raises():
    """q, k, v frozen, a learned table trained with a penalty on its own gradient: ``o.sum()``'s dO needs no
    gradient, so the table's gradient was anchored on nothing and came back as a constant; the
    penalty's gradient (the second-order term) was dropped silently."""
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    (t,) = _qkv([(2, 32)], seed=1)
    t = (0.3 * t).requires_grad_()
    o = module("t5_bias").attention(q, k, v, rel_bias=t)
    (dt,) = torch.autograd.grad(o.sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (o.sum() + dt.pow(2).sum()).backward()


def test_second_derivative_through_the_lse_cotangent_raises():
    """dq is linear in the LSE's cotangent w: d(dq)/dw is not zero, and was given as None (allow_unused)."""
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    q.requires_grad_()
    w = torch.randn(1, 2, 13, requires_grad=True)
    o, lse = module("causal").attention(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad((lse * w).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.pow(2).sum(), w, allow_unused=True)


def test_second_derivative_through_a_linear_state_cotangent_raises():
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    q.requires_grad_()
    w = torch.randn(1, 2, 16, 16, requires_grad=True)
    o, (s, z) = module("linear_elu").attention(q, k, v, return_state=True)
    (dq,) = torch.autograd.grad((s * w).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.pow(2).sum(), w, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# forward-mode AD (torch.autograd.forward_ad): refused, never a dropped tangent
# ---------------------------------------------------------------------------------------------


def _dual_calls():
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    (t,) = _qkv([(2, 32)], seed=1)
    tangent = torch.ones(1, 2, 9, 16)
    dual = lambda x, d=None: fwAD.make_dual(x, torch.ones_like(x) if d is None else d)  # noqa: E731
    state = (torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16))
    return {
        "q": lambda: module("causal").attention(dual(q, tangent), k, v),
        "k": lambda: module("causal").attention(q, dual(k), v),
        "v (return_lse)": lambda: module("causal").attention(q, k, dual(v), return_lse=True),
        "learned table": lambda: module("t5_bias").attention(q, k, v, rel_bias=dual(t)),
        "decode q": lambda: module("causal").decode(dual(q[:, :, :1]), k, v, kv_len=[9]),
        "linear q": lambda: module("linear_elu").attention(dual(q), k, v),
        "linear initial_state": lambda: module("linear_elu").attention(q, k, v, initial_state=(dual(state[0]), state[1])),
        "linear step": lambda: module("linear_elu").step(dual(q[:, :, 0]), k[:, :, 0], v[:, :, 0]),
    }


import torch.autograd.forward_ad as fwAD  # noqa: E402


@pytest.mark.parametrize("case", list(_dual_calls()))
def test_forward_mode_ad_tangents_are_refused(case):
    """A dual tensor (torch.autograd.forward_ad.make_dual) needs no gradient, so the call ran its kernels
    on the primal values outside autograd and returned o without a tangent: unpack_dual(o).tangent was
    None (read as zero; the reference's JVP of o for q's tangent of ones has norm 7.2), silently. The
    kernels have no JVP: the call is refused, naming the function."""
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _dual_calls()[case]()


def test_plain_calls_inside_a_dual_level_still_run():
    """Only tensors that carry a tangent are refused: a call of plain tensors inside a dual level (a forward-AD
    computation elsewhere in the program) runs as outside it."""
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    want = module("causal").attention(q, k, v)
    with fwAD.dual_level():
        fwAD.make_dual(torch.zeros(3), torch.ones(3))
        assert torch.equal(module("causal").attention(q, k, v), want)


# ---------------------------------------------------------------------------------------------
# torch.autograd.grad(..., is_grads_batched=True): the backward under vmap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["causal", "linear_elu"])
def test_batched_cotangents_are_refused_clearly(name):
    """is_grads_batched=True runs the backward under vmap: the kernels got BatchedTensors and torch raised
    "Cannot access data pointer of Tensor that doesn't have storage", naming neither attncc nor the cause."""
    q, k, v = _qkv([(1, 2, 11, 16)] * 3, grad=True)
    o = module(name).attention(q, k, v)
    with pytest.raises(NotImplementedError, match=rf"{name}\.attention's backward: .*is_grads_batched"):
        torch.autograd.grad(o, q, torch.randn(3, *o.shape), is_grads_batched=True)


# ---------------------------------------------------------------------------------------------
# activation checkpointing and offloading free q, k, v as they do around SDPA
# ---------------------------------------------------------------------------------------------


def _alive_after_forward(attn, how):
    """Which of q, k, v (intermediates of a block: projections of x) are still alive once the forward has
    returned, under non-reentrant torch.utils.checkpoint or saved-tensor hooks that offload (copy)."""
    import gc
    import weakref

    x = torch.randn(1, 2, 16, 16, requires_grad=True)
    refs = {}

    def block(x):
        q, k, v = x * 1.5, x + 1, x - 1
        refs.update(q=weakref.ref(q), k=weakref.ref(k), v=weakref.ref(v))
        return attn(q, k, v)

    if how == "checkpoint":
        o = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            o = block(x)
    gc.collect()
    alive = sorted(n for n, r in refs.items() if r() is not None)
    o.sum().backward()  # and the backward still runs
    assert x.grad is not None and x.grad.isfinite().all()
    return alive


@pytest.mark.parametrize("how", ["checkpoint", "offload"])
@pytest.mark.parametrize("name", ["t5_bias", "linear_elu", "sdpa"])
def test_checkpointing_and_offloading_free_q_k_v(name, how):
    """The autograd Functions kept the validated call (ctx.call, ctx.lc) with its q, k, v: saved-tensor
    hooks never saw those references, so under non-reentrant checkpointing (which exists to drop a block's
    activations until the backward recomputes them) and CPU offloading the block's q, k and v stayed
    alive from the forward to the backward, as they do not around SDPA."""
    if name == "sdpa":
        attn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif name == "t5_bias":
        attn = lambda q, k, v: module(name).attention(q, k, v, rel_bias=torch.full((2, 32), 0.1))  # noqa: E731
    else:
        attn = module(name).attention
    assert _alive_after_forward(attn, how) == []


# ---------------------------------------------------------------------------------------------
# clean, kept as regressions
# ---------------------------------------------------------------------------------------------


def _ref_grads(name, tensors, kw, cotangents, keep=None, dropout_p=None, q_offset=0):
    """attncc.reference's float64 gradients of ``sum(out * cotangent)`` over (o, lse), wrt ``tensors``
    (q, k, v, then the float inputs that require grad; leaves or a shared base) and nothing else."""
    extra = {} if keep is None else dict(keep_mask=keep, dropout_p=dropout_p)
    o, lse = attncc.reference(pattern(name), *tensors[:3], return_lse=True, q_offset=q_offset, **kw, **extra)
    loss = sum((t * c.double()).sum() for t, c in zip((o, torch.where(lse.isfinite(), lse, 0)), cotangents)
               if c is not None)
    return loss


def _doubles(tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("which", ["q", "k", "v", "o", "o_view", "lse", "table", "base_of_a_frozen_q"])
def test_changed_in_place_after_the_forward_raises(which):
    q, k, v = _qkv([(1, 2, 19, 16)] * 3, grad=True)
    base = q.detach().clone()
    if which == "base_of_a_frozen_q":
        q = base[:]
    t = torch.full((2, 32), 0.1, requires_grad=True)
    o, lse = module("t5_bias").attention(q, k, v, rel_bias=t, return_lse=True)
    with torch.no_grad():
        {"q": q, "k": k, "v": v, "o": o, "o_view": o[0, 0, 3], "lse": lse, "table": t,
         "base_of_a_frozen_q": base}[which].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (o.sum() + lse.sum()).backward()


def _cotangent(kind, shape, gen):
    full = torch.randn(*shape, generator=gen)
    if kind == "transposed":  # BNHD / [B, N, H] memory order
        return full.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "expanded":  # o.sum()'s: stride 0 everywhere
        return torch.ones(()).expand(shape)
    if kind == "offset":
        return torch.randn(full.numel() + 3, generator=gen)[3:].view(shape)
    if kind == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    return full.flip(2)


@pytest.mark.parametrize("seed", range(6))
def test_cotangents_of_any_layout_on_o_the_lse_or_both(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    name = ["causal", "t5_bias", "alibi_learned", "softcap", "rope_causal", "mqa"][seed]
    kind = ["transposed", "expanded", "offset", "strided", "flipped", "expanded"][seed]
    through = ["o", "lse", "both"][seed % 3]
    p = pattern(name)
    Hq, Hkv = (p.heads_q or 2), (p.heads_kv or (1 if name == "mqa" else 2))
    N = int(torch.randint(5, 40, (1,), generator=gen))
    q = torch.randn(2, Hq, N, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, Hkv, N, 16, generator=gen, requires_grad=True) for _ in range(2))
    kw = {d.name: (0.3 * torch.randn(*[{"b": 2, "h": Hq, "n": N}.get(x, x) for x in d.dims], generator=gen))
          .requires_grad_() for d in p.inputs}
    o, lse = module(name).attention(q, k, v, return_lse=True, **kw)
    do = _cotangent(kind, o.shape, gen) if through != "lse" else None
    dlse = _cotangent(kind, lse.shape, gen) if through != "o" else None
    leaves = [q, k, v, *kw.values()]
    got = torch.autograd.grad([t for t, c in ((o, do), (lse, dlse)) if c is not None], leaves,
                              [c for c in (do, dlse) if c is not None])
    ref = _doubles(leaves)
    want = torch.autograd.grad(_ref_grads(name, ref, dict(zip(kw, ref[3:])), (do, dlse)), ref, allow_unused=True)
    for g, w in zip(got, want):
        assert rel_err(g, torch.zeros_like(g) if w is None else w) < 1e-4


@pytest.mark.parametrize("name", ["t5_bias", "rope_causal"])
def test_retain_graph_accumulation_subsets_and_checkpoint_equal_the_plain_call(name):
    q, k, v = _qkv([(2, 2, 23, 16)] * 3, grad=True)
    tables = [torch.full((2, 32), 0.1).requires_grad_()] if name == "t5_bias" else []
    leaves = [q, k, v, *tables]

    def attn(q, k, v, *tables):
        return module(name).attention(q, k, v, return_lse=True, **dict(zip(["rel_bias"], tables)))

    def loss(run=attn):
        o, lse = run(q, k, v, *tables)
        return (o * o).sum() + lse.sum()

    base = torch.autograd.grad(loss(), leaves)
    graph = loss()
    graph.backward(retain_graph=True)
    graph.backward()
    assert all(torch.equal(t.grad, 2 * b) for t, b in zip(leaves, base))
    for t in leaves:
        t.grad = torch.ones_like(t)
    loss().backward()
    assert all(torch.equal(t.grad, b + 1) for t, b in zip(leaves, base))
    for i, t in enumerate(leaves):
        assert torch.equal(torch.autograd.grad(loss(), t)[0], base[i])
    for reentrant in (True, False):
        for t in leaves:
            t.grad = None
        loss(lambda *a: torch.utils.checkpoint.checkpoint(attn, *a, use_reentrant=reentrant)).backward()
        assert all(torch.equal(t.grad, b) for t, b in zip(leaves, base))


@pytest.mark.parametrize("alias", ["q_is_k", "k_is_v", "q_k_v_one", "packed_qkv", "overlapping_rows"])
def test_aliased_operands_sum_their_gradients(alias):
    gen = torch.Generator().manual_seed(7)
    B, H, N, D = 2, 2, 17, 16

    def build(b):
        if alias == "packed_qkv":  # [B, N, 3, H, D], as a fused projection gives
            x = b[:B * N * 3 * H * D].view(B, N, 3, H, D)
            return x[:, :, 0].transpose(1, 2), x[:, :, 1].transpose(1, 2), x[:, :, 2].transpose(1, 2)
        if alias == "overlapping_rows":  # rows 4 elements apart: each element read by up to 4 rows
            return (b.as_strided((B, H, N, D), (H * N * 4, N * 4, 4, 1), o) for o in (1, 3, 2))
        x = b[:B * H * N * D].view(B, H, N, D)
        y = b[B * H * N * D:2 * B * H * N * D].view(B, H, N, D)
        return {"q_is_k": (x, x, y), "k_is_v": (y, x, x), "q_k_v_one": (x, x, x)}[alias]

    base = torch.randn(3 * B * H * N * D + 64, generator=gen, requires_grad=True)
    o, lse = module("causal").attention(*build(base), return_lse=True)
    do, dlse = torch.randn(o.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    (got,) = torch.autograd.grad([o, lse], base, [do, dlse])
    ref = base.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_ref_grads("causal", list(build(ref)), {}, (do, dlse)), ref)
    assert rel_err(got, want) < 1e-4


def test_dropout_backward_draws_the_forwards_mask_under_checkpoint_and_retain_graph():
    """A seed drawn from torch's generator (no seed=): checkpointing restores the generator, so the
    recomputed forward draws the same seed; the gradients equal the reference's with the mask that
    dropout_keep_mask gives for that seed, and a second backward of the graph equals the first."""
    m = module("causal_dropout")
    q, k, v = _qkv([(1, 2, 20, 16)] * 3, grad=True)
    do = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the call draws
    keep = m.dropout_keep_mask(q, k, v, seed=seed, dropout_p=0.4)
    ref = _doubles([q, k, v])
    want = torch.autograd.grad(_ref_grads("causal_dropout", ref, {}, (do, None), keep=keep, dropout_p=0.4), ref)
    for reentrant in (True, False):
        torch.manual_seed(11)
        o = torch.utils.checkpoint.checkpoint(lambda *a: m.attention(*a, dropout_p=0.4), q, k, v,
                                              use_reentrant=reentrant)
        torch.randn(100)  # the generator moves on before the backward
        for t in (q, k, v):
            t.grad = None
        o.backward(do, retain_graph=not reentrant)
        assert all(rel_err(t.grad, w) < 1e-4 for t, w in zip((q, k, v), want))
        if not reentrant:
            again = torch.autograd.grad(o, (q, k, v), do)
            assert all(torch.equal(a, t.grad) for a, t in zip(again, (q, k, v)))
    torch.manual_seed(11)
    first = m.attention(q, k, v)
    assert not torch.equal(first, m.attention(q, k, v))  # a new seed per call, as documented


def test_compiled_in_process_module_trains_like_the_shipped_ones():
    """attncc.compile's module (the same runtime): an in-place change of its learned table raises, a
    gradient penalty on the table's gradient raises, the table's gradient matches the reference."""
    spec = ('[inputs]\nslope = { dims = ["h"], dtype = "float32", grad = true }\n'
            '[mask]\nwhere = "j <= i"\n[score]\nbias = "-slope[h] * (i - j)"\n')
    m = attncc.compile(spec)
    q, k, v = _qkv([(1, 2, 15, 16)] * 3)
    slope = torch.tensor([0.1, 0.3], requires_grad=True)
    o = m.attention(q, k, v, slope=slope)
    (got,) = torch.autograd.grad(o.sum(), slope, retain_graph=True)
    ref = slope.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(attncc.reference(attncc.parse_spec(spec), *_doubles([q, k, v]), slope=ref).sum(), ref)
    assert rel_err(got, want) < 1e-4
    (d,) = torch.autograd.grad(o.sum(), slope, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (o.sum() + d.pow(2).sum()).backward()
    o = m.attention(q, k, v, slope=slope)
    with torch.no_grad():
        slope.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()
