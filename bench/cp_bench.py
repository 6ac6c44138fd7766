"""Context-parallel attention (attncc.distributed): timing on GPUs. NOT RUN YET (written without a GPU).

    python bench/cp_bench.py                                   # one GPU: world = 1
    torchrun --standalone --nproc_per_node 8 bench/cp_bench.py --multi
    torchrun --standalone --nproc_per_node 8 bench/cp_bench.py --multi --lengths 131072 --check
    python bench/cp_bench.py --plan 8                          # no GPU: the schedules' traffic and balance
    python bench/cp_bench.py --smoke                           # CPU, interpreter, tiny: does the script run
    torchrun --standalone --nproc_per_node 2 bench/cp_bench.py --multi --smoke

World = 1 (one GPU, no torchrun): for causal, sliding window and document masks,
  * ``plain``: the generated module's ``attention``;
  * ``cp x1``: ``attncc.distributed.attention`` with the one-chunk layout: must be the plain
    kernel itself (outputs compared bit for bit); the time difference is the wrapper's overhead
    (argument checks, layout, dispatch);
  * ``cp split``: one rank holding the 2 x 8 chunks of a head-tail layout for 8 ranks: every
    non-empty chunk pair is its own kernel call, merged by LSE: the compute a rank of 8 does,
    on one GPU, without communication (what splitting costs: shorter kernels, merges, per-pair
    backward preprocessing); outputs compared with the plain kernel.

``--multi`` (under torchrun, NCCL): causal, sliding window (window 8192) and document (mean
document length 16384) at 128K and 512K positions (``--lengths``), for each layout (contiguous,
headtail, balanced) and comm mode (allgather, ring, and ulysses where the heads divide): forward
and forward + backward milliseconds (the slowest rank), TFLOP/s per GPU (the mask's allowed
pairs, 4 B H N^2 D density FLOPs forward, 3.5x that forward + backward, divided by the ranks),
and the MB this rank sent in one forward + backward (the max over ranks; ``attncc.distributed.stats``).
``--check`` compares each rank's output with the single-GPU kernel on the whole sequence (at the
first length only; needs the whole q, k, v on every GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (before torch: --smoke turns the interpreter on)
from common import DEV, DTYPE, SMOKE, attention_flops, banner, density, documents, markdown, rel  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import attncc.distributed as cp  # noqa: E402

SPECS = {  # name: (params, inputs maker)
    "causal": ({}, None),
    "sliding_window": ({"window": 8192}, None),
    "document": ({}, "doc"),
}
B, H, D = 1, 16, 128
FWD_BWD = common.FWD_BWD_FLOPS


def spec_kwargs(spec: str, N: int, smoke: bool, device=None) -> dict:
    params, inputs = SPECS[spec]
    kw = dict(params)
    if smoke and "window" in kw:
        kw["window"] = 7
    if inputs == "doc":
        kw["doc"] = documents(B, N, seed=1, mean=9 if smoke else 16384, device=device)
    return kw


def timed(fn, reps: int, group=None) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, each the slowest rank's (barrier-bracketed)."""
    fn()  # warm-up: compiles, tunes, allocates
    times = []
    for _ in range(1 if SMOKE else reps):
        if dist.is_initialized():
            dist.barrier(group=group)
        if DEV == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        ms = torch.tensor([(time.perf_counter() - t) * 1e3])
        if dist.is_initialized():
            dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
        times.append(float(ms))
    return statistics.median(times)


def fwd_bwd(attend, q, k, v, do):
    def run():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).backward(do)
    return run


# ---------------------------------------------------------------------------------------------
# world = 1
# ---------------------------------------------------------------------------------------------


def single(lengths, reps):
    rows = []
    for spec in SPECS:
        m = common.generated(spec)
        for N in lengths:
            kw = spec_kwargs(spec, N, SMOKE)
            q, k, v = (t.requires_grad_() for t in common.qkv(B, H, N, D))
            do = torch.randn_like(q)
            split = cp.make_layout("headtail", N, 8)
            split = cp.Layout(split.bounds, (0,) * split.num_chunks, 1, "split")  # 16 chunks, one rank
            order = split.positions(0)
            assert torch.equal(order, torch.arange(N, device=order.device))  # rows in position order
            row = {"spec": spec, "N": N}
            ways = {"plain": lambda q, k, v: m.attention(q, k, v, **kw),
                    "cp x1": lambda q, k, v: cp.attention(q, k, v, module=m, **kw),
                    "cp split": lambda q, k, v: cp.attention(q, k, v, module=m, layout=split, **kw)}
            with torch.no_grad():
                ref = ways["plain"](q, k, v)
                row["x1 == plain"] = bool(torch.equal(ways["cp x1"](q, k, v), ref))
                row["split rel err"] = rel(ways["cp split"](q, k, v), ref)
            for name, fn in ways.items():
                with torch.no_grad():
                    row[f"{name} fwd ms"] = timed(lambda: fn(q, k, v), reps)
                row[f"{name} fwd+bwd ms"] = timed(fwd_bwd(fn, q, k, v, do), reps)
            row["x1 overhead fwd ms"] = row["cp x1 fwd ms"] - row["plain fwd ms"]
            row["split / plain fwd+bwd"] = row["cp split fwd+bwd ms"] / row["plain fwd+bwd ms"]
            rows.append(row)
            print(row, flush=True)
    cols = [("spec", "spec", "s"), ("N", "N", "d"), ("x1 == plain", lambda r: str(r["x1 == plain"]), "s"),
            ("split rel err", "split rel err", ".1e")]
    cols += [(name, name, ".3f") for name in ("plain fwd ms", "cp x1 fwd ms", "x1 overhead fwd ms", "cp split fwd ms",
                                              "plain fwd+bwd ms", "cp x1 fwd+bwd ms", "cp split fwd+bwd ms")]
    cols.append(("split / plain fwd+bwd", "split / plain fwd+bwd", ".2f"))
    return markdown(rows, cols)


# ---------------------------------------------------------------------------------------------
# several GPUs
# ---------------------------------------------------------------------------------------------


def multi(lengths, reps, check):
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for spec in SPECS:
        m = common.generated(spec)
        for N in lengths:
            kw = spec_kwargs(spec, N, SMOKE)
            full = common.qkv(B, H, N, D, seed=0)
            do_full = torch.randn(B, H, N, D, device=DEV, dtype=DTYPE)  # the same on every rank: qkv seeded
            flops = attention_flops(B, H, N, N, D, density(spec, N, kw))
            for layout in ("contiguous", "headtail", "balanced"):
                lay = cp.make_layout(layout, N, world, module=m, tile=128, **kw)
                q, k, v = (cp.shard(t, lay, rank).requires_grad_() for t in full)
                do = cp.shard(do_full, lay, rank)
                for mode in ("allgather", "ring", "ulysses"):
                    row = {"spec": spec, "N": N, "W": world, "layout": layout, "comm": mode}
                    attend = lambda q, k, v: cp.attention(q, k, v, module=m, layout=lay, comm=mode, **kw)  # noqa: E731
                    try:
                        if check and N == lengths[0]:
                            with torch.no_grad():
                                want = cp.shard(m.attention(*full, **kw), lay, rank)
                                err = torch.tensor([rel(attend(q, k, v), want)], device=DEV)
                            dist.all_reduce(err, op=dist.ReduceOp.MAX)
                            row["rel err"] = float(err)
                        with torch.no_grad():
                            row["fwd ms"] = timed(lambda: attend(q, k, v), reps)
                        row["fwd+bwd ms"] = timed(fwd_bwd(attend, q, k, v, do), reps)
                        cp.reset_stats()
                        fwd_bwd(attend, q, k, v, do)()
                        sent = torch.tensor([cp.stats.bytes_sent / 1e6], device=DEV)
                        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
                        row["MB sent / step (max rank)"] = float(sent)
                        row["fwd TFLOP/s/GPU"] = flops / row["fwd ms"] / 1e9 / world
                        row["fwd+bwd TFLOP/s/GPU"] = FWD_BWD * flops / row["fwd+bwd ms"] / 1e9 / world
                    except (ValueError, NotImplementedError) as e:  # ulysses where the heads do not divide
                        row["note"] = common.short_error(e)
                    rows.append(row)
                    if rank == 0:
                        print(row, flush=True)
                del q, k, v
            del full, do_full
            common.release()
    cols = [("spec", "spec", "s"), ("N", "N", "d"), ("W", "W", "d"), ("layout", "layout", "s"),
            ("comm", "comm", "s")]
    cols += [("rel err", "rel err", ".1e"), ("fwd ms", "fwd ms", ".2f"), ("fwd+bwd ms", "fwd+bwd ms", ".2f"),
             ("fwd TFLOP/s/GPU", "fwd TFLOP/s/GPU", ".1f"), ("fwd+bwd TFLOP/s/GPU", "fwd+bwd TFLOP/s/GPU", ".1f"),
             ("MB sent / step (max rank)", "MB sent / step (max rank)", ".1f"), ("note", "note", "s")]
    return markdown(rows, cols)


# ---------------------------------------------------------------------------------------------
# the schedules alone (host only: no kernels, no GPU)
# ---------------------------------------------------------------------------------------------


def plan(lengths, world, tile=None):
    """What each layout's schedule moves and computes, from the chunk classes alone: the ring's
    K/V rows sent in a forward over the rows a plain ring sends (every rank's rows to every
    other), the EMPTY chunk pairs skipped, and the balance: the largest rank's visited tiles
    (classes.row_work at ``tile``) and rows over the mean."""
    from attncc.distributed.classes import chunk_classes, row_work
    from attncc.distributed.comm import Schedule

    rows = []
    for spec in SPECS:
        m = common.generated(spec)
        for N in lengths:
            kw = spec_kwargs(spec, N, False, device="cpu")
            params = {k: v for k, v in kw.items() if k != "doc"}
            inputs = {k: v for k, v in kw.items() if k == "doc"}
            work = row_work(m, N, tile=128, params=params, inputs=inputs)
            for layout in ("contiguous", "headtail", "balanced"):
                t = time.perf_counter()
                lay = cp.make_layout(layout, N, world, module=m, tile=tile, **kw)
                classes = chunk_classes(m, lay.bounds, params=params, inputs=inputs)
                ms = (time.perf_counter() - t) * 1e3
                sent = full = 0
                for r in range(world):
                    s = Schedule(None, lay, classes, None, r, world)
                    for dst in range(world):
                        if dst != r:
                            sent += sum(lay.size(c) for c in s.need(dst, r))
                            full += lay.local_len(r)
                C = lay.num_chunks
                sizes = torch.tensor([lay.size(c) for c in range(C)])
                nonempty = (sizes[:, None] > 0) & (sizes[None, :] > 0)
                skipped = int(((classes == cp.EMPTY) & nonempty).sum())
                loads = torch.tensor([float(work[lay.positions(r)].sum()) for r in range(world)])
                counts = torch.tensor([float(lay.local_len(r)) for r in range(world)])
                rows.append({"spec": spec, "N": N, "W": world, "layout": layout, "chunks": C,
                             "ring K/V sent": sent / full, "pairs skipped": skipped / int(nonempty.sum()),
                             "work max/mean": float(loads.max() / loads.mean()),
                             "rows max/mean": float(counts.max() / counts.mean()), "host ms": ms})
                print(rows[-1], flush=True)
    cols = [("spec", "spec", "s"), ("N", "N", "d"), ("W", "W", "d"), ("layout", "layout", "s"),
            ("chunks", "chunks", "d"),
            ("ring K/V sent (of a plain ring)", "ring K/V sent", ".0%"), ("EMPTY pairs", "pairs skipped", ".0%"),
            ("work max/mean", "work max/mean", ".2f"), ("rows max/mean", "rows max/mean", ".2f"),
            ("layout + classes ms (host)", "host ms", ".0f")]
    return markdown(rows, cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--multi", action="store_true", help="under torchrun: several GPUs (NCCL), gloo with --smoke")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    ap.add_argument("--plan", type=int, default=None, metavar="W",
                    help="no kernels: the schedules' traffic and balance for W ranks (host only)")
    ap.add_argument("--out", default=None, help="write the markdown table into this folder")
    args = ap.parse_args()
    global B, H, D
    if SMOKE:
        B, H, D = 1, 2, 16
    if args.plan:
        table = plan(args.lengths or [131072, 524288], args.plan)
        title, done = f"attncc.distributed schedules for {args.plan} ranks (host only)", True
    elif args.multi:
        if DEV == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
        lengths = args.lengths or ([48] if SMOKE else [131072, 524288])
        table = multi(lengths, args.reps, args.check)
        title = f"attncc.distributed on {dist.get_world_size()} ranks"
        done = dist.get_rank() == 0
        dist.barrier()
        dist.destroy_process_group()
    else:
        lengths = args.lengths or ([40] if SMOKE else [16384, 65536])
        table = single(lengths, args.reps)
        title, done = "attncc.distributed, world = 1", True
    if done:
        text = f"{title if args.plan else banner(title)}\n\n{table}\n"
        print(text)
        if args.out:
            common.write_out(args.out, "cp_bench.md", text)


if __name__ == "__main__":
    main()
