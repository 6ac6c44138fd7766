"""Shared test data: small params that make each spec's mask interesting at small lengths,
inputs for data-dependent specs, and the tolerance per dtype (written once)."""
from __future__ import annotations

import glob
import importlib
from pathlib import Path

import pytest
import torch

import attncc
from attncc.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC_FILES = sorted(glob.glob(str(ROOT / "specs" / "*.toml")))
SPEC_NAMES = [Path(f).stem for f in SPEC_FILES]
# Specs with dropout are random by default: tests/test_dropout.py checks them against the reference.
SOFTMAX = [n for n in SPEC_NAMES if load_spec(ROOT / "specs" / f"{n}.toml").kind == "softmax"
           and not load_spec(ROOT / "specs" / f"{n}.toml").dropout]



def share(values, part: int, of: int):
    """``values`` as pytest params, those but every ``of``-th from ``part`` marked slow: sweeps of one
    file over the same values (the specs) with different ``part`` run one value each by default,
    so that every value still runs once without ``-m slow`` (CI's time), and all of them with it."""
    return [pytest.param(v, marks=() if k % of == part else pytest.mark.slow) for k, v in enumerate(values)]


def turns(names, variants: dict):
    """(name, variant) pytest params for every name and every variant (``{label: value}``): by default
    each name with one variant, the variants in turn over the names (each on some of them), the other
    pairs marked slow."""
    return [pytest.param(name, value, id=f"{name}-{label}", marks=() if (k + v) % len(variants) == 0 else pytest.mark.slow)
            for k, name in enumerate(names) for v, (label, value) in enumerate(variants.items())]


def stream_parts(count: int, default: int):
    """A seeded stream of ``count`` cases drawn one after another from one generator, as pytest params
    ``range(start, stop)``: the first ``default`` cases run by default, the rest only with ``-m
    slow``. A test draws every case before ``stop`` (the stream stays the one ``count`` cases draw)
    and checks those from ``start`` on."""
    parts = [pytest.param(range(0, min(default, count)), id=f"0-{min(default, count)}")]
    if default < count:
        parts.append(pytest.param(range(default, count), id=f"{default}-{count}", marks=pytest.mark.slow))
    return parts


SMALL_PARAMS = {
    "sliding_window": {"window": 13},
    "local_bidirectional": {"w": 9},
    "dilated": {"window": 30, "dilation": 3},
    "longformer": {"g": 5, "w": 7},
    "strided": {"stride": 6},
    "prefix_lm": {"prefix": 11},
    "chunked_local": {"chunk": 13},
    "sink_window": {"sinks": 3, "window": 9},
    "neighborhood_2d": {"width": 7, "radius": 1},
    "block_diagonal": {"chunk": 11},
}

# ||o - ref|| / ||ref|| bounds by input dtype
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def pattern(name):
    return load_spec(ROOT / "specs" / f"{name}.toml")


def module(name):
    return importlib.import_module(f"generated.{name}")


def heads_for(p, default_q=4, default_kv=2):
    hq = p.heads_q or (default_q if p.heads_kv is None else max(default_q, p.heads_kv * 2))
    hkv = p.heads_kv or (default_kv if hq % default_kv == 0 else 1)
    return hq, hkv


def inputs_for(p, B, Hq, n, gen):
    """Random inputs for a spec's [inputs]: documents (some of length 1), padding lengths, tables."""
    out = {}
    for d in p.inputs:
        if d.name == "doc" or d.dims == ("b", "n"):
            lengths = []
            rows = []
            for _ in range(B):
                ids, doc, pos = [], 0, 0
                while pos < n:
                    size = int(torch.randint(1, 12, (1,), generator=gen)) if torch.rand(1, generator=gen) < 0.8 else 1
                    ids += [doc] * size
                    pos += size
                    doc += 1
                rows.append(ids[:n])
            out[d.name] = torch.tensor(rows, dtype=torch.int32)
        elif d.dims == ("b",):
            out[d.name] = torch.randint(0, n + 1, (B,), generator=gen, dtype=torch.int32)
        else:
            shape = [{"b": B, "h": Hq, "n": n}.get(x, x) for x in d.dims]
            out[d.name] = torch.randn(*shape, generator=gen)
    return out


def one_grid_at_a_time(monkeypatch):
    """Threads that call kernels at once under Triton's interpreter: it runs one grid at a time (its
    program ids are global); the runtime's host code still runs concurrently."""
    import threading

    import triton.runtime.interpreter as interpreter

    lock, grid_call = threading.Lock(), interpreter.GridExecutor.__call__

    def serialized(self, *args, **kwargs):
        with lock:
            return grid_call(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", serialized)


def rel_err(o, ref):
    o, ref = o.double(), ref.double()
    return float((o - ref).norm() / ref.norm().clamp_min(1e-30))


def build_inline(texts, out: Path, prefix: str = "_attncc_test"):
    """Build spec texts ``{name: toml}`` into ``out`` and import them: ``{name: (pattern, module)}``."""
    import importlib.util

    from attncc.codegen import build

    mods = {}
    for name, text in texts.items():
        path = out / f"{name}.toml"
        path.write_text(text)
        (written,) = build([path], out / "gen")
        spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", written)
        mods[name] = (load_spec(path), importlib.util.module_from_spec(spec))
        spec.loader.exec_module(mods[name][1])
    return mods


VJP_TOL = {torch.float32: 1e-3, torch.float16: 2e-2}


def vjp_case(name, *, B=1, Nq=37, Nk=None, D=16, dtype=torch.float32, q_offset=0, k_offset=0, n_q=None, n_k=None,
             seed=0, p=None, mod=None, kw=None, use_o=True, tol=None, lse_cotangent=None):
    """dq, dk, dv (and the grad inputs' gradients) of ``(o, lse)`` with random cotangents ``(g, gl)``:
    the kernels against autograd of the float64 reference. Every row's LSE gets a cotangent, rows
    without an allowed key (lse = -inf) included: their gradients must be 0, never NaN."""
    p = p or pattern(name)
    mod = mod or module(name)
    Nk = Nq if Nk is None else Nk
    Hq, Hkv = heads_for(p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    g = torch.randn(B, Hq, Nq, D, generator=gen)
    gl = torch.randn(B, Hq, Nq, generator=gen) if lse_cotangent is None else lse_cotangent
    n = max(q_offset + Nq, k_offset + Nk, n_q or 0, n_k or 0)
    if kw is None:
        kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, n, gen))
    learned = [d.name for d in p.inputs if d.grad]
    pos = dict(q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k)

    def grads(fn, cast):
        leaves = [cast(t).detach().clone().requires_grad_() for t in (q, k, v)]
        inputs = {name: cast(t).detach().clone().requires_grad_() if name in learned else t for name, t in kw.items()}
        o, lse = fn(*leaves, return_lse=True, **pos, **inputs)
        outs, cots = ([o, lse], [cast(g), cast(gl)]) if use_o else ([lse], [cast(gl)])
        wrt = leaves + [inputs[name] for name in learned]
        return o.detach(), lse.detach(), torch.autograd.grad(outs, wrt, cots, allow_unused=True, materialize_grads=True)

    o, lse, got = grads(mod.attention, lambda t: t.to(dtype) if t.is_floating_point() else t)
    o_ref, lse_ref, want = grads(lambda *a, **k: attncc.reference(p, *a, **k), lambda t: t.double())
    tol = tol or VJP_TOL[dtype]
    assert rel_err(o, o_ref) < tol
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], lse_ref[finite]) < tol
    for label, x, r in zip(["q", "k", "v"] + learned, got, want):
        assert torch.isfinite(x).all(), f"d{label} has NaN/inf"
        assert rel_err(x, r) < tol, (label, rel_err(x, r))
    return lse, got


def flex_softmax(s, vd):
    """FlexAttention's output for float64 scores ``s`` [B, H, Nq, Nk] whose masked pairs are -inf, and
    values ``vd`` [B, H, Nk, Dv]: (softmax(s) @ v, logsumexp(s)), a row without an allowed key giving
    o = 0 and lse = -inf (the Flex oracles of the gym / Flex / porting probes)."""
    empty = (s == float("-inf")).all(-1)
    s0 = torch.where(empty[..., None], torch.zeros_like(s), s)
    p = torch.where(empty[..., None] | (s == float("-inf")), 0.0, torch.softmax(s0, -1))
    return p @ vd, torch.where(empty, float("-inf"), torch.logsumexp(s0, -1))


def seed_parser(cases: int = 20, description=None):
    """The command line of a seeded probe (tests/probe_*.py): ``--cases`` seeds from ``--start``, or
    ``--seed`` alone, and ``--verbose``; :func:`seeds_of` reads the seeds back. Probes add their own
    arguments to the parser."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--cases", type=int, default=cases)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--verbose", action="store_true")
    return ap


def seeds_of(args) -> list:
    """The seeds :func:`seed_parser`'s arguments ask for."""
    return [args.seed] if args.seed is not None else list(range(args.start, args.start + args.cases))


def drawn_spec_main(argv, draw_case, check_seed, description=None, stats=None, refusal=None) -> int:
    """The command line of a probe that draws a spec per seed (tests/probe_specs.py, probe_sem19.py,
    probe_spec23.py): :func:`seed_parser`'s seeds (one by default) and ``--no-kernels`` (the reference
    only); ``--verbose`` prints each drawn case (``draw_case(seed)``: ``describe()`` and ``text``).
    ``check_seed(seed, kernels=...)`` returns a failure's text or None. ``stats``: counts printed at the
    end; ``refusal(seed)``: with ``--refusals``, print the seed's refusal instead of checking it."""
    import time

    ap = seed_parser(1, description)
    ap.add_argument("--no-kernels", action="store_true")
    if refusal is not None:
        ap.add_argument("--refusals", action="store_true", help="print every refusal")
    args = ap.parse_args(argv)
    seeds = seeds_of(args)
    start, failures = time.time(), 0
    for seed in seeds:
        if args.verbose:
            case = draw_case(seed)
            print(case.describe())
            print(case.text)
        if refusal is not None and args.refusals:
            refusal(seed)
            continue
        failure = check_seed(seed, kernels=not args.no_kernels)
        if failure:
            failures += 1
            print(failure, flush=True)
        elif args.verbose:
            print(f"seed {seed}: ok")
    for what, n in sorted((stats or {}).items()):
        print(f"  {n:5d} {what}")
    print(f"{failures} of {len(seeds)} cases failed ({time.time() - start:.0f} s)")
    return 1 if failures else 0


def run_seeds(cases, run, verbose=False, describe=lambda case: "") -> int:
    """The command line of a seeded probe (tests/probe_*.py): ``run(case)`` -> (problems, description) for
    each of ``cases`` (a seed, or a (spec, seed) pair), an exception counted as a problem; prints each
    failing case (``describe(case)`` adds its text) and the count. Returns the number of failures."""
    import traceback

    fails = total = 0
    for case in cases:
        total += 1
        try:
            problems, desc = run(case)
        except Exception as e:  # noqa: BLE001
            problems, desc = [f"raised {type(e).__name__}: {str(e)[:400]}"], {}
            if verbose:
                traceback.print_exc()
        if problems:
            fails += 1
            print(f"--- {case}: {problems}\n{describe(case)}    {desc}", flush=True)
        elif verbose:
            print(f"{case} ok")
    print(f"{fails} failures of {total}")
    return fails


def flex_operands(seed, B, Bkv, Hq, Hkv, Nq, Nk, D, Dv):
    """Seeded float32 q [B, Hq, Nq, D], k, v [Bkv, Hkv, Nk, D / Dv] and the cotangents of o and the
    LSE (go, gl) of the Flex-oracle checks (tests/test_probe_flex19.py, test_probe_port20.py)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k = torch.randn(Bkv, Hkv, Nk, D, generator=gen)
    v = torch.randn(Bkv, Hkv, Nk, Dv, generator=gen)
    go = torch.randn(B, Hq, Nq, Dv, generator=gen)
    gl = torch.randn(B, Hq, Nq, generator=gen)
    return q, k, v, go, gl
