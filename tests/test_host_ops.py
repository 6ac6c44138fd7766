"""What one call of a generated module does on the host, counted (issue 18): upper bounds per spec
and phase on the aten ops torch dispatches, the torch functions / tensor methods / attribute reads,
and the calls into torch from outside it (bench/host_overhead.py ``op_counts``, ``python -m bench
host --ops``). Launches are stubbed: what is left is attncc's host path and torch's. On the GPU each
of these costs host time (an aten op several us), so a change that adds one fails here; a change
that removes some should lower the bound (the counts print on failure).

Bounds are today's counts (CPU float16: no operand conversion): SDPA's f+b, the yardstick, is
1 + 7 aten ops; a do-nothing autograd.Function allocating o, the LSE and the gradients, 2 + 8.
"""
from __future__ import annotations

import pytest

from bench.host_overhead import KINDS, op_counts

# {spec: {phase: (aten, torch, calls)}}: "fwd" under torch.no_grad(), "fwd grad" the forward of a
# forward+backward, "bwd" its backward
# (forward calls: one of them torch._C._is_any_autocast_enabled, bind's check for torch.autocast, probe 19;
# session 20: a forward with a backward allocates the LSE in log2 units for it, one more kernel argument
# (empty_like, 2 version counters, ~8 attribute reads), the backward reads it and checks that it does not
# run under vmap (is_grads_batched: maybe_current_level, is_legacy_batchedtensor); the layouts of q, k, v
# kept for the backward, ~30 reads, were replaced by weak references; probe 22: run_attention asks
# dynamo whether a compiled function runs (get_eval_frame_callback), one call more: a call bound
# eagerly may be traced there; and per [inputs] tensor, Tensor.is_neg: a lazily negated table is read resolved;
# session 26: Tensor.is_neg of q, k, v per call, of dO (and dLSE) and is_compiling per backward, the same)
BOUNDS = {
    "causal": {"fwd": (2, 28, 20), "fwd grad": (3, 38, 24), "bwd": (8, 51, 26)},
    # the block lists: one buffer from the tile-list kernel, 4 views per orientation, the
    # document ids' version counter kept for the backward
    "document": {"fwd": (7, 40, 27), "fwd grad": (12, 56, 35), "bwd": (8, 52, 26)},
}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_host_ops_per_call_are_bounded(name):
    counts = op_counts(name)
    over = []
    for phase, bounds in BOUNDS[name].items():
        for kind, bound in zip(KINDS, bounds):
            got = counts[phase].total(kind)
            if got > bound:
                over.append(f"{phase} {kind}: {got} > {bound}: {getattr(counts[phase], kind)}")
    assert not over, f"{name}: more host work per call than pinned:\n" + "\n".join(over)


def test_op_counts_see_what_they_count():
    """The counters are live: SDPA's backward dispatches its backward op, autograd's Function
    machinery shows as calls, and attncc's backward allocates the three gradients."""
    sdpa = op_counts("sdpa")
    assert any("backward" in op for op in sdpa["bwd"].aten)
    causal = op_counts("causal")
    assert causal["fwd grad"].calls.get("Function.apply") == 1
    assert causal["bwd"].aten.get("aten::empty", 0) >= 3
    assert causal["fwd"].torch.get("torch.empty", 0) >= 2
