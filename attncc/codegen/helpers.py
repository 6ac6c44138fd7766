"""The Triton helper functions a kernel may call: each is written once, in templates/helpers.j2,
and a module defines only those its code calls (attncc.codegen.printer collects their names).
Here: what the template needs to write one (:func:`helper_args`)."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

from attncc.codegen.templating import environment
from attncc.core import semantics

# the helpers of templates/helpers.j2 that take no parameters
FIXED = ("_floordiv", "_floormod", "_mod_wraps", "_mod_sum", "_sum_carry", "_ipow", "_pow", "_shift", "_row_term_o",
         "_tanh", "_alibi_slope", "_sin", "_cos", "_sqrt64", "_ipow64", "_floormod64", "_floordiv64", "_tanh64", "_alibi_slope64",
         "_random_hit")
# those the Gluon fragments may call (helpers.j2 writes them as @gluon.jit functions too), and the
# T5 buckets (``_bucket_*``); the float64 ones belong to mask code Gluon does not print
GLUON = ("_floordiv", "_floormod", "_mod_wraps", "_mod_sum", "_sum_carry", "_ipow", "_pow", "_shift", "_tanh",
         "_alibi_slope", "_sin", "_cos")


def helper_args(name: str) -> Dict[str, object]:
    """The template's description of the helper ``name``: its name, and for a T5 bucket
    (``_bucket_<buckets>_<max distance>_<bidirectional>``) its thresholds."""
    if name in FIXED:
        return {"name": name}
    if name.startswith("_bucket_"):
        nb, md, bd = (int(x) for x in name[len("_bucket_"):].split("_"))
        # integer comparisons against thresholds precomputed in float64 (attncc.runtime.semantics)
        max_exact, thresholds = semantics.bucket_thresholds(nb, md, bool(bd))
        return {"name": name, "num_buckets": nb, "max_distance": md, "bidirectional": bool(bd),
                "max_exact": max_exact, "thresholds": list(thresholds)}
    raise KeyError(name)


def rope_args(style: str, theta: float) -> Dict[str, object]:
    """The description of the rotary-embedding helpers (``_rope_partner``, ``_rope``)."""
    return {"name": "rope", "style": style, "log2_theta": math.log2(theta)}


def helper_list(names: Iterable[str], rope=None, have: Iterable[Dict[str, object]] = ()) -> List[Dict[str, object]]:
    """The descriptions of the helpers ``names`` (sorted) and of the rope helpers (``rope``: the
    spec's rope, or None), less those in ``have`` (defined by another part of the module)."""
    out = [helper_args(n) for n in sorted(names)] + ([rope_args(rope.style, rope.theta)] if rope is not None else [])
    return [h for h in out if h not in list(have)]


def render_helper(name: str, lang: str = "tl") -> str:
    """The source of one helper, as a module defines it (``lang="gl"``: as a @gluon.jit function, for
    the helpers of :data:`GLUON` and the T5 buckets)."""
    if lang == "gl" and not (name in GLUON or name.startswith("_bucket_")):
        raise ValueError(f"{name} has no Gluon version")
    return str(environment().get_template("helpers.j2").module.helper(helper_args(name), lang))
