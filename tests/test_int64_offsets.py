"""No int32 product of a program id and a stride in any kernel (issue 15: past 2**31 elements).

A CUDA run at B = 9, H = 32, N = 65536, D = 128 (2.4e9 elements per tensor) read out of bounds:
``b * stride_qb`` and friends were int32 products. Such sizes do not fit a CPU test, so this test
compiles the kernels themselves for sm90 (tests/kernel_compile.py: Triton needs no GPU for it) and
inspects their IR: in a child process the generated modules run a set of calls (forward,
backward, decode, varlen, RoPE, dropout, block lists, the walks of issue 16: one and two closed-form
segments, calls that break a closed form's precondition (the LISTS loops), exact block lists and
their tile kernel, per sequence for varlen; linear attention) with every kernel launch
replaced by a compilation to TTIR, and every ``arith.muli`` on i32 is checked. One is an error
when one operand comes from ``tt.get_program_id`` and the other from a stride-like argument (a
stride, a row width, a length the rows are multiplied by), unless the program-id operand is a
position (it goes through q_offset / k_offset / n_q / n_k, or decode's CAPACITY: those calls switch
to int64 with the WIDE constexpr, see attncc.runtime.call.wide_positions).

tests/gpu/test_gpu_big.py runs the real thing on a GPU.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from early_child import EarlyChild
from kernel_compile import without_interpreter

ROOT = Path(__file__).resolve().parent.parent

# Arguments a program-id-derived index must not multiply in int32.
STRIDE_LIKE = re.compile(r"stride|_s\d+$|^list_|^(Nq|Nk|N|TOTAL_Q|N_KB)$")
# Positions: their arithmetic is int32 only when the host found it fits (WIDE otherwise; decode's
# positions run up to CAPACITY, and its WIDE covers the capacity and the inputs' extents).
POSITIONS = {"q_offset", "k_offset", "n_q", "n_k", "offset", "pos0", "position", "CAPACITY"}


# The child starts when collection ends (conftest.py, tests/early_child.py): it compiles on the core
# the tests before this module leave idle.
EARLY_CHILDREN = {"ir_report": EarlyChild("int64", lambda folder: [sys.executable, __file__, "--child"],
                                          lambda folder: without_interpreter(), timeout=900, cwd=ROOT)}


@pytest.fixture(scope="module")
def ir_report():
    outcome = EARLY_CHILDREN["ir_report"].result()
    assert outcome.returncode == 0, outcome.failure()
    return json.loads(outcome.stdout.strip().splitlines()[-1])


def test_no_int32_products_of_program_ids_and_strides(ir_report):
    report = ir_report
    kernels = report["kernels"]
    # every kind of kernel was compiled and looked at
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_dec_kernel", "_merge_kernel",
                 "_tk_kernel", "_exact_tiles_kernel", "_rope_rows_kernel", "_dropout_mask_kernel", "_scan", "_output",
                 "_dq", "_dkdv"):
        assert any(k.startswith(name + " ") for k in kernels), (name, sorted(kernels))
    assert not report["flagged"], "int32 products of program ids and strides:\n" + "\n".join(report["flagged"])


def test_the_ir_check_finds_an_int32_product():
    """The analysis itself: b * stride_qb in int32 is found, in int64 it is not."""
    text = """
  tt.func public @k(%Q: !tt.ptr<f32> loc("Q"(#loc)), %stride_qb: i32 loc("stride_qb"(#loc)), %q_offset: i32 loc(#loc)) {
    %pid = tt.get_program_id y : i32 loc(#loc1)
    %b = arith.divsi %pid, %c4 : i32 loc(#loc2)
    %off = arith.muli %b, %stride_qb : i32 loc(#loc3)
    %pos = arith.addi %q_offset, %pid : i32 loc(#loc3)
    %pos_off = arith.muli %pos, %stride_qb : i32 loc(#loc3)
    %b64 = arith.extsi %b : i32 to i64 loc(#loc4)
    %s64 = arith.extsi %stride_qb : i32 to i64 loc(#loc4)
    %off64 = arith.muli %b64, %s64 : i64 loc(#loc5)
    %x = tt.load %ptr : !tt.ptr<f32> loc(#loc6)
    %xs = arith.muli %x, %stride_qb : i32 loc(#loc3)
    %r:2 = scf.for %kb = %b to %c9 step %c1 iter_args(%a = %c0, %z = %x) -> (i32, i32)  : i32 {
      %kb_off = arith.muli %kb, %stride_qb : i32 loc(#loc7)
"""
    flagged = int32_products(text)
    assert len(flagged) == 2, flagged
    assert "%off = arith.muli %b, %stride_qb" in flagged[0] and "%kb_off = arith.muli %kb" in flagged[1]


# ---------------------------------------------------------------------------------------
# the IR analysis
# ---------------------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(%[\w.$-]+(?::\d+)?)\s*=\s*([\w.]+)\b(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_FOR = re.compile(r"^\s*(%[\w.$-]+)\s*=\s*(%[\w.$-]+)\s+to\s+(%[\w.$-]+)\s+step\s+(%[\w.$-]+)")  # after "scf.for"
_ITER = re.compile(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)")


def _strip_loc(text: str) -> str:
    return re.sub(r"\s+loc\((?:[^()]|\([^()]*\))*\)", "", text)


def int32_products(ttir: str):
    """The i32 ``arith.muli`` lines of a TTIR module that multiply a program-id-derived index (not
    a position) by a stride-like kernel argument."""
    args, defs, muls = set(), {}, []
    for raw in ttir.splitlines():
        line = _strip_loc(raw)
        if "tt.func" in line:
            args |= set(re.findall(r"(%[\w.$-]+):", line))
            continue
        m = _DEF.match(line)
        if not m:
            continue
        dest, op, rest = m.group(1).split(":")[0], m.group(2), m.group(3)
        if op == "scf.for":
            f = _FOR.search(rest)
            if f:
                defs.setdefault(f.group(1), ("scf.for.iv", []))[1].extend(f.group(2, 3, 4))
            for x, y in _ITER.findall(rest.split("iter_args", 1)[-1]):
                defs.setdefault(x, ("iter_arg", []))[1].append(y)
        operands = [v.split("#")[0] for v in _VALUE.findall(rest.split(" : ")[0])]
        defs.setdefault(dest, (op, []))[1].extend(operands)
        if op == "arith.muli" and re.search(r":\s*(i32|tensor<[^>]*xi32>)\s*$", rest):
            muls.append((line.strip(), operands[:2]))
    memo = {}

    def origins(v):
        if v in memo:
            return memo[v]
        memo[v] = set()
        out = set()
        if v in args:
            out.add("arg:" + v[1:])
        elif v in defs:
            op, operands = defs[v]
            if op == "tt.get_program_id":
                out.add("pid")
            elif op != "tt.load":  # a loaded value is data, not index arithmetic
                for o in operands:
                    out |= origins(o)
        memo[v] = out
        return out

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 100000))
    try:
        flagged = _flagged(muls, origins)
    finally:
        sys.setrecursionlimit(limit)
    return flagged


def _flagged(muls, origins):
    flagged = []
    for line, ops in muls:
        if len(ops) != 2:
            continue
        a, b = origins(ops[0]), origins(ops[1])
        for x, y in ((a, b), (b, a)):
            index = "pid" in x and not any(o[4:] in POSITIONS for o in x if o.startswith("arg:"))
            stride = any(o.startswith("arg:") and STRIDE_LIKE.search(o[4:]) for o in y)
            if index and stride:
                flagged.append(line)
                break
    return flagged


# ---------------------------------------------------------------------------------------
# the child process: calls whose launches compile to TTIR
# ---------------------------------------------------------------------------------------

def _child():
    from kernel_compile import compile_launch, recorded_launches

    with recorded_launches() as launches:
        _calls()
    kernels, flagged = [], []
    for launch in launches:
        label = launch.label("WIDE", "VARLEN", "PAGE_SIZE")
        kernels.append(label)
        flagged.extend(f"{label}: {line}" for line in int32_products(compile_launch(launch, "ttir").stages["ttir"]))
    print(json.dumps({"kernels": kernels, "flagged": flagged}))


def _calls():
    import importlib

    import torch

    mods = {n: importlib.import_module(f"generated.{n}") for n in
            ("causal", "document", "alibi_learned", "rope_causal", "causal_dropout", "bigbird", "t5_bias",
             "linear_elu", "sliding_window", "padding", "sink_window", "chunked_local", "neighborhood_2d")}
    os.environ["TRITON_INTERPRET"] = "1"  # attncc's host code takes CPU tensors (the launches are compiled only)
    os.environ["ATTNCC_DECODE_SPLITS"] = "3"  # decode merges splits: its merge kernel too

    def qkv(B=2, H=4, Hkv=2, N=96, D=64, dtype=torch.bfloat16, grad=True):
        return [torch.randn(B, h, N, D, dtype=dtype).requires_grad_(grad) for h in (H, Hkv, Hkv)]

    def fwd_bwd(mod, *a, **kw):
        o = mod.attention(*a, **kw)
        o = o[0] if isinstance(o, tuple) else o
        torch.autograd.grad(o.float().sum(), [t for t in a if t.requires_grad], allow_unused=True)

    for wide in (0, 2**31 - 50):
        kw = dict(q_offset=wide, k_offset=wide)
        fwd_bwd(mods["causal"], *qkv(), **kw)
        fwd_bwd(mods["rope_causal"], *qkv(), **kw)
        fwd_bwd(mods["causal_dropout"], *qkv(), seed=1, **kw)
        mods["causal_dropout"].dropout_keep_mask(*qkv(grad=False), seed=1, **kw)
        fwd_bwd(mods["sliding_window"], *qkv(), window=40, **kw)
        fwd_bwd(mods["padding"], *qkv(), kv_len=torch.tensor([wide + 50, wide + 90]), **kw)
        # the walks: two closed-form segments; a call breaking the precondition (window >= 1: the
        # LISTS loops and the exact lists); chunks; exact block lists (their tile kernel)
        fwd_bwd(mods["sink_window"], *qkv(), sinks=4, window=40, **kw)
        fwd_bwd(mods["sliding_window"], *qkv(), window=0, **kw)
        fwd_bwd(mods["chunked_local"], *qkv(), chunk=32, **kw)
        fwd_bwd(mods["neighborhood_2d"], *qkv(), width=12, radius=2, **kw)
    fwd_bwd(mods["document"], *qkv(), doc=torch.zeros(2, 96, dtype=torch.int64))
    fwd_bwd(mods["alibi_learned"], *qkv(), **{d.name: torch.rand(4, requires_grad=True)
                                              for d in mods["alibi_learned"].SPEC.inputs})
    fwd_bwd(mods["t5_bias"], *qkv(), rel_bias=torch.randn(4, 32, requires_grad=True))
    fwd_bwd(mods["bigbird"], *qkv(N=256))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    fwd_bwd(mods["causal"], *qkv(B=1), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=56, max_seqlen_k=56)
    fwd_bwd(mods["rope_causal"], *qkv(B=1), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=56, max_seqlen_k=56)
    for name, params in (("neighborhood_2d", dict(width=12, radius=2)), ("chunked_local", dict(chunk=-8))):
        # per-sequence exact lists (chunk = -8 breaks chunked_local's precondition chunk >= 1)
        fwd_bwd(mods[name], *qkv(B=1), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=56, max_seqlen_k=56, **params)
    with torch.no_grad():
        q, k, v = qkv(grad=False)
        for name in ("causal", "document", "rope_causal", "sink_window", "chunked_local"):
            extra = {"doc": torch.zeros(2, 96, dtype=torch.int32)} if name == "document" else {}
            mods[name].decode(q[:, :, :2], k, v, kv_len=[96, 50], **extra)
            pages = torch.randn(12, 16, 2, 64, dtype=torch.bfloat16)
            mods[name].decode(q[:, :, :2], pages, pages, kv_len=[96, 50], block_table=torch.arange(12, dtype=torch.int32).view(2, 6),
                              **extra)
    fwd_bwd(mods["linear_elu"], *qkv(dtype=torch.float32))
    with torch.no_grad():
        q, k, v = qkv(dtype=torch.float32, grad=False)
        mods["linear_elu"].step(q[:, :, 0], k[:, :, 0], v[:, :, 0])


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    from early_child import watch_parent

    watch_parent()
    _child()
