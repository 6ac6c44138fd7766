"""The one entry point of bench/: ``python -m bench CASE... [--fwd | --bwd] [--sweep NAME | --env SETTING...]
[--out DIR] [--smoke]``, or ``python -m bench TOOL ...`` for the tools of :data:`TOOLS`.

For each case (bench/cases.py) it builds attncc's implementation and the case's baselines
(bench/impls.py), calls each once (compiles, outputs and gradients for the difference columns), then
times them with bench/timer.py: forward and forward + backward, every implementation in turn within
each of ``--rounds`` rounds, the median of the rounds (each a ``do_bench`` median), after one heat-up
of the GPU. One row per implementation, plus rows for extra costs (Flex's block mask, attncc's
block lists, a torch rotary pass), timed before the implementations are first called. ``--sweep
NAME`` (bench/cases.py SWEEPS) or ``--env NAME=VALUE[;NAME=VALUE]`` (repeatable) adds a row of
attncc per setting, timed in the same rounds, compared with attncc at its defaults. Progress is
one JSON line per row; ``--out DIR`` (default ``$OUT``) gets bench.md and bench.json after every
case, so a run cut short keeps what it measured. A failure is a row's note (a case that fails
before its first row: one row with the case's shape), and the run goes on; the exit status is 1
when attncc failed somewhere.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from bench import common  # noqa: F401  (first: --smoke turns the interpreter on before triton loads)
from bench import timer
from bench.cases import CASES, GROUPS, SWEEPS, Case, Setting, parse_setting, select, setting_label
from bench.common import (DTYPE, FWD_BWD_FLOPS, SMOKE, banner, environment, markdown, max_abs, note, release,
                          require_device, short_error, tflops, write_json, write_out)
from bench.impls import Extra, Impl, implementations, prepare

import torch  # noqa: E402

# python -m bench TOOL ...: the measurements that are not a table of implementations per case
TOOLS: Dict[str, tuple] = {
    "configs": ("bench.configs", "the backward's kernels alone: time split, per-kernel tile-config sweeps, A/B"),
    "classify": ("bench.classify", "block lists of a data-dependent mask: the one-kernel path against torch's"),
    "host": ("bench.host_overhead", "host microseconds per call against SDPA and FlexAttention"),
    "cp": ("bench.cp", "context-parallel attention on one or several GPUs (torchrun -m bench cp --multi)"),
    "train": ("bench.hf_train", "a training step of a small Hugging Face model per attention implementation"),
}


def _in_env(impl: Impl, fn):
    """``fn`` run with ``impl.env`` in the environment (attncc reads its config variables per call,
    the backward's too)."""
    if not impl.env:
        return fn
    return lambda: _call_in(dict(impl.env), fn)


def _call_in(values: dict, fn):
    with environment(values):
        return fn()


def _forward(impl: Impl):
    def run():
        with torch.no_grad():
            return impl.fn(*impl.args)
    return _in_env(impl, run)


def run_case(case: Case, *, fwd: bool = True, bwd: bool = True, rounds: int = timer.ROUNDS,
             settings: Sequence[Setting] = (), baselines: bool = True) -> List[dict]:
    """The rows of one case: attncc (then attncc under each of ``settings``), the baselines, then
    the extras and missing baselines. Ratios and differences are against attncc at its defaults."""
    p = prepare(case)
    settings = list(dict.fromkeys(tuple(case.settings) + tuple(settings)))  # the case's own, then the command's
    base = base_row(p.case)
    impls, extras, unavailable = implementations(p, settings, baselines)
    # the extras first: before attncc's first call, a first-call extra still sees this process's first
    # use of a kernel (its compile); their rows come after the implementations'
    extra_rows = [_extra_row(base, label, extra) for label, extra in extras.items()]
    rows: Dict[str, dict] = {i.name: dict(base, impl=i.name, **({"note": i.note} if i.note else {})) for i in impls}
    by_name = {i.name: i for i in impls}
    outs, grads = {}, {}
    if fwd:
        fns = {}
        for impl in impls:
            try:
                outs[impl.name] = impl.to_case(_forward(impl)())
                fns[impl.name] = _forward(impl)
            except Exception as e:  # noqa: BLE001 - the row says why; the others still run
                _failed(rows[impl.name], f"forward: {short_error(e)}")
                release()
        for name, ms in timer.interleaved(fns, rounds=rounds).items():
            _store(rows[name], "fwd_ms", ms)
    if bwd:
        fns, leaves_of = {}, {}
        for impl in impls:
            if impl.grad_out is None:
                continue
            leaves = [t.detach().clone().requires_grad_() for t in impl.args]
            try:
                out = _in_env(impl, lambda impl=impl, leaves=leaves: _forward_backward(impl, leaves))()
                outs.setdefault(impl.name, impl.to_case(out[0]))
                if impl.same_grads:
                    grads[impl.name] = tuple(impl.to_case(g) for g in out[1])
            except Exception as e:  # noqa: BLE001
                _failed(rows[impl.name], f"forward + backward: {short_error(e)}")
                release()
                continue
            fns[impl.name] = _in_env(impl, lambda impl=impl, leaves=leaves: impl.fn(*leaves).backward(impl.grad_out))
            leaves_of[impl.name] = leaves
        for name, ms in timer.interleaved(fns, rounds=rounds, grad_to_none=leaves_of).items():
            _store(rows[name], "fb_ms", ms)
    first = impls[0].name  # attncc at its defaults
    mine = rows[first]
    for name, row in rows.items():
        if p.flops is not None:
            for key, scale in (("fwd", 1.0), ("fb", FWD_BWD_FLOPS)):
                if f"{key}_ms" in row:
                    row[f"{key}_tflops"] = tflops(scale * p.flops, row[f"{key}_ms"])
        if p.bytes is not None and "fwd_ms" in row:
            row["fwd_tbps"] = p.bytes / row["fwd_ms"] / 1e9
        if name == first:
            continue
        for key in ("fwd", "fb"):
            if row.get(f"{key}_ms") and mine.get(f"{key}_ms"):
                row[f"{key}_vs_attncc"] = row[f"{key}_ms"] / mine[f"{key}_ms"]
        if by_name[name].same_output:
            _diff(row, "diff_o", outs.get(name), outs.get(first))
            _diff(row, "diff_grad", grads.get(name), grads.get(first))
    out = list(rows.values()) + extra_rows
    for name, why in unavailable.items():
        out.append(dict(base, impl=name, note=f"unavailable here: {why}"))
    release()
    return out


def _extra_row(base: dict, label: str, extra: Extra) -> dict:
    """The row of an extra cost: its ms (``fwd_ms``) and notes, or its error in the note."""
    row = dict(base, impl=label, **({"note": extra.note} if extra.note else {}))
    got = common.attempt(row, "fwd_ms", extra.fn)
    if isinstance(got, tuple):  # (ms, what the call turned out to include)
        row["fwd_ms"] = got[0]
        note(row, got[1])
    return row


def base_row(c: Case) -> dict:
    """The fields every row of case ``c`` (at the sizes in use) starts with, a failed case's too."""
    return dict(case=c.name, label=c.label, B=c.B, N=c.N, H=c.Hq if c.kv_heads == c.Hq else f"{c.Hq}/{c.kv_heads}",
                D=c.D)


def _forward_backward(impl: Impl, leaves):
    """(output, gradients of the leaves) of one call."""
    out = impl.fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, impl.grad_out)


def _store(row: dict, key: str, ms) -> None:
    if isinstance(ms, BaseException):
        _failed(row, f"{key}: {short_error(ms)}")
    else:
        row[key] = ms


def _failed(row: dict, text: str) -> None:
    """``text`` in the row's note, and the row marked failed (the exit status counts attncc's)."""
    note(row, text)
    row["failed"] = True


def _diff(row: dict, key: str, a, b) -> None:
    """``row[key]``: the largest absolute difference of ``a`` and ``b`` (tensors or tuples of them)."""
    if a is None or b is None:
        return
    pairs = list(zip(a, b)) if isinstance(a, (tuple, list)) else [(a, b)]
    common.attempt(row, key, lambda: max(max_abs(x, y) for x, y in pairs))


COLUMNS = [
    ("case", "label", "s"), ("implementation", "impl", "s"), ("B", "B", "d"), ("N", "N", "d"),
    ("H", "H", "s"), ("D", "D", "d"),
    ("fwd ms", "fwd_ms", ".3f"), ("fwd TFLOP/s", "fwd_tflops", ".1f"), ("fwd TB/s", "fwd_tbps", ".2f"),
    ("fwd time / attncc's", "fwd_vs_attncc", ".2f"),
    ("f+b ms", "fb_ms", ".3f"), ("f+b TFLOP/s", "fb_tflops", ".1f"), ("f+b time / attncc's", "fb_vs_attncc", ".2f"),
    ("max abs diff o", "diff_o", ".1e"), ("max abs diff grads", "diff_grad", ".1e"), ("note", "note", "s"),
]


def table(rows: List[dict], title: str) -> str:
    """The markdown table of ``rows``, without the columns no row has; a row without some field
    (a case that failed before its first row) gets '-' there."""
    used = [col for col in COLUMNS if any(r.get(col[1]) is not None for r in rows)]
    return f"{title}\n\n{markdown(rows, used)}\n"


def plot(rows: List[dict], path) -> None:
    """TFLOP/s against sequence length of the ``sweep`` group's cases (B * N fixed); skipped without
    matplotlib or without such rows."""
    sweep = [r for r in rows if r["case"] in GROUPS["sweep"] and r["impl"] in ("attncc", "flex", "sdpa_flash",
                                                                              "sdpa_cudnn")]
    if not sweep:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}", flush=True)
        return
    kinds = [("fwd_tflops", "forward"), ("fb_tflops", "forward + backward (3.5x fwd FLOPs)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], kinds):
        for impl in sorted({r["impl"] for r in sweep}):
            pts = sorted((r["N"], r[key]) for r in sweep if r["impl"] == impl and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sequence length N (B * N = {sweep[0]['B'] * sweep[0]['N']})")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"causal, H={sweep[0]['H']} D={sweep[0]['D']}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", flush=True)


def listing() -> str:
    lines = ["tools (python -m bench TOOL --help):"] + [f"  {name:10s} {text}" for name, (_, text) in TOOLS.items()]
    lines += ["", "sweeps (--sweep NAME): " + "; ".join(f"{n} ({len(v)})" for n, v in SWEEPS.items()), ""]
    lines += ["groups: " + "; ".join(f"{g} ({len(names)})" for g, names in GROUPS.items()), ""]
    for c in CASES.values():
        heads = c.Hq if c.kv_heads == c.Hq else f"{c.Hq}/{c.kv_heads}"
        params = " ".join(f"{k}={v}" for k, v in c.params) + (f" decode={c.decode}" if c.decode else "")
        lines.append(f"{c.name:24s} {c.label:40s} B={c.B} N={c.N} H={heads} D={c.D} {params:24s} "
                     f"[{', '.join(c.baselines)}] ({', '.join(c.groups)})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="*", metavar="CASE", help="case or group names (--list shows them and the tools)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--fwd", action="store_true", help="forward only")
    which.add_argument("--bwd", action="store_true", help="forward + backward only")
    ap.add_argument("--sweep", choices=sorted(SWEEPS), help="also time attncc under each setting of this sweep")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE[;NAME=VALUE]",
                    help="also time attncc with these environment variables set (repeatable)")
    ap.add_argument("--no-baselines", action="store_true", help="attncc (and its settings) only")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write bench.md and bench.json here (default $OUT)")
    ap.add_argument("--rounds", type=int, default=timer.ROUNDS, help="interleaved rounds per timing (median)")
    ap.add_argument("--heat", type=float, default=timer.HEAT_SECONDS, help="seconds of GPU heat-up before timing")
    ap.add_argument("--png", help="plot TFLOP/s against N of the sweep group to this file")
    ap.add_argument("--list", action="store_true", help="list the tools, sweeps, groups and cases")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes: does it run")
    args = ap.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.cases:
        ap.error(f"name at least one case or group ({', '.join(GROUPS)}) or a tool ({', '.join(TOOLS)}); "
                 f"--list shows them")
    try:
        todo = select(args.cases)
        sweep = list(SWEEPS[args.sweep]) if args.sweep else []
        settings = (sweep[:2] if SMOKE else sweep) + [parse_setting(text) for text in args.env]  # smoke: the code path
    except ValueError as e:
        ap.error(str(e))
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    require_device("python -m bench")
    head = banner("python -m bench " + " ".join(argv))
    title = (f"{head}\n\n{str(DTYPE)[6:]}; TFLOP/s: forward 4·B·H·N²·D·density (masked pairs not counted), "
             f"forward + backward {FWD_BWD_FLOPS}x that; decode TB/s: bytes of K and V / time; "
             f"median of {1 if SMOKE else args.rounds} interleaved rounds")
    if settings:
        title += "; settings: " + ", ".join(setting_label(s) for s in settings)
    print(head, flush=True)
    timer.heat_up(args.heat)
    rows: List[dict] = []
    failed = False
    for case in todo:
        try:
            new = run_case(case, fwd=not args.bwd, bwd=not args.fwd, rounds=args.rounds, settings=settings,
                           baselines=not args.no_baselines)
        except Exception as e:  # noqa: BLE001 - one error row, then the next case
            new = [dict(base_row(case.at_smoke() if SMOKE else case), impl="attncc", note=short_error(e, 300),
                        failed=True)]
            if os.environ.get("BENCH_TRACEBACK"):
                import traceback

                traceback.print_exc()
            release()
        failed |= any(r["impl"] == "attncc" and r.get("failed") for r in new)  # at its defaults
        for row in new:
            print(json.dumps(row, default=str), flush=True)
        rows += new
        write_out(args.out, "bench.md", table(rows, title))
        write_json(args.out, "bench.json", dict(title=title, rows=rows))
    print("\n" + table(rows, title))
    png = args.png or (args.out and str(Path(args.out) / "bench_sweep.png"))
    if png:
        plot(rows, png)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
