"""``attncc explain SPEC --n N``: what the analysis found for one problem size.

    attncc explain SPEC [--n N] [--nk NK] [--block 128x64] [--head-dim D] [--value-dim DV]
                   [--dtype bf16|fp16|fp32] [--batch B] [--heads H] [--param NAME=VALUE ...]
                   [--json] [--png FILE]

Prints the walks (how the forward / dQ kernels find the key blocks of a query block and the
dK/dV kernel the query blocks of a key block: closed forms, or exact block lists and why), the
tiles each visits and runs unmasked, the exact density, FLOPs and bytes (q, k, v, o in
``--dtype``), the classifier of patterns with ``[inputs]`` (drawn for synthetic inputs, which
it names) and the score section: scale, bias, mod, softcap, the conditions evaluated per pair,
what the key loop hoists and what it leaves to the LSE. For a static pattern the counts are
exact: the visited tiles are the ones with an allowed pair, the unmasked ones those whose pairs
are all allowed; with closed forms they take plain integer arithmetic, with exact block lists
numpy (:mod:`attncc.pair_counts`; no torch either way: under a second). A mask that is never
true gets a warning.
``--json`` prints the same as one JSON object; ``--png`` draws the map of tiles with a legend
(and the pair-level mask when both lengths are at most 512; needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from attncc.core.files import spec_file

PAIR_PLOT_LIMIT = 512


MAX_ROWS = 2**24  # --n / --nk: the tile counts take time in proportion to the lengths (not to pairs)


def _block(text: str):
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BLOCK_MxBLOCK_N such as 128x64, got {text!r}") from None
    if m < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"block sizes must be positive, got {text!r}")
    return m, n


def _dtype(text: str) -> str:
    from attncc.report import DTYPE_SHORT, ELEMENT_BYTES

    name = DTYPE_SHORT.get(text.lower(), text.lower())
    if name not in ELEMENT_BYTES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(ELEMENT_BYTES)} (or bfloat16, float16, "
                                         f"float32), got {text!r}")
    return name


def _param(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        try:
            return name, float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"param {name}: expected a number, got {value!r}") from None


def checked_params(pattern, params: dict) -> dict:
    """The --param values as a call of the generated module takes them, or the TypeError /
    ValueError that the call would raise (without its function's name): the check is the call's own,
    :func:`attncc.core.semantics.param_value` (no torch). Explaining a value that no call takes
    would describe no call; a float param's value comes back as the call's float (``2`` as 2.0,
    -0.0 as 0.0)."""
    from attncc.core.semantics import param_value

    return {p.name: param_value(p.name, p.kind, params[p.name], count=p.value if p.count else None)
            for p in pattern.params if p.name in params}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncc explain", description="What the analysis found for a spec.")
    p.add_argument("spec", help="the spec file (TOML), or the name of specs/<name>.toml")
    p.add_argument("--n", type=int, default=8192, help="query rows (default 8192)")
    p.add_argument("--nk", type=int, default=None, help="key rows (default: --n)")
    p.add_argument("--block", type=_block, default=(128, 64), help="tile BLOCK_MxBLOCK_N (default 128x64)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim D of q and k (default: the spec's first)")
    p.add_argument("--value-dim", type=int, default=None, help="head dim of v and o (default: the spec's value_dim, "
                                                               "else --head-dim)")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="{bf16,fp16,fp32}",
                   help="element type of q, k, v, o for the bytes (default: the spec's first dtype, bf16 unless "
                        "it says otherwise)")
    p.add_argument("--batch", type=int, default=1, help="batch rows (default 1)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: the spec's, else 1)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="override a [params] value (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", metavar="FILE", help="draw the tile map (and the pair mask when N <= 512)")
    return p


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_text(d: dict) -> str:
    t = d["tiles"]
    total = sum(t.values())
    lines = [
        f"{d['pattern']}  ({d['source']})",
        f"  size        n_q={d['n_q']} n_k={d['n_k']}  batch={d['batch']} heads={d['heads']}"
        + (f" heads_kv={d['heads_kv']}" if d["heads_kv"] != d["heads"] else "")
        + f" head_dim={d['head_dim']}"
        + (f" (spec: {', '.join(map(str, d['spec_head_dims']))})" if len(d["spec_head_dims"]) > 1 else "")
        + (f" value_dim={d['value_dim']}" if d["value_dim"] != d["head_dim"] else "")
        + f"  tile {d['block_m']}x{d['block_n']}  ({d['query_blocks']} x {d['key_blocks']} blocks)",
        f"  iteration   {d['iteration']}" + ("  (classified per call from the inputs)" if d["dynamic"] else ""),
        f"  backend     {d['backend']}",
        *([f"  residue     by class modulo {d['residue']}: each class's rows and keys as strided views, where a "
           f"class holds enough rows (the tiles below are those of a whole call)"] if d.get("residue") is not None else []),
        *([f"  columns     {d['columns']} apart: the rest over every key, the columns over their keys as a strided "
           f"view, merged by the LSE, where a call holds enough rows (the tiles below are those of a whole call)"]
          if d.get("columns") is not None else []),
        f"  tiles       {total}: {t['empty']} empty, {t['full']} full, {t['partial']} partial",
        f"  density     {d['density']:.6f}  ({d['allowed_pairs']} of {d['pairs']} pairs)",
        f"  FLOPs       {_si(d['flops'], 'FLOP')} useful, {_si(d['visited_flops'], 'FLOP')} visited, "
        f"{_si(d['dense_flops'], 'FLOP')} dense",
        f"  bytes       {_si(d['bytes'], 'B')} (q, k, v, o in {d['dtype']} + {_si(d['block_list_bytes'], 'B')} block lists)",
        f"  scores      {_si(d['score_memory_bytes'], 'B')} in visited tiles vs {_si(d['naive_score_memory_bytes'], 'B')} "
        f"for a dense fp32 score matrix",
    ]
    lines[1:1] = [f"  warning     {w}" for w in d.get("warnings", ())]
    if d["params"]:
        lines.append("  params      " + ", ".join(f"{k}={v}" for k, v in d["params"].items()))
    if d["synthesized_inputs"]:
        lines.append("  inputs      synthesized (the tiles depend on them; pass real ones for real numbers):")
        lines += [f"    {name:<9} {d['synthetic_inputs'][name]}" for name in d["synthesized_inputs"]]
    if d["block_stats"]:
        lines.append("  reads       " + "; ".join(d["block_stats"]))
    for walk, title in (("forward", "forward, dQ (key blocks per query block)"),
                        ("dkdv", "dK/dV (query blocks per key block)")):
        w = d["walks"][walk]
        t = w["tiles"]
        lines.append(f"  {title}: {w['path']}")
        lines.append(f"    tiles     {w['visited']} visited ({w['unmasked']} unmasked), {t['empty']} empty, "
                     f"{t['full']} full, {t['partial']} partial")
        lines += [f"    {b}" for b in w["bands"]]
        if w.get("first"):
            lines.append(f"    longest first: the blocks of {w['first']} run before the others, for every batch row and head")
    if d["classifier"] and d["dynamic"]:
        lines.append("  tile classifier (interval program):")
        lines += [f"    {s}" for s in d["classifier"]]
    if d.get("score"):
        from attncc.analysis.score import report_lines

        lines += report_lines(d["score"])
    return "\n".join(lines)


# the tile map's colours, by class value (tiles.EMPTY, PARTIAL, FULL = 0, 1, 2), and what each means
TILE_LEGEND = (("#f2f2f2", "empty: not visited"), ("#f4a259", "partial: visited, mask evaluated per pair"),
               ("#2a6f97", "full: visited, no mask code"))
PAIR_LEGEND = (("black", "allowed"), ("white", "masked out"))


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a SystemExit that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("attncc explain --png needs matplotlib: pip install 'attncc[viz]' (or pip install matplotlib)")
    return plt


def figure(d: dict, grid, pair_mask=None):
    """The tile map of batch row 0, head 0 (and the pair mask), with legends and, for a pattern
    with ``[inputs]``, the synthetic inputs it was drawn for: a matplotlib Figure."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    panels = 2 if pair_mask is not None else 1
    synthetic = [f"{name}: {d['synthetic_inputs'][name]}" for name in d.get("synthesized_inputs", ())]
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 6.5 + 0.25 * len(synthetic)), squeeze=False)
    ax = axes[0][0]
    ax.imshow(grid.numpy(), cmap=ListedColormap([c for c, _ in TILE_LEGEND]), vmin=0, vmax=2,
              interpolation="nearest", aspect="auto")
    ax.set_title(f"{d['pattern']}: tiles {d['block_m']}x{d['block_n']} (batch row 0, head 0)")
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles=[Patch(facecolor=c, edgecolor="grey", label=label) for c, label in TILE_LEGEND],
              loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, fontsize="small", frameon=False)
    if pair_mask is not None:
        ax2 = axes[0][1]
        ax2.imshow(pair_mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax2.set_title(f"allowed pairs (density {d['density']:.3f})")
        ax2.set_xlabel("key position")
        ax2.set_ylabel("query position")
        ax2.legend(handles=[Patch(facecolor=c, edgecolor="grey", label=label) for c, label in PAIR_LEGEND],
                   loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize="small", frameon=False)
    if synthetic:
        fig.text(0.01, 0.01, "drawn for synthetic inputs (pass real ones for real numbers):\n  " + "\n  ".join(synthetic),
                 fontsize="small", va="bottom")
    fig.tight_layout(rect=(0, 0.04 + 0.03 * len(synthetic) if synthetic else 0, 1, 1))
    return fig


def draw(d: dict, grid, path: str, pair_mask=None) -> None:
    """:func:`figure` to a PNG file."""
    fig = figure(d, grid, pair_mask)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def spec_warnings(pattern) -> List[str]:
    """What a spec's author most likely did not mean: a mask that is never true (it builds, and
    every row gives o = 0, lse = -inf and zero gradients)."""
    import sympy

    from attncc.analysis.normal_form import TooComplex, to_dnf

    if pattern.mask is None:
        return []
    never = pattern.mask is sympy.false
    if not never:
        try:
            never = to_dnf(pattern.mask, frozenset(p.symbol for p in pattern.params if p.kind == "int")) == ()
        except TooComplex:
            pass
    if never:
        return ["the mask is never true: every row gives o = 0, lse = -inf and zero gradients"]
    return []


def main_explain(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from attncc.analysis import analyze
    from attncc.report import DTYPE_SHORT, describe_synthetic, explain_data, synthesize_inputs
    from attncc.spec import SpecError, load_spec

    try:
        pattern = load_spec(spec_file(args.spec))
    except SpecError as e:
        print(f"attncc explain: {e}", file=sys.stderr)
        return 2  # as attncc build and tune: a user's error
    n_q = args.n
    n_k = args.nk if args.nk is not None else args.n
    if n_q < 1 or n_k < 1:
        print(f"attncc explain: lengths must be positive, got --n {n_q} --nk {n_k}", file=sys.stderr)
        return 2
    if max(n_q, n_k) > MAX_ROWS:
        print(f"attncc explain: lengths up to 2**24 ({MAX_ROWS}): the counts take time in proportion to them "
              f"(~2 s at 2**20), got --n {n_q} --nk {n_k}", file=sys.stderr)
        return 2
    for flag, value in (("--head-dim", args.head_dim), ("--value-dim", args.value_dim), ("--batch", args.batch),
                        ("--heads", args.heads)):
        if value is not None and value < 1:
            print(f"attncc explain: {flag} must be positive, got {value}", file=sys.stderr)
            return 2
    twice = sorted({name for name, _ in args.param if sum(n == name for n, _ in args.param) > 1})
    if twice:
        print(f"attncc explain: --param {', '.join(twice)} given more than once", file=sys.stderr)
        return 2
    params = dict(args.param)
    unknown = set(params) - {p.name for p in pattern.params}
    if unknown:
        print(f"attncc explain: {pattern.source} has no param(s) {', '.join(sorted(unknown))} "
              f"(params: {', '.join(p.name for p in pattern.params) or 'none'})", file=sys.stderr)
        return 2
    try:
        params = checked_params(pattern, params)
    except (TypeError, ValueError) as e:
        print(f"attncc explain: {e}", file=sys.stderr)
        return 2
    from attncc.core.semantics import MAX_HEAD_DIM

    for flag, value in (("--head-dim", args.head_dim), ("--value-dim", args.value_dim)):
        if value is not None and value > MAX_HEAD_DIM:  # a call refuses them: explaining one would describe no call
            print(f"attncc explain: {flag} up to {MAX_HEAD_DIM} (the kernels' limit), got {value}", file=sys.stderr)
            return 2
    if args.heads is not None and pattern.heads_q is not None and args.heads != pattern.heads_q:
        print(f"attncc explain: {pattern.source} fixes [heads].q = {pattern.heads_q}: a call with {args.heads} query "
              f"heads is refused (leave out --heads)", file=sys.stderr)
        return 2
    if args.heads is not None and pattern.heads_kv is not None and args.heads % pattern.heads_kv:
        print(f"attncc explain: --heads {args.heads} is not a multiple of the spec's [heads].kv = {pattern.heads_kv} "
              f"(each kv head serves q // kv query heads)", file=sys.stderr)
        return 2
    if args.png:
        from attncc.report import MAX_GRID_TILES

        tiles = -(-n_q // args.block[0]) * -(-n_k // args.block[1])
        if tiles > MAX_GRID_TILES:  # plan_grid holds every tile
            print(f"attncc explain: --png draws every tile: {tiles} tiles is more than 2**27; use larger tiles "
                  f"(--block) or shorter lengths", file=sys.stderr)
            return 2
        _pyplot()  # before any work: without matplotlib, say so at once
    block_m, block_n = args.block
    head_dim = args.head_dim or pattern.head_dims[0]
    heads = args.heads or pattern.heads_q or 1
    dtype = args.dtype or DTYPE_SHORT[pattern.dtypes[0]]
    plan = analyze(pattern)
    # the tiles of a pattern with [inputs] depend on them: made up (torch), and said so
    positions = max(n_q, n_k)
    inputs = synthesize_inputs(plan, batch=args.batch, heads=heads, positions=positions) if plan.dynamic else {}
    try:
        d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, head_dim=head_dim,
                         value_dim=args.value_dim, dtype=dtype, batch=args.batch, heads=heads, params=params,
                         inputs=inputs)
    except ValueError as e:  # a divisor that is 0 here (as a call would raise), a grid too large to count
        print(f"attncc explain: {e}", file=sys.stderr)
        return 2
    d["synthesized_inputs"] = sorted(inputs)
    d["synthetic_inputs"] = describe_synthetic(plan, inputs, positions=positions)
    d["warnings"] = spec_warnings(pattern)
    if args.json:
        print(json.dumps(d, indent=None, default=str))
    else:
        print(format_text(d))
    if args.png:
        from attncc.analysis.graph import plan_grid

        grid = plan_grid(plan, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n,
                         params={**pattern.param_values, **params}, inputs=inputs, batch=args.batch, heads=heads)
        pairs = None
        if max(n_q, n_k) <= PAIR_PLOT_LIMIT:
            from attncc._reference import pair_mask

            pairs = pair_mask(pattern, q_rows=n_q, k_rows=n_k, inputs=inputs, params=params,
                              batch=args.batch, heads=heads)[0, 0]
        draw(d, grid[0, 0], args.png, pairs)
        if not args.json:
            print(f"  wrote {args.png}")
    return 0


if __name__ == "__main__":
    from attncc.console import exit_quietly_on_broken_pipe

    sys.exit(exit_quietly_on_broken_pipe(main_explain))
