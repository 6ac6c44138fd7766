"""One (query chunk, key run) pair through a generated module's kernels, and the LSE merge.

A *key run* is one or more key chunks adjacent in position and in the buffer that holds them:
one kernel call with ``k_offset`` at the run's first position covers them all, and the kernel's
own plan, evaluated at those offsets, skips the empty tiles inside and runs the full ones
without mask code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import attncc.runtime as _rt
from attncc.core.tiles import EMPTY


@dataclass(frozen=True)
class PairCall:
    """What every kernel call of one distributed call shares: the launchers, the global length
    ``n`` (``n_q = n_k = n``), the softmax ``scale`` keyword and the params and inputs."""

    target: object  # classes.Target
    n: int
    scale: object
    kwargs: Dict[str, object]

    def bind(self, q, k, v, q_offset: int, k_offset: int):
        return _rt.bind(self.target.spec, q, k, v, return_lse=True, q_offset=q_offset, k_offset=k_offset,
                        n_q=self.n, n_k=self.n, scale=self.scale, kwargs=self.kwargs)

    def forward(self, q, k, v, q_offset: int, k_offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(o, lse) of the rows of ``q`` over the keys of ``k``, ``v`` alone (lse float32)."""
        return self.target.forward(self.bind(q, k, v, q_offset, k_offset))

    def backward(self, q, k, v, o, lse, do, q_offset: int, k_offset: int, dlse=None):
        """(dq, dk, dv) of this pair, given the rows' global ``o`` and ``lse`` (over every key) and the
        LSE's gradient ``dlse`` (or None): P is recomputed from the global LSE and delta =
        rowsum(do * o) - dlse from the global o, so the pairs' gradients sum to the single-device ones."""
        if self.target.backward is None:
            raise NotImplementedError(f"attncc: {self.target.spec.name} has no backward pass")
        call = self.bind(q, k, v, q_offset, k_offset)
        dq, dk, dv, _ = self.target.backward(call, o.contiguous(), lse.contiguous(), do.contiguous(),
                                             None if dlse is None else dlse.contiguous())
        return dq, dk, dv


def key_runs(classes: torch.Tensor, qc: int, chunks: Sequence[Tuple[int, int, int]]) -> Iterator[Tuple[int, int, int]]:
    """The runs of ``chunks`` that query chunk ``qc`` must visit: ``(first chunk, row start, row end)``
    in the buffer. ``chunks``: ``(chunk, row start, rows)`` in buffer order; EMPTY pairs
    (``classes[qc, chunk]``) are left out and split runs."""
    run: List[int] = []  # [first chunk, row start, row end, last chunk]
    for c, start, rows in chunks:
        if rows == 0 or int(classes[qc, c]) == EMPTY:
            if run:
                yield run[0], run[1], run[2]
            run = []
            continue
        if run and c == run[3] + 1 and start == run[2]:
            run[2], run[3] = start + rows, c
        else:
            if run:
                yield run[0], run[1], run[2]
            run = [c, start, start + rows, c]
    if run:
        yield run[0], run[1], run[2]


def merge_(o_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold the partial ``(o, lse)`` of some keys into the float32 accumulators of the same rows,
    in place: ``lse_acc <- log(exp(lse_acc) + exp(lse))``, ``o_acc`` the matching weighted mean.

    The stable form (no exponential of a large number): with ``d = lse_acc - lse``,
    ``lse_acc - logsigmoid(d)`` and ``o_acc - sigmoid(-d) * (o_acc - o)``. Rows without an allowed
    key (lse = -inf) on one side take the other side as it is (no NaN from -inf - -inf)."""
    lse = lse.to(torch.float32)
    acc_none = lse_acc == float("-inf")
    new_none = lse == float("-inf")
    d = torch.where(acc_none | new_none, torch.zeros_like(lse), lse_acc - lse)
    w = torch.sigmoid(-d)  # the new part's weight exp(lse) / (exp(lse_acc) + exp(lse))
    w = torch.where(acc_none, torch.ones_like(w), torch.where(new_none, torch.zeros_like(w), w))
    merged = torch.where(acc_none, lse, torch.where(new_none, lse_acc, lse_acc - F.logsigmoid(d)))
    o_acc.sub_(w.unsqueeze(-1) * (o_acc - o.to(torch.float32)))
    lse_acc.copy_(merged)


def merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """``(o, lse)`` of the union of two disjoint key sets from their partial results (float32);
    see :func:`merge_`."""
    o, lse = o1.to(torch.float32).clone(), lse1.to(torch.float32).clone()
    merge_(o, lse, o2, lse2)
    return o, lse
