"""Probe 19 (real sizes): index arithmetic and launch shapes of the generated kernels at the sizes an
H100 user calls (long sequences, many heads, packed batches of thousands of sequences, big decode
batches), checked on the CPU.

Probed (by reading every template, attncc/runtime/gluon, runtime/decode.py, runtime/blocks.py and the
tile-list kernel; tests/gpu/test_gpu_big.py already covers tensors past 2**31 elements in the
[B, H, N, D] layout, decode caches past 2**31, a packed batch past 2**31 and positions past 2**31):

- FOUND, fixed: every kernel put B x H (forward, dQ, RoPE pre-pass, linear attention's six kernels),
  B x Hkv (dK/dV, decode: B x Hkv x head chunks) on grid axis 1, or on axis 2 (the exact tile-code
  kernel: B x H of per-head masks; dropout_keep_mask). CUDA caps axes 1 and 2 at 65535, so any call
  with B x H > 65535 failed with "RuntimeError: Triton Error [CUDA]: invalid argument": a packed batch
  of 2048 sequences x 32 heads (65536), a ViT batch of 5462 images x 12 heads, decode of 2048 rows x
  32 kv heads. The grids are now (blocks, H, B) (the kernels read b * H + h from two axes;
  templates/walks.j2 dispatch), the tile-code and dropout-mask kernels fold B x H into axis 0, the
  Gluon backward (whose grids keep B x H on axis 1) hands such calls to the tl backward, and B or H
  past 65535 (a packed batch of more than 65535 sequences) is refused at bind with a clear error.
  Shown here by recording every launch's grid (the launches are not run) at B x H = 65792.
- FOUND, fixed: linear attention's state scan (_scan) computed its row index r = c * CHUNK + rows in
  int32 and multiplied it by the row stride in int32 (not a program-id product, so
  tests/test_int64_offsets.py did not flag it). The row stride of a [B, N, H, D] view (q.transpose(1,
  2), Hugging Face's layout) is H * D: at H * D = 4096 the offsets wrapped past N = 524288 rows (B = 1,
  N = 2**19 + 1, H = 32, D = 128: a 4.3 GB bf16 tensor), and for contiguous [B, H, N, D] at N * D
  >= 2**31 (N = 2**25, D = 64). _output_dot_grad likewise at N * Dv >= 2**31. Both int64 now; shown
  by evaluating the kernels' index expressions under the interpreter's int32 arithmetic.
- Clean (read, no finding): the softmax forward / backward (int64 b, h, rows via _rows_ptrs, varlen
  starts int64, lse rows bh * Nq in int64), decode (int64 pages, slots, rows; the merge kernel's
  int64 rows), block lists (int64 row * width), the tile-list kernel's offsets (int64 row * width;
  its row counts bounded by the input's size), Gluon's 4-D TMA descriptors (int32 coordinates
  per dim), the preprocess / postprocess (int64), the persistent Gluon forward (1-D grid).
- Not fixed (host memory, not a wrong answer): block lists are dense [Bl, Hl, rows, width] int32,
  and the torch classification path allocates ~40 bytes per tile (rank, slot, idx for both classes),
  so a data-dependent mask at N = 1M with 128 x 64 tiles (1.3e8 tiles per grid) takes ~5 GB per
  grid and per direction on the torch path; masks reading h multiply that by H.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cases import module, rel_err

MAX_AXIS = 65535


@pytest.fixture
def grids(monkeypatch):
    """Every interpreted kernel launch's (kernel name, grid), the kernels themselves not run."""
    from triton.runtime import interpreter

    seen = []

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(kwargs) if callable(grid) else grid
        seen.append((self.fn.__name__, tuple(g) + (1,) * (3 - len(tuple(g)))))

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    return seen


def _check(seen, names):
    launched = {n for n, _ in seen}
    assert set(names) <= launched, (names, launched)
    bad = [(n, g) for n, g in seen if g[1] > MAX_AXIS or g[2] > MAX_AXIS or g[0] > 2**31 - 1]
    assert not bad, f"grids past CUDA's limits (axes 1, 2 <= {MAX_AXIS}): {bad}"


B, H = 256, 257  # B x H = 65792 > 65535


def test_softmax_grids_within_cuda_limits(grids):
    causal = module("causal")
    q, k, v = (torch.randn(B, H, 2, 16).requires_grad_() for _ in range(3))
    o = causal.attention(q, k, v)
    torch.autograd.grad(o.sum(), (q, k, v))
    _check(grids, {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"})


def test_rope_and_dropout_grids_within_cuda_limits(grids):
    q, k, v = (torch.randn(B, H, 2, 16) for _ in range(3))
    module("rope_causal").attention(q, k, v)
    module("causal_dropout").dropout_keep_mask(q, k, v, seed=3, dropout_p=0.5)
    _check(grids, {"_rope_rows_kernel", "_dropout_mask_kernel"})


def test_varlen_grids_within_cuda_limits(grids):
    """A packed batch of 4100 sequences x 16 heads (65600 (sequence, head) pairs)."""
    S, Hh = 4100, 16
    q, k, v = (torch.randn(1, Hh, S, 16) for _ in range(3))
    cu = torch.arange(S + 1, dtype=torch.int32)
    module("causal").attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1)
    _check(grids, {"_fwd_kernel"})


def test_decode_grids_within_cuda_limits(grids):
    Bd, Hkv = 2100, 32  # 67200 (row, kv head) programs
    q = torch.randn(Bd, Hkv, 1, 16)
    kc, vc = (torch.randn(Bd, Hkv, 4, 16) for _ in range(2))
    module("causal").decode(q, kc, vc, kv_len=torch.full((Bd,), 3))
    _check(grids, {"_dec_kernel"})


def test_linear_grids_within_cuda_limits(grids):
    lin = module("linear_elu")
    q, k, v = (torch.randn(B, H, 2, 16).requires_grad_() for _ in range(3))
    o = lin.attention(q, k, v)
    torch.autograd.grad(o.sum(), (q, k, v))
    _check(grids, {"_scan", "_output", "_dq", "_dkdv"})


def test_exact_tile_codes_grid_within_cuda_limits(grids, tmp_path):
    """A static mask that reads h (exact lists per head): the tile-code kernel's grid."""
    from cases import build_inline

    _, mod = build_inline({"big19_heads": '[mask]\nwhere = "(j <= i) and (i - j) % (h + 2) == 0"\n'},
                          tmp_path)["big19_heads"]
    q, k, v = (torch.randn(B, H, 2, 16) for _ in range(3))
    try:
        mod.attention(q, k, v)
    except Exception:  # the lists of unrun kernels are garbage: only the launches matter
        pass
    _check(grids, {"_exact_tiles_kernel"})


@pytest.mark.parametrize("rows", [65536, 70000])
def test_more_sequences_or_heads_than_a_grid_axis_are_refused(rows, grids):  # grids: old code ran no kernel
    causal = module("causal")
    q = torch.randn(1, 1, rows, 8)
    cu = torch.arange(rows + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="65535"):
        causal.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1, max_seqlen_k=1)
    with pytest.raises(ValueError, match="65535"):
        causal.attention(torch.randn(1, rows, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))


def test_gluon_backward_refuses_batches_past_a_grid_axis():
    from attncc.runtime import backend

    class FakeCall:
        B, Hq, D = 2048, 33, 128

    assert backend._backward_signature_problems(FakeCall())
    assert "65535" in backend._backward_signature_problems(FakeCall())[0]


def _scan_row_offset(c: int, chunk: int, stride: int):
    """The scan's row offset of chunk ``c`` (last row) as the rendered kernel computes it, evaluated
    with the interpreter's numpy arithmetic (int32 program values, int32 strides)."""
    import re
    from pathlib import Path

    src = Path(module("linear_elu").__file__).read_text()
    scan = src[src.index("def _scan("):src.index("def _output(")]
    line = re.search(r"\n\s*r = (.*?)(?:  #.*)?\n", scan).group(1)
    env = {"c": np.int32(c), "CHUNK": chunk, "rows": np.arange(chunk, dtype=np.int32),
           "tl": type("tl", (), {"int64": np.int64})}

    def to(x, dtype):
        return np.asarray(x).astype(dtype)

    expr = re.sub(r"(\w+)\.to\(tl\.int64\)", r"to(\1, np.int64)", line)
    r = eval(expr, {"np": np, "to": to}, env)  # noqa: S307 - the rendered module's own expression
    with np.errstate(over="ignore"):
        return int((r[-1:] * np.int32(stride))[0])


def test_linear_scan_row_offsets_are_int64():
    """N = 2**19 + 64 rows of a [1, N, 32, 128] view (row stride 4096): the last chunk's row offset."""
    chunk, stride = 64, 32 * 128
    c = (2**19 + 64) // chunk - 1
    want = (c * chunk + chunk - 1) * stride
    assert want > 2**31
    assert _scan_row_offset(c, chunk, stride) == want


def test_small_calls_still_match_the_reference():
    """A few seeded calls through the re-gridded kernels (B, H > 1, GQA, varlen, decode) against the
    reference: the (blocks, H, B) grids index the same b, h as before."""
    import attncc
    from cases import pattern

    gen = torch.Generator().manual_seed(19)
    for name in ("causal", "sliding_window"):
        p, mod = pattern(name), module(name)
        q = torch.randn(3, 4, 37, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(3, 2, 37, 16, generator=gen, requires_grad=True) for _ in range(2))
        kw = {"window": 9} if name == "sliding_window" else {}
        o = mod.attention(q, k, v, **kw)
        ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref = attncc.reference(p, *ref_in, **kw)
        assert rel_err(o, ref) < 1e-3, name
        do = torch.randn_like(o)
        for a, b in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, ref_in, do.double())):
            assert rel_err(a, b) < 1e-3, name
    causal = module("causal")
    q, kc, vc = torch.randn(3, 4, 2, 16, generator=gen), torch.randn(3, 2, 40, 16, generator=gen), torch.randn(3, 2, 40, 16, generator=gen)
    lens = [40, 7, 23]
    o = causal.decode(q, kc, vc, kv_len=torch.tensor(lens))
    for b, n in enumerate(lens):
        ref = attncc.reference(pattern("causal"), q[b:b + 1].double(), kc[b:b + 1, :, :n].double(),
                               vc[b:b + 1, :, :n].double(), q_offset=n - 2)
        assert rel_err(o[b:b + 1], ref) < 1e-3, b
