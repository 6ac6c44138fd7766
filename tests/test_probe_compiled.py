"""Probe 12: generated modules as users call them again and again, under torch.compile (inductor, the
default backend, included), with views of packed tensors; the defects found, each with its test."""
from __future__ import annotations

import random

import pytest
import torch

from attncc.runtime import compiled
from attncc.runtime.call import bind
from cases import inputs_for, module, pattern, rel_err


def _op_args(call):
    """attncc::attention_forward's arguments for a bound call (as compiled.attention passes them)."""
    ints = [x for x in call.params.values() if type(x) is int]
    floats = [call.scale, call.dropout_p] + [x for x in call.params.values() if type(x) is not int]
    options = repr(tuple((name, type(x) is int) for name, x in call.params.items()))
    return (call.q, call.k, call.v, [call.inputs[d.name] for d in call.spec.inputs], call.cu_seqlens_q,
            call.cu_seqlens_k, compiled._key(call.spec), options, ints, floats, call.B, call.Nq, call.Nk,
            call.q_offset, call.k_offset, call.n_q, call.n_k, call.seed)


def _operand(shape, how, gen):
    """A [B, H, N, D] tensor in one of the layouts models hand over: its own, a BNHD view (HF's
    q_proj(x).view(B, N, H, D).transpose(1, 2)), a slice of a packed qkv, heads expanded (GQA by
    expand), or empty."""
    B, H, N, D = shape
    if N == 0:  # (opcheck cannot make fakes of empty views with a storage offset)
        return torch.randn(shape, generator=gen)
    if how == "bnhd":
        return torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    if how == "packed":
        return torch.randn(B, N, 3, H, D, generator=gen)[:, :, 1].transpose(1, 2)
    if how == "heads0":
        return torch.randn(B, 1, N, D, generator=gen).expand(shape)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("seed", range(2))
def test_fakes_of_the_custom_ops_match_what_they_return(seed):
    """The custom ops' fakes must give the shapes, dtypes and strides the ops return: inductor lays out
    the compiled graph by them. The backward's fake gave dq, dk, dv (and a learned table's gradient)
    the strides of q, k, v (empty_like) while the op returned them contiguous, so torch.compile of a
    training step over BNHD views or a packed qkv (how Hugging Face models hand q, k, v over) failed
    in the backward with inductor's assert_size_stride. torch.library.opcheck compares them."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(4):
        name = rnd.choice(["causal", "t5_bias", "document", "sliding_window"])
        p = pattern(name)
        Nq = rnd.choice([0, 5, 17])
        Nk = Nq if name != "cross_causal" else rnd.choice([3, 17])
        D, Dv = rnd.choice([(16, 16), (18, 20)])
        layouts = [rnd.choice(["dense", "bnhd", "packed", "heads0"]) for _ in range(3)]
        q = _operand((1, 2, Nq, D), layouts[0], gen)
        k = _operand((1, 2, Nk, D), layouts[1], gen)
        v = _operand((1, 2, Nk, Dv), layouts[2], gen)
        kw = inputs_for(p, 1, 2, max(Nq, Nk, 1), gen)
        if name == "t5_bias":  # a table handed over transposed
            kw["rel_bias"] = torch.randn(32, 2, generator=gen).t()
        with torch.no_grad():
            call = bind(module(name).SPEC, q, k, v, kwargs=dict(kw))
            args = _op_args(call)
            o, lse = torch.ops.attncc.attention_forward.default(*args)
            do = torch.randn(o.shape, generator=gen)
            torch.library.opcheck(torch.ops.attncc.attention_forward.default, args, test_utils="test_faketensor")
            torch.library.opcheck(torch.ops.attncc.attention_backward.default,
                                  args[:6] + (o, lse, do, None) + args[6:] + (True,), test_utils="test_faketensor")


def test_inductor_trains_through_a_packed_qkv():
    """torch.compile with its default backend (inductor) of a step over q, k, v sliced from one packed
    [B, N, 3, H, D] tensor: the gradient equals the eager one (it raised in the backward)."""
    import torch._inductor.config as inductor_config

    causal = module("causal")
    gen = torch.Generator().manual_seed(12)
    qkv0 = torch.randn(2, 21, 3, 2, 16, generator=gen)
    w = torch.randn(2, 21, 2, 16, generator=gen)

    def step(qkv):
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return (causal.attention(q, k, v).transpose(1, 2) * w).sum()

    qkv = qkv0.clone().requires_grad_()
    (eager,) = torch.autograd.grad(step(qkv), qkv)
    torch._dynamo.reset()
    # (no FX graph cache: a graph compiled before a change of the ops' fakes would be reused)
    with inductor_config.patch(fx_graph_cache=False):
        fn = torch.compile(step, fullgraph=True)
        qkv = qkv0.clone().requires_grad_()
        (got,) = torch.autograd.grad(fn(qkv), qkv)
    assert eager.abs().max() > 0 and rel_err(got, eager) < 1e-6


def test_entry_points_without_a_custom_op_run_eagerly_when_traced():
    """``decode`` and linear attention's ``attention`` and ``step`` have no custom op: torch.compile traced
    into their host code and Triton launches and failed, fullgraph or not (a guard on kv_len's values,
    dynamo inside Triton's launcher), so a compiled generation step (Hugging Face's decode calls among
    them) could not run. Traced, they now run eagerly (a graph break): the results of eager calls,
    gradients included; under fullgraph=True dynamo's error names the function."""
    causal, lin = module("causal"), module("linear_elu")
    gen = torch.Generator().manual_seed(3)
    q1 = torch.randn(2, 4, 1, 16, generator=gen)
    k_cache, v_cache = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    cases = [
        (lambda q1, kc, vc: causal.decode(q1, kc, vc, kv_len=torch.tensor([5, 9])) * 2, (q1, k_cache, v_cache), False),
        (lambda q, k, v: lin.attention(q, k, v, return_state=True)[1][0] + 1, (q, k, v), False),
        (lambda q, k, v: lin.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])[0] * 3, (q, k, v), False),
        (lambda q, k, v: lin.attention(q, k, v) * 2, (q, k, v), True),
    ]
    for fn, args, grads in cases:
        eager_args = [a.clone().requires_grad_(grads) for a in args]
        want = fn(*eager_args)
        torch._dynamo.reset()
        got_args = [a.clone().requires_grad_(grads) for a in args]
        got = torch.compile(fn, backend="aot_eager")(*got_args)
        assert torch.allclose(got, want, atol=1e-6)
        if grads:
            g = torch.randn(want.shape, generator=gen)
            for a, b in zip(torch.autograd.grad(got, got_args, g), torch.autograd.grad(want, eager_args, g)):
                assert b.abs().max() > 0 and torch.allclose(a, b, atol=1e-6)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="decode"):
        torch.compile(cases[0][0], fullgraph=True, backend="aot_eager")(q1, k_cache, v_cache)


def test_int_arguments_as_one_element_tensors_under_fullgraph():
    """Offsets and int params may come as one-element tensors (plain_number reads them). Traced by
    torch.compile(fullgraph=True), plain_number's duck typing (callable() of a bound method) was
    something dynamo cannot trace: an error about ``callable`` that named no argument. They now give
    the reference's results, value after value."""
    import attncc

    window = module("sliding_window")
    fn = torch.compile(lambda q, k, v, w, o: window.attention(q, k, v, window=w, q_offset=o), fullgraph=True,
                       backend="aot_eager")
    gen = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    for w, offset in ((5, 12), (3, 0), (9, 7)):
        q, k, v = torch.randn(1, 2, 8, 16, generator=gen), *(torch.randn(1, 2, 20, 16, generator=gen) for _ in "kv")
        got = fn(q, k, v, torch.tensor(w), torch.tensor(offset))
        want = attncc.reference(pattern("sliding_window"), q.double(), k.double(), v.double(), window=w,
                                q_offset=offset)
        assert rel_err(got, want) < 1e-5


def test_float_tensors_as_scale_under_compile_name_the_argument():
    """A float tensor as ``scale=`` works eagerly and, without fullgraph, compiled (dynamo runs the call
    eagerly). Under fullgraph=True its value is data-dependent: that failed with dynamo's guard error on
    ``zuf0 > 0.0``, naming no argument; the error now names scale= and says what to pass instead."""
    import attncc

    causal = module("causal")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in "qkv")
    want = attncc.reference(pattern("causal"), q.double(), k.double(), v.double(), scale=0.3)
    fn = lambda q, k, v, s: causal.attention(q, k, v, scale=s)  # noqa: E731
    assert rel_err(fn(q, k, v, torch.tensor(0.3)), want) < 1e-5
    torch._dynamo.reset()
    assert rel_err(torch.compile(fn, backend="aot_eager")(q, k, v, torch.tensor(0.3)), want) < 1e-5
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"scale: a float tensor's value is unknown while torch.compile traces"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, torch.tensor(0.3))
    torch._dynamo.reset()
