"""The Gluon sm90 forward wired into the generated modules (issue 20 item 2), checked without a GPU.

- Which specs may hand their forward to the Gluon kernels is a fact of the analysis
  (attncc.analysis.builtin): the shipped specs' answers are written here; spellings of ``j <= i``
  the analysis normalizes are causal, near misses are not; and for seeded random specs (the fuzz
  generator's, and causal look-alikes) an eligible Plan is one whose reference output equals plain
  dense or causal softmax attention at several offsets and lengths (a brute force that knows
  nothing of the analysis). The generated modules carry the answer (``SpecInfo.gluon`` and the
  first branch of ``_forward``) for exactly those specs.
- ``ATTNCC_BACKEND``: its values, and the ``ValueError`` of a forced call the Gluon forward
  cannot run, reason by reason (a CPU tensor stands in for an sm90 GPU where a test says so).
- The host launch path to the kernel, without a GPU: the kernel's ``run`` is stubbed (it records
  the launch and writes the exact answer into the output buffers), so ``attention`` runs
  ``gluon_forward`` and then the backward under the interpreter: the ``tl`` one, or the Gluon one
  (``gluon_backward``) with its two kernels emulated in torch (tests/gluon_emulation.py) and its
  ``tl`` preprocess interpreted; the recorded arguments must bind to the kernel's signature, name
  by name, with the call's values; and the recorded launches (forward; backward: preprocess, dK/dV,
  dQ) compile for sm90 (in a child process, as tests/test_gluon_compile.py compiles).
- The backward's own selection (``gluon_backward_selected``): ``triton`` and ``auto`` (switch off)
  keep the ``tl`` backward, ``gluon`` takes the Gluon one where it can and the ``tl`` one at head
  dim 256, without refusing.

Gluon has no interpreter: tests/gpu/test_gpu_gluon_specs.py runs the wired path on an H100/H200.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
import attncc.runtime as rt  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.analysis.builtin import BUILTIN_WALKS, builtin_fit, gluon_fit  # noqa: E402
from attncc.analysis.score import canonical_score  # noqa: E402
from attncc.runtime import backend, call as call_mod, compiled  # noqa: E402
from attncc.runtime.gluon import bwd, bwd_fused, bwd_ws, fwd_pipelined, fwd_ws, launch, walks  # noqa: E402
from attncc.spec import SpecError, load_spec, parse_spec  # noqa: E402
from cases import SPEC_NAMES, module  # noqa: E402
from early_child import EarlyChild  # noqa: E402
from gluon_emulation import EmulatedKernel  # noqa: E402
from gluon_host import write_lse  # noqa: E402
from kernel_compile import without_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOG2E = 1.4426950408889634

# The shipped specs the Gluon forward computes; every other softmax spec is tl only.
ELIGIBLE = {"dense": "dense", "causal": "causal", "gqa": "causal", "mqa": "causal"}
# a few that must not be, each for its own reason (the test below checks all of them anyway)
NOT_ELIGIBLE = ("sliding_window", "softcap", "alibi", "rope_causal", "causal_dropout", "prefix_lm", "document",
                "cross_causal", "t5_bias", "padding", "chunked_local", "sink_window")


def fit_of(pattern):
    return builtin_fit(analyze(canonical_score(pattern))).walk


def mask_pattern(mask=None, score=None, extra=""):
    lines = ['name = "x"', extra]
    if mask is not None:
        lines += ["[mask]", f"where = {mask!r}".replace("'", '"')]
    if score is not None:
        lines += ["[score]", score]
    return parse_spec("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# (a) which Plans are a built-in walk


def test_builtin_walks_are_the_kernels_walks():
    assert set(BUILTIN_WALKS) == set(walks.PATTERNS)


@pytest.mark.parametrize("name", [n for n in SPEC_NAMES])
def test_shipped_specs(name):
    pattern = load_spec(ROOT / "specs" / f"{name}.toml")
    if pattern.kind != "softmax":
        assert builtin_fit(analyze(pattern)).walk is None
        return
    assert fit_of(pattern) == ELIGIBLE.get(name), name
    if name in NOT_ELIGIBLE:
        assert builtin_fit(analyze(canonical_score(pattern))).reason


def _forward_branch(tree):
    """The walk of the Gluon branch that opens ``_forward`` (None: no branch)."""
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_forward")
    first = fn.body[0]
    if not (isinstance(first, ast.If) and "gluon_selected" in ast.unparse(first.test)):
        return None
    (ret,) = first.body
    assert ast.unparse(ret.value).startswith("_rt.gluon_forward(call, ")
    return ret.value.args[1].value


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_generated_modules_carry_the_answer(name):
    """SpecInfo.gluon and the first branch of _forward and _backward: the built-in walk of the eligible
    specs, "rendered" for those with rendered fragments (tests/test_gluon_rendered.py), and for the
    other softmax specs no branch and the reason in SpecInfo.gluon_reason. The rendered specs with a
    block-list walk, [inputs] or RoPE (tests/test_gluon_lists.py) have no Gluon branch in _backward."""
    from test_gluon_rendered import RENDERED, RENDERED_LISTS

    text = (ROOT / "generated" / f"{name}.py").read_text()
    tree = ast.parse(text)
    spec = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "SPEC")
    fields = {kw.arg: kw.value for kw in spec.keywords}
    want = ELIGIBLE.get(name) or ("rendered" if name in RENDERED + RENDERED_LISTS else None)
    assert (fields["gluon"].value if "gluon" in fields else None) == want
    softmax = load_spec(ROOT / "specs" / f"{name}.toml").kind == "softmax"
    if softmax:
        assert _forward_branch(tree) == want
        # rendered fragments: with the query-block walk (the closed-form ones without [inputs] or RoPE)
        assert _backward_branch(tree) == (None if name in RENDERED_LISTS else want)
    assert ("gluon_reason" in fields) == (softmax and want is None)
    assert ("gluon" in text) == softmax


def _backward_branch(tree):
    """The walk of the Gluon branch that opens ``_backward`` (None: no branch)."""
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_backward")
    first = next(n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)))
    if not (isinstance(first, ast.If) and "gluon_backward_selected" in ast.unparse(first.test)):
        return None
    (ret,) = first.body
    # raw=True: the score has no row terms (test_gluon_rendered.test_row_terms_keep_the_natural_lse_...)
    assert ast.unparse(ret.value) in (f"_rt.gluon_backward(call, {ret.value.args[1].value!r}, o, lse, do, dlse{raw})"
                                      for raw in ("", ", raw=True"))
    return ret.value.args[1].value


def test_registered_forward_is_the_one_with_the_branch():
    """torch.compile's custom op and attncc.distributed run the module's own _forward."""
    mod = module("causal")
    assert compiled.launchers(mod.SPEC)[0] is mod._forward
    assert mod.SPEC.gluon == "causal"


@pytest.mark.parametrize("mask", ["causal", "j <= i", "j <= i + 0", "not (j > i)", "j - i <= 0", "i >= j",
                                  "j < i + 1", "2*j <= 2*i", "(j <= i) and (i >= 0)", "j <= i or j < 0"])
def test_spellings_of_causal(mask):
    assert fit_of(mask_pattern(mask)) == "causal"
    assert brute_walk(mask_pattern(mask)) == "causal"


@pytest.mark.parametrize("mask", ["j >= 0", "j <= i or j > i", "i >= 0 or j < 0"])
def test_spellings_of_dense(mask):
    assert fit_of(mask_pattern(mask)) == "dense"


@pytest.mark.parametrize("mask, score, extra", [
    ("j < i", None, ""), ("j <= i + 1", None, ""), ("j <= i - 1", None, ""), ("j >= i", None, ""),
    ("j - n_k <= i - n_q", None, ""), ("j <= i and i - j < 8", None, ""), ("j <= i or j < 4", None, ""),
    ("j <= i and j < n_k - 1", None, ""), ("j <= i and b == 0", None, ""), ("j <= i and h < 1", None, ""),
    ("j <= i and i < n_q - 1", None, ""), ("j <= i + w", None, "[params]\nw = 0"),
    ("j <= i", "bias = '0.5 * (j - i)'", ""), ("j <= i", "softcap = 30.0", ""), ("j <= i", "mod = 's * 2'", ""),
    ("j <= i", "mod = '30.0 * tanh(s / 30.0)'", ""), ("j <= i", "dropout = 0.1", ""),
    (None, "bias = 'alibi'", ""),
    ("j <= i", None, "[rope]\ntheta = 10000.0"), ("j <= i", None, "value_dim = 64"),
    ("j <= i", "bias = 'x[j]'", "[inputs]\nx = { dims = ['n'], dtype = 'float32' }"),
])
def test_near_misses(mask, score, extra):
    pattern = mask_pattern(mask, score.replace("'", '"') if score else None, extra.replace("'", '"'))
    assert fit_of(pattern) is None


# Calls of the brute force: (q_offset, k_offset, Nq, Nk, n_q, n_k), dense and causal differing in each
# but the first few; offsets on both sides, n_q / n_k other than the defaults.
# (q_offset, k_offset, Nq, Nk, n_q, n_k); n_q, n_k at or past the rows' ends (shorter ones are refused)
BRUTE_CALLS = ((0, 0, 7, 7, None, None), (5, 0, 6, 13, None, None), (0, 4, 9, 5, None, None),
               (3, 2, 6, 6, 23, 11), (0, 0, 5, 8, 7, 31), (9, 12, 4, 6, 40, 20))


def brute_walk(pattern, seed=0):
    """"dense" / "causal" when the reference output (O and LSE) of ``pattern`` equals plain
    softmax attention with that mask on positions at every call of BRUTE_CALLS, else None.
    Anything the reference refuses without extra arguments (inputs) counts as neither."""
    gen = torch.Generator().manual_seed(seed)
    hq = pattern.heads_q or 2
    hkv = pattern.heads_kv or (1 if hq % 2 else 2)
    d = 16
    dv = pattern.value_dim or d
    found = {"dense", "causal"}
    for q_off, k_off, nq, nk, n_q, n_k in BRUTE_CALLS:
        q = torch.randn(2, hq, nq, d, generator=gen, dtype=torch.float64)
        k = torch.randn(2, hkv, nk, d, generator=gen, dtype=torch.float64)
        v = torch.randn(2, hkv, nk, dv, generator=gen, dtype=torch.float64)
        extra = {}
        if pattern.dropout:
            extra["keep_mask"] = torch.rand(2, hq, nq, nk, generator=gen) > 0.3
        try:
            o, lse = attncc.reference(pattern, q, k, v, return_lse=True, q_offset=q_off, k_offset=k_off, n_q=n_q,
                                      n_k=n_k, **extra)
        except (TypeError, ValueError):
            return None
        scale = pattern.scale if pattern.scale is not None else d ** -0.5
        s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(hq // hkv, 1)) * scale
        vv = v.repeat_interleave(hq // hkv, 1)
        i = (q_off + torch.arange(nq))[:, None]
        j = (k_off + torch.arange(nk))[None, :]
        for walk, allowed in (("dense", torch.ones(nq, nk, dtype=torch.bool)), ("causal", j <= i)):
            if walk not in found:
                continue
            t = s.masked_fill(~allowed, -math.inf)
            ref_lse = torch.logsumexp(t, -1)
            p = torch.exp(t - torch.where(torch.isinf(ref_lse), 0.0, ref_lse)[..., None])
            ref_o = p @ vv if dv == d else None
            same = ref_o is not None and torch.allclose(o, ref_o, atol=1e-9) and torch.equal(
                torch.isinf(lse), torch.isinf(ref_lse)) and torch.allclose(lse[~torch.isinf(lse)],
                                                                           ref_lse[~torch.isinf(ref_lse)], atol=1e-9)
            if not same:
                found.discard(walk)
        if not found:
            return None
    return "causal" if found == {"causal"} else "dense" if found == {"dense"} else None


def lookalike(rng: random.Random):
    """A random mask near ``j <= i``: affine spellings, offsets of -1..1, tautologies and near
    misses joined by and / or, n_q / n_k terms (equal to causal only when n_q = n_k)."""
    c = rng.choice([-1, 0, 0, 1])
    a = rng.choice([1, 1, 2, 3])
    base = rng.choice([f"{a}*j + {max(c, 0)} <= {a}*i + {max(-c, 0)}", f"not (j > i + {c})", f"j - i <= {c}",
                       f"i - j >= {c}", f"j < i + {c + 1}", "j - n_k <= i - n_q", "j + n_q <= i + n_k",
                       f"{a}*(j - i) < {a}", "j <= i", "j >= i"])
    for _ in range(rng.choice([0, 0, 1, 2])):
        other = rng.choice(["j >= 0", "i >= 0", f"j <= i + {rng.randint(0, 3)}", f"j < {rng.randint(1, 20)}",
                            "i < n_q", "j < n_k", f"i - j < {rng.randint(1, 9)}", "b >= 0", "h == 0", "j > i",
                            f"i >= {rng.randint(0, 6)}", "j < 0"])
        base = f"({base}) {rng.choice(['and', 'or'])} ({other})"
    return base


def test_random_specs_are_eligible_only_when_the_brute_force_says_so():
    """Seeded: look-alike masks (some with a score term) and the fuzz generator's specs. A Plan
    called dense or causal must be that, by brute force; the look-alikes the analysis normalizes
    to ``j <= i`` (the spellings above) must also be found, and some must not."""
    from fuzz_specs import random_spec

    rng = random.Random(20)
    seen = {"dense": 0, "causal": 0, None: 0}
    for n in range(70):
        if n < 45:
            score = rng.choice([None] * 6 + ["bias = \"0.25 * (j - i)\"", "softcap = 5.0", "mod = \"s * 0.5\""])
            try:
                pattern = mask_pattern(lookalike(rng), score)
            except SpecError:
                continue
        else:
            text, _ = random_spec(rng)
            pattern = parse_spec("name = \"r\"\n" + text)
            if pattern.kind != "softmax":
                continue
        walk = fit_of(pattern)
        seen[walk] += 1
        if walk is not None:
            assert brute_walk(pattern, seed=n) == walk, (pattern.mask, pattern.bias, pattern.mod, pattern.softcap)
    assert seen["causal"] >= 5 and seen[None] >= 20, seen


# ------------------------------------------------------------------------------------------------
# (b) ATTNCC_BACKEND and the refusals of a forced call


@pytest.fixture
def fresh_bind(monkeypatch):
    """A signature cache of bind() of this test's own: what the memo holds (the Gluon
    eligibility) depends on this test's stand-ins for an sm90 GPU."""
    monkeypatch.setattr(call_mod, "_BOUND", {})


@pytest.fixture
def fake_sm90(monkeypatch, fresh_bind):
    """CPU tensors count as tensors on an sm90 GPU, outside the interpreter, for the backend."""
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)


def bind(name="causal", B=1, Hq=2, Hkv=1, Nq=8, Nk=8, D=64, Dv=None, dtype=torch.bfloat16, seed=0, grad=False,
         **kw):
    mod = module(name)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Hkv, Nk, Dv or D, generator=gen).to(dtype).requires_grad_(grad)
    return mod, q, k, v, mod.attention, lambda: rt.bind(mod.SPEC, q, k, v, **kw)


@pytest.mark.parametrize("value, want", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("triton", "triton"),
                                         ("gluon", "gluon")])
def test_backend_values(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("ATTNCC_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ATTNCC_BACKEND", value)
    assert backend.backend_setting() == want


@pytest.mark.parametrize("value", ["tl", "Gluon", "cuda", " gluon", "1"])
def test_backend_other_values_are_refused(monkeypatch, fresh_bind, value):
    monkeypatch.setenv("ATTNCC_BACKEND", value)
    with pytest.raises(ValueError, match="ATTNCC_BACKEND must be one of auto, triton, gluon"):
        backend.backend_setting()
    for name in ("causal", "strided"):  # with and without the Gluon branch
        _, q, k, v, attention, _ = bind(name, D=16, dtype=torch.float32)
        with pytest.raises(ValueError, match="ATTNCC_BACKEND must be one of"):
            attention(q, k, v)


@pytest.mark.parametrize("name", sorted(SPEC_NAMES))
@pytest.mark.parametrize("D", [64, 128])
def test_auto_picks_gluon_where_the_plan_and_head_dim_say(monkeypatch, fake_sm90, name, D):
    """auto (unset too) takes the Gluon forward exactly where the spec's Plan has it picked
    (GluonFit.auto: not over block lists or several key segments, where it was measured slower) at
    head dims 128 and 256, for calls it can run; triton never; the switch off: never."""
    mod = module(name)
    if mod.SPEC.kind != "softmax" or D not in mod.SPEC.head_dims:
        pytest.skip("a linear spec, or a head dim the spec does not take")
    fit = gluon_fit(analyze(canonical_score(mod_pattern(name))))
    assert mod.SPEC.gluon_auto is fit.auto  # the module carries the analysis' choice
    assert fit.auto == (fit.kind in ("dense", "causal") or (
        fit.kind == "rendered" and name not in ("sink_window", "longformer", "bigbird", "dilated", "strided",
                                                "neighborhood_2d", "document", "padding", "alibi_learned",
                                                "t5_bias")))
    if mod.SPEC.inputs or name == "causal_dropout":
        return  # calls need their inputs (or dropout, which Gluon lacks): the choice above is what matters
    make = bind(name, D=D, Hq=mod.SPEC.heads_q or 2, Hkv=mod.SPEC.heads_kv or 1)[-1]
    call = make()
    pairs = call.B * call.Hq * call.Nq * call.Nk
    # by size: from AUTO_MIN_PAIRS pairs on (smaller calls are host-bound: tl launches faster)
    monkeypatch.setattr(backend.gluon, "AUTO_MIN_PAIRS", pairs + 1)
    assert backend.gluon_selected(make()) is False
    monkeypatch.setattr(backend.gluon, "AUTO_MIN_PAIRS", pairs)
    for value in ("auto", None):
        if value is None:
            monkeypatch.delenv("ATTNCC_BACKEND", raising=False)
        else:
            monkeypatch.setenv("ATTNCC_BACKEND", value)
        assert backend.gluon_selected(make()) is (fit.auto and D in (128, 256))
    assert backend.gluon_selected(bind(name, D=D, dtype=torch.float32, Hq=mod.SPEC.heads_q or 2,
                                       Hkv=mod.SPEC.heads_kv or 1)[-1]()) is False  # no error: tl runs it
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    assert backend.gluon_selected(make()) is False
    monkeypatch.delenv("ATTNCC_BACKEND", raising=False)
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", False)
    assert backend.gluon_selected(make()) is False


@pytest.mark.parametrize("case, match", [
    (dict(dtype=torch.float32), "q, k, v are float32; the Gluon kernels take bfloat16 or float16"),
    (dict(D=32), "head dim D = 32; the Gluon kernels take 64, 128, 256"),
    (dict(D=96, dtype=torch.float16), "head dim D = 96"),
    (dict(Dv=128), "Dv = 128 differs from D = 64"),
    (dict(q_offset=2**31), "past the int32 arithmetic"),
    (dict(Nq=8, Nk=8, cu_seqlens_q=torch.tensor([0, 3, 8]), cu_seqlens_k=torch.tensor([0, 3, 8])), "cu_seqlens"),
])
def test_forced_gluon_refuses_what_it_cannot_run(monkeypatch, fake_sm90, case, match):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    call = bind(**case)[-1]()
    with pytest.raises(ValueError, match="causal.attention: ATTNCC_BACKEND=gluon, but") as e:
        backend.gluon_selected(call)
    assert match in str(e.value)


def test_forced_gluon_refuses_dropout(monkeypatch, fake_sm90):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    call = bind()[-1]()
    assert backend.gluon_selected(call) is True
    with pytest.raises(ValueError, match=r"dropout \(p = 0.1\)"):
        backend.gluon_selected(call.replace(dropout_p=0.1))


def test_forced_gluon_refuses_the_cpu_and_the_interpreter(monkeypatch, fresh_bind):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    _, q, k, v, attention, make = bind()
    with pytest.raises(ValueError) as e:
        attention(q, k, v)  # through the module: its _forward's first branch
    assert "q is on cpu, not a CUDA GPU" in str(e.value) and "TRITON_INTERPRET=1" in str(e.value)
    assert "pattern" not in str(e.value)  # causal is eligible: only the call is not


@pytest.mark.parametrize("name", ["causal_dropout"])
def test_forced_gluon_refuses_specs_without_the_gluon_forward(monkeypatch, fake_sm90, name):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    _, q, k, v, attention, _ = bind(name)
    with pytest.raises(ValueError, match=rf"{name}'s pattern is not one the Gluon kernels compute: .*attncc explain "
                                         rf"specs/{name}.toml"):
        attention(q, k, v)
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    with torch.no_grad():
        attention(q[:, :, :4].float()[..., :16], k[:, :, :4].float()[..., :16], v[:, :, :4].float()[..., :16])


def test_eligibility_is_worked_out_once_per_signature(monkeypatch, fake_sm90):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    made = []
    real = backend._signature_problems
    monkeypatch.setattr(backend, "_signature_problems", lambda call: made.append(call) or real(call))
    make = bind()[-1]
    for _ in range(3):
        assert backend.gluon_selected(make()) is True
    assert len(made) == 1
    backend.gluon_selected(bind(Nq=16)[-1]())  # another signature
    assert len(made) == 2


def test_backward_is_selected_on_its_own(monkeypatch, fake_sm90):
    """triton and auto (its switch off) keep the tl backward; gluon takes the Gluon one where it can
    run the call, the tl one at head dim 256 (no error: the forward ran on Gluon); auto follows
    AUTO_SELECTS_GLUON_BACKWARD alone."""
    assert backend.gluon.AUTO_SELECTS_GLUON_BACKWARD is False  # docs/gluon.md: measured no faster than tl
    make = bind()[-1]
    for value in ("triton", "auto"):
        monkeypatch.setenv("ATTNCC_BACKEND", value)
        assert backend.gluon_backward_selected(make()) is False
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON_BACKWARD", True)
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", False)  # the backward's switch alone decides
    assert backend.gluon_backward_selected(make()) is True
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", True)
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON_BACKWARD", False)
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    assert backend.gluon_backward_selected(make()) is True
    wide = bind(D=256)[-1]()
    assert backend.gluon_selected(wide) is True and backend.gluon_backward_selected(wide) is False
    assert backend.gluon_backward_problems(wide) == ("head dim D = 256; the Gluon backward takes 64, 128",)
    for case in (dict(dtype=torch.float32), dict(D=32), dict(q_offset=2**31)):
        call = bind(**case)[-1]()
        assert backend.gluon_backward_selected(call) is False  # never raises
        assert backend.gluon_backward_problems(call) == backend.gluon_problems(call)
    assert backend.gluon_backward_selected(make().replace(dropout_p=0.1)) is False


def test_auto_backward_follows_the_plan(monkeypatch, fake_sm90):
    """auto takes the Gluon backward where the spec's Plan picks it (GluonFit.backward_auto: the
    built-in walks and single-segment rendered ones, not sink + window's two segments), at head dims 64
    and 128 and calls of at least AUTO_MIN_PAIRS pairs, and the tl one elsewhere; triton never takes it."""
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    monkeypatch.setattr(backend.gluon, "AUTO_MIN_PAIRS", 2 * 64 * 64)
    names = ("chunked_local", "block_diagonal", "sliding_window", "causal", "prefix_lm", "softcap", "sink_window")
    picks = {name: backend.gluon_backward_selected(bind(name, Nq=64, Nk=64, D=128)[-1]()) for name in names}
    assert picks == {name: name != "sink_window" for name in names}
    assert picks == {name: module(name).SPEC.gluon_backward_auto for name in names}
    assert backend.gluon_backward_selected(bind("chunked_local", Nq=64, Nk=64, D=64)[-1]()) is True
    assert backend.gluon_backward_selected(bind("causal", Nq=64, Nk=64, D=256)[-1]()) is False  # no D = 256 backward
    assert backend.gluon_backward_selected(bind("chunked_local", Nq=32, Nk=64, D=128)[-1]()) is False  # pairs
    monkeypatch.setenv("ATTNCC_BACKEND", "triton")
    assert backend.gluon_backward_selected(bind("chunked_local", Nq=64, Nk=64, D=128)[-1]()) is False


def test_backward_tiles_setting_is_checked(monkeypatch, fake_sm90):
    """ATTNCC_GLUON_BWD_TILES (the benchmarks' knob) forces the split kernels' tiles; a misspelt field
    raises naming the variable (it ran the tl backward under the knob's label before), tiles the
    kernels cannot take leave the Gluon backward out, saying why."""
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    monkeypatch.setenv("ATTNCC_GLUON_BWD", "split")
    monkeypatch.setattr(backend.gluon, "AUTO_MIN_PAIRS", 2 * 64 * 64)
    monkeypatch.setenv("ATTNCC_GLUON_BWD_TILES", "kv_block_n=128,q_stages=3")
    assert backend.gluon_bwd_config(128) == dataclasses.replace(
        launch.default_bwd_config(128), kv_block_n=128, q_stages=3)
    assert backend.gluon_backward_selected(bind("causal", Nq=64, Nk=64, D=128)[-1]()) is True
    monkeypatch.setenv("ATTNCC_GLUON_BWD_TILES", "kv_blok_n=64")
    with pytest.raises(ValueError, match="ATTNCC_GLUON_BWD_TILES: unknown field 'kv_blok_n'"):
        backend.gluon_backward_selected(bind("causal", Nq=64, Nk=64, D=128)[-1]())
    monkeypatch.setenv("ATTNCC_GLUON_BWD_TILES", "q_block_n=256")
    assert any("shared memory" in p for p in backend.gluon_backward_problems(bind("causal", Nq=64, Nk=64,
                                                                                   D=128)[-1]()))


def test_backward_on_the_cpu_and_the_interpreter_is_tl(monkeypatch, fresh_bind):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    call = bind()[-1]()
    assert backend.gluon_backward_selected(call) is False
    assert any("TRITON_INTERPRET" in p for p in backend.gluon_backward_problems(call))


def test_explain_names_forward_and_backward(monkeypatch):
    from attncc.report import backend_text

    plan = analyze(canonical_score(mod_pattern("causal")))
    text = lambda d=128: backend_text(plan, head_dim=d, value_dim=d, dtype="bf16")  # noqa: E731
    assert text(64) == ("Gluon sm90 backward (built-in causal walk) on sm90 for calls of at least 2**28 (batch x "
                        "heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton; the forward tl "
                        "(auto keeps tl at head dim 64: it picks Gluon at 128, 256); both Gluon with ATTNCC_BACKEND=gluon")
    sink = backend_text(analyze(canonical_score(mod_pattern("sink_window"))), head_dim=128, value_dim=128, dtype="bf16")
    assert sink.startswith("tl; Gluon sm90 forward and backward") and "(auto keeps tl: 2 key segments" in sink
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", False)
    assert text().startswith("Gluon sm90 backward (built-in causal walk) on sm90") and text().endswith(
        "; both Gluon with ATTNCC_BACKEND=gluon")  # (no why: the switch is off)
    assert text(256) == ("tl; Gluon sm90 forward (built-in causal walk) with ATTNCC_BACKEND=gluon; the backward tl "
                         "(the Gluon backward takes head dims 64, 128)")
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", True)
    assert text() == ("Gluon sm90 forward and backward (built-in causal walk) on sm90 for calls of at least 2**28 "
                      "(batch x heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton")
    sliding = analyze(canonical_score(mod_pattern("sliding_window")))
    monkeypatch.setattr(backend.gluon, "AUTO_BWD_HEAD_DIMS", ())  # the Plan's pick alone, at no head dim
    assert text().startswith("Gluon sm90 forward (built-in causal walk) on sm90") and "both Gluon with" in text()
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON_BACKWARD", True)
    assert text() == ("Gluon sm90 forward and backward (built-in causal walk) on sm90 for calls of at least 2**28 "
                      "(batch x heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton")
    monkeypatch.undo()
    chunks = analyze(canonical_score(mod_pattern("chunked_local")))
    assert backend_text(chunks, head_dim=128, value_dim=128, dtype="bf16").startswith(
        "Gluon sm90 forward and backward (its rendered walks, mask and score) on sm90 for calls of at least")
    assert backend_text(chunks, head_dim=64, value_dim=64, dtype="bf16").startswith("Gluon sm90 backward (its rendered")
    assert backend_text(sliding, head_dim=128, value_dim=128, dtype="bf16").startswith("Gluon sm90 forward and backward")
    assert text(32).startswith("tl only for this call: head dim 32")


# ------------------------------------------------------------------------------------------------
# (c) the host launch path, up to the kernel


class StubKernel:
    """Stands in for a @gluon.jit kernel's ``run``: records each launch and writes what the kernel
    computes (float64 attention with its walk's mask over the descriptors' tensors) into the O
    descriptor's tensor and the LSE buffer, so that what the host returns can be checked."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __call__(self, *args, grid, warmup, **kwargs):
        self.launches.append((args, kwargs, grid))
        bound = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                                  if k in self.kernel.arg_names})
        a = bound.arguments
        q, k, v, o = (a[n].base for n in ("q_desc", "k_desc", "v_desc", "o_desc"))
        group = a["GROUP"]
        i = a["q_offset"] + torch.arange(q.shape[2])[:, None]
        j = a["k_offset"] + torch.arange(k.shape[2])[None, :]
        allowed = torch.ones_like(i == j) if a["MASK"] is None else j <= i
        s = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * (a["qk_scale"] / LOG2E)
        s = s.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        o.copy_((p @ v.double().repeat_interleave(group, 1)).to(o.dtype))
        write_lse(a, lse)


@pytest.fixture
def stubbed(monkeypatch, fake_sm90):
    """No GPU: the device checks pass for CPU tensors, the ws / pipelined kernels record their launches."""
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132, name="stub H100"))
    stubs = {}
    for kernel in (fwd_ws.attn_fwd_ws, fwd_pipelined.attn_fwd_pipelined):
        stubs[kernel.fn.__name__] = StubKernel(kernel)
        monkeypatch.setattr(kernel, "run", stubs[kernel.fn.__name__])
    return stubs


FLOAT_ARGS = ("qk_scale", "sm_scale")


def check_arguments(kernel, args, kwargs, *, call_values):
    """The recorded launch binds to the kernel's parameters, every constexpr given by name and
    only the launch options besides; ``call_values``: parameters whose values are known."""
    params = {p.name: p for p in kernel.params}
    given = {k: v for k, v in kwargs.items() if k in params}
    options = set(kwargs) - set(params)
    assert options <= {"num_warps", "maxnreg", "num_stages"}, options
    bound = inspect.signature(kernel.fn).bind(*args, **given).arguments  # raises on a missing or extra one
    assert set(bound) == set(params)
    assert len(args) == sum(not p.is_constexpr for p in kernel.params), "runtime arguments are positional"
    assert all(p.is_constexpr for p in kernel.params[len(args):])
    for name, value in call_values.items():
        assert bound[name] == value, (name, bound[name], value)
    for name, p in params.items():
        value = bound[name]
        if name.endswith("_desc"):
            assert type(value).__name__ == "TensorDescriptor"
        elif name.endswith("_ptr"):
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
        elif name == "pattern_args":  # the spec's params (none for the built-in walks)
            assert isinstance(value, tuple) and all(type(a) in (int, float) for a in value)
        elif not p.is_constexpr:
            assert type(value) in (int, float) and (name not in FLOAT_ARGS) == (type(value) is int), (name, value)
    return bound


def test_wired_forward_launches_the_ws_kernel_and_the_tl_backward_takes_its_output(monkeypatch, stubbed):
    """ATTNCC_BACKEND=gluon through the generated module: GQA, a query chunk after the keys'
    start and rows that see no key; o and the LSE come from the (stub) kernel's buffers and the tl
    backward runs on them: o, lse and the gradients against the float64 reference."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    # the tl backward (what runs where the Gluon one cannot: head dim 256, or auto with its switch
    # off); test_wired_backward_runs_the_gluon_kernels runs the other
    monkeypatch.setattr(rt, "gluon_backward_selected", lambda call: False)
    mod, q, k, v, attention, _ = bind("causal", B=1, Hq=4, Hkv=2, Nq=20, Nk=24, D=64, grad=True)
    monkeypatch.setattr(mod, "_fwd_kernel", None)  # the tl forward must not run
    q_offset, k_offset = 6, 10  # rows 6..9 see no key
    o, lse = attention(q, k, v, q_offset=q_offset, k_offset=k_offset, return_lse=True)
    (args, kwargs, grid), = stubbed["attn_fwd_ws"].launches
    cfg = backend.gluon_config(64)
    assert not cfg.pingpong
    bound = check_arguments(fwd_ws.attn_fwd_ws, args, kwargs, call_values=dict(
        B=1, H=4, GROUP=2, Nq=20, Nk=24, q_offset=q_offset, k_offset=k_offset, n_q=q_offset + 20, n_k=k_offset + 24,
        lse_stride=20, qk_scale=64 ** -0.5 * LOG2E, WALK=walks.causal_walk, MASK=walks.causal_mask, SCORE=None,
        SEGMENTS=1, pattern_args=(), RETURN_LSE=True,
        STAGES=cfg.stages, PINGPONG=False, O_IN_Q=cfg.o_in_q, CONSUMER_REGS=cfg.consumer_regs,
        LOADER_REGS=cfg.loader_regs, STORE_RAW=True))
    # its LSE in log2 units, a buffer of its own, is what the tl backward reads
    assert o.grad_fn.has_raw and bound["lse_raw_ptr"] is o.grad_fn.saved_tensors[-1]
    assert bound["lse_raw_ptr"].data_ptr() != lse.data_ptr()
    assert kwargs["num_warps"] == 4 and kwargs["maxnreg"] == cfg.maxnreg
    assert grid == (min(132, 4),)  # one query block per (batch, head): 4 tiles
    assert 1 <= bound["HEAD_GROUP"] <= 4
    assert [list(bound[n].block_shape) for n in ("q_desc", "k_desc", "v_desc", "o_desc")] == [
        [1, 1, 64, 64], [1, 1, cfg.block_n, 64], [1, 1, cfg.block_n, 64], [1, 1, 64, 64]]
    # as the tl forward returns them
    assert o.shape == (1, 4, 20, 64) and o.dtype == torch.bfloat16 and o.is_contiguous()
    assert lse.shape == (1, 4, 20) and lse.dtype == torch.float32
    assert torch.all(lse[:, :, :4] == -math.inf) and torch.all(o[:, :, :4] == 0)
    ref, ref_lse = attncc.reference(mod_pattern("causal"), q.detach(), k.detach(), v.detach(), return_lse=True,
                                    q_offset=q_offset, k_offset=k_offset)
    assert torch.allclose(o.double(), ref, atol=1e-2) and torch.equal(lse.isinf(), ref_lse.isinf())
    assert torch.allclose(lse[:, :, 4:].double(), ref_lse[:, :, 4:], atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    dlse = torch.randn(lse.shape, generator=gen).masked_fill(lse.isinf(), 0.0)
    torch.autograd.backward((o, lse), (do, dlse))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attncc.reference(mod_pattern("causal"), qd, kd, vd, return_lse=True, q_offset=q_offset, k_offset=k_offset)
    torch.autograd.backward((ro, torch.where(rl.isinf(), 0.0, rl)), (do.double(), dlse.double()))
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 3e-2


def mod_pattern(name):
    return load_spec(ROOT / "specs" / f"{name}.toml")


@pytest.fixture
def emulated_bwd(monkeypatch, stubbed):
    """stubbed, and the Gluon backward's kernels (split, fused and ws) run as their torch emulation."""
    kernels = {}
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused, bwd_ws.attn_bwd_ws):
        kernels[kernel.fn.__name__] = EmulatedKernel(kernel)
        monkeypatch.setattr(kernel, "run", kernels[kernel.fn.__name__])
    return kernels


@pytest.mark.parametrize("name, Hq, Hkv, Nq, Nk, D, dtype, q_offset, k_offset", [
    ("causal", 4, 2, 70, 90, 64, torch.bfloat16, 6, 10),  # rows 6..9 see no key
    ("dense", 2, 1, 33, 140, 128, torch.float16, 0, 0),
    ("mqa", 3, 1, 130, 70, 64, torch.float16, 100, 0),
])
def test_wired_backward_runs_the_gluon_kernels(monkeypatch, emulated_bwd, name, Hq, Hkv, Nq, Nk, D, dtype, q_offset,
                                               k_offset):
    """ATTNCC_BACKEND=gluon through the generated module, forward (stub) and backward (the Gluon
    host path with its kernels emulated, ATTNCC_GLUON_BWD=split): the module's tl backward kernels
    never run, the launches carry the call's values, and the gradients (with a dLSE) match the float64
    reference."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    monkeypatch.setenv("ATTNCC_GLUON_BWD", "split")
    mod, q, k, v, attention, _ = bind(name, B=2, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, dtype=dtype, grad=True)
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(mod, kernel, None)  # the tl kernels must not run
    o, lse = attention(q, k, v, q_offset=q_offset, k_offset=k_offset, return_lse=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    dlse = torch.randn(lse.shape, generator=gen)
    torch.autograd.backward((o, lse), (do, dlse))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = attncc.reference(mod_pattern(name), qd, kd, vd, return_lse=True, q_offset=q_offset, k_offset=k_offset)
    torch.autograd.backward((ro, torch.where(rl.isinf(), 0.0, rl)), (do.double(), dlse.double()))
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert got.dtype == dtype and not torch.isnan(got).any()
        assert float((got.double() - want).norm() / want.norm()) < 1e-2
    walk = mod.SPEC.gluon
    cfg = backend.gluon_bwd_config(D)
    common = dict(H=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, n_q=q_offset + Nq,
                  n_k=k_offset + Nk, qk_scale=1 / math.sqrt(D) * LOG2E, sm_scale=1 / math.sqrt(D),
                  MASK=walks.PATTERNS[walk][1])
    (args, kwargs, grid), = emulated_bwd["attn_bwd_dkdv"].launches
    bound = check_arguments(bwd.attn_bwd_dkdv, args, kwargs, call_values=dict(
        common, QWALK=walks.QWALKS[walk], STAGES=cfg.kv_stages))
    assert kwargs["num_warps"] == cfg.kv_block_n // 16 and grid == (-(-Nk // cfg.kv_block_n), 2 * Hkv)
    assert [list(bound[n].block_shape) for n in ("q_desc", "k_desc", "dk_desc", "lse_desc")] == [
        [1, 1, cfg.kv_block_m, D], [1, 1, cfg.kv_block_n, D], [1, 1, cfg.kv_block_n, D], [1, 1, cfg.kv_block_m]]
    (args, kwargs, grid), = emulated_bwd["attn_bwd_dq"].launches
    bound = check_arguments(bwd.attn_bwd_dq, args, kwargs, call_values=dict(
        common, WALK=walks.PATTERNS[walk][0], STAGES=cfg.q_stages, lse_stride=-(-Nq // 4) * 4))
    assert kwargs["num_warps"] == cfg.q_block_m // 16 and grid == (-(-Nq // cfg.q_block_m), 2 * Hq)


def _gluon_backward_through_module(monkeypatch, method, B, Hq, Hkv, Nq, Nk, D, dtype, q_offset, k_offset, seed):
    """A causal forward + backward through the generated module with ATTNCC_GLUON_BWD=``method`` and the
    tl kernels taken away, its gradients against the float64 reference: (attention, q, k, v, do)."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    mod, q, k, v, attention, _ = bind("causal", B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, dtype=dtype, grad=True)
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(mod, kernel, None)  # the tl kernels must not run
    o = attention(q, k, v, q_offset=q_offset, k_offset=k_offset)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o.dtype)
    o.backward(do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attncc.reference(mod_pattern("causal"), qd, kd, vd, q_offset=q_offset, k_offset=k_offset).backward(do.double())
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert float((got.double() - want).norm() / want.norm()) < 1e-2
    return attention, q, k, v, do


def test_gluon_bwd_switch_runs_the_fused_kernel(monkeypatch, emulated_bwd):
    """ATTNCC_GLUON_BWD=fused through the generated module: the fused kernel alone (not the split
    ones), with the call's values, and gradients against the float64 reference; split (and unset)
    runs the two kernels, and so does unset under deterministic algorithms, where unset otherwise runs the
    ws kernel (the default); another value is refused, naming the variable and the choices."""
    Hq, Hkv, Nq, Nk, D, q_offset, k_offset = 4, 2, 70, 150, 64, 30, 0
    attention, q, k, v, do = _gluon_backward_through_module(monkeypatch, "fused", 2, Hq, Hkv, Nq, Nk, D, torch.bfloat16,
                                                            q_offset, k_offset, seed=4)
    assert not emulated_bwd["attn_bwd_dkdv"].launches and not emulated_bwd["attn_bwd_dq"].launches
    cfg = backend.gluon_bwd_config(D)
    (args, kwargs, grid), = emulated_bwd["attn_bwd_fused"].launches
    bound = check_arguments(bwd_fused.attn_bwd_fused, args, kwargs, call_values=dict(
        H=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, QWALK=walks.causal_qwalk,
        MASK=walks.causal_mask, STAGES=cfg.kv_stages))
    assert grid == (-(-Nk // cfg.kv_block_n), 2 * Hkv)
    assert bound["dq_acc_desc"].base.dtype == torch.float32
    for value, deterministic in (("split", False), ("", False), ("", True)):
        monkeypatch.setenv("ATTNCC_GLUON_BWD", value)
        torch.use_deterministic_algorithms(deterministic)
        try:
            o = attention(q, k, v, q_offset=q_offset, k_offset=k_offset)
            o.backward(do)
        finally:
            torch.use_deterministic_algorithms(False)
    assert len(emulated_bwd["attn_bwd_dkdv"].launches) == len(emulated_bwd["attn_bwd_dq"].launches) == 2
    assert len(emulated_bwd["attn_bwd_fused"].launches) == 1 and len(emulated_bwd["attn_bwd_ws"].launches) == 1
    monkeypatch.setenv("ATTNCC_GLUON_BWD", "atomic")
    with pytest.raises(ValueError, match=r"ATTNCC_GLUON_BWD must be one of split, fused, ws .*'atomic'"):
        attention(q, k, v, q_offset=q_offset, k_offset=k_offset).backward(do)


def test_gluon_bwd_switch_runs_the_ws_kernel(monkeypatch, emulated_bwd):
    """ATTNCC_GLUON_BWD=ws through the generated module: the ws kernel alone, its launch bound to its
    signature with the call's values (boxes of 64 keys, 4 warps, maxnreg, the setmaxnreg budgets), and
    gradients against the float64 reference; refused like fused under deterministic algorithms."""
    Hq, Hkv, Nq, Nk, D, q_offset, k_offset = 2, 1, 40, 70, 64, 20, 0
    attention, q, k, v, do = _gluon_backward_through_module(monkeypatch, "ws", 1, Hq, Hkv, Nq, Nk, D, torch.float16,
                                                            q_offset, k_offset, seed=5)
    assert not any(emulated_bwd[n].launches for n in ("attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused"))
    cfg = backend.gluon_bwd_config(D)
    assert cfg == launch.default_bwd_config(D, "ws")
    (args, kwargs, grid), = emulated_bwd["attn_bwd_ws"].launches
    bound = check_arguments(bwd_ws.attn_bwd_ws, args, kwargs, call_values=dict(
        H=Hq, GROUP=Hq // Hkv, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, QWALK=walks.causal_qwalk,
        MASK=walks.causal_mask, STAGES=cfg.kv_stages, CONSUMER_REGS=bwd_ws.CONSUMER_REGS,
        WORKER_REGS=bwd_ws.WORKER_REGS))
    assert grid == (-(-Nk // cfg.kv_block_n), Hkv)
    assert kwargs["num_warps"] == 4 and kwargs["maxnreg"] == bwd_ws.MAXNREG
    assert [list(bound[n].block_shape) for n in ("q_desc", "k_desc", "dk_desc", "dq_acc_desc")] == [
        [1, 1, 64, D], [1, 1, 64, D], [1, 1, 64, D], [1, 1, 64, D]]
    assert bound["dq_acc_desc"].base.dtype == torch.float32
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ATTNCC_GLUON_BWD=ws does not have a deterministic implementation"):
            attention(q, k, v, q_offset=q_offset, k_offset=k_offset).backward(do)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("kernel", ["ws", "pipelined"])
@pytest.mark.parametrize("pattern, D", [("dense", 128), ("causal", 256)])
def test_launch_arguments_match_each_kernel(stubbed, kernel, pattern, D):
    """launch.attention, both kernels, the head dims' configs: arguments by name and value."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 40, D, generator=gen).to(torch.float16)
    k, v = (torch.randn(2, 3, 70, D, generator=gen).to(torch.float16) for _ in range(2))
    cfg = launch.default_config(D, kernel)
    o, lse = launch.attention(q, k, v, pattern=pattern, scale=0.3, q_offset=50, k_offset=5, n_q=99, n_k=77,
                              return_lse=True, config=cfg)
    name = "attn_fwd_ws" if kernel == "ws" else "attn_fwd_pipelined"
    jit = fwd_ws.attn_fwd_ws if kernel == "ws" else fwd_pipelined.attn_fwd_pipelined
    (args, kwargs, grid), = stubbed[name].launches
    want = dict(GROUP=2, Nq=40, Nk=70, q_offset=50, k_offset=5, n_q=99, n_k=77, lse_stride=40, qk_scale=0.3 * LOG2E,
                WALK=walks.PATTERNS[pattern][0], MASK=walks.PATTERNS[pattern][1], RETURN_LSE=True, STAGES=cfg.stages)
    if kernel == "ws":
        want.update(B=2, H=6, PINGPONG=cfg.pingpong, O_IN_Q=cfg.o_in_q)
        assert grid == (min(132, 2 * 6 * -(-40 // cfg.block_m)),)
    else:
        want.update(H=6, num_warps=cfg.num_warps)
        assert grid == (-(-40 // cfg.block_m), 2 * 6)
    check_arguments(jit, args, kwargs, call_values=want)
    ref, ref_lse = attncc.reference(mask_pattern("j <= i" if pattern == "causal" else None), q, k, v, return_lse=True,
                                    q_offset=50, k_offset=5, scale=0.3)
    assert torch.allclose(o.double(), ref, atol=5e-3) and torch.allclose(lse.double(), ref_lse, atol=1e-5)


CHILD = r"""
import sys
sys.path.insert(0, {tests!r})
import test_gluon_wiring as t
from early_child import watch_parent
watch_parent()
t.compile_recorded_launch(sys.argv[1] + "/forward.pickle")
t.compile_recorded_backward(sys.argv[1] + "/backward.pickle")
"""
# The child compiling the recorded launches starts when collection ends (conftest.py,
# tests/early_child.py): it compiles on the core the tests before this module leave idle.
EARLY_CHILDREN = {"recorded_compiles": EarlyChild(
    "gluon_wiring", lambda folder: [sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")), str(folder)],
    lambda folder: without_interpreter(), timeout=900, cwd=ROOT)}


@pytest.fixture(scope="module")
def recorded_compiles():
    """{"forward": compile_recorded_launch's, "backward": compile_recorded_backward's}"""
    outcome = EARLY_CHILDREN["recorded_compiles"].result()
    assert outcome.returncode == 0, outcome.failure()
    out = {}
    for part in ("forward", "backward"):
        with open(outcome.child.folder / f"{part}.pickle", "rb") as f:
            out[part] = pickle.load(f)
    return out


def compile_recorded_launch(out_path: str) -> str:
    """Run in a process without TRITON_INTERPRET: record the ws launch of the wired forward's
    config (stubbed device, causal, bf16, D = 128, GQA, offsets) and compile exactly those
    arguments for sm90: the signature is Triton's own specialization of the recorded values
    (tests/kernel_compile.py), not a list written by hand."""
    from kernel_compile import compile_launch, launch_of

    kernel = fwd_ws.attn_fwd_ws
    stub = StubKernel(kernel)
    real_run, real_check, real_props = kernel.run, launch.check_devices, torch.cuda.get_device_properties
    kernel.run, launch.check_devices = stub, (lambda q, k, v: None)
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
    try:
        q = torch.randn(1, 4, 300, 128).to(torch.bfloat16)
        k, v = (torch.randn(1, 2, 200, 128).to(torch.bfloat16) for _ in range(2))
        launch.attention(q, k, v, pattern="causal", q_offset=100, return_lse=True, config=backend.gluon_config(128))
    finally:
        kernel.run, launch.check_devices, torch.cuda.get_device_properties = real_run, real_check, real_props
    (args, kwargs, grid), = stub.launches
    recorded = launch_of(kernel, args, kwargs)
    compiled = compile_launch(recorded, "cubin")
    with open(out_path, "wb") as f:
        pickle.dump({"signature": dict(recorded.signature), "shared": compiled.metadata["shared"],
                     "ptx_has_wgmma": "wgmma.mma_async" in compiled.stages["ptx"]}, f)
    return "ok"


def compile_recorded_backward(out_path: str) -> str:
    """Run in a process without TRITON_INTERPRET: record the launches of the generated causal module's
    ``_backward`` on the Gluon path (stubbed device, bf16, D = 128, GQA, offsets, a dLSE): the
    preprocess (tl) and the dK/dV and dQ kernels (Gluon, ATTNCC_GLUON_BWD=split), then with ATTNCC_GLUON_BWD=fused the fused
    kernel (Gluon) and its postprocess (tl), and compile each for sm90 with the signature Triton
    specializes the recorded values to."""
    from kernel_compile import compile_launch, recorded_launches

    real = backend.device_problem, launch.check_devices
    backend.device_problem, launch.check_devices = (lambda device: None), (lambda q, k, v: None)
    os.environ["ATTNCC_BACKEND"] = "gluon"
    try:
        mod = module("causal")
        q = torch.randn(2, 4, 300, 128).to(torch.bfloat16)
        k, v = (torch.randn(2, 2, 200, 128).to(torch.bfloat16) for _ in range(2))
        os.environ["TRITON_INTERPRET"] = "1"  # only for the argument checks, which take CPU tensors then
        try:
            call = rt.bind(mod.SPEC, q, k, v, q_offset=100)
        finally:
            del os.environ["TRITON_INTERPRET"]
        o, do = torch.empty_like(q), torch.randn_like(q)
        lse, dlse = torch.zeros(2, 4, 300), torch.zeros(2, 4, 300)
        with recorded_launches() as recorded:
            os.environ["ATTNCC_GLUON_BWD"] = "split"
            mod._backward(call, o, lse, do, dlse)
            os.environ["ATTNCC_GLUON_BWD"] = "fused"
            mod._backward(call, o, lse, do, dlse)
    finally:
        backend.device_problem, launch.check_devices = real
        os.environ.pop("ATTNCC_GLUON_BWD", None)
    out = {}
    for rec in recorded:
        compiled = compile_launch(rec, "cubin")
        out[rec.name] = {"signature": dict(rec.signature), "shared": compiled.metadata["shared"],
                         "wgmma": "wgmma.mma_async" in compiled.stages["ptx"]}
    with open(out_path, "wb") as f:
        pickle.dump(out, f)
    return "ok"


def test_recorded_backward_launches_compile_for_sm90(recorded_compiles):
    result = recorded_compiles["backward"]
    assert set(result) == {"bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused", "bwd_postprocess"}
    assert result["attn_bwd_dkdv"]["wgmma"] and result["attn_bwd_dq"]["wgmma"] and result["attn_bwd_fused"]["wgmma"]
    assert result["attn_bwd_fused"]["signature"]["dq_acc_desc"].startswith("tensordesc<fp32[1, 1, 64, 128]")
    for name, part, method in (("attn_bwd_dkdv", "dkdv", "split"), ("attn_bwd_dq", "dq", "split"),
                               ("attn_bwd_fused", "fused", "fused")):
        cfg = launch.default_bwd_config(128, method)
        assert launch.bwd_shared_bytes(cfg, 128)[part] <= result[name]["shared"] <= launch.SM90_SHARED_BYTES
    assert result["attn_bwd_dq"]["signature"]["lse_stride"] == "i64"
    assert result["attn_bwd_dkdv"]["signature"]["lse_desc"].startswith("tensordesc<fp32[1, 1, 64]")


def test_recorded_launch_compiles_for_sm90(recorded_compiles):
    result = recorded_compiles["forward"]
    assert result["ptx_has_wgmma"] and 0 < result["shared"] <= launch.SM90_SHARED_BYTES
    assert result["signature"]["lse_stride"] == "i64" and result["signature"]["HEAD_GROUP"] == "i32"
