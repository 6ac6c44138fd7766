"""The per-call host path (issue 18): what a call does is counted here, not timed.

- bind() checks a call signature once: a second call of the same signature is a cache hit,
  and the hit still sees this call's tensors (values, conversions) and never keeps them alive;
- nothing on the path of a repeated call reads a tensor's value on the host (``.item()``,
  ``.tolist()``, ``bool()``/``int()``/``float()`` of a tensor), forward and backward, for
  static, data-dependent and padded masks (launches stubbed: the interpreter itself reads values);
- configs are picked once per signature (and again after the tune cache changed);
- the backward gets no materialized zero dLSE;
- importing the runtime pulls in no compiler dependency, and ``attncc build`` no torch.

Timings live in bench/host_overhead.py (``python -m bench host``) and docs/performance.md ("Host overhead").
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import attncc
from attncc.runtime import autograd, call as call_mod, tuning
from cases import module

from bench.host_overhead import stub_launches, unstub

ROOT = Path(__file__).resolve().parent.parent

launch = importlib.import_module("attncc.runtime.launch")  # the module (attncc.runtime.launch is its function)


def qkv(B=2, Hq=4, Hkv=2, N=40, D=16, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=gen).requires_grad_(grad) for h in (Hq, Hkv, Hkv)]


def doc_ids(B, N, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.rand(B, N, generator=gen) < 0.2, 1).to(torch.int32)


def _stats():
    return dict(call_mod.BIND_STATS)


def test_same_signature_binds_once():
    mod = module("causal")
    q, k, v = qkv(N=23)  # a length no other test here uses: the first call is a miss
    before = _stats()
    mod.attention(q, k, v)
    mod.attention(*qkv(N=23, seed=1))
    after = _stats()
    assert after.get("miss", 0) - before.get("miss", 0) == 1
    assert after.get("hit", 0) - before.get("hit", 0) == 1


@pytest.mark.parametrize("change", [
    dict(q_offset=1), dict(return_lse=True), dict(scale=0.5), dict(n_k=40),
])
def test_other_scalars_are_other_signatures(change):
    mod = module("causal")
    q, k, v = qkv(N=29)
    mod.attention(q, k, v)
    before = _stats().get("miss", 0)
    mod.attention(q, k, v, **change)
    assert _stats().get("miss", 0) == before + 1


def test_equal_but_differently_typed_scalars_are_checked_again():
    """1 == True == 1.0 as dict keys: the signature keys the type too, so a cached call never
    lets a wrongly typed one through."""
    mod = module("sliding_window")
    q, k, v = qkv(N=20)
    mod.attention(q, k, v, window=2, return_lse=True)
    with pytest.raises(TypeError, match="window must be an int"):
        mod.attention(q, k, v, window=2.0, return_lse=True)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        mod.attention(q, k, v, window=2, return_lse=1)


def test_cache_hit_uses_this_calls_inputs_and_conversions():
    """A hit binds this call's tensors: new document ids (as int16, widened to int32 per call)
    change the result exactly as the reference says."""
    mod = module("document")
    pattern = attncc.load_spec(ROOT / "specs" / "document.toml")
    q, k, v = qkv(N=37)
    for seed in (1, 2, 3):
        doc = doc_ids(2, 37, seed).to(torch.int16)
        o = mod.attention(q, k, v, doc=doc)
        ref = attncc.reference(pattern, q.double(), k.double(), v.double(), doc=doc)
        assert (o.double() - ref).abs().max() < 1e-4, seed


def test_cache_keeps_no_tensor_alive():
    mod = module("document")
    q, k, v = qkv(N=31)
    doc = doc_ids(2, 31, 0)
    mod.attention(q, k, v, doc=doc)
    mod.attention(q, k, v, doc=doc)  # a hit
    refs = [weakref.ref(t) for t in (q, k, v, doc)]
    del q, k, v, doc
    gc.collect()
    assert all(r() is None for r in refs)


class _HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make every Python-level read of a tensor value raise (a host sync on a GPU)."""
    def arm():
        def refuse(name):
            def read(self, *args, **kwargs):
                raise _HostRead(f"tensor.{name} on the hot path")
            return read
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, refuse(name))
    return arm


CASES = {
    "causal": lambda B, N: {},
    "document": lambda B, N: {"doc": doc_ids(B, N, 0)},
    "padding": lambda B, N: {"kv_len": torch.tensor([N, N // 2], dtype=torch.int32)},
    "softcap": lambda B, N: {},
    "bigbird": lambda B, N: {},  # static block lists, cached per shape
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_repeated_call_reads_no_tensor_value(name, no_host_reads):
    mod = module(name)
    log = stub_launches(mod)
    try:
        q, k, v = qkv(N=48, grad=True)
        kw = CASES[name](2, 48)
        g = torch.randn(2, 4, 48, 16)

        def step():
            o = mod.attention(q, k, v, **kw)
            o.backward(g)
            with torch.no_grad():
                mod.attention(q, k, v, **kw)
        step()  # the first call of a signature may read what it likes (static lists are made here)
        log.clear()
        hits = _stats().get("hit", 0)
        no_host_reads()
        step()
        assert _stats().get("hit", 0) == hits + 2
        assert log, "the stub saw no launch"
    finally:
        unstub(mod)


def test_config_is_picked_once_per_signature(monkeypatch, tmp_path):
    """Off the interpreter, the tuned-or-default config of a signature is looked up once, and
    again after the tune cache changed (a tuning run in this process)."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    for name in ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ"):
        monkeypatch.delenv(name, raising=False)
    mod = module("causal")
    calls = []
    real = launch.default_config
    monkeypatch.setattr(launch, "default_config", lambda c, kernel="": calls.append(kernel) or real(c, kernel))
    bound = [attncc.runtime.bind(mod.SPEC, *qkv(N=33, seed=seed)) for seed in range(4)]  # one miss, three hits
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the configs a GPU would get (nothing is launched)
    cfg = launch.pick_config(bound[0])
    assert all(launch.pick_config(c) == cfg for c in bound[1:])
    assert calls == [""]
    key = tuning.key_for(bound[0], "")
    tuned = {"config": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}, "ms": 1.0, "default_ms": 2.0}
    tuning.store(key, tuned)
    assert launch.pick_config(bound[1]) == launch.KernelConfig(16, 16, 2, 1)


def test_backward_gets_no_materialized_dlse(monkeypatch):
    """Autograd would fill a zero dLSE per backward (an allocation and a memset kernel) for the
    LSE nobody differentiates; it must pass None."""
    seen = []
    real = autograd.AttentionFunction.backward

    def spy(ctx, do, dlse):
        seen.append(dlse)
        return real(ctx, do, dlse)
    monkeypatch.setattr(autograd.AttentionFunction, "backward", staticmethod(spy))
    q, k, v = qkv(N=16, grad=True)
    module("causal").attention(q, k, v).sum().backward()
    assert seen == [None]


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout


def test_runtime_imports_no_compiler_dependency():
    out = _python("import json, sys, attncc.runtime, generated.causal, generated.document; "
                  "print(json.dumps(sorted(m for m in ('sympy', 'networkx', 'jinja2') if m in sys.modules)))")
    assert json.loads(out) == []


def test_build_imports_no_torch(tmp_path):
    """`attncc build` renders specs without torch, networkx or Triton (torch alone took about
    half of a one-spec build)."""
    specs = " ".join(repr(str(ROOT / "specs" / f"{n}.toml")) for n in ("causal", "document", "bigbird", "linear_elu"))
    out = _python(f"import json, sys; from attncc.cli import main; "
                  f"rc = main(['build', {specs.replace(' ', ', ')}, '--out', {str(tmp_path)!r}]); "
                  f"print(json.dumps([rc, sorted(m for m in ('torch', 'networkx', 'triton') if m in sys.modules)]))")
    assert json.loads(out.splitlines()[-1]) == [0, []]


@pytest.fixture
def capturing(monkeypatch):
    """As if a CUDA graph were being captured on the current stream (no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_capture_refuses_a_drawn_dropout_seed(capturing):
    spec = module("causal_dropout").SPEC
    with pytest.raises(ValueError, match="pass seed= under CUDA graph capture"):
        call_mod.dropout_settings(spec, "causal_dropout.attention", dropout_p=0.1)
    assert call_mod.dropout_settings(spec, "causal_dropout.attention", dropout_p=0.1, seed=5) == (0.1, 5)


def test_capture_refuses_to_make_static_lists(capturing):
    """Lists made inside a capture would be cached unfilled (captured kernels run at replay)."""
    from attncc.runtime import blocks

    from types import SimpleNamespace

    key = (module("document").MASK_TILES, "cuda:0", 300, 300, 0, 0, 300, 300, 64, 64, ())
    with pytest.raises(RuntimeError, match="before capturing"):
        blocks._static_lists(key, 1, 2, False)
    # static masks without a closed form (BigBird, strides, 2D neighbourhoods): exact lists, cached
    call = SimpleNamespace(varlen=False, q=SimpleNamespace(device="cuda:0"), Nq=300, Nk=300, q_offset=0, k_offset=0,
                           n_q=300, n_k=300, params={}, B=1, Hq=2)
    made = []
    with pytest.raises(RuntimeError, match="before capturing"):
        blocks.exact_block_lists(lambda *a: made.append(a), call, 64, 64, per_head=False)
    assert not made  # refused before any classification
    with pytest.raises(RuntimeError, match="before capturing"):
        blocks.random_table(300, 300, 3, 64, 0, "cuda:0")


class _Param:
    def __init__(self, name, constexpr=False, default=None):
        self.name, self.is_constexpr, self.default = name, constexpr, default


class _FakeJit:
    """What FastKernel uses of a JITFunction: ``params`` and ``fn[grid](...)`` returning the
    compiled kernel, which ``compiled[grid](*all_params)`` launches."""

    def __init__(self):
        self.params = [_Param("X"), _Param("n"), _Param("EXTRA"), _Param("seed"), _Param("BLOCK", True),
                       _Param("FLAG", True, False)]
        self.compiles, self.launches = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles.append((grid, args, kwargs))
            jit = self

            class Compiled:
                def __getitem__(self, grid3):
                    return lambda *full: jit.launches.append((grid3, full))
            return Compiled()
        return run


def test_fast_kernel_keys_what_triton_specializes_on(monkeypatch):
    """FastKernel (ATTNCC_FAST_LAUNCH=1) reuses a compiled kernel only where Triton would pick the
    same: per bound launch (which fixes the positional scalars: another bound launch, another
    key), tensor alignment and dtype, None arguments, keyword constexprs by value and runtime
    scalars by Triton's specialization (== 1, divisible by 16, i32 / i64 width)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fake = _FakeJit()
    kernel = launch.FastKernel(fake)
    base = torch.zeros(64)
    aligned, misaligned, half = base[:16], base[1:17], torch.zeros(16, dtype=torch.float16)

    def bound(n):
        return launch.BoundLaunch(lambda x, seed, block, extra=None, n=n: kernel[(4, 2)](x, n, extra, seed=seed,
                                                                                           BLOCK=block))

    first, other = bound(10), bound(10)
    first(aligned, 3, 32)
    first(aligned, 3, 32)  # the compiled kernel, all parameters in order, a 3-d grid
    assert len(fake.compiles) == 1 and fake.launches == [((4, 2, 1), (aligned, 10, None, 3, 32, False))]
    first(aligned, 35, 32)  # same specialization of the seed (not 1, not a multiple of 16, i32)
    assert len(fake.compiles) == 1
    for changed in (dict(x=misaligned), dict(x=half), dict(seed=1), dict(seed=32), dict(seed=2**40 + 3),
                    dict(block=64), dict(extra=aligned)):
        before = len(fake.compiles)
        args = {"x": aligned, "seed": 3, "block": 32, **changed}
        first(args["x"], args["seed"], args["block"], args.get("extra"))
        assert len(fake.compiles) == before + 1, changed
    before = len(fake.compiles)
    first(aligned, 3, 32, None, 11)  # a positional scalar (bound in the generated launches) changed
    first(aligned, 3, 32, None, 1)  # (Triton: the 1 a constexpr)
    assert len(fake.compiles) == before + 2
    before = len(fake.compiles)
    other(aligned, 3, 32)  # another bound launch (another signature, config or dO layout)
    assert len(fake.compiles) == before + 1
    kernel[(1,)](aligned, 10, None, seed=3, BLOCK=32)  # outside a bound launch: the plain launch
    kernel[(1,)](aligned, 10, None, seed=3, BLOCK=32)
    assert len(fake.compiles) == before + 3


def test_fast_launch_binds_per_launch_layout(monkeypatch):
    """The fast launch (on unless ATTNCC_FAST_LAUNCH=0) wraps bound launches (never under the
    interpreter), one per layout of what the signature does not fix (dO's strides): FastKernel's
    key relies on it."""
    mod = module("causal")
    q, k, v = qkv(N=20)
    call = call_mod.bind(mod.SPEC, q, k, v)
    cfg = launch.pick_config(call)
    made = []

    def make(call, cfg, q, k, v, *rest):
        made.append(rest)
        return lambda *args: None
    do = torch.randn(2, 4, 20, 16)
    padded = torch.randn(2, 4, 20, 24)[..., :16]
    monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "1")
    assert not isinstance(launch.bound_launch(call, make, cfg, q, k, v, layout=(do,)), launch.BoundLaunch)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    a = launch.bound_launch(call, make, cfg, q, k, v, layout=(do,))
    b = launch.bound_launch(call, make, cfg, q, k, v, layout=(padded,))
    assert isinstance(a, launch.BoundLaunch) and isinstance(b, launch.BoundLaunch) and a is not b
    assert launch.bound_launch(call, make, cfg, q, k, v, layout=(do.clone(),)) is a
    monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "0")
    assert not isinstance(launch.bound_launch(call, make, cfg, q, k, v, layout=(do,)), launch.BoundLaunch)
    monkeypatch.delenv("ATTNCC_FAST_LAUNCH")  # on by default (on a GPU)
    assert launch.bound_launch(call, make, cfg, q, k, v, layout=(do,)) is a


def test_params_passed_as_tensors_are_read_every_call():
    """A param's value counts, not its layout: two 0-d tensors of one layout are two windows."""
    mod = module("sliding_window")
    q, k, v = qkv(N=24)
    for window in (2, 5, 2, 9):
        got = mod.attention(q, k, v, window=torch.tensor(window))
        assert torch.equal(got, mod.attention(q, k, v, window=window)), window


def test_launch_scratch_is_kept_per_stream(monkeypatch):
    """Triton's per-launch scratch (on-device tensor descriptors) is one buffer per stream, grown
    as needed, instead of an allocation per launch; under CUDA graph capture a fresh one each time."""
    monkeypatch.setattr(launch, "_SCRATCH", {})
    a = launch.scratch(100, 1, "cpu", capturing=False)
    assert launch.scratch(80, 1, "cpu", capturing=False) is a and a.numel() >= 100
    b = launch.scratch(100, 2, "cpu", capturing=False)  # another stream
    assert b is not a
    grown = launch.scratch(150, 1, "cpu", capturing=False)
    assert grown is not a and grown.numel() >= 150 and launch.scratch(120, 1, "cpu", capturing=False) is grown
    captured = launch.scratch(50, 1, "cpu", capturing=True)
    assert captured is not grown and launch.scratch(50, 1, "cpu", capturing=True) is not captured
    # Triton's allocator: the kept buffer inside attncc's launch() only (another library's kernel
    # on this thread may overlap the one before it: programmatic dependent launch)
    monkeypatch.setattr(launch, "_CUDA", torch.device("cpu"))
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False)
    outside = launch._alloc(64, 128, 7)
    assert launch._alloc(64, 128, 7) is not outside
    kept = []
    monkeypatch.setattr(launch, "TOO_BIG", set())  # (nothing failed to fit: the first try runs)
    launch.launch(None, None, lambda cfg: kept.extend([launch._alloc(64, 128, 7), launch._alloc(64, 128, 7)]))
    assert kept[0] is kept[1]


def test_fit_records_are_per_spec_not_per_name():
    """A config found too big for one spec is not assumed too big for another spec of the same name
    (an in-memory spec beside a file's, two builds of one name): the record keys the spec's hash."""
    import dataclasses

    from attncc.runtime import configs

    mod = module("causal")
    q, k, v = qkv(N=20)
    call = call_mod.bind(mod.SPEC, q, k, v)
    other = call.replace(spec=dataclasses.replace(mod.SPEC, spec_hash=mod.SPEC.spec_hash + "x"))
    cfg = launch.pick_config(call)
    configs.TOO_BIG.add((configs.fit_key(call, "dq"), cfg))
    try:
        assert configs.did_not_fit(call, cfg, "dq") and not configs.did_not_fit(other, cfg, "dq")
    finally:
        configs.TOO_BIG.discard((configs.fit_key(call, "dq"), cfg))


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _cuda_launcher(scratch_size: int):
    """A Triton CudaLauncher (no GPU: made without its compiled C module) whose C ``launch`` records."""
    from triton.backends.nvidia.driver import CudaLauncher

    launcher = object.__new__(CudaLauncher)
    launcher.launch = _Recorder()
    launcher.num_ctas = 1
    launcher.global_scratch_size, launcher.global_scratch_align = scratch_size, 128
    launcher.profile_scratch_size, launcher.profile_scratch_align = 0, 1
    launcher.launch_cooperative_grid, launcher.launch_pdl = False, True
    return launcher


class _FakeCompiled:
    def __init__(self, launcher):
        self.run, self.function, self.packed_metadata = launcher, 1234, (4, 1, 5000)
        self.plain = []

    def __getitem__(self, grid):
        return lambda *args: self.plain.append((grid, args))


@pytest.mark.parametrize("scratch_size", [0, 96])
def test_direct_launch_calls_tritons_c_launcher_as_triton_does(monkeypatch, scratch_size):
    """ATTNCC_DIRECT_LAUNCH: FastKernel's compiled kernels go to Triton's C launcher with the
    arguments Triton's own path gives it (CompiledKernel's runner -> CudaLauncher.__call__, no launch
    hook set), the tensors as their addresses, the global scratch from attncc's allocator; with a
    launch hook set, Triton's own path (which calls it)."""
    import triton
    from triton import knobs

    sizes = []

    def alloc(size, align, stream):
        sizes.append((size, align, stream))
        return torch.empty(size, dtype=torch.int8)
    monkeypatch.setattr(launch, "_alloc", alloc)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 77 + device, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    x = torch.zeros(16)
    args = (x, 10, None, 3, 32, False)

    ours = _cuda_launcher(scratch_size)
    launch.direct_launch(_FakeCompiled(ours))(4, 2, 1, 1, [x.data_ptr(), *args[1:]])
    theirs = _cuda_launcher(scratch_size)
    triton.set_allocator(alloc)
    try:
        theirs(4, 2, 1, 78, 1234, (4, 1, 5000), None, None, None, *args)  # as CompiledKernel's runner
    finally:
        triton.set_allocator(launch._alloc)
    (got,), (want,) = ours.launch.calls, theirs.launch.calls
    assert len(got) == len(want) and got[:7] == want[:7] and got[9:] == (*want[9:13], x.data_ptr(), *want[14:])
    assert (got[7] is None) == (want[7] is None) == (scratch_size == 0) and got[8] is want[8] is None
    assert want[13] is x and sizes[:1] == sizes[1:] == ([(8 * scratch_size, 128, 78)] if scratch_size else [])

    # through FastKernel: the first launch of a key compiles (Triton's path), the next go direct
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    fake = _FakeJit()
    launcher = _cuda_launcher(scratch_size)
    compiled = _FakeCompiled(launcher)
    kernel = launch.FastKernel(fake)
    fake_run = lambda *a, **k: (fake.compiles.append(a), compiled)[1]  # noqa: E731
    bound = launch.BoundLaunch(lambda t: kernel[(4, 2)](t, 10, None, seed=3, BLOCK=32))
    with monkeypatch.context() as m:
        m.setattr(_FakeJit, "__getitem__", lambda self, grid: fake_run)
        bound(x)
        bound(x)
        hooks = knobs.runtime.launch_enter_hook
        hooks.add(print)
        try:
            bound(x)
        finally:
            hooks.remove(print)
    assert len(fake.compiles) == 1 and len(launcher.launch.calls) == 1 and len(compiled.plain) == 1
    assert launcher.launch.calls[0][13:] == (x.data_ptr(), 10, None, 3, 32, False)
    assert compiled.plain == [((4, 2, 1), (x, 10, None, 3, 32, False))]
