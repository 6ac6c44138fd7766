"""Per-device tile autotuning with a persistent cache.

A config is tuned per :class:`TuneKey`: GPU name, Triton version, spec hash, head dims, dtype,
length bucket (the next power of two of Nq and of Nk) and kernel ("" the forward, "dkdv",
"dq"). Results live in one JSON file per (GPU, Triton version) under :func:`cache_dir`
(``ATTNCC_CACHE_DIR``, default ``~/.cache/attncc/tune``), read once per process and written
under a file lock, merged with what another process wrote meanwhile, then swapped in with
``os.replace``.

``pick_config`` asks :func:`cached_config` (a dict lookup: no sympy, no file access after the
first read). Tuning itself happens ahead of time (``attncc tune``) or, with ``ATTNCC_TUNE=1``,
on the first call of each key (:func:`on_the_fly`); the default is off, because timing dozens
of configs in the middle of a training step stalls it for a minute. Under the interpreter
nothing is tuned or read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from attncc.core.files import cache_folder, read_regular_text, write_atomic
from attncc.core.semantics import MAX_HEAD_DIM
from attncc.runtime.call import Call, env, env_flag, interpreting
from attncc.runtime.configs import (BLOCK_SIZES, WARP_COUNTS, KernelConfig, config_shared_bytes, default_config,
                                    did_not_fit, env_config, max_shared_memory, padded_dim, preset_config, trying)

log = logging.getLogger("attncc")

KERNEL_NAMES = {"": "forward", "dkdv": "dK/dV", "dq": "dQ"}
CACHE_VERSION = 1

# The search space. The forward and dQ keep BLOCK_M query rows resident and stream BLOCK_N keys;
# dK/dV keeps BLOCK_N keys resident and streams BLOCK_M queries (narrow query tiles pay there).
RESIDENT_BLOCKS = (64, 128)
STREAMED_BLOCKS = (32, 64, 128)
NUM_WARPS = (4, 8)
NUM_STAGES = (2, 3, 4)
# Accumulators alone may take at most half of a thread's 255 registers (fp32 elements per thread).
MAX_ACC_PER_THREAD = 128


@dataclass(frozen=True)
class TuneKey:
    """What a tuned config is valid for. ``gpu`` and ``triton`` name the cache file, the rest
    the entry in it (:attr:`entry`); lengths are bucketed to the next power of two."""

    gpu: str
    triton: str
    spec: str
    spec_hash: str
    kernel: str
    dtype: str
    head_dim: int
    value_dim: int
    n_q: int
    n_k: int

    @property
    def entry(self) -> str:
        return (f"{self.spec}:{self.spec_hash}|{self.kernel or 'fwd'}|{self.dtype}|"
                f"d{self.head_dim}x{self.value_dim}|n{self.n_q}x{self.n_k}")

    @property
    def file_name(self) -> str:
        return cache_file_name(self.gpu, self.triton)


def length_bucket(n: int) -> int:
    """The next power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# A cache file's name: <GPU>__triton-<version>.json. ``--show`` and ``--clear`` take the files of
# the folder named so, and no other: ATTNCC_CACHE_DIR may be a folder that holds other JSON files
# (a project's package.json), which `attncc tune --clear` deleted (and left a .lock file beside).
CACHE_FILE_GLOB = "*__triton-*.json"


@functools.lru_cache(maxsize=None)
def cache_file_name(gpu: str, triton_version: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-._" else "-" for c in gpu).strip("-") or "gpu"
    return f"{safe}__triton-{triton_version}.json"


def cache_dir() -> Path:
    """Where tuned configs live: ``ATTNCC_CACHE_DIR``, else ``~/.cache/attncc/tune``
    (:func:`attncc.core.files.cache_folder`)."""
    return cache_folder("", "tune")


def tuning_enabled() -> bool:
    """``ATTNCC_TUNE=1`` tunes on the first call of each key (off by default; never under the interpreter)."""
    return env_flag("ATTNCC_TUNE", False) and not interpreting()


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    return torch.cuda.get_device_name(dev)


@functools.lru_cache(maxsize=1)
def triton_version() -> str:
    import triton

    return triton.__version__


def key_for(call: Call, kernel: str = "") -> TuneKey:
    """The cache key of one kernel of ``call`` (cheap: no sympy, no file access)."""
    spec = call.spec
    return TuneKey(device_name(str(call.q.device)), triton_version(), spec.name, spec.spec_hash, kernel,
                   str(call.q.dtype).replace("torch.", ""), call.D, call.Dv,
                   length_bucket(call.Nq), length_bucket(call.Nk))


# ---------------------------------------------------------------------------------------------
# The cache: {file name: {entry: record}} in memory, one JSON file per (GPU, Triton) on disk.
# A record: {"config": {BLOCK_M, BLOCK_N, num_warps, num_stages}, "ms": float, "default_ms": float,
# "spec": name, "tuned_at": unix time}.
# ---------------------------------------------------------------------------------------------

_LOADED: Dict[Tuple[str, str], Dict[str, dict]] = {}
_LOCK = threading.Lock()
_STORES = [0]  # how many times this process changed the cache (store, clear)


def generation():
    """Changes whenever what :func:`cached_config` returns may have: after a ``store`` or ``clear``
    in this process, or with another ``ATTNCC_CACHE_DIR``. The runtime keeps each signature's
    config with it (see ``launch.pick_config``)."""
    return _STORES[0], env("ATTNCC_CACHE_DIR")

# What a record must hold to be used; anything else in a cache file (a hand edit, another tool, a
# truncated or hostile file) is ignored with a warning rather than raised from every call.
CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
MAX_STAGES = 8
KEY_FIELDS = {"spec": str, "spec_hash": str, "kernel": str, "dtype": str, "head_dim": int, "value_dim": int,
              "n_q": int, "n_k": int}
KEY_DTYPES = ("bfloat16", "float16", "float32")  # what a call runs in


def record_problem(record) -> Optional[str]:
    """Why a cache record cannot be used (its schema: see above), or None when it can."""
    if not isinstance(record, dict):
        return f"a record is an object, got {type(record).__name__}"
    cfg = record.get("config")
    if not isinstance(cfg, dict):
        return "no config object"
    for name in CONFIG_FIELDS:
        if type(cfg.get(name)) is not int:
            return f"config.{name} is not an integer: {short_repr(cfg.get(name))}"
    extra = set(cfg) - set(CONFIG_FIELDS) - {"warp_specialize"}
    if extra:
        return f"unknown config field(s) {', '.join(sorted(map(short_repr, extra)))}"
    if type(cfg.get("warp_specialize", False)) is not bool:
        return "config.warp_specialize is not a boolean"
    if cfg["BLOCK_M"] not in BLOCK_SIZES or cfg["BLOCK_N"] not in BLOCK_SIZES:
        return f"block sizes must be among {BLOCK_SIZES}, got {cfg['BLOCK_M']} x {cfg['BLOCK_N']}"
    if cfg["num_warps"] not in WARP_COUNTS or not 1 <= cfg["num_stages"] <= MAX_STAGES:
        return f"num_warps among {WARP_COUNTS} and num_stages 1 to {MAX_STAGES}, got {cfg['num_warps']}, {cfg['num_stages']}"
    for name in ("ms", "default_ms"):
        value = record.get(name)
        if not (value is None and name == "default_ms") and not _time(value):
            return f"{name} is not a time in ms: {short_repr(value)}"
    key = record.get("key")
    if not isinstance(key, dict):
        return "no key object"
    for name, typ in KEY_FIELDS.items():
        if type(key.get(name)) is not typ:
            return f"key.{name} is not a{'n integer' if typ is int else ' string'}: {short_repr(key.get(name))}"
    if key["kernel"] not in KERNEL_NAMES:
        return f"key.kernel is not one of {sorted(KERNEL_NAMES)}: {short_repr(key['kernel'])}"
    return key_problem(key)


def key_problem(key: dict) -> Optional[str]:
    """Why a record's key (its fields typed: :func:`record_problem`) names no call's kernel: a spec
    name that is no identifier, a hash that is not alphanumeric, a dtype no call runs in, head dims
    outside 1 to :data:`MAX_HEAD_DIM`, lengths that are no bucket (:func:`length_bucket`)."""
    if not (key["spec"].isascii() and key["spec"].isidentifier()):
        return f"key.spec is not a spec name (an identifier): {short_repr(key['spec'])}"
    if not (key["spec_hash"].isascii() and key["spec_hash"].isalnum()):
        return f"key.spec_hash is not a spec hash (letters and digits): {short_repr(key['spec_hash'])}"
    if key["dtype"] not in KEY_DTYPES:
        return f"key.dtype is not one of {', '.join(KEY_DTYPES)}: {short_repr(key['dtype'])}"
    for name in ("head_dim", "value_dim"):
        if not 1 <= key[name] <= MAX_HEAD_DIM:
            return f"key.{name} is not a head dim from 1 to {MAX_HEAD_DIM}: {key[name]}"
    for name in ("n_q", "n_k"):
        if key[name] < 1 or length_bucket(key[name]) != key[name]:
            return f"key.{name} is not a length bucket (a power of two): {key[name]}"
    return None


def filing_problem(entry: str, record: dict) -> Optional[str]:
    """Why a record that :func:`record_problem` passed cannot be filed under ``entry``: the entry
    is the name of its own key (:attr:`TuneKey.entry`), else a lookup found a config tuned for
    another spec, kernel, dtype, head dim or length (a hand edit, or an entry copied over)."""
    own = TuneKey("", "", **{name: record["key"][name] for name in KEY_FIELDS}).entry
    if entry != own:
        return f"filed under another key than its own ({short_repr(own, 120)})"
    return None


def _time(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def short_repr(value, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (a malformed cache entry in a message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class CacheFile:
    """One cache file as read: its usable ``entries``, the ``ignored`` ones (entry: why) and,
    when the file as a whole is unusable, ``error``."""

    path: Path
    gpu: str = "?"
    triton: str = "?"
    entries: Dict[str, dict] = dataclasses.field(default_factory=dict)
    ignored: Dict[str, str] = dataclasses.field(default_factory=dict)
    error: Optional[str] = None


def read_file(path: Path, owner: Optional[Tuple[str, str]] = None) -> CacheFile:
    """Read and check one cache file; never raises for what the file holds. ``owner``: the (GPU,
    Triton version) that its entries must have been tuned on (the file's ``gpu`` and ``triton``),
    else the file is unusable (copied from another machine, or a GPU whose name the file name
    spells alike: :func:`cache_file_name`); None: any (``attncc tune --show``)."""
    path = Path(path)
    try:
        data = json.loads(read_regular_text(path))  # a named pipe there hung every process's first call
    except FileNotFoundError:
        return CacheFile(path)
    except (OSError, ValueError, RecursionError, MemoryError) as e:  # RecursionError: deeply nested JSON
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        return CacheFile(path, error=f"unreadable ({reason})")
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return CacheFile(path, error=f"not a version {CACHE_VERSION} attncc tune cache")
    gpu, triton = data.get("gpu"), data.get("triton")
    if owner is not None and (gpu, triton) != tuple(owner):
        return CacheFile(path, error=f"tuned on {short_repr(gpu, 60)} with Triton {short_repr(triton)}, not on "
                                     f"{owner[0]!r} with Triton {owner[1]!r}")
    entries, ignored = {}, {}
    for entry, record in data["entries"].items():
        problem = record_problem(record) or filing_problem(entry, record)
        if problem is None:
            entries[entry] = record
        else:
            ignored[entry] = problem
    return CacheFile(path, gpu if isinstance(gpu, str) else "?", triton if isinstance(triton, str) else "?",
                     entries, ignored)


def _read(path: Path, key: TuneKey) -> Dict[str, dict]:
    """The usable entries of a cache file of ``key``'s GPU and Triton, with a warning for what is not."""
    found = read_file(path, (key.gpu, key.triton))
    if found.error is not None:
        log.warning("attncc: ignoring tune cache %s: %s", path, found.error)
    for entry, problem in list(found.ignored.items())[:3]:
        log.warning("attncc: ignoring tune cache entry %s in %s: %s", short_repr(entry, 80), path, problem)
    if len(found.ignored) > 3:
        log.warning("attncc: ... and %d more malformed entries in %s", len(found.ignored) - 3, path)
    return found.entries


def _entries(key: TuneKey) -> Dict[str, dict]:
    """The entries of the cache file of ``key``, read once per process (per cache directory)."""
    slot = (str(cache_dir()), key.file_name)
    entries = _LOADED.get(slot)
    if entries is None:
        with _LOCK:
            entries = _LOADED.get(slot)
            if entries is None:
                entries = _LOADED[slot] = _read(Path(slot[0]) / key.file_name, key)
    return entries


def cached_config(call: Call, kernel: str = ""):
    """The tuned KernelConfig of this kernel of ``call``, or None when the cache has none, or one
    that this call could not run (:func:`config_problem`: a hand-edited, hostile or stale entry),
    which is ignored with a warning."""
    key = key_for(call, kernel)
    record = lookup(key)
    if record is None:
        return None
    cfg = _config(record["config"])
    problem = config_problem(call, kernel, cfg)
    if problem is not None:
        log.warning("attncc: ignoring tune cache entry %s: %s %s; the built-in config runs instead",
                    short_repr(key.entry, 120), describe(cfg), problem)
        return None
    return cfg


def config_problem(call: Call, kernel: str, cfg) -> Optional[str]:
    """Why ``cfg`` cannot serve this kernel of ``call`` on its GPU, or None: the limits every config
    the tuner times obeys (:func:`candidates`, exhaustive or not), so that only an entry the tuner
    did not write (edited by hand, or stale) fails them. A record's schema (:func:`record_problem`)
    allows tiles up to 256 x 256 on 1 warp: at head dim 128 their fp32 accumulators take 1024
    registers per thread, and on an H100 Triton compiled such kernels for minutes (a call that
    seemed to hang), or retried a pipeline too deep for shared memory once per stage."""
    if cfg.warp_specialize:  # an experiment's flag (ATTNCC_CONFIG), never a candidate: not run from a cache
        return "asks for warp_specialize, which no tuner candidate has"
    d = padded_dim(max(call.D, call.Dv))
    resident = cfg.BLOCK_N if kernel == "dkdv" else cfg.BLOCK_M
    acc = (2 if kernel == "dkdv" else 1) * resident * d // (32 * cfg.num_warps)
    if acc > MAX_ACC_PER_THREAD:
        return (f"keeps {acc} fp32 accumulators per thread at head dim {d} (the tuner's limit: "
                f"{MAX_ACC_PER_THREAD})")
    need, limit = config_shared_bytes(call, kernel, cfg), max_shared_memory(str(call.q.device))
    if need > limit:
        return f"needs {need} bytes of shared memory, the GPU has {limit}"
    return None


def lookup(key: TuneKey) -> Optional[dict]:
    """The cache record of ``key`` (see above), or None."""
    return _entries(key).get(key.entry)


def store(key: TuneKey, record: dict) -> Path:
    """Add one record to the cache: merged with the file as it is now, under an exclusive lock,
    written to a temporary file and moved over the old one (readers never see half a file)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / key.file_name
    with _file_lock(path):
        entries = _read(path, key)  # what another process stored meanwhile; malformed entries are dropped
        new = {**record, "key": {f: getattr(key, f) for f in KEY_FIELDS}}
        problem = record_problem(new)
        if problem is not None:
            raise ValueError(f"attncc: not a tune cache record ({problem}): {short_repr(record, 200)}")
        entries[key.entry] = new
        data = {"version": CACHE_VERSION, "gpu": key.gpu, "triton": key.triton, "entries": entries}
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    _remember(directory, key.file_name, entries)
    return path


def keep_in_process(key: TuneKey, record: dict) -> None:
    """Add one record to this process's view of the cache only (the cache folder cannot be written)."""
    new = {**record, "key": {f: getattr(key, f) for f in KEY_FIELDS}}
    problem = record_problem(new)
    if problem is not None:
        raise ValueError(f"attncc: not a tune cache record ({problem}): {short_repr(record, 200)}")
    _remember(cache_dir(), key.file_name, {**_entries(key), key.entry: new})


def _remember(directory: Path, file_name: str, entries: Dict[str, dict]) -> None:
    with _LOCK:
        _LOADED[(str(directory), file_name)] = entries
        _STORES[0] += 1


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the cache file ``path`` (on its ``.lock`` file, which stays: a
    writer holding the lock on a deleted lock file would exclude no one who opens a new one)."""
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cache_files() -> List[Path]:
    directory = cache_dir()
    return sorted(directory.glob(CACHE_FILE_GLOB)) if directory.is_dir() else []


def clear() -> Tuple[int, List[str]]:
    """Delete every cache file, each under its lock (a concurrent ``store`` either lands before
    and is deleted, or after, on an empty file); the lock files stay. Returns (how many files
    were removed, the ones that could not be, with why)."""
    removed, failed = 0, []
    for path in cache_files():
        try:
            with _file_lock(path):
                path.unlink(missing_ok=True)
            removed += 1
        except OSError as e:
            failed.append(f"{path.name}: {e.strerror or e}")
    with _LOCK:
        _LOADED.clear()
        _STORES[0] += 1
    return removed, failed


def _config(fields: dict):
    return KernelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# The tuner
# ---------------------------------------------------------------------------------------------

def candidates(call: Call, kernel: str = "", max_shared_mem: Optional[int] = None, *, exhaustive: bool = False,
               sm_count: Optional[int] = None, limit: Optional[int] = None) -> list:
    """The configs worth timing for this kernel of ``call``, the built-in default always among them
    (so tuning never loses to it).

    ``exhaustive``: the whole search space above, less the configs whose tiles cannot fit shared
    memory (``max_shared_mem`` bytes; None: no limit) or whose accumulators alone would take over
    half of a thread's registers. Otherwise (the default; issue 18: the exhaustive search took
    three minutes per spec and length, compiling 85 kernels) a pruned list:

    - one pipeline depth per tile shape and warp count: the deepest that fits, up to
      :data:`PREFERRED_STAGES` (depth moved times by a few percent where it mattered at all);
    - the register model counts every live fp32 tile, not only the accumulators
      (:func:`live_per_thread`), against :data:`MAX_LIVE_PER_THREAD`;
    - each warpgroup (4 warps) gets at least :data:`ROWS_PER_WARPGROUP` resident rows: 8 warps over a
      64-row resident tile split Hopper's 64-row MMAs between two warpgroups (measured on an H100,
      2026-12-05, bf16, D = 128, N = 16K: dK/dV over 64 resident keys with 8 warps and 128-query
      tiles took 1.6x the built-in config's backward time on block diagonal, 2.0x on the 2D
      neighborhood; the model ranked it first and left the narrow configs that won out). Not above
      head dim 128, where 64 rows' accumulators need 8 warps (the built-in configs there);
    - at most ``limit`` (default :data:`MAX_CANDIDATES`) configs, the ones the cost model
      :func:`estimated_cost` ranks first (``sm_count``: the GPU's SMs; None: 132, an H100's).
    """
    d = padded_dim(max(call.D, call.Dv))
    found = []
    for resident in RESIDENT_BLOCKS:
        for streamed in STREAMED_BLOCKS:
            block_m, block_n = (streamed, resident) if kernel == "dkdv" else (resident, streamed)
            for warps in NUM_WARPS:
                # dK/dV accumulate two [BLOCK_N, D] tiles, dQ and the forward one [BLOCK_M, D].
                acc = 2 * resident * d if kernel == "dkdv" else resident * d
                if acc // (32 * warps) > MAX_ACC_PER_THREAD:
                    continue
                if not exhaustive and (live_per_thread(kernel, resident, streamed, d, warps) > MAX_LIVE_PER_THREAD
                                       or (d <= 128 and resident < ROWS_PER_WARPGROUP * warps // 4)):
                    continue
                fitting = [stages for stages in NUM_STAGES if max_shared_mem is None or config_shared_bytes(
                    call, kernel, KernelConfig(block_m, block_n, warps, stages)) <= max_shared_mem]
                if not exhaustive and fitting:
                    fitting = [max(s for s in fitting if s <= PREFERRED_STAGES[kernel]) if min(fitting) <= PREFERRED_STAGES[kernel]
                               else min(fitting)]
                found += [KernelConfig(block_m, block_n, warps, stages) for stages in fitting]
    default = default_config(call, kernel)
    if not exhaustive:
        found.sort(key=lambda cfg: estimated_cost(call, kernel, cfg, max_shared_mem, sm_count))
        found = [cfg for cfg in found if cfg != default][:max(0, (limit or MAX_CANDIDATES) - 1)]
    if default not in found:
        found.append(default)
    return found


# Pruned search (see candidates): pipeline depths per kernel (the built-in configs' own), the
# register budget for all live fp32 values per thread (the built-in configs use 128 to 192), and
# how many configs a kernel compiles (a compile takes one to two seconds: three kernels of five
# keep `attncc tune` of one spec and length within about 30 s).
PREFERRED_STAGES = {"": 3, "dkdv": 2, "dq": 3}
MAX_LIVE_PER_THREAD = 192
ROWS_PER_WARPGROUP = 64
MAX_CANDIDATES = 5
DEFAULT_SM_COUNT = 132  # an H100 SXM's; the GPU's own count when tuning on it


def live_per_thread(kernel: str, resident: int, streamed: int, d: int, warps: int) -> int:
    """fp32 values a thread holds at once: the accumulators (dK and dV, or one [resident, d]
    tile) and the score tiles of one step (S and P in the forward; P, dP and dS, two live at a
    time, in the backward), spread over the ``warps`` x 32 threads."""
    acc = (2 if kernel == "dkdv" else 1) * resident * d
    scores = (1 if kernel == "" else 2) * resident * streamed
    return (acc + scores) // (32 * warps)


def estimated_cost(call: Call, kernel: str, cfg, max_shared_mem: Optional[int], sm_count: Optional[int]) -> float:
    """A rough relative time of a config, to rank the candidates (the timing decides): the memory
    traffic per unit of work, 1/resident + 1/streamed (each tile of one side is read once per tile
    of the other), times the wave quantization of the grid (the share of the last wave's slots that
    idle, which punishes big tiles on short sequences)."""
    resident, streamed = (cfg.BLOCK_N, cfg.BLOCK_M) if kernel == "dkdv" else (cfg.BLOCK_M, cfg.BLOCK_N)
    rows = call.Nk if kernel == "dkdv" else call.Nq
    heads = call.Hkv if kernel == "dkdv" else call.Hq
    programs = max(1, -(-rows // resident) * call.B * heads)
    smem = config_shared_bytes(call, kernel, cfg)
    per_sm = max(1, min((max_shared_mem or 4 * smem) // max(smem, 1), 32 // cfg.num_warps))
    slots = (sm_count or DEFAULT_SM_COUNT) * per_sm
    waves = -(-programs // slots)
    return (1 / resident + 1 / streamed) * (waves * slots / programs)


def first_round(timings: Dict[object, float], default, keep: Optional[int] = None) -> list:
    """The configs of a short first timing round worth timing again: the fastest third (at least
    two), and the built-in default (its time is the baseline of the gain the cache records)."""
    ranked = sorted(timings, key=timings.get)
    kept = ranked[:keep or max(2, -(-len(ranked) // 3))]
    if default in timings and default not in kept:
        kept.append(default)
    return kept


def do_bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` on the GPU (short: a tuning run times dozens of configs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def quick_bench_ms(fn: Callable[[], object]) -> float:
    """The first round's timing: a few runs (a config that loses here by far is not timed again)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=2, rep=8, return_mode="median")


# The timing functions; tests replace them (see tune's ``timer``).
TIMER: Callable[[Callable[[], object]], float] = do_bench_ms
QUICK_TIMER: Callable[[Callable[[], object]], float] = quick_bench_ms


def sm_count(device) -> Optional[int]:
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.get_device_properties(dev).multi_processor_count


def tune(call: Call, kernel: str, run: Callable[[Call], object], *, timer=None, quick_timer=None,
         progress: Optional[Callable[[int, int], None]] = None, force: bool = False, exhaustive: bool = False,
         keep: bool = False):
    """Time the candidate configs of one kernel of ``call`` and cache the fastest; returns it.

    ``run(call)`` runs the call's forward (``kernel`` ""), or its backward, whose dK/dV or dQ
    kernel then uses the config being timed. Runs allocate their own outputs, so the caller's
    tensors are read only. Candidates that fail to compile or do not fit the GPU are skipped.
    Two rounds: every candidate (:func:`candidates`, pruned unless ``exhaustive``) once with
    ``quick_timer`` (default :data:`QUICK_TIMER`), then the fastest third and the built-in default
    with ``timer`` (default :data:`TIMER`); the cache records the winner's and the default's time.
    ``progress(done, total)`` is called after each first-round candidate. A cached key is returned
    as it is unless ``force``. Under the interpreter nothing is timed and the interpreter's small
    config comes back. Where the cache folder cannot be written, ``keep`` (tuning on the fly) keeps
    the winner in this process with a warning; otherwise the OSError is raised (``attncc tune``).
    (On the fly, an unwritable ATTNCC_CACHE_DIR raised from every call, each after tuning again.)"""
    if interpreting():
        return preset_config(kernel)
    key = key_for(call, kernel)
    if not force:
        cached = cached_config(call, kernel)  # an entry this call cannot run is tuned again
        if cached is not None:
            return cached
    timer = timer or TIMER
    quick_timer = quick_timer or QUICK_TIMER
    call = dataclasses.replace(call, for_backward=None, memo=None)  # keep no block lists of the trial tiles
    device = call.q.device
    configs = candidates(call, kernel, max_shared_memory(device), exhaustive=exhaustive, sm_count=sm_count(device))
    default = default_config(call, kernel)
    log.warning("attncc: tuning %s %s (%s, d%d, N %dx%d) on %s: %d configs ...", call.spec.name,
                KERNEL_NAMES[kernel], key.dtype, key.head_dim, call.Nq, call.Nk, key.gpu, len(configs))
    start = time.perf_counter()
    first = {}
    last_error = None
    for i, cfg in enumerate(configs):
        with trying(kernel, cfg):
            try:
                run(call)  # compiles; a config that does not fit fails here or is cut down by launch
                if did_not_fit(call, cfg, kernel):
                    continue
                first[cfg] = quick_timer(lambda: run(call))
            except Exception as e:  # noqa: BLE001 - a config that fails is not a candidate
                last_error = e
                log.debug("attncc: tuning %s: %s failed: %s", call.spec.name, cfg, e)
            finally:
                if progress is not None:
                    progress(i + 1, len(configs))
    if not first:
        raise RuntimeError(f"attncc: tuning {call.spec.name} {KERNEL_NAMES[kernel]}: no config ran "
                           f"(last error: {last_error})") from last_error
    timings = {}
    for cfg in first_round(first, default):
        with trying(kernel, cfg):
            timings[cfg] = timer(lambda: run(call))
    best = min(timings, key=timings.get)
    record = {"config": dataclasses.asdict(best), "ms": timings[best], "default_ms": timings.get(default),
              "spec": call.spec.name, "candidates": len(configs), "tuned_at": round(time.time())}
    try:
        path = store(key, record)
    except OSError as e:
        if not keep:
            raise
        keep_in_process(key, record)
        path = (f"this process only: cannot write {e.filename or cache_dir()} ({e.strerror or e}); "
                f"set ATTNCC_CACHE_DIR to a writable folder")
    log.warning("attncc: tuning %s %s (%s, d%d, N %dx%d) took %.1f s: %s, %.3f ms (default %s); cached in %s",
                call.spec.name, KERNEL_NAMES[kernel], key.dtype, key.head_dim, call.Nq, call.Nk,
                time.perf_counter() - start, describe(best), timings[best],
                "failed" if timings.get(default) is None else f"{timings[default]:.3f} ms", path)
    return best


def gain(record: dict) -> Optional[float]:
    """How much faster the tuned config ran than the built-in one (0.05: 5%), None when the
    built-in one did not run."""
    default = record.get("default_ms")
    if default is None or not record.get("ms"):
        return None
    return default / record["ms"] - 1.0


def describe(cfg) -> str:
    text = f"BLOCK_M={cfg.BLOCK_M} BLOCK_N={cfg.BLOCK_N} warps={cfg.num_warps} stages={cfg.num_stages}"
    return text + (" warp_specialize" if cfg.warp_specialize else "")


def on_the_fly(forward, backward):
    """With ``ATTNCC_TUNE=1``: the forward and backward launchers of a generated module, tuning
    each kernel on its first call of a key that the cache lacks. Otherwise them unchanged."""
    if not tuning_enabled():
        return forward, backward

    def tuned_forward(call: Call):
        _tune_missing(call, ("",), forward)
        return forward(call)

    def tuned_backward(call: Call, o, lse, do, dlse=None):
        _tune_missing(call, ("dkdv", "dq"), lambda c: backward(c, o, lse, do, dlse))
        return backward(call, o, lse, do, dlse)

    return tuned_forward, (None if backward is None else tuned_backward)


def _tune_missing(call: Call, kernels, run):
    if call.q.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    for kernel in kernels:
        if env_config(kernel) is None and cached_config(call, kernel) is None:  # missing, or unusable
            tune(call, kernel, run, keep=True)
