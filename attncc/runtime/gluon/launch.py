"""Host side of the Gluon sm90 kernels: configs, TMA descriptors, grids, launches, and compilation
of every variant to a cubin without a GPU (for CI and for reading the PTX/SASS).

`attention` is what a generated module's forward calls (through attncc.runtime.backend): with a
built-in `pattern`, or with the fragments codegen rendered from the module's Plan (its `walk`,
`mask`, `score`, `segments` and `pattern_args` arguments; walks.py gives their contract).
`attention_backward` is what its backward calls, for the built-in walks.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from attncc.runtime.gluon import BWD_HEAD_DIMS, DTYPES, HEAD_DIMS, walks

LOG2E = 1.4426950408889634
KERNELS = ("ws", "pipelined")
SM90_SHARED_BYTES = 232448  # 227 KB: the most one CTA may allocate on an H100/H200
L2_BYTES = 50 * 2**20       # H100/H200 L2; the head-group size aims at half of it


@dataclass(frozen=True)
class GluonConfig:
    """One compiled variant's tile and pipeline choices.

    kernel: "ws" (FlashAttention-3 structure, fwd_ws.py) or "pipelined" (one instruction stream,
        fwd_pipelined.py).
    block_m: query rows per CTA tile. "ws": always 128 (two consumer warpgroups x 64 rows);
        "pipelined": 16 per warp (num_warps = block_m // 16).
    block_n: keys per K/V block (one wgmma N for S = Q K^T; a power of two <= 256).
    stages: depth of the K/V shared-memory ring.
    pingpong: "ws" only: the two consumer warpgroups alternate issuing their wgmmas.
    o_in_q: "ws" only: stage O in the warpgroup's Q buffer (needed where a separate buffer does
        not fit, D = 256); the next Q load then waits for the O store.
    consumer_regs / loader_regs / maxnreg: "ws" only: setmaxnreg budgets per thread of the
        consumer warpgroups and the load warp, and the launch cap that fits 3 warpgroups
        (3 * 128 * 168 <= 65536 registers) before the reallocation.
    """
    kernel: str = "ws"
    block_m: int = 128
    block_n: int = 128
    stages: int = 2
    pingpong: bool = True
    o_in_q: bool = False
    consumer_regs: int = 240
    loader_regs: int = 24
    maxnreg: int = 168

    @property
    def num_warps(self) -> int:
        return 4 if self.kernel == "ws" else self.block_m // 16

    @property
    def rows_per_q_block(self) -> int:
        """Rows of one Q/O TMA box: a consumer warpgroup's 64 ("ws") or the whole tile."""
        return 64 if self.kernel == "ws" else self.block_m


def default_config(head_dim: int, kernel: str = "ws") -> GluonConfig:
    """The built-in tiles by head dim (the deepest K/V ring that fits next to Q and O staging).

    ws, D = 64: 16 KB per K or V block, 4 stages fit (Q 16 KB + O 16 KB + 128 KB ring);
    D = 128: 32 KB per block, 2 stages (192 KB in all; 3 would need 256 KB);
    D = 256: 64-key blocks (32 KB), 2 stages, O staged in Q's buffer (Q alone is 64 KB)."""
    _check_choice("kernel", kernel, KERNELS)
    _check_choice("head_dim", head_dim, HEAD_DIMS)
    if kernel == "ws":
        if head_dim == 64:
            return GluonConfig(kernel, block_n=128, stages=4)
        if head_dim == 128:
            return GluonConfig(kernel, block_n=128, stages=2)
        return GluonConfig(kernel, block_n=64, stages=2, o_in_q=True)
    if head_dim == 256:
        return GluonConfig(kernel, block_m=64, block_n=64, stages=2)
    return GluonConfig(kernel, block_m=128, block_n=128, stages=3 if head_dim == 64 else 2)


def shared_bytes(config: GluonConfig, head_dim: int, elem_bytes: int = 2) -> int:
    """The kernel's shared-memory tiles (barriers aside), to reject configs that cannot launch."""
    q_tile = config.block_m * head_dim * elem_bytes
    ring = 2 * config.stages * config.block_n * head_dim * elem_bytes
    if config.kernel == "ws":
        return q_tile + ring + (0 if config.o_in_q else q_tile)
    return q_tile + ring  # O is staged in Q's buffer


def check_config(config: GluonConfig, head_dim: int) -> None:
    if config.kernel == "ws" and config.block_m != 128:
        raise ValueError(f"attncc.runtime.gluon: the ws kernel has block_m = 128 (2 x 64 rows), got {config.block_m}")
    if config.block_m % 64 or not 64 <= config.block_m <= 128:
        raise ValueError(f"attncc.runtime.gluon: block_m must be 64 or 128, got {config.block_m}")
    if config.block_n not in (16, 32, 64, 128, 256):
        raise ValueError(f"attncc.runtime.gluon: block_n must be a power of two in [16, 256], got {config.block_n}")
    if config.stages < 1 or (config.kernel == "pipelined" and config.stages < 2):
        raise ValueError(f"attncc.runtime.gluon: stages must be >= 2 (pipelined) or >= 1 (ws), got {config.stages}")
    need = shared_bytes(config, head_dim)
    if need > SM90_SHARED_BYTES - 1024:
        raise ValueError(f"attncc.runtime.gluon: {config} at head dim {head_dim} needs {need} bytes of shared memory, "
                         f"more than the {SM90_SHARED_BYTES} an sm90 CTA may use")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"attncc.runtime.gluon: {name} must be one of {allowed}, got {value!r}")


def pattern_fragments(pattern: str):
    """(walk, mask) of a shipped pattern; codegen will pass rendered ones instead."""
    _check_choice("pattern", pattern, tuple(walks.PATTERNS))
    return walks.PATTERNS[pattern]


BWD_PARTS = ("dkdv", "dq", "fused", "ws")
# How the backward computes dQ: "split", a kernel of its own (bwd.py: 7 GEMMs per tile pair,
# deterministic), or "fused" into the dK/dV program (bwd_fused.py: 5 GEMMs, dQ accumulated in fp32
# by TMA reduce-adds in an order that depends on scheduling), or the same warp-specialized ("ws",
# bwd_ws.py: a producer warp, a dQ writer warp, two consumer warpgroups), and the kernels each one
# launches.
BWD_METHODS = {"split": ("dkdv", "dq"), "fused": ("fused",), "ws": ("ws",)}
# the key-block programs (one per key block, the query blocks of its walk streaming through a ring)
KEY_BLOCK_PARTS = ("dkdv", "fused", "ws")


@dataclass(frozen=True)
class GluonBwdConfig:
    """The backward kernels' tiles (bwd.py); both are one instruction stream of 16 rows per warp.

    kv_block_n: keys per dK/dV program (num_warps = kv_block_n // 16: 128 keys are two warpgroups
        of 64). Its registers hold dK and dV (2 x 64 fp32 per thread at D = 128) besides S^T, dP^T.
        The ws kernel (bwd_ws.py) takes 128: two consumer warpgroups of 64 keys, launched with the
        4 warps of its default partition (the other warpgroup and the two 1-warp workers are its
        warp_specialize partitions).
    kv_block_m: query rows per step of the dK/dV program: the N of S^T = K Q^T and dP^T = V dO^T,
        the K of dV += P^T dO and dK += dS^T Q.
    kv_stages: depth of its ring of (Q, dO, lse2, delta) blocks (refilled kv_stages - 1 steps ahead).
    q_block_m: query rows per dQ program (num_warps = q_block_m // 16).
    q_block_n: keys per step of the dQ program.
    q_stages: depth of its ring of (K, V) blocks.
    dq_pieces: the fused kernel's (bwd_fused.py): 1, its dQ partial = dS K is one wgmma in flight with
        dV's and dK's; 2, two column halves after them (fewer registers: at D = 128, 64-88 bytes of
        spills instead of 152-168; each half re-reads dS from shared memory). Neither is timed.
        The ws kernel ignores it (each consumer warpgroup computes its half of the head dim).
    """
    kv_block_n: int = 128
    kv_block_m: int = 64
    kv_stages: int = 3
    q_block_m: int = 128
    q_block_n: int = 64
    q_stages: int = 3
    dq_pieces: int = 1

    def num_warps(self, part: str) -> int:
        if part == "ws":
            return 4  # the launch's: the default partition (consumer warpgroup 0)
        return (self.q_block_m if part == "dq" else self.kv_block_n) // 16

    def stages(self, part: str) -> int:
        return self.q_stages if part == "dq" else self.kv_stages


def default_bwd_config(head_dim: int, method: str = "split") -> GluonBwdConfig:
    """The backward's tiles by head dim (compiled register counts in docs/gluon.md; no spills).

    D = 128: programs of one warpgroup whose shared memory lets two run on an SM, so that one's
    pipeline fill and epilogue overlap the other's GEMMs (one program per SM before): dK/dV 64 keys
    x 64-row query steps (254 registers; 128-row steps would not fit next to dK and dV), 2 stages
    (99 KB); dQ 64 rows x 64-key steps (165 registers), 2 stages (98 KB). Measured on an H100
    (session 24, docs/performance.md, f+b, bf16, against the two-warpgroup programs of 128 keys /
    128 rows with 3 stages, gradients bitwise equal): block diagonal 1024 at 16K 2.594 -> 2.293 ms,
    chunked local 2048 2.859 -> 2.569, causal 8K 4.696 -> 4.347, dense 4K 4.555 -> 4.245, GQA 32/8
    causal 8K 9.381 -> 8.542.
    D = 64: one warpgroup too: dK/dV 64 x 64 (194 registers), 4 stages (82 KB); dQ 64 x 128 (217
    registers), 2 stages (80 KB); causal 8K (B4 H16) f+b 6.001 -> 5.331 ms against 128 x 64 / 128 x
    128 (3 stages), two per SM.
    Fused (bwd_fused.py, `method` "fused"): its own tiles, the two-warpgroup ones (128 keys x 64 rows,
    3 stages at D = 128, 4 at 64): with one warpgroup of 64 keys twice as many programs reduce-add
    into each dQ row, and its f+b took 1.20-1.36x longer (H100, session 24: causal 8K 5.052 -> 6.065
    ms, dense 4K 4.750 -> 5.890); at D = 128 its dQ partial in two column halves (`dq_pieces`: fewer
    spills), at 64 in one piece (no spills either way).
    ws (bwd_ws.py, `method` "ws", the default where deterministic algorithms are off): the fused
    kernel's tiles (128 keys in two consumer warpgroups x 64-row steps), dQ split between the
    warpgroups by columns; 2 stages at D = 128 (H100, session 28, f+b: causal 8K 3.965 -> 3.864 ms
    against 3, dense 4K 3.794 -> 3.731, GQA 32/8 causal 8K 8.040 -> 8.025; 193.5 KB of shared
    memory), 4 at 64 (not swept).
    D = 256 has none: dK and dV of even one warpgroup's 64 keys are 2 x 128 fp32 registers per
    thread, the whole register file (`check_bwd_head_dim` says so)."""
    check_bwd_head_dim(head_dim)
    _check_choice("method", method, tuple(BWD_METHODS))
    if method == "fused":
        return GluonBwdConfig(kv_block_n=128, kv_block_m=64, kv_stages=4 if head_dim == 64 else 3,
                              dq_pieces=1 if head_dim == 64 else 2)
    if method == "ws":
        return GluonBwdConfig(kv_block_n=128, kv_block_m=64, kv_stages=4 if head_dim == 64 else 2)
    if head_dim == 64:
        return GluonBwdConfig(kv_block_n=64, kv_block_m=64, kv_stages=4, q_block_m=64, q_block_n=128, q_stages=2)
    return GluonBwdConfig(kv_block_n=64, kv_block_m=64, kv_stages=2, q_block_m=64, q_block_n=64, q_stages=2,
                          dq_pieces=2)


def bwd_shared_bytes(config: GluonBwdConfig, head_dim: int, elem_bytes: int = 2) -> Dict[str, int]:
    """Each backward kernel's shared-memory tiles (barriers aside). dK/dV: K and V of the program,
    and per stage Q, dO and the fp32 lse2 / delta rows; dQ: Q and dO, and per stage K and V (dK, dV,
    dQ are staged in K's, V's and Q's buffers); fused: dK/dV's, plus dS^T of a step and the fp32
    staging tile of its dQ partial; ws: the fused kernel's with dS^T double-buffered (a warpgroup
    writes step t + 1's while the other's dQ of step t may still read step t's)."""
    kv = 2 * config.kv_block_n * head_dim * elem_bytes
    kv += config.kv_stages * (2 * config.kv_block_m * head_dim * elem_bytes + 2 * config.kv_block_m * 4)
    q = 2 * config.q_block_m * head_dim * elem_bytes + config.q_stages * 2 * config.q_block_n * head_dim * elem_bytes
    fused = kv + config.kv_block_n * config.kv_block_m * elem_bytes + config.kv_block_m * head_dim * 4
    ds = config.kv_block_n * config.kv_block_m * elem_bytes
    return {"dkdv": kv, "dq": q, "fused": fused, "ws": fused + ds}


def check_bwd_head_dim(head_dim: int) -> None:
    if head_dim not in BWD_HEAD_DIMS:
        raise ValueError(f"attncc.runtime.gluon: the Gluon backward takes head dims {BWD_HEAD_DIMS}, got {head_dim} "
                         f"(at D = 256, dK and dV of one warpgroup's 64 keys alone would fill the 255 registers per "
                         f"thread)")


def check_bwd_config(config: GluonBwdConfig, head_dim: int, method: str = "split") -> None:
    """Refuse tiles that the kernels of backward `method` (BWD_METHODS) cannot take."""
    _check_choice("method", method, tuple(BWD_METHODS))
    check_bwd_head_dim(head_dim)
    if method in ("fused", "ws") and config.kv_block_m != 64:
        raise ValueError(f"attncc.runtime.gluon: the {method} backward takes kv_block_m = 64 (its dQ partial is one "
                         f"64-row wgmma, the columns split between the warpgroups), got {config.kv_block_m}")
    if method == "ws" and config.kv_block_n != 128:
        raise ValueError(f"attncc.runtime.gluon: the ws backward takes kv_block_n = 128 (two consumer warpgroups of "
                         f"64 keys), got {config.kv_block_n}")
    warpgroups = config.kv_block_n // 64
    if (config.dq_pieces < 1 or head_dim % (config.dq_pieces * warpgroups) or
            head_dim // (config.dq_pieces * warpgroups) % 8):
        raise ValueError(f"attncc.runtime.gluon: dq_pieces must split head dim {head_dim} into column slices that "
                         f"the {warpgroups} warpgroups split again in multiples of 8, got {config.dq_pieces}")
    for name in ("kv_block_n", "q_block_m"):
        if getattr(config, name) not in (64, 128):
            raise ValueError(f"attncc.runtime.gluon: {name} must be 64 or 128 (16 rows per warp, whole warpgroups), "
                             f"got {getattr(config, name)}")
    for name in ("kv_block_m", "q_block_n"):
        if getattr(config, name) not in (16, 32, 64, 128, 256):
            raise ValueError(f"attncc.runtime.gluon: {name} must be a power of two in [16, 256], got "
                             f"{getattr(config, name)}")
    for name in ("kv_stages", "q_stages"):
        if getattr(config, name) < 2:
            raise ValueError(f"attncc.runtime.gluon: {name} must be >= 2, got {getattr(config, name)}")
    for part, need in bwd_shared_bytes(config, head_dim).items():
        if part in BWD_METHODS[method] and need > SM90_SHARED_BYTES - 1024:
            raise ValueError(f"attncc.runtime.gluon: the {part} kernel of {config} at head dim {head_dim} needs {need} "
                             f"bytes of shared memory, more than the {SM90_SHARED_BYTES} an sm90 CTA may use")


def backward_fragments(pattern: str):
    """(walk, qwalk, mask) of a shipped pattern: the dQ kernel walks key blocks per query block as
    the forward does, the dK/dV kernel query blocks per key block."""
    walk, mask = pattern_fragments(pattern)
    return walk, walks.QWALKS[pattern], mask


# --------------------------------------------------------------------------------------------
# Launch on a GPU


def attention(q, k, v, *, pattern: str = "dense", scale: Optional[float] = None, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None, return_lse: bool = False,
              config: Optional[GluonConfig] = None, walk=None, mask=None, out=None, lse_out=None, score=None,
              segments: int = 1, pattern_args: tuple = (), block=None, lse_raw_out=None):
    """Softmax attention through the Gluon sm90 kernels (forward only).

    q [B, Hq, Nq, D], k / v [B, Hkv, Nk, D] (Hq a multiple of Hkv: GQA), bf16 or fp16 on an sm90
    GPU. Query row r sits at position q_offset + r, key c at k_offset + c (chunks of a longer
    sequence); n_q / n_k are the full lengths a mask may refer to (default Nq / Nk). `walk` and
    `mask` override the pattern's fragments; `score` (a score hook), `segments` (the walk's
    segments per tile), `block` (a block-list walk's key block of a walk position) and `pattern_args`
    (the spec's params, ints and floats, then a block-list walk's lists and the [inputs] with their
    strides and sizes: tensors on q's device and ints) come with rendered ones (walks.py gives their
    contract). Returns o [B, Hq, Nq, D] (and the natural-log LSE
    [B, Hq, Nq] in float32 with return_lse), written into `out` / `lse_out` when given (contiguous,
    of those shapes and dtypes: checks poison them). `lse_raw_out` (with return_lse; contiguous float32
    [B, Hq, Nq]): also the LSE in log2 units as the key loop has it (m + log2(l)), which a backward
    reads instead of the natural LSE taken back (two float32 roundings fewer)."""
    import torch
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, Hq, Nq, D, Hkv, Nk = check_operands(q, k, v)
    check_devices(q, k, v)
    if config is None:
        config = default_config(D)
    check_config(config, D)
    if walk is None or mask is None:
        default_walk, default_mask = pattern_fragments(pattern)
        walk = default_walk if walk is None else walk
        mask = default_mask if mask is None else mask
    check_fragment_args(segments, pattern_args, q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not scale > 0:  # the kernels take the scaled max as the max of the scaled scores
        raise ValueError(f"attncc.runtime.gluon: scale must be > 0, got {scale}")
    n_q = Nq if n_q is None else n_q
    n_k = Nk if n_k is None else n_k

    q, k, v = (_tma_ready(t) for t in (q, k, v))
    o = _output(out, "out", (B, Hq, Nq, D), q.dtype, q.device)
    lse = _output(lse_out, "lse_out", (B, Hq, Nq) if return_lse else (1, ), torch.float32, q.device)
    if lse_raw_out is not None and not return_lse:
        raise ValueError("attncc.runtime.gluon: lse_raw_out comes with return_lse=True")
    raw = lse if lse_raw_out is None else _output(lse_raw_out, "lse_raw_out", (B, Hq, Nq), torch.float32, q.device)
    gl_dtype = _gl_dtype(q.dtype)
    rows = config.rows_per_q_block

    def desc(t, block_rows):
        block = [1, 1, block_rows, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, _smem_layout(block, gl_dtype))

    q_desc, o_desc = desc(q, rows), desc(o, rows)
    k_desc, v_desc = desc(k, config.block_n), desc(v, config.block_n)
    qk_scale = scale * LOG2E
    group = Hq // Hkv
    if config.kernel == "pipelined":
        from attncc.runtime.gluon.fwd_pipelined import attn_fwd_pipelined
        grid = (triton.cdiv(Nq, config.block_m), B * Hq)
        attn_fwd_pipelined[grid](q_desc, k_desc, v_desc, o_desc, lse, raw, Nq, Hq, group, Nq, Nk, q_offset, k_offset,
                                 n_q, n_k, qk_scale, pattern_args, WALK=walk, MASK=mask, SCORE=score,
                                 SEGMENTS=segments, RETURN_LSE=return_lse, STAGES=config.stages,
                                 num_warps=config.num_warps, BLOCK=block, STORE_RAW=lse_raw_out is not None)
    else:
        from attncc.runtime.gluon.fwd_ws import attn_fwd_ws
        n_tiles = triton.cdiv(Nq, config.block_m) * B * Hq
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        snake = snake_schedule(pattern, walk)
        heads_per_group = B * Hq if snake else head_group(B * Hq, triton.cdiv(Nq, config.block_m), Nk, D,
                                                           q.element_size(), group, sms)
        attn_fwd_ws[(min(sms, n_tiles), )](q_desc, k_desc, v_desc, o_desc, lse, raw, Nq, B, Hq, group, Nq, Nk,
                                            q_offset, k_offset, n_q, n_k, qk_scale, heads_per_group, pattern_args, WALK=walk,
                                            MASK=mask, SCORE=score, SEGMENTS=segments, RETURN_LSE=return_lse,
                                            STAGES=config.stages, PINGPONG=config.pingpong,
                                            O_IN_Q=config.o_in_q, CONSUMER_REGS=config.consumer_regs,
                                            LOADER_REGS=config.loader_regs, num_warps=config.num_warps,
                                            maxnreg=config.maxnreg, BLOCK=block, SNAKE=snake,
                                            STORE_RAW=lse_raw_out is not None)
    return (o, lse) if return_lse else o


def attention_backward(q, k, v, o, lse, do, dlse=None, *, pattern: str = "dense", scale: Optional[float] = None,
                       q_offset: int = 0, k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
                       config: Optional[GluonBwdConfig] = None, walk=None, qwalk=None, mask=None, qmask=None,
                       score=None, score_grad=None, segments: int = 1, qsegments: int = 1, pattern_args: tuple = (),
                       method: str = "split", lse_raw=None):
    """dq, dk, dv of `attention(q, k, v, ...)` through the Gluon sm90 backward: `method` "split"
    (bwd.py: a dK/dV and a dQ kernel, deterministic), "fused" (bwd_fused.py: dQ added into an fp32
    accumulator from the dK/dV program by TMA reduce-adds, then scaled and converted; fewer GEMMs,
    dQ's last bits depend on the order of the additions) or "ws" (bwd_ws.py: the same warp-specialized,
    a producer warp and a dQ writer warp beside two consumer warpgroups).

    q, k, v and the call's options as for `attention`; o [B, Hq, Nq, D] and the natural-log LSE
    [B, Hq, Nq] (float32; -inf on rows without an allowed key) are the forward's outputs, do = dLoss/do
    (q's dtype and shape), dlse = dLoss/dlse ([B, Hq, Nq], or None when the loss does not use the LSE);
    `lse_raw`, where the forward wrote it (`attention`'s `lse_raw_out`), the same LSE in log2 units,
    read instead of the natural one taken back. `walk`, `qwalk`, `mask` override the pattern's
    fragments (walks.py), `qmask` the dK/dV kernel's mask (default: `mask`; rendered fragments solve
    it for the query); `score`, `score_grad`, `segments` (the walk's segments per query block), `qsegments` (the qwalk's per key block) and
    `pattern_args` come with rendered ones (a generated module's `_gluon.py`). Head dims 64 and 128.
    Returns dq [B, Hq, Nq, D], dk, dv [B, Hkv, Nk, D] in q's dtype, contiguous; dK and dV are summed
    over the query heads of each GQA group inside one program (no atomics: deterministic)."""
    _check_choice("method", method, tuple(BWD_METHODS))
    import torch
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attncc.runtime.gluon.bwd import attn_bwd_dkdv, attn_bwd_dq
    from attncc.runtime.gluon.bwd_fused import attn_bwd_fused
    from attncc.runtime.gluon.bwd_ws import CONSUMER_REGS, MAXNREG, WORKER_REGS, attn_bwd_ws
    from attncc.runtime.gluon.preprocess import bwd_postprocess, bwd_preprocess

    B, Hq, Nq, D, Hkv, Nk = check_operands(q, k, v)
    check_backward_operands(q, o, lse, do, dlse, lse_raw)
    check_devices(q, k, v)
    config = default_bwd_config(D, method) if config is None else config
    check_bwd_config(config, D, method)
    default_walk, default_qwalk, default_mask = backward_fragments(pattern)
    walk = default_walk if walk is None else walk
    qwalk = default_qwalk if qwalk is None else qwalk
    mask = default_mask if mask is None else mask
    qmask = mask if qmask is None else qmask
    check_fragment_args(segments, pattern_args, q)
    check_fragment_args(qsegments, pattern_args, q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"attncc.runtime.gluon: scale must be > 0, got {scale}")
    n_q = Nq if n_q is None else n_q
    n_k = Nk if n_k is None else n_k
    if any(st == 0 and n > 1 for st, n in zip(do.stride(), do.shape)):
        do = do.contiguous()  # a broadcast gradient (o.sum().backward()): TMA descriptors get real strides

    # delta and lse2 rows padded to 16 bytes: the dK/dV kernel reads them by TMA ([B, Hq, Nq] views
    # whose TMA shape ends at Nq, so what lies past a row reads as zero).
    row_stride = -(-Nq // 4) * 4
    rows_buffer = torch.empty(2, B, Hq, row_stride, dtype=torch.float32, device=q.device)
    delta, lse2 = rows_buffer[0, ..., :Nq], rows_buffer[1, ..., :Nq]
    lse = lse.contiguous()
    lse_raw = None if lse_raw is None else lse_raw.contiguous()
    dlse_in = None if dlse is None else dlse.to(torch.float32).contiguous()
    prep_rows = 64
    bwd_preprocess[(triton.cdiv(Nq, prep_rows), B * Hq)](
        o, do, lse, lse if dlse_in is None else dlse_in, lse if lse_raw is None else lse_raw, delta, lse2,
        *o.stride(), *do.stride(), Hq, Nq, row_stride,
        HEAD_DIM=D, BLOCK_M=prep_rows, HAS_DLSE=dlse_in is not None, RAW_LSE=lse_raw is not None, num_warps=4)

    q, k, v, do = (_tma_ready(t) for t in (q, k, v, do))
    dq = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, Nk, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, Hkv, Nk, D, dtype=q.dtype, device=q.device)
    gl_dtype = _gl_dtype(q.dtype)

    def desc(t, block_rows, dtype=gl_dtype):
        block = [1, 1, block_rows, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, _smem_layout(block, dtype))

    def rows_desc(t, block_rows):
        block = [1, 1, block_rows]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block, _smem_layout(block, _gl_dtype("float32")))

    qk_scale = scale * LOG2E
    group = Hq // Hkv
    c = config
    scalars = (Hq, group, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, scale, pattern_args)
    # the key-block programs (dK/dV, fused, ws): their tiles, the transposed walk and the query-side mask
    key_grid = (triton.cdiv(Nk, c.kv_block_n), B * Hkv)
    key_rows = key_box_rows(c, method)
    key_descs = (desc(q, c.kv_block_m), desc(k, key_rows), desc(v, key_rows), desc(do, c.kv_block_m),
                 desc(dk, key_rows), desc(dv, key_rows))
    row_descs = (rows_desc(lse2, c.kv_block_m), rows_desc(delta, c.kv_block_m))
    key_fragments = dict(QWALK=qwalk, MASK=qmask, SCORE=score, SCORE_GRAD=score_grad, QSEGMENTS=qsegments,
                         STAGES=c.kv_stages)
    if method in ("fused", "ws"):
        dq_acc = torch.zeros(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
        acc_desc = desc(dq_acc, c.kv_block_m, _gl_dtype("float32"))
        if method == "fused":
            attn_bwd_fused[key_grid](*key_descs, acc_desc, *row_descs, *scalars, **key_fragments,
                                     DQ_PIECES=c.dq_pieces, num_warps=c.num_warps("fused"))
        else:
            heads_first = bwd_heads_first(key_grid[0])
            attn_bwd_ws[key_grid[::-1] if heads_first else key_grid](
                *key_descs, acc_desc, *row_descs, *scalars, **key_fragments, CONSUMER_REGS=CONSUMER_REGS,
                WORKER_REGS=WORKER_REGS, HEADS_FIRST=heads_first, num_warps=c.num_warps("ws"), maxnreg=MAXNREG)
        post_block = 1024
        bwd_postprocess[(triton.cdiv(dq.numel(), post_block), )](dq_acc, dq, scale, dq.numel(), BLOCK=post_block,
                                                                 num_warps=4)
        return dq, dk, dv
    attn_bwd_dkdv[key_grid](*key_descs, *row_descs, *scalars, **key_fragments, num_warps=c.num_warps("dkdv"))
    attn_bwd_dq[(triton.cdiv(Nq, c.q_block_m), B * Hq)](
        desc(q, c.q_block_m), desc(k, c.q_block_n), desc(v, c.q_block_n), desc(do, c.q_block_m),
        desc(dq, c.q_block_m), lse2, delta, row_stride,
        *scalars, WALK=walk, MASK=mask, SCORE=score, SCORE_GRAD=score_grad, SEGMENTS=segments, STAGES=c.q_stages,
        num_warps=c.num_warps("dq"))
    return dq, dk, dv


def key_box_rows(config: GluonBwdConfig, method: str) -> int:
    """Rows of the K, V, dK, dV TMA boxes of a key-block program: its kv_block_n keys, or for the ws
    kernel one consumer warpgroup's half of them (each loads and stores its own)."""
    return config.kv_block_n // 2 if method == "ws" else config.kv_block_n


def check_fragment_args(segments, pattern_args, q):
    """A walk's segment count and the pattern's arguments as the kernels take them: the spec's params
    (ints, floats), then a block-list walk's lists and the [inputs] (tensors on q's device, ints)."""
    import torch
    if not (isinstance(segments, int) and segments >= 1):
        raise ValueError(f"attncc.runtime.gluon: segments must be an int >= 1, got {segments!r}")
    if not (isinstance(pattern_args, tuple) and all(type(a) in (int, float) or isinstance(a, torch.Tensor)
                                                    for a in pattern_args)):
        raise TypeError(f"attncc.runtime.gluon: pattern_args must be a tuple of ints, floats and tensors, "
                        f"got {pattern_args!r}")
    for a in pattern_args:
        if isinstance(a, torch.Tensor) and a.device != q.device:
            raise ValueError(f"attncc.runtime.gluon: a tensor of pattern_args is on {a.device}, q is on {q.device}")


def check_backward_operands(q, o, lse, do, dlse, lse_raw=None):
    """o and do of q's shape and dtype, lse (and lse_raw) float32 [B, Hq, Nq], dlse [B, Hq, Nq], all on
    q's device (dlse and lse_raw may be None)."""
    import torch
    rows = tuple(q.shape[:3])
    for name, t, shape, dtype in (("o", o, tuple(q.shape), q.dtype), ("do", do, tuple(q.shape), q.dtype),
                                  ("lse", lse, rows, torch.float32), ("dlse", dlse, rows, None),
                                  ("lse_raw", lse_raw, rows, torch.float32)):
        if t is None and name in ("dlse", "lse_raw"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attncc.runtime.gluon: {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype) or t.device != q.device:
            want = f"{dtype} " if dtype is not None else ""
            raise ValueError(f"attncc.runtime.gluon: {name} must be {want}of shape {shape} on {q.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _output(given, name, shape, dtype, device):
    import torch
    if given is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(given.shape) != tuple(shape) or given.dtype != dtype or given.device != device:
        raise ValueError(f"attncc.runtime.gluon: {name} must be {dtype} of shape {tuple(shape)} on {device}, got "
                         f"{given.dtype} {tuple(given.shape)} on {given.device}")
    if not given.is_contiguous() or given.data_ptr() % 16:
        raise ValueError(f"attncc.runtime.gluon: {name} must be contiguous and 16-byte aligned")
    return given


def snake_schedule(pattern: str, walk) -> bool:
    """Whether the persistent forward hands out its tiles longest-first over every head in a snake
    (fwd_ws.scheduled_tile): for the built-in causal walk, whose tiles' lengths run from 1 to n_qb
    key blocks (H100, causal 8K B2 H16: 1.111 -> 1.041 ms, GQA 32/8 8K 1.966 -> 1.901, causal 4K B4
    the same; docs/performance.md, session 17). Walks of equal lengths keep the head groups that
    share K/V in L2 (dense 4K in one group of every head: 0.971 -> 1.079 ms). The rendered walks keep
    them too (not measured). ``ATTNCC_GLUON_SCHEDULE=snake|grouped`` forces one (benchmarks)."""
    forced = os.environ.get("ATTNCC_GLUON_SCHEDULE", "")
    if forced in ("snake", "grouped"):
        return forced == "snake"
    if forced:
        raise ValueError(f"attncc: ATTNCC_GLUON_SCHEDULE must be 'snake' or 'grouped', got {forced!r}")
    return pattern == "causal" and walk == pattern_fragments("causal")[0]


# A grid's y extent (CUDA: at most 65535 blocks)
GRID_Y_MAX = 65535


def bwd_heads_first(key_blocks: int) -> bool:
    """Whether the ws backward's grid is [B x kv heads, key blocks] (bwd_ws.program_walk's
    HEADS_FIRST): the SMs then take key block 0 of every head first, and, under a causal walk (key
    block 0 the longest, its walk every query block), the longest programs first, instead of the
    last head's longest program last (the forward's snake schedule gained 6% on causal 8K from
    this). Not measured yet for the backward: ``ATTNCC_GLUON_BWD_SCHEDULE=heads-first`` turns it on
    (benchmarks), ``grid`` or unset keeps [key blocks, B x kv heads]. More key blocks than a grid's
    y extent keep the grid order."""
    forced = os.environ.get("ATTNCC_GLUON_BWD_SCHEDULE", "")
    if forced not in ("", "heads-first", "grid"):
        raise ValueError(f"attncc: ATTNCC_GLUON_BWD_SCHEDULE must be 'heads-first' or 'grid', got {forced!r}")
    return forced == "heads-first" and key_blocks <= GRID_Y_MAX


def head_group(bh: int, n_qb: int, Nk: int, D: int, elem_bytes: int, group: int, sms: int) -> int:
    """Heads per group of the persistent schedule: as many as keep their K and V within half the
    L2 (a GQA group of q heads shares one K/V), but enough tiles to give every SM one."""
    kv_per_q_head = 2 * Nk * D * elem_bytes / group
    by_l2 = int((L2_BYTES // 2) // max(kv_per_q_head, 1))
    by_sms = -(-sms // max(n_qb, 1))
    return max(1, min(bh, max(by_l2, by_sms)))


def check_operands(q, k, v):
    import torch
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attncc.runtime.gluon: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attncc.runtime.gluon: {name} must be 4-d [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"attncc.runtime.gluon: {name} must be bfloat16 or float16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"attncc.runtime.gluon: {name} has dtype {t.dtype}, q has {q.dtype}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"attncc.runtime.gluon: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"attncc.runtime.gluon: k must be [B={B}, Hkv, Nk, D={D}], got {tuple(k.shape)}")
    if min(B, Hq, Hkv, Nq, Nk) < 1:  # (a TMA descriptor takes no 0-sized dim; callers return no pairs first)
        raise ValueError(f"attncc.runtime.gluon: B, Hq, Hkv, Nq and Nk must be >= 1, got {B}, {Hq}, {Hkv}, {Nq}, {Nk}")
    if Hq % Hkv:
        raise ValueError(f"attncc.runtime.gluon: q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    _check_choice("head dim", D, HEAD_DIMS)
    return B, Hq, Nq, D, Hkv, Nk


def check_devices(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_cuda or t.device != q.device:
            raise ValueError(f"attncc.runtime.gluon: {name} must be on q's CUDA device (sm90), got {t.device}")


def _tma_ready(t):
    """TMA wants a 16-byte aligned base, 16-byte multiples as strides and a unit last stride; a
    broadcast dim (stride 0: k, v of batch 1 beside q's batch, an expanded head) is copied too, as
    no GPU run has checked a stride-0 descriptor. (A copy in the contiguous format:
    ``contiguous()`` keeps any stride of a length-1 dim.)"""
    import torch
    size = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s * size % 16 == 0 and (s != 0 or n == 1) for s, n in zip(t.stride()[:-1], t.shape[:-1]))
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _gl_dtype(dtype):
    import torch
    from triton.experimental.gluon import language as gl
    return {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32, "bfloat16": gl.bfloat16,
            "float16": gl.float16, "float32": gl.float32}[dtype]


def _smem_layout(block, gl_dtype):
    return _smem_layout_of(tuple(block), gl_dtype)


@functools.lru_cache(maxsize=256)
def _smem_layout_of(block: tuple, gl_dtype):
    """(A layout is a frozen value; ``get_default_for`` costs ~7 us, four or five per call.)"""
    from triton.experimental.gluon import language as gl
    return gl.NVMMASharedLayout.get_default_for(list(block), gl_dtype)


# --------------------------------------------------------------------------------------------
# Compilation for sm90 without a GPU


@dataclass(frozen=True)
class Variant:
    """One kernel specialization: what CI compiles and the GPU check runs."""
    pattern: str
    dtype: str
    head_dim: int
    config: GluonConfig
    return_lse: bool = True

    @property
    def name(self) -> str:
        c = self.config
        extra = ("-pingpong" if c.pingpong else "-nopingpong") if c.kernel == "ws" else ""
        return (f"{c.kernel}{extra}-{self.pattern}-{self.dtype}-d{self.head_dim}-m{c.block_m}n{c.block_n}"
                f"s{c.stages}")


@dataclass(frozen=True)
class BwdVariant:
    """One backward kernel specialization: `part` "dkdv" (attn_bwd_dkdv), "dq" (attn_bwd_dq), "fused"
    (attn_bwd_fused, which takes the dK/dV tiles) or "ws" (attn_bwd_ws, the same tiles)."""
    part: str
    pattern: str
    dtype: str
    head_dim: int
    config: GluonBwdConfig

    @property
    def name(self) -> str:
        c = self.config
        tiles = (f"n{c.kv_block_n}m{c.kv_block_m}s{c.kv_stages}" if self.part != "dq" else
                 f"m{c.q_block_m}n{c.q_block_n}s{c.q_stages}")
        if self.part == "fused":
            tiles += f"p{c.dq_pieces}"
        return f"bwd-{self.part}-{self.pattern}-{self.dtype}-d{self.head_dim}-{tiles}"


@dataclass(frozen=True)
class CompiledVariant:
    """What compiling one variant for sm90 produced (no GPU involved).

    shared: dynamic shared memory the launch asks for (bytes); registers: the per-thread count
    ptxas reports for the launch (for "ws" the cap before setmaxnreg moves registers between the
    partitions); stack: bytes of local stack per thread (spills, when there is no call);
    setmaxnreg: the register counts the partitions move to; wgmma / tma: counts of
    `wgmma.mma_async` and `cp.async.bulk.tensor` in the PTX; hgmma: HGMMA instructions in the SASS
    (`sass`, cuobjdump's disassembly; empty when not asked for).
    """
    variant: Union[Variant, BwdVariant]
    shared: int
    registers: int
    stack: int
    setmaxnreg: Tuple[int, ...]
    wgmma: int
    tma: int
    hgmma: int
    ptx: str = dataclasses.field(repr=False)
    sass: str = dataclasses.field(repr=False)
    cubin: bytes = dataclasses.field(repr=False)


def compile_for_sm90(variant: Union[Variant, BwdVariant], disassemble: bool = True) -> CompiledVariant:
    """Compile one variant to a cubin for sm90a with Triton's own toolchain; no GPU is needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if isinstance(variant, BwdVariant):
        kernel, signature, constexprs, options = _bwd_source(variant)
        return _compiled(variant, triton.compile(GluonASTSource(kernel, signature, constexprs),
                                                 target=GPUTarget("cuda", 90, 32), options=options), disassemble)
    c = variant.config
    check_config(c, variant.head_dim)
    walk, mask = pattern_fragments(variant.pattern)

    def desc(rows):
        return _desc_type([1, 1, rows, variant.head_dim], variant.dtype)

    signature = {"q_desc": desc(c.rows_per_q_block), "k_desc": desc(c.block_n), "v_desc": desc(c.block_n),
                 "o_desc": desc(c.rows_per_q_block), "lse_ptr": "*fp32", "lse_raw_ptr": "*fp32", "lse_stride": "i64"}
    constexprs = {"WALK": walk, "MASK": mask, "SCORE": None, "SEGMENTS": 1, "RETURN_LSE": variant.return_lse,
                  "STAGES": c.stages, "BLOCK": None, "STORE_RAW": variant.return_lse}
    options = {"num_warps": c.num_warps}
    if c.kernel == "pipelined":
        from attncc.runtime.gluon.fwd_pipelined import attn_fwd_pipelined as kernel
        ints = "H GROUP Nq Nk q_offset k_offset n_q n_k"
        constexprs["num_warps"] = c.num_warps
    else:
        from attncc.runtime.gluon.fwd_ws import attn_fwd_ws as kernel
        ints = "B H GROUP Nq Nk q_offset k_offset n_q n_k"
        constexprs.update(PINGPONG=c.pingpong, O_IN_Q=c.o_in_q, CONSUMER_REGS=c.consumer_regs,
                          LOADER_REGS=c.loader_regs, SNAKE=snake_schedule(variant.pattern, walk))
        options["maxnreg"] = c.maxnreg
    signature.update({name: "i32" for name in ints.split()})
    signature["qk_scale"] = "fp32"
    if c.kernel == "ws":
        signature["HEAD_GROUP"] = "i32"
    signature["pattern_args"] = ()  # the built-in walks have no params (an empty tuple)
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    return _compiled(variant, compiled, disassemble)


def _desc_type(block, dtype: str) -> str:
    """The signature type of a TMA descriptor argument with `block` over `dtype` elements."""
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    return f"tensordesc<{short}{list(block)},{_smem_layout(list(block), _gl_dtype(dtype))!r}>"


def _bwd_source(variant: BwdVariant):
    """(kernel, signature, constexprs, options) of a backward variant, as `attention_backward` launches it."""
    c, d, dt = variant.config, variant.head_dim, variant.dtype
    check_bwd_config(c, d, _method(variant.part))
    walk, qwalk, mask = backward_fragments(variant.pattern)
    options = {"num_warps": c.num_warps(variant.part)}
    if variant.part in KEY_BLOCK_PARTS:  # the key-block programs: the same tiles and fragments
        rows, keys = [1, 1, c.kv_block_m, d], [1, 1, key_box_rows(c, _method(variant.part)), d]
        signature = {"q_desc": _desc_type(rows, dt), "k_desc": _desc_type(keys, dt), "v_desc": _desc_type(keys, dt),
                     "do_desc": _desc_type(rows, dt), "dk_desc": _desc_type(keys, dt), "dv_desc": _desc_type(keys, dt)}
        constexprs = {"QWALK": qwalk, "MASK": mask, "SCORE": None, "SCORE_GRAD": None, "QSEGMENTS": 1}
        if variant.part == "fused":
            from attncc.runtime.gluon.bwd_fused import attn_bwd_fused as kernel
            signature["dq_acc_desc"] = _desc_type(rows, "float32")
            constexprs["DQ_PIECES"] = c.dq_pieces
        elif variant.part == "ws":
            from attncc.runtime.gluon import bwd_ws
            kernel = bwd_ws.attn_bwd_ws
            signature["dq_acc_desc"] = _desc_type(rows, "float32")
            constexprs.update(CONSUMER_REGS=bwd_ws.CONSUMER_REGS, WORKER_REGS=bwd_ws.WORKER_REGS)
            options["maxnreg"] = bwd_ws.MAXNREG
        else:
            from attncc.runtime.gluon.bwd import attn_bwd_dkdv as kernel
        signature.update(lse_desc=_desc_type([1, 1, c.kv_block_m], "float32"),
                         delta_desc=_desc_type([1, 1, c.kv_block_m], "float32"))
    else:
        _check_choice("part", variant.part, BWD_PARTS)
        from attncc.runtime.gluon.bwd import attn_bwd_dq as kernel
        rows, keys = [1, 1, c.q_block_m, d], [1, 1, c.q_block_n, d]
        signature = {"q_desc": _desc_type(rows, dt), "k_desc": _desc_type(keys, dt), "v_desc": _desc_type(keys, dt),
                     "do_desc": _desc_type(rows, dt), "dq_desc": _desc_type(rows, dt), "lse2_ptr": "*fp32",
                     "delta_ptr": "*fp32", "lse_stride": "i64"}
        constexprs = {"WALK": walk, "MASK": mask, "SCORE": None, "SCORE_GRAD": None, "SEGMENTS": 1}
    signature.update({name: "i32" for name in "H GROUP Nq Nk q_offset k_offset n_q n_k".split()})
    signature.update(qk_scale="fp32", sm_scale="fp32", pattern_args=())  # the built-in walks have no params
    constexprs.update(STAGES=c.stages(variant.part))
    if variant.part != "ws":  # (the ws kernel's partitions take their warps from warp_specialize)
        constexprs["num_warps"] = c.num_warps(variant.part)
    signature.update({name: "constexpr" for name in constexprs})
    return kernel, signature, constexprs, options


def _compiled(variant, compiled, disassemble: bool) -> CompiledVariant:
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    registers, stack = _resource_usage(cubin)
    sass = _cuobjdump(cubin, "-sass") if disassemble else ""
    return CompiledVariant(
        variant=variant, shared=compiled.metadata.shared, registers=registers, stack=stack,
        setmaxnreg=tuple(int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)) if disassemble else -1, ptx=ptx, sass=sass, cubin=cubin)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, f.name], check=True, capture_output=True,
                              text=True).stdout


def _resource_usage(cubin: bytes) -> Tuple[int, int]:
    text = _cuobjdump(cubin, "-res-usage")
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not match:
        raise RuntimeError(f"attncc.runtime.gluon: no resource usage in cuobjdump's output:\n{text}")
    return int(match.group(1)), int(match.group(2))


def ci_variants():
    """The variants CI compiles: each kernel at each head dim once, patterns and dtypes alternating,
    and the ws kernel without ping-pong, so every constexpr branch of both kernels is compiled."""
    picks = [("ws", 64, "dense", "bfloat16"), ("ws", 128, "causal", "bfloat16"), ("ws", 256, "causal", "float16"),
             ("pipelined", 64, "causal", "float16"), ("pipelined", 128, "dense", "float16"),
             ("pipelined", 256, "dense", "bfloat16")]
    out = [Variant(pattern, dtype, d, default_config(d, kernel)) for kernel, d, pattern, dtype in picks]
    out.append(Variant("dense", "float16", 128, dataclasses.replace(default_config(128, "ws"), pingpong=False)))
    return out


def variants(kernels=KERNELS, patterns=tuple(walks.PATTERNS), dtypes=DTYPES, head_dims=HEAD_DIMS, stages=None):
    """Every variant CI compiles: kernels x patterns x dtypes x head dims at the default config,
    plus the other ring depths that fit (`stages`, when given, restricts them) and the ws kernel
    without ping-pong (the A/B of that step)."""
    out = []
    for kernel in kernels:
        for head_dim in head_dims:
            base = default_config(head_dim, kernel)
            configs = [base]
            for depth in (2, 3, 4):
                cfg = dataclasses.replace(base, stages=depth)
                if depth != base.stages and shared_bytes(cfg, head_dim) <= SM90_SHARED_BYTES - 1024:
                    configs.append(cfg)
            if kernel == "ws":
                configs.append(dataclasses.replace(base, pingpong=False))
            if stages is not None:
                configs = [cfg for cfg in configs if cfg.stages in stages]
            for cfg in configs:
                for pattern in patterns:
                    for dtype in dtypes:
                        out.append(Variant(pattern, dtype, head_dim, cfg))
    return out


def _method(part: str) -> str:
    """The backward method (BWD_METHODS) whose kernels include `part`."""
    return part if part in ("fused", "ws") else "split"


# the ws backward's one CI variant (~15 s to compile on 2 cores: four partitions); the others: --all
WS_CI_VARIANT = ("causal", "bfloat16", 128)


def bwd_ci_variants():
    """The backward variants CI compiles: every split and fused kernel (dK/dV, dQ, fused), pattern, dtype
    and head dim at the default tiles (24, ~1.5-3 s each), the fused kernel's dQ in one piece at D = 128
    (its other branch), and the ws kernel at D = 128, causal, bf16 (WS_CI_VARIANT); `bwd_variants` adds
    the other ring depths and the ws kernel's other variants."""
    one_piece = dataclasses.replace(default_bwd_config(128, "fused"), dq_pieces=1)
    return [v for v in bwd_variants() if v.config == default_bwd_config(v.head_dim, _method(v.part)) and
            (v.part != "ws" or (v.pattern, v.dtype, v.head_dim) == WS_CI_VARIANT)] + [
        BwdVariant("fused", "causal", "bfloat16", 128, one_piece)]


def bwd_variants(patterns=tuple(walks.PATTERNS), dtypes=DTYPES, head_dims=BWD_HEAD_DIMS):
    """Every backward variant: kernels x patterns x dtypes x head dims at the default tiles, plus each
    kernel's other ring depths (2-4) that fit and the fused kernel's other dQ split (`dq_pieces`)."""
    out = []
    for head_dim in head_dims:
        for part in BWD_PARTS:
            base = default_bwd_config(head_dim, _method(part))
            configs = [base]
            for depth in (2, 3, 4):
                field = "q_stages" if part == "dq" else "kv_stages"
                cfg = dataclasses.replace(base, **{field: depth})
                if depth != base.stages(part) and bwd_shared_bytes(cfg, head_dim)[part] <= SM90_SHARED_BYTES - 1024:
                    configs.append(cfg)
            if part == "fused":  # the dQ partial in the other number of pieces (1 <-> 2)
                configs.append(dataclasses.replace(base, dq_pieces=3 - base.dq_pieces))
            for cfg in configs:
                for pattern in patterns:
                    for dtype in dtypes:
                        out.append(BwdVariant(part, pattern, dtype, head_dim, cfg))
    return out


def main(argv=None) -> int:
    """python -m attncc.runtime.gluon.launch [--all] [--pickle PATH]: compile the CI variants, forward and
    backward (or all of them) for sm90 and print what each produced; --pickle saves the CompiledVariants (the tests run
    this in a process without TRITON_INTERPRET, which would turn Triton's own jit helpers that
    Gluon calls into interpreter objects)."""
    import argparse
    import pickle
    import time

    parser = argparse.ArgumentParser(prog="python -m attncc.runtime.gluon.launch")
    parser.add_argument("--all", action="store_true", help="every variant of variants(), not only the CI set")
    parser.add_argument("--pickle", help="write the list of CompiledVariant here")
    args = parser.parse_args(argv)
    results = []
    for variant in (variants() + bwd_variants() if args.all else ci_variants() + bwd_ci_variants()):
        start = time.perf_counter()
        c = compile_for_sm90(variant)
        results.append(c)
        print(f"{variant.name:52s} {time.perf_counter() - start:5.1f}s shared {c.shared:6d}  registers {c.registers:3d}"
              f"  stack {c.stack:2d}  wgmma {c.wgmma:3d}  HGMMA {c.hgmma:3d}  TMA {c.tma:2d}"
              f"  setmaxnreg {sorted(set(c.setmaxnreg))}", flush=True)
    if args.pickle:
        with open(args.pickle, "wb") as f:
            pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    # Through the imported module, so that pickled results name attncc.runtime.gluon.launch, not __main__.
    from attncc.runtime.gluon.launch import main as _main
    raise SystemExit(_main())
