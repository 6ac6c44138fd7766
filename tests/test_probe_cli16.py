"""Probe 16 (command line, build, module cache, packaging): a regression test per defect found."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import attncc
from attncc import module_cache
from attncc.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
CAUSAL = 'head_dim = 16\ndtypes = ["float32"]\n[mask]\nwhere = "j <= i"\n'
WINDOW = 'head_dim = 16\ndtypes = ["float32"]\n[params]\nw = 3\n[mask]\nwhere = "j <= i and i - j < w"\n'


# -- attncc build --check: files of specs that are gone -------------------------------------------

def test_check_reports_generated_files_of_specs_that_are_gone(tmp_path, monkeypatch, capsys):
    """`attncc build --check` (the default spec set) passed with generated/old.py left behind by a
    spec deleted or renamed since: CI's check said "up to date" while generated/ held a module no
    spec makes (found by a probe)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "a.toml").write_text(CAUSAL)
    (tmp_path / "specs" / "old.toml").write_text(WINDOW)
    assert cli_main(["build"]) == 0
    assert cli_main(["build", "--check"]) == 0
    (tmp_path / "specs" / "old.toml").unlink()
    (tmp_path / "generated" / "notes.py").write_text("# a file of the user's, not generated\n")
    capsys.readouterr()
    assert cli_main(["build", "--check"]) == 1
    err = capsys.readouterr().err
    assert "generated/old.py" in err and "generated/old_gluon.py" in err and "notes.py" not in err
    assert "Traceback" not in err
    # explicit specs check those specs' files only: the folder may hold other builds' modules
    assert cli_main(["build", "--check", "specs/a.toml"]) == 0


# -- attncc.compile: the module cache ------------------------------------------------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fresh(text):
    """compile() in a state as of a new process: nothing of this text loaded yet."""
    key = module_cache.cache_key(text, module_cache.TEXT_LABEL)
    module_cache._LOADED.pop(key, None)
    for name in [n for n in sys.modules if n.endswith(key)]:
        del sys.modules[name]
    return attncc.compile(text)


def _check_causal(module):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3))
    ref = attncc.reference(attncc.parse_spec(CAUSAL), q, k, v)
    assert torch.allclose(module.attention(q, k, v).double(), ref, atol=1e-5)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "another_module"])
def test_a_damaged_cache_entry_is_rendered_again(cache_dir, damage):
    """A cache file was imported whatever it held: an empty one gave a module without `attention`,
    a truncated one a SyntaxError, another spec's module ran as this one (o of a sliding window for
    a causal spec: found by a probe)."""
    text = 'name = "damaged_' + damage + '"\n' + CAUSAL
    path = Path(_fresh(text).__file__)
    good = path.read_text()
    other = (ROOT / "generated" / "sliding_window.py").read_text()
    path.write_text({"empty": "", "garbage": "garbage(\n", "truncated": good[: len(good) // 2],
                     "another_module": other}[damage])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _fresh(text)
    assert any("rendered again" in str(w.message) for w in caught)
    assert Path(module.__file__).read_text() == good
    _check_causal(module)


def test_damaged_gluon_fragments_render_the_entry_again(cache_dir):
    """The module's stamp covers its Gluon fragments file too (read only on the Gluon path, on a GPU)."""
    text = 'name = "damaged_fragments"\n' + WINDOW
    module = _fresh(text)
    fragments = Path(module.__file__).with_name(Path(module.__file__).stem + "_gluon.py")
    good = fragments.read_text()
    fragments.write_text(good.replace("SEGMENTS = 1", "SEGMENTS = 2"))
    with pytest.warns(RuntimeWarning, match="fragments file .* is missing or changed"):
        _fresh(text)
    assert fragments.read_text() == good
    fragments.unlink()
    with pytest.warns(RuntimeWarning, match="fragments file .* is missing or changed"):
        _fresh(text)
    assert fragments.read_text() == good


def test_an_unwritable_cache_falls_back_to_a_private_folder(tmp_path, monkeypatch):
    """ATTNCC_CACHE_DIR naming a file (or a folder that cannot be written) made compile() raise
    NotADirectoryError from pathlib's mkdir (found by a probe): it warns and compiles into a
    folder of its own."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker))
    text = 'name = "unwritable"\n' + CAUSAL
    with pytest.warns(RuntimeWarning, match="cannot write the module cache"):
        module = _fresh(text)
    assert not Path(module.__file__).is_relative_to(blocker)
    _check_causal(module)


# -- attncc build: files that are not its own, names one file system would merge ---------------------

def test_build_never_replaces_a_file_it_did_not_write(tmp_path):
    """`attncc build specs/helpers.toml --out gen` replaced the user's own gen/helpers.py without a
    word (found by a probe): refused, the file kept; a file build wrote is replaced as before."""
    from attncc.codegen import build
    from attncc.spec import SpecError

    spec = tmp_path / "helpers.toml"
    spec.write_text(CAUSAL)
    out = tmp_path / "gen"
    out.mkdir()
    (out / "helpers.py").write_text("def mine():\n    return 42\n")
    with pytest.raises(SpecError, match="not a file attncc build wrote"):
        build([spec], out)
    assert (out / "helpers.py").read_text() == "def mine():\n    return 42\n"
    (out / "helpers.py").unlink()
    build([spec], out)
    build([spec], out)  # its own file: replaced


def test_names_differing_only_in_case_are_refused_in_one_build(tmp_path):
    """Specs named Foo and foo built generated/Foo.py and generated/foo.py: one file where file names
    ignore case (macOS, Windows), the second spec's module replacing the first's (found by a probe)."""
    from attncc.codegen import build
    from attncc.spec import SpecError

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('name = "Foo"\n' + CAUSAL)
    b.write_text('name = "foo"\n' + WINDOW)
    with pytest.raises(SpecError, match="differs only in case"):
        build([a, b], tmp_path / "gen")
    assert not (tmp_path / "gen").exists()


# -- spec keys -------------------------------------------------------------------------------------

def test_description_must_be_text_and_file_names_say_they_are_the_name(tmp_path):
    """`description = 5` (or a table) was accepted without a word though the docs say string; a file
    a-b.toml was refused as `name: expected a Python identifier ... 'a-b'` for a spec that has no name
    key (found by a probe): the error says the file name stands for it."""
    from attncc.spec import SpecError, load_spec, parse_spec

    with pytest.raises(SpecError, match="description: expected a string, got an integer 5"):
        parse_spec("description = 5\n")
    assert parse_spec('description = "any text, \\"quotes\\", {{ jinja }} # too"\n').name == "pattern"
    bad = tmp_path / "a-b.toml"
    bad.write_text(CAUSAL)
    with pytest.raises(SpecError, match="no name key, so its file name is the module's name.*'a-b'"):
        load_spec(bad)
    bad.write_text('name = "a_b"\n' + CAUSAL)
    assert load_spec(bad).name == "a_b"


# -- spec files' encoding ------------------------------------------------------------------------------

def test_spec_files_are_read_as_utf8_whatever_the_locale(tmp_path, capsys):
    """A spec file that is not UTF-8 gave a UnicodeDecodeError traceback from build, explain and
    attncc.compile; a UTF-8 one with `# café` failed the same way under LANG=C without UTF-8 mode (the
    locale's encoding read it); a UTF-8 BOM was 'Invalid statement (at line 1, column 1)' (found by a
    probe)."""
    from attncc.spec import SpecError, load_spec

    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"head_dim = 16\n# caf\xe9\n")
    assert cli_main(["build", str(latin), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "0xe9 at offset 19" in err and "Traceback" not in err
    with pytest.raises(SpecError, match="not UTF-8 text"):
        attncc.compile(latin)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbfhead_dim = 16\n")
    with pytest.raises(SpecError, match="byte order mark"):
        load_spec(bom)
    crlf = tmp_path / "crlf.toml"
    crlf.write_bytes(b"head_dim = 16\r\n[mask]\r\nwhere = \"j <= i\"\r\n")
    assert load_spec(crlf).source_hash == attncc.parse_spec('head_dim = 16\n[mask]\nwhere = "j <= i"\n').source_hash
    utf8 = tmp_path / "utf8.toml"
    utf8.write_text("head_dim = 16\n# café — ok\n", encoding="utf-8")
    code = f"import attncc; print(attncc.load_spec({str(utf8)!r}).head_dims)"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "(16,)", r.stderr


# -- attncc explain: what no call takes, and sizes it cannot count ---------------------------------

def _explain(argv, capsys):
    from attncc.explain import main_explain

    code = main_explain(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.err


def test_explain_refuses_what_no_call_takes(capsys):
    """explain described calls that every generated module refuses: --heads 3 of a spec fixing 32 query
    heads (or 5 beside 8 kv heads), --head-dim 999; a param making a divisor 0 raised a ValueError
    traceback (status 1); a spec error exited 1 where build and tune exit 2 (found by a probe)."""
    specs = ROOT / "specs"
    code, err = _explain([str(specs / "gqa.toml"), "--heads", "3", "--n", "64"], capsys)
    assert code == 2 and "fixes [heads].q = 32" in err
    assert _explain([str(specs / "gqa.toml"), "--heads", "32", "--n", "64"], capsys)[0] == 0
    code, err = _explain([str(specs / "sliding_window.toml"), "--head-dim", "999", "--n", "64"], capsys)
    assert code == 2 and "--head-dim up to 256" in err
    code, err = _explain([str(specs / "strided.toml"), "--param", "stride=0", "--n", "64"], capsys)
    assert code == 2 and "division by zero" in err
    code, err = _explain([str(specs / "no_such_spec.toml")], capsys)
    assert code == 2 and "cannot read the spec" in err


def test_explain_refuses_tile_grids_too_large_to_count(capsys):
    """Block-list and [inputs] patterns are counted on the whole tile grid: strided at --n 4194304 (within
    the documented 2**24) asked numpy for 16 GiB, --block 1x1 at --n 16384 took 10 GB and a minute
    (found by a probe); refused at once, naming --block."""
    specs = ROOT / "specs"
    for argv in (["strided.toml", "--n", "4194304"], ["strided.toml", "--n", "16384", "--block", "1x1"],
                 ["document.toml", "--n", "20000", "--block", "1x1"]):
        code, err = _explain([str(specs / argv[0]), *argv[1:]], capsys)
        assert code == 2 and "more than 2**27" in err and "--block" in err, argv
    # closed forms count per block: long lengths stay fine
    assert _explain([str(specs / "sliding_window.toml"), "--n", "262144"], capsys)[0] == 0


def test_module_names_of_packages_the_compiler_imports_are_refused():
    """generated/mpmath.py on sys.path (a script run from generated/) broke sympy's `import mpmath.libmp`
    and so attncc.compile; the refused names listed only torch, numpy, sympy, jinja2... not the packages
    they import (found by a probe)."""
    from attncc.spec import SpecError, parse_spec

    for name in ("mpmath", "markupsafe", "typing_extensions", "torchgen", "filelock", "fsspec"):
        with pytest.raises(SpecError, match="would shadow"):
            parse_spec(f'name = "{name}"\n')


def test_spec_files_are_read_up_to_1_mib(tmp_path, capsys):
    """`attncc build /dev/zero` (or attncc.compile of it) read until memory ran out: a MemoryError
    traceback under a memory limit, all of the machine's memory without one (found by a probe)."""
    from attncc.spec import SpecError

    assert cli_main(["build", "/dev/zero", "--out", str(tmp_path / "gen")]) == 2
    assert "at most 1048576 bytes" in capsys.readouterr().err
    with pytest.raises(SpecError, match="at most 1048576 bytes"):
        attncc.compile("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_text("head_dim = 16\n" + "#" * (2**20) + "\n")
    with pytest.raises(SpecError, match="at most 1048576 bytes"):
        attncc.load_spec(big)


def test_build_refuses_an_empty_out_and_says_a_spec_given_twice(tmp_path, monkeypatch, capsys):
    """`--out ""` (an unset $OUT) wrote the module and an __init__.py into the current folder without a
    word; a spec given twice read "'a' is also the name of specs/a.toml" (found by a probe)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "a.toml").write_text(CAUSAL)
    assert cli_main(["build", "specs/a.toml", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["specs"]
    assert cli_main(["build", "specs/a.toml", "./specs/a.toml", "--out", "gen"]) == 2
    assert "is given twice" in capsys.readouterr().err


def test_paths_of_undecodable_bytes_print_under_a_strict_stdout(tmp_path):
    """Under a UTF-8 locale whose stdout is strict (en_US.UTF-8 without UTF-8 mode), `attncc build a.toml
    --out $'g\\xff'` wrote the module and then died printing "wrote g\\udcff/a.py" (UnicodeEncodeError,
    status 1); explain of such a spec path likewise (found by a probe)."""
    spec = tmp_path / "a.toml"
    spec.write_text(CAUSAL)
    out = os.fsdecode(bytes(tmp_path) + b"/g\xff")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8:strict", "PYTHONUTF8": "0"}
    r = subprocess.run([sys.executable, "-X", "utf8=0", "-m", "attncc", "build", str(spec), "--out", out], env=env,
                       capture_output=True)
    assert r.returncode == 0 and b"\\udcff/a.py" in r.stdout and not r.stderr, r.stderr
