"""[score].mod: FlexAttention's score transforms built from specs, forward and backward against
the float64 reference (interpreter), and what the code generator makes of each expression."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import sympy
import torch

import attncc
from attncc.analysis import Iteration, analyze
from attncc.analysis.score import canonical_score, softcap_of_mod
from attncc.codegen import build
from attncc.codegen.softmax import softmax_context
from attncc.spec import load_spec, parse_spec
from attncc.spec import symbols as S
from cases import ROOT, rel_err, turns

FWD_TOL, GRAD_TOL = 1e-4, 1e-3

# name -> (spec body, whether the batch index matters: B = 2 then)
TRANSFORMS = {
    "identity": ('mod = "s"', False),
    "times_two": ('mod = "s * 2"', False),
    "squared": ('mod = "s * s"', False),
    "head_scale": ('mod = "s * head_scale[h]"', False),
    "sin_cos_tan_b": ('mod = "sin(cos(s)) + tan(b)"', True),
    "cos_sin_tan_b": ('mod = "cos(s) * sin(s) + tan(b)"', True),
    "relative": ('mod = "s + (i - j)"', False),
    "relative_causal": ('mod = "where(i >= j, s + (i - j), -inf)"', False),
    "alibi_mod": ('mod = "s + (j - i) * exp2(-(h + 1) * 8 / heads)"', False),
    "softcap_mod": ('mod = "30 * tanh(s / 30)"', False),
    "softcap_builtin": ("softcap = 30.0", False),
    "piecewise": ('mod = "where(s > 0.5, 2 * s - 0.5, 0.5 * s + 0.25 * i)"', False),
    # all of it at once: a mask, hoisted (b, h) values, dropped (b, h, i) terms with an input
    "combined": ('mod = "where(i >= j, sin(cos(s)) * hs[h] + (i - j) * exp2(-h) + tan(b) + log(i + 1) * hs[h], -inf)"',
                 True),
    # score conditions: decided per pair on the score in its own units (contract v1); only the
    # part free of s is a mask. Rows where every score becomes -inf: o = 0, lse = -inf, zero grads.
    "score_cond": ('mod = "where(s <= 0.5, s, -inf)"', False),
    "score_cond_nested": ('mod = "where(s <= 0.5, where(j <= i, 2 * s, -inf), -inf)"', False),
    "score_cond_mixed": ('mod = "where(j <= i and s > -0.3, s + 0.1 * (i - j), -inf)"', False),
    "score_cond_inner": ('mod = "where(i >= j, where(s > 0.25, s, -inf) + 0.5, -inf)"', False),
    "score_cond_softcap": ('softcap = 2.0\nmod = "where(s > -0.5, s * 1.5, -inf)"', False),
    "score_cond_empty": ('mod = "where(s > 1000, s, -inf)"', False),
}
HEADER = {
    "head_scale": '[inputs]\nhead_scale = { dims = ["h"], dtype = "float32" }\n',
    "alibi_mod": "[params]\nheads = 4\n",
    "combined": '[inputs]\nhs = { dims = ["h"], dtype = "float32" }\n',
}
SCALE = 0.5  # a larger score spread than 1/sqrt(16): the transforms' curvature shows


def spec_text(name: str) -> str:
    body, _ = TRANSFORMS[name]
    return f'name = "{name}"\nhead_dim = 16\n' + HEADER.get(name, "") + f"[score]\nscale = {SCALE}\n{body}\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("score_mod")
    paths = []
    for name in TRANSFORMS:
        path = out / f"{name}.toml"
        path.write_text(spec_text(name))
        paths.append(path)
    mods = {}
    for path, written in zip(paths, build(paths, out / "gen")):
        spec = importlib.util.spec_from_file_location(f"_attncc_score_mod_{path.stem}", written)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        mods[path.stem] = (load_spec(path), m, written.read_text())
    return mods


def extra_inputs(p, Hq, gen):
    return {d.name: (torch.rand(Hq, generator=gen) + 0.5) for d in p.inputs}  # head_scale[h], hs[h]


def check(p, m, *, B, Hq, Hkv, Nq, Nk, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_()
    g = torch.randn(B, Hq, Nq, D, generator=gen)
    kw = extra_inputs(p, Hq, gen)
    o, lse = m.attention(q, k, v, return_lse=True, **kw)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *ref_in, return_lse=True, **kw)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert rel_err(o.detach(), ref.detach()) < FWD_TOL, rel_err(o.detach(), ref.detach())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite].detach(), ref_lse[finite].detach()) < FWD_TOL
    for label, x, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(x).all(), f"d{label} has NaN/inf"
        assert rel_err(x, r) < GRAD_TOL, (label, rel_err(x, r))
    return o.detach(), lse.detach()


SHAPES = {"gqa": dict(Hq=4, Hkv=2, Nq=37, Nk=37), "mqa_cross": dict(Hq=4, Hkv=1, Nq=19, Nk=31)}


# by default each transform at one shape, the two in turn over the transforms; the other with -m slow
@pytest.mark.parametrize("name, shape", turns(sorted(TRANSFORMS), SHAPES))
def test_transform_forward_and_backward(built, name, shape):
    p, m, _ = built[name]
    check(p, m, B=2 if TRANSFORMS[name][1] else 1, **shape)


def test_softcap_mod_equals_builtin_softcap(built):
    """Same results, and the same kernels: ``30 * tanh(s / 30)`` renders as ``softcap = 30.0``."""
    (p1, m1, src1), (p2, m2, src2) = built["softcap_mod"], built["softcap_builtin"]
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 29, 16, generator=gen) for h in (4, 2, 2))
    o1, lse1 = m1.attention(q, k, v, return_lse=True)
    o2, lse2 = m2.attention(q, k, v, return_lse=True)
    assert torch.equal(o1, o2) and torch.equal(lse1, lse2)

    def kernels(src, name):  # everything from the first kernel on, the module's name left out
        return src[src.index("@triton.jit"):].replace(name, "NAME")

    assert kernels(src1, "softcap_mod") == kernels(src2, "softcap_builtin")
    ctx = [softmax_context(canonical_score(p), analyze(canonical_score(p)))["score_lines"] for p in (p1, p2)]
    assert ctx[0] == ctx[1] and any("_tanh" in line for line in ctx[0])
    assert "mod: 30*tanh(s/30)" in src1  # the header still shows the spec as written


def test_softcap_recognition_is_exact():
    assert softcap_of_mod(parse_spec('[score]\nmod = "7.5 * tanh(s / 7.5)"').mod) == 7.5
    assert softcap_of_mod(parse_spec('[score]\nmod = "30 * tanh(s / 20)"').mod) is None
    assert softcap_of_mod(parse_spec('[score]\nmod = "30 * tanh(s / 30) + 1"').mod) is None
    assert softcap_of_mod(parse_spec('[score]\nmod = "tanh(s)"').mod) is None


def test_relative_causal_mod_is_a_mask():
    p = parse_spec('[score]\nmod = "where(i >= j, s + (i - j), -inf)"')
    causal = parse_spec('[mask]\nwhere = "i >= j"\n[score]\nmod = "s + (i - j)"')
    assert p.mask == causal.mask and p.mod == causal.mod and p.mod_mask == p.mask
    plan, ref = analyze(p), analyze(causal)
    assert plan.iteration is Iteration.BANDS
    assert plan.forward.cover == ref.forward.cover and plan.transposed.cover == ref.transposed.cover
    # the causal band: a query block's keys end at its last row
    assert plan.forward.cover.lines() == ("band: -inf <= j <= x",)


def test_score_conditions_stay_in_the_mod():
    """Only the conjuncts of where(c, e, -inf) free of s become the mask; the rest is decided per
    pair on the score (was: folded into the mask, where kernels saw s in log2 units or no s)."""
    cases = {
        "where(s <= 0.5, s, -inf)": (None, "Piecewise((s, s <= 0.5), (-oo, True))"),
        "where(j <= i and s > 0, s, -inf)": ("i >= j", "Piecewise((s, s > 0), (-oo, True))"),
        "where(s <= 0.5, where(j <= i, s, -inf), -inf)": ("i >= j", "Piecewise((s, s <= 0.5), (-oo, True))"),
        "where(not (j > i or s > 1), s, -inf)": ("i >= j", "Piecewise((s, s <= 1), (-oo, True))"),
        "where(i >= j, s + (i - j), -inf)": ("i >= j", "s + (i - j)"),  # (i - j) as written
        "where(s > 0, -inf, s * 2)": (None, "Piecewise((-oo, s > 0), (2*s, True))"),
    }
    for mod, (mask, rest) in cases.items():
        p = parse_spec(f'[score]\nmod = "{mod}"')
        assert (None if p.mask is None else str(p.mask)) == mask and str(p.mod) == rest, (mod, p.mask, p.mod)
        assert p.mask is None or not p.mask.has(S.s)
    # a Pattern built with the score in its mask is refused at generation, not printed in log2 units
    bad = parse_spec('head_dim = 16\n[mask]\nwhere = "j <= i"').replace(mask=sympy.Le(S.s, 0))
    with pytest.raises(ValueError, match="depends on the score"):
        softmax_context(bad, analyze(bad.replace(mask=None)))


def _tile_functions(src):
    """The text of the per-tile functions the key (or query) loops call."""
    out = []
    for name in ("_fwd_tile", "_dq_tile", "_dkdv_tile", "_dec_tile"):
        start = src.index(f"def {name}(")
        out.append(src[start:src.index("@triton.jit", start)])
    return out


@pytest.mark.parametrize("name", ["sin_cos_tan_b", "cos_sin_tan_b", "combined"])
def test_terms_constant_along_j_leave_the_key_loop(built, name):
    p, _, src = built[name]
    for text in _tile_functions(src):
        assert "* 1.0" not in text and "tl.log(" not in text, text  # tan(b), log(i + 1): float(b), log
    ctx = softmax_context(p, analyze(p))
    assert "_sin((b * 1.0), FAST_MATH)" in ctx["lse_row_bias"]  # the LSE gets them back
    assert not any("_sin((b" in code for _, code in ctx["scalar_defs"])  # not even hoisted: gone
    lse_lines = [line for line in src.splitlines() if "lse + row_bias" in line]
    assert len(lse_lines) == 2  # forward and decode
    assert "lse2 = lse2 - " in src  # the backward's preprocessing takes them out again


def test_no_split_under_a_softcap():
    """tanh after the transform does not commute with a shift: the term stays in the loop."""
    p = parse_spec('head_dim = 16\n[score]\nmod = "s + tan(b)"\nsoftcap = 5.0')
    ctx = softmax_context(p, analyze(p))
    assert ctx["lse_row_bias"] is None
    assert any("_sin((b * 1.0), FAST_MATH)" in c for _, c in ctx["scalar_defs"])


def test_key_independent_subexpressions_are_hoisted():
    p = parse_spec('head_dim = 16\n[params]\nheads = 4\n[inputs]\nhs = { dims = ["h"], dtype = "float32" }\n'
                   '[score]\nmod = "s * hs[h] * exp2(-(h + 1) * 8 / heads) + s * log(i + 2) + (j - i) * sqrt(b + 1)"')
    ctx = softmax_context(p, analyze(p))
    scalars = dict(ctx["scalar_defs"])
    rows = dict(ctx["row_defs"])
    assert any("ptr_hs" in c for c in scalars.values())  # the gather, once per program
    assert any("tl.exp2(" in c for c in scalars.values())  # the slope, once per program
    assert any("tl.sqrt(" in c for c in scalars.values())  # of b only
    assert any("tl.log(" in c for c in rows.values())  # of i: once per query row
    mod_line = [line for line in ctx["score_lines"] if line.startswith("s = ") and "sm_scale" not in line
                and "log2" not in line]
    assert mod_line and not any(f in mod_line[0] for f in ("tl.exp2", "tl.log", "tl.sqrt", "tl.load"))


def test_decode_drops_row_terms_too(built):
    """decode(): rows against a full cache equal the last rows of attention()."""
    p, m, _ = built["sin_cos_tan_b"]
    gen = torch.Generator().manual_seed(9)
    B, N, Nq = 2, 33, 3
    q = torch.randn(B, 4, Nq, 16, generator=gen)
    k, v = (torch.randn(B, 2, N, 16, generator=gen) for _ in range(2))
    o, lse = m.decode(q, k, v, kv_len=torch.full((B,), N, dtype=torch.int32), return_lse=True)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, q_offset=N - Nq)
    assert rel_err(o, ref) < FWD_TOL and rel_err(lse, ref_lse) < FWD_TOL


@pytest.mark.parametrize("name", ["score_cond_nested", "score_cond_softcap"])
def test_decode_with_score_conditions(built, name):
    """decode() decides score conditions per pair as attention() does."""
    p, m, _ = built[name]
    gen = torch.Generator().manual_seed(4)
    N, Nq = 37, 3
    q = torch.randn(1, 4, Nq, 16, generator=gen)
    k, v = (torch.randn(1, 2, N, 16, generator=gen) for _ in range(2))
    o, lse = m.decode(q, k, v, kv_len=torch.tensor([N], dtype=torch.int32), return_lse=True)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, q_offset=N - Nq)
    assert rel_err(o, ref) < FWD_TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], ref_lse[finite]) < FWD_TOL


@pytest.mark.parametrize("name", ["squared", "sin_cos_tan_b", "piecewise"])
def test_reference_derivative_gradcheck(name):
    """The reference's own derivative of the transform, against finite differences (float64)."""
    p = parse_spec(spec_text(name), f"{name}.toml")
    gen = torch.Generator().manual_seed(2)
    # head dim 4 (gradcheck's cost is one forward per input element: 160 of them, not 640 at 16),
    # q doubled: the scores spread as at head dim 16 (std 2)
    q, k, v = (torch.randn(2, h, 5, 4, generator=gen, dtype=torch.float64) * c for h, c in ((2, 2), (1, 1), (1, 1)))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kw = {d.name: torch.rand(2, generator=gen, dtype=torch.float64) + 0.5 for d in p.inputs}
    fn = lambda q, k, v: attncc.reference(p, q, k, v, return_lse=True, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_explain_lists_mask_dropped_and_hoisted(built, tmp_path, capsys):
    from attncc.explain import main_explain

    path = tmp_path / "combined.toml"
    path.write_text(spec_text("combined"))
    assert main_explain([str(path), "--n", "64", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)["score"]
    assert score["mask_from_mod"] == "i >= j"
    assert sorted(score["dropped"]) == sorted(["tan(b)", "hs[h]*log(i + 1)"])
    assert "hs[h]" in [e.split(" = ")[1] for e in score["hoisted_per_program"]]
    assert "2**(-h)" in [e.split(" = ")[1] for e in score["hoisted_per_program"]]
    assert "tan" not in score["loop_mod"] and "log" not in score["loop_mod"]
    assert score["derivative"] and "cos(cos(s))" in score["derivative"]
    assert main_explain([str(path), "--n", "64"]) == 0
    text = capsys.readouterr().out
    for want in ("  score       scale = 0.5", "    mod       ", "became the mask", "dropped   tan(b)", "once per program",
                 "d/ds"):
        assert want in text, text
    cap = tmp_path / "cap.toml"
    cap.write_text(spec_text("softcap_mod"))
    assert main_explain([str(cap), "--n", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["softcap_from_mod"] == 30.0
    plain = tmp_path / "plain.toml"
    plain.write_text('[mask]\nwhere = "causal"\n')
    assert main_explain([str(plain), "--n", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"]["mod"] is None


def test_explain_cli_subprocess(tmp_path):
    path = tmp_path / "alibi_mod.toml"
    path.write_text(spec_text("alibi_mod"))
    out = subprocess.run([sys.executable, "-m", "attncc.cli", "explain", str(path), "--n", "32", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    score = json.loads(out)["score"]
    assert any("exp2" in e or "2**" in e for e in score["hoisted_per_program"]), score


# Params named like the values the code generator hoists out of the key loop (scalars c<n>,
# query-row vectors row<n>, key-column vectors col<n>): each name keeps meaning the param.
HOIST_NAMES = '''name = "{name}"
head_dim = 16
[params]
c0 = 0.13
c1 = 2
row0 = 0.25
col0 = 0.5
[mask]
where = "j <= i + c1"
[score]
bias = "c0 * i + row0 * sin(0.1 * i) + col0 * cos(0.1 * j) + 0.01 * (row0 + col0) * j + (b + 2) * (i - j) * 0.01"
mod = "score * (1 + 0.1 * b)"
'''


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_params_named_like_hoisted_values(tmp_path, shape):
    path = tmp_path / "hoist_names.toml"
    path.write_text(HOIST_NAMES.format(name="hoist_names"))
    (written,) = build([path], tmp_path / "gen")
    spec = importlib.util.spec_from_file_location(f"_attncc_score_mod_hoist_{shape}", written)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    check(load_spec(path), m, B=2, **SHAPES[shape])
    # the decode kernel hoists the same way: its last rows against the reference
    gen = torch.Generator().manual_seed(1)
    Hq, Hkv, N = SHAPES[shape]["Hq"], SHAPES[shape]["Hkv"], 40
    q, k, v = (torch.randn(2, h, N, 16, generator=gen) for h in (Hq, Hkv, Hkv))
    last = m.decode(q[:, :, -3:], k, v, kv_len=torch.tensor([N, N], dtype=torch.int32))
    assert rel_err(last, attncc.reference(load_spec(path), q, k, v)[:, :, -3:]) < FWD_TOL
