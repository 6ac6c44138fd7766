"""Every kernel the generated modules launch compiles for sm90 (H100) with the tile configs a GPU
picks: what the CPU interpreter cannot check (types, layouts, constants, shared memory).

A child process imports every module of generated/ (their kernels must be JITFunctions:
tests/kernel_compile.py) and runs its calls on CPU tensors as on a GPU: TRITON_INTERPRET is unset,
so ``pick_config`` takes the built-in GPU configs, bf16 operands stay bf16 and fast math is on;
only the argument checks' device test runs as under the interpreter. The calls (:func:`_drive`):
forward and backward at head dim 128 in bf16 and at the spec's other declared head dims, short
and long keys (both config families of runtime/configs.py), with and without the LSE's gradient,
inference forwards, a position past int32 (WIDE), packed variable-length batches, the exact block
lists where a closed-form walk exists (forced, with their tile kernels), dropout, learned inputs'
gradients, fp16 and fp32 (causal; fp32 at long keys and head dim 256, and t5_bias's at long keys),
decoding from a contiguous and a paged cache, split (the merge kernel) and not; linear attention's
forward, backward (with a state) and step, and its forward and backward in fp32. The launches are
recorded, not run, deduplicated by kernel source and Triton's specialization, and compiled for
sm_90 in a pool of two processes. The child starts when pytest's collection ends (conftest.py,
tests/early_child.py; this module's tests then run last): it compiles in one process beside the
tests before them, on the core a serial run leaves idle, and in two once the fixture waits.

How far each compiles (:func:`_plan`): every launch through Triton's front end, TTIR and TTGIR;
one launch per kernel source and operand dtype on to LLVM IR and PTX, at one of the tile configs
that source is launched with, the configs rotating over the specs so that every config of every
kernel is lowered too (the launches that differ only in boolean flags lower the same layouts; not
those made for their shared memory alone: _ttgir_only); ATTNCC_SM90_LOWER=all (the slow test)
lowers each source at each of its configs. On to the cubin (ptxas) only where the kernel holds
attncc's own inline assembly, which nothing but ptxas reads. Measured (session 27, 2 cores loaded
5-7x, 737 launches): every config of each source lowered (222 launches), LLVM IR and PTX took 58%
of the stages' time and the child 587 s of CPU; one config per source (128), 38% less time in
LLVM IR and PTX, 24% less in all stages, 518 s of CPU. Earlier, on 2 cores: 581 launches, 233 of
them lowered, 112 s; every launch to PTX took 193 s, and every launch to the cubin, which
ATTNCC_SM90_CUBIN=1 asks for, 11 minutes on a loaded machine (45% of it ptxas). With the float32
and shared-memory launches (614, the same 233 lowered) the child's compile time summed over both
processes was 1021 s against 1246 s before them, on a machine loaded 3x (9.8 minutes of wall time
for the test).

Shared memory: every launch's, as Triton allocates it (``metadata["shared"]``; for the launches
that stop at TTGIR, the nvidia backend's allocation pass run on the TTGIR:
kernel_compile.allocated_shared, equal to the backend's own number on every lowered launch), must
fit an sm90 CTA: the built-in configs never count on attncc.runtime.launch retrying a shallower
pipeline. attncc.runtime.configs.shared_bytes, the model those configs (and the tuner's
candidates) are chosen by, must never be below Triton's number for the attention kernels.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import triton
import triton.language as tl

from attncc.runtime.configs import shared_bytes
from cases import SPEC_NAMES
from early_child import EarlyChild, pool_map, watch_parent
from kernel_compile import without_interpreter

ROOT = Path(__file__).resolve().parent.parent
SM90_SHARED = 232448  # bytes of shared memory one sm90 CTA may use (227 KB)
# calls some specs refuse (the test checks that the others make them)
VARLEN_REFUSED = {"bigbird", "document", "padding"}  # masks reading [inputs] or random_blocks(): tests/test_varlen.py
NO_DECODE = {"bigbird"}  # random_blocks() depend on each row's length
NO_WIDE = {"bigbird"}  # its random-block table is made on the host for every block up to the last position (minutes)
# constexprs and options named in a launch's label
LABEL = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "VARLEN", "WIDE", "LISTS", "PAGE_SIZE", "SPLIT",
         "RETURN_LSE", "HAS_DLSE")


def _argv(folder, *args):
    return [sys.executable, __file__, "--child", str(folder / "report.json"), *args]


def _env(folder):
    # no tuned configs (the defaults); the plain launch, which the child records (the fast launch
    # would call the compiled kernel it keeps, on a CUDA device this machine may not have)
    return dict(without_interpreter(), ATTNCC_CACHE_DIR=str(folder / "tune"), ATTNCC_FAST_LAUNCH="0")


def _run_child(tmp_path, *args, **env):
    run = subprocess.run(_argv(tmp_path, *args), env=dict(_env(tmp_path), **env), cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads((tmp_path / "report.json").read_text())


# The report's child starts when collection ends (conftest.py, tests/early_child.py): it compiles on
# the core the tests before this module leave idle.
EARLY_CHILDREN = {"report": EarlyChild("sm90", _argv, _env, timeout=900, cwd=ROOT)}


@pytest.fixture(scope="module")
def report():
    outcome = EARLY_CHILDREN["report"].result()
    assert outcome.returncode == 0, outcome.failure()
    print(f"sm90 child: {outcome.seconds:.0f} s since it started, {outcome.waited:.0f} s waited for; "
          f"{(outcome.stderr.strip().splitlines() or [''])[-1]}", file=sys.stderr)
    return json.loads((outcome.child.folder / "report.json").read_text())


def _failures(launches):
    return "\n\n".join(f"{x['label']} (launched by {', '.join(x['modules'])}): {x['error']}"
                       for x in launches if x["error"])


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_kernel_of_the_spec_compiles_for_sm90(report, name):
    mine = [x for x in report["launches"] if name in x["modules"]]
    assert mine, f"no kernel of generated/{name}.py was launched"
    assert not _failures(mine), f"kernels of generated/{name}.py that do not compile for sm90:\n" + _failures(mine)
    assert all(x["bytes"] for x in mine)
    expected = report["expected"][name]
    missing = set(expected["kernels"]) - {x["name"] for x in mine}
    assert not missing, f"{name}: kernels the module launches that no call launched: {sorted(missing)}"
    for kernel, const, values in expected["variants"]:
        got = {json.dumps(x["const"].get(const)) for x in mine if x["name"] == kernel}
        assert got >= {json.dumps(v) for v in values}, \
            f"{name}: {kernel} launched with {const} in {got}, not all of {values}"


def test_the_runtime_kernels_compile_and_the_configs_are_the_gpus(report):
    assert not _failures(report["launches"]), _failures(report["launches"])
    merge = [x for x in report["launches"] if x["name"] == "_merge_kernel"]
    assert merge and all(x["bytes"] for x in merge)
    causal = [x for x in report["launches"] if x["name"] == "_fwd_kernel" and "causal" in x["modules"]]
    # the tiles of a GPU (runtime/configs.py default_config), not the interpreter's 32 x 32: short
    # keys, long keys, head dim 256
    tiles = {(x["const"]["BLOCK_M"], x["const"]["BLOCK_N"], x["options"]["num_warps"], x["options"]["num_stages"])
             for x in causal}
    assert {(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 2)} <= tiles, tiles
    assert {x["signature"]["Q"] for x in causal} == {"*bf16", "*fp16", "*fp32"}


def test_shared_memory_at_ttgir_is_the_backends(report):
    """The shared memory of the launches that stop at TTGIR comes from the backend's allocation
    pass alone (kernel_compile.allocated_shared): on every launch lowered further, it is the
    number the backend's own TTGIR -> LLVM IR stage reports."""
    lowered = [x for x in report["launches"] if x["shared_ttgir"] is not None]
    assert len(lowered) > 100
    assert all(x["shared_ttgir"] == x["shared"] for x in lowered), \
        [(x["label"], x["shared_ttgir"], x["shared"]) for x in lowered if x["shared_ttgir"] != x["shared"]][:5]
    assert all(x["shared"] > 0 for x in report["launches"] if x["model"] is not None)


@pytest.mark.slow
def test_every_config_of_every_kernel_source_lowers_for_sm90(tmp_path):
    """Every kernel source lowered to PTX at each of its tile configs (ATTNCC_SM90_LOWER=all: 222
    lowerings), not at one per source and the configs rotating over the specs (_plan: 128)."""
    launches = _run_child(tmp_path, ATTNCC_SM90_LOWER="all")["launches"]
    assert not _failures(launches), _failures(launches)
    assert sum(x["shared_ttgir"] is not None for x in launches) > 200


def test_the_shared_memory_model_is_never_below_tritons(report):
    """attncc.runtime.configs.shared_bytes (the built-in configs fit the GPU by it, the tuner
    prunes by it) against Triton's number, launch by launch: never below, and for 16-bit operands
    within 12% above (32-bit ones: Triton keeps shallower pipelines than the model counts)."""
    rows = [x for x in report["launches"] if x["model"] is not None]
    assert {x["name"] for x in rows} == set(MODEL_KERNELS), {x["name"] for x in rows}
    below = [(x["label"], x["model"], x["shared"]) for x in rows if x["model"] < x["shared"]]
    assert not below, below
    loose = [(x["label"], x["model"], x["shared"]) for x in rows
             if x["signature"]["Q"] != "*fp32" and x["model"] > 1.12 * x["shared"]]
    assert not loose, loose


# ---------------------------------------------------------------------------------------
# The check can fail: kernels the interpreter runs and sm90 refuses
# ---------------------------------------------------------------------------------------


@triton.jit
def _loop_type_kernel(X, OUT, n):
    """A sum whose loop-carried value starts as an int and becomes a float: Python (the
    interpreter) does not care, Triton's compiler refuses a loop-carried type change."""
    acc = 0
    for i in range(n):
        acc += tl.load(X + i)
    tl.store(OUT, acc)


@triton.jit
def _shared_kernel(X, OUT, n):
    """X [128, n] @ X^T in [128, 256] x [256, 128] tiles: launched 5 stages deep, the pipelined
    tiles (4 x 128 KB in fp16) need more shared memory than an sm90 CTA has."""
    rows = tl.arange(0, 128)
    cols = tl.arange(0, 256)
    acc = tl.zeros([128, 128], tl.float32)
    for k in range(0, n, 256):
        a = tl.load(X + rows[:, None] * n + k + cols[None, :])
        b = tl.load(X + rows[None, :] * n + k + cols[:, None])
        acc += tl.dot(a, b)
    tl.store(OUT + rows[:, None] * 128 + rows[None, :], acc)


def _broken_launches():
    import torch

    x = (torch.arange(128 * 512) % 7).half().view(128, 512)  # (the interpreter gets bf16 dots wrong)
    _loop_type_kernel[(1,)](torch.arange(5, dtype=torch.float32), torch.zeros(1), 5)
    out = torch.zeros(128, 128)
    _shared_kernel[(1,)](x, out, 512, num_stages=5)
    return x, out


def test_the_interpreter_runs_the_broken_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("conftest runs the tests under TRITON_INTERPRET=1")
    x, out = _broken_launches()
    assert out.equal(x.float() @ x.float().T)


def test_kernels_sm90_refuses_are_failures(tmp_path):
    loop, shared = sorted(_run_child(tmp_path, "--broken")["launches"], key=lambda x: x["label"])
    assert loop["label"].startswith("_loop_type_kernel (fp32, test_sm90_compile")
    assert "Loop-carried variable acc has initial type int32 but is re-assigned to fp32" in loop["error"], loop
    assert shared["label"].startswith("_shared_kernel (fp16, test_sm90_compile, num_stages=5")
    assert "bytes of shared memory, an sm90 CTA has 232448" in shared["error"], shared


# ---------------------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------------------


def _child(out_path, full, broken):
    import importlib
    import resource

    import torch

    from kernel_compile import recorded_launches

    # Launches do not run: what the host reads of a kernel's output (exact tile codes) is then
    # torch.empty's memory; filled (NaN, or an int's largest value), the launches are the same every run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    start = time.perf_counter()
    if broken:
        with recorded_launches() as launches:
            _broken_launches()
        expected = {}
    else:
        import attncc.runtime.call
        import attncc.runtime.decode

        mods = {name: importlib.import_module(f"generated.{name}") for name in SPEC_NAMES}
        # as on a GPU, except the argument checks' device test, which takes CPU tensors under the interpreter
        attncc.runtime.call._bind_checked = _interpreting(attncc.runtime.call._bind_checked)
        attncc.runtime.decode.bind_decode = _interpreting(attncc.runtime.decode.bind_decode)
        # (and a backward's second look at the device: Call.check_device)
        attncc.runtime.call.Call.check_device = _interpreting(attncc.runtime.call.Call.check_device)
        with recorded_launches() as launches:
            _RECORDING[:] = [launches]
            for name, mod in mods.items():
                _drive(name, mod)
        expected = {name: _expected(name, mod) for name, mod in mods.items()}
    _PLAN[:] = _plan(launches, full, every_config=os.environ.get("ATTNCC_SM90_LOWER") == "all")
    _MODULES.update(launches.modules)
    print(f"{len(launches)} launches recorded in {time.perf_counter() - start:.1f} s, "
          f"{sum(last != 'ttgir' for _, last in _PLAN)} lowered to PTX", file=sys.stderr)
    results = pool_map(_compile, len(_PLAN))  # forked: the workers inherit _PLAN
    cpu = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    print(f"done in {time.perf_counter() - start:.0f} s, {cpu:.0f} s of CPU", file=sys.stderr)
    Path(out_path).write_text(json.dumps({"launches": results, "expected": expected}, default=repr))


_PLAN = []  # (launch, last stage) to compile; the pool's processes inherit them (fork)
_MODULES = {}  # Launch.key -> the modules that made the launch
_RECORDING = []  # the launches being recorded (kernel_compile.Recorded)
_TTGIR_ONLY = set()  # keys of the launches compiled to TTGIR only (_ttgir_only)


@contextlib.contextmanager
def _ttgir_only():
    """The launches first made in the block compile to TTGIR only (unless every launch goes to the
    cubin): what they are there for is their shared memory, known at TTGIR (allocated_shared), in
    tile configs and dtypes the lowered launches already take through LLVM and PTX in other sizes;
    lowering their float32 pipelines would take minutes on 2 cores."""
    before = len(_RECORDING[0])
    try:
        yield
    finally:
        _TTGIR_ONLY.update(x.key for x in _RECORDING[0][before:])


def _plan(launches, full, every_config=False):
    """(launch, last stage) of each launch, the largest tiles first (the two processes end together).

    Every launch goes through Triton's front end, TTIR and TTGIR (types, constants, layouts,
    pipelining, shared memory). The lowering to LLVM IR and PTX (and ptxas where attncc wrote
    inline assembly), 58% of the child's compile time when it took every config, is done once per
    kernel source and operand dtype, at one of the tile configs (options, and the constexpr
    parameters that are numbers or strings) that source is launched with: the one at which its
    kernel (``_fwd_kernel``, ...) has been lowered least often so far, so that the configs rotate
    over the specs; then once more for each (kernel, dtype, config) no source was lowered at. Every
    kernel source is lowered, and every config of every kernel. Launches that differ only in
    boolean flags (VARLEN, WIDE, LISTS, RETURN_LSE, ...), in which arguments are None and in
    Triton's specializations (divisibility, ints equal to 1) lower the same layouts.
    ``every_config`` (ATTNCC_SM90_LOWER=all; the slow test): each source at each of its configs.
    ``full``: every launch to the cubin."""
    plan, shapes = [], {}  # shapes: (source, dtype) -> {config: its first launch}
    for x in launches:
        if x.key in _TTGIR_ONLY and not full:
            plan.append([x, "ttgir"])
            continue
        plan.append([x, "cubin" if full else "ttgir"])
        pointers = [kind for _, kind in x.signature if kind.startswith("*")]
        shapes.setdefault((x.source_hash, tuple(pointers[:1])), {}).setdefault(_config(x), len(plan) - 1)
    if not full:
        lowered = collections.Counter()  # (kernel, dtype, config) -> lowerings
        for (_, dtype), configs in shapes.items():
            name = plan[next(iter(configs.values()))][0].name
            chosen = list(configs) if every_config else [min(configs, key=lambda c: lowered[name, dtype, c])]
            for config in chosen:
                lowered[name, dtype, config] += 1
                plan[configs[config]][1] = "ptx"
        for (_, dtype), configs in shapes.items():  # the configs no source was lowered at
            for config, index in configs.items():
                if not lowered[plan[index][0].name, dtype, config]:
                    lowered[plan[index][0].name, dtype, config] += 1
                    plan[index][1] = "ptx"
    return sorted(map(tuple, plan), key=lambda p: (p[1] != "ttgir", _cost(p[0])), reverse=True)


def _config(launch):
    """A launch's tile config: its options and the constexpr parameters that are numbers or strings."""
    constexprs = sorted(p.name for p in launch.fn.params if p.is_constexpr)
    return launch.options, tuple((n, launch.constexpr(n)) for n in constexprs if type(launch.constexpr(n)) in (int, str))


def _cost(launch):
    tiles = launch.constexpr("BLOCK_M", 16) + launch.constexpr("BLOCK_N", 16)
    return dict(launch.options).get("num_warps", 4) * tiles


def _last_stage(ttir: str) -> str:
    """PTX; the cubin too where the kernel holds attncc's own inline assembly (fast math, sqrt.rn.f64),
    whose text only ptxas reads."""
    return "cubin" if "tt.elementwise_inline_asm" in ttir else "ptx"


def _compile(index):
    """The report of one planned compilation: Triton's shared memory (an error past sm90's), the
    model's (:func:`_model_bytes`) and, for a launch lowered past TTGIR, the allocation pass's on
    its TTGIR (``shared_ttgir``: test_shared_memory_at_ttgir_is_the_backends)."""
    from kernel_compile import compile_launch, shared_of_ttgir

    launch, last = _PLAN[index]
    result = {"label": launch.label(*LABEL),
              "modules": _MODULES.get(launch.key, [launch.module]), "name": launch.name,
              "signature": dict(launch.signature),
              "const": {n: launch.constexpr(n) for n in LABEL if launch.constexpr(n, launch) is not launch},
              "options": dict(launch.options), "error": None, "stage": None, "bytes": 0, "shared": 0, "seconds": {},
              "model": _model_bytes(launch), "shared_ttgir": None}
    try:
        compiled = compile_launch(launch, _last_stage if last == "ptx" else last)
    except Exception as e:  # Triton's error, as it reports it
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    shared = compiled.metadata.get("shared", 0)
    result.update(stage=list(compiled.stages)[-1], shared=shared, seconds=compiled.seconds)
    result["bytes"] = len(compiled.stages[result["stage"]])
    if "llir" in compiled.stages:
        result["shared_ttgir"] = shared_of_ttgir(compiled.stages["ttgir"], launch.options)
    if shared > SM90_SHARED:
        result["error"] = f"needs {shared} bytes of shared memory, an sm90 CTA has {SM90_SHARED}"
    return result


MODEL_KERNELS = {"_fwd_kernel": "", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq", "_dec_kernel": "decode"}
ELEMENT_BYTES = {"*bf16": 2, "*fp16": 2, "*fp32": 4}


def _model_bytes(launch):
    """attncc.runtime.configs.shared_bytes of a launch of an attention kernel (None for the others):
    its tiles, dtype, pipeline depth, and the gathers its module's SPEC declares."""
    from attncc.runtime.decode import tiles_in_flight

    kernel = MODEL_KERNELS.get(launch.name)
    if kernel is None:
        return None
    spec = launch.fn.fn.__globals__["SPEC"]
    block_m, block_n = launch.constexpr("BLOCK_M"), launch.constexpr("BLOCK_N")
    resident, streamed = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
    d = max(launch.constexpr("HEAD_DIM_PAD"), launch.constexpr("VALUE_DIM_PAD"))
    stages, signature = dict(launch.options)["num_stages"], dict(launch.signature)
    position_bytes = spec.position_bytes
    if kernel == "decode":
        paged = launch.constexpr("PAGE_SIZE") > 0
        stages = tiles_in_flight(stages, paged) + 1
        position_bytes += {"*i32": 4, "*i64": 8}[signature["BT"]] if paged else 0  # the page of each key
    return shared_bytes(kernel, resident, streamed, d, ELEMENT_BYTES[signature["Q"]], stages, spec.pair_bytes,
                        position_bytes)


def _interpreting(fn):
    """``fn`` run with TRITON_INTERPRET=1 (the argument checks: they take CPU tensors then)."""
    import functools

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            return fn(*args, **kwargs)
        finally:
            del os.environ["TRITON_INTERPRET"]

    return checked


def _expected(name, mod):
    """What the calls of :func:`_drive` must have launched: ``kernels``, every kernel the module
    launches somewhere (``kernel[grid](...)`` in its source); ``variants``, (kernel, constexpr,
    values) of the variants the calls make."""
    import inspect
    import re

    from triton.runtime.jit import JITFunction

    from cases import pattern

    source = inspect.getsource(mod)
    kernels = [k for k, v in vars(mod).items()  # (FastKernel wraps a JITFunction as .fn)
               if JITFunction in (type(v), type(getattr(v, "fn", None))) and re.search(rf"\b{k}\[", source)]
    variants = []
    if pattern(name).kind == "softmax":
        for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
            variants.append((kernel, "VARLEN", [False] if name in VARLEN_REFUSED else [False, True]))
            variants.append((kernel, "WIDE", [False] if name in NO_WIDE else [False, True]))
            if "LISTS" in getattr(mod, kernel).fn.arg_names:
                variants.append((kernel, "LISTS", [False, True]))
        variants += [("_fwd_kernel", "RETURN_LSE", [False, True]), ("_bwd_dq_kernel", "HAS_DLSE", [False, True])]
        if name not in NO_DECODE:
            variants += [("_dec_kernel", "SPLIT", [False, True]), ("_dec_kernel", "PAGE_SIZE", [0, 16])]
    return {"kernels": [k for k in kernels if not (k == "_dec_kernel" and name in NO_DECODE)], "variants": variants}


def _drive(name, mod):
    """The calls of one generated module (see the module doc)."""
    import torch

    from cases import SMALL_PARAMS, heads_for, inputs_for, pattern

    p = pattern(name)
    Hq, Hkv = heads_for(p)
    gen = torch.Generator().manual_seed(0)

    def qkv(B, N, D=128, dtype=torch.bfloat16, grad=True):
        return [(torch.randn(B, h, N, D, generator=gen) / 4).to(dtype).requires_grad_(grad) for h in (Hq, Hkv, Hkv)]

    if p.kind == "linear":
        D = 128 if 128 in p.head_dims else p.head_dims[0]
        with _ttgir_only():  # float32 states (as float16's) and operands
            _fwd_bwd(mod.attention, *qkv(2, 160, D, dtype=torch.float32))
        q, k, v = qkv(2, 160, D)
        _fwd_bwd(mod.attention, q, k, v)
        F = mod.feature_layout(D)[0]
        state = (torch.zeros(2, Hkv, F, D, requires_grad=True), torch.zeros(2, Hkv, F, requires_grad=True))
        _fwd_bwd(lambda *a: mod.attention(*a, initial_state=state, return_state=True)[0], q, k, v)
        with torch.no_grad():
            _, state = mod.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])
            mod.step(q[:, :, 1], k[:, :, 1], v[:, :, 1], state, position=1)
        return

    def inputs(B, n, grad=True):
        """The spec's params and inputs; learned inputs want a gradient; inputs along positions
        past 2**16 are one column broadcast (stride 0: no 2**31-long tensor)."""
        kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, min(n, 2**16), gen))
        for d in p.inputs:
            if n > 2**16 and "n" in d.dims:
                t = kw[d.name]
                for axis, dim in enumerate(d.dims):
                    t = t.narrow(axis, 0, 1) if dim == "n" else t
                kw[d.name] = t.expand(*[n if dim == "n" else size for dim, size in zip(d.dims, t.shape)])
            if d.grad:
                kw[d.name].requires_grad_(grad)
        return kw

    for D in sorted(set(p.head_dims) - {128}):  # the other declared head dims (what `attncc tune` tunes)
        _fwd_bwd(mod.attention, *qkv(2, 200, D), **inputs(2, 200))
    for N in (200, 4096):  # short and long keys: the two config families of runtime/configs.py
        q, k, v = qkv(1, N)
        _fwd_bwd(mod.attention, q, k, v, **inputs(1, N))
        _fwd_bwd(mod.attention, q, k, v, lse=True, **inputs(1, N))
        with torch.no_grad():
            mod.attention(q, k, v, **inputs(1, N, grad=False))
    if p.heads_q is None:  # one head of batch 1, one block of rows: Triton passes an int equal to 1 as a constexpr
        # (H, GROUP, B, the block counts), which has no .to() (alibi's slope helper failed to compile at H = 1 on
        # an H100, session 20)
        with _ttgir_only():
            one = [(torch.randn(1, 1, 16, 128, generator=gen) / 4).to(torch.bfloat16).requires_grad_() for _ in "qkv"]
            kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, 1, 1, 16, gen))
            for d in p.inputs:
                kw[d.name].requires_grad_(d.grad)
            _fwd_bwd(mod.attention, *one, **kw)
    if name not in NO_WIDE:
        wide = 2**31 - 300
        _fwd_bwd(mod.attention, *qkv(1, 200), q_offset=wide, k_offset=wide, **inputs(1, wide + 200))
    cu = torch.tensor([0, 70, 200], dtype=torch.int32)
    varlen = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=130, max_seqlen_k=130)
    if name not in VARLEN_REFUSED:
        _fwd_bwd(mod.attention, *qkv(1, 200), **varlen, **inputs(2, 200))
    if hasattr(mod, "_closed_form"):  # the exact block lists, which a call outside the closed form takes
        closed_form, mod._closed_form = mod._closed_form, lambda call: (False, False)
        try:
            _fwd_bwd(mod.attention, *qkv(2, 200), **inputs(2, 200))
            if name not in VARLEN_REFUSED:
                _fwd_bwd(mod.attention, *qkv(1, 200), **varlen, **inputs(2, 200))
        finally:
            mod._closed_form = closed_form
    if p.dropout:
        mod.dropout_keep_mask(*qkv(1, 200, grad=False), seed=3)
    if name == "causal":  # the other operand dtypes; float32 (other pipelines) at long keys and head dim 256 too
        for dtype in (torch.float16, torch.float32):
            _fwd_bwd(mod.attention, *qkv(2, 200, dtype=dtype))
        with _ttgir_only():
            _fwd_bwd(mod.attention, *qkv(1, 4096, dtype=torch.float32))
            _fwd_bwd(mod.attention, *qkv(1, 200, 256, dtype=torch.float32))
    if name == "t5_bias":  # a table gathered per pair, pipelined through shared memory: float32 at long keys
        with _ttgir_only():
            _fwd_bwd(mod.attention, *qkv(1, 4096, dtype=torch.float32), **inputs(1, 4096))
    if name in NO_DECODE:
        return
    with torch.no_grad():
        q, k, v = qkv(2, 200, grad=False)
        extra = inputs(2, 200, grad=False)
        extra.pop("kv_len", None)  # padding's input is decode's kv_len
        pages = (torch.randn(26, 16, Hkv, 128, generator=gen) / 4).to(torch.bfloat16)
        table = torch.arange(24, dtype=torch.int32).view(2, 12)
        for splits in ("1", "3"):  # one program per row, and split rows merged by the merge kernel
            os.environ["ATTNCC_DECODE_SPLITS"] = splits
            mod.decode(q[:, :, :2], k, v, kv_len=[200, 77], **extra)
            mod.decode(q[:, :, :1], pages, pages, kv_len=[190, 33], block_table=table, **extra)
            if name == "causal":
                mod.decode(q[:, :, :2].half(), k.half(), v.half(), kv_len=[200, 77])
                with _ttgir_only():
                    mod.decode(q[:, :, :2].float(), k.float(), v.float(), kv_len=[200, 77])
        del os.environ["ATTNCC_DECODE_SPLITS"]


def _fwd_bwd(attention, q, k, v, lse=False, **kw):
    import torch

    out = attention(q, k, v, return_lse=True, **kw) if lse else attention(q, k, v, **kw)
    loss = out[0].float().sum() + out[1].masked_fill(out[1].isinf(), 0).sum() if lse else out.float().sum()
    leaves = [t for t in (q, k, v, *kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(loss, leaves, allow_unused=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    watch_parent()
    _child(sys.argv[2], full=os.environ.get("ATTNCC_SM90_CUBIN") == "1", broken="--broken" in sys.argv[3:])
