"""TFLOP/s of attncc, FlexAttention, SDPA flash and SDPA cuDNN across patterns and shapes
(issue #7 item 4), forward and forward + backward.

Groups of cases (H=16, D=128, bf16 unless named):
  dev     the DEVELOPERS.md cases: dense 4K, causal 8K, sliding window 1024 16K, document 16K,
          ALiBi causal 4K, softcap 30 causal 8K
  hd      causal 8K at head_dim 64 and 256
  gqa     causal 8K, 32 query heads over 8 key/value heads
  sweep   causal, N = 1K .. 32K at B * N = 64K tokens

SDPA runs where the pattern is plain (dense or causal, GQA through enable_gqa).

    PYTHONPATH=. python bench/sweep_bench.py [--quick] [--fwd-only] [--groups dev sweep] [--only SUBSTR ...]
                                             [--png FILE] [--out DIR]
    PYTHONPATH=. python bench/sweep_bench.py --smoke     # CPU, interpreter, tiny sizes

``--out DIR`` writes sweep_bench.md and sweep_bench.json there (after every case) and the plot
sweep_bench.png; ``--png FILE`` puts the plot (TFLOP/s against sequence length, the sweep group)
at FILE instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEV, DTYPE, SMOKE, add_tflops, attention_flops, banner, compare, density, documents,  # noqa: E402
                    flex_grad_output, flex_pattern, flex_setup, generated, markdown, measure, note, qkv, release, sdpa_backends,
                    sdpa_call, short_error, write_out)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMPLS = ("attncc", "flex", "sdpa_flash", "sdpa_cudnn")
PLAIN = {"dense": False, "causal": True, "gqa": True}  # specs SDPA computes: spec -> is_causal


@dataclass(frozen=True)
class Case:
    group: str
    label: str
    spec: str
    B: int
    N: int
    Hq: int = 16
    Hkv: int = 16
    D: int = 128
    params: dict = field(default_factory=dict)


def cases(smoke: bool):
    """Every case; under ``smoke`` the same cases at interpreter sizes."""
    if smoke:
        return [
            Case("dev", "dense", "dense", 1, 128, 2, 2, 32),
            Case("dev", "causal", "causal", 1, 128, 2, 2, 32),
            Case("dev", "sliding window 32", "sliding_window", 1, 128, 2, 2, 32, {"window": 32}),
            Case("dev", "document", "document", 1, 128, 2, 2, 32),
            Case("dev", "ALiBi causal", "alibi", 1, 128, 2, 2, 32),
            Case("dev", "softcap 30 causal", "softcap", 1, 128, 2, 2, 32),
            Case("hd", "causal D=16", "causal", 1, 128, 2, 2, 16),
            Case("hd", "causal D=64", "causal", 1, 128, 2, 2, 64),
            Case("gqa", "GQA 32/8 causal", "gqa", 1, 64, 32, 8, 32),
            *(Case("sweep", f"causal N={n}", "causal", 256 // n, n, 2, 2, 32) for n in (64, 128, 256)),
        ]
    sweep = [Case("sweep", f"causal B={65536 // n} N={n // 1024}K", "causal", 65536 // n, n)
             for n in (1024, 2048, 4096, 8192, 16384, 32768)]
    return [
        Case("dev", "dense 4K", "dense", 8, 4096),
        Case("dev", "causal 8K", "causal", 4, 8192),
        Case("dev", "sliding window 1024, 16K", "sliding_window", 2, 16384, params={"window": 1024}),
        Case("dev", "document mask, 16K", "document", 2, 16384),
        Case("dev", "ALiBi causal, 4K", "alibi", 8, 4096),
        Case("dev", "softcap 30 causal, 8K", "softcap", 4, 8192),
        Case("hd", "causal 8K, D=64", "causal", 4, 8192, D=64),
        Case("hd", "causal 8K, D=256", "causal", 4, 8192, D=256),
        Case("gqa", "GQA 32/8 causal, 8K", "gqa", 2, 8192, 32, 8),
        *sweep,
    ]


QUICK = ("dense", "causal 8K", "document", "GQA", "N=2K", "N=8K", "N=32K", "N=128", "N=64")


def run_case(c: Case, fwd_only: bool):
    row = dict(group=c.group, case=c.label, B=c.B, N=c.N, H=f"{c.Hq}/{c.Hkv}" if c.Hkv != c.Hq else c.Hq, D=c.D)
    kw = dict(c.params)
    if c.spec == "document":
        kw["doc"] = documents(c.B, c.N, mean=32 if SMOKE else 1024)
    flops = attention_flops(c.B, c.Hq, c.N, c.N, c.D, density(c.spec, c.N, kw))
    q, k, v = qkv(c.B, c.Hq, c.N, c.D, Hkv=c.Hkv)
    do = None if fwd_only else torch.randn_like(q)
    gqa = {"enable_gqa": True} if c.Hkv != c.Hq else {}

    mod = generated(c.spec)
    o, _ = measure(row, "attncc", lambda q, k, v: mod.attention(q, k, v, **kw), q, k, v, do)
    flex, create_block_mask = flex_setup()
    score_mod, mask_mod, per_batch = flex_pattern(c.spec, c.Hq, kw)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, c.B if per_batch else None, None, c.N, c.N, device=DEV)
    of, _ = measure(row, "flex", lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, **gqa),
                    q, k, v, flex_grad_output(row, do))
    compare(row, "diff_flex", o, of)
    if c.spec in PLAIN:
        for label, backend in sdpa_backends():
            def sdpa(q, k, v, backend=backend):
                return sdpa_call(backend, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=PLAIN[c.spec],
                                                                                  **gqa))
            measure(row, label, sdpa, q, k, v, do)
    add_tflops(row, flops)
    return row


def best_other(suffix):
    """A column function: attncc's TFLOP/s over the best of the others."""
    def f(r):
        others = [r[f"{x}{suffix}"] for x in IMPLS[1:] if r.get(f"{x}{suffix}")]
        return r[f"attncc{suffix}"] / max(others) if others and r.get(f"attncc{suffix}") else None
    return f


def columns(fwd_only: bool):
    cols = [("case", "case", "s"), ("B", "B", "d"), ("N", "N", "d"), ("H", lambda r: str(r["H"]), "s"),
            ("D", "D", "d")]
    cols += [(f"{x} fwd", f"{x}_tflops", ".1f") for x in IMPLS] + [("attncc / best", best_other("_tflops"), ".2f")]
    if not fwd_only:
        cols += [(f"{x} f+b", f"{x}_fb_tflops", ".1f") for x in IMPLS]
        cols += [("attncc / best f+b", best_other("_fb_tflops"), ".2f")]
    cols += [("max abs diff o vs flex", "diff_flex", ".1e"), ("note", "note", "s")]
    return cols


def plot(rows, path, fwd_only):
    """TFLOP/s against sequence length for the sweep group (B * N fixed); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}", flush=True)
        return
    sweep = sorted((r for r in rows if r["group"] == "sweep"), key=lambda r: r["N"])
    if not sweep:
        print("no sweep cases ran: no plot", flush=True)
        return
    kinds = [("_tflops", "forward")] + ([] if fwd_only else [("_fb_tflops", "forward + backward (3.5x fwd FLOPs)")])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, (suffix, title) in zip(axes[0], kinds):
        for impl in IMPLS:
            pts = [(r["N"], r[impl + suffix]) for r in sweep if r.get(impl + suffix)]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes")
    ap.add_argument("--quick", action="store_true", help="a subset: " + ", ".join(QUICK[:7]))
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--groups", nargs="+", choices=["dev", "hd", "gqa", "sweep"], help="run these groups only")
    ap.add_argument("--only", nargs="+", metavar="SUBSTR", help="run the cases whose label contains one of these")
    ap.add_argument("--png", help="plot TFLOP/s against N (the sweep group) to this file")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write sweep_bench.md / .json / .png here")
    args = ap.parse_args()
    todo = [c for c in cases(SMOKE) if (not args.groups or c.group in args.groups)
            and (not args.only or any(s in c.label for s in args.only))
            and (not args.quick or any(s in c.label for s in QUICK))]
    print(banner("sweep_bench"), flush=True)
    title = (f"TFLOP/s, {str(DTYPE)[6:]} (forward + backward counts 3.5x the forward's FLOPs; "
             f"masked FLOPs not counted)")
    rows, cols = [], columns(args.fwd_only)
    for c in todo:
        try:
            row = run_case(c, args.fwd_only)
        except Exception as e:  # one error row, then the next case
            row = dict(group=c.group, case=c.label, B=c.B, N=c.N, H=c.Hq, D=c.D)
            note(row, short_error(e))
        rows.append(row)
        print(json.dumps(row), flush=True)
        release()
        table = f"{title}\n\n{markdown(rows, cols)}\n"
        write_out(args.out, "sweep_bench.md", table)
        write_out(args.out, "sweep_bench.json", json.dumps(rows, indent=1))
    print("\n" + (table if rows else "no cases selected"))
    png = args.png or (args.out and str(Path(args.out) / "sweep_bench.png"))
    if png:
        plot(rows, png, args.fwd_only)


if __name__ == "__main__":
    main()
