"""Tile configs: what a kernel launches with, the built-in ones, and what overrides them.

:func:`attncc.runtime.launch.pick_config` takes, in order, a config forced on this thread by a
tuning trial (:func:`trying`) or by the environment (:func:`env_config`), the interpreter's
(:data:`INTERPRETER_CONFIG`), the tuned one (attncc/runtime/tuning.py), else
:func:`default_config`, which fits the GPU's shared memory by :func:`shared_bytes` (the model
the tuner prunes its candidates with too). :data:`TOO_BIG` remembers the configs that did not fit
the GPU (a forced or tuned one), which ``launch`` retries shallower and the tuner drops. The
launcher and the tuner both build on this module, which imports neither.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from attncc.runtime.call import FLAG_SPELLINGS, Call, env, interpreting, raw_env_get, raw_env_key


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 2
    warp_specialize: bool = False

    def __post_init__(self):
        # hashed a few times per call (the keys of what is kept per signature and config): once
        object.__setattr__(self, "_hash", hash((self.BLOCK_M, self.BLOCK_N, self.num_warps, self.num_stages,
                                                self.warp_specialize)))

    def __hash__(self):
        return self._hash


KERNELS = ("", "dkdv", "dq")  # the forward, and the two backward kernels
FLAGS = ("warp_specialize",)  # KernelConfig's boolean fields
INTERPRETER_CONFIG = KernelConfig(32, 32, 4, 1)


def env_config(kernel: str = "") -> Optional[KernelConfig]:
    """``ATTNCC_CONFIG="BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2"`` forces the forward's
    config, ``ATTNCC_CONFIG_DKDV`` / ``ATTNCC_CONFIG_DQ`` the backward kernels' (tests and
    benchmarks use them)."""
    name = _ENV_NAMES[kernel]
    text = env(name)
    return _parse_config(name, text) if text else None


_ENV_NAMES = {"": "ATTNCC_CONFIG", "dkdv": "ATTNCC_CONFIG_DKDV", "dq": "ATTNCC_CONFIG_DQ"}


# What a forced config may hold (the tuner's candidates and its cache's records obey the same
# limits: attncc/runtime/tuning.py): tiles that tl.dot and tl.arange take, warp counts Triton runs.
BLOCK_SIZES = (16, 32, 64, 128, 256)
WARP_COUNTS = (1, 2, 4, 8, 16, 32)


def parse_fields(name: str, text: str, allowed) -> dict:
    """The ``key=value,...`` fields of environment variable ``name`` (``text``), each checked:
    a key among ``allowed`` (KernelConfig's field names) and given once, block sizes among
    :data:`BLOCK_SIZES`, ``num_warps`` among :data:`WARP_COUNTS`, ``num_stages`` >= 1,
    ``warp_specialize`` 0 or 1. A ValueError naming the variable otherwise: a negative block size
    ran (o wrong by 1e33 in the interpreter), a misspelt key was ignored, others raised from
    deep inside Triton."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):  # a trailing comma is no field
        key, eq, value = (x.strip() for x in part.partition("="))
        if key not in allowed:
            raise ValueError(f"{name}: unknown field {key!r} in {text!r} (fields: {', '.join(allowed)})")
        if not eq:
            raise ValueError(f"{name}: expected {key}=VALUE in {text!r}")
        if key in fields:
            raise ValueError(f"{name}: {key} given twice in {text!r}")
        if key in FLAGS:
            if value not in FLAG_SPELLINGS:
                raise ValueError(f"{name}: {key} must be 1 (or true, yes, on) or 0 (or false, no, off), got {value!r}")
            fields[key] = FLAG_SPELLINGS[value]
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{name}: {key} must be an integer, got {value!r}") from None
        if key.startswith("BLOCK_") and n not in BLOCK_SIZES:
            raise ValueError(f"{name}: {key} must be one of {', '.join(map(str, BLOCK_SIZES))}, got {n}")
        if key == "num_warps" and n not in WARP_COUNTS:
            raise ValueError(f"{name}: num_warps must be one of {', '.join(map(str, WARP_COUNTS))}, got {n}")
        if key == "num_stages" and n < 1:
            raise ValueError(f"{name}: num_stages must be >= 1, got {n}")
        fields[key] = n
    return fields


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(KernelConfig))


@functools.lru_cache(maxsize=64)
def _parse_config(name: str, text: str) -> KernelConfig:
    fields = parse_fields(name, text, _CONFIG_FIELDS)
    missing = [f for f in ("BLOCK_M", "BLOCK_N") if f not in fields]
    if missing:
        raise ValueError(f"{name}: {' and '.join(missing)} missing in {text!r} (e.g. "
                         f"{name}=BLOCK_M=64,BLOCK_N=32,num_warps=4,num_stages=2)")
    return KernelConfig(**fields)


_TRIAL = threading.local()


def trial_config(kernel: str):
    """The config the tuner is timing for ``kernel`` on this thread, else None."""
    trial = getattr(_TRIAL, "configs", None)
    return None if trial is None else trial.get(kernel)


@contextlib.contextmanager
def trying(kernel: str, cfg) -> Iterator[None]:
    """Within the block, ``pick_config(call, kernel)`` returns ``cfg`` on this thread."""
    old = getattr(_TRIAL, "configs", None)
    _TRIAL.configs = {**(old or {}), kernel: cfg}
    try:
        yield
    finally:
        _TRIAL.configs = old


def forced_config(kernel: str) -> Optional[KernelConfig]:
    """The config a tuning trial (this thread) or the environment forces on ``kernel``, if any."""
    return trial_config(kernel) or env_config(kernel)


def trial_active() -> bool:
    """Whether a tuning trial forces configs on this thread (:func:`trying`)."""
    return getattr(_TRIAL, "configs", None) is not None


def config_settings():
    """The environment's part of what the configs of a call depend on (ATTNCC_CONFIG*,
    TRITON_INTERPRET), as raw values: a key for configs kept per call signature."""
    return tuple(map(_env_data_get, _SETTINGS))


_SETTINGS = tuple(raw_env_key(name) for name in ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ",
                                                 "TRITON_INTERPRET"))
_env_data_get = raw_env_get


def preset_config(kernel: str) -> Optional[KernelConfig]:
    """The config of ``kernel`` ("" the forward, "dkdv" or "dq") that no tuning decides: one
    forced (:func:`forced_config`), else the interpreter's; None on a GPU without either."""
    return preset_and_forced(kernel)[0]


def preset_and_forced(kernel: str):
    """(:func:`preset_config`, whether it is forced): runs a few times per call, so a thread-local
    read and two environment reads, no more."""
    trial = getattr(_TRIAL, "configs", None)
    if trial is not None:
        cfg = trial.get(kernel)
        if cfg is not None:
            return cfg, True
    name = _ENV_NAMES.get(kernel)
    if name is None:
        raise ValueError(f"attncc: kernel must be one of {KERNELS}, got {kernel!r}")
    text = env(name)
    if text:
        return _parse_config(name, text), True
    return (INTERPRETER_CONFIG if interpreting() else None), False


def default_config(call: Call, kernel: str = "") -> KernelConfig:
    """The built-in config: by head dim, key length and direction (measured on an H100; see
    docs/performance.md, "Tile configs by head dim and length"), cut down until it fits the GPU's
    shared memory (:func:`fitting`).

    The backward kernels keep their accumulators (dK and dV, or dQ) for a block of BLOCK_N keys
    (dK/dV) or BLOCK_M queries (dQ) and stream the other side in narrow tiles; above head dim
    128 they take 8 warps, so that those accumulators fit in registers."""
    return fitting(call, kernel, _measured_config(call, kernel))


def _measured_config(call: Call, kernel: str) -> KernelConfig:
    d = padded_dim(max(call.D, call.Dv))
    short = call.Nk <= SHORT_KEYS
    thin = call.spec.tile_hint == "thin" and not short and d <= 128  # sparse partial tiles: see the forward's
    if kernel == "dkdv":
        if thin:
            return KernelConfig(32, 64, 4, 2)  # narrow query tiles (session 13's sweep: fastest on the neighborhood)
        return KernelConfig(64, 64, 8, 2) if d > 128 else KernelConfig(64, 64, 4, 2)
    if kernel == "dq":
        if d > 128:
            return KernelConfig(128, 32, 8, 2)
        if thin:
            return KernelConfig(64, 32, 4, 3)
        return KernelConfig(128, 32, 4, 3) if short else KernelConfig(128, 64, 8, 3)
    if d > 128:
        return KernelConfig(128, 64, 8, 2)
    if thin:
        return KernelConfig(64, 32, 4, 3)  # sparse partial tiles (see attncc/codegen/softmax.py _tile_hint)
    if short or call.spec.tile_hint == "narrow":
        # Few key tiles per row (short keys), or windows and documents, which waste less of a
        # small tile on their ragged edges: small tiles, several programs per SM.
        return KernelConfig(64, 64, 4, 3)
    if d <= 64:
        return KernelConfig(128, 128, 4, 3)
    return KernelConfig(128, 128, 8, 3)


SHORT_KEYS = 2048  # at most this many keys: the small-tile configs above


@functools.lru_cache(maxsize=None)
def padded_dim(d: int) -> int:
    """Head dims are padded to a power of two (>= 16) inside the kernel."""
    return max(16, 1 << (d - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Shared memory
# ---------------------------------------------------------------------------------------------

SM90_SHARED = 232448  # bytes of shared memory one program may allocate on an H100 / H200 (227 KB)
# Triton's barriers and reduction scratch beside the tiles: at most 1552 bytes over the 16-bit
# launches of tests/test_sm90_compile.py.
SHARED_SCRATCH = 2048


def shared_bytes(kernel: str, resident: int, streamed: int, d: int, size: int, stages: int, pair_bytes: int = 0,
                 position_bytes: int = 0) -> int:
    """Shared memory one program of a kernel takes as Triton allocates it on sm90 (a count fitted
    to Triton's own numbers, and never below them: see below). ``kernel``: "" (the forward),
    "dkdv", "dq" or "decode"; ``resident`` rows stay (q, or q and dO in dQ, k and v in dK/dV),
    ``streamed`` rows are loaded per step (k and v, or q and dO in dK/dV), each ``d`` wide in
    ``size``-byte elements; ``stages``: the pipeline depth (decode: its in-flight tiles + 1).

    - the resident tiles, and the two streamed ones in a ring of ``stages`` buffers each for
      16-bit operands (tensor descriptors: TMA fills one per stage). Triton pipelines 32-bit
      operands one stage shallower (at least 1) and adds scratch that depends on the kernel and
      shape (fitted below to Triton 3.6's numbers: the forward's probabilities as a 16-bit
      operand, and half a streamed tile where the streamed side is the longer; one and a half
      streamed tiles in dQ, which keeps one resident tile; one in dK/dV). Decode's pointer
      loads take ``stages - 1`` buffers (cp.async does not refill the buffer being read), and
      its 32-bit query tile counts twice;
    - dK/dV's streamed rows' LSE and delta (fp32), one per stage;
    - what the loop gathers from inputs (``pair_bytes`` per pair of a tile, ``position_bytes``
      per streamed position: ``SpecInfo``), in ``stages - 1`` buffers;
    - :data:`SHARED_SCRATCH`.

    tests/test_sm90_compile.py checks that it is at least Triton's number for every launch it
    compiles (the built-in configs) and at most 12% above it for 16-bit operands: it is 0-4%
    above there (up to 12% for small tiles in a sweep of 216 tile configs), and 6-77% above for
    32-bit ones (up to 3.6x in the sweep: those get shallower pipelines than might fit)."""
    resident_tile, streamed_tile = size * d * resident, size * d * streamed
    ring = max(stages - 1, 1)  # 32-bit operands
    if kernel == "decode":
        tiles = (2 if size >= 4 else 1) * resident_tile + 2 * (stages - 1) * streamed_tile
    elif size < 4:
        tiles = (1 if kernel == "" else 2) * resident_tile + 2 * stages * streamed_tile
    elif kernel == "":
        tiles = (resident_tile + 2 * ring * streamed_tile + 2 * resident * streamed
                 + (streamed_tile // 2 if streamed > resident else 0))
    elif kernel == "dq":
        tiles = resident_tile + (4 * ring + 3) * streamed_tile // 2
    else:
        tiles = 2 * resident_tile + (2 * ring + 1) * streamed_tile
    rows = stages * streamed * 8 if kernel == "dkdv" else 0
    gathered = (stages - 1) * streamed * (resident * pair_bytes + position_bytes)
    return tiles + rows + gathered + SHARED_SCRATCH


def config_shared_bytes(call: Call, kernel: str, cfg: KernelConfig) -> int:
    """:func:`shared_bytes` of ``kernel`` ("" the forward, "dkdv", "dq") of ``call`` with ``cfg``."""
    resident, streamed = (cfg.BLOCK_N, cfg.BLOCK_M) if kernel == "dkdv" else (cfg.BLOCK_M, cfg.BLOCK_N)
    return shared_bytes(kernel, resident, streamed, padded_dim(max(call.D, call.Dv)), call.q.element_size(),
                        cfg.num_stages, call.spec.pair_bytes, call.spec.position_bytes)


@functools.lru_cache(maxsize=None)
def max_shared_memory(device: str) -> int:
    """Bytes of shared memory one program may allocate on ``device``: the GPU's limit (opt-in, per
    block). CPU tensors (tests/test_sm90_compile.py runs calls on them as on a GPU) get an H100's."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return SM90_SHARED
    return getattr(torch.cuda.get_device_properties(dev), "shared_memory_per_block_optin", SM90_SHARED)


def fitting(call: Call, kernel: str, cfg: KernelConfig) -> KernelConfig:
    """``cfg``, or the nearest config that fits the GPU's shared memory by :func:`shared_bytes`:
    a shallower pipeline down to 2 stages, then a narrower streamed block (down to 16 rows), then
    1 stage, then a narrower resident block (what ``launch`` would otherwise find at run time, one
    failed compile per config, and only for the depth)."""
    limit = max_shared_memory(str(call.q.device))
    while config_shared_bytes(call, kernel, cfg) > limit:
        streamed = "BLOCK_M" if kernel == "dkdv" else "BLOCK_N"
        resident = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif getattr(cfg, streamed) > 16:
            cfg = dataclasses.replace(cfg, **{streamed: getattr(cfg, streamed) // 2})
        elif cfg.num_stages > 1:
            cfg = dataclasses.replace(cfg, num_stages=1)
        elif getattr(cfg, resident) > 16:
            cfg = dataclasses.replace(cfg, **{resident: getattr(cfg, resident) // 2})
        else:
            break
    return cfg


# (fit_key(call, kernel), config) of the configs that needed more shared memory than the GPU
# has: ``launch`` adds them and runs shallower pipelines instead, the tuner skips them.
TOO_BIG = set()


def fit_key(call: Call, kernel: str):
    """What decides whether a config fits: the spec, its head dims, the dtype and the kernel."""
    return (call.spec.name, call.spec.spec_hash, call.D, call.Dv, call.q.dtype) + ((kernel,) if kernel else ())


def did_not_fit(call: Call, cfg: KernelConfig, kernel: str = "") -> bool:
    """Whether ``launch`` found ``cfg`` too big for the GPU (and ran a shallower one)."""
    return (fit_key(call, kernel), cfg) in TOO_BIG
