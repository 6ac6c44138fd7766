"""Packaging: a built wheel carries everything attncc needs at run time, and works without the source tree.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a copy of the files
pyproject.toml names (so that build/ and *.egg-info never land in the checkout, and a file the
build needs but the copy lacks fails here), installed with ``--no-deps`` into a fresh venv that
sees this machine's torch, triton, sympy, jinja2 and networkx (``--system-site-packages``), and
run from a folder outside the repository with no PYTHONPATH: ``python -m attncc build``,
``attncc --version``, a generated kernel under the interpreter against ``attncc.reference``, and
``attncc.compile`` of TOML text. About 30 s. Skipped where setuptools cannot build a wheel offline
(setuptools >= 70.1, or the ``wheel`` package); CI sets ATTNCC_REQUIRE_WHEEL_TEST=1 (.ci/run),
which turns that skip into a failure.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import attncc

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def source_packages() -> set:
    """Every package of the source tree: attncc and each folder below it with an __init__.py."""
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "attncc").rglob("__init__.py")
            if "__pycache__" not in p.parts}


def test_pyproject_lists_every_package():
    """pyproject.toml names its packages one by one (the templates mapping rules out find): a new
    subpackage missing from the list would be left out of every install but an editable one."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed - {"attncc.templates"} == source_packages()
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"attncc.templates": "templates"}


def test_templates_found_in_the_checkout():
    """In a source checkout (no attncc/templates) the one lookup gives the top-level templates/."""
    from attncc.core.resources import templates_dir

    assert not (ROOT / "attncc" / "templates").exists()
    assert templates_dir() == ROOT / "templates"


def _wheel_tools_missing():
    """Why this machine cannot build the wheel offline, or None."""
    # package metadata only: importing setuptools here would swap distutils under this process
    def version(name):
        try:
            return tuple(int(x) for x in importlib.metadata.version(name).split(".")[:2] if x.isdigit())
        except importlib.metadata.PackageNotFoundError:
            return None

    if version("pip") is None:
        return "no pip"
    if version("setuptools") is None:
        return "no setuptools"
    if version("setuptools") < (70, 1) and version("wheel") is None:
        return "setuptools < 70.1 and no wheel package: no offline bdist_wheel"
    return None


def _run(cmd, cwd, env=None, timeout=300):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, wheel path, a work folder outside the repository)."""
    missing = _wheel_tools_missing()
    if missing:
        if os.environ.get("ATTNCC_REQUIRE_WHEEL_TEST"):
            pytest.fail(f"ATTNCC_REQUIRE_WHEEL_TEST is set but the wheel cannot be built offline: {missing}")
        pytest.skip(f"cannot build a wheel offline here: {missing}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("attncc", "templates"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", src,
          "-w", tmp / "dist"], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("attncc-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # pip of the base environment, run by the venv's interpreter, installs into the venv; the
    # base's own attncc (an editable install in development) stays where it is
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return python, wheel, work


def _env(work):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(TRITON_INTERPRET="1", ATTNCC_CACHE_DIR=str(work / "cache"), PYTHONNOUSERSITE="1")
    return env


def test_wheel_contents(installed):
    """Every package, every template (walks.j2, the included ones too) and nothing else."""
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert packages == source_packages()
    templates = {p.name for p in (ROOT / "templates").iterdir() if p.is_file()}
    assert {n.split("/")[-1] for n in names if n.startswith("attncc/templates/")} == templates
    assert "walks.j2" in templates and "softmax_backward.py.j2" in templates
    shipped_py = {n for n in names if n.endswith(".py")}
    source_py = {str(p.relative_to(ROOT)) for p in (ROOT / "attncc").rglob("*.py") if "__pycache__" not in p.parts}
    assert shipped_py == source_py
    assert all(n.startswith(("attncc/", "attncc-")) for n in names), sorted(names)


def test_installed_build_and_run(installed):
    """From outside the repository: ``python -m attncc build``, ``attncc --version``, the generated
    module against the float64 reference under the interpreter, and ``attncc.compile`` of TOML text."""
    python, _, work = installed
    env = _env(work)
    out = _run([python, "-m", "attncc", "build", ROOT / "specs" / "causal.toml", "--out", work / "gen"], cwd=work,
               env=env)
    assert (work / "gen" / "causal.py").is_file(), out
    version = _run([python.parent / "attncc", "--version"], cwd=work, env=env)
    assert version.strip() == f"attncc {attncc.__version__}"
    script = f"""
import sys
from pathlib import Path
import torch
import attncc
import attncc.codegen

venv, root = Path(sys.prefix).resolve(), Path({str(ROOT)!r})
assert Path(attncc.__file__).resolve().is_relative_to(venv), attncc.__file__
assert attncc.codegen.TEMPLATES.resolve().is_relative_to(venv), attncc.codegen.TEMPLATES
assert not any(Path(p or ".").resolve() == root for p in sys.path), sys.path
sys.path.insert(0, "gen")
import causal

gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 37, 16, generator=gen) for _ in range(3))
pattern = attncc.load_spec(root / "specs" / "causal.toml")
want = attncc.reference(pattern, q.double(), k.double(), v.double())
err = float((causal.attention(q, k, v).double() - want).norm() / want.norm())
assert err < 1e-4, err

text = 'name = "wheel_window"\\n[params]\\nwindow = 5\\n[mask]\\nwhere = "j <= i and i - j < window"\\n'
window = attncc.compile(text)
assert Path(window.__file__).resolve().is_relative_to(Path({str(work / "cache")!r}).resolve()), window.__file__
want = attncc.reference(attncc.parse_spec(text), q.double(), k.double(), v.double())
err = float((window.attention(q, k, v).double() - want).norm() / want.norm())
assert err < 1e-4, err
print("ok")
"""
    assert _run([python, "-c", script], cwd=work, env=env).strip().endswith("ok")
