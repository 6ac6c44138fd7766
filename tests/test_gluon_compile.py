"""The Gluon sm90 kernels (attncc/runtime/gluon) compile for Hopper without a GPU, and what they compile to
has the structure they were written for: wgmma and TMA in the PTX, HGMMA in the SASS with P fed
from registers, the warp-specialized kernel's register reallocation and asynchronous wgmma waits,
shared memory within an sm90 CTA's 227 KB, no spills.

The backward's two kernels (bwd.py) likewise: wgmma with both operands in shared memory (S^T, dP^T,
S, dP) and with the A operand from registers (P^T, dS^T, dS), one wgmma group left in flight while
the next is waited for, TMA for every tile and for the lse2 / delta rows, no spills. The fused kernel
(bwd_fused.py): 5 GEMMs per step (dK += dS^T Q and dQ = dS K from shared memory, the latter with A
transposed), one TMA reduce-add of the dQ partial; its D = 128 variants spill a little (bounded below).
The ws kernel (bwd_ws.py): the fused kernel's GEMMs in both consumer warpgroups, the register
reallocation (240 for the consumers, 24 for the producer and dQ writer warps), the reduce in the
writer, dK / dV stored per warpgroup; its stack bounded (24 bytes at D = 128, Triton 3.6).

Gluon has no interpreter mode: nothing here runs a kernel (tests/gpu/test_gpu_gluon.py does, on a GPU).
CI compiles `launch.ci_variants()` (one per kernel and head dim, both patterns and dtypes, 7 in
all, ~30 s on 2 cores) and `launch.bwd_ci_variants()` (every backward variant at its default
tiles: 3 kernels x 2 patterns x 2 dtypes x head dims 64, 128 = 24, the fused kernel's other dQ
split at D = 128 and the ws kernel at D = 128, causal, bf16: 26, ~65 s); ATTNCC_GLUON_ALL=1 compiles
all of `launch.variants()` and `launch.bwd_variants()` (60 + 96, ~11 minutes).
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import pytest

from early_child import EarlyChild
from kernel_compile import without_interpreter

gluon = pytest.importorskip("triton.experimental.gluon")

from attncc.runtime.gluon import launch  # noqa: E402
from attncc.runtime.gluon.launch import (SM90_SHARED_BYTES, GluonConfig, bwd_ci_variants,  # noqa: E402
                                         bwd_shared_bytes, bwd_variants, check_config, ci_variants, default_config,
                                         shared_bytes, variants)

ROOT = Path(__file__).resolve().parent.parent

ALL = os.environ.get("ATTNCC_GLUON_ALL") == "1"
CASES = variants() if ALL else ci_variants()
BWD_CASES = bwd_variants() if ALL else bwd_ci_variants()


# CASES and BWD_CASES compiled in a child process: conftest turned on TRITON_INTERPRET, under which
# Triton's own jit helpers (gl.max, gl.sum, ...) become interpreter objects Gluon cannot compile. It
# starts when collection ends (conftest.py, tests/early_child.py) and compiles on the core the tests
# before this module leave idle.
EARLY_CHILDREN = {"compiled": EarlyChild(
    "gluon", lambda folder: [sys.executable, "-m", "attncc.runtime.gluon.launch", "--pickle",
                             str(folder / "compiled.pickle")] + (["--all"] if ALL else []),
    lambda folder: without_interpreter(), timeout=900, cwd=ROOT)}


@pytest.fixture(scope="module")
def compiled():
    outcome = EARLY_CHILDREN["compiled"].result()
    assert outcome.returncode == 0, outcome.failure()
    with open(outcome.child.folder / "compiled.pickle", "rb") as f:
        by_variant = {c.variant: c for c in pickle.load(f)}
    return by_variant.__getitem__


@pytest.mark.parametrize("variant", CASES, ids=lambda v: v.name)
def test_compiles_to_wgmma_and_tma(variant, compiled):
    c = compiled(variant)
    cfg, d = variant.config, variant.head_dim
    assert c.cubin[:4] == b"\x7fELF"
    # S = Q K^T takes D/16 wgmma k-steps, P V takes BLOCK_N/16; each must appear at least once.
    assert c.wgmma >= d // 16 + cfg.block_n // 16
    assert c.hgmma == c.wgmma, "ptxas dropped or split wgmma instructions"
    assert c.tma >= 4  # Q, K and V loads and the O store are TMA bulk tensor copies
    assert re.search(r"cp\.async\.bulk\.tensor\.4d\.shared::cluster\.global", c.ptx), "no TMA load"
    assert re.search(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta", c.ptx), "no TMA store of O"
    # P V reads P from registers: an HGMMA whose A operand is a register, not a shared-memory descriptor.
    assert re.search(r"HGMMA\.\S+ R\d+, R\d+, gdesc", c.sass), "P is not fed to wgmma from registers"
    assert re.search(r"HGMMA\.\S+ R\d+, gdesc", c.sass), "S = Q K^T does not read Q from shared memory"


@pytest.mark.parametrize("variant", CASES, ids=lambda v: v.name)
def test_resources_fit_sm90(variant, compiled):
    c = compiled(variant)
    cfg = variant.config
    assert shared_bytes(cfg, variant.head_dim) <= c.shared <= SM90_SHARED_BYTES
    if cfg.kernel == "ws":
        # The consumers run at the 240-register budget (S, O and P of 64 rows plus the mask's
        # positions); in some variants ptxas parks one 4-byte word per tile on the stack (measured:
        # a predicate word at D = 256, a scalar without ping-pong at D = 128), outside the key loop.
        # Anything more is a regression.
        assert c.stack <= 8, f"{c.stack} bytes of local stack: spills"
    else:
        assert c.stack == 0, f"{c.stack} bytes of local stack: spills"
    if cfg.kernel == "pipelined":
        assert c.registers <= 255 and not c.setmaxnreg
    else:
        # 3 warpgroups under the launch cap, then consumers up to their budget, the load warp down.
        assert c.registers <= cfg.maxnreg and 3 * 128 * cfg.maxnreg <= 65536
        assert cfg.consumer_regs in c.setmaxnreg and cfg.loader_regs in c.setmaxnreg


@pytest.mark.parametrize("variant", [v for v in CASES if v.config.kernel == "ws"], ids=lambda v: v.name)
def test_ws_overlaps_s_with_pv(variant, compiled):
    """The consumer waits for S with one wgmma group (P V) still in flight: the intra-warpgroup overlap."""
    ptx = compiled(variant).ptx
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    assert "mbarrier.try_wait" in ptx and "mbarrier.arrive" in ptx


@pytest.mark.parametrize("variant", BWD_CASES, ids=lambda v: v.name)
def test_backward_compiles_to_wgmma_and_tma(variant, compiled):
    c = compiled(variant)
    cfg, d = variant.config, variant.head_dim
    assert c.cubin[:4] == b"\x7fELF"
    # One copy of the step, wgmma k-steps of 16: dK/dV: S^T = K Q^T and dP^T = V dO^T (D each),
    # dV += P^T dO and dK += dS^T Q (kv_block_m each); dQ: S, dP (D each), dQ += dS K (q_block_n).
    # fused: dK/dV's, plus dQ = dS K (kv_block_n); ws: the fused kernel's in each consumer warpgroup
    # (its 64 keys in S^T, dP^T, dV, dK; dQ over the block's kv_block_n keys, its half of the columns).
    if variant.part == "dkdv":
        assert c.wgmma == 2 * d // 16 + 2 * cfg.kv_block_m // 16
    elif variant.part == "fused":  # dQ in dq_pieces column slices, each a wgmma over the block's keys
        assert c.wgmma == 2 * d // 16 + 2 * cfg.kv_block_m // 16 + cfg.dq_pieces * cfg.kv_block_n // 16
    elif variant.part == "ws":
        assert c.wgmma == 2 * (2 * d // 16 + 2 * cfg.kv_block_m // 16 + cfg.kv_block_n // 16)
    else:
        assert c.wgmma == 2 * d // 16 + cfg.q_block_n // 16
    assert c.hgmma == c.wgmma, "ptxas dropped or split wgmma instructions"
    assert re.search(r"cp\.async\.bulk\.tensor\.4d\.shared::cluster\.global", c.ptx), "no TMA load of the tiles"
    assert re.search(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta", c.ptx), "no TMA store of the gradients"
    if variant.part in launch.KEY_BLOCK_PARTS:
        assert re.search(r"cp\.async\.bulk\.tensor\.3d\.shared::cluster\.global", c.ptx), "lse2 / delta not by TMA"
        stores = 4 if variant.part == "ws" else 2  # dK, dV (ws: each consumer warpgroup its 64 keys')
        assert len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta", c.ptx)) == stores
    # dQ: a TMA reduce-add of the fp32 partial in the fused kernel, none elsewhere (no atomics at all);
    # the ws kernel's one dQ writer warp issues it as D * 4 / 128 messages of 128-byte rows (where the
    # fused kernel's 8 warps take one each).
    reduces = re.findall(r"cp\.reduce\.async\.bulk\.tensor\.4d\.global\.shared::cta\.add", c.ptx)
    assert len(reduces) == {"fused": 1, "ws": d // 32}.get(variant.part, 0)
    assert not re.search(r"^\s*(@\S+\s+)?(atom|red)\.", c.ptx, re.M), "an atomic instruction"
    if variant.part in ("fused", "ws"):
        # dK += dS^T Q and dQ = dS K read dS from shared memory, the latter through the transposed view
        assert re.search(r"HGMMA\.\S+ R\d+, gdesc\[UR\d+\]\.tnspA", c.sass), "dQ = dS K not from dS^T in smem"
    # P^T / dS^T / dS from registers; S^T, dP^T / S, dP with both operands in shared memory.
    assert re.search(r"HGMMA\.\S+ R\d+, R\d+, gdesc", c.sass), "no wgmma with its A operand in registers"
    assert re.search(r"HGMMA\.\S+ R\d+, gdesc", c.sass), "no wgmma reading both operands from shared memory"
    # The two independent GEMMs of a step run together: a wait that leaves one group in flight.
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", c.ptx)
    assert "mbarrier.try_wait" in c.ptx


@pytest.mark.parametrize("variant", BWD_CASES, ids=lambda v: v.name)
def test_backward_resources_fit_sm90(variant, compiled):
    """One instruction stream: up to 255 registers per thread and no setmaxnreg; the tiles chosen so
    that nothing spills (dK/dV at D = 128 runs at 252)."""
    c = compiled(variant)
    assert bwd_shared_bytes(variant.config, variant.head_dim)[variant.part] <= c.shared <= SM90_SHARED_BYTES
    if variant.part == "ws":
        # the launch's cap; 240 per consumer warpgroup and 24 per worker warp after setmaxnreg. Stack
        # measured (Triton 3.6): 24 bytes at D = 128 (loop-invariant scalars, one LDL per step), 0 at 64.
        from attncc.runtime.gluon import bwd_ws
        assert c.registers <= bwd_ws.MAXNREG
        assert {bwd_ws.CONSUMER_REGS, bwd_ws.WORKER_REGS} <= set(c.setmaxnreg)
        assert c.stack <= (32 if variant.head_dim == 128 else 0), f"{c.stack} bytes of local stack"
        return
    if variant.part == "fused" and variant.head_dim == 128:
        # measured (Triton 3.6): 64-88 bytes with the dQ partial in two halves (the default), 152-168
        # in one piece: loop-invariant scalars parked around the step's peak; docs/gluon.md. More is
        # a regression.
        assert c.stack <= (96 if variant.config.dq_pieces == 2 else 176), f"{c.stack} bytes of local stack"
    else:
        assert c.stack == 0, f"{c.stack} bytes of local stack: spills"
    assert c.registers <= 255 and not c.setmaxnreg


def test_backward_variant_list_covers_the_matrix():
    vs = bwd_variants()
    assert {(v.part, v.pattern, v.dtype, v.head_dim) for v in vs} == {
        (part, p, dt, d) for part in launch.BWD_PARTS for p in ("dense", "causal") for dt in launch.DTYPES
        for d in launch.BWD_HEAD_DIMS}
    assert len({v.name for v in vs}) == len(vs)
    assert all(bwd_shared_bytes(v.config, v.head_dim)[v.part] <= SM90_SHARED_BYTES - 1024 for v in vs)
    ci = bwd_ci_variants()
    assert {(v.part, v.pattern, v.dtype, v.head_dim) for v in ci} == {
        (v.part, v.pattern, v.dtype, v.head_dim) for v in vs
        if v.part != "ws" or (v.pattern, v.dtype, v.head_dim) == launch.WS_CI_VARIANT} and len(ci) == 26
    assert {v.config.dq_pieces for v in ci if v.part == "fused" and v.head_dim == 128} == {1, 2}


def test_default_configs_fit_and_oversized_ones_are_refused():
    for kernel in launch.KERNELS:
        for d in launch.HEAD_DIMS:
            cfg = default_config(d, kernel)
            check_config(cfg, d)
            assert shared_bytes(cfg, d) <= SM90_SHARED_BYTES - 1024
    with pytest.raises(ValueError, match="shared memory"):
        check_config(GluonConfig("ws", stages=3), 128)  # 32 + 32 + 2 * 3 * 32 KB = 256 KB
    with pytest.raises(ValueError, match="block_m = 128"):
        check_config(GluonConfig("ws", block_m=64), 128)
    with pytest.raises(ValueError, match="block_n"):
        check_config(GluonConfig("ws", block_n=96), 64)
    with pytest.raises(ValueError, match="head_dim"):
        default_config(96)


def test_variant_list_covers_the_matrix():
    vs = variants()
    assert {(v.config.kernel, v.pattern, v.dtype, v.head_dim) for v in vs} == {
        (k, p, dt, d) for k in launch.KERNELS for p in ("dense", "causal") for dt in launch.DTYPES
        for d in launch.HEAD_DIMS}
    assert len({v.name for v in vs}) == len(vs)
    assert all(shared_bytes(v.config, v.head_dim) <= SM90_SHARED_BYTES - 1024 for v in vs)
    assert any(v.config.kernel == "ws" and not v.config.pingpong for v in vs)


def test_head_group_keeps_kv_in_half_the_l2_and_feeds_every_sm():
    # dense 4K, D 128, bf16: 2 MB of K and V per head, 25 MB budget -> 12 heads (32 tiles each)
    assert launch.head_group(64, 32, 4096, 128, 2, 1, 132) == 12
    # few query blocks per head: more heads per group so that 132 SMs all get a tile
    assert launch.head_group(64, 4, 65536, 128, 2, 1, 132) == 33
    # GQA: 4 q heads share one K/V, 4x as many q heads fit
    assert launch.head_group(256, 64, 8192, 128, 2, 4, 132) == 25
    assert launch.head_group(3, 1, 10**7, 256, 2, 1, 132) == 3


def test_attention_refuses_bad_operands_before_launching():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        launch.attention(q, q, q)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        launch.attention(q.float(), q, q)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        launch.check_operands(*(torch.randn(1, h, 64, 64, dtype=torch.bfloat16) for h in (3, 2, 2)))
    with pytest.raises(ValueError, match="head dim"):
        launch.check_operands(*(torch.randn(1, 2, 64, 96, dtype=torch.bfloat16),) * 3)
    with pytest.raises(ValueError, match="k's shape"):
        launch.check_operands(q, q, q[:, :, :32])
    with pytest.raises(ValueError, match="pattern"):
        launch.pattern_fragments("sliding")
