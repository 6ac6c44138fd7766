"""Which Plans the Gluon sm90 forward computes, and how: a built-in walk, or fragments rendered
from the Plan.

The Gluon kernels (``attncc.runtime.gluon``, docs/gluon.md) are hand-written skeletons that take a
pattern's fragments (a key-block walk, a mask, a score hook) as ``constexpr`` arguments. They carry
two built-in patterns (``attncc.runtime.gluon.walks``), measured on an H200; a generated module
whose Plan is exactly one of those keeps them (:func:`builtin_fit`):

- ``"dense"``: no mask (every pair allowed; the spec loader folds tautologies such as
  ``j >= 0`` or ``j <= i or j > i`` to no mask);
- ``"causal"``: the walk's cover is the one band ``j <= x`` on every row (x the query position):
  no guard, no row range, no lower bound, no global rows or columns, no precondition. The
  cover is the mask, exactly (:mod:`attncc.analysis.bands`), so this holds for every spelling of
  ``j <= i`` the analysis normalizes (``not (j > i)``, ``j - i <= 0``, ``j < i + 1``,
  ``2*j <= 2*i``), and for none of ``j < i``, bottom-right alignment (``j - n_k <= i - n_q``),
  windows or prefixes;

and the score is the scaled dot product alone: no bias (ALiBi, T5), mod, softcap, RoPE or dropout,
no ``[inputs]``, and Dv = D (no ``value_dim``).

Other Plans get rendered fragments (:func:`gluon_fit`, attncc.codegen.gluon) when their mask
computes in integers (``[inputs]`` such as document ids included) and their score is a bias, mod or
softcap of positions, heads, params and ``[inputs]`` (bias tables): a forward walk with a closed
form (DENSE or BANDS) as sorted segments (:func:`attncc.analysis.walks.sorted_segments`), one without
(BLOCK_LIST: strides, dilations, BigBird's random blocks, [inputs]) over the block lists of the Gluon
kernel's tiles; with RoPE, on q and k the module rotates first (its ``tl`` pre-pass); dropout and
``value_dim`` stay on the ``tl`` kernels. The Gluon backward takes the rendered fragments of the
Plans whose transposed walk (query blocks per key block) has a closed form the same for every query
head, without RoPE or ``[inputs]`` (:func:`rendered_backward_reason`); the others' backward is the
``tl`` one. The answer is a fact of the analysis, never of the spec's name; codegen renders it as
``SpecInfo.gluon`` and ``attncc explain`` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy

from attncc.analysis.bands import X, Cover
from attncc.analysis.integer import integer_ops
from attncc.analysis.plan import Plan
from attncc.analysis.score import along_j
from attncc.analysis.walks import Iteration
from attncc.spec import symbols as S

# The walks the Gluon kernels have (the keys of attncc.runtime.gluon.walks.PATTERNS; a test checks
# that they agree: the analysis may not import the runtime).
BUILTIN_WALKS = ("dense", "causal")


@dataclass(frozen=True)
class BuiltinFit:
    """``walk``: the built-in walk that computes the Plan exactly ("dense", "causal"), or None;
    ``reason``: why none does, as a clause for ``attncc explain`` ("" when one does)."""

    walk: Optional[str] = None
    reason: str = ""


def builtin_fit(plan: Plan) -> BuiltinFit:
    """The built-in Gluon walk that computes ``plan`` exactly (module docstring), or why none does."""
    p = plan.pattern
    if p.kind != "softmax":
        return BuiltinFit(reason=f"a {p.kind} pattern (the Gluon kernels are softmax attention)")
    extras = [what for what, present in (
        ("a bias", p.bias is not None and p.bias != 0), ("a score mod", p.mod is not None),
        ("a softcap", p.softcap is not None), ("RoPE", p.rope is not None), ("dropout", p.dropout > 0),
        ("[inputs]", bool(p.inputs)), (f"value_dim = {p.value_dim}", p.value_dim is not None)) if present]
    if extras:
        return BuiltinFit(reason=f"it has {', '.join(extras)}; the Gluon kernels compute the plain scaled dot "
                                 f"product only")
    if plan.forward.kind is Iteration.DENSE:
        return BuiltinFit("dense")
    if plan.forward.kind is Iteration.BANDS and is_causal_band(plan.forward.cover):
        return BuiltinFit("causal")
    return BuiltinFit(reason=f"the mask {p.mask} is neither every pair nor exactly the causal band j <= i")


def is_causal_band(cover: Optional[Cover]) -> bool:
    """The cover allows exactly the keys ``j <= i`` on every row."""
    if cover is None or cover.rows or cover.columns or cover.band is None or cover.precondition is not sympy.true:
        return False
    band = cover.band
    return (band.guard is sympy.true and band.row_lo is None and band.row_hi is None and band.lower == ()
            and band.upper == ((X,),))


@dataclass(frozen=True)
class GluonFit:
    """How the Gluon sm90 forward computes a Plan: ``kind`` "dense" or "causal" (a built-in walk),
    "rendered" (fragments rendered from the Plan), or None; ``reason``: why none, as a clause for
    ``attncc explain`` and the refusal of ``ATTNCC_BACKEND=gluon`` ("" when it does)."""

    kind: Optional[str] = None
    reason: str = ""
    backward_reason: str = ""
    # Why ATTNCC_BACKEND=auto keeps the tl forward for this Plan although the Gluon forward computes
    # it ("" when auto takes the Gluon forward on sm90): where the Gluon forward was measured slower
    # than the tl one (docs/gluon.md "Which forward auto picks").
    auto_reason: str = ""
    # Why ATTNCC_BACKEND=auto keeps the tl backward for this Plan although the Gluon backward computes
    # it ("" when auto takes the Gluon backward on sm90: rendered_backward_auto_reason).
    # (the default: a Plan without a Gluon walk; gluon_fit sets it for the others)
    backward_auto_reason: str = "auto keeps the tl backward: the Gluon backward was measured no faster"

    @property
    def auto(self) -> bool:
        """Whether ATTNCC_BACKEND=auto takes the Gluon forward for the Plan (on sm90, for calls it can run)."""
        return self.kind is not None and not self.auto_reason

    @property
    def backward(self) -> bool:
        """Whether the Gluon sm90 backward computes the Plan too: the built-in walks', or the rendered
        fragments' (the transposed walk in closed form, the same for every query head:
        ``backward_reason`` says why not)."""
        return self.kind is not None and not self.backward_reason

    @property
    def backward_auto(self) -> bool:
        """Whether ATTNCC_BACKEND=auto takes the Gluon backward for the Plan (on sm90, for calls it can run)."""
        return self.backward and not self.backward_auto_reason


def gluon_fit(plan: Plan) -> GluonFit:
    """The built-in walk that computes ``plan`` exactly, else rendered fragments where the Plan has
    what they need (module docstring), else why not."""
    builtin = builtin_fit(plan)
    if builtin.walk is not None:  # auto takes its backward too (measured faster: rendered_backward_auto_reason)
        return GluonFit(builtin.walk, backward_auto_reason="")
    p = plan.pattern
    if p.kind != "softmax":
        return GluonFit(reason=builtin.reason)
    extras = [what for what, present in (
        ("dropout", p.dropout > 0), (f"value_dim = {p.value_dim}", p.value_dim is not None)) if present]
    if extras:  # (RoPE: the module rotates q and k once before the kernels read them, as for its tl kernels)
        return GluonFit(reason=f"it has {', '.join(extras)}, which the Gluon kernels do not compute")
    if plan.dots:
        return GluonFit(reason=dots_reason(plan))
    # DENSE and BANDS walks are closed-form segments; BLOCK_LIST ones (no closed form, or [inputs])
    # walk the block lists of the Gluon kernel's tiles (attncc.codegen.gluon)
    if p.mask is not None and not integer_mask(p.mask):
        return GluonFit(reason=f"the mask {p.mask} computes in float (float64 in the tl kernels, as the "
                               f"reference); the Gluon fragments compute masks in integers only")
    return GluonFit("rendered", backward_reason=rendered_backward_reason(plan), auto_reason=rendered_auto_reason(plan),
                    backward_auto_reason=rendered_backward_auto_reason(plan))


def dots_reason(plan: Plan) -> str:
    """Why the Gluon kernels do not take a Plan whose bias has dots lowered to tile products."""
    written = " and ".join(d.written for d in plan.dots)
    return (f"its bias has {written}: the tl kernels compute it as a tile product "
            f"(tl.dot), the Gluon fragments have none (written out term by term, Triton compiles them for minutes)")


def rendered_auto_reason(plan: Plan) -> str:
    """Why ATTNCC_BACKEND=auto keeps the tl forward for a rendered Plan ("" when it takes the Gluon one).
    Measured on an H100 (bf16, head dim 128, docs/gluon.md): over one closed-form segment per query
    block the Gluon forward took 0.79-0.93x the tl forward's time (sliding window, chunked local,
    prefix-LM, ALiBi) and softcap 1.00x; over two segments (sink + window) 1.24x; over block lists
    0.92x (document) but 1.61x (strided); with [inputs] read in the key loop it was not timed."""
    walk = plan.forward
    if walk.kind is Iteration.BLOCK_LIST:
        return ("its key blocks come from block lists, where the Gluon forward was measured from 0.92x "
                "(document) to 1.61x (strided) the tl forward's time")
    if walk.kind is Iteration.BANDS and walk.segments > 1:
        return (f"{walk.segments} key segments per query block, where the Gluon forward was measured at 1.24x "
                f"the tl forward's time (sink + window)")
    if plan.pattern.inputs:
        return "its key loop reads [inputs], which the Gluon forward has not been timed with"
    if along_j(plan.pattern)[2] is not None:
        return ("its score has terms constant along the key (a bias or mod term of i, h, b or params alone, or "
                "the c * i of a c * j): the tl kernels keep them out of the key loop and add them to the LSE, "
                "the Gluon score adds them to every pair in float32, where at large positions or values they "
                "round the pair's own score away (bias = \"0.1 * i\" at i = 2**29: a float32 ulp of 8 in "
                "log2 units)")
    return ""


def rendered_backward_auto_reason(plan: Plan) -> str:
    """Why ATTNCC_BACKEND=auto keeps the tl backward for a rendered Plan ("" when it takes the Gluon
    split backward): where the walks have several segments per block. Measured on an H100 (bf16, f+b,
    session 24, docs/performance.md) with the one-warpgroup backward tiles (two programs per SM), the
    Gluon forward and split backward against auto's earlier tl backward: block diagonal 0.85x, chunked
    local 0.87x, sliding window 0.95x, prefix-LM 0.96x, ALiBi 0.98x, softcap 0.87x, causal 0.94x,
    dense 4K 0.98x, GQA 0.96x; over two segments (sink + window) 1.04x."""
    walks = (plan.forward, plan.transposed)
    if not all(w.kind is Iteration.BANDS and w.segments == 1 for w in walks):
        return ("auto keeps the tl backward: its walks have several segments per block, where the Gluon backward "
                "was measured slower (sink + window: 1.04x)")
    if along_j(plan.pattern)[2] is not None:  # as rendered_auto_reason: the Gluon score rounds them in every pair
        return ("auto keeps the tl backward: its score has terms constant along the key, which the Gluon kernels "
                "add to every pair in float32 (the tl ones keep them out of the key loop)")
    return ""


def rendered_backward_reason(plan: Plan) -> str:
    """Why the Gluon backward cannot take a rendered Plan's fragments ("" when it can). Its kernels
    read the call's q and k and the params alone: RoPE's rotated copies (and rotating dQ, dK back)
    and ``[inputs]`` (their reads, a ``grad = true`` input's gradient) are the forward's fragments'
    and the ``tl`` backward's. Its dK/dV kernel walks the transposed walk's closed-form segments once
    per key block for all the query heads of a GQA group, so that walk must have a closed form and
    must not read the head."""
    p = plan.pattern
    extras = [what for what, present in (("RoPE", p.rope is not None), ("[inputs]", bool(p.inputs))) if present]
    if extras:
        return f"it has {' and '.join(extras)}; the Gluon backward's kernels take q, k, v and the params alone"
    walk = plan.transposed
    if walk.kind not in (Iteration.DENSE, Iteration.BANDS):
        return f"its query blocks per key block have no closed form ({walk.reason})"
    if any(S.h in e.free_symbols for _, e in walk.steps):
        return ("its query blocks per key block depend on the query head, and the Gluon dK/dV kernel walks the "
                "query heads of a GQA group together")
    return ""


def integer_mask(mask) -> bool:
    """Every value the mask computes is an integer (its comparisons and logic aside)."""
    return all(node.is_integer for node in sympy.preorder_traversal(integer_ops(mask))
               if isinstance(node, sympy.Expr) and not node.is_Boolean)
