"""Score transforms (``[score].mod``) against FlexAttention's score_mod (issue #10 item 5).

B=4, H=16, N=4096, D=128, bf16: forward and forward + backward TFLOP/s of attncc and
torch.compile(flex_attention) for each transform, the largest absolute differences of the outputs
and of the gradients between the two (a sanity column), and Flex's numbers quoted in the issue.

    PYTHONPATH=. python bench/score_mods.py [--fwd-only] [--only NAME ...] [--out DIR]
    PYTHONPATH=. python bench/score_mods.py --smoke      # CPU, interpreter, tiny sizes

Each transform is a spec written below, built with attncc's build API into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEV, DTYPE, SMOKE, add_tflops, attention_flops, banner, build_inline, causal_density,  # noqa: E402
                    compare, flex_grad_output, flex_setup, markdown, measure, note, qkv, ratio, release, short_error,
                    write_out)

import torch  # noqa: E402

# name -> (what the table calls it, the [score] lines, other spec tables, flex (fwd, fwd+bwd) quoted in issue #10)
TRANSFORMS = {
    "identity": ("identity", 'mod = "s"', "", (483, 415)),
    "times_two": ("s * 2", 'mod = "s * 2"', "", (474, 408)),
    "squared": ("s * s", 'mod = "s * s"', "", (477, 387)),
    "head_scale": ("s * head_scale[h]", 'mod = "s * head_scale[h]"',
                   '[inputs]\nhead_scale = { dims = ["h"], dtype = "float32" }\n', (475, 391)),
    "sin_cos_tan_b": ("sin(cos(s)) + tan(b)", 'mod = "sin(cos(s)) + tan(b)"', "", (79, 25)),
    "relative": ("s + (i - j)", 'mod = "s + (i - j)"', "", (465, 425)),
    "relative_causal": ("where(i >= j, s + (i - j), -inf)", 'mod = "where(i >= j, s + (i - j), -inf)"', "", None),
    "alibi_mod": ("ALiBi as mod", 'mod = "s + (j - i) * exp2(-(h + 1) * 8 / heads)"', "[params]\nheads = {H}\n",
                  None),
    "softcap_mod": ("softcap 30 (mod)", 'mod = "30 * tanh(s / 30)"', "", (212, 209)),
    "softcap_builtin": ("softcap 30 (built-in)", "softcap = 30.0", "", (212, 209)),
}
CAUSAL = {"relative_causal"}


def spec_text(name: str, H: int, D: int) -> str:
    _, score, tables, _ = TRANSFORMS[name]
    return f'name = "{name}"\nhead_dim = {D}\n' + tables.replace("{H}", str(H)) + f"[score]\n{score}\n"


def flex_score_mod(name: str, H: int, head_scale):
    """The same transform as a FlexAttention score_mod."""
    if name == "identity":
        return lambda s, b, h, i, j: s
    if name == "times_two":
        return lambda s, b, h, i, j: s * 2
    if name == "squared":
        return lambda s, b, h, i, j: s * s
    if name == "head_scale":
        return lambda s, b, h, i, j: s * head_scale[h]
    if name == "sin_cos_tan_b":
        return lambda s, b, h, i, j: torch.sin(torch.cos(s)) + torch.tan(b.to(torch.float32))
    if name in ("relative", "relative_causal"):  # relative_causal: the mask is the block mask
        return lambda s, b, h, i, j: s + (i - j)
    if name == "alibi_mod":
        return lambda s, b, h, i, j: s + (j - i) * torch.exp2(-(h + 1) * 8.0 / H)
    if name in ("softcap_mod", "softcap_builtin"):
        return lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)
    raise KeyError(name)


def run_case(name, built, B, H, N, D, fwd_only):
    label = TRANSFORMS[name][0]
    row = dict(name=name, transform=label)
    issue = TRANSFORMS[name][3]
    if issue:
        row["issue_flex_tflops"], row["issue_flex_fb_tflops"] = issue
    if isinstance(built, Exception):
        note(row, "build: " + short_error(built))
        return row
    pattern, mod = built
    flex, create_block_mask = flex_setup()
    q, k, v = qkv(B, H, N, D)
    do = None if fwd_only else torch.randn_like(q)
    head_scale = torch.rand(H, device=DEV) + 0.5
    kw = {"head_scale": head_scale} if name == "head_scale" else {}
    density = causal_density(N) if name in CAUSAL else 1.0
    flops = attention_flops(B, H, N, N, D, density)

    o, grads = measure(row, "attncc", lambda q, k, v: mod.attention(q, k, v, **kw), q, k, v, do)
    score_mod = flex_score_mod(name, H, head_scale)
    block_mask = None
    if name in CAUSAL:
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, N, N, device=DEV)
    of, grads_f = measure(row, "flex", lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask),
                          q, k, v, flex_grad_output(row, do))
    compare(row, "diff_o", o, of)
    compare(row, "diff_grad", grads, grads_f)
    add_tflops(row, flops)
    return row


COLUMNS = [
    ("transform", "transform", "s"),
    ("attncc fwd", "attncc_tflops", ".1f"),
    ("flex fwd", "flex_tflops", ".1f"),
    ("flex fwd (issue)", "issue_flex_tflops", "d"),
    ("ratio", ratio("attncc_tflops", "flex_tflops"), ".2f"),
    ("attncc f+b", "attncc_fb_tflops", ".1f"),
    ("flex f+b", "flex_fb_tflops", ".1f"),
    ("flex f+b (issue)", "issue_flex_fb_tflops", "d"),
    ("ratio f+b", ratio("attncc_fb_tflops", "flex_fb_tflops"), ".2f"),
    ("max abs diff o", "diff_o", ".1e"),
    ("max abs diff grad", "diff_grad", ".1e"),
    ("note", "note", "s"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, B=1 H=2 N=128 D=32")
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--only", nargs="+", choices=sorted(TRANSFORMS), help="run these transforms only")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write score_mods.md / .json here")
    args = ap.parse_args()
    B, H, N, D = (1, 2, 128, 32) if SMOKE else (4, 16, 4096, 128)
    title = f"score transforms, B={B} H={H} N={N} D={D} {str(DTYPE)[6:]}, TFLOP/s (f+b counts 3.5x the forward)"
    print(banner("score_mods"), flush=True)
    names = args.only or list(TRANSFORMS)
    built = build_inline({n: spec_text(n, H, D) for n in names})
    rows = []
    for name in names:
        try:
            row = run_case(name, built[name], B, H, N, D, args.fwd_only)
        except Exception as e:  # anything outside the guarded steps: one error row, then on
            row = dict(name=name, transform=TRANSFORMS[name][0], note=short_error(e))
        rows.append(row)
        print(json.dumps(row), flush=True)
        release()
        table = f"{title}\n\n" + markdown(rows, COLUMNS) + "\n"
        write_out(args.out, "score_mods.md", table)
    write_out(args.out, "score_mods.json", json.dumps(rows, indent=1))
    print("\n" + table)


if __name__ == "__main__":
    main()
