"""Probe 18: the Gluon sm90 path through the CPU emulation, against ``attncc.reference``.

Seeded random specs of the fuzz generator (tests/fuzz_specs.py: masks with //, %, min/max/abs,
params, inputs, global rows and columns, biases, softcap, ALiBi, RoPE, mods), built as modules and
called with ``ATTNCC_BACKEND=gluon`` on the CPU: the Gluon kernels replaced by the emulation
(tests/gluon_host.py for the forward, tests/gluon_emulation.py for the backward, split or fused),
bf16 / fp16 at head dims 64 / 128 / 256, odd sizes, offsets, n_q / n_k, GQA, random tiles. The
float64 emulation is compared with the reference tightly (it is float64 but for the score's float32),
the module's outputs and gradients with the fuzz tolerances.

    python tests/probe_gluon18.py --cases 200 --start 0
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import traceback
import types
from collections import Counter
from pathlib import Path

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
import fuzz_specs as fz  # noqa: E402
from attncc.runtime import backend, call as call_mod  # noqa: E402
from attncc.runtime.gluon import launch  # noqa: E402
from cases import seed_parser, seeds_of  # noqa: E402
from gluon_emulation import emulate_sm90  # noqa: E402
from gluon_host import as_python  # noqa: E402



STUBS = {}
STATE = types.SimpleNamespace(config=None, bwd_config=None)


def install():
    os.environ["ATTNCC_BACKEND"] = "gluon"
    emulate_sm90(STUBS)
    launch.check_config = lambda config, head_dim: None
    backend.gluon_config = lambda D: STATE.config
    backend.gluon_bwd_config = lambda D: STATE.bwd_config


def random_config(rng, D):
    r = rng.random()
    if r < 0.3:  # what the module runs on a GPU
        return dataclasses.replace(launch.default_config(D, "ws"), pingpong=False)
    if r < 0.65:
        return dataclasses.replace(launch.default_config(D, "ws"), block_n=rng.choice((16, 32, 64)), pingpong=False)
    return launch.GluonConfig("pipelined", block_m=rng.choice((16, 32, 64)), block_n=rng.choice((16, 32, 64)),
                              stages=2)


def random_bwd_config(rng, D, method):
    if rng.random() < 0.25 and D in (64, 128):
        cfg = launch.default_bwd_config(D, method)
    else:
        cfg = launch.GluonBwdConfig(kv_block_n=rng.choice((64, 128)), kv_block_m=rng.choice((16, 32, 64)),
                                    kv_stages=2, q_block_m=rng.choice((64, 128)), q_block_n=rng.choice((16, 32, 64)),
                                    q_stages=2)
    if method == "fused":
        cfg = dataclasses.replace(cfg, kv_block_m=64)
    return cfg


@dataclasses.dataclass
class Outcome:
    seed: int
    status: str  # "ok", "tl" (spec stays tl), "refused" (call refused), "finding"
    detail: str = ""
    gluon: str = ""
    backward: str = ""


def probe_draft(seed):
    """probe_specs' random expressions (masks with //, %, min/max/abs, params; biases, mods) as a
    fuzz Draft (no inputs)."""
    import probe_specs

    case = probe_specs.draw_case(seed)
    params = tuple(fz.ParamPlan(n, v, "coef" if isinstance(v, float) else "glob") for n, v in case.params)
    return fz.Draft(params=params, mask=None if case.mask is None else fz.Atom(case.mask.spec),
                    bias=() if case.bias is None else (fz.Atom(case.bias.spec),),
                    mod=None if case.mod is None else fz.Atom(case.mod))


def draw(seed):
    rng = random.Random(seed)
    _, draft = fz.random_spec(rng)
    r = rng.random()
    if r < 0.3:  # the Gluon backward takes none with inputs or RoPE
        while draft.used_inputs or draft.rope is not None:
            _, draft = fz.random_spec(rng)
    elif r < 0.5:
        draft = probe_draft(seed)
    D = rng.choice((64, 64, 128, 128, 256))
    dtype = rng.choice(("bfloat16", "float16"))
    vd = draft.value_dim
    draft = dataclasses.replace(draft, head_dims=(D,), dtypes=(dtype,), value_dim=None if rng.random() < 0.9 else vd)
    if draft.rope is not None and draft.rope[2] is not None:
        draft = dataclasses.replace(draft, rope=(draft.rope[0], draft.rope[1], rng.choice((None, 32))))
    plan = fz.random_call(rng, draft)
    big = rng.random() < 0.4
    length = (lambda: rng.randint(1, 300)) if big else (lambda: rng.randint(1, 70))
    Nq = length()
    Nk = Nq if rng.random() < 0.2 else length()
    q_offset, k_offset = plan.q_offset, plan.k_offset
    r = rng.random()
    if r < 0.08:  # right below the int32 reach
        base = call_mod.INT32_REACH - max(Nq, Nk) - rng.randint(0, 300)
        q_offset, k_offset = base + rng.randint(0, 40), base + rng.randint(0, 40)
    elif r < 0.25:
        q_offset, k_offset = rng.randint(0, 400), rng.randint(0, 400)
    plan = dataclasses.replace(plan, D=D, Dv=draft.value_dim or D, dtype=dtype, decode=None, nan=None, varlen=None,
                               tiles=None, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset,
                               backward=rng.random() < 0.45)
    config = random_config(rng, D)
    method = rng.choice(("split", "fused"))
    bwd_config = random_bwd_config(rng, D, method)
    return draft, plan, config, method, bwd_config


def run_seed(seed, verbose=False) -> Outcome:
    draft, plan, config, method, bwd_config = draw(seed)
    built = fz.build_spec(draft.text)
    if isinstance(built, Exception):
        if "allows no pair" in str(built):
            return Outcome(seed, "tl", "no pair")
        return Outcome(seed, "finding", f"build: {type(built).__name__}: {built}")
    pattern, mod = built
    if mod.SPEC.gluon is None:
        return Outcome(seed, "tl", mod.SPEC.gluon_reason or "")
    STATE.config, STATE.bwd_config = config, bwd_config
    os.environ["ATTNCC_GLUON_BWD"] = method
    for s in STUBS.values():
        getattr(s, "results", getattr(s, "launches", [])).clear()
    call_mod._BOUND.clear()
    fail = lambda kind, what, err, detail: fz.Failure(kind, what, err, detail, draft, plan)  # noqa: E731
    with fz._tile_config(None):
        failure = fz._run_built(pattern, mod, draft, plan, fz.attncc.reference, fail)
    runs = STUBS["ws"].results + STUBS["pipelined"].results
    bwd_kind = ("gluon-" + method) if (STUBS["attn_bwd_dkdv"].launches or STUBS["attn_bwd_fused"].launches) else (
        "tl" if plan.backward else "")
    if failure is not None and failure.kind == "raise" and "ATTNCC_BACKEND=gluon" in failure.detail:
        return Outcome(seed, "refused", failure.detail.split("cannot run this call: ")[-1][:150], mod.SPEC.gluon)
    tight = None
    if runs:  # the float64 emulation against the reference on what the kernel read, tightly
        res = runs[0]
        a = fz.call_arguments(draft, plan)
        pat, q, k = pattern, a.q.detach(), a.k.detach()
        if pattern.rope is not None:  # the module's pre-pass rotated q and k (in their dtype)
            pat, q, k = dataclasses.replace(pattern, rope=None), res.q, res.k
        ref, ref_lse = attncc.reference(pat, q.double(), k.double(), a.v.detach().double(),
                                        return_lse=True, **a.positions, **a.params, **a.inputs,
                                        **({} if plan.scale is None else {"scale": plan.scale}))
        seen = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(res.lse), seen):
            tight = f"rows with keys differ: {int((torch.isfinite(res.lse) != seen).sum())}"
        else:
            err = float((res.out - ref).abs().max()) / max(1.0, float(ref.abs().max()))
            lerr = float((res.lse[seen] - ref_lse[seen]).abs().max()) if seen.any() else 0.0
            if err > 1e-3 or lerr > 1e-3:
                tight = f"float64 emulation: o err {err:.3g}, lse err {lerr:.3g}"
        if (failure is not None and tight is None and pattern.rope is not None and failure.what in ("o", "lse")
                and not plan.backward):
            failure = None  # the rotated copies' rounding (the tl kernels read the same copies on a GPU)
    if failure is not None or tight is not None or not runs:
        os.environ["ATTNCC_BACKEND"] = "triton"
        try:
            with fz._tile_config(None):
                tl = fz._run_built(pattern, mod, draft, plan, fz.attncc.reference, fail)
        finally:
            os.environ["ATTNCC_BACKEND"] = "gluon"
        also = "tl fails too: " + f"{tl.kind} {tl.what} {tl.error:.3g}" if tl is not None else "tl passes"
        what = str(failure) if failure is not None else (tight or "the Gluon forward did not run") + \
            f"\n  {plan.describe()}\n" + draft.text
        return Outcome(seed, "finding", f"{what}\n  tight: {tight}\n  config {config}\n  bwd {method} {bwd_config}"
                       f"\n  {also}", mod.SPEC.gluon, bwd_kind)
    return Outcome(seed, "ok", "", mod.SPEC.gluon, bwd_kind)


def main(argv=None):
    ap = seed_parser(50)
    ap.add_argument("--fragments", action="store_true", help="the fragments alone (walks, masks, emulations)")
    args = ap.parse_args(argv)
    install()
    seeds = seeds_of(args)
    if args.fragments:
        return main_fragments(seeds)
    counts, reasons = Counter(), Counter()
    t0 = time.time()
    for seed in seeds:
        try:
            out = run_seed(seed)
        except Exception as e:  # noqa: BLE001
            out = Outcome(seed, "finding", f"crash: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
        counts[out.status] += 1
        if out.status == "ok":
            counts[f"ok-{out.gluon}"] += 1
            if out.backward:
                counts[f"bwd-{out.backward}"] += 1
        if out.status in ("tl", "refused"):
            reasons[(out.status, out.detail[:90])] += 1
        if out.status == "finding":
            print(f"=== seed {seed}: {out.detail}", flush=True)
    print(f"{time.time() - t0:.0f}s", dict(counts))
    for (s, r), n in reasons.most_common(25):
        print(f"  {n:4d} {s}: {r}")


# ------------------------------------------------------------------------------------------------
# fragments alone: the rendered walks (both orientations) and masks against the tile oracle, the
# forward emulated, the backward (split and fused) emulated, for nastier random masks


def fragment_sources(seed):
    """(source, spec text) of seed: probe_specs' expression masks (//, %, min/max/abs, params, biases,
    mods), the tile oracle's band masks, or the fuzz generator's specs without inputs."""
    import probe_specs
    import tile_oracle

    rng = random.Random(seed * 31 + 5)
    r = rng.random()
    if r < 0.45:
        return "probe", probe_specs.draw_case(seed).text
    if r < 0.7:
        mask, params = (tile_oracle.random_cover_mask if rng.random() < 0.6 else tile_oracle.random_mask)(rng)
        return "oracle", tile_oracle.mask_spec(f"o{seed}", mask, params).split("\n", 1)[1]
    while True:
        _, draft = fz.random_spec(rng)
        if not draft.used_inputs:
            break
    draft = dataclasses.replace(draft, rope=None, value_dim=None, head_dims=(64,), dtypes=("float16",))
    return "fuzz", draft.text


def run_fragments(seed, folder):
    import test_gluon_rendered as tr
    from tile_oracle import Problem, random_overrides

    from attncc.analysis import analyze
    from attncc.analysis.builtin import gluon_fit
    from attncc.analysis.score import canonical_score
    from attncc.codegen import render_gluon
    from attncc.spec import SpecError, parse_spec
    from gluon_host import Fragments, load_fragments

    source, text = fragment_sources(seed)
    try:
        pat = parse_spec(f'name = "g{seed}"\n' + text)
    except SpecError as e:
        return Outcome(seed, "tl", f"spec: {str(e)[:60]}")
    except Exception as e:  # noqa: BLE001
        return Outcome(seed, "finding", f"parse crash {type(e).__name__}: {e}\n{text}")
    if pat.kind != "softmax" or any(w in text for w in ("[inputs]",)):
        return Outcome(seed, "tl", "not softmax / inputs")
    fit = gluon_fit(analyze(canonical_score(pat)))
    if fit.kind in ("dense", "causal"):  # the built-in walk and mask, a plain score: exactly the reference's
        return run_builtin(seed, pat, fit.kind, text)
    if fit.kind != "rendered":
        return Outcome(seed, "tl", f"{fit.kind}: {(fit.reason or '')[:80]}", fit.kind or "")
    src = render_gluon(pat)
    if src is None:
        return Outcome(seed, "tl", "no fragments text")
    frag = Fragments(load_fragments(src, folder, f"g{seed}"))
    if getattr(frag.module, "LISTS", False):
        return Outcome(seed, "tl", "lists (module path)", "lists")
    rng = random.Random(seed)
    checked = bwd_runs = 0
    for _ in range(3):
        Nq, Nk = rng.randint(1, 150), rng.randint(1, 150)
        q_offset = rng.choice((0, 0, rng.randint(1, 60), rng.randint(100, 5000)))
        k_offset = rng.choice((0, 0, rng.randint(1, 60), q_offset + rng.randint(-30, 30)))
        k_offset = max(0, k_offset)
        n_q = q_offset + Nq + rng.choice((0, 0, rng.randint(1, 40)))
        n_k = k_offset + Nk + rng.choice((0, 0, rng.randint(1, 40)))
        params = {**pat.param_values, **random_overrides(rng, {k: v for k, v in pat.param_values.items()
                                                               if type(v) is int})}
        shape = rng.choice([(16, 16), (32, 16), (16, 32), (64, 16), (64, 32), (128, 64), (128, 128), (64, 128)])
        problem = Problem(Nq, Nk, q_offset, k_offset, n_q, n_k, block_m=shape[0], block_n=shape[1])
        b, h = rng.randint(0, 1), rng.randint(0, 2)
        where = f"{source} seed {seed}: {problem} params {params} b {b} h {h}\n{text}"
        try:
            ok = tr.check_walk(frag, pat, problem, params, b=b, h=h)
        except AssertionError as e:
            return Outcome(seed, "finding", f"walk/mask: {str(e)[:300]}\n{where}", "rendered")
        except Exception as e:  # noqa: BLE001
            return Outcome(seed, "finding", f"walk crash {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}"
                           f"\n{where}", "rendered")
        if not ok:
            continue
        checked += 1
        Hq = pat.heads_q or rng.choice((1, 2, 3, 4))
        Hkv = pat.heads_kv or rng.choice([d for d in (1, 2) if Hq % d == 0])
        if Hq % Hkv:
            continue
        try:
            tr.check_emulation(frag, pat, params, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, n_q=n_q,
                               n_k=n_k, block_m=rng.choice((16, 32, 64)), block_n=rng.choice((16, 32)), B=b + 1,
                               Hq=Hq, Hkv=Hkv, scale=rng.choice((0.25, 0.5, 1.0)), seed=seed)
        except AssertionError as e:
            return Outcome(seed, "finding", f"forward emulation: {str(e)[:300]}\n{where}", "rendered")
        if frag.qwalk is not None:
            out = run_fragment_backward(frag, pat, params, rng, B=b + 1, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk,
                                        q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k)
            if out is not None and out.startswith("!"):
                return Outcome(seed, "finding", f"backward: {out}\n{where}", "rendered")
            bwd_runs += out is not None
    return Outcome(seed, "ok" if checked else "refused", "" if checked else "precondition", "rendered",
                   f"gluon x{bwd_runs}" if bwd_runs else "")


def run_builtin(seed, pat, kind, text):
    import test_gluon_rendered as tr

    from attncc.runtime.gluon import walks

    walk, mask = walks.PATTERNS[kind]
    frag = types.SimpleNamespace(walk=as_python(walk), mask=as_python(mask), score=None, block=None, segments=1,
                                 module=types.SimpleNamespace(PARAMS=()))
    rng = random.Random(seed)
    for _ in range(3):
        Nq, Nk = rng.randint(1, 150), rng.randint(1, 150)
        q_offset, k_offset = rng.choice((0, rng.randint(0, 100))), rng.choice((0, rng.randint(0, 100)))
        kw = dict(Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, n_q=q_offset + Nq + rng.choice((0, 7)),
                  n_k=k_offset + Nk + rng.choice((0, 5)), block_m=rng.choice((16, 32, 64)), block_n=rng.choice((16, 32)),
                  B=2, Hq=2, Hkv=1, scale=rng.choice((0.25, 1.0)), seed=seed)
        try:
            tr.check_emulation(frag, pat, dict(pat.param_values), **kw)
        except AssertionError as e:
            return Outcome(seed, "finding", f"built-in {kind}: {str(e)[:200]}\n{kw}\n{text}", kind)
    return Outcome(seed, "ok", "", kind)


def run_fragment_backward(frag, pat, params, rng, *, B, Hq, Hkv, Nq, Nk, q_offset, k_offset, n_q, n_k):
    """The Gluon backward of the fragments (kernels emulated) against the reference's gradients; None
    when the call breaks the backward's precondition, "!..." on a mismatch."""
    call = types.SimpleNamespace(params=params, q_offset=q_offset, k_offset=k_offset, Nq=Nq, Nk=Nk, n_q=n_q, n_k=n_k)
    if not (frag.module.exact(call) and frag.module.backward_exact(call)):
        return None
    method = rng.choice(("split", "fused"))
    D = rng.choice((64, 128))
    cfg = random_bwd_config(rng, D, method)
    dtype = rng.choice((torch.float16, torch.bfloat16))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k, v = (torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype) for _ in range(2))
    do = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    dlse = torch.randn(B, Hq, Nq, generator=gen) if rng.random() < 0.5 else None
    scale = rng.choice((None, 0.05, 0.3))
    pos = dict(q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k, scale=scale)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, lse = attncc.reference(pat, *leaves, return_lse=True, **pos, **params)
    outs, cots = [o], [do.double()]
    if dlse is not None:
        outs.append(torch.where(lse.isinf(), 0.0, lse))
        cots.append(dlse.double())
    if not o.requires_grad:
        return None
    want = torch.autograd.grad(outs, leaves, cots, allow_unused=True, materialize_grads=True)
    got = launch.attention_backward(
        q, k, v, o.detach().to(dtype), lse.detach().float(), do, dlse, **pos, config=cfg,
        walk=frag.module.walk, qwalk=frag.module.qwalk, mask=frag.module.mask, qmask=frag.module.qmask,
        score=frag.module.score, score_grad=frag.module.score_grad, segments=frag.module.SEGMENTS,
        qsegments=frag.module.QSEGMENTS, pattern_args=frag.module.pattern_args(call), method=method)
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    for label, g, w in zip(("dq", "dk", "dv"), got, want):
        if torch.isnan(g).any():
            return f"!{label} NaN ({method}, {cfg}, D {D}, {dtype})"
        floor = 1e-2 * math.sqrt(w.numel())
        err = float((g.double() - w).norm() / max(float(w.norm()), floor))
        if err > tol:
            return f"!{label} rel {err:.3g} > {tol} ({method}, {cfg}, D {D}, {dtype}, scale {scale}, dlse {dlse is not None})"
    return method


def main_fragments(seeds):
    import tempfile
    counts, reasons = Counter(), Counter()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            try:
                out = run_fragments(seed, Path(folder))
            except Exception as e:  # noqa: BLE001
                out = Outcome(seed, "finding", f"crash: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            counts[out.status] += 1
            if out.backward:
                counts["bwd"] += 1
            if out.status in ("tl", "refused"):
                reasons[(out.status, out.detail[:80])] += 1
            if out.status == "finding":
                print(f"=== {out.detail}", flush=True)
    print(f"{time.time() - t0:.0f}s", dict(counts))
    for (s, r), n in reasons.most_common(25):
        print(f"  {n:4d} {s}: {r}")


if __name__ == "__main__":
    main()
