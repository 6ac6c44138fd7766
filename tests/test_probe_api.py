"""An outside tester's probe of the call API (probe 9): seeded random calls of generated modules with
unusual but legal arguments, each against attncc.reference in float64, and the defects the probe
found, each with its regression test.

The random calls mix, through one module at a time (so that the signature cache sees alternating
shapes, dtypes and layouts): GQA groups of 1 to 3, odd head dims (1, 17, ...) and value dims
different from them, empty and one-row sequences, offsets, scale overrides, q/k/v as views of
other storage (BNHD transposed, a storage offset, a stride-2 last dim, stride-0 heads or rows), q,
k and v made from one tensor, gradients of a subset of them and of the grad = true inputs, losses
of o (whose gradient is a stride-0 expansion), of o times a cotangent (also in the BNHD layout), of
the LSE alone or of both, and calls under torch.no_grad and torch.inference_mode.
"""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from cases import REL_TOL, SMALL_PARAMS, build_inline, inputs_for, module, pattern, rel_err

GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}
# absolute bounds of the LSE: a 16-bit RoPE spec rotates q and k in float32 but multiplies them in
# their own type, so a score of magnitude 50 is off by ~1e-2 in float16
ABS_TOL = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 2e-1}

# Views of a leaf that make a [B, H, N, D] operand: (the leaf's shape, the view).
LAYOUTS = {
    "dense": (lambda s: s, lambda x, s: x),
    "bnhd": (lambda s: (s[0], s[2], s[1], s[3]), lambda x, s: x.transpose(1, 2)),
    "offset": (lambda s: (s[0] * s[1] * s[2] * s[3] + 3,), lambda x, s: x[3:].view(s)),
    "step": (lambda s: (*s[:3], 2 * s[3]), lambda x, s: x[..., ::2]),
    "heads0": (lambda s: (s[0], 1, *s[2:]), lambda x, s: x.expand(s)),
    "rows0": (lambda s: (*s[:2], 1, s[3]), lambda x, s: x.expand(s)),
}

SPECS = ["causal", "sliding_window", "cross_causal", "alibi", "softcap", "rope_causal", "t5_bias", "document",
         "padding", "dense", "mqa", "prefix_lm"]


def _case(rnd: random.Random):
    name = rnd.choice(SPECS)
    p = pattern(name)
    dtype = rnd.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    B = rnd.choice([1, 2])
    Hkv = 1 if p.heads_kv == 1 else rnd.choice([1, 2])
    Hq = Hkv * rnd.choice([1, 2, 3])
    Nq, Nk = rnd.choice([0, 1, 5, 16, 23]), rnd.choice([0, 1, 9, 16, 31])
    D = rnd.choice([16, 24, 32, 2]) if p.rope else rnd.choice([16, 17, 32, 1, 24])
    Dv = rnd.choice([D, D, 8, 20])
    alias = rnd.random() < 0.15 and Hq == Hkv and Nq == Nk and Nq > 0 and Dv == D
    return dict(name=name, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, alias=alias,
                layouts=[rnd.choice(list(LAYOUTS)) for _ in range(3)],
                q_offset=rnd.choice([0, 0, 3, 40]), k_offset=rnd.choice([0, 0, 2]),
                scale=rnd.choice([None, None, 0.05, 1, 2.5]),
                grads=[rnd.random() < 0.7 for _ in range(3)], loss=rnd.choice(["o", "o*g", "oT*g", "lse", "both"]),
                mode=rnd.choice(["grad", "grad", "no_grad", "inference"]), seed=rnd.randrange(2**31))


def _run(c):
    p, mod = pattern(c["name"]), module(c["name"])
    gen = torch.Generator().manual_seed(c["seed"])
    dtype, B, Hq, Hkv = c["dtype"], c["B"], c["Hq"], c["Hkv"]
    shapes = [(B, Hq, c["Nq"], c["D"]), (B, Hkv, c["Nk"], c["D"]), (B, Hkv, c["Nk"], c["Dv"])]
    bases = [torch.randn(LAYOUTS[how][0](s), generator=gen).to(dtype) for how, s in zip(c["layouts"], shapes)]
    if c["alias"]:  # q = k = v: one tensor, one leaf
        bases = [bases[0]] * 3
        c["layouts"] = [c["layouts"][0]] * 3
    n = max(c["q_offset"] + c["Nq"], c["k_offset"] + c["Nk"], 1)
    kw = dict(SMALL_PARAMS.get(c["name"], {}), **inputs_for(p, B, Hq, n, gen))
    if c["name"] == "sliding_window":
        kw["window"] = 1 + c["seed"] % 20
    learned = [d.name for d in p.inputs if d.grad]
    pos = dict(q_offset=c["q_offset"], k_offset=c["k_offset"])
    if c["scale"] is not None:
        pos["scale"] = c["scale"]
    grad = c["mode"] == "grad"
    g = torch.randn(B, Hq, c["Nq"], c["Dv"], generator=gen)
    gl = torch.randn(B, Hq, c["Nq"], generator=gen)

    def call(fn, cast, want_grad):
        leaves = {}
        for i, base in enumerate(bases):  # one leaf per distinct base (q = k = v share theirs)
            if id(base) not in leaves:
                leaves[id(base)] = cast(base).detach().clone().requires_grad_(want_grad and (c["grads"][i] or c["alias"]))
        ops = [LAYOUTS[how][1](leaves[id(base)], s) for how, base, s in zip(c["layouts"], bases, shapes)]
        inputs = {k: (cast(t).detach().clone().requires_grad_(want_grad) if k in learned else t) for k, t in kw.items()}
        o, lse = fn(*ops, return_lse=True, **pos, **inputs)
        wrt = [t for t in [*leaves.values(), *(inputs[k] for k in learned)] if t.requires_grad]
        if not wrt:
            return o, lse, []
        fin = torch.isfinite(lse).detach()
        terms = {"o": o.sum(), "o*g": (o * cast(g)).sum(), "lse": torch.where(fin, lse * cast(gl), 0).sum(),
                 # dO in the BNHD layout (transposed, not contiguous)
                 "oT*g": (o.transpose(1, 2) * cast(g).transpose(1, 2).contiguous()).sum()}
        loss = terms["o*g"] + terms["lse"] if c["loss"] == "both" else terms[c["loss"]]
        if not loss.requires_grad:  # the LSE of the reference, with v alone wanting a gradient
            return o, lse, [torch.zeros_like(t) for t in wrt]
        return o, lse, torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)

    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[c["mode"]]
    with context():
        o, lse, got = call(mod.attention, lambda t: t.to(dtype) if t.is_floating_point() else t, grad)
    ref, ref_lse, want = call(lambda *a, **k: attncc.reference(p, *a, **k), lambda t: t.double(), grad)
    assert o.shape == ref.shape and o.dtype == dtype and lse.dtype == torch.float32
    if ref.numel():
        assert rel_err(o.detach(), ref.detach()) < REL_TOL[dtype], rel_err(o.detach(), ref.detach())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse.detach()[fin].double(), ref_lse.detach()[fin], atol=ABS_TOL[dtype], rtol=1e-3)
    assert len(got) == len(want)
    largest = max([float(r.abs().max()) for r in want if r.numel()] + [1.0])
    for x, r in zip(got, want):
        assert torch.isfinite(x).all()
        if r.numel() and float(r.abs().max()) > 1e-6:
            assert rel_err(x, r) < GRAD_TOL[dtype], (rel_err(x, r), c)
        elif x.numel():  # 0 in float64 (identical keys or values): rounding noise, as large as the
            # others' errors (16-bit O makes delta = rowsum(dO * O) off by its rounding, as in FlashAttention)
            assert float(x.abs().max()) < GRAD_TOL[dtype] * largest, (float(x.abs().max()), largest)


@pytest.mark.parametrize("block", range(4))
def test_random_calls_match_the_reference(block):
    rnd = random.Random(9000 + block)
    for _ in range(16):
        c = _case(rnd)
        try:
            _run(dict(c))
        except AssertionError as e:
            raise AssertionError(f"{c}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Defects the probe found
# ---------------------------------------------------------------------------------------------


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]


def test_inputs_changed_in_place_before_the_backward_raise():
    """The backward read the [inputs] and cu_seqlens from the call, not from autograd's saved
    tensors: a kv_len, a learned table (an optimizer step) or a cu_seqlens changed in place after
    the forward gave gradients of a mask or bias the forward never used, without a word (the
    torch.compile path saved them and raised)."""
    q, k, v = _leaves((2, 2, 16, 16), (2, 2, 16, 16), (2, 2, 16, 16))
    kv_len = torch.tensor([10, 16], dtype=torch.int32)
    o = module("padding").attention(q, k, v, kv_len=kv_len)
    kv_len[0] = 3
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()

    (table,) = _leaves((2, 32), seed=1)
    o = module("t5_bias").attention(q, k, v, rel_bias=table)
    with torch.no_grad():
        table.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()

    q, k, v = _leaves((1, 2, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16), seed=2)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    o = module("causal").attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    cu[1] = 4
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()


def test_inputs_made_under_inference_mode_still_train():
    """Inference tensors cannot be saved for a backward (nor changed outside inference mode): document
    ids and cu_seqlens built under torch.inference_mode keep serving a training call."""
    with torch.inference_mode():
        doc = torch.tensor([[0] * 6 + [1] * 10], dtype=torch.int32)
        cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    q, k, v = _leaves((1, 2, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16), seed=5)
    got = torch.autograd.grad(module("document").attention(q, k, v, doc=doc).sum(), (q, k, v))
    want = torch.autograd.grad(module("document").attention(q, k, v, doc=doc.clone()).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    got = torch.autograd.grad(module("causal").attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu).sum(), (q, k, v))
    want = torch.autograd.grad(module("causal").attention(q, k, v, cu_seqlens_q=cu.clone(),
                                                          cu_seqlens_k=cu.clone()).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_saved_tensor_hooks_that_copy_see_every_saved_tensor():
    """Under saved-tensor hooks that hand back copies (offloading, checkpointing), the backward
    takes the unpacked inputs and cu_seqlens and still gives the reference's gradients."""
    p = pattern("t5_bias")
    q, k, v = _leaves((1, 2, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16), seed=3)
    (table,) = _leaves((2, 32), seed=4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        o = module("t5_bias").attention(q, k, v, rel_bias=table)
    got = torch.autograd.grad(o.sum(), (q, k, v, table))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = attncc.reference(p, *leaves[:3], rel_bias=leaves[3])
    for x, r in zip(got, torch.autograd.grad(ref.sum(), leaves)):
        assert rel_err(x, r) < 1e-3


@pytest.mark.parametrize("Hq, Hkv", [(0, 1), (0, 2), (2, 0)])
def test_zero_head_counts_are_refused(Hq, Hkv):
    """Hq = 0 passed the check (0 is a multiple of Hkv): the kernels divided by the group size
    (0), decode raised ZeroDivisionError, and linear attention's dK of 0 query heads was NaN and
    step() returned an unwritten state."""
    q, k, v = (torch.randn(1, h, 8, 16) for h in (Hq, Hkv, Hkv))
    for call in (lambda: module("causal").attention(q, k, v),
                 lambda: module("causal").decode(q[:, :, :1], k, v, kv_len=[4]),
                 lambda: module("linear_elu").attention(q, k, v),
                 lambda: module("linear_elu").step(q[:, :, 0], k[:, :, 0], v[:, :, 0])):
        with pytest.raises(ValueError, match="each needs at least one head"):
            call()


SIGNED = {f"signed_{dtype}": f'name = "signed_{dtype}"\nhead_dim = 16\n[inputs]\nx = {{ dims = ["b", "n"], '
                             f'dtype = "{dtype}" }}\n[mask]\nwhere = "j <= i and x[b, j] != 7 and x[b, j] < 1000"\n'
                             f'[score]\nbias = "0.01 * min(x[b, j], 300)"\n' for dtype in ("uint8", "int8", "int32")}


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    return build_inline(SIGNED, tmp_path_factory.mktemp("signed"))


@pytest.mark.parametrize("declared, given", [("uint8", torch.int8), ("int8", torch.uint8), ("int32", torch.uint32),
                                             ("uint8", torch.int16)])
def test_int_inputs_of_the_other_signedness_keep_their_values(signed, declared, given):
    """An int8 tensor in a uint8 input was converted with .to(uint8): -1 became 255 (and uint8's
    200 became int8's -56, uint32's 3e9 a negative int32) while the reference read the values as
    given. They are read at a signed type that holds both now."""
    p, mod = signed[f"signed_{declared}"]
    gen = torch.Generator().manual_seed(5)
    info = torch.iinfo(given)
    x = torch.randint(max(info.min, -128), min(info.max, 255) + 1, (2, 24), generator=gen).to(given)
    x[0, :4] = 7  # masked out
    if given == torch.uint32:
        x[1, :5] = 3_000_000_000
    q, k, v = (torch.randn(2, 2, 24, 16, generator=gen) for _ in range(3))
    o, lse = mod.attention(q, k, v, x=x, return_lse=True)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), x=x.long(), return_lse=True)
    assert rel_err(o, ref) < 1e-4
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and torch.allclose(lse[fin].double(), ref_lse[fin], atol=1e-3)


def test_int_inputs_no_signed_type_holds_are_refused(signed):
    x = torch.zeros(1, 8, dtype=torch.uint64)
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    with pytest.raises(TypeError, match="input x must be int32, got uint64, whose values no signed integer type holds"):
        signed["signed_int32"][1].attention(q, k, v, x=x)


FLOAT_PARAM = {"name": "probe_float_param", "head_dim": 16, "params": {"w": 0.5}, "mask": {"where": "j <= i"},
               "score": {"mod": "s * w"}}


def test_numbers_that_change_between_compiled_calls():
    """torch.compile makes an int or float argument that changes between calls symbolic (automatic
    dynamic); the op's options string took the params and the scale by repr, and math.isfinite
    checked the scale: a second value failed fullgraph tracing with dynamo's "repr_impl not
    implemented" / "torch.* op returned non-Tensor", naming nothing of the call."""
    from attncc.module_cache import toml_text

    window, p_window = module("sliding_window"), pattern("sliding_window")
    floats = attncc.compile(FLOAT_PARAM)
    p_floats = attncc.parse_spec(toml_text(FLOAT_PARAM))

    def fn(q, k, v, w, off, s, x):
        o, lse = window.attention(q, k, v, window=w, q_offset=off, return_lse=True)
        return o.sum() + lse.sum() + floats.attention(q, k, v, scale=s, w=x).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for i, (w, off, s, x) in enumerate([(3, 0, 0.25, 0.5), (4, 1, 0.5, 1.5), (6, 2, 1.25, -0.75)]):
        q, k, v = _leaves((1, 2, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16), seed=10 + i)
        out = compiled(q, k, v, w, off, s, x)
        got = torch.autograd.grad(out, (q, k, v))
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o, lse = attncc.reference(p_window, *leaves, window=w, q_offset=off, return_lse=True)
        ref = o.sum() + lse.sum() + attncc.reference(p_floats, *leaves, scale=s, w=x).sum()
        assert abs(out.item() - ref.item()) < 1e-3 * (1 + abs(ref.item()))
        for a, b in zip(got, torch.autograd.grad(ref, leaves)):
            assert rel_err(a, b) < 1e-3


def test_int_argument_errors_name_the_function():
    """``q_offset must be >= 0, got -1`` named neither the module nor the function (attention,
    decode, a param's override or max_seqlen_q of a packed call): now every one does."""
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    cu = torch.tensor([0, 8], dtype=torch.int32)
    cases = [
        (lambda: module("causal").attention(q, k, v, q_offset=-1), ValueError, r"causal\.attention: q_offset must be >= 0"),
        (lambda: module("causal").attention(q, k, v, n_k=1.5), TypeError, r"causal\.attention: n_k must be an int"),
        (lambda: module("sliding_window").attention(q, k, v, window=2.5), TypeError,
         r"sliding_window\.attention: param window must be an int"),
        (lambda: module("sliding_window").decode(q[:, :, :1], k, v, kv_len=[8], window=-2**40), ValueError,
         r"sliding_window\.decode: param window must be >= -2\*\*31 \(-2147483648\)"),
        (lambda: module("causal").attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-1, max_seqlen_k=8),
         ValueError, r"causal\.attention: max_seqlen_q must be >= 0"),
        (lambda: module("causal_dropout").attention(q, k, v, seed=-3), ValueError,
         r"causal_dropout\.attention: seed must be >= 0"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("dress", ["numpy", "tensor"])
def test_numbers_in_numpy_or_tensor_dress_are_numbers_for_module_and_reference(dress):
    """Int params took numpy ints and one-element tensors, float params and scale= refused them
    (np.float32(0.5): "must be a number, got np.float32(0.5)"), and attncc.reference did the
    opposite for int params (np.int64(3) refused) and took a tensor scale: module and reference
    now take the same numbers, and refuse booleans of any kind alike."""
    import numpy
    from attncc.module_cache import toml_text

    floats = attncc.compile(FLOAT_PARAM)
    p_floats = attncc.parse_spec(toml_text(FLOAT_PARAM))
    dressed = (lambda x: numpy.float32(x) if isinstance(x, float) else numpy.int64(x)) if dress == "numpy" \
        else (lambda x: torch.tensor(x))
    q, k, v = _leaves((1, 2, 12, 16), (1, 2, 12, 16), (1, 2, 12, 16), seed=20)
    q, k, v = q.detach(), k.detach(), v.detach()
    for mod, p, kw in [(floats, p_floats, dict(w=0.75, scale=0.5)), (floats, p_floats, dict(w=2, scale=1)),
                       (module("sliding_window"), pattern("sliding_window"), dict(window=3, q_offset=4))]:
        plain = mod.attention(q, k, v, **kw)
        other = {name: dressed(x) for name, x in kw.items()}
        assert torch.allclose(mod.attention(q, k, v, **other), plain, atol=1e-6)
        assert rel_err(attncc.reference(p, q.double(), k.double(), v.double(), **other), plain) < 1e-4
    for bad in (numpy.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="param w must be a number"):
            floats.attention(q, k, v, w=bad)
        with pytest.raises(TypeError, match="param w must be a number, got bool"):
            attncc.reference(p_floats, q, k, v, w=bad)
        with pytest.raises(TypeError, match="scale must be a positive number"):
            floats.attention(q, k, v, scale=bad)
        with pytest.raises(TypeError, match="scale must be a positive number"):
            attncc.reference(p_floats, q, k, v, scale=bad)


DECODE_SPECS = ["causal", "sliding_window", "alibi", "softcap", "padding", "document", "cross_causal", "prefix_lm",
                "mqa", "rope_causal"]


@pytest.mark.parametrize("block", range(2))
def test_random_decode_calls_match_the_reference(block):
    """decode with caches as views (BNHD-transposed, a stride-2 last dim), odd head dims, value
    dims of their own, groups of 1 to 3, 1 to 5 query rows, lengths 0, 1, below Nq and full: each
    row against attention's reference on the row's prefix of the cache."""
    rnd = random.Random(9100 + block)
    for _ in range(6):
        name = rnd.choice(DECODE_SPECS)
        p, mod = pattern(name), module(name)
        gen = torch.Generator().manual_seed(rnd.randrange(2**31))
        dtype = rnd.choice([torch.float32, torch.float16])
        B, Hkv = rnd.choice([1, 3]), 1 if p.heads_kv == 1 else rnd.choice([1, 2])
        Hq, Nq, Nmax = Hkv * rnd.choice([1, 2, 3]), rnd.choice([1, 2, 5]), rnd.choice([1, 17, 40])
        D = rnd.choice([16, 24, 2]) if p.rope else rnd.choice([16, 17, 3])
        Dv = rnd.choice([D, 8])
        layouts = [rnd.choice(["dense", "bnhd", "step", "offset"]) for _ in range(3)]
        shapes = [(B, Hq, Nq, D), (B, Hkv, Nmax, D), (B, Hkv, Nmax, Dv)]
        q, k, v = (LAYOUTS[how][1](torch.randn(LAYOUTS[how][0](s), generator=gen).to(dtype), s)
                   for how, s in zip(layouts, shapes))
        kv_len = [rnd.choice([0, 1, min(Nq, Nmax) - 1, Nmax, rnd.randint(0, Nmax)]) for _ in range(B)]
        kv_len = [max(0, min(n, Nmax)) for n in kv_len]
        kw = dict(SMALL_PARAMS.get(name, {}), **{d.name: t for d, t in zip(p.inputs, inputs_for(p, B, Hq, Nmax, gen).values())
                                                 if d.name != "kv_len"})
        if name == "sliding_window":
            kw["window"] = rnd.randint(1, 20)
        case = dict(name=name, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nmax=Nmax, D=D, Dv=Dv, layouts=layouts,
                    kv_len=kv_len)
        o, lse = mod.decode(q, k, v, kv_len=torch.tensor(kv_len, dtype=torch.int32), return_lse=True, **kw)
        assert o.shape == (B, Hq, Nq, Dv) and o.dtype == dtype, case
        for b, n in enumerate(kv_len):
            first = max(0, Nq - n)  # query rows at negative positions see no key
            assert (o[b, :, :first] == 0).all() and torch.isneginf(lse[b, :, :first]).all(), case
            if first == Nq:
                continue
            row_kw = {name_: (t[b:b + 1] if isinstance(t, torch.Tensor) and name_ != "rel_bias" else t)
                      for name_, t in kw.items()}
            if "kv_len" in (d.name for d in p.inputs):
                row_kw["kv_len"] = torch.tensor([n], dtype=torch.int32)
            ref, ref_lse = attncc.reference(p, q[b:b + 1, :, first:].double(), k[b:b + 1, :, :n].double(),
                                            v[b:b + 1, :, :n].double(), q_offset=n - Nq + first, return_lse=True,
                                            **row_kw)
            assert rel_err(o[b:b + 1, :, first:], ref) < REL_TOL[dtype], (case, b, rel_err(o[b:b + 1, :, first:], ref))
            fin = torch.isfinite(ref_lse)
            got = lse[b:b + 1, :, first:]
            assert torch.equal(torch.isfinite(got), fin), case
            assert torch.allclose(got[fin].double(), ref_lse[fin], atol=ABS_TOL[dtype], rtol=1e-3), case


def test_decode_kv_len_lists_of_numpy_ints():
    """decode takes kv_len as a list of ints; a list of numpy ints (lengths from a numpy array's
    tolist()-less iteration) was refused as "kv_len must be a tensor [B] of int32 ..., got list"."""
    import numpy

    q, k, v = (torch.randn(2, 2, n, 16) for n in (1, 12, 12))
    m = module("causal")
    want = m.decode(q, k, v, kv_len=torch.tensor([5, 12], dtype=torch.int32))
    assert torch.equal(m.decode(q, k, v, kv_len=[numpy.int64(5), numpy.int32(12)]), want)
    assert torch.equal(m.decode(q, k, v, kv_len=list(numpy.array([5, 12]))), want)
    with pytest.raises(TypeError, match=r"kv_len as a list must hold ints .*\[5, 2\.5\]"):
        m.decode(q, k, v, kv_len=[5, 2.5])


def test_max_seqlen_past_the_packed_rows_launches_no_empty_programs():
    """max_seqlen_q=2**31 (a "no limit" bound) passed the check (it is >= the longest sequence) and
    sized the grid: the interpreter ran for hours, a GPU would launch 2**31 / BLOCK_M programs
    without rows (in int64 positions). No sequence is longer than the packed rows."""
    from attncc.runtime import bind

    m = module("causal")
    q, k, v = (torch.randn(1, 2, n, 16) for n in (20, 24, 24))
    cu_q, cu_k = torch.tensor([0, 8, 20], dtype=torch.int32), torch.tensor([0, 9, 24], dtype=torch.int32)
    call = bind(m.SPEC, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2**40, max_seqlen_k=2**31)
    assert (call.Nq, call.Nk) == (20, 24) and not call.wide
    want = m.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    got = m.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2**40, max_seqlen_k=2**31)
    assert torch.equal(got, want)


NEG_ZERO = {"name": "probe_negative_zero", "head_dim": 16, "params": {"w": 1.0},
            "mask": {"where": "j <= i and j < 8 / w + 40"}, "score": {"mod": "where(1 / w > 0, s, s * 2)"}}


def test_negative_zero_float_param_is_zero_for_every_cache():
    """A float param of -0.0 after one of 0.0 hit the call-signature cache (-0.0 == 0.0, equal
    hashes) and ran with 0.0, while the reference took 1 / w = -inf: every row wrong, silently.
    Module and reference take -0.0 as 0.0 now, whichever comes first."""
    from attncc.module_cache import toml_text

    mod = attncc.compile(NEG_ZERO)
    p = attncc.parse_spec(toml_text(NEG_ZERO))
    q, k, v = (t.detach() for t in _leaves((1, 2, 12, 16), (1, 2, 12, 16), (1, 2, 12, 16), seed=30))
    for w in (0.0, -0.0, 0.5, -0.0):
        ref = attncc.reference(p, q.double(), k.double(), v.double(), w=w)
        assert rel_err(mod.attention(q, k, v, w=w), ref) < 1e-4, w
        assert rel_err(mod.decode(q[:, :, -2:], k, v, kv_len=[12], w=w), ref[:, :, -2:]) < 1e-4, w
