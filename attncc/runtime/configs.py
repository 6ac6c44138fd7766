"""Tile configs: what a kernel launches with, the built-in ones, and what overrides them.

:func:`attncc.runtime.launch.pick_config` takes, in order, a config forced on this thread by a
tuning trial (:func:`trying`) or by the environment (:func:`env_config`), the interpreter's
(:data:`INTERPRETER_CONFIG`), the tuned one (attncc/runtime/tuning.py), else
:func:`default_config`. :data:`TOO_BIG` remembers the configs that did not fit the GPU, which
``launch`` retries shallower and the tuner drops. The launcher and the tuner both build on this
module, which imports neither.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

from attncc.runtime.call import Call, env, interpreting, raw_env_get, raw_env_key


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
    text = env(_ENV_NAMES[kernel])
    return _parse_config(text) if text else None


_ENV_NAMES = {"": "ATTNCC_CONFIG", "dkdv": "ATTNCC_CONFIG_DKDV", "dq": "ATTNCC_CONFIG_DQ"}


@functools.lru_cache(maxsize=64)
def _parse_config(text: str) -> KernelConfig:
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        fields[key] = value.strip() in ("1", "true", "True") if key in FLAGS else int(value)
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
        return _parse_config(text), True
    return (INTERPRETER_CONFIG if interpreting() else None), False


def default_config(call: Call, kernel: str = "") -> KernelConfig:
    """The built-in config: by head dim, key length and direction (measured on an H100; see
    docs/performance.md, "Tile configs by head dim and length").

    The backward kernels keep their accumulators (dK and dV, or dQ) for a block of BLOCK_N keys
    (dK/dV) or BLOCK_M queries (dQ) and stream the other side in narrow tiles; above head dim
    128 they take 8 warps, so that those accumulators fit in registers."""
    d = padded_dim(max(call.D, call.Dv))
    short = call.Nk <= SHORT_KEYS
    if kernel == "dkdv":
        return KernelConfig(64, 64, 8, 2) if d > 128 else KernelConfig(64, 64, 4, 2)
    if kernel == "dq":
        if d > 128:
            return KernelConfig(128, 32, 8, 2)
        return KernelConfig(128, 32, 4, 3) if short else KernelConfig(128, 64, 8, 3)
    if d > 128:
        return KernelConfig(128, 64, 8, 2)
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


# (fit_key(call, kernel), config) of the configs that needed more shared memory than the GPU
# has: ``launch`` adds them and runs shallower pipelines instead, the tuner skips them.
TOO_BIG = set()


def fit_key(call: Call, kernel: str):
    """What decides whether a config fits: the spec, its head dims, the dtype and the kernel."""
    return (call.spec.name, call.D, call.Dv, call.q.dtype) + ((kernel,) if kernel else ())


def did_not_fit(call: Call, cfg: KernelConfig, kernel: str = "") -> bool:
    """Whether ``launch`` found ``cfg`` too big for the GPU (and ran a shallower one)."""
    return (fit_key(call, kernel), cfg) in TOO_BIG
