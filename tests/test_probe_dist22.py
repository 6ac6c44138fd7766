"""Probe dist22: attncc.distributed.attention as a user training long-context models calls it, on
several CPU processes over gloo (world sizes 1-4), found by seeded random differential probes
against attncc.reference on the whole sequence (tests/probe_dist22.py is the generator) and by
calls whose ranks disagree.

Probed clean (tests/probe_dist22.py, seeds 0-71, 100-159, 200-259 and 300-323: 216 cases, 34 at
world 1, 95 at world 2, 37 at world 3, 50 at world 4; 13 of the 84 drawn since the count was kept
were Ulysses refused, as documented, where the heads cannot be sharded): random specs of tests/fuzz_specs.py (causal,
windows, sinks, chunks, documents, prefix-LM, global tokens, n_q / n_k terms, ALiBi, biases and
tables read by positions and heads, softcap, score transforms, RoPE, fixed head counts, value_dim
!= head_dim), GQA / MQA, k and v of batch 1, param overrides, ``scale=``, float32 and bfloat16,
forced tile shapes, N of 5-48 (seldom divisible by W), every layout (contiguous, headtail,
balanced with 1, 2 or automatic chunks per rank and tiles 4 / 8, layout names, custom Layouts of
random chunks, some empty, dealt to random owners: ranks holding no rows, more ranks than tiles),
comm ring / allgather / ulysses (refused where the heads cannot be sharded) / auto, local q, k, v
as views (transposed, strided rows, a slice of a wider head dim), return_lse, and a loss of o and
the LSE (dq, dk, dv summed at their owners). By hand, clean: two context-parallel groups of two
ranks in a world of four (``group=``: ring, allgather and Ulysses, forward and backward); activation
checkpointing (reentrant or not) around the call with a rank holding no rows; striped layouts
(chunks of 1, 2 and 3 rows dealt round-robin over 3 ranks; causal, documents, sink window, GQA,
Dv != D); chunk classes of masks reading inputs at other indices (``x[b, i // 2]``,
``x[b, max(i - 1, 0)]``, ``x[b, n_q - 1 - i]``, ``x[(i * 7) % n_q]``, a pair table ``pm[i, j]``, a
per-head window, a score mod ``where(x[b, i] == x[b, j], s, -inf)``; 60 random chunkings, one
process); batch 0; linear attention (refused: softmax only); learned inputs that want a gradient
(refused, as documented).

Defects found and fixed (each test below fails on the old code):

1. A rank whose own checks failed raised alone; the others went on into the ring (or the
   all-gather of the call check) and waited for its messages for ever: a hang. Now every rank
   takes part in the call check, the failing rank raises its error and the others a ValueError
   naming it. The same in the backward (an input changed in place on one rank only), Ulysses'
   too (its check ran in the module's backward, between two all-to-alls).
2. Inputs with the same shapes and other values on the ranks (document ids) were not compared:
   the ring hung (the ranks derived different schedules), the all-gather gave each rank the
   output of its own mask without a word. Their values are now in the check (a digest computed
   where they live).
3. Kernel arguments that the pairs' calls refuse (a float tensor for an int param) were checked at
   the first pair only: a rank without rows made no call and returned, the others raised (or
   waited, in the ring, for a rank that had left). Now checked once before any rank communicates.
4. A param or ``scale`` given as a one-element tensor entered the call check by its repr, which
   names its device (cuda:0, cuda:1): equal calls on GPUs refused as different (here: a tensor on
   one rank, the number on the other).
5. ``make_layout("balanced")`` of a mask that reads an input not given: the tile classifier's
   "the mask reads input 'doc', which was not given", naming no function.
6. q or k without heads: a ZeroDivisionError from ``comm="auto"`` (Hq // Hkv) before any check
   (the kernels' arguments are now checked before the comm mode is chosen).
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from cases import module, pattern

WORLD = 3
D = 16


def _qkv(n, seed, heads=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, D, generator=g) for _ in range(3))


def _docs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, n, generator=g) < 0.25).to(torch.int32).cumsum(-1).to(torch.int32)


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads which error came
        return f"{type(e).__name__}: {e}"
    return None


# -- the scenarios (every rank runs each; each returns what the checks below read) -------------

def rows_wrong(rank, world, seed):
    """One rank (drawn) passes one row fewer than its chunks of a Layout hold."""
    import attncc.distributed as cp

    g = torch.Generator().manual_seed(seed)
    n, bad = 10 + int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(0, world, (1,), generator=g))
    lay = cp.make_layout("contiguous", n, world)
    q = torch.randn(1, 2, lay.local_len(rank) - (rank == bad), D)
    return {"bad": bad, "raised": _raised(lambda: cp.attention(q, q, q, module=module("causal"), layout=lay,
                                                                comm="ring"))}


def docs_differ(rank, world, seed):
    """Document ids of one shape and other values on one rank (one id changed)."""
    import attncc.distributed as cp

    n = 18
    q, k, v = _qkv(n, seed)
    doc = _docs(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    at = int(torch.randint(0, n, (1,), generator=g))
    if rank == world - 1:
        doc[0, at] += 1
    lay = cp.make_layout("contiguous", n, world)
    comm = ("ring", "allgather")[seed % 2]
    return {"raised": _raised(lambda: cp.attention(*(cp.shard(t, lay, rank) for t in (q, k, v)),
                                                   module=module("document"), layout=lay, comm=comm, doc=doc))}


def changed_in_place_on_one_rank(rank, world, seed):
    """Document ids changed in place between the forward and the backward on one rank only; seed 0
    through the ring, seed 1 through Ulysses (3 heads over 3 ranks)."""
    import attncc.distributed as cp

    n = 15
    q, k, v = _qkv(n, seed, heads=(2, 3)[seed % 2])
    doc = _docs(n, seed)
    lay = cp.make_layout("headtail", n, world)
    ql, kl, vl = (cp.shard(t, lay, rank).requires_grad_() for t in (q, k, v))
    o = cp.attention(ql, kl, vl, module=module("document"), layout=lay, comm=("ring", "ulysses")[seed % 2], doc=doc)
    if rank == 1:
        doc.add_(1)
    return {"raised": _raised(lambda: o.sum().backward())}


def refused_by_the_kernels(rank, world, seed):
    """Rank 0 holds no rows; the (int) window is a float tensor, which the kernels' call refuses."""
    import attncc.distributed as cp

    n = 12
    q, k, v = _qkv(n, seed)
    lay = cp.Layout((0, 0, 6, n), (0, 1, 2), world)
    window = torch.tensor(5.0)
    return {"raised": _raised(lambda: cp.attention(*(cp.shard(t, lay, rank) for t in (q, k, v)),
                                                   module=module("sliding_window"), layout=lay, window=window))}


def tensor_param_on_one_rank(rank, world, seed):
    """The window as a one-element tensor on rank 0, as a number on the others, and ``scale=``
    likewise: the same call."""
    import attncc
    import attncc.distributed as cp

    n = 14
    q, k, v = _qkv(n, seed)
    lay = cp.make_layout("headtail", n, world)
    window, scale = (torch.tensor(6), torch.tensor(0.25)) if rank == 0 else (6, 0.25)
    out = {}
    out["raised"] = _raised(lambda: out.setdefault("o", cp.attention(
        *(cp.shard(t, lay, rank) for t in (q, k, v)), module=module("sliding_window"), layout=lay, window=window,
        scale=scale)))
    if "o" in out:
        ref = attncc.reference(pattern("sliding_window"), q.double(), k.double(), v.double(), window=6, scale=0.25)
        out["error"] = float((out.pop("o").double() - cp.shard(ref, lay, rank)).abs().max())
    return out


SCENARIOS = {f.__name__: f for f in (rows_wrong, docs_differ, changed_in_place_on_one_rank, refused_by_the_kernels,
                                     tensor_param_on_one_rank)}
SEEDS = (0, 1)


def _worker(rank, world, store, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a short timeout: a rank left waiting (the defects above) fails the scenario instead of the run
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            for seed in SEEDS:
                try:
                    results[f"{name}-{seed}"] = fn(rank, world, seed)
                except Exception:  # noqa: BLE001
                    results[f"{name}-{seed}"] = {"failure": traceback.format_exc()}
                Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Per rank, {scenario-seed: result}, from one process group of WORLD ranks."""
    import torch.multiprocessing as mp

    os.environ.setdefault("TRITON_INTERPRET", "1")
    tmp = tmp_path_factory.mktemp("d22")
    ctx = mp.spawn(_worker, args=(WORLD, str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 400
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                break
    except Exception:  # noqa: BLE001 - a worker that died: its results so far are read below
        pass
    for proc in ctx.processes:
        if proc.is_alive():
            proc.kill()
    return [json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").exists() else {}
            for r in range(WORLD)]


def _per_rank(results, name, seed):
    out = []
    for rank, got in enumerate(results):
        res = got.get(f"{name}-{seed}")
        assert res is not None, f"rank {rank} has no result for {name} (it hung or died)"
        assert "failure" not in res, f"rank {rank}:\n{res['failure']}"
        out.append(res)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_a_rank_whose_checks_fail_makes_every_rank_raise(results, seed):
    bad = _per_rank(results, "rows_wrong", seed)[0]["bad"]
    _raised_on_every_rank(results, "rows_wrong", seed, lambda rank: (
        f"rank {bad} holds" if rank == bad else f"ValueError: attncc.distributed: rank {bad} of the group could not "
                                                f"make this call"))


def _raised_on_every_rank(results, name, seed, want):
    """Every rank's ``name`` raised, with ``want(rank)`` in its message."""
    for rank, res in enumerate(_per_rank(results, name, seed)):
        assert res["raised"] and want(rank) in res["raised"], (rank, res)


@pytest.mark.parametrize("seed", SEEDS)
def test_inputs_of_other_values_on_one_rank_raise_on_every_rank(results, seed):
    _raised_on_every_rank(results, "docs_differ", seed, lambda rank: "the ranks' input values differ")


@pytest.mark.parametrize("seed", SEEDS)
def test_an_input_changed_in_place_on_one_rank_raises_on_every_rank(results, seed):
    _raised_on_every_rank(results, "changed_in_place_on_one_rank", seed, lambda rank: (
        "modified by an inplace operation" if rank == 1 else "rank 1 of the group could not make its backward"))


@pytest.mark.parametrize("seed", SEEDS)
def test_arguments_the_kernels_refuse_raise_on_a_rank_without_rows_too(results, seed):
    _raised_on_every_rank(results, "refused_by_the_kernels", seed,
                          lambda rank: "param window must be an int, got float 5.0")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_param_as_a_tensor_on_one_rank_is_the_same_call(results, seed):
    for rank, res in enumerate(_per_rank(results, "tensor_param_on_one_rank", seed)):
        assert res["raised"] is None, (rank, res)
        assert res["error"] < 1e-5, (rank, res)


def test_a_balanced_layout_without_the_mask_inputs_names_the_distributed_layout():
    """make_layout("balanced") of a document mask without doc: "the mask reads input 'doc', which was
    not given", naming no function (the tile classifier's words)."""
    import attncc.distributed as cp

    with pytest.raises(ValueError, match=r"^attncc.distributed \(the work of each row, for the balanced layout\): "
                                         r"the mask reads input 'doc', which was not given"):
        cp.make_layout("balanced", 16, 2, module=module("document"))


@pytest.mark.parametrize("heads", [(0, 0), (2, 0)])
@pytest.mark.parametrize("chunks", [1, 2])
def test_tensors_without_heads_are_refused_with_the_modules_words(heads, chunks):
    """q or k without heads: ZeroDivisionError from comm="auto"'s Hq // Hkv, whatever the layout,
    where the module says what it needs."""
    import attncc.distributed as cp

    q, k = torch.randn(1, heads[0], 16, D), torch.randn(1, heads[1], 16, D)
    lay = cp.Layout((0, 16) if chunks == 1 else (0, 7, 16), (0,) * chunks, 1)
    with pytest.raises(ValueError, match="each needs at least one head"):
        cp.attention(q, k, k, module=module("causal"), layout=lay)
