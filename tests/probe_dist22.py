"""Probe dist22 generator: seeded random context-parallel calls (attncc.distributed.attention) on
several CPU processes over gloo, each rank's rows gathered and compared with attncc.reference
(float64) of the whole sequence, forward and backward.

A case is a random spec of tests/fuzz_specs.py (masks of bands, chunks, sinks, documents, prefixes,
global tokens, ``n_q``/``n_k``; biases, ALiBi, tables, softcap, score transforms, RoPE, fixed head
counts, value_dim) and a call of it at one length N (5-48, seldom divisible by the world size),
GQA / MQA, k and v of batch 1, param overrides, ``scale=``, float32 / bfloat16, forced tile shapes,
sharded over W = 1-4 ranks in a random layout: contiguous, headtail, balanced (by the pattern's
work, 1, 2 or the automatic number of chunks per rank, tile 4 or 8), a layout name, or a custom
Layout of random (possibly empty) chunks dealt to random owners; comm ring, allgather, ulysses
(refused with a clear error where the heads cannot be sharded) or auto; local q, k, v contiguous or
views (transposed from [B, N, H, D], every other row, a slice of a wider head dim); inputs
contiguous, transposed, strided or expanded, longer than N now and then; return_lse, and a loss of
o and (half the time) the LSE. Gradients of learned inputs are refused under context parallelism
(documented), so their tables are passed without one.

    python tests/probe_dist22.py --cases 40 --start 0          # print failures
    python tests/probe_dist22.py --seed 7 --verbose            # one case
"""
from __future__ import annotations

import datetime
import math
import pickle
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from cases import REL_TOL, seed_parser, seeds_of  # noqa: E402
import fuzz_specs as fz  # noqa: E402

LOCAL_VIEWS = ("contiguous", "bnhd", "rows_step", "padded_d")


@dataclass(frozen=True)
class DistCase:
    seed: int
    text: str
    plan: object  # fuzz_specs.CallPlan (Nq = Nk = N, offsets 0)
    world: int
    layout: str  # contiguous, headtail, balanced, balanced1, balanced2, name:<kind>, custom
    tile: int
    comm: str
    return_lse: bool
    views: tuple  # q, k, v local views
    custom: Optional[tuple] = None  # (bounds, owner) of a custom layout

    def describe(self) -> str:
        lay = self.layout + (f" {self.custom}" if self.custom else "") + f" tile {self.tile}"
        return (f"W={self.world} layout {lay} comm {self.comm} lse={self.return_lse} views {self.views}\n"
                f"  call: {self.plan.describe()}\n" + "".join(f"  | {x}\n" for x in self.text.splitlines()))


AVOID = frozenset(fz.KNOWN_BUG_TAGS) | {"table_dtype", "half_table", "f64_table"}


def draw(seed: int) -> DistCase:
    rng = random.Random(seed)
    text, draft = fz.random_spec(rng, avoid=AVOID)
    plan = fz.random_call(rng, draft, avoid=AVOID)
    world = rng.choice((1, 2, 2, 3, 4))
    n = rng.randint(max(world, 5), 48)
    plan = replace(plan, Nq=n, Nk=n, q_offset=0, k_offset=0, n_q_extra=None, n_k_extra=None, decode=None,
                   varlen=None, nan=None, int64_values=False, layouts=("contiguous",) * 3,
                   dtype="float32" if rng.random() < 0.8 else "bfloat16",
                   B=rng.choice((1, 1, 2)))
    if plan.dtype == "bfloat16" and "bfloat16" not in draft.dtypes:
        plan = replace(plan, dtype="float32")
    layout = rng.choice(("contiguous", "headtail", "balanced", "balanced1", "balanced2", "name:contiguous",
                         "name:headtail", "name:balanced", "name:auto", "custom", "custom"))
    custom = None
    if layout == "custom":
        chunks = rng.randint(world, world + 4)
        cuts = sorted(rng.randint(0, n) for _ in range(chunks - 1))  # empty chunks allowed
        bounds = (0, *cuts, n)
        owner = list(range(world)) + [rng.randrange(world) for _ in range(chunks - world)]
        rng.shuffle(owner)
        custom = (bounds, tuple(owner))
    comm = rng.choice(("ring", "ring", "allgather", "allgather", "ulysses", "auto"))
    views = tuple(rng.choice(LOCAL_VIEWS) if rng.random() < 0.3 else "contiguous" for _ in range(3))
    return DistCase(seed, text, plan, world, layout, rng.choice((4, 8)), comm, rng.random() < 0.6, views, custom)


# ---------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------

def _load(paths):
    import importlib.util

    from attncc.spec import load_spec

    toml, gen = paths
    spec = importlib.util.spec_from_file_location(f"_attncc_d22_{Path(gen).stem}", gen)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return load_spec(toml), mod


def _view(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t`` (a leaf) as the same values in another memory layout (a differentiable view)."""
    if how == "bnhd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "rows_step":
        return torch.repeat_interleave(t, 2, dim=2)[:, :, ::2]
    if how == "padded_d":
        return torch.cat([t, torch.zeros_like(t[..., :3])], -1)[..., :t.shape[-1]]
    return t


def make_layout(case: DistCase, pattern, mod, a):
    import attncc.distributed as cp

    n, W = case.plan.Nq, case.world
    kw = dict(**a.params, **a.inputs)
    if case.layout == "custom":
        return cp.Layout(*case.custom, W)
    kind = case.layout.split(":")[-1]
    if case.layout.startswith("name:"):
        return cp.make_layout(kind, n, W, module=mod, pattern=pattern, **kw)
    extra = {"balanced1": {"chunks_per_rank": 1}, "balanced2": {"chunks_per_rank": 2}}.get(kind, {})
    kind = "balanced" if kind.startswith("balanced") else kind
    return cp.make_layout(kind, n, W, module=mod, pattern=pattern, tile=case.tile, **extra, **kw)


def run_rank(case: DistCase, paths, rank: int) -> dict:
    import attncc.distributed as cp

    pattern, mod = _load(paths)
    plan = case.plan
    a = _arguments(case)
    lay = make_layout(case, pattern, mod, a)
    named = case.layout.split(":")[-1] if case.layout.startswith("name:") else None
    if named and any(lay.local_len(r) * case.world != lay.n for r in range(case.world)):
        named = None  # a name means N / W rows each: pass the Layout instead
    leaves = [cp.shard(t.detach(), lay, rank).requires_grad_(plan.backward) for t in (a.q, a.k, a.v)]
    local = [_view(t, how) for t, how in zip(leaves, case.views)]
    extra = {} if plan.scale is None else {"scale": plan.scale}
    want_lse = case.return_lse or (plan.backward and fz.lse_in_loss(plan))
    with fz._tile_config(plan.tiles):
        try:
            out = cp.attention(*local, module=mod, pattern=pattern, layout=named or lay, comm=case.comm,
                               return_lse=want_lse, **a.params, **a.inputs, **extra)
        except (ValueError, TypeError, NotImplementedError) as e:
            return {"refused": f"{type(e).__name__}: {e}", "bounds": lay.bounds, "owner": lay.owner}
        o, lse = out if want_lse else (out, None)
        grads = None
        if plan.backward:
            g = cp.shard(a.g, lay, rank).to(o.dtype)
            loss = (o * g).sum()
            if lse is not None and fz.lse_in_loss(plan):
                w = cp.shard(torch.linspace(-1.0, 1.0, lay.n).expand(o.shape[0], o.shape[1], lay.n).unsqueeze(-1),
                             lay, rank).squeeze(-1)
                loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * w).sum()
            loss.backward()
            grads = [None if t.grad is None else t.grad.detach() for t in leaves]
    return {"o": o.detach(), "lse": None if lse is None else lse.detach(), "grads": grads,
            "bounds": lay.bounds, "owner": lay.owner}


def _arguments(case: DistCase):
    pattern_text = case.text
    draft = _DRAFTS[case.seed] if case.seed in _DRAFTS else None
    if draft is None:
        rng = random.Random(case.seed)
        _, draft = fz.random_spec(rng, avoid=AVOID)
        _DRAFTS[case.seed] = draft
    assert draft.text == pattern_text
    a = fz.call_arguments(draft, case.plan)
    # gradients of learned inputs are refused under context parallelism (docs/context-parallel.md)
    a.inputs = {n: t.detach() for n, t in a.inputs.items()}
    return a


_DRAFTS = {}


def _worker(rank, world, store, out_dir, jobs, pg_timeout):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
    for case, paths in jobs:
        start = time.perf_counter()
        try:
            res = run_rank(case, paths, rank)
        except Exception as e:  # noqa: BLE001
            res = {"failure": f"{type(e).__name__}: {str(e)[:600]}", "tb": traceback.format_exc()[-3000:]}
        res["seconds"] = time.perf_counter() - start
        with open(f"{out_dir}/{case.seed}.rank{rank}.pkl", "wb") as f:
            pickle.dump(res, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, jobs, timeout: float, pg_timeout: float = 120) -> str:
    """Every job of ``world`` in one process group; the results land in the returned folder."""
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix=f"d22w{world}_")
    ctx = mp.spawn(_worker, args=(world, f"{out}/store", out, jobs, pg_timeout), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                print(f"world {world}: TIMEOUT after {timeout} s", flush=True)
                break
    except Exception as e:  # noqa: BLE001
        print(f"world {world}: a worker died: {e}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# the checks (in the parent)
# ---------------------------------------------------------------------------------------------

def check(case: DistCase, paths, out_dir: str) -> list:
    import attncc.distributed as cp

    per_rank = []
    for r in range(case.world):
        f = Path(out_dir, f"{case.seed}.rank{r}.pkl")
        if not f.exists():
            return [f"rank {r}: no result (hang or crash)"]
        per_rank.append(pickle.loads(f.read_bytes()))
    fails = [f"rank {r}: {x['failure']}\n{x.get('tb', '')}" for r, x in enumerate(per_rank) if "failure" in x]
    if fails:
        return fails
    pattern, _ = _load(paths)
    refused = [x.get("refused") for x in per_rank]
    if any(refused):
        if not all(refused):
            return [f"only some ranks refused: {refused}"]
        if case.comm == "ulysses" and "cannot shard" in refused[0]:
            return []
        return [f"refused: {refused[0]}"]
    lay = cp.Layout(per_rank[0]["bounds"], per_rank[0]["owner"], case.world)
    a = _arguments(case)
    plan = case.plan
    ref_in = [t.detach().double().requires_grad_(plan.backward) for t in (a.q, a.k, a.v)]
    extra = {} if plan.scale is None else {"scale": plan.scale}
    ref, ref_lse = attncc.reference(pattern, *ref_in, return_lse=True, **a.params, **a.inputs, **extra)
    o = cp.unshard([x["o"] for x in per_rank], lay)
    lse = None if per_rank[0]["lse"] is None else cp.unshard([x["lse"].unsqueeze(-1) for x in per_rank], lay).squeeze(-1)
    dt = fz._DT[plan.dtype]
    problems = []
    failure = fz._compare_forward(o, lse, ref, ref_lse, dt, lambda kind, what, err, detail: f"{kind} {what} {err:.3g} {detail}")
    if failure:
        problems.append(failure)
    if plan.backward and not problems:
        loss = (ref * a.g).sum()
        if lse is not None and fz.lse_in_loss(plan):
            loss = loss + fz._lse_term(ref_lse)
        ref_grads = torch.autograd.grad(loss, ref_in, allow_unused=True)
        for i, label in enumerate(("dq", "dk", "dv")):
            got = cp.unshard([x["grads"][i] if x["grads"][i] is not None else torch.zeros_like(x["o"][..., :1])
                              for x in per_rank], lay)
            want = ref_grads[i] if ref_grads[i] is not None else torch.zeros_like(ref_in[i])
            if got.shape != want.shape:
                problems.append(f"{label} shape {tuple(got.shape)} vs {tuple(want.shape)}")
                continue
            per_entry = {"dq": plan.Nk, "dk": plan.Hq // plan.Hkv * plan.Nq, "dv": plan.Hq // plan.Hkv * plan.Nq}[label]
            err = fz._rel(got, want, terms=want.numel() * per_entry)
            if not torch.isfinite(got).all() or err > fz.GRAD_TOL[dt]:
                problems.append(f"{label} rel {err:.3g}")
    return problems


def _refused(case: DistCase, out_dir: str) -> int:
    f = Path(out_dir, f"{case.seed}.rank0.pkl")
    return int(f.exists() and "refused" in pickle.loads(f.read_bytes()))


def build(case: DistCase, folder: Path):
    name = f"d22_{case.seed}"
    from cases import build_inline

    if (folder / "gen" / f"{name}.py").exists():
        return str(folder / f"{name}.toml"), str(folder / "gen" / f"{name}.py")
    build_inline({name: case.text}, folder, prefix="_attncc_d22b")
    return str(folder / f"{name}.toml"), str(folder / "gen" / f"{name}.py")


def main(argv=None) -> int:
    ap = seed_parser(20)
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args(argv)
    seeds = seeds_of(args)
    folder = Path(tempfile.mkdtemp(prefix="d22build_"))
    cases, by_world = {}, {}
    for s in seeds:
        c = draw(s)
        try:
            paths = build(c, folder)
        except Exception as e:  # noqa: BLE001
            print(f"--- {s}: build failed {e}")
            continue
        cases[s] = (c, paths)
        by_world.setdefault(c.world, []).append((c, paths))
    fails, refused = 0, 0
    for world, jobs in sorted(by_world.items()):
        t0 = time.time()
        out = run_world(world, jobs, args.timeout)
        for c, paths in jobs:
            try:
                problems = check(c, paths, out)
            except Exception as e:  # noqa: BLE001
                problems = [f"check raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"]
            refused += _refused(c, out)
            if problems:
                fails += 1
                print(f"--- seed {c.seed}: {problems}\n{c.describe()}", flush=True)
            elif args.verbose:
                print(f"seed {c.seed} ok\n{c.describe()}")
        print(f"world {world}: {len(jobs)} cases, {time.time() - t0:.0f} s", flush=True)
    print(f"{fails} failures of {len(cases)} ({refused} refused as documented: Ulysses where the heads cannot be sharded)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
