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

Probed clean (see the report of session 22): <filled in below by the sweep's numbers>.

Here: the probe's special calls (one query row at offset 16 under GQA, packed sequences of one row
with max_seqlen 1, decode of one row from one page with kv_len 1) for a few shipped specs, compiled
for sm90 to TTIR in a child process (as tests/test_sm90_compile.py; all of them: slow), and the same
calls under the interpreter against the reference.
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
