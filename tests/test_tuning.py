"""Autotuning: cache keys, the on-disk cache (concurrent writers), the tuner with an injected
timer, `attncc tune` without a GPU, and the interpreter bypass. No GPU needed."""
from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

import attncc
from attncc.cli import main
from attncc.runtime import KernelConfig, bind, pick_config, tuning
from attncc.runtime.launch import default_config
from cases import module, pattern, rel_err


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets an empty cache directory and forgets what earlier tests loaded."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "tune"))
    monkeypatch.delenv("ATTNCC_TUNE", raising=False)
    monkeypatch.delenv("ATTNCC_CONFIG", raising=False)
    tuning._LOADED.clear()
    yield tmp_path / "tune"
    tuning._LOADED.clear()


def make_call(name="causal", N=50, Nk=None, D=32, dtype=torch.float32):
    spec = module(name).SPEC
    q = torch.randn(1, 2, N, D, dtype=dtype)
    k = torch.randn(1, 2, Nk or N, D, dtype=dtype)
    return bind(spec, q, k, k.clone())


def on_gpu_path(monkeypatch):
    """pick_config as on a GPU (the call was bound under the interpreter, on the CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_key_names_gpu_triton_spec_dims_dtype_bucket_kernel():
    call = make_call(N=50, Nk=70, D=32, dtype=torch.bfloat16)
    key = tuning.key_for(call, "dq")
    spec = module("causal").SPEC
    assert (key.gpu, key.spec, key.spec_hash, key.kernel, key.dtype) == ("cpu", "causal", spec.spec_hash, "dq", "bfloat16")
    assert (key.head_dim, key.value_dim, key.n_q, key.n_k) == (32, 32, 64, 128)
    assert key.triton == __import__("triton").__version__
    assert key.entry == f"causal:{spec.spec_hash}|dq|bfloat16|d32x32|n64x128"
    assert tuning.key_for(call, "") != key and tuning.key_for(call, "").entry.split("|")[1] == "fwd"
    assert [tuning.length_bucket(n) for n in (0, 1, 2, 3, 64, 65, 4096, 4097)] == [1, 1, 2, 4, 64, 128, 4096, 8192]
    assert tuning.cache_file_name("NVIDIA H100 80GB HBM3", "3.6.0") == "NVIDIA-H100-80GB-HBM3__triton-3.6.0.json"


def test_cache_dir_env_and_lookup_after_store(cache, monkeypatch):
    call = make_call(N=50)
    key = tuning.key_for(call, "")
    assert tuning.cache_dir() == cache
    assert tuning.cached_config(call) is None
    path = tuning.store(key, {"config": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}, "ms": 1.5})
    assert path.parent == cache and path.name == key.file_name
    assert json.loads(path.read_text())["entries"][key.entry]["config"]["num_warps"] == 8
    same_bucket, next_bucket = make_call(N=64), make_call(N=65)
    on_gpu_path(monkeypatch)
    want = KernelConfig(64, 32, 8, 3)
    assert pick_config(call) == want
    assert pick_config(same_bucket) == want
    assert pick_config(next_bucket) == default_config(next_bucket)  # not tuned
    assert pick_config(call, "dq") == default_config(call, "dq")  # other kernel: not tuned
    tuning._LOADED.clear()  # a new process reads the file
    assert pick_config(call) == want
    monkeypatch.setenv("ATTNCC_CONFIG", "BLOCK_M=16,BLOCK_N=16,num_warps=2,num_stages=1")
    assert pick_config(call) == KernelConfig(16, 16, 2, 1)  # the environment still wins


def _write_entries(directory, worker, count, start):
    import os

    os.environ["ATTNCC_CACHE_DIR"] = directory
    start.wait()
    for i in range(count):
        key = tuning.TuneKey("GPU X", "3.6.0", f"spec{worker}", "abc", "", "bfloat16", 64, 64, 1 << i, 1 << i)
        tuning.store(key, {"config": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, "ms": float(i)})


def test_two_processes_writing_at_once_keep_every_entry(cache):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    count = 12
    procs = [ctx.Process(target=_write_entries, args=(str(cache), w, count, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = tuning.cache_files()
    assert [f.name for f in files] == [tuning.cache_file_name("GPU X", "3.6.0")]
    entries = json.loads(files[0].read_text())["entries"]
    assert len(entries) == 2 * count
    assert {e["key"]["spec"] for e in entries.values()} == {"spec0", "spec1"}
    assert not list(cache.glob("*.tmp"))


def test_tuner_times_each_candidate_through_pick_config_and_caches_the_fastest(monkeypatch):
    call = make_call(N=50, dtype=torch.bfloat16)
    on_gpu_path(monkeypatch)
    seen = []

    def run(c):
        cfg = pick_config(c, "dkdv")
        if cfg.num_stages == 4:
            raise RuntimeError("out of resources")  # a failing candidate is skipped
        seen.append(cfg)

    def timer(fn):
        fn()
        cfg = seen[-1]  # fake: 128-key resident tiles, 32-query streams, 8 warps, 3 stages are fastest
        return abs(cfg.BLOCK_N - 128) + abs(cfg.BLOCK_M - 32) + 10 * abs(cfg.num_warps - 8) + abs(cfg.num_stages - 3) + 1.0

    steps = []
    best = tuning.tune(call, "dkdv", run, timer=timer, progress=lambda done, total: steps.append((done, total)))
    assert best == KernelConfig(32, 128, 8, 3)
    configs = tuning.candidates(call, "dkdv")
    assert steps[-1] == (len(configs), len(configs)) and len(steps) == len(configs)
    assert {c for c in seen} == {c for c in configs if c.num_stages != 4}
    record = tuning.lookup(tuning.key_for(call, "dkdv"))
    assert record["ms"] == 1.0 and record["config"]["BLOCK_N"] == 128
    assert pick_config(call, "dkdv") == best and pick_config(call) == default_config(call)
    # Cached: a second tune times nothing.
    assert tuning.tune(call, "dkdv", run, timer=lambda fn: pytest.fail("timed a cached key")) == best


def test_tuner_raises_when_no_candidate_runs(monkeypatch):
    call = make_call()
    on_gpu_path(monkeypatch)

    def run(c):
        raise ValueError("bad launch")

    with pytest.raises(RuntimeError, match="no config ran.*bad launch"):
        tuning.tune(call, "", run, timer=lambda fn: 1.0)
    assert tuning.lookup(tuning.key_for(call, "")) is None


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
def test_candidates_fit_shared_memory_and_registers(kernel):
    h100 = 232448
    call = make_call(D=128, dtype=torch.bfloat16)
    configs = tuning.candidates(call, kernel, h100)
    assert default_config(call, kernel) in configs and len(set(configs)) == len(configs)
    assert 12 <= len(configs) <= 36
    wide_call = make_call(D=256, dtype=torch.bfloat16)
    wide = tuning.candidates(wide_call, kernel, h100)
    assert len(wide) < len(configs)
    for cfg in wide:
        resident = cfg.BLOCK_N if kernel == "dkdv" else cfg.BLOCK_M
        streamed = cfg.BLOCK_M if kernel == "dkdv" else cfg.BLOCK_N
        acc = resident * 256 * (2 if kernel == "dkdv" else 1)
        smem = 2 * 256 * ((1 if kernel == "" else 2) * resident + 2 * cfg.num_stages * streamed)
        assert cfg == default_config(wide_call, kernel) or (
            acc // (32 * cfg.num_warps) <= tuning.MAX_ACC_PER_THREAD and smem <= h100)


def test_interpreter_bypasses_cache_and_tuner(monkeypatch):
    """Under TRITON_INTERPRET=1 a cached config is ignored, nothing is timed, results stay exact."""
    monkeypatch.setenv("ATTNCC_TUNE", "1")
    monkeypatch.setattr(tuning, "TIMER", lambda fn: pytest.fail("timed under the interpreter"))
    call = make_call(N=40)
    tuning.store(tuning.key_for(call, ""), {"config": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                                                       "num_stages": 3}, "ms": 1.0})
    small = KernelConfig(32, 32, 4, 1)
    assert pick_config(call) == small
    assert tuning.tune(call, "", lambda c: pytest.fail("ran under the interpreter")) == small
    fwd, bwd = object(), object()
    assert tuning.on_the_fly(fwd, bwd) == (fwd, bwd)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=gen) for _ in range(3))
    o = module("causal").attention(q, k, v)
    assert rel_err(o, attncc.reference(pattern("causal"), q.double(), k.double(), v.double())) < 1e-5


def test_on_the_fly_is_off_by_default(monkeypatch):
    on_gpu_path(monkeypatch)
    fwd, bwd = object(), object()
    assert tuning.on_the_fly(fwd, bwd) == (fwd, bwd)
    monkeypatch.setenv("ATTNCC_TUNE", "1")
    tuned_fwd, tuned_bwd = tuning.on_the_fly(fwd, bwd)
    assert tuned_fwd is not fwd and tuned_bwd is not bwd


def test_cli_show_lists_entries_and_clear_removes_them(cache, capsys):
    call = make_call(N=50, dtype=torch.bfloat16)
    for kernel, cfg in (("", (128, 64, 8, 3)), ("dq", (64, 32, 4, 2))):
        fields = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg))
        tuning.store(tuning.key_for(call, kernel), {"config": fields, "ms": 0.25, "default_ms": 0.5})
    assert main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert f"attncc tune cache: {cache} (2 entries in 1 file(s))" in out
    assert "cpu, Triton " in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  causal")]
    assert lines == [
        ["causal", "forward", "bfloat16", "d32x32", "N", "64x64", "BLOCK_M=128", "BLOCK_N=64", "warps=8",
         "stages=3", "0.250", "ms", "(default", "0.500", "ms)"],
        ["causal", "dQ", "bfloat16", "d32x32", "N", "64x64", "BLOCK_M=64", "BLOCK_N=32", "warps=4",
         "stages=2", "0.250", "ms", "(default", "0.500", "ms)"]]
    assert main(["tune", "--clear"]) == 0
    assert "removed 1 cache file(s)" in capsys.readouterr().out
    assert tuning.cache_files() == [] and tuning.cached_config(call) is None


def test_cli_tune_without_cuda_says_so(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune", "specs/causal.toml", "--n", "4096"]) == 2
    err = capsys.readouterr().err
    assert "attncc tune: no CUDA GPU here" in err and "Traceback" not in err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["tune", "specs/causal.toml"]) == 2
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err
    assert main(["tune"]) == 2
    with pytest.raises(SystemExit):
        main(["tune", "specs/causal.toml", "--n", "4k"])
    assert "expected comma-separated integers" in capsys.readouterr().err


WARM_CACHE_PROBE = """
import os, sys, time, torch
import generated.causal as m
from attncc.runtime import bind, pick_config, tuning
call = bind(m.SPEC, *(torch.randn(1, 2, 50, 32) for _ in range(3)))
tuning.store(tuning.key_for(call), {"config": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, "ms": 1.0})
tuning._LOADED.clear()
os.environ["TRITON_INTERPRET"] = "0"
start = time.perf_counter()
cfg = pick_config(call)
print(cfg.BLOCK_N, time.perf_counter() - start, "sympy" in sys.modules)
"""


def test_warm_cache_lookup_is_cheap_and_imports_no_sympy(cache):
    import os
    import subprocess
    import sys

    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", ATTNCC_CACHE_DIR=str(cache), PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", WARM_CACHE_PROBE], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    block_n, seconds, sympy_loaded = out.stdout.split()
    assert block_n == "32" and float(seconds) < 0.2 and sympy_loaded == "False"


def test_tune_command_runs_the_generated_launchers(monkeypatch, tmp_path):
    """`attncc tune`'s per-shape step on the CPU: renders the module, synthesizes [inputs], and hands
    tune() launchers whose forward and backward run (here once, with the config under trial)."""
    from attncc.tune import _module, tune_spec

    ran = []

    def fake_tune(call, kernel, run, progress=None, force=False):
        cfg = KernelConfig(32, 16, 4, 1)
        with tuning.trying(kernel, cfg):
            out = run(call)
        ran.append((kernel, [tuple(t.shape) for t in out]))
        progress(1, 1)
        tuning.store(tuning.key_for(call, kernel), {"config": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4,
                                                               "num_stages": 1}, "ms": 0.5})
        return cfg

    monkeypatch.setattr(tuning, "tune", fake_tune)
    p = pattern("document")
    mod = _module(p, tmp_path)
    assert mod.SPEC.spec_hash == module("document").SPEC.spec_hash  # the cache key of the shipped module
    import io

    bar = io.StringIO()
    lines = tune_spec(mod, p, n_q=40, n_k=40, dtype="float32", head_dim=16, batch=1, heads=2, device="cpu", out=bar)
    assert ran == [("", [(1, 2, 40, 16), (1, 2, 40)]), ("dkdv", [(1, 2, 40, 16)] * 3), ("dq", [(1, 2, 40, 16)] * 3)]
    assert lines[0] == "document forward float32 d16 N 40x40: BLOCK_M=32 BLOCK_N=16 warps=4 stages=1  0.500 ms"
    assert [line.split(":")[0] for line in lines[1:]] == ["document dK/dV float32 d16 N 40x40", "document dQ float32 d16 N 40x40"]
    assert bar.getvalue().count("] 1/1\n") == 3
