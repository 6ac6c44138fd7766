"""Host side of a generated ``decode``: argument checks, tile config, split count, LSE merge.

A generated module's ``decode(q, k_cache, v_cache, kv_len=..., block_table=...)`` binds its
arguments here (:func:`bind_decode`, every error names what was expected and what came),
launches its own split-KV kernel (rendered from templates/decode.py.j2: one program per
batch row, kv head and split of the key blocks) and, when there is more than one split,
merges the partial outputs by their log-sum-exp with :func:`merge` (one small kernel).

Nothing here reads the cache lengths or the page table on the host when they live on the
GPU (that would cost a device synchronization per decoding step): their values are checked
when they are CPU tensors (always so under the interpreter), or on the GPU when the
environment sets ``ATTNCC_CHECK_DECODE=1``. The kernel clamps ``kv_len`` to the cache's
capacity and page numbers to the pages that exist, so a bad value never reads outside the
cache.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from attncc.core.semantics import plain_number
from attncc.runtime.call import (autocast_operands, bind_params_and_inputs, check_divisors, check_grid_extent,
                                 check_heads_and_dims, dense_tensor, dtype_name, env_flag, int_reach, interpreting,
                                 refuse_device, refuse_gradients, refuse_transforms, resolved, scale_keyword,
                                 softmax_scale, wide_positions)
from attncc.runtime.configs import KernelConfig, max_shared_memory, padded_dim, parse_fields, shared_bytes
from attncc.runtime.spec_info import SpecInfo

MAX_QUERIES = 16  # decode serves 1 (next token) to 16 (speculative) query rows per batch row
MIN_PAGE_SIZE = 16


@dataclass
class DecodeCall:
    """A validated ``decode`` call. ``k``/``v`` are the caches as given: contiguous
    ``[B, Hkv, Nmax, D]`` (``page_size == 0``) or paged ``[num_pages, page_size, Hkv, D]``."""

    spec: SpecInfo
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_len: torch.Tensor  # int32 or int64 [B] on q's device (read at its stride)
    block_table: Optional[torch.Tensor]  # int32 or int64 [B, pages] on q's device (read at its strides), or None
    B: int
    Hq: int
    Hkv: int
    Nq: int
    D: int
    Dv: int
    capacity: int  # cache positions a row can hold: Nmax, or pages * page_size
    page_size: int  # 0: contiguous cache
    num_pages: int
    scale: float
    return_lse: bool
    params: Dict[str, object] = field(default_factory=dict)
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    int_reach: Optional[int] = None  # as Call.int_reach

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    @property
    def paged(self) -> bool:
        return self.page_size > 0


MAX_EXACT_DIVISOR_ROWS = 64  # up to this many batch rows, divisors of n_q, n_k are checked at each row's kv_len


def _check_values(t: torch.Tensor) -> bool:
    """Read a tensor's values on the host? Free for CPU tensors; a sync on the GPU (opt-in)."""
    return env_flag("ATTNCC_CHECK_DECODE", False) or t.device.type == "cpu"  # (the value checked everywhere)


def bind_decode(spec: SpecInfo, q, k_cache, v_cache, *, kv_len, block_table=None, return_lse=False,
                scale=None, kwargs: Optional[dict] = None) -> DecodeCall:
    """Check the arguments of ``decode(q, k_cache, v_cache, ...)`` against the spec."""
    name = f"{spec.name}.decode"
    refuse_transforms(name, q, k_cache, v_cache, kwargs=kwargs)
    q, k_cache, v_cache = resolved(*autocast_operands(q, k_cache, v_cache))  # under torch.autocast, as attention
    for arg, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        dense_tensor(name, arg, t)
        if t.dim() != 4:
            layout = ("[B, Hq, Nq, D]" if arg == "q" else
                      "[B, Hkv, Nmax, D] (contiguous) or [num_pages, page_size, Hkv, D] (paged)")
            raise ValueError(f"{name}: {arg} must have 4 dims {layout}, got shape {tuple(t.shape)}")
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"{name}: q, k_cache, v_cache must be on one device, got {q.device}, "
                         f"{k_cache.device}, {v_cache.device}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"{name}: q, k_cache, v_cache must have one dtype, got {dtype_name(q.dtype)}, "
                        f"{dtype_name(k_cache.dtype)}, {dtype_name(v_cache.dtype)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name}: q and the caches must be bfloat16, float16 or float32, got {dtype_name(q.dtype)}")
    refuse_device(name, q.device)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{name}: return_lse must be a bool, got {return_lse!r}")
    B, Hq, Nq, D = q.shape
    if not 1 <= Nq <= MAX_QUERIES:
        raise ValueError(f"{name}: q must hold 1 to {MAX_QUERIES} query rows per batch row (dim 2), got {Nq}; "
                         f"use attention() with q_offset for longer chunks")

    if block_table is None:  # contiguous [B, Hkv, Nmax, D]
        Bk, Hkv, Nmax, Dk = k_cache.shape
        Bv, Hv, Nv, Dv = v_cache.shape
        if not (B == Bk == Bv):
            raise ValueError(f"{name}: batch sizes differ: q {B}, k_cache {Bk}, v_cache {Bv} "
                             f"(a paged cache needs block_table=)")
        if Hkv != Hv or Nmax != Nv:
            raise ValueError(f"{name}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree "
                             f"on heads and length")
        capacity, page_size, num_pages = Nmax, 0, 0
    else:
        if not isinstance(block_table, torch.Tensor):
            raise TypeError(f"{name}: block_table must be a torch.Tensor, got {type(block_table).__name__}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"{name}: block_table must have shape [B, pages] = [{B}, pages], got "
                             f"{tuple(block_table.shape)}")
        if block_table.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: block_table must be int32 or int64, got {dtype_name(block_table.dtype)}")
        if block_table.device != q.device:
            raise ValueError(f"{name}: block_table is on {block_table.device}, q is on {q.device}")
        num_pages, page_size, Hkv, Dk = k_cache.shape
        Pv, Sv, Hv, Dv = v_cache.shape
        if (num_pages, page_size, Hkv) != (Pv, Sv, Hv):
            raise ValueError(f"{name}: paged k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                             f"agree on [num_pages, page_size, Hkv]")
        if page_size < MIN_PAGE_SIZE:
            raise ValueError(f"{name}: page size (k_cache dim 1) must be >= {MIN_PAGE_SIZE}, got {page_size}: with "
                             f"block_table= the caches are paged [num_pages, page_size, Hkv, D] (a contiguous cache "
                             f"[B, Hkv, Nmax, D] takes no block_table)")
        if num_pages == 0:
            raise ValueError(f"{name}: the paged cache has no pages")
        capacity = block_table.shape[1] * page_size
    check_heads_and_dims(spec, name, Hq=Hq, Hkv=Hkv, D=D, Dk=Dk, Dv=Dv, k="k_cache", v="v_cache",
                         kv="the cache has")
    check_grid_extent(name, B, Hq)

    kv_len = _bind_kv_len(name, kv_len, B, capacity, q.device)
    if block_table is not None and _check_values(block_table) and _check_values(kv_len):
        lengths = kv_len.cpu().tolist()
        table = block_table.cpu()
        for b, n in enumerate(lengths):
            used = table[b, :-(-n // page_size)]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_pages):
                raise ValueError(f"{name}: block_table[{b}] holds page numbers outside 0..{num_pages - 1} among the "
                                 f"{used.numel()} pages that kv_len[{b}] = {n} uses: {used.tolist()}")

    scale, kwargs = scale_keyword(spec, scale, kwargs)
    scale = softmax_scale(name, spec, scale, D)

    for d in spec.inputs:
        if d.name == "kv_len" and d.name not in kwargs and tuple(d.dims) == ("b",):
            # the pattern's own kv_len input (key padding) is the cache length here
            kwargs[d.name] = kv_len
    params, inputs = bind_params_and_inputs(spec, name, kwargs, B=B, Hq=Hq, positions=capacity, device=q.device,
                                            what_positions="the cache's positions")
    refuse_gradients(name, (q, k_cache, v_cache, *inputs.values()), "q, the caches and the inputs (attention() has one)")
    # positions are cache rows, n_q = n_k = kv_len[b] (from 1 on every row that computes a pair):
    # at every length up to the capacity, and where that finds a divisor that may be 0 and the
    # lengths are read on the host, at each row's own length (a divisor n_k - 3 is 0 only on a row
    # of kv_len 3: a cache of capacity 64 with lengths 10, 20, 30 was refused)
    try:
        check_divisors(spec, name, positions=capacity, batch=B, heads=Hq, n_q=(1, max(capacity, 1)),
                       n_k=(1, max(capacity, 1)), params=params)
    except ValueError:
        if not (_check_values(kv_len) and B <= MAX_EXACT_DIVISOR_ROWS):
            raise
        failed = []
        lengths = sorted(set(kv_len.tolist()) - {0})
        for n in lengths:
            try:
                check_divisors(spec, f"{name} (kv_len = {n})", positions=capacity, batch=B, heads=Hq, n_q=n, n_k=n,
                               params=params)
            except ValueError as e:
                failed.append(e)
        if failed and len(failed) == len(lengths):
            raise  # 0 at every row's length (a param of 0, say): the error without a row's length
        if failed:
            raise failed[0] from None
    reach = int_reach(spec, positions=capacity, batch=B, heads=Hq, params=params)
    return DecodeCall(spec, q, k_cache, v_cache, kv_len, block_table, B, Hq, Hkv, Nq, D, Dv, capacity, page_size,
                      num_pages, float(scale), return_lse, params, inputs, int_reach=reach)


def _bind_kv_len(name: str, kv_len, B: int, capacity: int, device) -> torch.Tensor:
    if isinstance(kv_len, (list, tuple)):
        values = [plain_number(x) for x in kv_len]  # numpy's ints too
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise TypeError(f"{name}: kv_len as a list must hold ints (valid cache length per row), got {kv_len!r}")
        kv_len = torch.tensor(values, dtype=torch.int32 if all(abs(x) < 2**31 for x in values) else torch.int64)
    if not isinstance(kv_len, torch.Tensor):
        raise TypeError(f"{name}: kv_len must be a tensor [B] of int32 or int64, or a list of ints (valid cache "
                        f"length per row), got {type(kv_len).__name__}")
    if kv_len.dim() != 1 or kv_len.shape[0] != B:
        raise ValueError(f"{name}: kv_len must have shape [B] = [{B}], got {tuple(kv_len.shape)}")
    if kv_len.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: kv_len must be int32 or int64, got {dtype_name(kv_len.dtype)}")
    if kv_len.device.type != "cpu" and kv_len.device != device:
        raise ValueError(f"{name}: kv_len is on {kv_len.device}, q is on {device}")
    if _check_values(kv_len) and B:
        lo, hi = (int(x) for x in torch.stack([kv_len.min(), kv_len.max()]).tolist())
        if lo < 0 or hi > capacity:
            raise ValueError(f"{name}: kv_len must be in 0..{capacity} (the cache's capacity), got values "
                             f"{lo}..{hi}")
    # its own width (an int64 length past 2**31 is clamped to the capacity, never wrapped); CPU
    # lengths of a GPU call are copied over
    return kv_len.to(device=device)


def wide(call: DecodeCall) -> bool:
    """The decode kernel's WIDE switch (see attncc.runtime.call.wide_positions): positions run
    up to the cache's capacity."""
    return wide_positions(call.capacity, call.params, call.inputs.values(), arithmetic=call.int_reach)


# --------------------------------------------------------------------------------------
# Tile config and split count
# --------------------------------------------------------------------------------------

MAX_BLOCK_M = 64  # query rows (heads of a group x Nq) per program; more heads take more programs
MAX_SPLITS = 128


def decode_config(call: DecodeCall) -> KernelConfig:
    """BLOCK_M: the rows of one program, GROUP x Nq padded to a power of two >= 16 (capped at
    MAX_BLOCK_M: bigger groups are cut into several programs); BLOCK_N: keys per tile.

    Memory-bound, so the K/V tiles are pipelined deep: 3 tiles in flight (2 x 16 KB each in
    bf16 at D = 128), fewer where they would not fit the GPU's shared memory. Triton's pipeliner
    gives a load that depends on another load of the same iteration (the paged cache's page
    number) half the stages, so paged calls ask for 2 x 3 + 1.
    ``ATTNCC_DECODE_CONFIG="BLOCK_N=64,num_warps=4,num_stages=4"`` forces them."""
    rows = min(call.group, max(1, MAX_BLOCK_M // call.Nq)) * call.Nq
    block_m = max(16, triton.next_power_of_2(rows))
    if interpreting():
        cfg = KernelConfig(block_m, 16, 4, 1)
    else:
        block_n = 64 if max(call.D, call.Dv) <= 128 else 32
        in_flight = 3 if max(call.D, call.Dv) <= 128 else 2
        limit = max_shared_memory(str(call.q.device))
        while in_flight > 1 and shared_memory(call, KernelConfig(block_m, block_n, 4, _stages(call, in_flight))) > limit:
            in_flight -= 1
        cfg = KernelConfig(block_m, block_n, 4, _stages(call, in_flight))
    text = os.environ.get("ATTNCC_DECODE_CONFIG")
    if text:
        fields = parse_fields("ATTNCC_DECODE_CONFIG", text, ("BLOCK_N", "num_warps", "num_stages"))  # BLOCK_M: Nq x heads
        cfg = KernelConfig(block_m, fields.get("BLOCK_N", cfg.BLOCK_N), fields.get("num_warps", cfg.num_warps),
                           fields.get("num_stages", cfg.num_stages))
    return cfg


def _stages(call: DecodeCall, in_flight: int) -> int:
    """The num_stages that keeps ``in_flight`` K/V tiles loading (see decode_config)."""
    return 2 * in_flight + 1 if call.paged else in_flight + 1


def tiles_in_flight(num_stages: int, paged: bool) -> int:
    """The K/V tiles a program has loading at ``num_stages`` (see decode_config)."""
    return max(1, (num_stages - 1) // (2 if paged else 1))


def shared_memory(call: DecodeCall, cfg: KernelConfig) -> int:
    """What one program takes (attncc.runtime.configs.shared_bytes): the K/V tiles in flight (see
    decode_config), the query tile, the inputs gathered per pair or key (and a paged cache's page
    number per key), and scratch."""
    table = call.block_table.element_size() if call.paged else 0
    return shared_bytes("decode", cfg.BLOCK_M, cfg.BLOCK_N, padded_dim(max(call.D, call.Dv)), call.q.element_size(),
                        tiles_in_flight(cfg.num_stages, call.paged) + 1, call.spec.pair_bytes,
                        call.spec.position_bytes + table)


def heads_per_program(call: DecodeCall, cfg: KernelConfig) -> int:
    return min(call.group, max(1, cfg.BLOCK_M // call.Nq))


@functools.lru_cache(maxsize=None)
def _device_slots(device: str, smem_per_program: int) -> int:
    """Programs the device runs at once: SMs x the programs one SM holds (by shared memory,
    at most 4). The interpreter pretends to have 4 slots, so that tests exercise the merge."""
    if not device.startswith("cuda"):
        return 4
    props = torch.cuda.get_device_properties(torch.device(device))
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    return props.multi_processor_count * max(1, min(4, smem // (smem_per_program + 1024)))


def num_splits(call: DecodeCall, cfg: KernelConfig, programs: int) -> int:
    """Splits of each row's key blocks: the fewest that fill the device's program slots to
    >= 95% in whole waves (a partial last wave idles SMs: 64 programs x 5 splits on 132 SMs
    run in 3 waves at 81%, x 2 splits in one at 97%), with at least 4 key blocks per split
    (1 under the interpreter). ``ATTNCC_DECODE_SPLITS=n`` forces n."""
    forced = os.environ.get("ATTNCC_DECODE_SPLITS")
    if forced:
        try:
            n = int(forced)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"ATTNCC_DECODE_SPLITS must be an int >= 1 (at most {MAX_SPLITS} are used), got {forced!r}")
        return min(MAX_SPLITS, n)
    blocks = triton.cdiv(max(call.capacity, 1), cfg.BLOCK_N)
    most = max(1, min(MAX_SPLITS, blocks // (1 if interpreting() else 4)))
    return _fill(max(programs, 1), most, _device_slots(str(call.q.device), shared_memory(call, cfg)))


@functools.lru_cache(maxsize=1024)
def _fill(programs: int, most: int, slots: int) -> int:
    best, best_fill = 1, 0.0
    for s in range(1, most + 1):
        n = programs * s
        fill = n / (-(-n // slots) * slots)
        if fill >= 0.95:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def kernel_operands(call: DecodeCall):
    """q and the caches as the kernel reads them: unit stride along the head dim (copied
    otherwise). Triton 3.6's CPU interpreter computes bfloat16 dot products wrongly, so there
    (tests only) bfloat16 operands go in as float32."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    if interpreting() and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    return q, k, v


# --------------------------------------------------------------------------------------
# Merge of the splits
# --------------------------------------------------------------------------------------


@triton.jit
def _merge_kernel(O_PART, LSE_PART, O, LSE, ROW, S,
                  stride_ob, stride_oh, stride_om, H, Nq,
                  VALUE_DIM: tl.constexpr, VALUE_DIM_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                  RETURN_LSE: tl.constexpr, ROW_TERMS: tl.constexpr):
    """One query row: o = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse); a row
    whose splits all saw no key gets o = 0 and lse = -inf. ROW_TERMS: the splits' LSEs leave out
    the row's terms constant along j (ROW [rows], float32), added to the merged LSE here (in each
    split's float32 LSE a large one rounded the splits' weights apart); a row term of -inf gives
    o = 0, one of +inf or NaN a NaN row, as in the kernels' _row_term_o."""
    row = tl.program_id(0).to(tl.int64)  # (b * H + h) * Nq + t
    t = row % Nq
    bh = row // Nq
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, VALUE_DIM_PAD)
    lse = tl.load(LSE_PART + row * S + offs_s, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_use)
    total = tl.sum(w, 0)
    parts = tl.load(O_PART + (row * S + offs_s[:, None]) * VALUE_DIM_PAD + cols[None, :],
                    mask=offs_s[:, None] < S, other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    row_term = 0.0
    if ROW_TERMS:
        row_term = tl.load(ROW + row)
        removed = tl.where(row_term == float("-inf"), 0.0, float("nan"))
        o = tl.where((tl.abs(row_term) < float("inf")) | (total == 0.0), o, removed)
    tl.store(O + b * stride_ob + h * stride_oh + t * stride_om + cols, o.to(O.dtype.element_ty),
             mask=cols < VALUE_DIM)
    if RETURN_LSE:
        lse_row = m_use + tl.log(tl.where(total == 0.0, 1.0, total)) + row_term
        tl.store(LSE + row, tl.where(total == 0.0, float("-inf"), lse_row))


def merge(call: DecodeCall, o_part: torch.Tensor, lse_part: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
          row_terms: Optional[torch.Tensor] = None):
    """Combine ``o_part [B, Hq, Nq, S, Dv_pad]`` (fp32, each split normalized on its own) and
    ``lse_part [B, Hq, Nq, S]`` into ``o`` and ``lse``; ``row_terms [B, Hq, Nq]`` (fp32): the
    score's terms constant along j, which the splits' LSEs leave out (specs that have them)."""
    S = o_part.shape[3]
    _merge_kernel[(call.B * call.Hq * call.Nq,)](
        o_part, lse_part, o, lse, lse_part if row_terms is None else row_terms, S, o.stride(0), o.stride(1),
        o.stride(2), call.Hq, call.Nq, VALUE_DIM=call.Dv, VALUE_DIM_PAD=o_part.shape[-1],
        BLOCK_S=max(2, triton.next_power_of_2(S)), RETURN_LSE=call.return_lse, ROW_TERMS=row_terms is not None,
        num_warps=4)


def empty_result(call: DecodeCall):
    o = torch.zeros(call.B, call.Hq, call.Nq, call.Dv, dtype=call.q.dtype, device=call.q.device)
    lse = torch.full((call.B, call.Hq, call.Nq), -math.inf, dtype=torch.float32, device=call.q.device)
    return o, lse
