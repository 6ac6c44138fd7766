"""Context parallelism (attncc.distributed) on several CPU processes over gloo, kernels under the
Triton interpreter: every layout x causal, GQA, sliding window, document mask and prefix-LM,
forward and backward, against the single-process float64 ``attncc.reference`` of the unsharded
tensors; the comm modes spread over the two world sizes (world 4: ring for every layout and
pattern, GQA with head-tail only; by default some of those pairs only, SLOW says which). One
process group per world size
serves every case (process start-up dominates otherwise); the counters of the causal ring
cases check that the sends of empty pairs are skipped.

World 2 runs N = 42 and world 4 N = 54 positions, so that the chunks of some layouts differ in size.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from cases import REL_TOL, SMALL_PARAMS, inputs_for, module, pattern
from slow_rule import runs_slow

LENGTH = {2: 42, 4: 54}
D = 16


@dataclass(frozen=True)
class Case:
    """One distributed call checked against the reference. ``spec``: the generated module;
    ``layout``: a make_layout kind ("balanced1": balanced with one chunk per rank, unequal sizes)."""

    label: str  # what the issue calls the pattern
    spec: str
    layout: str
    comm: str
    heads: tuple
    dtype: str = "float32"
    batch: int = 1
    kv_batch: Optional[int] = None  # 1: k, v of batch 1 broadcast over q's batch; None: q's batch

    @property
    def id(self) -> str:
        extra = ("" if self.dtype == "float32" else f"-{self.dtype}") + ("" if self.batch == 1 else f"-b{self.batch}")
        extra += "" if self.kv_batch is None else f"-kvb{self.kv_batch}"
        return f"{self.label}-{self.layout}-{self.comm}{extra}"


PATTERNS = {  # label: (spec, (Hq, Hkv))
    "causal": ("causal", (2, 2)),
    "gqa": ("causal", (2, 1)),  # specs/gqa.toml fixes 32/8 heads: too slow for the interpreter
    "sliding_window": ("sliding_window", (2, 1)),
    "document": ("document", (2, 2)),
    "prefix_lm": ("prefix_lm", (2, 2)),
}
LAYOUTS = ("contiguous", "headtail", "balanced")


UNEQUAL = Case("causal", "causal", "unequal by name", "ring", (2, 2))
# ranks that do not make the same call (the same rows each): every rank must refuse, none may hang
MISMATCHED = (Case("causal", "causal", "layouts differ", "ring", (2, 2)),
              Case("causal", "causal", "layouts differ", "allgather", (2, 2)),
              Case("sliding_window", "sliding_window", "params differ", "ring", (2, 1)),
              Case("causal", "causal", "dtypes differ", "ring", (2, 2)))
# sharded as docs/context-parallel.md does (make_layout's defaults, two batch rows of documents),
# called with the layout's name: the name must stand for that same layout
BY_NAME_DEFAULTS = Case("document", "document", "balanced by name", "ring", (2, 2), batch=2)
# document ids changed in place between the forward and the backward: every rank must raise
IN_PLACE = Case("document", "document", "changed in place", "ring", (2, 2))


# Cut from CI's run (-m slow runs them): the world-2 all-gather of some (pattern, layout) pairs (every
# layout still all-gathers there: causal's three, and one of each other pattern's in turn; the ring
# runs every pair at world 2), and the world-4 ring of some pairs (every pattern and every layout
# still runs there once at least: causal contiguous and head-tail, GQA, sliding window contiguous,
# document balanced, prefix-LM head-tail).
SLOW = {(2, f"{label}-{lay}-allgather") for label, lay in (
            ("gqa", "contiguous"), ("gqa", "headtail"), ("sliding_window", "contiguous"),
            ("sliding_window", "balanced"), ("document", "headtail"), ("document", "balanced"),
            ("prefix_lm", "contiguous"), ("prefix_lm", "balanced"))} | \
       {(4, f"{label}-{lay}-ring") for label, lay in (
            ("causal", "balanced"), ("sliding_window", "headtail"), ("sliding_window", "balanced"),
            ("document", "contiguous"), ("document", "headtail"), ("prefix_lm", "contiguous"),
            ("prefix_lm", "balanced"))}


def _cases():
    out = {2: [], 4: []}
    for label, (spec, heads) in PATTERNS.items():
        for lay in LAYOUTS:
            # two batch rows with different documents: the chunk classes hold for both
            batch = 2 if label == "document" and lay != "headtail" else 1
            out[2].append(Case(label, spec, lay, "allgather", heads, batch=batch if lay == "contiguous" else 1))
            out[2].append(Case(label, spec, lay, "ring", heads, batch=batch if lay == "balanced" else 1))
            if label != "gqa" or lay == "headtail":  # GQA: every layout at world 2
                out[4].append(Case(label, spec, lay, "ring", heads))
    out[2] += [Case("causal", "causal", "contiguous", "ulysses", (2, 2)),
               Case("document", "document", "balanced", "ulysses", (2, 2)),
               Case("prefix_lm", "prefix_lm", "headtail", "ulysses", (2, 2)),
               Case("document", "document", "balanced1", "ring", (2, 2)),
               Case("causal", "causal", "balanced1", "allgather", (2, 2)),
               Case("causal", "causal", "headtail", "ring", (2, 2), "bfloat16"),
               Case("document", "document", "balanced1", "ulysses", (2, 2)),
               Case("sliding_window", "sliding_window", "contiguous", "auto", (2, 1)),
               Case("causal", "causal", "by name", "ring", (2, 2)),
               Case("causal", "causal", "headtail", "ring", (2, 2), batch=2, kv_batch=1),
               Case("prefix_lm", "prefix_lm", "contiguous", "ulysses", (2, 2), batch=2, kv_batch=1)]
    out[2] += [UNEQUAL, IN_PLACE, *MISMATCHED, BY_NAME_DEFAULTS]
    out[4] += [Case("causal", "causal", "headtail", "allgather", (2, 2)),
               Case("document", "document", "balanced1", "allgather", (2, 2)),
               Case("causal", "causal", "contiguous", "ulysses", (4, 4))]
    return out


CASES = _cases()


# ---------------------------------------------------------------------------
# The worker: one process per rank, every case of the world size
# ---------------------------------------------------------------------------

def _tensors(case: Case, n: int):
    """The full-sequence q, k, v, dL/do and inputs of a case, the same on every rank."""
    gen = torch.Generator().manual_seed(sum(map(ord, case.id)))
    Hq, Hkv = case.heads
    B = case.batch
    q = torch.randn(B, Hq, n, D, generator=gen)
    k = torch.randn(case.kv_batch or B, Hkv, n, D, generator=gen)
    v = torch.randn(case.kv_batch or B, Hkv, n, D, generator=gen)
    do = torch.randn(B, Hq, n, D, generator=gen)
    inputs = inputs_for(pattern(case.spec), B, Hq, n, gen)
    return q, k, v, do, inputs


def _run_case(case: Case, rank: int, world: int) -> dict:
    import attncc
    import attncc.distributed as cp

    if case.layout == "unequal by name":  # 22 rows and 21: every rank must refuse, none may hang
        lay = cp.make_layout("contiguous", LENGTH[world] + 1, world)
        q = cp.shard(torch.randn(1, 2, lay.n, D), lay, rank)
        try:
            cp.attention(q, q, q, module=module(case.spec), layout="contiguous", comm=case.comm)
        except ValueError as e:
            return {"raised": str(e)}
        return {"raised": None}
    if case in MISMATCHED:
        n = LENGTH[world]
        q, k, v, do, inputs = _tensors(case, n)
        kind = ("headtail" if rank == 0 else "contiguous") if case.layout == "layouts differ" else "contiguous"
        lay = cp.make_layout(kind, n, world)
        params = {"window": 5 + 20 * rank} if case.layout == "params differ" else {}
        dtype = (torch.float32 if rank == 0 else torch.bfloat16) if case.layout == "dtypes differ" else torch.float32
        ql, kl, vl = (cp.shard(t, lay, rank).to(dtype) for t in (q, k, v))
        try:
            cp.attention(ql, kl, vl, module=module(case.spec), layout=lay, comm=case.comm, **params)
        except ValueError as e:
            return {"raised": str(e)}
        return {"raised": None}
    if case.layout == "changed in place":
        n = LENGTH[world]
        q, k, v, do, inputs = _tensors(case, n)
        lay = cp.make_layout("headtail", n, world, module=module(case.spec), tile=4, **inputs)
        ql, kl, vl = (cp.shard(t, lay, rank).requires_grad_() for t in (q, k, v))
        o = cp.attention(ql, kl, vl, module=module(case.spec), layout=lay, comm=case.comm, **inputs)
        inputs["doc"][0, 0] += 1
        try:
            o.sum().backward()
        except RuntimeError as e:
            return {"raised": str(e)}
        return {"raised": None}

    n = 96 if case == BY_NAME_DEFAULTS else LENGTH[world]  # (two 64-row tiles: the balance sees both rows of ids)
    dtype = getattr(torch, case.dtype)
    q, k, v, do, inputs = _tensors(case, n)
    params = SMALL_PARAMS.get(case.spec, {})
    p, m = pattern(case.spec), module(case.spec)
    qr, kr, vr = (t.to(dtype).double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attncc.reference(p, qr, kr, vr, return_lse=True, **params, **inputs)
    # the loss reads the LSE too (its finite rows): its gradient flows through every pair's backward
    w = torch.linspace(-1.0, 1.0, ref_lse.shape[-1], dtype=torch.float64)
    ((ref * do.double()).sum() + (torch.where(ref_lse.isfinite(), ref_lse, 0.0) * w).sum()).backward()

    kind, extra = (case.layout, {}) if case.layout != "balanced1" else ("balanced", {"chunks_per_rank": 1})
    if case.layout == "by name":  # the name and the row counts say the layout: N = W * local rows
        kind, extra = "headtail", {}
    if case == BY_NAME_DEFAULTS:
        kind, extra = "balanced", {}
        lay = cp.make_layout(kind, n, world, module=m, **params, **inputs)  # docs/context-parallel.md's call
    else:
        lay = cp.make_layout(kind, n, world, module=m, tile=4, **extra, **params, **inputs)
    ql, kl, vl = (cp.shard(t, lay, rank).to(dtype).requires_grad_() for t in (q, k, v))
    cp.reset_stats()
    named = {"by name": "headtail", "balanced by name": "balanced"}.get(case.layout)
    o, lse = cp.attention(ql, kl, vl, module=m, layout=named or lay, comm=case.comm,
                          return_lse=True, **params, **inputs)
    after_forward = asdict(cp.reset_stats())
    w_local = cp.shard(w.float().expand(ref_lse.shape).unsqueeze(-1), lay, rank).squeeze(-1)
    ((o.float() * cp.shard(do, lay, rank)).sum() + (torch.where(lse.isfinite(), lse, 0.0) * w_local).sum()).backward()
    after_backward = asdict(cp.reset_stats())
    errors = [float((a.detach().double() - cp.shard(b.detach(), lay, rank)).norm()
                    / cp.shard(b.detach(), lay, rank).norm().clamp_min(1e-30))
              for a, b in ((o, ref), (ql.grad, qr.grad), (kl.grad, kr.grad), (vl.grad, vr.grad))]
    want_lse = cp.shard(ref_lse.detach().unsqueeze(-1), lay, rank).squeeze(-1)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse)), "rows without keys differ"
    finite = torch.isfinite(want_lse)
    errors.append(float((lse[finite].double() - want_lse[finite]).abs().max()) if finite.any() else 0.0)
    return {"errors": errors, "forward": after_forward, "backward": after_backward,
            "rows": [lay.local_len(r) for r in range(world)]}


def _worker(rank: int, world: int, store: str, out_dir: str, cases) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        for case in cases:
            start = time.perf_counter()
            try:
                results[case.id] = _run_case(case, rank, world)
                results[case.id]["seconds"] = time.perf_counter() - start
            except Exception:
                results[case.id] = {"failure": traceback.format_exc()}
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # nobody tears the group down while a peer still talks to it
        dist.destroy_process_group()


_RESULTS = {}


def _session_dir(tmp_path_factory, name: str) -> Path:
    """A folder that every pytest-xdist worker of this session sees (the session's temp root), or
    this process's own without xdist."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


def _results(world: int, tmp_path_factory, slow: bool) -> list:
    """Every case of ``world`` (those in SLOW only if ``slow``), run once in one process group per
    session: per rank, {case id: result}. Under ``pytest -n`` the first worker to ask runs it and the
    others read its files (each worker ran its own group before: the tests of one world split over
    two workers ran the world twice)."""
    if world not in _RESULTS:
        import torch.multiprocessing as mp
        from filelock import FileLock

        os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the workers
        tmp = _session_dir(tmp_path_factory, f"cp{world}")
        with FileLock(str(tmp) + ".lock"):
            if not (tmp / "done").exists():
                (tmp / "store").unlink(missing_ok=True)  # (a run that failed here before left its store)
                cases = [c for c in CASES[world] if slow or (world, c.id) not in SLOW]
                ctx = mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp), cases), nprocs=world, join=False)
                deadline = time.monotonic() + 900
                while not ctx.join(timeout=5):
                    if time.monotonic() > deadline:
                        for proc in ctx.processes:
                            proc.kill()
                        raise TimeoutError(f"the world-{world} workers did not finish in 900 s")
                (tmp / "done").write_text("")
        _RESULTS[world] = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    return _RESULTS[world]


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

@pytest.fixture
def world_results(tmp_path_factory, pytestconfig):
    """``world_results(world)``: :func:`_results` of the world, its SLOW cases too where slow tests run."""
    return lambda world: _results(world, tmp_path_factory, runs_slow(pytestconfig.option.markexpr))


CHECKED = [pytest.param(w, c, id=f"w{w}-{c.id}", marks=pytest.mark.slow if (w, c.id) in SLOW else ())
           for w in (2, 4) for c in CASES[w] if c not in (UNEQUAL, IN_PLACE, *MISMATCHED)]


@pytest.mark.parametrize("world,case", CHECKED)
def test_matches_single_device_reference(world, case, world_results):
    per_rank = world_results(world)
    tol = REL_TOL[getattr(torch, case.dtype)]
    for rank, results in enumerate(per_rank):
        got = results[case.id]
        assert "failure" not in got, f"rank {rank}:\n{got.get('failure')}"
        for what, err in zip(("o", "dq", "dk", "dv", "lse (max abs)"), got["errors"]):
            assert err < tol, (rank, what, err, got["errors"])


@pytest.mark.parametrize("world", [2, 4])
def test_ring_skips_the_sends_of_empty_pairs_causal(world, world_results):
    """Contiguous causal: rank r's keys serve only the ranks after it, so of its W - 1 forward
    sends the r that would wrap around to earlier ranks are skipped (W (W - 1) / 2 of W (W - 1)
    in all); in the backward, K/V go out as in the forward and the dK/dV of a block return only
    from ranks that used it (rank r returns to its r predecessors)."""
    per_rank = world_results(world)
    case = Case("causal", "causal", "contiguous", "ring", PATTERNS["causal"][1]).id
    skipped = 0
    for rank, results in enumerate(per_rank):
        fwd, bwd = results[case]["forward"], results[case]["backward"]
        assert (fwd["messages"], fwd["messages_skipped"]) == (world - 1 - rank, rank)
        assert fwd["pairs_skipped"] == world - 1 - rank and fwd["pairs_computed"] == rank + 1
        assert (bwd["messages"], bwd["messages_skipped"]) == ((world - 1 - rank) + rank, rank + (world - 1 - rank))
        skipped += fwd["messages_skipped"]
    assert skipped == world * (world - 1) // 2


def test_headtail_ring_sends_only_needed_chunks(world_results):
    """Head-tail causal at W = 4: every rank needs some chunk of every other rank, but a rank's
    tail chunk only serves ranks with a later head: chunk-level skipping still drops sends."""
    per_rank = world_results(4)
    case = Case("causal", "causal", "headtail", "ring", PATTERNS["causal"][1]).id
    for rank, results in enumerate(per_rank):
        fwd = results[case]["forward"]
        assert fwd["messages"] == 3 and fwd["messages_skipped"] == 0
        # rank r's tail chunk 7 - r serves only the ranks p < r (their tail 7 - p comes later)
        assert fwd["chunks_sent"] + fwd["chunks_skipped"] == 6
        assert fwd["chunks_skipped"] == 3 - rank


def test_a_layout_name_with_unequal_rows_is_refused_on_every_rank(world_results):
    for rank, results in enumerate(world_results(2)):
        got = results[UNEQUAL.id]
        assert "failure" not in got, got.get("failure")
        assert got["raised"] and "same rows on every rank, got [22, 21]" in got["raised"], (rank, got)


def test_inputs_changed_in_place_before_the_backward_raise_on_every_rank(world_results):
    """The pairs' backward read the [inputs] again: document ids changed in place after the forward
    gave gradients of a mask the forward never used, without a word."""
    for rank, results in enumerate(world_results(2)):
        got = results[IN_PLACE.id]
        assert "failure" not in got, got.get("failure")
        assert got["raised"] and "modified by an inplace operation" in got["raised"], (rank, got)


@pytest.mark.parametrize("case", MISMATCHED, ids=[c.id for c in MISMATCHED])
def test_ranks_making_different_calls_raise_on_every_rank(case, world_results):
    """Rank 0 head-tail and rank 1 contiguous (20 rows each), or another window, or another dtype:
    before, the all-gather gave wrong rows without a word, the ring a rank reading uninitialised
    rows and its peer waiting forever, other mismatches an abort inside gloo."""
    what = case.layout.split()[0]
    for rank, results in enumerate(world_results(2)):
        got = results[case.id]
        assert "failure" not in got, got.get("failure")
        assert got["raised"] and "every rank must make the same call" in got["raised"], (rank, got)
        assert {"layouts": "layout", "params": "params", "dtypes": "dtypes"}[what] in got["raised"], (rank, got)
