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

import dataclasses
import types

import torch

import bench.common
import bench.run
from bench import host_overhead
from bench.cases import CASES, GROUPS, SWEEPS, parse_setting, select
from bench.common import FLEX_MASKS, density, flex_pattern, spec_inputs, spec_pattern
from bench.impls import BASELINES, EXACT_FIRST, EXACT_ONCE, Prepared, applies, attncc_extras, compiled_count, \
    exact_list_extras
from bench.run import TOOLS, main, table

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


def test_case_params_are_the_specs():
    """Every param a case passes is one its spec has (a transform's inline spec takes none), and the
    case passes the same params under --smoke as at its real sizes: a param the real case leaves at
    the spec's value is not set at smoke sizes only (wired-dilated-16k was, and its real run was the
    only one to leave window and dilation to the spec)."""
    for case in CASES.values():
        declared = set() if case.transform else set(spec_pattern(case.spec).param_values)
        for c in (case, case.at_smoke()):
            assert set(c.param_dict) <= declared, (c.name, sorted(c.param_dict), sorted(declared))
        assert set(case.at_smoke().param_dict) == set(case.param_dict), case.name


def _variants(case):
    """The case at its sizes and at smoke sizes, and at smoke sizes leaving every param to its spec."""
    small = case.at_smoke()
    return [case, small, dataclasses.replace(small, params=())]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.decode and c.mask in FLEX_MASKS])
def test_flex_forms_and_densities_compute_the_call(name, monkeypatch):
    """What the bench writes of a case in other forms reads the params the call computes with, the
    spec's values included where the case leaves them out: Flex's mask_mod agrees with the
    reference's mask on sampled query rows (all keys), at the case's sizes and at smoke sizes, and
    the density (smoke sizes) is the reference's fraction of allowed pairs."""
    monkeypatch.setattr(bench.common, "DEV", "cpu")
    g = torch.Generator().manual_seed(0)
    for c in _variants(CASES[name]):
        pattern = spec_pattern(c.mask)
        inputs = spec_inputs(pattern, c.B, c.Hq, c.N, doc_mean=c.doc_mean, device="cpu")
        kw = dict(c.param_dict, **inputs)  # as bench/impls.py prepare: what attncc's call gets
        _, mask_mod, _ = flex_pattern(c.mask, c.Hq, kw, n=c.N)
        rows = sorted({0, c.N - 1, *torch.randint(0, c.N, (4,), generator=g).tolist()})
        keys = torch.arange(c.N)
        for b in range(c.B):
            for r in rows:
                got = torch.ones(c.N, dtype=torch.bool) if mask_mod is None else \
                    mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(r), keys).to(torch.bool)
                assert torch.equal(got, _reference_mask(pattern, c, r, inputs, b)), (c.name, dict(c.params), b, r)
        if c.N <= 128:
            assert density(c.mask, c.N, kw) == pytest.approx(_fraction(pattern, c, inputs)), c.name


def _reference_mask(pattern, c, row, inputs, b):
    from attncc import _reference

    m = _reference.pair_mask(pattern, q_rows=1, k_rows=c.N, q_offset=row, n_q=c.N, n_k=c.N, batch=c.B,
                             inputs=inputs, params=c.param_dict, device="cpu")
    return m[b, 0, 0]


def _fraction(pattern, c, inputs):
    from attncc import _reference

    m = _reference.pair_mask(pattern, q_rows=c.N, k_rows=c.N, batch=c.B, inputs=inputs, params=c.param_dict,
                             device="cpu")
    return float(m.float().mean())


def test_table_takes_rows_without_fields(tmp_path):
    """The markdown table of a run with a case that failed before its first row (no B, N, H, D:
    the GPU run's table raised KeyError 'H' and lost the run's bench.md), heads written as an int
    or as 'Hq/Hkv', a value of another kind than its column's."""
    rows = [dict(case="a", label="case a", B=2, N=64, H=16, D=128, impl="attncc", fwd_ms=1.5),
            dict(case="b", label="case b", B=1, N=64, H="32/8", D=128, impl="flex", fwd_ms=2.0, note="x | y"),
            dict(case="c", label="case c", impl="attncc", note="KeyError: 'window'", failed=True),
            dict(case="d", label="case d", B="?", N=1.5, impl="attncc")]
    text = table(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and len(lines) == 2 + 2 + len(rows)
    assert "| case a | attncc | 2 | 64 | 16 | 128 | 1.500 |" in text and "| 32/8 |" in text
    assert "| case c | attncc | - | - | - | - | - |" in text and "x / y" in text


def test_failed_case_keeps_its_shape_and_the_table(tmp_path, monkeypatch, capsys):
    """A case that raises is one error row with the case's shape, and bench.md / bench.json are still
    written (the run goes on to the next case)."""
    def fail(case, **kw):
        raise KeyError("window")
    monkeypatch.setattr(bench.run, "run_case", fail)
    monkeypatch.setattr(bench.run, "require_device", lambda what: None)
    monkeypatch.setattr(bench.run, "banner", lambda title: title)  # no GPU to name here
    assert main(["wired-dilated-16k", "causal-8k", "--heat", "0", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["case"], r["B"], r["N"], r["H"], r["D"], r["failed"]) for r in rows] == [
        ("wired-dilated-16k", 2, 16384, 16, 128, True), ("causal-8k", 4, 8192, 16, 128, True)]
    assert "KeyError: 'window'" in (tmp_path / "bench.md").read_text()


class _Kernel:
    """Stands for a @triton.jit kernel: Triton's binaries per device (device_caches)."""

    def __init__(self):
        self.device_caches = {0: ({}, {}, None, None, None)}

    def compile(self):
        self.device_caches[0][0][len(self.device_caches[0][0])] = "binary"


def _module(closed=None):
    """A generated module's exact-list parts: _exact_lists compiles its kernel on the first call
    and records whether each call compiled."""
    kernel, calls = _Kernel(), []

    def exact_lists(call, block_m, block_n):
        compiling = not compiled_count(kernel)
        if compiling:
            kernel.compile()
        calls.append(compiling)
        return None, None
    mod = types.SimpleNamespace(_exact_lists=exact_lists, _exact_tiles_kernel=kernel, calls=calls)
    if closed is not None:
        mod._closed_form = lambda call: closed
    return mod


def test_exact_list_rows(monkeypatch):
    """The exact block lists' rows: none where the call keeps both closed forms (it makes no lists;
    the GPU run timed the classification kernel's first compile there, 2930 ms for sink + window),
    the fallback named where a walk takes them; the first call says whether it compiled; the
    once-per-shape time is of a call after the kernel is compiled (warm), not of the compile."""
    monkeypatch.setattr(bench.common, "DEV", "cpu")  # steps_ms synchronizes DEV
    assert exact_list_extras(_module(closed=(True, True)), None, 64, 64) == {}
    extras = exact_list_extras(_module(closed=(True, False)), None, 64, 64)
    assert list(extras) == [EXACT_FIRST, EXACT_ONCE]
    assert all("fallback of the dK/dV walk" in e.note for e in extras.values())
    mod = _module()
    extras = exact_list_extras(mod, None, 64, 64)
    assert list(extras) == [EXACT_FIRST, EXACT_ONCE] and not any(e.note for e in extras.values())
    ms, text = extras[EXACT_FIRST].fn()
    assert ms >= 0 and "compile" in text and "included" in text and mod.calls == [True]
    assert "no compile" in extras[EXACT_FIRST].fn()[1]
    mod.calls.clear()
    assert extras[EXACT_ONCE].fn() >= 0 and mod.calls == [False, False]
    # the once-per-shape row alone in a fresh process: still a warm call timed
    mod = _module()
    exact_list_extras(mod, None, 64, 64)[EXACT_ONCE].fn()
    assert mod.calls == [True, False]
    assert compiled_count(None) is None and compiled_count(object()) is None


@pytest.mark.parametrize("spec,params,rows", [("sink_window", dict(sinks=4, window=24), False),
                                              ("sink_window", dict(sinks=4, window=0), True),
                                              ("dilated", dict(window=40, dilation=3), True),
                                              ("document", {}, False)])
def test_exact_list_rows_of_generated_modules(spec, params, rows):
    """The generated modules: sink + window's call keeps its closed forms (no rows) unless its
    window breaks their precondition; dilated always makes exact lists; a data-dependent mask has
    per-call lists instead."""
    from bench.common import generated

    q = torch.randn(1, 2, 64, 32)
    pattern = spec_pattern(spec)
    kw = dict(params, **spec_inputs(pattern, 1, 2, 64, doc_mean=16, device="cpu"))
    p = Prepared(CASES["causal-8k"], pattern, generated(spec), q, q, q, q, kw, None)
    extras = {}
    attncc_extras(p, extras)
    assert (EXACT_ONCE in extras and EXACT_FIRST in extras) == rows, list(extras)
    assert ("attncc block lists (per call)" in extras) == (spec == "document")
    if rows and spec == "sink_window":
        assert "fallback" in extras[EXACT_ONCE].note


def test_smoke_exact_list_rows(tmp_path):
    """python -m bench on the CPU: the exact lists' rows for dilated (first call, then once per shape,
    after the implementations' rows), none for sink + window (closed forms), wired-dilated-16k runs."""
    done = _run(["-m", "bench", "dilated-16k", "sink-window-16k", "wired-dilated-16k", "--smoke",
                 "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by[("wired-dilated-16k", "attncc")]["fwd_ms"] > 0 and not by[("wired-dilated-16k", "attncc")].get("failed")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dilated = [r["impl"] for r in rows if r["case"] == "dilated-16k"]
    assert dilated[-3:] == [EXACT_FIRST, EXACT_ONCE, "flex create_block_mask"], dilated
    assert by[("dilated-16k", EXACT_ONCE)]["fwd_ms"] > 0 and "interpreter" in by[("dilated-16k", EXACT_FIRST)]["note"]
    assert not [r for r in rows if r["case"] == "sink-window-16k" and "exact" in r["impl"]]


def test_host_tables(tmp_path):
    """The host tool's table, CSV and plot from rows that miss columns, carry notes (one with '|'),
    or failed in part: what the GPU run writes (fake rows, no GPU)."""
    head = host_overhead.GPU_HEAD
    rows = [{"case": "causal", "N": 1024, "impl": "attncc", "host fwd": 60.4, "host f+b": 646.9, "gpu fwd": 46.6,
             "gpu f+b": 751.6, "own fwd": 18.5, "note": "torch.compile: Unsupported: Bad import | result"},
            {"case": "causal", "N": 1024, "impl": "flex", "host fwd": 60.2, "gpu fwd": 53.8},
            {"case": "causal", "N": 4096, "impl": "flex", "host fwd": 61.0, "gpu fwd": float("nan")},
            {"case": "document", "N": 1024, "impl": "attncc"}]
    row = {"case": "document", "N": 4096, "impl": "attncc"}
    host_overhead.fill(row, "stubbed", lambda: {"stub fwd": 1.0})
    host_overhead.fill(row, "torch.compile", lambda: 1 / 0)
    assert row["stub fwd"] == 1.0 and row["note"] == "torch.compile: ZeroDivisionError: division by zero"
    rows.append(row)
    host_overhead.write_tables(rows, head, tmp_path / "out", "title", plot=True)
    md = (tmp_path / "out" / "host_overhead.md").read_text().splitlines()
    assert md[0] == "title" and md[2].startswith("| case | N | impl |") and len(md) == 4 + len(rows)
    assert all(line.count("|") == len(head) + 1 for line in md[2:]), md
    assert "| causal | 1024 | flex | 60.2 |  | 53.8 |" in md[5] and "Bad import / result" in md[4]
    import csv

    with open(tmp_path / "out" / "host_overhead.csv") as f:
        back = list(csv.DictReader(f))
    assert [r["impl"] for r in back] == [r["impl"] for r in rows] and back[0]["host fwd"] == "60.4"
    host_overhead.write_tables([], head, tmp_path / "empty", "title", plot=True)
    assert (tmp_path / "empty" / "host_overhead.md").is_file()


def test_host_stub_run(tmp_path):
    """python -m bench host --stub on the CPU writes its table and CSV, a row per case and length."""
    done = _run(["-m", "bench", "host", "--stub", "--cases", "causal,document", "--n", "64", "--calls", "2",
                 "--rounds", "1", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    md = (tmp_path / "host_overhead.md").read_text()
    assert "| causal | 64 | attncc (stubbed) |" in md and "| document | 64 | attncc (stubbed) |" in md
    assert (tmp_path / "host_overhead.csv").read_text().count("\n") == 3


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
