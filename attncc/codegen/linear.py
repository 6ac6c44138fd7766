"""Pattern -> the template variables of a linear-attention kernel (templates/linear.py.j2)."""
from attncc.spec.ir import Pattern


def linear_context(pattern: Pattern) -> dict:
    fm = pattern.feature_map
    if fm.name not in ("elu+1", "relu", "identity", "performer"):
        raise NotImplementedError(f"{pattern.source}: the {fm.name!r} feature map has no kernel yet")
    return dict(feature_map=fm.name, features=fm.features, seed=fm.seed, causal=fm.causal, normalize=fm.normalize)
