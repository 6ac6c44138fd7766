"""The one timer of bench/: every number a benchmark prints comes from one of these functions.

- :func:`heat_up` before timing: the GPU at its steady clock (the first implementation timed
  would otherwise get the cool boost);
- :func:`time_ms`: GPU time of one call, the median of ``triton.testing.do_bench`` (CUDA events,
  L2 flushed before each run);
- :func:`interleaved`: several implementations compared: ``rounds`` rounds, each timing every
  implementation once in turn (clock drift hits all alike), the median of the rounds;
- :func:`steps_ms`: wall time of whole steps (a training step, a multi-GPU call), each bracketed by
  synchronization (and a barrier / a reduction over ranks);
- :func:`bursts`: host time per call of back-to-back calls (launch-bound paths), the fastest burst.

In smoke mode (bench/common.py) ``time_ms`` times one call with ``perf_counter`` and nothing heats
up: the numbers mean nothing, the code paths run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from bench.common import SMOKE, sync

HEAT_SECONDS = 30.0
ROUNDS = 3


def heat_up(seconds: float = HEAT_SECONDS) -> None:
    """Keep the GPU busy with bf16 matmuls for ``seconds`` before timing: under sustained load the
    H100's clock settles 7-18% below its cool boost (measured: the same kernel timed first and a
    minute later), and without this the first implementation timed gets the cool clock."""
    if SMOKE or seconds <= 0:
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median milliseconds of ``fn()``: ``do_bench`` (``warmup`` / ``rep``: its budgets in ms) on the
    GPU, the gradients of ``grad_to_none`` reset between runs; one call in smoke mode."""
    if SMOKE:
        for x in grad_to_none or ():
            x.grad = None
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int = ROUNDS,
                grad_to_none: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
                warmup: int = 25, rep: int = 100) -> Dict[str, object]:
    """{name: median ms over ``rounds`` rounds} of each ``fns[name]()``, timed in turn within every
    round. A function that raises maps to its exception and is not timed again."""
    rounds = 1 if SMOKE else rounds
    times: Dict[str, List[float]] = {name: [] for name in fns}
    failed: Dict[str, BaseException] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                times[name].append(time_ms(fn, warmup=warmup, rep=rep,
                                           grad_to_none=(grad_to_none or {}).get(name)))
            except Exception as e:  # noqa: BLE001 - one implementation failing leaves the others timed
                failed[name] = e
    return {name: failed.get(name) or statistics.median(times[name]) for name in fns}


def steps_ms(steps: Iterable[Callable[[], object]], *, barrier: Optional[Callable[[], None]] = None,
             reduce: Optional[Callable[[float], float]] = None) -> List[float]:
    """Wall milliseconds of each step, synchronized before and after (``barrier()`` first, e.g.
    across ranks; ``reduce(ms)``: e.g. the slowest rank's time)."""
    out = []
    for step in steps:
        if barrier is not None:
            barrier()
        sync()
        t = time.perf_counter()
        step()
        sync()
        ms = (time.perf_counter() - t) * 1e3
        out.append(reduce(ms) if reduce is not None else ms)
    return out


def bursts(fn: Callable[[], object], calls: int, *, repeats: int = 7, sync_fn: Optional[Callable[[], None]] = None,
           clock: Callable[[], float] = time.perf_counter) -> Tuple[float, float]:
    """(host, wall) milliseconds per call: ``repeats`` bursts of ``calls`` back-to-back calls, the
    fastest (other processes only ever add time). host: until the last call returned; wall: until
    ``sync_fn()`` (the device) finished too. One untimed call first (binds, compiles, caches)."""
    fn()
    if sync_fn:
        sync_fn()
    host, wall = [], []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        t1 = clock()
        if sync_fn:
            sync_fn()
        t2 = clock()
        host.append((t1 - t0) / calls * 1e3)
        wall.append((t2 - t0) / calls * 1e3)
    return min(host), min(wall)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
