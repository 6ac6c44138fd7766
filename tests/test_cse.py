"""Printed expressions compute each value once (attncc.codegen.printer.TritonPrinter.statement):
what a statement would compute twice is a named temporary defined before it, and the host's
integer overflow guard still sees every integer expression the kernels compute."""
from __future__ import annotations

import ast
import functools
import random

import pytest

import attncc.codegen.printer as printer_module
from attncc.codegen import render
from attncc.spec import load_spec
from cases import ROOT, SPEC_FILES, pattern
from fuzz_specs import random_spec

RANDOM_SEEDS = range(100, 108)


def _simple(node: ast.AST) -> bool:
    """A name, a constant, ``tl.float64``, ``offs_i[:, None]``, ``-1``, ``tl.cast(name, type)``,
    ``b * 1.0``: nothing worth a name of its own."""
    if isinstance(node, (ast.Name, ast.Constant, ast.Attribute, ast.Slice)):
        return True
    if isinstance(node, ast.Tuple):  # an index: [:, None]
        return all(_simple(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        return True
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, ast.Name)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tl.cast", "float"):
        return all(_simple(a) for a in node.args)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and ast.unparse(node.right) == "1.0":
        return _simple(node.left)  # an int converted to float
    return False


def _repeats(code: str):
    """The composite sub-expressions ``code`` writes more than once."""
    seen, repeated = set(), set()
    for node in ast.walk(ast.parse(code, mode="eval")):
        if isinstance(node, ast.expr) and not _simple(node):
            key = ast.dump(node)
            (repeated if key in seen else seen).add(key)
    return repeated


def _recorded(monkeypatch) -> list:
    """Every (named values, code) the printers' statements give from now on (until ``monkeypatch``
    is undone)."""
    out = []
    original = printer_module.TritonPrinter.statement

    def recording(self, e):
        result = original(self, e)
        out.append(result)
        return result

    monkeypatch.setattr(printer_module.TritonPrinter, "statement", recording)
    return out


@pytest.fixture
def statements(monkeypatch):
    """Every (named values, code) the printers' statements give while it is used."""
    return _recorded(monkeypatch)


@functools.lru_cache(maxsize=None)
def shipped_statements() -> tuple:
    """The statements of every shipped spec's rendering, rendered once (tests/test_separable.py
    checks them too)."""
    with pytest.MonkeyPatch.context() as mp:
        out = _recorded(mp)
        for path in SPEC_FILES:
            render(load_spec(path))
    return tuple(out)


def test_statements_compute_each_value_once(statements, tmp_path):
    statements.extend(shipped_statements())
    for seed in RANDOM_SEEDS:
        spec = tmp_path / f"r{seed}.toml"
        spec.write_text(random_spec(random.Random(seed))[0])
        render(load_spec(spec))
    assert statements
    for temps, code in statements:
        for text in [code] + [value for _, value in temps]:
            assert not _repeats(text), (text, temps)


def test_repeats_are_named_outermost_first_and_defined_before_use():
    temps = printer_module.Temporaries()
    assert temps.name_repeats("f((a + b), (a + b) * 2) + g(f((a + b), (a + b) * 2))") == (
        [("tmp1", "a + b"), ("tmp0", "f(tmp1, tmp1 * 2)")], "tmp0 + g(tmp0)")
    assert temps.name_repeats("tl.where((p[:, None] - 1) > 0, (p[:, None] - 1), -1.5) + p[:, None]") == (
        [("tmp2", "p[:, None] - 1")], "tl.where(tmp2 > 0, tmp2, -1.5) + p[:, None]")
    assert temps.name_repeats("_bucket_8_16_1(x - y) + _bucket_8_16_1(x - y)") == (
        [("bucket0", "_bucket_8_16_1(x - y)")], "bucket0 + bucket0")


def test_t5_bucket_is_computed_once():
    text = (ROOT / "generated" / "t5_bias.py").read_text()
    tile = text[text.index("def _fwd_tile"):text.index("def _fwd_kernel")]
    assert tile.count("_bucket_32_128_1(") == 1 and "bucket0 = _bucket_32_128_1(" in tile


def test_document_prints_its_classifier_once():
    text = (ROOT / "generated" / "document.py").read_text()
    assert text.count("IntervalProgram(") == 1 and "\n_TK_PROGRAM = MASK_TILES\n" in text


@pytest.mark.parametrize("name", ["t5_bias", "dilated", "alibi_learned", "neighborhood_2d", "document"])
def test_the_overflow_guard_sees_what_it_saw_before_naming(name, monkeypatch):
    """The integer arithmetic the host bounds (``_int_reach``, ``_int_divisors``) is the same
    whether repeated values are named or printed where they are used."""
    def guard(text):
        return text[text.index("# Integer arithmetic"):text.index("SPEC = ")]

    named = guard(render(pattern(name)))
    monkeypatch.setattr(printer_module.Temporaries, "name_repeats", lambda self, code: ([], code))
    assert guard(render(pattern(name))) == named
