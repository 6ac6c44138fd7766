"""Linear attention's feature-map numbers as generated modules and users import them.

They live in :mod:`attncc.core.feature_maps`, shared with the reference (which may not import
the runtime); generated modules import ``LINEAR_DENOMINATOR_EPS`` from here, and
docs/spec-language.md names ``attncc.runtime.feature_maps.performer_projection``.
"""
from attncc.core.feature_maps import LINEAR_DENOMINATOR_EPS, performer_projection  # noqa: F401

__all__ = ["LINEAR_DENOMINATOR_EPS", "performer_projection"]
