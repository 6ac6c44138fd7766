"""Probe 20: [inputs] and [heads], systematically (tests/probe_inputs20.py is the seeded generator).

Probed: six specs compiled once each (S1-S6 in tests/probe_inputs20.py) declaring inputs of dims
["b", "n"], ["b"], ["h"], [5, "h"], ["h", 9], ["b", "h", "n"], [] (0-d), ["n"], ["b", "n", "n"],
["n", "n"], ["h", "b"], ["h", "n"], ["h", 4], ["b", "h", "n", 4], ["b", "n", 4], [6], ["b", "h"], of
dtypes bool, int8, int16, int32, int64, uint8, float16, bfloat16, float32, float64, grad = true on
float ones; read in masks, biases and transforms, inside where / min / max, as the index of
another table (tab[sel[h], h], on[ix[b, j]], tb[h, lvl[h, j] % 4]), with computed indices
(i // p, j // p, min(max(i - j + c, 0), 8), j - i + c out of range on both sides, n_k - 1 - j,
j - 2 under a guard), int input values in int64 arithmetic (int8 * 1000, uint8 differences
below 0), dot() over a fixed dim; passed contiguous, permuted, sliced with a step (2, 3) along
any dim with garbage between, at a storage offset, expanded (stride 0) along any subset of dims,
overlapping (as_strided with unit strides), read-only (numpy), sharing q's storage (one leaf for
q and a [b, h, n] table: its gradient the sum of both), in every other accepted dtype (a narrower
or wider int, the other signedness, ints for a bool input, any float for a float input); GQA
(H 1-6, Hkv dividing it; [heads] fixed at 4 / 2), B 1-3 with k / v of batch 1, offsets, n_q / n_k
larger than the call's, Nq != Nk, "n" dims sized to the exact minimum the doc allows (query
positions only for i-only reads, keys only for j-only reads). Each call: o, the LSE, dq, dk, dv
and each grad = true leaf against attncc.reference and against a float64 oracle written from the
doc (an index outside the extent reads 0 and passes no gradient), and the reference against the
oracle at 1e-9. 576 seeded cases (seeds 0-7, 100-159, 200-219, 300-307 of each spec): clean, but
for tolerances (a bfloat16 table expanded or overlapping: each entry of its view's gradient is
rounded to bfloat16 before autograd sums them, as for any torch op; S3's hb[h, b] * (i - j) in a
bfloat16 call, the table-times-distance error §1 documents). decode: 120 seeded calls (each spec,
seeds 0-19: contiguous and paged caches, kv_len from 0, rows at negative positions, the same
layouts), each row against attncc.reference on that row alone: clean. Refusals (every input of
every spec: 'b' of size 1 under B = 2, 'h' of the kv heads under GQA, 'n' one short of the doc's
minimum, a fixed dim + 1, a dim more / less, float / bool for int, int / bool / complex for float,
the meta device, a list, a missing input): kernels and reference raise the same error type, clean.
[heads]: fixed counts against calls of other counts (kernels, reference, decode) and the spec's own
refusals (0, negative, bool, float, string, > 65536, not a multiple, unknown key): clean. Int and bool
inputs changed in place between two calls (data-dependent tile lists): clean.

Found and fixed:
- An integer tensor of torch's wider unsigned types (uint16, uint32, uint64) crashed the call
  with NotImplementedError "aminmax_cpu" not implemented for 'UInt16' from the tile classifier
  (torch has few ops for these types) when passed to an int input of a narrower type (uint8):
  the rule "a wider integer tensor is read at its own width" kept it as it was. The reference
  accepted all three. Now uint16 and uint32 are read at a signed type holding them (int32,
  int64) and uint64, whose values no signed type holds, is refused by the kernels and the
  reference alike ("pass it as int64"), as it already was for an int32 input.
- attncc.reference cast a whole input tensor to float64 / int64 before indexing it: a table
  expanded (stride 0) to 2**40 positions, which the kernels read in place, made it allocate 8 TiB
  (RuntimeError). It casts the entries it reads now (evaluator.Evaluator.input).
- The kernels converted an input of another dtype than declared with .to(), which writes a dense
  copy of an expanded view: a bfloat16 table expanded to 2**40 positions in a float32 input (or an
  int8 one in an int16 input) failed the same way, and an HF-style mask expanded over heads was
  copied whole. call.converted converts the distinct entries and keeps the expansion.

Not fixed (by design, as torch): the backward of a grad = true input allocates a float32 gradient
of the passed view's full shape (autograd then sums an expansion), so a learned table expanded to
2**40 positions runs forward but not backward.
"""
from __future__ import annotations

import random

import pytest
import torch

import attncc
import probe_inputs20 as P


# --------------------------------------------------------------------------------------------
# torch's uint16 / uint32 / uint64 in integer inputs
# --------------------------------------------------------------------------------------------

def _s5_call(u8_dtype, x8_dtype=torch.int8):
    m, p = P.compiled(P.S5)
    B, H, N, D = 2, 2, 9, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    x8 = torch.randint(-128, 128, (B, N), generator=g)
    u8 = torch.randint(0, 256, (N,), generator=g)
    qr, kr = torch.randn(B, H, N, 4, generator=g) * 0.3, torch.randn(B, N, 4, generator=g) * 0.3
    want = attncc.reference(p, q.double(), k.double(), v.double(), x8=x8.to(torch.int8), u8=u8.to(torch.uint8),
                            qr=qr, kr=kr)
    kw = dict(x8=x8.to(x8_dtype), u8=u8.to(u8_dtype), qr=qr, kr=kr)
    return m, p, (q, k, v), kw, want


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32])
def test_wide_unsigned_int_input_is_read_exactly(dtype):
    """uint16 / uint32 ids in a uint8 input (a mask and a bias read them, in int64 arithmetic):
    the call crashed in the tile classifier (torch's aminmax has no kernel for these types)."""
    m, p, (q, k, v), kw, want = _s5_call(dtype)
    o = m.attention(q, k, v, **kw)
    assert float((o.double() - want).norm() / want.norm()) < 1e-5
    got = attncc.reference(p, q.double(), k.double(), v.double(), **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("declared", ["u8", "x8"])
def test_uint64_input_refused_by_kernels_and_reference(declared):
    """uint64 holds values past int64's (the kernels' and the reference's integer arithmetic):
    refused by both with the same TypeError, whatever the declared integer type."""
    m, p, (q, k, v), kw, _ = _s5_call(torch.uint8)
    kw[declared] = kw[declared].to(torch.int64).clamp_min(0).to(torch.uint64)
    with pytest.raises(TypeError, match="uint64.*int64"):
        m.attention(q, k, v, **kw)
    with pytest.raises(TypeError, match="uint64.*int64"):
        attncc.reference(p, q.double(), k.double(), v.double(), **kw)


# --------------------------------------------------------------------------------------------
# expanded tables the kernels read in place: attncc.reference read them whole
# --------------------------------------------------------------------------------------------

HUGE = """
name = "probe_in20_huge"
[inputs]
x = { dims = ["b", "n"], dtype = "float32", grad = true }
w = { dims = ["n"], dtype = "int16" }
[mask]
where = "w[j] != 3 or j == i"
[score]
bias = "x[b, i] * (j - i) * 0.1 + x[b, j]"
"""


def test_reference_reads_an_expanded_table_in_place():
    """A per-position table expanded (stride 0) to 2**40 positions: the kernels read it in place,
    attncc.reference cast the whole tensor to float64 / int64 before indexing it (8 TiB: a
    RuntimeError from the allocator). It casts the entries it reads now."""
    m, p = attncc.compile(HUGE), attncc.parse_spec(HUGE)
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 11, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    xs = torch.randn(B, 1, generator=g)
    ws = torch.tensor([3], dtype=torch.int16)
    huge = dict(x=xs.expand(B, 2**40), w=ws.expand(2**40))
    small = dict(x=xs.double().expand(B, N), w=ws.expand(N))
    want = attncc.reference(p, q.double(), k.double(), v.double(), **small)
    got = attncc.reference(p, q.double(), k.double(), v.double(), **huge)
    assert torch.allclose(got, want, atol=1e-6)
    o = m.attention(q, k, v, **huge)
    assert float((o.double() - want).norm() / want.norm()) < 1e-5
    # (a backward needs the gradient of every entry of the view, as for any torch op: not at 2**40)


def test_expanded_table_of_another_dtype_stays_expanded():
    """A bfloat16 / int8 table expanded to 2**40 positions, in a float32 / int16 input: the call
    converted it with .to(), which writes a dense copy of the whole view (RuntimeError from the
    allocator); it converts the distinct entries and keeps the expansion now."""
    m, p = attncc.compile(HUGE), attncc.parse_spec(HUGE)
    g = torch.Generator().manual_seed(1)
    B, H, N, D = 2, 2, 11, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    xs = torch.randn(B, 1, generator=g).to(torch.bfloat16)
    ws = torch.tensor([3], dtype=torch.int8)
    want = attncc.reference(p, q.double(), k.double(), v.double(), x=xs.expand(B, N), w=ws.expand(N))
    o = m.attention(q, k, v, x=xs.expand(B, 2**40), w=ws.expand(2**40))
    assert float((o.double() - want).norm() / want.norm()) < 1e-5


# --------------------------------------------------------------------------------------------
# seeded regression cases of the generator (clean): forward, LSE, every gradient, decode, refusals
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("spec", sorted(P.SPECS))
def test_seeded_calls(spec, seed):
    problems, desc = P.run(P.SPECS[spec], seed)
    assert not problems, (problems, desc)


@pytest.mark.parametrize("spec", ["S1", "S4", "S6"])
def test_seeded_decode(spec):
    problems, desc = P.run_decode(P.SPECS[spec], 2)
    assert not problems, (problems, desc)


@pytest.mark.parametrize("spec", ["S1", "S2", "S5"])
def test_refusals(spec):
    """'b' of size 1, 'h' of the kv heads, 'n' one short, a fixed dim off by one, a dim more or less,
    a float / bool for an int input, an int / bool / complex for a float input, another device, a
    list, a missing input: the kernels and attncc.reference raise the same error type."""
    assert not P.check_refusals(P.SPECS[spec])
