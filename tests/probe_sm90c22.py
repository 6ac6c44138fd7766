"""Probe sm90c22: seeded random specs and calls whose argument values trigger what Triton specializes on
a GPU and never under the interpreter, every launch the host code makes compiled for sm90.

On a GPU, Triton's ``JITFunction.run`` turns an int argument equal to 1 into a constexpr (no ``.to()``,
no loop-carried type), None arguments into constexprs, and marks ints divisible by 16 and 16-byte
aligned pointers; the interpreter (what CI runs) does none of it. The calls here draw those values:
one head (Hq = Hkv = 1), one batch row, B * H = 1, Nq / Nk in {1, 16, 17, 32, ...}, offsets and
n_q / n_k equal to 1 or 16, int params set to 0, 1 or 16, a float param or ``scale`` passed as the int 1,
packed sequences of length 1 (max_seqlen 1), decode of one row, one key, one page, k / v of batch 1;
head dims 16 / 64 / 128 (and odd ones), Dv != D, GQA, return_lse, learned tables and inputs, float32 /
float16 / bfloat16. Specs: tests/probe_combo21.py's feature combinations (at those head dims), and the
shipped specs (specs/*.toml) at head dims 64 / 128, whose Gluon forward and backward are forced
(``ATTNCC_BACKEND=gluon``, a CPU tensor standing in for an sm90 GPU) where the call allows.

Two modes, each its own process:

- ``--record``: TRITON_INTERPRET off (the kernels are JITFunctions), the calls run with their
  launches recorded (tests/kernel_compile.py) with the GPU's tile configs, and every launch not seen
  before (kernel source + Triton's specialization, cached in ``--cache``) is compiled for sm90 to PTX
  (to the cubin where attncc wrote inline assembly); a host error, a compile error or shared memory past
  an sm90 CTA's is a failure.
- ``--interp``: the same calls under the interpreter against attncc.reference (forward, LSE, backward;
  tests/probe_combo21.py's comparisons).

``--special``: the cases are special_case(i) instead, the shipped specs each with SPECIAL_CALLS (one query
row at offset 16 under GQA, packed rows of one, decode of one row from one page); ``--stage`` ttir / ttgir
stops every compile there; ``--cache FILE`` keeps the compiled launches' keys across runs.

    python tests/probe_sm90c22.py --record --cases 40 --start 0 --cache /tmp/sm90.json
    python tests/probe_sm90c22.py --interp --cases 40 --start 0
    python tests/probe_sm90c22.py --record --special --cases 72 --stage ttgir
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional

RECORD = "--record" in sys.argv
SPECIAL = "--special" in sys.argv  # the cases are special_case(i), not random ones
# probe_combo21 sets TRITON_INTERPRET=1 unless it is set: "0" keeps it off (Triton's and attncc's reading)
os.environ.setdefault("TRITON_INTERPRET", "0" if RECORD else "1")
if RECORD:  # the plain launch, which the recording replaces (the fast one calls a compiled kernel on a CUDA device)
    os.environ["ATTNCC_FAST_LAUNCH"] = "0"
_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent
for _p in (str(_HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import attncc  # noqa: E402
import probe_combo21 as combo  # noqa: E402
from cases import SMALL_PARAMS  # noqa: E402

SHIPPED = sorted(p.stem for p in (ROOT / "specs").glob("*.toml")
                 if "kind = \"linear\"" not in p.read_text() and p.stem not in ("performer",))
SPECIAL_N = (1, 1, 2, 16, 16, 17, 32, 33)


def shipped_case(name: str, D: int) -> combo.Case:
    """A shipped spec as a probe_combo21 Case: its params at tests/cases.py's small values, its inputs
    by kind (int [b, n]: document ids, int [b]: lengths, [h] floats: slopes)."""
    text = (ROOT / "specs" / f"{name}.toml").read_text()
    p = attncc.parse_spec(text)
    inputs = []
    for d in p.inputs:
        kind = ("doc" if d.dtype.startswith("int") and d.dims == ("b", "n") else
                "len" if d.dtype.startswith("int") else "slope" if d.dims == ("h",) else "float")
        inputs.append(combo.Inp(d.name, tuple(d.dims), d.dtype, d.grad, kind))
    params = {x.name: x.value for x in p.params if not x.hidden}
    params.update(SMALL_PARAMS.get(name, {}))
    mask_inputs = any(d.dtype.startswith("int") for d in p.inputs)
    return combo.Case(text, inputs, mask_inputs, D, D, (p.heads_q, p.heads_kv), params)


def random_case(seed: int) -> combo.Case:
    rng = random.Random(seed * 31 + 7)
    if rng.random() < 0.35:
        return shipped_case(rng.choice(SHIPPED), rng.choice((64, 128, 128, 16)))
    case = combo.random_case(seed)
    D = rng.choice((16, 16, 64, 128, 17, 32))
    rope_dim = "rotary_dim" in case.text
    if D % 2 and "[rope]" in case.text and not rope_dim:
        D += 1
    Dv = D if case.value_dim == case.head_dim else rng.choice((case.value_dim, 16, 64))
    lines = case.text.split("\n")
    lines = [f"head_dim = {D}" if x.startswith("head_dim") else
             (f"value_dim = {Dv}" if x.startswith("value_dim") else x) for x in lines]
    return combo.Case("\n".join(lines), case.inputs, case.mask_inputs, D, Dv, case.heads, case.params)


def draw_call(seed: int, case: combo.Case):
    """A call of ``case`` (probe_combo21's keys) whose sizes and values trigger GPU specializations."""
    rng = random.Random(seed * 13 + 1)
    call = combo.draw_call(seed, case)
    if call["mode"] == "decode" and any(d.name == "kv_len" for d in case.inputs):
        call["mode"] = "attention"  # (padding's input is decode's own kv_len)
    hq_fixed, hkv_fixed = case.heads
    Hkv = hkv_fixed or rng.choice((1, 1, 1, 2))
    Hq = hq_fixed or Hkv * rng.choice((1, 1, 2, 16 // Hkv))
    mode = call["mode"]
    call.update(Hq=Hq, Hkv=Hkv, tiles=None, dtype=rng.choice(("float32", "float16", "bfloat16", "bfloat16")))
    call["backward"] = mode != "decode" and rng.random() < (0.85 if case.head_dim < 64 else 0.6)
    ints = [k for k, v in case.params.items() if isinstance(v, int) and not isinstance(v, bool)]
    floats = [k for k, v in case.params.items() if isinstance(v, float)]
    over = {}
    for k in ints:
        if rng.random() < 0.5:
            over[k] = rng.choice((1, 1, 16, 0))
    for k in floats:
        if rng.random() < 0.3:
            over[k] = 1  # an int for a float param: a constexpr on a GPU
    call["overrides"] = over
    call["scale"] = rng.choice((None, None, 1, 0.25))
    if mode == "attention":
        call.update(B=rng.choice((1, 1, 2)), Nq=rng.choice(SPECIAL_N), Nk=rng.choice(SPECIAL_N),
                    q_offset=rng.choice((0, 0, 1, 16, 17)), k_offset=rng.choice((0, 0, 1, 16)))
        call["kv_b1"] = call["B"] > 1 and rng.random() < 0.4
        n_q = rng.choice((None, None, 1, 16, 17))
        call["n_extra"] = None
        if n_q is not None:  # n_q = n_k = max(end, n_q): 1 or 16 where the call's ends allow
            end = max(call["q_offset"] + call["Nq"], call["k_offset"] + call["Nk"])
            call["n_extra"] = max(n_q - end, 0) if n_q >= end else None
            if call["n_extra"] is not None and call["q_offset"] + call["Nq"] != call["k_offset"] + call["Nk"]:
                call["n_extra"] = None  # combo's n_q / n_k differ by the ends: leave them out
    elif mode == "packed":
        S = rng.choice((1, 1, 2, 3))
        lq = [rng.choice((1, 1, 16, 17, 0)) for _ in range(S)]
        lk = lq if rng.random() < 0.5 else [rng.choice((1, 16, 17, 0)) for _ in range(S)]
        if not any(lq) or not any(lk):
            lq, lk = [1] + lq[1:], [1] + lk[1:]
        call.update(lens=(tuple(lq), tuple(lk)), pad=(rng.choice((0, 0, 15)), rng.choice((0, 0, 16))),
                    max_given=rng.random() < 0.6)
        call["Nq"], call["Nk"] = sum(lq) + call["pad"][0], sum(lk) + call["pad"][1]
    else:
        B = rng.choice((1, 1, 2))
        Nq = rng.choice((1, 1, 1, 2, 16))
        page = rng.choice((0, 0, 16, 32))
        cap = rng.choice((max(Nq, 1), 16, 17, 32)) if not page else page * rng.choice((1, 2))
        cap = max(cap, Nq)
        lens = [rng.choice((cap, 1, Nq, 16 if cap >= 16 else cap)) for _ in range(B)]
        call.update(B=B, Nq=Nq, Nk=cap, page=page, kv_lens=[max(x, 0) for x in lens])
    return call


# ---------------------------------------------------------------------------------------------
# --record: launches compiled for sm90
# ---------------------------------------------------------------------------------------------


class Compiler:
    """Compiles the launches recorded by a case for sm90, once per Launch.key (kept in ``cache``
    across runs: the key's hash -> the error, or None)."""

    def __init__(self, cache: Optional[Path], stage: str = "ptx"):
        self.cache, self.stage = cache, stage
        self.seen = json.loads(cache.read_text()) if cache and cache.exists() else {}
        self.compiled = 0
        self.lowered = set()

    def last_stage(self, launch, lowered):
        """Triton's front end, TTIR and TTGIR for every launch (where a specialization's types,
        constants and layouts fail); the lowering to PTX (``lowered``) once per kernel source, tile
        config and 16-bit operand dtype (tests/test_sm90_compile.py's plan; float32 pipelines take
        minutes to lower on 2 cores)."""
        pointers = [kind for _, kind in launch.signature if isinstance(kind, str) and kind.startswith("*")]
        shape = (launch.source_hash, launch.options, tuple(pointers[:1]), tuple(
            (p.name, launch.constexpr(p.name)) for p in launch.fn.params
            if p.is_constexpr and type(launch.constexpr(p.name)) in (int, str)))
        if self.stage != "ptx":
            return self.stage
        if shape in self.lowered or pointers[:1] == ["*fp32"]:
            return "ttgir"
        self.lowered.add(shape)
        return lowered

    def __call__(self, launches):
        import hashlib

        from kernel_compile import compile_launch
        from test_sm90_compile import LABEL, SM90_SHARED, _last_stage

        errors = []
        for launch in launches:
            key = hashlib.sha256(repr(launch.key).encode()).hexdigest()
            if key not in self.seen:
                try:
                    compiled = compile_launch(launch, self.last_stage(launch, _last_stage))
                    shared = compiled.metadata.get("shared", 0)
                    error = (f"needs {shared} bytes of shared memory, an sm90 CTA has {SM90_SHARED}"
                             if shared > SM90_SHARED else None)
                except Exception as e:  # noqa: BLE001 - Triton's error, as it reports it
                    error = f"{type(e).__name__}: {str(e)[-1500:]}"
                self.seen[key] = error and f"{launch.label(*LABEL)}: {error}"
                self.compiled += 1
                if self.cache:
                    self.cache.write_text(json.dumps(self.seen))
            if self.seen[key]:
                errors.append(self.seen[key])
        return errors


def _gluon_stand_ins():
    """A CPU tensor counts as one on an sm90 GPU for the Gluon path (tests/test_gluon_wiring.py)."""
    import types

    from attncc.runtime import backend
    from attncc.runtime.gluon import launch

    backend.device_problem = lambda device: None
    launch.check_devices = lambda q, k, v: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)


def record_case(seed: int, compiler: Compiler, gluon: bool):
    """(problems, description): the case's call run as on a GPU, launches recorded and compiled."""
    from kernel_compile import recorded_launches

    if seed % LINEAR_EVERY == LINEAR_EVERY - 1 and not SPECIAL:
        with recorded_launches() as launches:
            problems, desc = run_linear(seed, compare=False)
        return compiler(launches), dict(desc, launches=sorted({x.name for x in launches}))
    case, call = case_and_call(seed)
    backend = "gluon" if gluon and _gluon_may(case, call) else "triton"
    desc = dict(call, backend=backend)
    combo.compare_forward = lambda *a, **k: []  # outputs are torch.empty's: nothing to compare
    combo.compare_backward = lambda *a, **k: _touch_grads(*a)
    os.environ["ATTNCC_BACKEND"] = backend
    os.environ["ATTNCC_GLUON_BWD"] = random.Random(seed).choice(("split", "fused"))
    try:
        with recorded_launches() as launches:
            try:
                _run_call(seed, case, call)
            except ValueError as e:
                if backend != "gluon" or "ATTNCC_BACKEND=gluon" not in str(e):
                    raise
                desc["backend"] = "triton (gluon refused)"
                os.environ["ATTNCC_BACKEND"] = "triton"
                _run_call(seed, case, call)
    finally:
        os.environ.pop("ATTNCC_BACKEND", None)
    desc["launches"] = sorted({x.name for x in launches})
    return compiler(launches), desc


def _touch_grads(o, lse, ro, rlse, leaves, rleaves, in_leaves, rin_leaves, call, gen, dt):
    """The backward of the call's loss (its launches), nothing compared."""
    names = [n for n, t in in_leaves.items() if t.requires_grad]
    loss = o.float().sum() + (lse.masked_fill(~torch.isfinite(lse), 0).sum() if call["lse_loss"] else 0)
    torch.autograd.grad(loss, leaves + [in_leaves[n] for n in names], allow_unused=True)
    return []


def _gluon_may(case, call) -> bool:
    return (call["dtype"] != "float32" and case.head_dim in (64, 128) and case.value_dim == case.head_dim
            and call["mode"] == "attention")


def _run_call(seed, case, call):
    saved = os.environ.get("ATTNCC_DECODE_SPLITS")
    try:
        if call["splits"]:
            os.environ["ATTNCC_DECODE_SPLITS"] = call["splits"]
        with combo._tile_config(call["tiles"]):
            return _refusals(combo._run, seed, case, call)
    finally:
        os.environ.pop("ATTNCC_DECODE_SPLITS", None)
        if saved is not None:
            os.environ["ATTNCC_DECODE_SPLITS"] = saved


# The argument checks' refusals of what a drawn call may break (a param of 0 where the mask needs a
# positive one, a document input refusing cu_seqlens): the same on a GPU, not this probe's subject.
REFUSALS = ("must be", "cu_seqlens", "expected", "at least", "positive", ">= 1", "> 0", "division by zero",
            "is not available")


def _refusals(run, seed, case, call):
    try:
        return run(seed, case, call)
    except (ValueError, NotImplementedError) as e:
        if any(x in str(e) for x in REFUSALS):
            return [], {"refused": str(e)[:200]}
        raise


LINEAR_EVERY = 10  # seeds 9, 19, ...: linear attention
GPU_TILES = ((64, 64), (64, 64), (128, 32))  # forward, dK/dV, dQ at short keys, head dims <= 128
LINEAR = ("linear_elu", "linear_taylor", "performer")
LINEAR_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def linear_call(seed: int):
    """(spec name, call) of a linear-attention case: one head or batch row, N of 1, 16, 17."""
    rng = random.Random(seed * 17 + 3)
    name = rng.choice(LINEAR)
    Hkv = rng.choice((1, 1, 2))
    return name, dict(B=rng.choice((1, 1, 2)), Hq=Hkv * rng.choice((1, 2)), Hkv=Hkv, N=rng.choice((1, 16, 17, 2)),
                      D=16 if name == "linear_taylor" else rng.choice((16, 64, 17)),
                      dtype=rng.choice(("float32", "bfloat16", "float16")), state=rng.random() < 0.5,
                      q_offset=rng.choice((0, 1, 16)))


def run_linear(seed: int, compare: bool):
    """A linear case's forward (with a state or not), its backward and two steps; ``compare``: o, the
    state and dq, dk, dv against attncc.reference (the state's call as two halves)."""
    name, c = linear_call(seed)
    text = (ROOT / "specs" / f"{name}.toml").read_text()
    p, m = combo.compiled(text)
    gen = torch.Generator().manual_seed(seed)
    dt = combo.DT[c["dtype"]]
    B, Hq, Hkv, N, D = (c[x] for x in ("B", "Hq", "Hkv", "N", "D"))
    leaves = [torch.randn(B, h, N, D, generator=gen).to(dt).float().requires_grad_() for h in (Hq, Hkv, Hkv)]
    q, k, v = (t.to(dt) for t in leaves)
    kw = dict(q_offset=c["q_offset"], k_offset=c["q_offset"])
    if c["state"]:
        o, state = m.attention(q, k, v, return_state=True, **kw)
        loss = o.float().sum() + sum(x.float().sum() for x in state)
    else:
        o = m.attention(q, k, v, **kw)
        loss = o.float().sum()
    grads = torch.autograd.grad(loss, leaves)
    with torch.no_grad():
        _, st = m.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], position=c["q_offset"])
        m.step(q[:, :, -1], k[:, :, -1], v[:, :, -1], st, position=c["q_offset"] + 1)
    if not compare:
        return [], c
    rleaves = [t.detach().double().requires_grad_() for t in leaves]
    ro = attncc.reference(p, *rleaves, **kw)
    rgrads = torch.autograd.grad(ro.sum(), rleaves) if not c["state"] else None
    problems = []
    err = combo._rel(o, ro.detach())
    if err > LINEAR_TOL[dt]:
        problems.append(f"o rel {err:.3g}")
    for label, x, r in zip("qkv", grads, rgrads or ()):
        e = float((x.double() - r).norm()) / max(float(r.norm()), 1e-3 * r.numel() ** 0.5)
        if e > 3 * LINEAR_TOL[dt]:
            problems.append(f"d{label} rel {e:.3g}")
    return problems, c


SPECIAL_CALLS = (  # one query row (an Nq of 1) at offset 16 under GQA; packed sequences of one row (max_seqlen 1);
    # decode of one row from one page per sequence
    dict(mode="attention", B=1, Hq=2, Hkv=1, Nq=1, Nk=17, q_offset=16, k_offset=0, n_extra=None, kv_b1=False,
         dtype="bfloat16", backward=True, lse_loss=True),
    dict(mode="packed", B=1, Hq=1, Hkv=1, lens=((1,), (1,)), pad=(0, 0), max_given=True, Nq=1, Nk=1,
         dtype="float16", backward=True, lse_loss=False),
    dict(mode="decode", B=1, Hq=1, Hkv=1, Nq=1, Nk=16, page=16, kv_lens=[1], dtype="bfloat16", backward=False,
         lse_loss=False),
)


def special_case(index: int):
    """(case, call) number ``index``: a shipped spec at head dim 64 (Dv 64) and one of SPECIAL_CALLS."""
    name = SHIPPED[index // len(SPECIAL_CALLS) % len(SHIPPED)]
    case = shipped_case(name, 64)
    call = dict(SPECIAL_CALLS[index % len(SPECIAL_CALLS)], D=64, Dv=64, layouts=("contiguous",) * 3,
                overrides={}, scale=None, tiles=None, splits=None)
    if case.heads[1]:
        call.update(Hkv=case.heads[1], Hq=case.heads[0] or case.heads[1])
    if call["mode"] == "decode" and any(d.name == "kv_len" for d in case.inputs):
        call.update(SPECIAL_CALLS[0])  # (padding's input is decode's own kv_len)
    return case, call


def case_and_call(seed: int):
    """(case, call) of ``seed``: special_case(seed) with --special, else a random one."""
    return special_case(seed) if SPECIAL else (random_case(seed), draw_call(seed, random_case(seed)))


def interp_case(seed: int):
    if seed % LINEAR_EVERY == LINEAR_EVERY - 1 and not SPECIAL:
        return run_linear(seed, compare=True)
    case, call = case_and_call(seed)
    if "dropout" in case.text:  # random weights: the reference has none (the record mode compiles them)
        return [], {"skipped": "dropout"}
    if seed % 2:  # the GPU's built-in tiles at short keys (attncc.runtime.configs), under the interpreter
        call["tiles"] = GPU_TILES
    problems, desc = _run_call(seed, case, call)
    return problems, dict(desc, **{k: call[k] for k in ("mode", "Hq", "Hkv", "dtype", "Nq", "Nk")})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--interp", action="store_true")
    ap.add_argument("--special", action="store_true")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--seeds", help="comma-separated seeds (special calls' indices with --special)")
    ap.add_argument("--stage", default="ptx", choices=("ttir", "ttgir", "ptx"),
                    help="how far each launch compiles (ptx: once per kernel source, tile config and 16-bit dtype; "
                         "ttgir for the others)")
    ap.add_argument("--cache", help="a JSON file of the launches compiled before (their keys' hashes)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    seeds = ([a.seed] if a.seed is not None else [int(x) for x in a.seeds.split(",")] if a.seeds
             else range(a.start, a.start + a.cases))
    describe = lambda seed: "{}\n    call: {}".format(case_and_call(seed)[0].text, case_and_call(seed)[1])  # noqa: E731
    if a.record:
        import attncc.runtime.call
        import attncc.runtime.decode
        from test_sm90_compile import _interpreting

        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        attncc.runtime.call._bind_checked = _interpreting(attncc.runtime.call._bind_checked)
        attncc.runtime.decode.bind_decode = _interpreting(attncc.runtime.decode.bind_decode)
        # (and a backward's second look at the device: Call.check_device)
        attncc.runtime.call.Call.check_device = _interpreting(attncc.runtime.call.Call.check_device)
        _gluon_stand_ins()
        compiler = Compiler(a.cache and Path(a.cache), a.stage)
        fails = combo.run_seeds(seeds, lambda s: record_case(s, compiler, gluon=True), a.verbose, describe)
        print(f"{compiler.compiled} launches compiled for sm90, {len(compiler.lowered)} of them to PTX "
              f"({len(compiler.seen)} in the cache)")
    else:
        fails = combo.run_seeds(seeds, interp_case, a.verbose, describe)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
