"""Probe sm90c22: what Triton specializes on a GPU and the interpreter never does (tests/probe_sm90c22.py).

On an sm90 GPU ``JITFunction.run`` turns an int argument equal to 1 into a constexpr (no ``.to()``:
session 20's ALiBi at one head), None arguments into constexprs, and marks ints divisible by 16 and
16-byte aligned pointers; CI runs the interpreter, which does none of it. The probe draws specs
(tests/probe_combo21.py's feature combinations at head dims 16, 17, 32, 64, 128 and Dv != D; the
shipped specs at 16, 64, 128, their Gluon forward and backward forced where a call allows) and calls
whose values trigger those specializations (one head, one batch row, B * H = 1, Nq / Nk of 1, 16,
17, 32, offsets and n_q / n_k of 1 and 16, int params of 0, 1, 16, float params and ``scale`` passed
as the int 1, packed sequences of one row, decode of one row from one key or one page, k / v of
batch 1, GQA, return_lse, learned inputs, float32 / float16 / bfloat16; linear attention at N of 1,
16, 17 with a state and steps), records every launch the host code makes with the GPU's tile configs,
and compiles each distinct one (kernel source + Triton's specialization) for sm90: TTGIR for every
launch, PTX (the cubin where attncc wrote inline assembly) once per kernel source, tile config and
16-bit dtype. The same calls run under the interpreter against attncc.reference, half of them at the
GPU's built-in tiles (64 x 64 forward and dK/dV, 128 x 32 dQ).

Probed (session 22, on 2 loaded cores; counts of distinct launches are by Launch.key, kernel source +
Triton's specialization):
- random specs and calls recorded and compiled for sm90 (seeds 0-334): 1051 distinct launches (forward,
  dK/dV, dQ, preprocess, RoPE rows, tile lists, decode and merge, dropout mask, linear scan / output /
  dq / dkdv / step, the Gluon ws forward, dK/dV, dQ, fused and pre / postprocess), every one to TTGIR,
  one per kernel source, tile config and 16-bit dtype on to PTX (cubin with inline assembly): clean;
- the special calls of all 24 shipped softmax specs (72 cases, 173 distinct launches, to PTX as above):
  one defect (below);
- the dropout seed as 1 (a constexpr), 16 and 0 through the forward, backward and dropout_keep_mask: clean;
- an int argument equal to 1 that starts a loop-carried value, and annotated (tl.float64 / tl.int64)
  parameters given 1: Triton handles both (no constexpr);
- under the interpreter against attncc.reference, the same calls of seeds 0-199 (half at the GPU's
  tiles) and 200 on (stopped at the deadline): clean but for the draws' own refusals (a divisor param
  drawn 0, BigBird's decode), dropout (random weights) and one bfloat16 dq at ``scale=1`` (seed 60, 26 %
  of a small |dq|: float32 matches).

Found:
- the dK/dV kernel at Nq = 1 under GQA (Hq > Hkv) did not compile for sm90 wherever its query-block walk
  is dense (dense, t5_bias, unmasked specs, on the tl backward): Nq = 1 is a constexpr on a GPU, the
  query-block loops fold away (0 and 1 trips), and Triton's pipeliner took the enclosing head-group loop
  and failed on its tensor descriptors ("'ttng.tensormap_create' op pipeliner doesn't know how to
  predicate this op", TTGIR). ``attncc.compile("specs/dense.toml").attention(q[1, 2, 1, 64], k[1, 1, 17,
  64], v).sum().backward()`` on an H100. Fixed: that loop is ``tl.range(0, GROUP, num_stages=1)``.

Here, in child processes as tests/test_sm90_compile.py: the defect's launch (t5_bias's first special
call) compiled to TTGIR; the special calls of every shipped spec (slow); and under the interpreter the
special calls of alibi, sliding_window and t5_bias against the reference (the fix changes no numbers).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernel_compile import without_interpreter

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "probe_sm90c22.py"


def _special_indices(names):
    """The special-call indices (tests/probe_sm90c22.py special_case) of the shipped specs ``names``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import probe_sm90c22 as probe

    n = len(probe.SPECIAL_CALLS)
    return [probe.SHIPPED.index(name) * n + i for name in names for i in range(n)]


FAST = ("alibi", "sliding_window", "t5_bias")  # a head-count helper, an int param, the defect's dense walk


def _record(seeds, stage):
    run = subprocess.run([sys.executable, str(PROBE), "--record", "--special", "--stage", stage,
                          "--seeds", ",".join(map(str, seeds))], env=without_interpreter(), cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return run.stdout


def test_dkdv_of_one_query_row_under_gqa_compiles_for_sm90():
    """t5_bias (a dense walk, the tl backward) at Nq = 1, Hq = 2, Hkv = 1: on a GPU Nq = 1 is a constexpr,
    the dK/dV kernel's query-block loops fold away (0 and 1 trips) and Triton's pipeliner took the head
    group's loop instead, failing on its tensor descriptors ("pipeliner doesn't know how to predicate this
    op", TTGIR). The interpreter ran it."""
    out = _record(_special_indices(("t5_bias",))[:1], "ttgir")
    assert "0 failures of 1" in out, out


@pytest.mark.slow
def test_every_shipped_specs_special_calls_compile_for_sm90():
    sys.path.insert(0, str(ROOT / "tests"))
    import probe_sm90c22 as probe

    out = _record(_special_indices(probe.SHIPPED), "ttgir")
    assert f"0 failures of {len(probe.SHIPPED) * len(probe.SPECIAL_CALLS)}" in out, out


@pytest.mark.parametrize("seed", _special_indices(FAST))
def test_special_calls_match_the_reference(seed, monkeypatch):
    import probe_sm90c22 as probe

    monkeypatch.setattr(probe, "SPECIAL", True)
    problems, desc = probe.interp_case(seed)
    assert not problems, (problems, desc)
