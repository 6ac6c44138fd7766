"""The Gluon sm90 backward (attncc/runtime/gluon/bwd.py, bwd_fused.py's fused kernel and bwd_ws.py's
warp-specialized one) checked on the CPU, where Gluon cannot run:

- ``launch.attention_backward`` end to end, ``method="split"``, ``"fused"`` and ``"ws"``, with the Gluon
  kernels replaced by a torch
  emulation of their tile loops (tests/gluon_emulation.py: same walks, masks, block sizes, TMA
  zero fill, exp2 / lse2 scaling, GQA stepping, operand rounding), and the real ``tl`` preprocess
  and the fused path's ``tl`` postprocess under Triton's interpreter: gradients against the float64
  reference on seeded random calls
  (dense and causal, bf16 and fp16, D 64 and 128, GQA, offsets and n_q / n_k, Nq != Nk, rows
  without keys, lengths off the block sizes, with and without dLSE);
- the emulation is not blind: a walk that skips a block or calls a partial block full fails it;
- ``ws``: its barrier protocol modelled (``ws_protocol``: the partitions' waits and arrives under
  random interleavings, with the mbarrier's parity semantics); its launch (K, V, dK, dV boxes of one
  consumer warpgroup's 64 keys, 4 warps, maxnreg) and
  its gradients equal to the fused kernel's (the same algorithm on the same 128-key blocks) on one
  call by default; the edge cases, random calls, rendered specs and broken walks with ``-m slow``;
- the preprocess's padded rows (delta, lse2) against torch;
- the host's refusals (head dim 256, operands) and the configs' shared memory.

tests/test_gluon_compile.py compiles the kernels for sm90; tests/gpu/test_gpu_gluon.py runs them.
"""
from __future__ import annotations

import dataclasses
import math
import random
import types
import zlib

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from attncc.runtime.gluon import bwd, bwd_fused, bwd_ws, launch, walks  # noqa: E402
from attncc.spec import parse_spec  # noqa: E402
from gluon_emulation import EmulatedKernel  # noqa: E402

PATTERNS = {"dense": parse_spec('name = "dense"\n'), "causal": parse_spec('name = "causal"\n[mask]\nwhere = "j <= i"\n')}
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # measured: ~3e-3 and ~3e-4


@pytest.fixture
def emulated(monkeypatch):
    """CPU tensors pass the device check; the two Gluon kernels run as their emulation."""
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    kernels = {}
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused, bwd_ws.attn_bwd_ws):
        kernels[kernel.fn.__name__] = EmulatedKernel(kernel)
        monkeypatch.setattr(kernel, "run", kernels[kernel.fn.__name__])
    return kernels


@dataclasses.dataclass(frozen=True)
class Case:
    pattern: str
    dtype: torch.dtype
    D: int
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    q_offset: int = 0
    k_offset: int = 0
    n_q: int = None
    n_k: int = None
    scale: float = None
    dlse: bool = False


def inputs(case: Case, seed: int):
    """q, k, v, do (dtype), dlse (float32 or None), and o, lse as the forward returns them
    (the float64 reference's, rounded: o in dtype, lse in float32)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen).to(case.dtype)
    k = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen).to(case.dtype)
    v = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen).to(case.dtype)
    do = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen).to(case.dtype)
    dlse = torch.randn(case.B, case.Hq, case.Nq, generator=gen) if case.dlse else None
    o, lse = attncc.reference(PATTERNS[case.pattern], q.double(), k.double(), v.double(), return_lse=True,
                              **call_kwargs(case))
    return q, k, v, o.to(case.dtype), lse.float(), do, dlse


def call_kwargs(case: Case):
    return dict(q_offset=case.q_offset, k_offset=case.k_offset, n_q=case.n_q, n_k=case.n_k, scale=case.scale)


def reference_grads(case, q, k, v, do, dlse):
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    o, lse = attncc.reference(PATTERNS[case.pattern], qd, kd, vd, return_lse=True, **call_kwargs(case))
    outs, grads = [o], [do.double()]
    if dlse is not None:
        outs.append(torch.where(lse.isinf(), 0.0, lse))
        grads.append(dlse.double())
    torch.autograd.backward(outs, grads)
    return qd.grad, kd.grad, vd.grad


def rel(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


def run_case(case: Case, seed: int, **overrides):
    q, k, v, o, lse, do, dlse = inputs(case, seed)
    dq, dk, dv = launch.attention_backward(q, k, v, o, lse, do, dlse, pattern=case.pattern, **call_kwargs(case),
                                           **overrides)
    return (dq, dk, dv), reference_grads(case, q, k, v, do, dlse)


def check_case(case: Case, seed: int, method: str = "split"):
    got, want = run_case(case, seed, method=method)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == case.dtype and g.shape == w.shape and g.is_contiguous(), name
        assert not torch.isnan(g).any(), name
        if w.norm() < 1e-9:  # dQ of one key is 0 up to rounding (dP = dO . v = delta)
            assert float(g.abs().max()) < 1e-4, name
        else:
            assert rel(g, w) < TOL[case.dtype], (name, rel(g, w), case)
    return got, want


def random_case(rng: random.Random) -> Case:
    def length():
        return rng.choice([1, 2, 31, 63, 64, 65, 100, 127, 128, 129, 190])

    pattern = rng.choice(sorted(PATTERNS))
    hkv = rng.choice([1, 2])
    Nq, Nk = length(), length()
    q_offset = rng.choice([0, 0, rng.randrange(0, 150)])
    k_offset = rng.choice([0, 0, rng.randrange(0, 150)])
    n_q = rng.choice([None, q_offset + Nq + rng.randrange(0, 40)])
    n_k = rng.choice([None, k_offset + Nk + rng.randrange(0, 40)])
    return Case(pattern, rng.choice([torch.bfloat16, torch.float16]), rng.choice([64, 128]), rng.choice([1, 2]),
                hkv * rng.choice([1, 2, 3]), hkv, Nq, Nk, q_offset, k_offset, n_q, n_k,
                rng.choice([None, None, 0.3]), rng.random() < 0.4)


# Hand-picked: GQA groups of 1, 2, 4; every row of a query block without keys; a key block past
# every row; Nq != Nk with the chunk after the keys; a single row and key.
EDGES = [
    Case("causal", torch.bfloat16, 128, 1, 4, 1, 130, 130),
    Case("causal", torch.float16, 64, 2, 4, 2, 70, 200, q_offset=130),
    Case("causal", torch.bfloat16, 64, 1, 2, 2, 150, 90, q_offset=0, k_offset=100, dlse=True),
    Case("causal", torch.float16, 128, 1, 2, 1, 40, 300, q_offset=0, k_offset=20),
    Case("dense", torch.bfloat16, 128, 1, 3, 3, 1, 1),
    Case("dense", torch.float16, 64, 1, 4, 2, 129, 65, q_offset=7, k_offset=3, n_q=400, n_k=90, dlse=True),
]


# the ws kernel: the fused kernel's algorithm (tests/gluon_emulation.py), so its sweeps run with -m slow
WS = pytest.param("ws", marks=pytest.mark.slow)


@pytest.mark.parametrize("method", ["split", "fused", WS])
@pytest.mark.parametrize("case", EDGES, ids=lambda c: f"{c.pattern}-{str(c.dtype)[6:]}-d{c.D}-{c.Hq}/{c.Hkv}-"
                                                       f"{c.Nq}x{c.Nk}-at{c.q_offset},{c.k_offset}")
def test_edges_against_the_reference(emulated, case, method):
    got, _ = check_case(case, seed=3, method=method)
    if case.pattern == "causal" and case.k_offset > case.q_offset:
        rows = case.k_offset - case.q_offset  # rows that see no key: zero dq
        assert torch.all(got[0][:, :, :rows] == 0)


def test_random_calls_against_the_reference(emulated):
    rng = random.Random(20)
    for n in range(14):
        check_case(random_case(rng), seed=n)
    dkdv, dq = emulated["attn_bwd_dkdv"], emulated["attn_bwd_dq"]
    assert len(dkdv.launches) == len(dq.launches) == 14
    assert sum(dkdv.steps) > 0 and sum(dq.steps) > 0
    assert not emulated["attn_bwd_fused"].launches


@pytest.mark.parametrize("method", ["fused", WS])
def test_fused_random_calls_against_the_reference(emulated, method):
    """The fused kernel (dQ partials of every key-block program added into one fp32 accumulator, then
    the tl postprocess) on the same seeded calls: odd lengths, offsets, n_q / n_k, GQA, dLSE; the ws
    kernel likewise."""
    rng = random.Random(20)
    for n in range(14):
        check_case(random_case(rng), seed=n, method=method)
    fused = emulated[f"attn_bwd_{method}"]
    assert len(fused.launches) == 14 and sum(fused.steps) > 0
    others = {"attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused", "attn_bwd_ws"} - {f"attn_bwd_{method}"}
    assert not any(emulated[name].launches for name in others)


def test_fused_matches_split_up_to_rounding(emulated):
    """Both methods compute the same gradients: dK and dV bitwise (the same program, the same steps),
    dQ up to fp32 summation order and one rounding (the split kernel rounds once after summing in its
    registers; the fused one sums partials in fp32 memory, then rounds)."""
    case = Case("causal", torch.bfloat16, 64, 1, 4, 2, 300, 290, q_offset=40, k_offset=3)
    (sq, sk, sv), want = run_case(case, seed=9, method="split")
    (fq, fk, fv), _ = run_case(case, seed=9, method="fused")
    assert torch.equal(sk, fk) and torch.equal(sv, fv)
    assert rel(fq, want[0]) < TOL[case.dtype] and rel(fq.double(), sq.double()) < TOL[case.dtype]


def test_fused_launch_and_its_accumulator(emulated, monkeypatch):
    """One fused launch over the key blocks (dK/dV tiles, fp32 dQ accumulator of the call's shape
    with the dK/dV kernel's row box), zeroed before it and scaled by the postprocess after it."""
    case = Case("dense", torch.float16, 128, 2, 4, 2, 200, 300, q_offset=100)
    seen = {}
    fused = emulated["attn_bwd_fused"]

    def spy(*args, **kwargs):
        acc = args[6].base
        seen["before"] = acc.clone()
        fused(*args, **kwargs)
        seen["after"] = acc.clone()

    monkeypatch.setattr(bwd_fused.attn_bwd_fused, "run", spy)
    (dq, _, _), want = run_case(case, seed=1, method="fused")
    cfg = launch.default_bwd_config(128, "fused")
    (args, kwargs, grid), = fused.launches
    assert grid == (-(-300 // cfg.kv_block_n), 2 * 2)
    assert kwargs["STAGES"] == cfg.kv_stages and kwargs["num_warps"] == cfg.kv_block_n // 16
    assert kwargs["QWALK"] is walks.dense_qwalk and kwargs["MASK"] is None
    acc_desc = args[6]  # dq_acc_desc
    assert acc_desc.base.dtype == torch.float32 and list(acc_desc.shape) == [2, 4, 200, 128]
    assert list(acc_desc.block_shape) == [1, 1, cfg.kv_block_m, 128]
    assert torch.all(seen["before"] == 0)
    assert torch.equal(dq, (seen["after"] * (1 / math.sqrt(128))).to(torch.float16))
    assert rel(dq, want[0]) < TOL[case.dtype]


def test_ws_launch_and_its_gradients(emulated):
    """One ws launch over the key blocks of 128 keys: K, V, dK, dV boxes of one consumer warpgroup's 64
    keys, the fp32 dQ accumulator with 64-row boxes, the launch's 4 warps (the default partition) and
    maxnreg, the setmaxnreg budgets; its gradients are the fused kernel's (the same steps on the same
    blocks: bitwise in the emulation) and the reference's."""
    case = Case("causal", torch.bfloat16, 64, 1, 2, 1, 70, 140, q_offset=30, dlse=True)
    got, want = run_case(case, seed=4, method="ws")
    fused, _ = run_case(case, seed=4, method="fused")
    for name, g, f, w in zip(("dq", "dk", "dv"), got, fused, want):
        assert torch.equal(g, f), name
        assert g.dtype == case.dtype and rel(g, w) < TOL[case.dtype], (name, rel(g, w))
    cfg = launch.default_bwd_config(64, "ws")
    (args, kwargs, grid), = emulated["attn_bwd_ws"].launches
    assert grid == (2, 1) and cfg.kv_block_n == 128
    assert kwargs["num_warps"] == 4 and kwargs["maxnreg"] == bwd_ws.MAXNREG
    assert (kwargs["CONSUMER_REGS"], kwargs["WORKER_REGS"]) == (bwd_ws.CONSUMER_REGS, bwd_ws.WORKER_REGS)
    assert kwargs["STAGES"] == cfg.kv_stages and kwargs["QWALK"] is walks.causal_qwalk
    for i in (1, 2, 4, 5):  # k, v, dk, dv
        assert list(args[i].block_shape) == [1, 1, 64, 64]
    assert list(args[0].block_shape) == [1, 1, cfg.kv_block_m, 64]  # q_desc
    acc = args[6]  # dq_acc_desc
    assert acc.base.dtype == torch.float32 and list(acc.block_shape) == [1, 1, 64, 64]
    assert 2 * bwd_ws.CONSUMER_REGS * 128 + bwd_ws.WORKER_REGS * 128 <= 65536
    assert 3 * 128 * bwd_ws.MAXNREG <= 65536


@pytest.mark.parametrize("setting", ["", "grid", "heads-first"])
def test_ws_heads_first_schedule(emulated, monkeypatch, setting):
    """ATTNCC_GLUON_BWD_SCHEDULE=heads-first launches the ws kernel over [B x kv heads, key blocks]
    (HEADS_FIRST: key block 0 of every head first); unset or grid over [key blocks, B x kv heads]. The
    programs and their gradients are the same either way (bitwise in the emulation, which reads the
    grid as bwd_ws.program_walk does); a misspelt setting raises, naming the variable."""
    monkeypatch.setenv("ATTNCC_GLUON_BWD_SCHEDULE", setting)
    case = Case("causal", torch.bfloat16, 64, 2, 3, 1, 70, 300, q_offset=250)
    got, want = run_case(case, seed=5, method="ws")
    (args, kwargs, grid), = emulated["attn_bwd_ws"].launches
    heads_first = setting == "heads-first"
    assert kwargs["HEADS_FIRST"] is heads_first
    assert tuple(grid) == ((2, 3) if heads_first else (3, 2))  # 3 key blocks of 128, B x Hkv = 2
    emulated["attn_bwd_ws"].launches.clear()
    monkeypatch.setenv("ATTNCC_GLUON_BWD_SCHEDULE", "grid" if heads_first else "heads-first")
    other, _ = run_case(case, seed=5, method="ws")
    for name, g, o, w in zip(("dq", "dk", "dv"), got, other, want):
        assert torch.equal(g, o), name
        assert rel(g, w) < TOL[case.dtype], (name, rel(g, w))
    monkeypatch.setenv("ATTNCC_GLUON_BWD_SCHEDULE", "longest")
    with pytest.raises(ValueError, match="ATTNCC_GLUON_BWD_SCHEDULE"):
        run_case(case, seed=5, method="ws")
    monkeypatch.setenv("ATTNCC_GLUON_BWD_SCHEDULE", "heads-first")  # more key blocks than a grid's y extent
    assert not launch.bwd_heads_first(launch.GRID_Y_MAX + 1) and launch.bwd_heads_first(launch.GRID_Y_MAX)


HEADS_FIRST_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from attncc.runtime.gluon import launch
variant = launch.BwdVariant("ws", "causal", "bfloat16", 128, launch.default_bwd_config(128, "ws"))
kernel, signature, constexprs, options = launch._bwd_source(variant)
constexprs["HEADS_FIRST"] = True
signature["HEADS_FIRST"] = "constexpr"
ptx = triton.compile(GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                     options=options).asm["ptx"]
print("wgmma", ptx.count("wgmma.mma_async"))
"""


def test_ws_heads_first_compiles_for_sm90():
    """The ws kernel with HEADS_FIRST (ATTNCC_GLUON_BWD_SCHEDULE=heads-first) compiles for sm90 as the
    launch makes it (causal, bf16, D = 128; ~4 s, in a process without the interpreter), with the
    default kernel's GEMMs."""
    import subprocess
    import sys

    from kernel_compile import without_interpreter
    run = subprocess.run([sys.executable, "-c", HEADS_FIRST_COMPILE], env=without_interpreter(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = dict(zip(*[iter(run.stdout.split())] * 2))
    assert int(counts["wgmma"]) == BWD_WGMMA_WS_128, run.stdout


# the ws kernel's wgmma at D = 128 (tests/test_gluon_rendered.py's BWD_WGMMA)
BWD_WGMMA_WS_128 = 64


def test_launch_tiles_are_the_default_config(emulated):
    """The launches use default_bwd_config's tiles and the grids cover every key / query block."""
    case = Case("causal", torch.bfloat16, 128, 2, 4, 2, 200, 300, q_offset=100)
    run_case(case, seed=1)
    cfg = launch.default_bwd_config(128)
    (args, kwargs, grid), = emulated["attn_bwd_dkdv"].launches
    assert grid == (-(-300 // cfg.kv_block_n), 2 * 2)
    assert kwargs["STAGES"] == cfg.kv_stages and kwargs["num_warps"] == cfg.kv_block_n // 16
    assert kwargs["QWALK"] is walks.causal_qwalk and kwargs["MASK"] is walks.causal_mask
    assert list(args[0].block_shape) == [1, 1, cfg.kv_block_m, 128]  # q_desc
    assert list(args[1].block_shape) == [1, 1, cfg.kv_block_n, 128]  # k_desc
    assert list(args[6].block_shape) == [1, 1, cfg.kv_block_m]  # lse2 rows
    assert args[6].strides[1] % 4 == 0 and args[6].shape == [2, 4, 200]  # 16-byte rows, TMA shape ends at Nq
    (args, kwargs, grid), = emulated["attn_bwd_dq"].launches
    assert grid == (-(-200 // cfg.q_block_m), 2 * 4)
    assert kwargs["WALK"] is walks.causal_walk and kwargs["num_warps"] == cfg.q_block_m // 16


def test_broadcast_gradient_gets_real_strides(emulated):
    """dO may be an expanded view (o.sum().backward() gives one): copied before its descriptors
    where a stride is 0, even with the last stride 1."""
    case = Case("causal", torch.float16, 64, 1, 2, 1, 70, 70)
    q, k, v, o, lse, _, _ = inputs(case, seed=2)
    do = torch.randn(1, 1, 1, case.D).to(case.dtype).expand(o.shape)  # strides (0, 0, 0, 1)
    got = launch.attention_backward(q, k, v, o, lse, do, pattern="causal")
    for args, _, _ in emulated["attn_bwd_dkdv"].launches + emulated["attn_bwd_dq"].launches:
        assert all(st > 0 for st in args[3].strides)  # do_desc
    for g, w in zip(got, reference_grads(case, q, k, v, do, None)):
        assert rel(g, w) < TOL[case.dtype]


@pytest.mark.parametrize("broken, method", [("skip_first", "split"), ("full_diagonal", "split"),
                                            ("dq_skips_last", "split"), ("skip_first", "fused"),
                                            ("full_diagonal", "fused"),
                                            pytest.param("full_diagonal", "ws", marks=pytest.mark.slow)])
def test_the_emulation_catches_a_wrong_walk(emulated, broken, method):
    """Walks with one block too few, or a partial block called full, give wrong gradients: the check
    above can fail."""
    qwalk, walk = walks.causal_qwalk, walks.causal_walk
    if broken == "skip_first":
        @gluon.jit
        def qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr, ctx=None):
            lo = gl.maximum(0, k_lo - q_offset) // BLOCK_M + 1
            return lo, lo, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)
    elif broken == "full_diagonal":
        @gluon.jit
        def qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr, ctx=None):
            lo = gl.maximum(0, k_lo - q_offset) // BLOCK_M
            return lo, lo, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)
    else:
        @gluon.jit
        def walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N: gl.constexpr, ctx=None):
            hi = gl.minimum(gl.cdiv(Nk, BLOCK_N), gl.maximum(0, q_hi + BLOCK_N - k_offset) // BLOCK_N)
            return 0, 0, 0, hi - 1

    case = Case("causal", torch.float16, 64, 1, 2, 1, 200, 200, q_offset=10)
    (dq, dk, dv), (wq, wk, wv) = run_case(case, seed=5, walk=walk, qwalk=qwalk, method=method)
    worst = max(rel(dq, wq), rel(dk, wk), rel(dv, wv))
    assert worst > 10 * TOL[case.dtype], worst
    if method != "split":  # the fused kernels' dQ comes from the key-block walk: it is wrong too
        assert rel(dq, wq) > 10 * TOL[case.dtype]
    # and the shipped walks pass the same call
    check_case(case, seed=5, method=method)


@pytest.mark.parametrize("raw", [False, True], ids=["natural", "raw"])
def test_preprocess_writes_padded_rows(raw):
    """delta = rowsum(dO * O) - dLSE and lse2 = LSE log2(e) (raw: the forward's log2 LSE as it is;
    +inf where LSE = -inf, dLSE ignored there) at rows of a 16-byte multiple of floats; strided O / dO
    read as they are."""
    from attncc.runtime.gluon.preprocess import bwd_preprocess

    gen = torch.Generator().manual_seed(0)
    B, H, Nq, D = 2, 3, 70, 64
    o = torch.randn(B, Nq, H, D, generator=gen).to(torch.float16).transpose(1, 2)  # strided [B, H, Nq, D]
    do = torch.randn(B, H, Nq, D, generator=gen).to(torch.float16)
    lse = torch.randn(B, H, Nq, generator=gen)
    lse[0, 1, 5:9] = -math.inf
    dlse = torch.randn(B, H, Nq, generator=gen)
    row_stride = 72
    buf = torch.full((2, B, H, row_stride), 123.0)
    delta, lse2 = buf[0, ..., :Nq], buf[1, ..., :Nq]
    # the raw LSE: log2 units, off the natural one by more than rounding (so that reading either shows)
    lse_raw = torch.where(lse.isinf(), lse, lse * 1.4426950408889634 + 0.25)
    bwd_preprocess[(2, B * H)](o, do, lse, dlse, lse_raw, delta, lse2, *o.stride(), *do.stride(), H, Nq,
                               row_stride, HEAD_DIM=D, BLOCK_M=64, HAS_DLSE=True, RAW_LSE=raw)
    want = (o.float() * do.float()).sum(-1) - torch.where(lse.isinf(), 0.0, dlse)
    assert torch.allclose(delta, want, atol=1e-4)
    assert torch.equal(lse2.isinf(), lse.isinf()) and torch.all(lse2[lse.isinf()] > 0)
    want = lse_raw if raw else lse * 1.4426950408889634
    assert torch.allclose(lse2[~lse.isinf()], want[~lse.isinf()])
    assert torch.all(buf[..., Nq:] == 123.0)  # the padding is not written


def test_backward_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    t = torch.zeros(1, 2, 8, 256, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match=r"head dims \(64, 128\), got 256 .*registers"):
        launch.attention_backward(t, t, t, t, lse, t)
    t = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do must be torch.bfloat16 of shape"):
        launch.attention_backward(t, t, t, t, lse, t.float())
    with pytest.raises(ValueError, match="lse must be torch.float32 of shape"):
        launch.attention_backward(t, t, t, t, lse[..., :4], t)
    with pytest.raises(ValueError, match="dlse must be of shape"):
        launch.attention_backward(t, t, t, t, lse, t, lse[:, :1])
    with pytest.raises(ValueError, match="CUDA"):
        monkeypatch.undo()
        launch.attention_backward(t, t, t, t, lse, t)


def test_backward_configs_fit_and_oversized_ones_are_refused():
    for d in launch.BWD_HEAD_DIMS:
        cfg = launch.default_bwd_config(d)
        launch.check_bwd_config(cfg, d)
        assert all(n <= launch.SM90_SHARED_BYTES - 1024 for n in launch.bwd_shared_bytes(cfg, d).values())
    with pytest.raises(ValueError, match="dkdv kernel .* shared memory"):
        launch.check_bwd_config(launch.GluonBwdConfig(kv_stages=5), 128)  # 64 KB + 5 x 32.5 KB
    with pytest.raises(ValueError, match="dq kernel .* shared memory"):
        launch.check_bwd_config(launch.GluonBwdConfig(q_block_n=128, q_stages=3), 128)  # 64 KB + 3 x 64 KB
    with pytest.raises(ValueError, match="kv_block_n must be 64 or 128"):
        launch.check_bwd_config(launch.GluonBwdConfig(kv_block_n=256), 64)
    with pytest.raises(ValueError, match="q_stages must be >= 2"):
        launch.check_bwd_config(launch.GluonBwdConfig(q_stages=1), 64)
    split = launch.bwd_shared_bytes(launch.default_bwd_config(128), 128)  # one warpgroup: two programs per SM
    assert (split["dkdv"], split["dq"]) == (2 * 16384 + 2 * (2 * 16384 + 512), 2 * 16384 + 2 * 2 * 16384)
    for d in launch.BWD_HEAD_DIMS:
        split = launch.bwd_shared_bytes(launch.default_bwd_config(d), d)
        assert all(2 * (split[part] + 1024) <= 228 * 1024 for part in ("dkdv", "dq"))  # an H100 SM: 228 KB
    assert launch.bwd_shared_bytes(launch.default_bwd_config(128, "fused"), 128)["fused"] == (
        2 * 32768 + 3 * (2 * 16384 + 512) + 128 * 64 * 2 + 64 * 128 * 4)  # the fused kernel's two warpgroups
    for d in launch.BWD_HEAD_DIMS:
        launch.check_bwd_config(launch.default_bwd_config(d, "fused"), d, "fused")
        launch.check_bwd_config(launch.default_bwd_config(d), d, "split")
    # 4 stages fit the dK/dV kernel at D = 128, not the fused one (dS^T and the fp32 dQ tile: 48 KB more)
    deep = launch.GluonBwdConfig(kv_stages=4)
    launch.check_bwd_config(deep, 128, "split")
    with pytest.raises(ValueError, match="fused kernel .* shared memory"):
        launch.check_bwd_config(deep, 128, "fused")
    with pytest.raises(ValueError, match="fused backward takes kv_block_m = 64"):
        launch.check_bwd_config(launch.GluonBwdConfig(kv_block_m=32), 64, "fused")
    with pytest.raises(ValueError, match="method must be one of"):
        launch.check_bwd_config(launch.default_bwd_config(64), 64, "atomic")
    # ws: the fused kernel's tiles and a second dS^T tile; 128 keys (two warpgroups), 64-row steps
    for d in launch.BWD_HEAD_DIMS:
        launch.check_bwd_config(launch.default_bwd_config(d, "ws"), d, "ws")
    assert launch.bwd_shared_bytes(launch.default_bwd_config(128, "ws"), 128)["ws"] == (
        2 * 32768 + 2 * (2 * 16384 + 512) + 2 * 128 * 64 * 2 + 64 * 128 * 4)  # 2 stages (measured faster than 3)
    assert launch.bwd_shared_bytes(launch.GluonBwdConfig(kv_block_n=128, kv_stages=3), 128)["ws"] == (
        2 * 32768 + 3 * (2 * 16384 + 512) + 2 * 128 * 64 * 2 + 64 * 128 * 4)
    with pytest.raises(ValueError, match="ws backward takes kv_block_n = 128"):
        launch.check_bwd_config(dataclasses.replace(launch.default_bwd_config(64, "ws"), kv_block_n=64), 64, "ws")
    with pytest.raises(ValueError, match="ws backward takes kv_block_m = 64"):
        launch.check_bwd_config(launch.GluonBwdConfig(kv_block_m=32), 64, "ws")
    with pytest.raises(ValueError, match="ws kernel .* shared memory"):
        launch.check_bwd_config(launch.GluonBwdConfig(kv_stages=4), 128, "ws")


def test_postprocess_scales_and_converts():
    """dQ = acc * scale in the output dtype, over a length that is not a multiple of the block."""
    from attncc.runtime.gluon.preprocess import bwd_postprocess

    acc = torch.randn(3 * 1000 + 7, generator=torch.Generator().manual_seed(1))
    dq = torch.full_like(acc, 5.0, dtype=torch.float16)  # (the interpreter's bf16 conversion truncates)
    bwd_postprocess[(-(-acc.numel() // 1024), )](acc, dq, 0.125, acc.numel(), BLOCK=1024)
    assert torch.equal(dq, (acc * 0.125).to(torch.float16))


# ------------------------------------------------------------------------------------------------
# the rendered backward: every spec with rendered fragments (generated/<name>_gluon.py), through
# backend.gluon_backward (what a generated module's _backward calls) with the kernels emulated

RENDERED = ("alibi", "block_diagonal", "chunked_local", "cross_causal", "local_bidirectional", "longformer",
            "prefix_lm", "sink_window", "sliding_window", "softcap")  # test_gluon_rendered.RENDERED
# small tiles (64 keys per dK/dV program, 16-row steps; 64-row dQ programs, 16-key steps): many
# blocks, segments and partial tiles at lengths the CPU can afford
SMALL_BWD = launch.GluonBwdConfig(kv_block_n=64, kv_block_m=16, kv_stages=2, q_block_m=64, q_block_n=16, q_stages=2)
# the fused kernel's: 64-row steps (its dQ partial is one 64-row wgmma), 64 keys per program
SMALL_FUSED = dataclasses.replace(SMALL_BWD, kv_block_m=64)
# the ws kernel's: 128 keys per program (two consumer warpgroups of 64)
SMALL_WS = dataclasses.replace(SMALL_FUSED, kv_block_n=128)
SMALL = {"split": SMALL_BWD, "fused": SMALL_FUSED, "ws": SMALL_WS}


# Nq != Nk, lengths off every tile, offsets both ways, n_q / n_k past the call, GQA, dLSE, a scale
# that puts softcap's scores where its derivative is far from 1
# (Case's pattern: the spec's, filled in by the test; D = 64)
RENDERED_CASES = [Case("", torch.float16, 64, 1, 4, 2, 150, 97, dlse=True),
                  Case("", torch.bfloat16, 64, 1, 2, 1, 61, 170, 45, 3, n_q=140, n_k=200, scale=1.0),
                  Case("", torch.float16, 64, 1, 2, 1, 83, 83, 7, 60, dlse=True)]


def rendered_params(name, rng):
    """The spec's small params (tests/cases.py), some of them varied."""
    from cases import SMALL_PARAMS, pattern

    params = {**pattern(name).param_values, **SMALL_PARAMS.get(name, {})}
    return {k: (v + rng.choice([-2, 0, 3, 17]) if type(v) is int and v > 3 else v) for k, v in params.items()}


def run_rendered(name, case: Case, params, seed, monkeypatch, method="split"):
    """The module's Gluon backward of one call (the kernels emulated; ATTNCC_GLUON_BWD=method) and the
    reference's gradients."""
    from attncc.runtime import backend
    from cases import module, pattern

    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    monkeypatch.setattr(backend, "gluon_bwd_config", lambda D: SMALL[method])
    spec = module(name).SPEC
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen).to(case.dtype)
    k, v = (torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen).to(case.dtype) for _ in range(2))
    do = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen).to(case.dtype)
    dlse = torch.randn(case.B, case.Hq, case.Nq, generator=gen) if case.dlse else None
    pos = call_kwargs(case)
    call = attncc.runtime.bind(spec, q, k, v, **pos, kwargs=dict(params))
    fragments = spec.gluon_fragments.load()
    if not (fragments.exact(call) and fragments.backward_exact(call)):
        return None
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, lse = attncc.reference(pattern(name), *leaves, return_lse=True, **pos, **params)
    dq, dk, dv, extra = backend.gluon_backward(call, "rendered", o.detach().to(case.dtype), lse.detach().float(), do,
                                               dlse)
    outs, cots = [o], [do.double()]
    if dlse is not None:
        outs.append(torch.where(lse.isinf(), 0.0, lse))
        cots.append(dlse.double())
    want = torch.autograd.grad(outs, leaves, cots)
    return (dq, dk, dv), want


@pytest.mark.parametrize("method", ["split", "fused", WS])
@pytest.mark.parametrize("name", RENDERED)
def test_rendered_backward_against_the_reference(emulated, monkeypatch, name, method):
    """Every rendered spec's backward (its query-block walk, qmask on the transposed tiles, the forward's
    walk and mask in dQ, the score and its derivative) emulated tile by tile, against the float64
    reference, at odd lengths and offsets with params varied; split, and fused (dQ from the key-block
    programs' transposed tiles alone)."""
    rng = random.Random(zlib.crc32(name.encode()))
    checked = 0
    for n, case in enumerate(RENDERED_CASES):
        params = rendered_params(name, rng)
        case = dataclasses.replace(case, pattern=name)
        out = run_rendered(name, case, params, seed=n, monkeypatch=monkeypatch, method=method)
        if out is None:
            continue
        checked += 1
        for label, g, w in zip(("dq", "dk", "dv"), *out):
            assert g.dtype == case.dtype and not torch.isnan(g).any(), label
            if w.norm() < 1e-9:
                assert float(g.abs().max()) < 1e-4, label
            else:
                assert rel(g, w) < TOL[case.dtype], (name, label, rel(g, w), case, params)
    assert checked >= 2
    from cases import module
    frag = module(name).SPEC.gluon_fragments.load()
    keys = emulated["attn_bwd_dkdv" if method == "split" else f"attn_bwd_{method}"]
    assert keys.launches and sum(keys.steps) > 0
    _, kwargs, _ = keys.launches[-1]
    assert kwargs["QWALK"] is frag.qwalk and kwargs["MASK"] is frag.qmask and kwargs["SCORE_GRAD"] is frag.score_grad
    assert kwargs["QSEGMENTS"] == frag.QSEGMENTS and kwargs["SCORE"] is frag.score
    if method != "split":
        assert not emulated["attn_bwd_dkdv"].launches and not emulated["attn_bwd_dq"].launches
        return
    dq = emulated["attn_bwd_dq"]
    assert sum(dq.steps) > 0 and not emulated["attn_bwd_fused"].launches
    _, kwargs, _ = dq.launches[-1]
    assert kwargs["WALK"] is frag.walk and kwargs["MASK"] is frag.mask and kwargs["SEGMENTS"] == frag.SEGMENTS


@pytest.mark.parametrize("method", ["split", "fused", WS])
@pytest.mark.parametrize("broken", ["qwalk_short", "qmask_wide", "no_score_grad"])
def test_the_emulation_catches_a_wrong_rendered_fragment(emulated, monkeypatch, tmp_path, broken, method):
    """A query-block walk one block short, a qmask that lets one more query in, or a softcap's
    backward without its derivative give wrong gradients, split and fused: the check above can fail.
    The fused kernel's dQ comes from the query-block walk and qmask too: it is wrong as well."""
    from cases import module
    from gluon_host import load_fragments

    name = "softcap" if broken == "no_score_grad" else "sliding_window"
    spec = module(name).SPEC
    text = spec.gluon_fragments.path.read_text()
    if broken == "qwalk_short":
        text = text.replace("    return qb_lo, qb_full_lo, qb_full_hi, qb_hi", "    return qb_lo, qb_full_lo, qb_full_hi, qb_hi - 1")
    elif broken == "qmask_wide":
        text = text.replace("(i >= j)", "(i >= (j - 1))")
    else:
        text = text.replace("    return (1.0 - t * t)", "    return 1.0 + 0.0 * t")
    assert text != spec.gluon_fragments.path.read_text()
    wrong = load_fragments(text, tmp_path, name)
    monkeypatch.setattr(type(spec.gluon_fragments), "load", lambda self: wrong)
    case = Case(name, torch.float16, 64, 1, 2, 1, 90, 90, scale=2.0)
    params = {"window": 20} if name == "sliding_window" else {}
    (dq, dk, dv), (wq, wk, wv) = run_rendered(name, case, params, seed=1, monkeypatch=monkeypatch, method=method)
    worst = max(rel(dq, wq), rel(dk, wk), rel(dv, wv))
    assert worst > 5 * TOL[case.dtype], worst
    if method != "split":
        assert rel(dq, wq) > 5 * TOL[case.dtype], rel(dq, wq)


def test_rendered_backward_of_random_specs_with_score_hooks(emulated, tmp_path):
    """The fuzz generator's specs (biases, ALiBi, softcaps, score mods with their sympy derivatives,
    params, masks) whose fragments the Gluon backward takes, at random lengths and offsets: the
    rendered score_grad (and walks, qmask) emulated against the reference's gradients; every spec
    split, every other one fused too."""
    from gluon_host import fuzz_rendered, load_fragments

    from attncc.codegen import render_gluon

    rng = random.Random(24)
    seen = {"score_grad": 0, "mod": 0, "fused": 0}
    for n, text, pat, fit in fuzz_rendered(rng, "b"):
        if seen["score_grad"] >= 8:
            break
        if not fit.backward:
            continue
        source = render_gluon(pat)
        if source is None:  # what Gluon cannot print (the module says why)
            continue
        frag = load_fragments(source, tmp_path, f"b{n}")
        Nq, Nk = rng.randint(1, 90), rng.randint(1, 90)
        case = Case("", rng.choice([torch.bfloat16, torch.float16]), 64, 1, pat.heads_q or 2, pat.heads_kv or 1, Nq,
                    Nk, rng.choice([0, rng.randint(1, 40)]), rng.choice([0, rng.randint(1, 40)]),
                    scale=rng.choice([None, 0.5]), dlse=rng.random() < 0.5)
        call = types.SimpleNamespace(params=pat.param_values, q_offset=case.q_offset, k_offset=case.k_offset,
                                     Nq=Nq, Nk=Nk, n_q=case.q_offset + Nq, n_k=case.k_offset + Nk)
        if frag.qwalk is None or not (frag.exact(call) and frag.backward_exact(call)):
            continue
        if case.Hq % case.Hkv:
            continue
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(1, case.Hq, Nq, 64, generator=gen).to(case.dtype)
        k, v = (torch.randn(1, case.Hkv, Nk, 64, generator=gen).to(case.dtype) for _ in range(2))
        do = torch.randn(1, case.Hq, Nq, 64, generator=gen).to(case.dtype)
        dlse = torch.randn(1, case.Hq, Nq, generator=gen) if case.dlse else None
        pos = call_kwargs(case)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        o, lse = attncc.reference(pat, *leaves, return_lse=True, **pos, **pat.param_values)
        outs, cots = [o], [do.double()]
        if dlse is not None:
            outs.append(torch.where(lse.isinf(), 0.0, lse))
            cots.append(dlse.double())
        want = torch.autograd.grad(outs, leaves, cots, allow_unused=True, materialize_grads=True)
        methods = ("split", "fused") if seen["score_grad"] % 2 else ("split", )
        for method in methods:
            got = launch.attention_backward(
                q, k, v, o.detach().to(case.dtype), lse.detach().float(), do, dlse, **pos, config=SMALL[method],
                walk=frag.walk, qwalk=frag.qwalk, mask=frag.mask, qmask=frag.qmask, score=frag.score,
                score_grad=frag.score_grad, segments=frag.SEGMENTS, qsegments=frag.QSEGMENTS,
                pattern_args=frag.pattern_args(call), method=method)
            for label, g, w in zip(("dq", "dk", "dv"), got, want):
                assert not torch.isnan(g).any(), (label, method, text)
                if w.norm() < 1e-6:
                    assert float(g.abs().max()) < 1e-3, (label, method, text)
                else:
                    assert rel(g, w) < 2 * TOL[case.dtype], (label, method, rel(g, w), text, case)
        seen["fused"] += "fused" in methods
        seen["score_grad"] += frag.score_grad is not None
        seen["mod"] += pat.mod is not None
    assert seen["score_grad"] >= 8 and seen["mod"] >= 3 and seen["fused"] >= 4, seen


# ------------------------------------------------------------------------------------------------
# the ws kernel's barrier protocol (bwd_ws.py), modelled: its four partitions' waits and arrives in the
# kernel's order, run under random interleavings with the mbarrier's parity semantics


class Barrier:
    """An mbarrier: `count` arrivals complete a phase; wait(parity) passes once the phase of that
    parity has completed, i.e. while the current phase's parity differs (a fresh barrier passes 1)."""

    def __init__(self, count):
        self.count, self.pending, self.done = count, 0, 0

    def arrive(self):
        self.pending += 1
        assert self.pending <= self.count
        if self.pending == self.count:
            self.pending, self.done = 0, self.done + 1

    def passes(self, parity, phase):
        """Whether wait(parity) passes; `phase`: the phase the kernel means it to wait for (-1: the
        one before the first), which must be the last completed one when it passes (a barrier two
        phases ahead of its waiter aliases the parity: a hang or a pass too early on the GPU)."""
        ok = self.done % 2 != parity
        if ok:
            assert self.done == phase + 1, (self.done, phase)
        return ok


def ws_protocol(total, stages, rng):
    """Runs bwd_ws.py's partitions (producer, dQ writer, consumer warpgroups 0 and 1) as generators that
    yield their waits; checks every shared buffer's writes against its readers (ring slots, dS^T's two
    buffers, the fp32 staging tile, K's halves) and that the program ends (no deadlock)."""
    kv, full = Barrier(1), [Barrier(1) for _ in range(stages)]
    empty = [Barrier(2) for _ in range(stages)]
    ds_ready, ds_free = Barrier(2), [Barrier(2) for _ in range(2)]
    dq_staged, dq_free = Barrier(2), Barrier(1)
    slot_step = [None] * stages  # the step whose Q, dO, lse2, delta a ring slot holds
    ds = [[None, None] for _ in range(2)]  # the step of each warpgroup's half of dS^T buffer 0 / 1
    staged = [None, None]  # the step of each half of the fp32 staging tile
    k_written = [False, False]
    reads_k = [set(), set()]  # consumers whose dQ wgmma (reading all of K) is in flight

    def wait(bar, parity, phase):
        while not bar.passes(parity, phase):
            yield "blocked"

    def producer():
        kv.arrive()  # (TMA of K, V)
        for t in range(total):
            yield from wait(empty[t % stages], ((t // stages) & 1) ^ 1, t // stages - 1)
            slot_step[t % stages] = t
            full[t % stages].arrive()  # (the TMA's bytes)

    def writer():
        for t in range(total):
            yield from wait(dq_staged, t & 1, t)
            assert staged == [t, t]  # the reduce reads both halves of step t
            yield  # (the reduce in flight: store_wait)
            assert staged == [t, t]
            dq_free.arrive()

    def consumer(wg):
        yield from wait(kv, 0, 0)
        for t in range(total):
            yield from wait(full[t % stages], (t // stages) & 1, t // stages)
            assert slot_step[t % stages] == t
            yield  # (S^T, dP^T, dV: the slot's Q, dO, lse2, delta)
            yield from wait(ds_free[t % 2], ((t // 2) & 1) ^ 1, t // 2 - 1)
            ds[t % 2][wg] = t
            ds_ready.arrive()
            yield from wait(ds_ready, t & 1, t)
            assert ds[t % 2] == [t, t]  # dQ = dS K reads both halves of step t
            reads_k[wg].add(t)
            yield  # (dK and dQ in flight)
            assert ds[t % 2] == [t, t] and slot_step[t % stages] == t and not any(k_written)
            empty[t % stages].arrive()
            reads_k[wg].discard(t)
            ds_free[t % 2].arrive()
            yield from wait(dq_free, (t & 1) ^ 1, t - 1)
            staged[wg] = t
            dq_staged.arrive()
        if total > 0:
            yield from wait(ds_free[(total - 1) % 2], ((total - 1) // 2) & 1, (total - 1) // 2)
        assert not reads_k[1 - wg], "dK written over K while the other warpgroup's dQ reads it"
        k_written[wg] = True

    running = [producer(), writer(), consumer(0), consumer(1)]
    stalls = 0
    while running:
        part = rng.choice(running)
        try:
            stalls = stalls + 1 if next(part) == "blocked" else 0
        except StopIteration:
            running.remove(part)
            stalls = 0
        assert stalls < 1000, "deadlock: every partition waits"
    assert k_written == [True, True] and dq_free.done == total and all(b.pending == 0 for b in empty + full)


def test_ws_barrier_protocol():
    """bwd_ws.py's barriers, modelled (ws_protocol): every program length (0 steps: a key block no query
    block sees), ring depths 2 to 4, random interleavings of the four partitions: no deadlock, no
    parity aliasing, no buffer overwritten while read or read before it is written. A wrong phase
    (ds_free waited without the ^ 1, the writer one step early) fails it."""
    rng = random.Random(27)
    for total in (0, 1, 2, 3, 5, 8):
        for stages in (2, 3, 4):
            for _ in range(20):
                ws_protocol(total, stages, rng)
