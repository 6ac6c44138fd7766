"""Stage 1: spec file -> Pattern. Public entry points: ``load_spec`` and ``parse_spec``."""
from attncc.spec.errors import SpecError
from attncc.spec.ir import FeatureMap, InputDecl, Param, Pattern, Rope
from attncc.spec.load import load_spec, parse_spec

__all__ = ["SpecError", "Pattern", "Param", "InputDecl", "Rope", "FeatureMap", "load_spec", "parse_spec"]
