"""attncc build with hostile inputs: file names never become code, builds are atomic, the
generated files are replaced (never written through), and `python -m attncc` is the CLI."""
from __future__ import annotations

import ast
import builtins
import importlib.util
import io
import os
import random
import re
import subprocess
import sys
import tokenize

import pytest

import attncc
from attncc.codegen import TEMPLATES, build, render, stale
from attncc.codegen.text import escaped, py_str
from attncc.spec import SpecError, load_spec, parse_spec

CODING = re.compile(r"^[ \t\f]*#.*?coding[:=]")  # PEP 263, as the tokenizer reads lines 1 and 2
PAYLOAD = '__import__("builtins").ATTNCC_PWNED = 1'
HOSTILE_STEMS = [
    f'x""";{PAYLOAD};"""',
    f'x";{PAYLOAD};"',
    f"x''';{PAYLOAD};'''",
    f"a\n{PAYLOAD}\n#",
    f"a\r{PAYLOAD}\r#",
    f"a\r\n{PAYLOAD} #",
    f"a\u2028{PAYLOAD}\u2029b\x85c",
    "form\x0cfeed\x0bvtab\x1b[31mescape\x7f",
    "back\\slash\\N\\u0041\\",
    'x\\";' + PAYLOAD + ';"',
    "#!binsh # comment",
    # Python takes `coding=<name>` in a comment on line 1 or 2 as the file's encoding; UTF-7 then
    # decodes +AAo- to a newline and +ACI- to a double quote.
    f"coding=utf-7 +AAo-{PAYLOAD.replace(chr(34), '+ACI-')} x",
    "# -*- coding: latin-1 -*-",
    "{{ 7 * 7 }}{% raw %}{#",
    "\u202eevil\u202c\U0001f600\u00e9",
    "\udcff\udc80 undecodable bytes",
    "n" * 200,
]


@pytest.fixture
def no_payload():
    yield
    assert builtins.__dict__.pop("ATTNCC_PWNED", None) is None, "a file name ran as code"


def _import_file(path, module_name):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k, stem", list(enumerate(HOSTILE_STEMS)), ids=[f"stem{k}" for k in range(len(HOSTILE_STEMS))])
def test_hostile_file_names_stay_text(tmp_path, monkeypatch, no_payload, k, stem):
    monkeypatch.chdir(tmp_path)  # a payload writing a relative path would write here
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    path = spec_dir / f"{stem}.toml"
    kind = 'kind = "linear"\nhead_dim = 16\n' if k % 3 == 2 else 'head_dim = 16\n[mask]\nwhere = "causal"\n'
    path.write_text(f'name = "hostile{k}"\n' + kind)
    before = set(os.listdir(tmp_path))
    (out,) = build([str(path)], tmp_path / "out")
    text = out.read_text(encoding="utf-8")
    assert not any(CODING.match(line) for line in text.splitlines()[:2])  # no encoding declaration
    ast.parse(text)  # it is Python, with the header still comments
    module = _import_file(out, f"_attncc_hostile_{k}")
    assert not hasattr(builtins, "ATTNCC_PWNED")
    assert set(os.listdir(tmp_path)) == before | {"out"}
    assert module.SPEC.source == str(path)
    assert module.SPEC.name == f"hostile{k}"
    assert str(path) in module.__doc__


def _one_comment(line: str) -> bool:
    """``line`` is code ``x = 1`` followed by exactly one comment, and nothing after it."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(line).readline)
            if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    return [t.type for t in toks] == [tokenize.NAME, tokenize.OP, tokenize.NUMBER, tokenize.COMMENT]


def test_escaped_text_is_one_comment_and_a_faithful_literal():
    rng = random.Random(15)
    alphabet = ('abc"\'\\#{}%\n\r\t\x00\x0b\x0c\x1b\x7f\x85\xa0\u2028\u2029\u202e\ufeff\udcff\U0001f600 '
                "\u00e9N{}x0u")
    samples = ["", "specs/causal.toml", '"""', "'''", "\\", "\\N{LATIN SMALL LETTER A}"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 24))) for _ in range(400)]
    for s in samples:
        assert ast.literal_eval(py_str(s)) == s
        assert ast.literal_eval('"""' + escaped(s) + '"""') == s  # inside a docstring
        assert _one_comment(f"x = 1  # {escaped(s)}\n"), repr(s)
    assert escaped("specs/causal.toml") == "specs/causal.toml"  # ordinary paths read as they are


def test_templates_use_only_the_escaping_filters():
    """jinja's tojson is JSON, not Python (astral characters become surrogate pairs); raw
    `{{ source }}` is code. Every template goes through escaped / py_str instead."""
    for path in TEMPLATES.glob("*.j2"):
        text = path.read_text()
        assert "tojson" not in text, path.name
        for raw in ("{{ source }}", "{{ line }}\n#", "# {{ line }}", "{{ decode.reason }}", "{{ decode.note }}"):
            assert raw not in text, (path.name, raw)


def test_render_escapes_expressions_in_header_comments():
    # sympy prints expressions with identifiers and numbers only; still, every header line is one comment
    p = parse_spec('name = "hdr"\nhead_dim = 16\n[params]\nw = 3\n[mask]\nwhere = "abs(i - j) <= w"\n', "a\nb.toml")
    text = render(p)
    header = text.split('"""')[0].splitlines()
    assert all(line.startswith("#") or not line for line in header)
    assert "# Spec: a\\nb.toml" in header


# --- atomic builds ------------------------------------------------------------------------

CAUSAL = 'head_dim = 16\n[mask]\nwhere = "causal"\n'


def _specs(folder, texts):
    folder.mkdir(exist_ok=True)
    paths = []
    for name, text in texts.items():
        (folder / f"{name}.toml").write_text(text)
        paths.append(str(folder / f"{name}.toml"))
    return paths


def _snapshot(folder):
    return {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in sorted(folder.iterdir())}


def test_symlinks_in_the_output_are_replaced_not_followed(tmp_path):
    (a,) = _specs(tmp_path / "specs", {"a": CAUSAL})
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "victim.py"
    victim.write_text("precious\n")
    (out / "a.py").symlink_to(victim)
    (out / "__init__.py").symlink_to(elsewhere / "new_init.py")  # dangling: writing through it would create it
    build([a], out)
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim.py"]
    for name in ("a.py", "__init__.py"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert (out / "a.py").read_text(encoding="utf-8") == render(load_spec(a))
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "a.py"]  # no temporary files left


def test_symlink_target_is_stale(tmp_path):
    (a,) = _specs(tmp_path / "specs", {"a": CAUSAL})
    out = tmp_path / "out"
    build([a], out)
    (tmp_path / "copy.py").write_text((out / "a.py").read_text())
    (out / "a.py").unlink()
    (out / "a.py").symlink_to(tmp_path / "copy.py")  # same text, but build would replace the link
    assert stale([a], out) == [out / "a.py"]


def test_a_spec_failing_to_render_writes_nothing(tmp_path, monkeypatch):
    import attncc.codegen as codegen

    paths = _specs(tmp_path / "specs", {"a": CAUSAL, "b": CAUSAL, "c": CAUSAL, "d": CAUSAL})
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.py").write_text("old a\n")
    before = _snapshot(out)
    real = codegen.render_files  # what build renders each spec with (the module, and Gluon fragments)

    def render_or_fail(pattern):
        if pattern.name == "c":
            raise RuntimeError("the third spec fails")
        return real(pattern)

    monkeypatch.setattr(codegen, "render_files", render_or_fail)
    with pytest.raises(RuntimeError, match="third spec"):
        build(paths, out)
    assert _snapshot(out) == before


def test_a_spec_failing_to_parse_writes_nothing(tmp_path):
    paths = _specs(tmp_path / "specs", {"a": CAUSAL, "b": '[mask]\nwhere = "k < i"\n', "c": CAUSAL})
    with pytest.raises(SpecError, match="unknown variable 'k'"):
        build(paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_specs_with_one_name_are_refused(tmp_path):
    paths = _specs(tmp_path / "specs", {"first": 'name = "same"\n' + CAUSAL, "second": 'name = "same"\n' + CAUSAL})
    for call in (build, stale):
        with pytest.raises(SpecError) as e:
            call(paths, tmp_path / "out")
        assert e.value.key == "name" and "first.toml" in str(e.value) and "second.toml" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_readers_never_see_a_partial_file(tmp_path):
    """A file open before the build still reads its old text in full: build replaces the
    directory entry (rename) instead of truncating and rewriting the file in place."""
    (a,) = _specs(tmp_path / "specs", {"a": CAUSAL})
    out = tmp_path / "out"
    out.mkdir()
    old = "# Generated by attncc (an earlier build)\n" + "old text\n" * 1000
    (out / "a.py").write_text(old)
    with open(out / "a.py") as reader:
        build([a], out)
        assert reader.read() == old
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "a.py").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    paths = _specs(tmp_path / "specs", {"a": CAUSAL, "b": CAUSAL})
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.py").write_text("# Generated by attncc (an earlier build)\nold b\n")
    real, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if str(dst).endswith("b.py"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError):
        build(paths, out)
    assert (out / "b.py").read_text() == "# Generated by attncc (an earlier build)\nold b\n"
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "a.py", "b.py"]  # the temporary file is gone


def test_cli_reports_an_unwritable_output(tmp_path):
    (a,) = _specs(tmp_path / "specs", {"a": CAUSAL})
    (tmp_path / "out").write_text("a file, not a folder\n")
    r = subprocess.run([sys.executable, "-m", "attncc", "build", a, "--out", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("attncc build: cannot write") and "Traceback" not in r.stderr


def test_python_dash_m_attncc_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "attncc", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"attncc {attncc.__version__}"
    r = subprocess.run([sys.executable, "-m", "attncc", "build", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--check" in r.stdout


def test_cli_reports_what_the_code_generator_lacks(tmp_path, monkeypatch, capsys):
    import attncc.codegen as codegen
    from attncc.cli import main

    (a,) = _specs(tmp_path / "specs", {"a": CAUSAL})

    def lacking(pattern):
        raise NotImplementedError("attncc cannot render Foo: foo(i)")

    monkeypatch.setattr(codegen, "render_files", lacking)
    assert main(["build", a, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "attncc build: attncc cannot render Foo: foo(i)\n"
    assert not (tmp_path / "out").exists()


def test_builds_into_one_folder_never_take_another_specs_file(tmp_path):
    """`<x>_gluon.py` is spec x's Gluon fragments file and the module of a spec named x_gluon: a later
    build into the same folder refuses to replace or remove the other one (found by a probe: building
    x deleted the module of x_gluon, or replaced it with x's fragments), and writes nothing."""
    specs = {"a": 'name = "foo_gluon"\n[mask]\nwhere = "j <= i"\n',
             "plain": 'name = "foo"\n[mask]\nwhere = "j <= i"\n',  # no fragments: its build removed foo_gluon.py
             "fragments": 'name = "foo"\n[params]\nw = 5\n[mask]\nwhere = "j <= i and i - j < w"\n'}
    files = {}
    for key, text in specs.items():
        files[key] = tmp_path / f"{key}.toml"
        files[key].write_text(text)
    out = tmp_path / "out"
    build([files["a"]], out)
    module = (out / "foo_gluon.py").read_text()
    for other in ("plain", "fragments"):
        with pytest.raises(SpecError, match="not a Gluon fragments file"):
            build([files[other]], out)
        assert (out / "foo_gluon.py").read_text() == module and not (out / "foo.py").exists()
    out2 = tmp_path / "out2"
    build([files["fragments"]], out2)
    fragments = (out2 / "foo_gluon.py").read_text()
    with pytest.raises(SpecError, match="holds the Gluon fragments"):
        build([files["a"]], out2)
    assert (out2 / "foo_gluon.py").read_text() == fragments
    build([files["fragments"]], out2)  # its own fragments: rebuilt as before
    build([files["plain"]], out2)  # and removed when the spec has none now
    assert not (out2 / "foo_gluon.py").exists() and (out2 / "foo.py").exists()
