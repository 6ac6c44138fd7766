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
gradients, fp16 and fp32 (causal), decoding from a contiguous and a paged cache, split (the merge
kernel) and not; linear attention's forward, backward (with a state) and step. The launches are
recorded, not run, deduplicated by kernel source and Triton's specialization, and compiled for
sm_90 in a pool of two processes.

How far each compiles (:func:`_plan`): every launch through Triton's front end, TTIR and TTGIR;
one launch per kernel source, operand dtype and tile config on to LLVM IR and PTX (the launches
that differ only in boolean flags lower the same layouts), and on to the cubin (ptxas) only where
the kernel holds attncc's own inline assembly, which nothing but ptxas reads. Measured on 2 cores:
581 launches, 233 of them lowered, 112 s; every launch to PTX took 193 s, and every launch to the
cubin, which ATTNCC_SM90_CUBIN=1 asks for, 11 minutes on a loaded machine (45% of it ptxas).
Shared memory past an sm90 CTA's is an error, except where attncc.runtime.launch retries a
config one pipeline stage shallower (then the stages it would run are compiled).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import triton
import triton.language as tl

from cases import SPEC_NAMES
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


def _run_child(tmp_path, *args):
    out = tmp_path / "report.json"
    env = dict(without_interpreter(), ATTNCC_CACHE_DIR=str(tmp_path / "tune"))  # no tuned configs: the defaults
    run = subprocess.run([sys.executable, __file__, "--child", str(out), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_child(tmp_path_factory.mktemp("sm90"))


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
    import multiprocessing

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

        launching = importlib.import_module("attncc.runtime.launch")  # (attncc.runtime.launch is the function)
        mods = {name: importlib.import_module(f"generated.{name}") for name in SPEC_NAMES}
        # as on a GPU, except the argument checks' device test, which takes CPU tensors under the interpreter
        attncc.runtime.call._bind_checked = _interpreting(attncc.runtime.call._bind_checked)
        attncc.runtime.decode.bind_decode = _interpreting(attncc.runtime.decode.bind_decode)
        with recorded_launches() as launches:
            launching._launch = _retrying(launching._launch, launches)
            for name, mod in mods.items():
                _drive(name, mod)
        expected = {name: _expected(name, mod) for name, mod in mods.items()}
    _PLAN[:] = _plan(launches, full)
    _MODULES.update(launches.modules)
    print(f"{len(launches)} launches recorded in {time.perf_counter() - start:.1f} s, "
          f"{sum(last != 'ttgir' for _, last in _PLAN)} lowered to PTX", file=sys.stderr)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_compile, range(len(_PLAN)), chunksize=1)
    Path(out_path).write_text(json.dumps({"launches": results, "expected": expected}, default=repr))


_PLAN = []  # (launch, last stage) to compile; the pool's processes inherit them (fork)
_MODULES = {}  # Launch.key -> the modules that made the launch
_RETRIED = set()  # keys of the launches made through attncc.runtime.launch, which retries shallower pipelines


def _retrying(launch, launches):
    """attncc.runtime.launch._launch, noting the launches it makes (see _compile)."""
    def run(*args, **kwargs):
        before = len(launches)
        try:
            return launch(*args, **kwargs)
        finally:
            _RETRIED.update(x.key for x in launches[before:])

    return run


def _plan(launches, full):
    """(launch, last stage) of each launch, the largest tiles first (the two processes end together).

    Every launch goes through Triton's front end, TTIR and TTGIR (types, constants, layouts,
    pipelining). The lowering to LLVM IR and PTX (and ptxas where attncc wrote inline assembly)
    is done once per kernel source, operand dtype and tile config (options, and the constexpr
    parameters that are numbers or strings): the launches that differ only in boolean flags
    (VARLEN, WIDE, LISTS, RETURN_LSE, ...), in which arguments are None and in Triton's
    specializations (divisibility, ints equal to 1) lower the same layouts. ``full``: every
    launch to the cubin."""
    lowered, plan = set(), []
    for x in launches:
        constexprs = {p.name for p in x.fn.params if p.is_constexpr}
        pointers = [kind for _, kind in x.signature if kind.startswith("*")]
        shape = (x.source_hash, x.options, tuple(pointers[:1]), tuple(
            (name, x.constexpr(name)) for name in sorted(constexprs) if type(x.constexpr(name)) in (int, str)))
        plan.append((x, "cubin" if full else "ptx" if shape not in lowered else "ttgir"))
        lowered.add(shape)
    return sorted(plan, key=lambda p: (p[1] != "ttgir", _cost(p[0])), reverse=True)


def _cost(launch):
    tiles = launch.constexpr("BLOCK_M", 16) + launch.constexpr("BLOCK_N", 16)
    return dict(launch.options).get("num_warps", 4) * tiles


def _last_stage(ttir: str) -> str:
    """PTX; the cubin too where the kernel holds attncc's own inline assembly (fast math, sqrt.rn.f64),
    whose text only ptxas reads."""
    return "cubin" if "tt.elementwise_inline_asm" in ttir else "ptx"


def _compile(index):
    """The report of one planned compilation. Shared memory past sm90's is an error, except for
    the launches attncc.runtime.launch retries with one pipeline stage fewer until they fit: those
    are compiled as the GPU would retry them ("fallback" lists the stage counts that did not fit)."""
    import dataclasses

    from kernel_compile import compile_launch

    launch, last = _PLAN[index]
    result = {"label": launch.label(*LABEL),
              "modules": _MODULES.get(launch.key, [launch.module]), "name": launch.name,
              "signature": dict(launch.signature),
              "const": {n: launch.constexpr(n) for n in LABEL if launch.constexpr(n, launch) is not launch},
              "options": dict(launch.options), "error": None, "stage": None, "bytes": 0, "shared": 0, "seconds": {},
              "fallback": []}
    while True:
        try:
            compiled = compile_launch(launch, _last_stage if last == "ptx" else last)
        except Exception as e:  # Triton's error, as it reports it
            result["error"] = f"{type(e).__name__}: {e}"
            return result
        shared = compiled.metadata.get("shared", 0)
        stages = dict(launch.options).get("num_stages", 3)
        if shared <= SM90_SHARED or launch.key not in _RETRIED or stages <= 1:
            break
        result["fallback"].append((stages, shared))
        shallower = {**dict(launch.options), "num_stages": stages - 1}
        launch = dataclasses.replace(launch, options=tuple(sorted(shallower.items())))
    result.update(stage=list(compiled.stages)[-1], shared=shared, seconds=compiled.seconds)
    result["bytes"] = len(compiled.stages[result["stage"]])
    if shared > SM90_SHARED:
        result["error"] = f"needs {shared} bytes of shared memory, an sm90 CTA has {SM90_SHARED}"
    return result


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
        variants += [("_fwd_kernel", "RETURN_LSE", [False, True]), ("_bwd_preprocess", "HAS_DLSE", [False, True])]
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
    if name == "causal":  # the other operand dtypes
        for dtype in (torch.float16, torch.float32):
            _fwd_bwd(mod.attention, *qkv(2, 200, dtype=dtype))
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
        del os.environ["ATTNCC_DECODE_SPLITS"]


def _fwd_bwd(attention, q, k, v, lse=False, **kw):
    import torch

    out = attention(q, k, v, return_lse=True, **kw) if lse else attention(q, k, v, **kw)
    loss = out[0].float().sum() + out[1].masked_fill(out[1].isinf(), 0).sum() if lse else out.float().sum()
    leaves = [t for t in (q, k, v, *kw.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(loss, leaves, allow_unused=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], full=os.environ.get("ATTNCC_SM90_CUBIN") == "1", broken="--broken" in sys.argv[3:])
