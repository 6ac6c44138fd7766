"""attncc.compile(spec): TOML text, dicts and paths -> the generated module, imported, with its
source cached on disk (ATTNCC_CACHE_DIR/modules) so that another process only imports it."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import attncc
from attncc import module_cache
from attncc.cli import main as cli_main
from attncc.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parent.parent

WINDOW = 'head_dim = 16\ndtypes = ["float32"]\n[params]\nwindow = 5\n[mask]\nwhere = "j <= i and i - j < window"\n'
WINDOW_DICT = {"head_dim": 16, "dtypes": ["float32"], "params": {"window": 5},
               "mask": {"where": "j <= i and i - j < window"}}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def qkv(seed=0, n=21, heads=(2, 1)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, 16, generator=gen) for h in (heads[0], heads[1], heads[1])]


def check_against_reference(module, text, **kwargs):
    q, k, v = qkv()
    o = module.attention(q, k, v, **kwargs)
    ref = attncc.reference(parse_spec(text), q, k, v, **kwargs)
    assert torch.allclose(o.double(), ref, atol=1e-5), (o.double() - ref).abs().max()


def test_text_dict_and_path_compile_to_modules_that_match_the_reference(tmp_path):
    spec_file = tmp_path / "win.toml"
    spec_file.write_text(WINDOW)
    from_text, from_dict = attncc.compile(WINDOW), attncc.compile(WINDOW_DICT)
    from_path, from_str_path = attncc.compile(spec_file), attncc.compile(str(spec_file))
    assert from_path is from_str_path
    assert from_text.SPEC.name == from_dict.SPEC.name == "pattern" and from_path.SPEC.name == "win"
    for module in (from_text, from_dict, from_path):
        check_against_reference(module, WINDOW)
        check_against_reference(module, WINDOW, window=3)


def test_same_spec_same_module_importable_by_name(cache_dir):
    text = 'name = "same"\n' + WINDOW  # compiled by no other test of this process
    module = attncc.compile(text)
    assert attncc.compile(text) is module
    assert importlib.import_module(module.__name__) is module
    assert module.__name__ == f"attncc_generated_same_{Path(module.__file__).stem.rsplit('_', 1)[1]}"
    assert Path(module.__file__).parent == cache_dir / "modules"
    assert str(cache_dir) not in sys.path


def test_dict_is_the_same_spec_as_its_toml():
    assert tomllib.loads(module_cache.toml_text(WINDOW_DICT)) == WINDOW_DICT
    odd = {"name": "x", "description": 'quote " backslash \\ newline \n tab \t del \x7f é', "mask": {},
           "params": {"a": 1.5e-300, "b": float("inf"), "c": -3}, "inputs": {"t": {"dims": ("b", 4), "grad": False}}}
    back = tomllib.loads(module_cache.toml_text(odd))
    assert back == {**odd, "inputs": {"t": {"dims": ["b", 4], "grad": False}}}


def test_a_string_is_text_when_it_has_a_newline_or_an_equals_sign(tmp_path):
    blank = attncc.compile("")  # an empty spec: dense attention
    assert blank.SPEC.name == "pattern"
    assert attncc.compile('name = "one_line"').SPEC.name == "one_line"
    with pytest.raises(SpecError, match=r"^no_such\.toml: cannot read the spec"):
        attncc.compile("no_such.toml")
    with pytest.raises(TypeError, match="spec must be TOML text"):
        attncc.compile(b"name = 'x'")


# Broken specs: the command, a path, the text and the dict of the text give the same error.
BAD = [
    "scal = 0.1",
    "head_dim = 0",
    "head_dim = [16, \"x\"]",
    '[heads]\nq = 6\nkv = 4',
    '[mask]\nwhere = "j <= q"',
    '[mask]\nwhere = "i +* j"',
    '[params]\ni = 3',
    '[inputs]\nx = { dims = ["b", "m"], dtype = "int32" }',
    '[score]\nsoftcap = -5.0',
]


@pytest.mark.parametrize("text", BAD)
def test_errors_are_the_commands(text, tmp_path, capsys):
    spec_file = tmp_path / "bad.toml"
    spec_file.write_text(text)
    assert cli_main(["build", str(spec_file), "--out", str(tmp_path / "out")]) == 2
    command = capsys.readouterr().err.strip().removeprefix("attncc build: ")
    with pytest.raises(SpecError) as from_path:
        attncc.compile(spec_file)
    assert str(from_path.value) == command
    for spec in (text, tomllib.loads(text)):
        with pytest.raises(SpecError) as e:
            attncc.compile(spec)
        assert str(e.value) == command.replace(str(spec_file), "<string>")
    assert not (tmp_path / "cache" / "modules").exists() or not any((tmp_path / "cache" / "modules").iterdir())


def test_invalid_toml_text_is_the_commands_error(tmp_path, capsys):
    spec_file = tmp_path / "bad.toml"
    spec_file.write_text("head_dim = \n")
    cli_main(["build", str(spec_file), "--out", str(tmp_path / "out")])
    command = capsys.readouterr().err.strip().removeprefix("attncc build: ")
    with pytest.raises(SpecError) as e:
        attncc.compile("head_dim = \n")
    assert "not valid TOML" in command and str(e.value) == command.replace(str(spec_file), "<string>")


@pytest.mark.parametrize("data, key", [({"head_dim": None}, "head_dim"),
                                       ({"mask": {"where": object()}}, "[mask].where"),
                                       ({"inputs": {"t": {"dims": [1.0j]}}}, "[inputs].t.dims"), ({3: 1}, "3")])
def test_dict_values_without_a_toml_form_name_their_key(data, key):
    with pytest.raises(SpecError) as e:
        attncc.compile(data)
    assert e.value.file == "<string>" and e.value.key == key


def test_file_names_come_from_the_name_and_the_hash_only(tmp_path, cache_dir):
    odd = tmp_path / 'we"""ird\\ \n name.toml'  # would end the generated docstring if printed as is
    odd.write_text('name = "plain"\n' + WINDOW)
    module = attncc.compile(odd)
    path, fragments = sorted((cache_dir / "modules").iterdir(), key=lambda p: len(p.name))
    assert path.name.startswith("plain_") and path == Path(module.__file__)
    assert fragments.name == path.stem + "_gluon.py"  # its Gluon sm90 fragments (attncc.codegen.gluon)
    assert module.SPEC.name == "plain"
    check_against_reference(module, WINDOW)


def test_modules_of_one_name_and_different_specs_run_side_by_side_under_torch_compile():
    """The custom ops find each module's kernels by name and spec hash."""
    a = attncc.compile('name = "twin"\n' + WINDOW)
    b = attncc.compile('name = "twin"\nhead_dim = 16\n[mask]\nwhere = "j >= i"\n')
    assert a.SPEC.name == b.SPEC.name and a.SPEC.spec_hash != b.SPEC.spec_hash
    q, k, v = (t.requires_grad_() for t in qkv(seed=1))

    def fn(q, k, v):
        return a.attention(q, k, v).sum() + 2 * b.attention(q, k, v).sum()

    eager = fn(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v))
    assert torch.allclose(out, eager, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)


# -- other processes ----------------------------------------------------------------------------

CHILD = """
import sys, attncc, torch
from attncc import module_cache
m = attncc.compile(sys.argv[1])
q = torch.ones(1, 1, 6, 16)
o = m.attention(q, q, q)
print(module_cache.renders, "jinja2" in sys.modules, "sympy" in sys.modules, m.__name__, float(o.sum()))
"""


def child(cache_dir, spec_path):
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(spec_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(procs):
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        renders, jinja, sympy, name, total = stdout.split()
        out.append((int(renders), jinja == "True", sympy == "True", name, float(total)))
    return out


def test_a_second_process_only_imports(tmp_path, cache_dir):
    spec_file = tmp_path / "win.toml"
    spec_file.write_text(WINDOW)
    ((renders, jinja, _, name, total),) = results([child(cache_dir, spec_file)])
    assert renders == 1 and jinja
    ((renders, jinja, sympy, name2, total2),) = results([child(cache_dir, spec_file)])
    assert (renders, jinja, sympy) == (0, False, False)
    assert (name2, total2) == (name, total)


def test_processes_compiling_one_spec_at_once_all_get_the_whole_module(tmp_path, cache_dir):
    spec_file = tmp_path / "win.toml"
    spec_file.write_text(WINDOW)
    out = results([child(cache_dir, spec_file) for _ in range(4)])
    assert len({(name, total) for _, _, _, name, total in out}) == 1
    files = sorted((cache_dir / "modules").iterdir(), key=lambda p: len(p.name))
    # one module and its Gluon fragments, no temporary file left behind
    assert [f.suffix for f in files] == [".py", ".py"] and files[1].name == files[0].stem + "_gluon.py"
    from attncc.codegen import render

    expected = render(parse_spec(WINDOW, str(spec_file)))
    module, stamp = files[0].read_text().rsplit("\n", 2)[:2]  # the module, then the cache's stamp line
    assert module + "\n" == expected and stamp.startswith(module_cache.STAMP)


def test_write_atomic_never_leaves_a_part(tmp_path, monkeypatch):
    target = tmp_path / "m.py"
    target.write_text("old\n")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        module_cache.write_atomic(target, "new\n" * 1000)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["m.py"]
