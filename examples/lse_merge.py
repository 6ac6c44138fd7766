"""Train through two partial attentions merged by their LSEs, and check it equals one call.

    python examples/lse_merge.py              # CPU: kernels under the Triton interpreter
    python examples/lse_merge.py --steps 20   # a GPU when there is one

The pattern: causal attention to ``sinks`` global tokens plus a sliding window (StreamingLLM's
attention sinks), ``j <= i and (j < sinks or i - j < window)``. It is computed twice:

- in one call of the spec of the whole pattern;
- as two calls over disjoint key sets, the sinks (``j <= i and j < sinks``) and the window past
  them (``j >= sinks and j <= i and i - j < window``), merged through their log-sum-exps:
  ``lse = logsumexp(lse_1, lse_2)``, ``o = o_1 exp(lse_1 - lse) + o_2 exp(lse_2 - lse)``.

Both train a small model (projections to q, k, v and an output projection) with SGD on the same
batches; the losses and the gradients agree to float32 rounding at every step, because the LSE is
differentiable (contract v1): without its gradient the merged model's gradients were 30-55% off.
The same merge joins the chunks of a long sequence (calls with ``k_offset``, ring attention).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attncc  # noqa: E402

PARAMS = {"params": {"sinks": 4, "window": 8}, "head_dim": [16]}
WHOLE = {**PARAMS, "name": "sinks_and_window", "mask": {"where": "j <= i and (j < sinks or i - j < window)"}}
SINKS = {**PARAMS, "name": "sinks_only", "mask": {"where": "j <= i and j < sinks"}}
WINDOW = {**PARAMS, "name": "window_past_sinks", "mask": {"where": "j >= sinks and j <= i and i - j < window"}}


def merge(parts):
    """``(o, lse)`` over the union of disjoint key sets from each set's ``(o, lse)``, in the stable
    log-sum-exp form: a row that no part reaches (every lse = -inf) stays o = 0, lse = -inf."""
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)
    total = weights.sum(0)
    o = sum(w[..., None] * o for w, (o, _) in zip(weights, parts)) / torch.where(total > 0, total, 1.0)[..., None]
    return o, top + torch.log(total)


class Model(torch.nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = torch.nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, attend):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o, lse = attend(q, k, v)
        # the LSE enters the loss too (as a z-loss would), so both of its uses are trained
        return self.out(o.transpose(1, 2).reshape(B, N, -1)), lse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=40)
    args = ap.parse_args(argv)

    whole, sinks, window = (attncc.compile(s) for s in (WHOLE, SINKS, WINDOW))
    one_call = lambda q, k, v: whole.attention(q, k, v, return_lse=True)  # noqa: E731
    merged = lambda q, k, v: merge([m.attention(q, k, v, return_lse=True) for m in (sinks, window)])  # noqa: E731

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = [Model(32, 2, 16).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optims = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    worst = 0.0
    for step in range(args.steps):
        x = torch.randn(2, args.seq, 32, device=device)
        target = torch.randn(2, args.seq, 32, device=device)
        losses = []
        for model, optim, attend in zip(models, optims, (one_call, merged)):
            y, lse = model(x, attend)
            loss = (y - target).pow(2).mean() + 1e-2 * lse.pow(2).mean()
            optim.zero_grad()
            loss.backward()
            losses.append(loss.item())
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            worst = max(worst, float((a.grad - b.grad).norm() / a.grad.norm()))
        for optim in optims:
            optim.step()
        print(f"step {step}: loss one call {losses[0]:.6f}, merged {losses[1]:.6f}")
    print(f"largest relative gradient difference: {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("the merged calls' gradients differ from the single call's")


if __name__ == "__main__":
    main()
