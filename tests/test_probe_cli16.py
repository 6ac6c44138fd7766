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
