"""Autotuning: cache keys, the on-disk cache (concurrent writers), the tuner with an injected
timer, `attncc tune` without a GPU, and the interpreter bypass. No GPU needed."""
from __future__ import annotations

import itertools
import json
import multiprocessing

import pytest
import torch

import attncc
from attncc.cli import main
from attncc.runtime import KernelConfig, bind, pick_config, tuning
from attncc.runtime.configs import config_shared_bytes
from attncc.runtime.launch import default_config
from cases import SMALL_PARAMS, SPEC_NAMES, heads_for, inputs_for, module, pattern, rel_err


@pytest.fixture(autouse=True)
def cache(tune_cache):
    """Every test gets an empty cache directory and forgets what earlier tests loaded (conftest.py)."""
    return tune_cache


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
    best = tuning.tune(call, "dkdv", run, timer=timer, quick_timer=timer, exhaustive=True,
                       progress=lambda done, total: steps.append((done, total)))
    assert best == KernelConfig(32, 128, 8, 3)
    configs = tuning.candidates(call, "dkdv", exhaustive=True)
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
    configs = tuning.candidates(call, kernel, h100, exhaustive=True)
    assert default_config(call, kernel) in configs and len(set(configs)) == len(configs)
    assert 12 <= len(configs) <= 36
    wide_call = make_call(D=256, dtype=torch.bfloat16)
    wide = tuning.candidates(wide_call, kernel, h100, exhaustive=True)
    assert len(wide) < len(configs)
    for cfg in wide:
        resident = cfg.BLOCK_N if kernel == "dkdv" else cfg.BLOCK_M
        streamed = cfg.BLOCK_M if kernel == "dkdv" else cfg.BLOCK_N
        acc = resident * 256 * (2 if kernel == "dkdv" else 1)
        smem = 2 * 256 * ((1 if kernel == "" else 2) * resident + 2 * cfg.num_stages * streamed)
        assert cfg == default_config(wide_call, kernel) or (
            acc // (32 * cfg.num_warps) <= tuning.MAX_ACC_PER_THREAD and smem <= h100)


@pytest.mark.parametrize("inputs, mask, bias, want", [
    ('rel = { dims = ["h", 32], dtype = "float32" }', "", "rel[h, bucket(j - i)]", (4, 0)),  # per pair
    ('doc = { dims = ["b", "n"], dtype = "int32" }', "doc[b, i] == doc[b, j]", "", (0, 8)),  # per row, per key
    ('kv = { dims = ["b"], dtype = "int64" }\nw = { dims = ["h"], dtype = "float32" }', "j < kv[b]", "w[h]", (0, 0)),
    ('t = { dims = ["h", 7], dtype = "float16" }\nu = { dims = ["b", "n"], dtype = "int64" }',
     "u[b, j] >= 0", "t[h, (i + j) % 7] + t[h, 3]", (2, 8)),
])
def test_spec_info_counts_what_the_loops_gather(inputs, mask, bias, want, tmp_path):
    """Bytes gathered from inputs per pair and per position in the kernels' loops (shared memory per
    pipeline stage, configs.shared_bytes): from what each access reads, into the module's SPEC."""
    from attncc.codegen.softmax import loop_gathers
    from cases import build_inline

    text = f"[inputs]\n{inputs}\n" + (f'[mask]\nwhere = "{mask}"\n' if mask else "") + \
        (f'[score]\nbias = "{bias}"\n' if bias else "")
    assert loop_gathers(attncc.parse_spec(text)) == want
    if want == (4, 0):
        _, mod = build_inline({"gathers": text}, tmp_path)["gathers"]
        assert (mod.SPEC.pair_bytes, mod.SPEC.position_bytes) == want
    assert (module("t5_bias").SPEC.pair_bytes, module("document").SPEC.position_bytes) == (4, 8)


SOFTMAX_SPECS = [name for name in SPEC_NAMES if pattern(name).kind == "softmax"]


@pytest.mark.parametrize("name", SOFTMAX_SPECS)
def test_built_in_configs_fit_shared_memory(name, monkeypatch):
    """Each kernel's built-in config (forward, dK/dV, dQ; decode) at every head dim the spec
    declares, in bfloat16, float16 and float32, at short and long keys, fits an H100's shared
    memory by the model (configs.shared_bytes; tests/test_sm90_compile.py holds it to Triton's
    numbers), and is the measured one (configs._measured_config) wherever that fits: fitting
    cuts only what would not launch (t5_bias's 128 x 128 x 3-stage forward took 361472 bytes)."""
    from attncc.runtime import configs, decode

    h100 = configs.SM90_SHARED
    p = pattern(name)
    Hq, Hkv = heads_for(p)
    gen = torch.Generator().manual_seed(0)
    for D, dtype, N in itertools.product(p.head_dims, (torch.bfloat16, torch.float16, torch.float32), (200, 4096)):
        q, k = torch.zeros(1, Hq, N, D, dtype=dtype), torch.zeros(1, Hkv, N, D, dtype=dtype)
        kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, 1, Hq, N, gen))
        call = bind(module(name).SPEC, q, k, k, kwargs=dict(kw))
        for kernel in ("", "dkdv", "dq"):
            cfg, measured = default_config(call, kernel), configs._measured_config(call, kernel)
            case = f"{name} D={D} {dtype} N={N} {kernel or 'forward'}: {cfg}"
            assert config_shared_bytes(call, kernel, cfg) <= h100, case
            assert cfg == measured or config_shared_bytes(call, kernel, measured) > h100, case
        if name == "bigbird":  # (no decode: random blocks depend on each row's length)
            continue
        kw.pop("kv_len", None)
        dcall = decode.bind_decode(module(name).SPEC, q[:, :, :4], k, k, kv_len=[N], kwargs=kw)
        monkeypatch.setattr(decode, "interpreting", lambda: False)
        cfg = decode.decode_config(dcall)
        # the measured depth everywhere (3 tiles in flight, 2 above head dim 128): all fit
        assert decode.shared_memory(dcall, cfg) <= h100 and cfg.num_stages == (4 if D <= 128 else 3), (name, D, cfg)
        monkeypatch.undo()


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
@pytest.mark.parametrize("D, N", [(64, 4096), (128, 1024), (128, 16384), (256, 4096)])
def test_pruned_candidates_are_few_fit_and_keep_the_default(kernel, D, N):
    """Issue 18: a handful of configs per kernel (compiling 85 took three minutes), each within
    shared memory and the register model, one pipeline depth per tile shape, the default kept."""
    h100 = 232448
    q = torch.empty(2, 16, N, D, dtype=torch.bfloat16)
    call = bind(module("causal").SPEC, q, q, q)
    pruned = tuning.candidates(call, kernel, h100, sm_count=132)
    full = tuning.candidates(call, kernel, h100, exhaustive=True)
    default = default_config(call, kernel)
    assert default in pruned and len(set(pruned)) == len(pruned) and set(pruned) <= set(full)
    assert 2 <= len(pruned) <= min(tuning.MAX_CANDIDATES, len(full))
    shapes = [(c.BLOCK_M, c.BLOCK_N, c.num_warps) for c in pruned if c != default]
    assert len(shapes) == len(set(shapes))
    for cfg in pruned:
        resident, streamed = (cfg.BLOCK_N, cfg.BLOCK_M) if kernel == "dkdv" else (cfg.BLOCK_M, cfg.BLOCK_N)
        assert cfg == default or (
            tuning.live_per_thread(kernel, resident, streamed, D, cfg.num_warps) <= tuning.MAX_LIVE_PER_THREAD
            and config_shared_bytes(call, kernel, cfg) <= h100)


def test_cost_model_prefers_small_tiles_on_short_grids():
    """Few programs for many SMs: a 128-row tile leaves more of them idle than a 64-row one."""
    q = torch.empty(1, 1, 512, 64, dtype=torch.bfloat16)
    call = bind(module("causal").SPEC, q, q, q)
    big, small = KernelConfig(128, 64, 4, 3), KernelConfig(64, 64, 4, 3)
    cost = lambda cfg: tuning.estimated_cost(call, "", cfg, 232448, 132)  # noqa: E731
    assert cost(small) < cost(big)
    q = torch.empty(8, 32, 8192, 64, dtype=torch.bfloat16)  # many programs: fewer loads per FLOP win
    call = bind(module("causal").SPEC, q, q, q)
    assert cost(big) < cost(small)


def test_two_rounds_time_the_fastest_third_and_the_default_again(monkeypatch):
    call = make_call(N=64, D=64, dtype=torch.bfloat16)
    on_gpu_path(monkeypatch)
    configs = tuning.candidates(call, "", exhaustive=True)
    default = default_config(call, "")
    quick = {cfg: 10.0 + i for i, cfg in enumerate(c for c in configs if c != default)}
    quick[default] = 100.0  # slow in the short round: still timed again (the gain's baseline)
    runs, full = [], []

    def run(c):
        runs.append(pick_config(c))

    def quick_timer(fn):
        fn()
        return quick[runs[-1]]

    def timer(fn):
        fn()
        full.append(runs[-1])
        return 1.0 if runs[-1] == default else 0.8

    best = tuning.tune(call, "", run, timer=timer, quick_timer=quick_timer, exhaustive=True)
    kept = max(2, -(-len(configs) // 3))
    assert full == sorted(quick, key=quick.get)[:kept] + [default]
    assert best == full[0]
    record = tuning.lookup(tuning.key_for(call, ""))
    assert (record["ms"], record["default_ms"]) == (0.8, 1.0)
    assert tuning.gain(record) == pytest.approx(0.25)


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
         "stages=3", "0.250", "ms", "(default", "0.500", "ms,", "+100.0%", "over", "the", "built-in", "config)"],
        ["causal", "dQ", "bfloat16", "d32x32", "N", "64x64", "BLOCK_M=64", "BLOCK_N=32", "warps=4",
         "stages=2", "0.250", "ms", "(default", "0.500", "ms,", "+100.0%", "over", "the", "built-in", "config)"]]
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

    def fake_tune(call, kernel, run, progress=None, force=False, **kw):
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


# --- malformed cache files ----------------------------------------------------------------

KEY_FIELDS = ("spec", "spec_hash", "kernel", "dtype", "head_dim", "value_dim", "n_q", "n_k")  # as store() writes them
GOOD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
MALFORMED_RECORDS = [
    5, "config", None, [], {},
    {"config": None, "ms": 1.0},
    {"config": [64, 32, 8, 3], "ms": 1.0},
    {"config": {**GOOD_CONFIG, "BLOCK_M": "64"}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "BLOCK_N": 32.0}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "num_warps": True}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "num_stages": None}, "ms": 1.0},
    {"config": {k: v for k, v in GOOD_CONFIG.items() if k != "num_stages"}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "BLOCK_M": 3}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "BLOCK_N": 1 << 40}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "num_warps": 0}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "num_stages": -1}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "tile": 5}, "ms": 1.0},
    {"config": {**GOOD_CONFIG, "warp_specialize": "yes"}, "ms": 1.0},
    {"config": GOOD_CONFIG, "ms": "fast"},
    {"config": GOOD_CONFIG, "ms": float("nan")},
    {"config": GOOD_CONFIG},
    {"config": GOOD_CONFIG, "ms": 1.0, "default_ms": [1]},
]


def _write_cache(call, records, kernel="", **top):
    """A cache file holding ``records`` (entry -> record as stored, key fields added to dicts)."""
    key = tuning.key_for(call, kernel)
    fields = {f: getattr(key, f) for f in KEY_FIELDS}
    entries = {entry: ({**r, "key": fields} if isinstance(r, dict) and r and "key" not in r else r)
               for entry, r in records.items()}
    path = tuning.cache_dir() / key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "gpu": key.gpu, "triton": key.triton, "entries": entries, **top}))
    return key, path


@pytest.mark.parametrize("record", MALFORMED_RECORDS, ids=[f"record{k}" for k in range(len(MALFORMED_RECORDS))])
def test_malformed_records_are_ignored_by_pick_config(record, monkeypatch, caplog):
    call, other = make_call(N=50), make_call(N=200)
    good_key = tuning.key_for(other, "")
    good = {"config": GOOD_CONFIG, "ms": 1.0, "key": {f: getattr(good_key, f) for f in KEY_FIELDS}}
    _write_cache(call, {tuning.key_for(call).entry: record, good_key.entry: good})
    on_gpu_path(monkeypatch)
    assert pick_config(call) == default_config(call)  # never a TypeError on every call
    assert pick_config(other) == KernelConfig(64, 32, 8, 3)  # the good entry of the file still counts
    assert "ignoring tune cache entry" in caplog.text
    assert "ignored malformed entry" in __import__("attncc.tune").tune.show()


def test_record_keys_with_wrong_types_are_ignored(monkeypatch):
    call = make_call(N=50)
    key = tuning.key_for(call)
    fields = {f: getattr(key, f) for f in KEY_FIELDS}
    bad = {"config": GOOD_CONFIG, "ms": 1.0, "key": {**fields, "head_dim": "32", "spec": ["causal"]}}
    _write_cache(call, {key.entry: bad, "x": {"config": GOOD_CONFIG, "ms": 1.0, "key": {**fields, "kernel": "bwd"}},
                        "y": {"config": GOOD_CONFIG, "ms": 1.0, "key": None}})
    on_gpu_path(monkeypatch)
    assert pick_config(call) == default_config(call)
    from attncc.tune import show

    text = show()  # sorting and formatting malformed keys used to raise
    assert text.count("ignored malformed entry") == 3


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"version": 1, "entries": ' + "{\"a\": " * 50_000 + "1" + "}" * 50_001,
                                     "not json", '{"version": 1, "entries": []}', "[]", '{"version": 1, "gpu": 5, "entries": {}}'],
                         ids=["deep-list", "deep-entries", "not-json", "entries-list", "list", "gpu-number"])
def test_unreadable_cache_files_are_ignored(content, monkeypatch, caplog):
    call = make_call(N=50)
    key = tuning.key_for(call)
    path = tuning.cache_dir() / key.file_name
    path.parent.mkdir(parents=True)
    path.write_text(content)
    on_gpu_path(monkeypatch)
    assert pick_config(call) == default_config(call)
    assert main(["tune", "--show"]) == 0
    tuning.store(key, {"config": GOOD_CONFIG, "ms": 1.0})  # a store replaces what it cannot read
    tuning._LOADED.clear()
    assert pick_config(call) == KernelConfig(64, 32, 8, 3)


def test_show_and_clear_report_what_they_cannot_use(cache, capsys):
    call = make_call(N=50)
    _write_cache(call, {"bad": {"config": {"BLOCK_M": "x"}}, tuning.key_for(call).entry: {"config": GOOD_CONFIG, "ms": 1.0}})
    (cache / "deep__triton-0.json").write_text("[" * 100_000 + "]" * 100_000)
    (cache / "folder__triton-0.json").mkdir()
    assert main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "(1 entry in 3 file(s))" in out
    assert "ignored malformed entry 'bad': config.BLOCK_M is not an integer" in out
    assert "deep__triton-0.json: ignored, unreadable (RecursionError)" in out and "folder__triton-0.json: ignored" in out
    assert main(["tune", "--clear"]) == 1  # the folder stays, and says so
    captured = capsys.readouterr()
    assert "removed 2 cache file(s)" in captured.out
    assert "could not remove folder__triton-0.json" in captured.err and "Traceback" not in captured.err
    assert [p.name for p in tuning.cache_files()] == ["folder__triton-0.json"]


def test_store_refuses_a_malformed_record():
    call = make_call(N=50)
    with pytest.raises(ValueError, match="config.BLOCK_M is not an integer"):
        tuning.store(tuning.key_for(call), {"config": {**GOOD_CONFIG, "BLOCK_M": "64"}, "ms": 1.0})


def test_clear_keeps_the_lock_and_waits_for_a_writer(cache):
    """store() holds an flock on <file>.lock while it merges; clear() used to delete that file,
    after which a second writer locks a new file and two merges run at once (one is lost)."""
    import fcntl
    import threading

    call = make_call(N=50)
    key = tuning.key_for(call)
    path = tuning.store(key, {"config": GOOD_CONFIG, "ms": 1.0})
    lock_path = path.with_suffix(".lock")
    inode = lock_path.stat().st_ino
    with open(lock_path, "a") as held:  # a writer in the middle of its merge
        fcntl.flock(held, fcntl.LOCK_EX)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (tuning.clear(), done.set()))
        worker.start()
        assert not done.wait(0.5)  # clear waits for the writer
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(10)
    assert done.is_set() and not path.exists()
    assert lock_path.exists() and lock_path.stat().st_ino == inode


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
def test_pruned_candidates_give_each_warpgroup_64_resident_rows(kernel):
    """At head dim 128 no pruned config runs 8 warps over 64 resident rows (dK/dV 64 keys x 8 warps
    took 1.6-2.0x the built-in's backward on an H100, docs/performance.md session 13), and the
    narrow dK/dV config that won on the 2D neighborhood (32 queries x 64 keys, 4 warps) is tried."""
    q = torch.empty(2, 16, 16384, 128, dtype=torch.bfloat16)
    call = bind(module("causal").SPEC, q, q, q)
    pruned = tuning.candidates(call, kernel, 232448, sm_count=132)
    for cfg in pruned:
        resident = cfg.BLOCK_N if kernel == "dkdv" else cfg.BLOCK_M
        assert resident >= 64 * cfg.num_warps // 4, cfg
    if kernel == "dkdv":
        assert (32, 64, 4) in [(c.BLOCK_M, c.BLOCK_N, c.num_warps) for c in pruned]


def test_tune_times_each_dtype_once():
    """--dtype bf16,bfloat16,fp16 names two dtypes: each is tuned once."""
    from attncc.tune import _dtypes
    assert _dtypes("bf16,bfloat16,fp16") == ["bfloat16", "float16"]
