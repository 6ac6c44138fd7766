"""A short training step of a small Llama-style Hugging Face model, attention by attncc, sdpa and
flex_attention: milliseconds per step (forward, backward, AdamW), peak memory, and the loss of each
(the same weights and batches, so the losses must agree).

    python -m bench train             # H100/H200: two scenarios, < 2 minutes
    python -m bench train --smoke     # CPU, Triton interpreter, tiny: does it run

Scenarios: ``causal`` (Llama, no padding: sdpa runs its flash kernel with is_causal), and
``window+pad`` (Mistral, sliding window 1024, a quarter of each sequence left padding: sdpa then
gets a dense [B, 1, N, N] mask, flex_attention a block mask, attncc its key_ok input). Each
implementation's first step (kernel compilation, block masks) is reported apart; the table's
time is the median of the timed steps after it (bench/timer.py ``steps_ms``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys

from bench import timer  # (first: --smoke turns the interpreter on before triton loads)
from bench.common import DEV, DTYPE, SMOKE, banner

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402

IMPLEMENTATIONS = ("attncc", "sdpa") if SMOKE else ("attncc", "sdpa", "flex_attention")


def model_config(kind: str):
    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=128)
            if SMOKE else
            dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, vocab_size=32000))
    common = dict(**size, max_position_embeddings=8192, pad_token_id=0, attention_dropout=0.0)
    if kind == "causal":
        return LlamaConfig(**common)
    return MistralConfig(**common, sliding_window=8 if SMOKE else 1024)


def batches(kind: str, steps: int, B: int, N: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, vocab, (B, N), generator=gen)
        mask = None
        if kind != "causal":
            mask = torch.ones(B, N, dtype=torch.long)
            for b in range(B):
                mask[b, : int(torch.randint(0, N // 4 + 1, (1,), generator=gen))] = 0
            ids[mask == 0] = 0
        real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask.bool()
        labels = torch.where(real & torch.roll(real, 1, 1), ids, -100)  # both positions of a prediction real
        out.append(tuple(None if t is None else t.to(DEV) for t in (ids, mask, labels)))
    return out


def run(kind: str, impl: str, state: dict, data, config) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl, dtype=DTYPE)
    model.load_state_dict(state)
    model.to(DEV).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    losses = []
    if not SMOKE:
        torch.cuda.reset_peak_memory_stats()

    def step(ids, mask, labels):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = timer.steps_ms([lambda batch=batch: step(*batch) for batch in data])
    losses = [float(x) for x in losses]
    peak = 0.0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return dict(first_s=times[0] / 1e3, ms=statistics.median(times[1:]), peak=peak, loss0=losses[0],
                loss_last=losses[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument("--steps", type=int, default=3 if SMOKE else 8, help="steps per run, the first untimed")
    parser.add_argument("--batch", type=int, default=2 if SMOKE else 4)
    parser.add_argument("--seq", type=int, default=24 if SMOKE else 4096)
    parser.add_argument("--scenarios", default="causal,window+pad")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first is not timed)")
    attncc_hf.register()
    print(banner("python -m bench train"))
    timer.heat_up(5.0)  # the first implementation timed gets the steady clock too
    rows = []
    for kind in args.scenarios.split(","):
        config = model_config(kind)
        torch.manual_seed(0)
        state = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=DTYPE).state_dict()
        data = batches(kind, args.steps, args.batch, args.seq, config.vocab_size)
        for impl in IMPLEMENTATIONS:
            try:
                rows.append((kind, impl, run(kind, impl, state, data, config)))
            except Exception as e:  # one implementation failing must not hide the others' numbers
                rows.append((kind, impl, dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")))
            print(f"  {kind} {impl}: {rows[-1][2]}", file=sys.stderr, flush=True)
    c = config
    family = "Llama" if args.scenarios == "causal" else "Llama / Mistral"
    print(f"\nmodel: {family}-style, {c.num_hidden_layers} layers, "
          f"hidden {c.hidden_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} kv), head dim "
          f"{c.head_dim}, {str(DTYPE).removeprefix('torch.')}; batch {args.batch} x {args.seq} tokens; AdamW; "
          f"median of {args.steps - 1} steps after the first\n")
    print("| scenario | attention | ms / step | tokens / s | peak GiB | first step s | loss step 1 | loss last |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind, impl, r in rows:
        if "error" in r:
            print(f"| {kind} | {impl} | {r['error']} | | | | | |")
            continue
        tokens = args.batch * args.seq / (r["ms"] / 1e3)
        print(f"| {kind} | {impl} | {r['ms']:.1f} | {tokens:,.0f} | {r['peak']:.1f} | {r['first_s']:.1f} | "
              f"{r['loss0']:.4f} | {r['loss_last']:.4f} |")
    return 1 if any("error" in r for _, impl, r in rows if impl == "attncc") else 0
