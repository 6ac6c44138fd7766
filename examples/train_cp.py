"""Train a small transformer with context parallelism: every rank holds a shard of each sequence,
and attention runs through ``attncc.distributed.attention`` over the whole sequence.

    torchrun --nproc_per_node 2 examples/train_cp.py --tiny --check            # CPU: gloo, Triton interpreter
    torchrun --nproc_per_node 4 examples/train_cp.py --tiny --attention causal --layout headtail --comm allgather
    torchrun --nproc_per_node 8 examples/train_cp.py --seq 131072 --attention document --comm ring   # GPUs: NCCL

The task (as in examples/train_toy.py): packed documents, each a random pattern of a few tokens
repeated to its end; after the first period every token can be copied from ``period`` positions
back in the same document, which only attention can do.

What context parallelism changes in a training step (the rest is an ordinary training loop):
  * the batch is made (or read) whole on every rank from the same seed, then each rank keeps its
    rows of the layout (``shard`` along the sequence dim of the tokens and targets); document ids,
    an input indexed by positions, stay whole (every rank passes the same ``doc``);
  * position embeddings take the global positions of the local rows (``layout.positions(rank)``);
  * attention is the only layer that mixes positions: ``attncc.distributed.attention`` on the
    local q, k, v; its backward sends dK/dV back to the ranks that own those rows;
  * the loss of each rank is the sum over its tokens divided by the tokens of the whole batch, and
    the gradients of the (replicated) weights are summed over the ranks (one all-reduce) - the
    same as the single-device gradient of the mean loss. With data parallelism on top, average over
    the data-parallel group as usual.

``--check`` compares, before the first update, the loss and every weight gradient with the same
model run on one device over the whole sequence (the module's plain ``attention``): exit status 1
when they differ by more than float32 noise (bf16 on GPUs: 5e-2 relative).
Under ``--tiny`` (or without CUDA) the model is tiny and float32 and the kernels run under Triton's
interpreter: ``--tiny --check --steps 3`` on two CPU processes took about 30 s on a two-core machine.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available() or "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attncc.distributed as cp  # noqa: E402

ATTENTIONS = {"causal": {}, "sliding_window": {"window": "window"}, "document": {}}


@dataclass(frozen=True)
class Config:
    attention: str = "document"
    layout: str = "auto"
    comm: str = "auto"
    vocab: int = 64
    batch: int = 1
    seq: int = 8192
    d_model: int = 512
    heads: int = 8
    kv_heads: int = 8
    layers: int = 2
    window: int = 1024
    max_period: int = 48
    min_doc: int = 256
    max_doc: int = 4096
    steps: int = 100
    lr: float = 3e-3
    seed: int = 0
    log_every: int = 10
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"


def tiny(cfg: Config) -> Config:
    return replace(cfg, vocab=16, batch=2, seq=min(cfg.seq, 48), d_model=32, heads=2, kv_heads=2, window=8,
                   max_period=5, min_doc=6, max_doc=20, dtype=torch.float32, device="cpu")


def make_batch(cfg: Config, step: int):
    """Tokens [B, N + 1] and document ids [B, N] (int32), the same on every rank (seeded by step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    B, N = cfg.batch, cfg.seq + 1
    tokens = torch.empty(B, N, dtype=torch.long)
    doc = torch.empty(B, N, dtype=torch.int32)
    for b in range(B):
        pos, d = 0, 0
        while pos < N:
            length = min(int(torch.randint(cfg.min_doc, cfg.max_doc + 1, (1,), generator=gen)), N - pos)
            period = int(torch.randint(2, cfg.max_period + 1, (1,), generator=gen))
            pattern = torch.randint(0, cfg.vocab, (period,), generator=gen)
            tokens[b, pos:pos + length] = pattern.repeat(length // period + 1)[:length]
            doc[b, pos:pos + length] = d
            pos, d = pos + length, d + 1
    return tokens, doc[:, :-1].contiguous()


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d, h, hkv = cfg.d_model, cfg.heads, cfg.kv_heads
        self.hd = d // h
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, (h + 2 * hkv) * self.hd, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, attend):
        B, n, _ = x.shape
        h, hkv, hd = self.cfg.heads, self.cfg.kv_heads, self.hd
        q, k, v = self.qkv(self.norm1(x)).split([h * hd, hkv * hd, hkv * hd], -1)
        q, k, v = (t.view(B, n, -1, hd).transpose(1, 2) for t in (q, k, v))
        o = attend(q, k, v)  # [B, h, n, hd]
        x = x + self.out(o.transpose(1, 2).reshape(B, n, -1))
        return x + self.mlp(self.norm2(x))


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens, positions, attend):
        x = self.embed(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, attend)
        return self.head(x)


def step_loss(cfg: Config, model: Model, module, tokens, doc, *, rank: int, world: int, group=None, single=False):
    """This rank's share of the mean next-token loss (the whole loss with ``single``)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    kwargs = {"doc": doc.to(cfg.device)} if cfg.attention == "document" else {}
    if cfg.attention == "sliding_window":
        kwargs["window"] = cfg.window
    n = inputs.shape[1]
    if single:
        positions = torch.arange(n, device=cfg.device)
        attend = lambda q, k, v: module.attention(q, k, v, **kwargs)  # noqa: E731
    else:
        # the layout depends on the document ids when it balances a document mask: made per batch
        lay = cp.make_layout(cfg.layout, n, world, module=module, batch=tokens.shape[0], **kwargs)
        inputs, targets = (cp.shard(t, lay, rank, dim=1) for t in (inputs, targets))
        positions = lay.positions(rank, device=cfg.device)
        attend = lambda q, k, v: cp.attention(q, k, v, module=module, group=group, layout=lay,  # noqa: E731
                                              comm=cfg.comm, **kwargs)
    with torch.autocast("cuda", dtype=cfg.dtype, enabled=cfg.device == "cuda" and cfg.dtype != torch.float32):
        logits = model(inputs.to(cfg.device), positions, attend)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(cfg.device).flatten(), reduction="sum")
    return loss / targets.new_tensor(tokens.shape[0] * n).to(cfg.device)


def sum_gradients(model: Model, group=None) -> None:
    """Each rank's weight gradients are its tokens' share: their sum is the whole batch's."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=group)
    at = 0
    for g in grads:
        g.copy_(flat[at:at + g.numel()].view_as(g))
        at += g.numel()


def check(cfg: Config, model: Model, module, rank: int, world: int) -> bool:
    """The first step's loss and gradients: context parallel vs one device on the whole sequence."""
    tokens, doc = make_batch(cfg, 0)
    model.zero_grad()
    loss = step_loss(cfg, model, module, tokens, doc, rank=rank, world=world)
    loss.backward()
    sum_gradients(model)
    dist.all_reduce(loss := loss.detach().clone())
    cp_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = step_loss(cfg, model, module, tokens, doc, rank=rank, world=world, single=True)
    ref.backward()
    tol = 1e-4 if cfg.dtype == torch.float32 or cfg.device != "cuda" else 5e-2
    worst = max(float((a - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
                for a, p in zip(cp_grads, model.parameters()))
    loss_diff = abs(float(loss) - float(ref.detach()))
    ok = loss_diff < tol and worst < tol
    if rank == 0:
        print(f"check: loss {float(loss):.6f} (one device {float(ref.detach()):.6f}, |diff| {loss_diff:.1e}); "
              f"max relative gradient difference {worst:.1e}: {'ok' if ok else 'FAILED'}", flush=True)
    model.zero_grad()
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attention", choices=sorted(ATTENTIONS), default=Config.attention)
    ap.add_argument("--layout", default=Config.layout, help="contiguous, headtail, balanced or auto")
    ap.add_argument("--comm", default=Config.comm, help="allgather, ring, ulysses or auto")
    ap.add_argument("--seq", type=int, default=Config.seq)
    ap.add_argument("--batch", type=int, default=Config.batch)
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--lr", type=float, default=Config.lr)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny float32 model on the CPU (Triton interpreter)")
    ap.add_argument("--check", action="store_true", help="compare the first step with one device; exit 1 on a mismatch")
    args = ap.parse_args(argv)

    cfg = Config(attention=args.attention, layout=args.layout, comm=args.comm, seq=args.seq, batch=args.batch,
                 steps=args.steps, lr=args.lr)
    if args.tiny or not torch.cuda.is_available():
        cfg = tiny(cfg)
    if args.kv_heads is not None:
        cfg = replace(cfg, kv_heads=args.kv_heads)
    if cfg.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        cfg = replace(cfg, device=f"cuda:{local}")
    # torch 2.13: torch._dynamo imported after init_process_group (the first optimizer imports it)
    # keeps the group alive past destroy_process_group, and gloo's threads then race the
    # interpreter's exit (an occasional SIGABRT, "terminate called without an active exception");
    # imported before, it does not
    import torch._dynamo  # noqa: F401
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.device.startswith("cuda"):
        cfg = replace(cfg, device="cuda")  # autocast takes the device type; tensors go to the current device
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    module = importlib.import_module(f"generated.{cfg.attention}")
    model = Model(cfg).to(cfg.device)
    if rank == 0:
        print(f"{world} ranks, {cfg.attention}, layout {cfg.layout}, comm {cfg.comm}, seq {cfg.seq}, "
              f"batch {cfg.batch}, {sum(p.numel() for p in model.parameters())} weights, {cfg.device}", flush=True)
    ok = True
    if args.check:
        ok = check(cfg, model, module, rank, world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start = time.perf_counter()
    for step in range(cfg.steps):
        tokens, doc = make_batch(cfg, step)
        loss = step_loss(cfg, model, module, tokens, doc, rank=rank, world=world)
        opt.zero_grad()
        loss.backward()
        sum_gradients(model)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            dist.all_reduce(total := loss.detach().clone())
            if rank == 0:
                print(f"step {step:4d}  loss {float(total):.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
    dist.barrier()  # nobody tears the group down while a peer still talks to it
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
