"""Probe 23 of the call API as an adversarial PyTorch / FlashAttention / FlexAttention user:
attention(), decode(), packed calls and attncc.reference, against the float64 reference and
against what SDPA does with the same call.

Probed clean (interpreter, seeded, tiny sizes):
- packed (cu_seqlens) calls in FlashAttention's own layouts, 100 seeded cases: q, k, v as
  ``[total, H, D].transpose(0, 1)[None]`` views, as slices of one fused ``[total, 3, H, D]`` qkv
  tensor, at a storage offset; cu_seqlens int32 / int64 and strided; sequences of length 0 and 1,
  padding rows past the last sequence, cu_seqlens_q != cu_seqlens_k, max_seqlen exact or larger,
  GQA 1-3, Dv != D, float16; 11 specs (causal, windows, ALiBi, softcap, bottom-right causal,
  RoPE, T5 and learned-ALiBi tables with gradients, prefix LM, chunks): o, LSE and every gradient
  from o and the LSE;
- packed calls (against the reference's packed calls, below) of masks and biases that read ``b``
  and ``h`` themselves, ``[b, h]``, ``[b, n]`` float16 learned and ``[h, b]`` tables, bottom-right
  causal and softcaps, GQA 1-3, float16, 112 seeded cases (o, LSE, every gradient); int8 / int16 /
  int32 / int64 / uint8 ``[b, n]`` and bool / uint8 / int32 ``[h, b]`` tables transposed, strided, at an
  offset or expanded, 12; all-empty sequences, sequences without keys or without queries (4);
- packed calls of masks that read n_q / n_k outside a closed form (``j % 5 == n_k % 5``,
  ``(i + j + n_q) % 4 == 0``, ...: exact block lists at placeholder lengths), 20 cases;
- decode, 40 seeded cases: contiguous and paged caches (page sizes 16, 17, 24) stored BNHD-
  transposed, at a storage offset or with a stride-2 head dim, block tables int32 / int64 and
  transposed, kv_len as a tensor or a list, rows of length 0, GQA groups 1-3, float16;
- lowered tile dots (``dot(qr[b, h, i, :], kr[b, j, :])``), 80 seeded cases: each operand
  permuted, stride-2, at an offset or expanded (stride 0) along b or h, declared float32 and
  passed float16 / bfloat16 / float64, with q_offset, GQA, gradients of both operands; also
  packed and in decode;
- autograd: retain_graph=True and a second backward (gradients doubled, learned tables, document
  and block-list specs, residue / column splits); o or the LSE changed in place before the
  backward (autograd's error);
- -inf in bias / mod tables (whole rows, whole columns, a row term, a column term): o, LSE and
  gradients equal the reference's, no NaN;
- dropout_keep_mask beside attention (GQA, k, v of batch 1, offsets, float16 / bfloat16) and the
  reference given that mask, o and gradients (3); channels_last q, k, v and a [b, h, n, n] learned
  bias table (float32, float16);
- sizes of one that are a huge stride (2**40 on a batch dim of 1, q and tables; 2**35 on decode's
  query row); numbers as tensors of other dtypes for scale= (float16, int, [1] and [1, 1] shapes);
  FlashAttention / SDPA / FlexAttention keywords passed to attention().

Seen, not changed: ``scale=1e38`` (allowed: ``scale * log2(e)`` is within float32) makes scores of
q.k past 2.4 overflow float32 in the kernels (o NaN) where the float64 reference is finite; SDPA's
float32 math gives NaN there too. An input table holding +inf makes its rows NaN (o in both), the
kernels' LSE NaN where the reference's is +inf (documented, docs §1 "Non-finite values").

Found and fixed:
- ``attncc.reference`` refused ``cu_seqlens_q`` / ``cu_seqlens_k`` / ``max_seqlen_*`` ("unexpected
  keyword"), where docs/spec-language.md §6 says it takes the same keywords as ``attention``: a packed
  call had no oracle but a loop written by hand, which gets ``b`` wrong for a spec that reads ``b``
  (``0.3 * b``, a sequence's own row of a ``[b, n]`` table: sliced per sequence, ``b`` is 0). It takes
  them now (attncc._reference._packed), with attention's checks of the cu_seqlens.
- Likewise for a linear pattern: ``initial_state``, ``return_state`` and the performer's ``seed`` were
  "unexpected keyword" (chunked linear attention had no oracle), while ``scale=``, ``dropout_p=`` and
  ``keep_mask=``, which linear attention refuses, were taken and ignored without a word. The
  reference takes linear attention's keywords now (attncc._reference._linear) and refuses the others.
- The reference took ``q_offset=2.5``, ``q_offset=True``, ``return_lse=1``, negative offsets, an ``n_q`` /
  ``n_k`` shorter than the rows and positions past 2**62, all of which attention refuses (docs §6 says
  the reference takes numbers as a call does and refuses booleans): with ``j - n_k <= i - n_q`` a short
  ``n_q`` moved the mask, silently. It checks them as a call does now (attncc._reference._positions).
- The reference raised ZeroDivisionError for a head dim of 0 (its default scale 1/sqrt(D)) and
  computed empty outputs for Dv = 0 or 0 query heads; a ValueError now, as attention's.
- FlashAttention's keywords (``cu_seqlens``, ``max_seqlen``, ``block_table``, ``cache_seqlens``,
  ``seqused_k``, ``softcap``, ``alibi_slopes``, ``sm_scale``, ``return_attn_probs``) got "unexpected
  keyword(s) ...; known inputs and params: none" with no way out, where FlexAttention's and SDPA's say
  what to write (attncc.core.semantics.FOREIGN_KEYWORDS): they do too now.
- ``attncc.reference("specs/causal.toml", q, k, v)`` (or TOML text, a dict, a generated module or its
  SPEC) raised AttributeError "'str' object has no attribute 'heads_q'"; a TypeError now that names
  attncc.load_spec / attncc.parse_spec (reference() and pair_mask()).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import attncc
from cases import module, pattern, rel_err


def _packed_case(seed):
    """A seeded packed batch: cu_seqlens (some sequences empty, rows past the last), q, k, v."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    S = rng.randint(1, 4)
    lq = [rng.choice([0, 1, rng.randint(1, 12)]) for _ in range(S)]
    lk = [rng.choice([0, 1, rng.randint(1, 12)]) for _ in range(S)]
    cu_q, cu_k = ([0] + torch.tensor(lens).cumsum(0).tolist() for lens in (lq, lk))
    Tq, Tk = cu_q[-1] + rng.choice([0, 2]), cu_k[-1] + rng.choice([0, 1])
    Hkv = rng.choice([1, 2])
    Hq = Hkv * rng.choice([1, 2])
    q = torch.randn(1, Hq, Tq, 8, generator=gen)
    k, v = (torch.randn(1, Hkv, Tk, 8, generator=gen) for _ in range(2))
    dtype = rng.choice([torch.int32, torch.int64])
    return S, torch.tensor(cu_q, dtype=dtype), torch.tensor(cu_k, dtype=dtype), q, k, v, gen


# A spec that reads b itself and a [b, n] table: in a packed call b is the sequence's index
READS_B = ('[inputs]\nrb = { dims = ["b", "n"], dtype = "float32", grad = true }\n'
           '[mask]\nwhere = "j - n_k <= i - n_q"\n[score]\nbias = "0.3 * b + rb[b, j] + 0.1 * h"\n')


@pytest.mark.parametrize("seed", range(4))
def test_reference_takes_packed_calls(seed):
    """attncc.reference(..., cu_seqlens_q=, cu_seqlens_k=) equals the module's packed call, o, the LSE
    and the gradients of q, k, v and a learned [b, n] table (it raised TypeError "unexpected keyword")."""
    m, p = attncc.compile(READS_B), attncc.parse_spec(READS_B)
    S, cu_q, cu_k, q, k, v, gen = _packed_case(seed)
    rb = torch.randn(S, max(q.shape[2], k.shape[2], 1), generator=gen)  # "n" covers max_seqlen
    leaves = [t.requires_grad_() for t in (q, k, v, rb)]
    packing = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if seed % 2:
        packing.update(max_seqlen_q=int((cu_q[1:] - cu_q[:-1]).max()) + 1, max_seqlen_k=rb.shape[1])
    o, lse = m.attention(q, k, v, rb=rb, return_lse=True, **packing)
    r, r_lse = attncc.reference(p, q, k, v, rb=rb, return_lse=True, **packing)
    assert r.shape == o.shape and r_lse.shape == lse.shape == (1, q.shape[1], q.shape[2])
    assert rel_err(o.detach(), r.detach()) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    finite = torch.isfinite(r_lse)
    assert torch.allclose(lse.double()[finite], r_lse[finite], rtol=0, atol=1e-5)
    go = torch.randn(o.shape, generator=gen)

    def loss(o, lse):
        return (o.double() * go.double()).sum() + torch.where(torch.isfinite(lse), lse.double(), 0).sum()

    if not r.requires_grad:  # every sequence empty
        return
    got = torch.autograd.grad(loss(o, lse), leaves, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(loss(r, r_lse), leaves, allow_unused=True, materialize_grads=True)
    for label, a, b in zip(("q", "k", "v", "rb"), got, want):
        assert rel_err(a, b) < 1e-4, label


def test_reference_packed_equals_its_sequences_and_dropout():
    """Packed reference = the reference of each sequence alone (a spec that reads no b), rows past the
    last sequence 0; a packed dropout call's keep mask is the padded batch's (row s for sequence s),
    as the kernels draw it."""
    mod, p = module("causal_dropout"), pattern("causal_dropout")
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 4, 4, 13, 14])
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    packed = attncc.reference(p, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for a, b in zip(cu.tolist(), cu[1:].tolist()):
        alone = attncc.reference(p, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        assert torch.equal(packed[:, :, a:b], alone)
    assert not packed[:, :, 14:].any()
    shape = (4, 2, 9, 8)  # the padded batch: 4 sequences of at most 9 rows
    keep = mod.dropout_keep_mask(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), seed=3, dropout_p=0.4)
    o = mod.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, seed=3, dropout_p=0.4)
    r = attncc.reference(p, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, keep_mask=keep, dropout_p=0.4)
    assert rel_err(o, r) < 1e-5 and rel_err(r, packed) > 0.1


BAD_PACKING = [
    (dict(cu_seqlens_q=torch.tensor([0, 5, 9])), ValueError),                                  # one of two
    (dict(cu_seqlens_q=torch.tensor([0, 5, 9]), cu_seqlens_k=torch.tensor([0, 5, 9]), max_seqlen_q=3), ValueError),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3]), cu_seqlens_k=torch.tensor([0, 5, 3])), ValueError),  # decreasing
    (dict(cu_seqlens_q=torch.tensor([1, 5]), cu_seqlens_k=torch.tensor([1, 5])), ValueError),        # not from 0
    (dict(cu_seqlens_q=torch.tensor([0, 50]), cu_seqlens_k=torch.tensor([0, 5])), ValueError),       # past the rows
    (dict(cu_seqlens_q=torch.tensor([0, 5, 9]), cu_seqlens_k=torch.tensor([0, 9])), ValueError),     # S differs
    (dict(cu_seqlens_q=torch.tensor([0.0, 5.0]), cu_seqlens_k=torch.tensor([0, 5])), TypeError),
    (dict(cu_seqlens_q=torch.tensor([0, 5]), cu_seqlens_k=torch.tensor([0, 5]), q_offset=2), ValueError),
]


@pytest.mark.parametrize("kw, error", BAD_PACKING)
def test_reference_refuses_the_packed_calls_attention_refuses(kw, error):
    m, p = module("causal"), pattern("causal")
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(error):
        m.attention(q, q, q, **kw)
    with pytest.raises(error):
        attncc.reference(p, q, q, q, **kw)
    with pytest.raises(TypeError, match="softmax"):  # linear attention takes no packed sequences
        attncc.reference(pattern("linear_elu"), q, q, q, cu_seqlens_q=torch.tensor([0, 9]),
                         cu_seqlens_k=torch.tensor([0, 9]))
    with pytest.raises(ValueError):  # q of batch 2
        attncc.reference(p, q.expand(2, -1, -1, -1), q, q, cu_seqlens_q=torch.tensor([0, 9]),
                         cu_seqlens_k=torch.tensor([0, 9]))


LINEAR_NONCAUSAL = 'kind = "linear"\n[feature_map]\nname = "relu"\ncausal = false\n'


@pytest.mark.parametrize("name", ["linear_elu", "performer", "noncausal"])
def test_reference_takes_linear_attentions_keywords(name):
    """attncc.reference of a linear pattern takes its attention()'s initial_state, return_state and the
    performer's seed (it raised "unexpected keyword"), and equals the module's o, states and the
    gradients of the initial state; two chunks carrying the state equal one call."""
    if name == "noncausal":
        m, p = attncc.compile(LINEAR_NONCAUSAL), attncc.parse_spec(LINEAR_NONCAUSAL)
    else:
        m, p = module(name), pattern(name)
    gen = torch.Generator().manual_seed(len(name))
    q = torch.randn(1, 2, 9, 8, generator=gen)
    k, v = torch.randn(1, 1, 9, 8, generator=gen), torch.randn(1, 1, 9, 4, generator=gen)
    kw = {"seed": 7} if name == "performer" else {}
    o1, state = m.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], return_state=True, **kw)
    r1, r_state = attncc.reference(p, q[:, :, :5], k[:, :, :5], v[:, :, :5], return_state=True, **kw)
    s0 = [t.clone().requires_grad_() for t in state]
    r0 = [t.detach().double().requires_grad_() for t in state]
    later = dict(q_offset=5, k_offset=5, return_state=True, **kw)
    o2, state2 = m.attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], initial_state=s0, **later)
    r2, r_state2 = attncc.reference(p, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], initial_state=r0, **later)
    for got, want in zip((o1, *state, o2, *state2), (r1, *r_state, r2, *r_state2)):
        assert rel_err(got.detach(), want.detach()) < 1e-5
    if p.feature_map.causal:  # the reference's chunks, carrying its own state, equal its one call
        r2_own = attncc.reference(p, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], initial_state=r_state, **later)[0]
        assert rel_err(torch.cat([r1, r2_own], 2), attncc.reference(p, q, k, v, **kw)) < 1e-12
    grads = torch.autograd.grad((o2 * o2).sum() + state2[0].sum() + state2[1].pow(2).sum(), s0)
    want = torch.autograd.grad((r2 * r2).sum() + r_state2[0].sum() + r_state2[1].pow(2).sum(), r0)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, want))


BAD_STATE = (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 7))  # z of 7 features, not 8


@pytest.mark.parametrize("kw, error", [(dict(seed=3), TypeError), (dict(return_state=1), TypeError),
                                       (dict(initial_state=(torch.zeros(1, 1, 8, 8),)), TypeError),
                                       (dict(initial_state=BAD_STATE), ValueError),
                                       (dict(scale=0.5), TypeError), (dict(dropout_p=0.1), TypeError)])
def test_reference_refuses_what_linear_attention_refuses(kw, error):
    """As linear attention's call: seed= of a map without a projection, a return_state that is not a
    bool, a malformed state; and scale= / dropout_p=, which the reference took and ignored."""
    m, p = module("linear_elu"), pattern("linear_elu")
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(error):
        m.attention(q, q, q, **kw)
    with pytest.raises(error):
        attncc.reference(p, q, q, q, **kw)


@pytest.mark.parametrize("kw, error", [(dict(q_offset=2.5), TypeError), (dict(q_offset=True), TypeError),
                                       (dict(k_offset=torch.tensor(False)), TypeError), (dict(q_offset=-1), ValueError),
                                       (dict(n_q=2.0), TypeError), (dict(n_q=4), ValueError), (dict(n_k=6), ValueError),
                                       (dict(k_offset=2**62 - 3), ValueError), (dict(return_lse=1), TypeError)])
def test_reference_checks_offsets_and_lengths_as_attention(kw, error):
    """The reference computed with offsets and lengths that attention refuses (docs §6: numbers as a
    call takes them, "in attncc.reference too; a boolean of any kind is refused"): q_offset=2.5 or
    True, an n_q shorter than the rows (a bottom-right causal mask then moves), positions past 2**62."""
    m, p = module("cross_causal"), pattern("cross_causal")
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(error):
        m.attention(q, k, k, **kw)
    with pytest.raises(error):
        attncc.reference(p, q, k, k, **kw)
    good = dict(q_offset=torch.tensor(3), k_offset=np.int64(1), n_q=np.int32(9), n_k=torch.tensor([8]))
    assert rel_err(m.attention(q, k, k, **good), attncc.reference(p, q, k, k, **good)) < 1e-5


@pytest.mark.parametrize("shapes", [((1, 2, 5, 0), (1, 2, 5, 0), (1, 2, 5, 8)),
                                    ((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 0)),
                                    ((1, 0, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8))])
def test_reference_refuses_empty_heads_as_attention(shapes):
    """Head dim 0 raised ZeroDivisionError from the reference's default scale 1/sqrt(D); Dv = 0 and 0
    query heads computed an empty o. attention() refuses all three with a ValueError; so does the
    reference now."""
    q, k, v = (torch.randn(s) for s in shapes)
    for call in (lambda: module("causal").attention(q, k, v), lambda: attncc.reference(pattern("causal"), q, k, v)):
        with pytest.raises(ValueError, match="head"):
            call()


@pytest.mark.parametrize("kw, says", [(dict(cu_seqlens=None), "cu_seqlens_q= and cu_seqlens_k="),
                                      (dict(max_seqlen=9), "max_seqlen_q="), (dict(block_table=None), "decode"),
                                      (dict(cache_seqlens=None), "kv_len="), (dict(seqused_k=None), "kv_len="),
                                      (dict(softcap=30.0), r"\[score\].softcap"), (dict(alibi_slopes=None), "alibi"),
                                      (dict(sm_scale=0.1), "scale="), (dict(return_attn_probs=True), "return_lse")])
def test_flash_attention_keywords_say_what_to_write(kw, says):
    """FlashAttention's keywords (varlen, KV cache, softcap, ALiBi, its softmax scale's other spelling)
    got "unexpected keyword(s) ...; known inputs and params: none" and nothing else; they say what
    to write here, as FlexAttention's and SDPA's already did."""
    q = torch.randn(1, 2, 5, 8)
    for call in (lambda: module("causal").attention(q, q, q, **kw),
                 lambda: attncc.reference(pattern("causal"), q, q, q, **kw)):
        with pytest.raises(TypeError, match=f"unexpected keyword.*{next(iter(kw))}.*{says}"):
            call()


@pytest.mark.parametrize("given", ["specs/causal.toml", '[mask]\nwhere = "causal"\n', {"mask": {"where": "causal"}},
                                   "module", "SPEC"])
def test_reference_of_something_else_than_a_pattern_says_how_to_get_one(given):
    """A spec path, TOML text, a dict, a generated module or its SPEC passed as the pattern raised
    AttributeError "... has no attribute 'heads_q'" (or 'param_values'); a TypeError naming
    attncc.load_spec / attncc.parse_spec now, from reference() and pair_mask() alike."""
    given = {"module": module("causal"), "SPEC": module("causal").SPEC}.get(given, given) if isinstance(given, str) \
        else given
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match=r"pattern must be an attncc Pattern, from attncc.load_spec"):
        attncc.reference(given, q, q, q)
    from attncc._reference import pair_mask
    with pytest.raises(TypeError, match=r"pattern must be an attncc Pattern"):
        pair_mask(given, q_rows=3, k_rows=3)
