"""Probe 13: generated modules called from several Python threads at once, and the runtime's module-level
caches at their limits; the defects found, each with its test."""
from __future__ import annotations

import collections
import random
import threading
import types

import pytest
import torch

import attncc
from attncc.runtime import blocks
from cases import SMALL_PARAMS, heads_for, inputs_for, module, one_grid_at_a_time, pattern, rel_err


def _codes(call, block_m, block_n):
    return torch.full((1, 1, 2, 2), 3, dtype=torch.int8)


def _call(n):
    return types.SimpleNamespace(varlen=False, q=torch.empty(0), Nq=n, Nk=n, q_offset=0, k_offset=0, n_q=n, n_k=n,
                                 params={}, B=1, Hq=1)


class _EvictedAfterGet(collections.OrderedDict):
    """The exact-list cache as another thread changes it: every entry found is evicted right after."""

    def get(self, key, default=None):
        found = super().get(key, default)
        self.pop(key, None)
        return found


def test_exact_block_lists_survive_evictions_by_other_threads(monkeypatch):
    """A hit of the exact-list cache moved its key to the end after looking it up: when another thread
    evicted the key in between (threads serving calls of many shapes, the cache full), the call died
    with a KeyError naming the cache key. The lists found are returned as they are."""
    monkeypatch.setattr(blocks, "_exact_cache", _EvictedAfterGet())
    first = blocks.exact_block_lists(_codes, _call(16), 16, 16, per_head=False)
    again = blocks.exact_block_lists(_codes, _call(16), 16, 16, per_head=False)
    assert again is first


NAMES = ("document", "strided", "sliding_window", "bigbird", "alibi")


def test_threads_calling_generated_modules_get_the_reference(monkeypatch):
    """Threads calling the same modules at once, forward and backward, with shapes, offsets, params,
    scales and inputs of their own, each get the reference's answer: no call takes another's signature
    memo, config, bound launch or block lists. (Triton's interpreter runs one grid at a time: its
    program ids are global; the runtime's host code runs concurrently.)"""
    one_grid_at_a_time(monkeypatch)
    failures = []

    def worker(seed):
        rng = random.Random(seed)
        for step in range(3):
            name = NAMES[(seed + step) % len(NAMES)]
            p, mod = pattern(name), module(name)
            Hq, Hkv = heads_for(p)
            B, Nq, Nk = rng.randint(1, 2), rng.randint(1, 40), rng.randint(1, 40)
            pos = dict(q_offset=rng.choice([0, 3, 17]), k_offset=rng.choice([0, 5]))
            gen = torch.Generator().manual_seed(seed * 100 + step)
            kw = {k: rng.randint(1, v) for k, v in SMALL_PARAMS.get(name, {}).items()}
            kw.update(inputs_for(p, B, Hq, max(pos["q_offset"] + Nq, pos["k_offset"] + Nk), gen))
            if rng.random() < 0.5:
                kw["scale"] = rng.choice([0.3, 0.25])
            q, k, v = (torch.randn(B, h, n, 16, generator=gen) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            refs = [t.double().requires_grad_() for t in (q, k, v)]
            where = (name, B, Nq, Nk, pos, {a: b for a, b in kw.items() if not torch.is_tensor(b)})
            try:
                o = mod.attention(*ins, **pos, **kw)
                ref = attncc.reference(p, *refs, **pos, **kw)
                g = torch.randn(o.shape, generator=gen)
                grads = torch.autograd.grad((o * g).sum(), ins)
                ref_grads = torch.autograd.grad((ref * g.double()).sum(), refs)
                if not rel_err(o.detach(), ref.detach()) < 1e-4:
                    failures.append(("o", where))
                for label, x, r in zip("qkv", grads, ref_grads):
                    if not float((x.double() - r).abs().max()) <= 1e-4 + 1e-3 * float(r.abs().max()):
                        failures.append((f"d{label}", where))
            except Exception as e:  # noqa: BLE001 - reported with the call
                failures.append((repr(e), where))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
