"""bench/ keeps working without a GPU: the registry is consistent, ``python -m bench`` lists it and
runs cases on the CPU under the interpreter (``--smoke``), every tool starts, and the GPU tests of
tests/gpu/ are skipped whole by a plain pytest run but run at tiny sizes with
ATTNCC_GPU_TESTS_ON_CPU=1. The numbers of a smoke run mean nothing: the code paths run. About 30 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import CASES, GROUPS, SWEEPS, parse_setting, select
from bench.impls import BASELINES, applies
from bench.run import TOOLS, main

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, timeout=300):
    env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_case_has_its_spec_and_baselines():
    """Each baseline a case names has a form of it (bench/impls.py ``applies``); specs exist."""
    for case in CASES.values():
        assert case.transform or (ROOT / "specs" / f"{case.spec}.toml").is_file(), case.name
        assert (ROOT / "generated" / f"{case.spec}.py").is_file() or case.transform, case.name
        for name in case.baselines:
            assert applies(name, case) is None, (case.name, name, applies(name, case))
        assert case.groups, f"{case.name}: in no group"


def test_names_do_not_collide():
    names = [*CASES, *GROUPS, *TOOLS]
    assert len(names) == len(set(names))
    assert set(BASELINES).isdisjoint(CASES)


def test_selection_and_settings():
    assert [c.name for c in select(["causal-8k", "dev"])][:2] == ["causal-8k", "dense-4k"]
    with pytest.raises(ValueError, match="'no-such-case'"):
        select(["dev", "no-such-case"])
    assert parse_setting("ATTNCC_CONFIG=BLOCK_M=64,BLOCK_N=32;ATTNCC_FUSED_DQ=0") == (
        ("ATTNCC_CONFIG", "BLOCK_M=64,BLOCK_N=32"), ("ATTNCC_FUSED_DQ", "0"))
    for bad in ("", "no value", "=1"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            parse_setting(bad)
    assert all(SWEEPS.values())


def test_list_and_errors(capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in [*CASES, *TOOLS, *SWEEPS]:
        assert name in listing
    with pytest.raises(SystemExit) as e:
        main(["dev", "no-such-case"])
    assert e.value.code == 2 and "unknown case or group 'no-such-case'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["causal-8k", "--env", "ATTNCC_FUSED_DQ"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_smoke_run(tmp_path):
    """Attention (forward, backward, a setting of attncc, the baselines) and paged decode on the CPU."""
    done = _run(["-m", "bench", "causal-8k", "decode-8x32k-paged", "--smoke", "--env", "ATTNCC_FUSED_DQ=0",
                 "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    by = {(r["case"], r["impl"]): r for r in rows}
    mine = by[("causal-8k", "attncc")]
    assert mine["fwd_ms"] > 0 and mine["fb_ms"] > 0
    setting = by[("causal-8k", "attncc ATTNCC_FUSED_DQ=0")]
    assert setting["diff_o"] < 1e-4 and setting["diff_grad"] < 1e-4 and "fb_vs_attncc" in setting
    sdpa = by[("causal-8k", "sdpa_flash")]
    assert sdpa["diff_o"] < 1e-4 and sdpa["diff_grad"] < 1e-4
    decode = by[("decode-8x32k-paged", "attncc")]
    assert decode["fwd_tbps"] > 0 and "fb_ms" not in decode
    assert by[("decode-8x32k-paged", "sdpa_flash")]["diff_o"] < 1e-4
    assert "| causal 8K | attncc |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_starts(tool, capsys):
    """Each tool of ``python -m bench TOOL`` imports and parses its arguments."""
    if tool == "train":
        pytest.importorskip("transformers")
    with pytest.raises(SystemExit) as e:
        main([tool, "--help"])
    assert e.value.code == 0 and f"python -m bench {tool}" in capsys.readouterr().out


def test_gpu_tests_skip_whole_without_a_gpu(monkeypatch):
    """Without a GPU (and without ATTNCC_GPU_TESTS_ON_CPU) every module of tests/gpu skips itself
    at import, before it builds or loads anything: the plain pytest run of CI spends no time there."""
    monkeypatch.delenv("ATTNCC_GPU_TESTS_ON_CPU", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "gpu"))
    monkeypatch.delitem(sys.modules, "gpu_env", raising=False)
    import gpu_env

    if gpu_env.ON_GPU:
        pytest.skip("this machine runs the GPU tests")
    modules = sorted((ROOT / "tests" / "gpu").glob("test_*.py"))
    assert len(modules) >= 8
    for path in modules:
        spec = importlib.util.spec_from_file_location(f"_skipped_{path.stem}", path)
        with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_gpu_tests_run_at_cpu_sizes():
    """The first parametrization of every GPU test (tests/gpu/conftest.py) at interpreter sizes:
    the tests themselves run."""
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNCC_GPU_TESTS_ON_CPU="first")
    done = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]
