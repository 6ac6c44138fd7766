"""An outside tester's probe (probe 11) of gradients where a score's derivative is not finite:
score transforms with a kink or a root (``max(s, 0) ** 0.5``, ``log(max(s, 0))``, ``abs(s) ** t``,
``where(s > 0, sqrt(s), s)``), at pairs that carry no weight (lanes past the end of a tile, masked
pairs, branches not taken). Each call is checked three ways: the generated kernels, attncc.reference,
and a dense float64 oracle written here from the formulas (it shares nothing with attncc), in the
interpreter at odd lengths.

Defects found, each with its test below:
- The kernels' backward multiplied dS = P (dP - delta), 0 at a pair without weight, by d mod / d s
  there: 0 * inf = NaN in dQ, dK and the learned inputs' gradients. A tile's lanes past the last key
  or query have a score of exactly 0, where ``abs(s) ** t`` or ``sqrt(abs(s))`` has an infinite
  derivative; so had masked padding keys of zeros.
- The derivative of a kink multiplied its step by the other factors
  (``where(s > 0, 1, 0) / sqrt(max(s, 0))`` for ``max(s, 0) ** 0.5``): NaN for every s < 0, where
  torch's backward of max selects 0.
- attncc.reference's autograd took the derivative of a where() branch not taken, and of the bias
  and mod at masked pairs, times their zero gradient: NaN dq, dk for ``where(s > 0, sqrt(s), s)``.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from attncc.spec import parse_spec

NEG_INF = float("-inf")


def oracle(q, k, v, score, mask, scale, softcap=None):
    """(o, lse) in float64 from the formulas. ``score(s, E)`` and ``mask(E)`` see ``E`` with the
    broadcast positions ``i`` and ``j``; a masked pair's score passes no gradient (it is not used)."""
    B, Hq, Nq, _ = q.shape
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)
    E = dict(i=torch.arange(Nq).view(-1, 1), j=torch.arange(k.shape[2]).view(1, -1))
    keep = torch.broadcast_to(mask(E), s.shape) if mask is not None else torch.ones_like(s, dtype=torch.bool)
    s = torch.where(keep, s, s.detach())
    if score is not None:
        s = score(s, E)
    if softcap is not None:
        s = torch.where(s == NEG_INF, s, softcap * torch.tanh(s / softcap))
    s = torch.where(keep, s, NEG_INF)
    lse = torch.logsumexp(s, -1)
    finite = torch.isfinite(lse)
    p = torch.where(finite[..., None], torch.exp(s - torch.where(finite, lse, 0.0)[..., None]), 0.0)
    return p @ v, lse


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check(spec, score, mask=None, *, Nq=21, Nk=27, D=16, inputs=None, learned=(), prepare=None, seed=0):
    """Forward, LSE and every gradient of ``spec`` (a dict) through the kernels, the reference and
    the oracle; all must be finite and agree."""
    mod, pattern = attncc.compile(spec), parse_spec(toml_text(spec))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, D, generator=gen) for h, n in ((2, Nq), (1, Nk), (1, Nk)))
    if prepare is not None:
        prepare(q, k, v)
    go, gl = torch.randn(1, 2, Nq, D, generator=gen), torch.randn(1, 2, Nq, generator=gen)
    inputs = inputs or {}
    scale = spec.get("score", {}).get("scale", 1 / math.sqrt(D))
    softcap = spec.get("score", {}).get("softcap")

    def own(q_, k_, v_, **values):
        def with_values(s, E):
            return score(s, {**E, **values})
        return oracle(q_, k_, v_, with_values if score else None, mask, scale, softcap)

    results = {}
    for name, fn, cast in (("kernels", mod.attention, lambda t: t.float()),
                           ("reference", lambda *a, **x: attncc.reference(pattern, *a, return_lse=True, **x), torch.Tensor.double),
                           ("oracle", own, torch.Tensor.double)):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (q, k, v)]
        values = {n: cast(t).detach().clone().requires_grad_() if n in learned else t for n, t in inputs.items()}
        o, lse = fn(*leaves, return_lse=True, **values) if name == "kernels" else fn(*leaves, **values)
        loss = (o.double() * go.double()).sum() + (lse.double() * gl.double()).sum()
        grads = torch.autograd.grad(loss, leaves + [values[n] for n in learned])
        results[name] = [o.detach(), lse.detach(), *grads]
    labels = ["o", "lse", "dq", "dk", "dv"] + [f"d{n}" for n in learned]
    want = results["oracle"]
    for name, tol in (("kernels", 2e-4), ("reference", 1e-9)):
        for label, x, r in zip(labels, results[name], want):
            assert torch.isfinite(x).all(), f"{name}: {label} has {int((~torch.isfinite(x)).sum())} NaN/inf"
            assert _rel(x, r) < tol, (name, label, _rel(x, r))


# A tile's lanes past the last key or query hold a score of exactly 0 (Nq, Nk not multiples of the
# tile): the derivative of these transforms is infinite there.
@pytest.mark.parametrize("mod,score", [
    ("abs(s) ** 0.5", lambda s, E: s.abs() ** 0.5),
    ("log(abs(s))", lambda s, E: torch.log(s.abs())),
], ids=["root", "log"])
def test_lanes_past_the_end_pass_no_gradient(mod, score):
    check({"score": {"mod": mod}}, score)


def test_a_learned_power_of_the_score():
    """d(|s| ** t) / dt = |s| ** t * log|s|: 0 * -inf at a lane past the end, summed into t."""
    check({"inputs": {"t": {"dims": [], "grad": True}}, "score": {"mod": "abs(s) ** t"}},
          lambda s, E: s.abs() ** E["t"], inputs={"t": torch.tensor(0.7)}, learned=("t",))
    check({"inputs": {"t": {"dims": ["h", "n"], "grad": True}}, "score": {"mod": "abs(s) ** t[h, i]"}},
          lambda s, E: s.abs() ** E["t"][:, :21, None], Nk=19,
          inputs={"t": torch.linspace(0.3, 1.2, 2 * 40).view(2, 40)}, learned=("t",))


# The flat side of a kink passes no gradient, whatever the derivative of what follows is there.
@pytest.mark.parametrize("mod,score", [
    ("max(s, 0) ** 0.5", lambda s, E: torch.clamp_min(s, 0) ** 0.5),
    ("log(max(s, 0))", lambda s, E: torch.log(torch.clamp_min(s, 0))),
    ("where(s > 0, sqrt(s), s)", lambda s, E: torch.where(s > 0, torch.sqrt(torch.where(s > 0, s, 1.0)), s)),
    ("max(min(s, 1), 0) ** 0.5 + s", lambda s, E: torch.clamp(s, 0, 1) ** 0.5 + s),
], ids=["max_root", "log_max", "where_root", "clamp_root"])
def test_kinks_select_their_branch(mod, score):
    check({"score": {"mod": mod}}, score, Nq=32, Nk=32)


def test_masked_padding_keys_of_zeros():
    """Keys past the length are zeros (padding) and masked: their scores are exactly 0."""
    def zero_tail(q, k, v):
        k[:, :, 19:] = 0

    check({"params": {"L": 19}, "mask": {"where": "j < L"}, "score": {"mod": "abs(s) ** 0.5"}},
          lambda s, E: s.abs() ** 0.5, lambda E: E["j"] < 19, prepare=zero_tail)
    check({"params": {"L": 19}, "mask": {"where": "j < L"}, "score": {"mod": "abs(s) ** 0.5", "softcap": 0.8}},
          lambda s, E: s.abs() ** 0.5, lambda E: E["j"] < 19, prepare=zero_tail)


def test_a_learned_bias_times_an_input_of_minus_inf():
    """d bias / d w = pad[b, j] is -inf at the keys that pad removes (their P is 0)."""
    pad = torch.zeros(1, 40)
    pad[0, 5] = pad[0, 22:] = NEG_INF
    w = torch.tensor([0.5, 2.0])

    def score(s, E):
        ww, removed = E["w"].view(-1, 1, 1), (E["pad"][0, :27] == NEG_INF)
        return s + torch.where(removed, NEG_INF, ww * torch.where(removed, 0.0, E["pad"][0, :27])) + ww * (E["i"] - E["j"]) * 0.1

    check({"inputs": {"w": {"dims": ["h"], "grad": True}, "pad": {"dims": ["b", "n"]}},
           "score": {"bias": "w[h] * pad[b, j] + w[h] * (i - j) * 0.1"}},
          score, inputs={"w": w, "pad": pad}, learned=("w",))


# ---------------------------------------------------------------------------------------------
# The call API: numbers that want a gradient, torch.func transforms, tensors without strides
# ---------------------------------------------------------------------------------------------

def _qkv(N=9):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 2, N, 16, generator=gen) for _ in range(3)]


def test_numbers_that_want_a_gradient_are_refused():
    """scale= and params are read on the host (item()): a tensor that requires grad would silently
    get none, in the module and in the reference alike."""
    from generated import causal

    spec = {"params": {"w": 0.5}, "mask": {"where": "causal"}, "score": {"mod": "s * w"}}
    mod, pattern = attncc.compile(spec), parse_spec(toml_text(spec))
    q, k, v = _qkv()
    temp = torch.tensor(0.5, requires_grad=True)
    for call in (lambda: causal.attention(q, k, v, scale=temp), lambda: mod.attention(q, k, v, w=temp),
                 lambda: mod.decode(q[:, :, :1], k, v, kv_len=[9], w=temp),
                 lambda: attncc.reference(pattern, q, k, v, scale=temp), lambda: attncc.reference(pattern, q, k, v, w=temp)):
        with pytest.raises(TypeError, match=r"(scale|w'?(| of pattern 'pattern')) is read as a number on the host and gets no gradient"):
            call()
    with torch.no_grad():  # no gradient is wanted: the number is read
        ref = attncc.reference(pattern, q, k, v, w=0.5)
        assert torch.allclose(mod.attention(q, k, v, w=temp).double(), ref, atol=1e-5)
    assert torch.allclose(causal.attention(q, k, v, scale=temp.detach()), causal.attention(q, k, v, scale=0.5))


@pytest.mark.parametrize("transform", ["vmap", "grad", "vjp"])
def test_torch_func_transforms_are_refused_clearly(transform):
    from generated import causal, linear_elu

    q, k, v = _qkv()
    for fn, name in ((causal.attention, "causal.attention"), (linear_elu.attention, "linear_elu.attention")):
        run = {"vmap": lambda: torch.vmap(fn)(q[None], k[None], v[None]),
               "grad": lambda: torch.func.grad(lambda x: fn(x, k, v).sum())(q),
               "vjp": lambda: torch.func.vjp(lambda x: fn(x, k, v), q)}[transform]
        with pytest.raises(NotImplementedError, match=rf"{name}: torch.func transforms .* are not supported"):
            run()
    with pytest.raises(NotImplementedError, match=r"causal.decode: torch.func transforms"):
        torch.vmap(lambda x: causal.decode(x, k, v, kv_len=[9]))(q[None, :, :, :1])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_tensors_without_strides_are_refused_clearly():
    """A sparse or nested q, k, v, input or cache: a TypeError naming it (was torch's "Cannot access
    data pointer of Tensor that doesn't have storage", or an internal error, from the launch), also
    after a dense call of the same shape (the signature cache)."""
    from generated import causal, document

    q, k, v = _qkv()
    causal.attention(q, k, v)
    with pytest.raises(TypeError, match=r"causal.attention: k must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        causal.attention(q, k.to_sparse(), v)
    nested = torch.nested.nested_tensor([q[0, :, :5], q[0, :, :7]])
    with pytest.raises(TypeError, match=r"causal.attention: q must be a dense \(strided\) tensor, got a nested tensor"):
        causal.attention(nested, k, v)
    doc = torch.zeros(1, 9, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"document.attention: input doc must be a dense \(strided\) tensor"):
        document.attention(q, k, v, doc=doc.to_sparse())
    with pytest.raises(TypeError, match=r"causal.decode: v_cache must be a dense \(strided\) tensor"):
        causal.decode(q[:, :, :1], k, v.to_sparse(), kv_len=[9])


# ---------------------------------------------------------------------------------------------
# Powers: the kernels printed x ** y as exp2(y * log2(x)), NaN for every negative x
# ---------------------------------------------------------------------------------------------

def _rel_pos(E):
    return (E["i"] - E["j"]).double()


@pytest.mark.parametrize("spec,score,mask", [
    ({"score": {"mod": "s ** 5"}}, lambda s, E: s ** 5, None),
    ({"score": {"mod": "s ** 2.0 - 0.1 * s ** 6"}}, lambda s, E: s * s - 0.1 * s ** 6, None),
    ({"params": {"w": 3.0}, "score": {"mod": "s ** w"}}, lambda s, E: s ** 3, None),
    ({"params": {"w": 3}, "score": {"mod": "s ** w"}}, lambda s, E: s ** 3, None),
    ({"params": {"w": 2}, "score": {"bias": "0.01 * (i - j) ** w + (i - j) ** (w - 2)"}},
     lambda s, E: s + 0.01 * _rel_pos(E) ** 2 + 1, None),
    ({"score": {"mod": "s * (-1) ** j + (-0.5) ** (i - j)"}},
     lambda s, E: s * (-1.0) ** E["j"] + (-0.5) ** _rel_pos(E), lambda E: E["j"] <= E["i"]),
    ({"params": {"w": 3}, "mask": {"where": "((i - j) * 0.5) ** 5 > -100 and (i - j) ** w < 500"}}, None,
     lambda E: ((_rel_pos(E) * 0.5) ** 5 > -100) & (_rel_pos(E) ** 3 < 500)),
], ids=["s5", "s2.0_s6", "float_param", "int_param", "int_power_of_distance", "negative_bases", "mask"])
def test_powers_of_negative_numbers(spec, score, mask):
    if mask is not None and "mask" not in spec:
        spec = {**spec, "mask": {"where": "j <= i"}}
    check(spec, score, mask)


def test_a_negative_base_to_the_power_of_the_score():
    """(-2.0) ** s is torch.pow's (NaN at a fractional s) forward; its derivative is complex: the
    backward says so when called (it was a NotImplementedError 'cannot render ImaginaryUnit' from the build)."""
    spec = {"mask": {"where": "j <= i"}, "score": {"mod": "where(s > 0, s, (-2.0) ** s)"}}
    mod, pattern = attncc.compile(spec), parse_spec(toml_text(spec))
    q, k, v = _qkv()
    o = mod.attention(q, k, v)
    ref = attncc.reference(pattern, q, k, v)
    assert torch.equal(torch.isnan(o), torch.isnan(ref)) and torch.isnan(o).any()
    with pytest.raises(NotImplementedError, match=r"the derivative .* is not real \(a negative base to a power of s\)"):
        mod.attention(q.requires_grad_(), k, v).sum().backward()


# ---------------------------------------------------------------------------------------------
# abs() of what sympy cannot prove real; a float64 condition of a score beside a tile's
# ---------------------------------------------------------------------------------------------

_T, _U = torch.tensor([0.7, -0.4]), torch.linspace(-1, 1, 30).view(1, 30)


def _t(E):
    return E["t"].view(-1, 1, 1)


def _u(E):
    return E["u"][0, None, None, :27]


@pytest.mark.parametrize("mod,score", [
    ("abs(t[h] * s)", lambda s, E: (_t(E) * s).abs()),
    ("abs(s + u[b, j])", lambda s, E: (s + _u(E)).abs()),
    ("abs(s * log(1 + (i - j) * 0.1))", lambda s, E: (s * torch.log(1 + _rel_pos(E) * 0.1)).abs()),
    ("abs(s + log(1 + abs((i - j) * 0.1)))", lambda s, E: (s + torch.log(1 + (_rel_pos(E) * 0.1).abs())).abs()),
], ids=["input_times_s", "s_plus_input", "log", "log_abs"])
def test_abs_of_values_sympy_cannot_prove_real(mod, score):
    """sympy differentiated abs(u) as a complex modulus (re, im, arg, zoo) where it could not prove u
    real: the backward raised 'cannot render im', or the build failed ('cannot render arg')."""
    used = [n for n in ("t", "u") if f"{n}[" in mod]
    spec = {"inputs": {"t": {"dims": ["h"], "grad": True}, "u": {"dims": ["b", "n"], "grad": True}},
            "mask": {"where": "j <= i"}, "score": {"mod": mod}}
    spec["inputs"] = {n: d for n, d in spec["inputs"].items() if n in used}
    check(spec, score, lambda E: E["j"] <= E["i"], inputs={n: {"t": _T, "u": _U}[n] for n in used}, learned=used)


def test_float64_conditions_of_a_score_beside_a_tile_in_the_interpreter():
    """A score's condition on float inputs is computed in float64 (an ExactCondition); one per
    program (t[h] <= 0.3) and one per key (u[b, j] > 0.3) joined by & crashed Triton's interpreter in
    the dK/dV kernel ('ufunc bitwise_and not supported'): the per-program one was not made an int1."""
    def score(s, E):
        inner = torch.where(_t(E) > 0.3, _t(E), _u(E))
        return s + torch.where(inner > 0.3, _t(E), 0.5)

    check({"inputs": {"t": {"dims": ["h"], "grad": True}, "u": {"dims": ["b", "n"]}},
           "score": {"mod": "s + where(where(t[h] > 0.3, t[h], u[b, j]) > 0.3, t[h], 0.5)"}},
          score, inputs={"t": _T, "u": _U}, learned=("t",))
