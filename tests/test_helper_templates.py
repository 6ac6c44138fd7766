"""The Triton helper functions live in templates/helpers.j2, each written once: no codegen module
holds one as a Python string, and every helper a printer may ask for renders as the function
of that name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import attncc.codegen
from attncc.codegen import helpers
from attncc.codegen.params import jit_functions
from attncc.codegen.tile_kernel import TILE_HELPERS, _helper_sources

CODEGEN = Path(attncc.codegen.__file__).parent
# @triton.jit text still built in Python: the tile-list kernel's own bodies (codegen/tile_kernel.py)
GENERATED_IN_PYTHON = {"_tk_rows", "_tk_cols", "_tk_kernel"}


def test_no_codegen_module_holds_a_helper_as_a_string():
    found = []
    for path in sorted(CODEGEN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
            if text is None and isinstance(node, ast.JoinedStr):  # an f-string: its literal parts
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if text:
                found += [(path.name, n) for n in re.findall(r"@triton\.jit\s*\ndef (\w+)\(", text)
                          if n not in GENERATED_IN_PYTHON]
    assert not found, found


@pytest.mark.parametrize("name", list(helpers.FIXED) + ["_bucket_32_128_1", "_bucket_16_64_0"])
def test_each_helper_renders_as_its_function(name):
    tree = ast.parse(helpers.render_helper(name))
    assert list(jit_functions(tree)) == [name]


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_rope_helpers_render(style):
    macro = attncc.codegen.environment().get_template("helpers.j2").module.helper
    tree = ast.parse(str(macro(helpers.rope_args(style, 10000.0))))
    assert list(jit_functions(tree)) == ["_rope_partner", "_rope"]


def test_tile_helpers_render():
    sources = _helper_sources()
    for name in TILE_HELPERS:
        assert list(jit_functions(ast.parse(sources[name]))) == [name]
