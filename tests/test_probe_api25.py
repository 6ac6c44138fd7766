"""Probe 25 of the call API as an adversarial PyTorch / FlexAttention / FlashAttention / Hugging Face
user: attention(), decode(), linear attention's attention() and step(), dropout_keep_mask and the
signature cache behind repeated calls, against attncc.reference (float64) and what torch does in
the same situation.

Probed clean (interpreter, seeded, tiny sizes):
- autograd: q, k, v changed in place after the forward for each subset requiring grad (6 subsets x
  3 tensors, 18: autograd's version-counter error); document ids, kv_len, cu_seqlens (one tensor as
  both, and cu_seqlens_k alone), a T5 table that needs no gradient and learned ALiBi slopes changed
  in place (attncc's or autograd's error naming the tensor, 6); a second backward without
  retain_graph (torch's error), softmax and linear; the LSE's gradient beside o's through dropout
  (o, LSE, dq, dk, dv against the reference given dropout_keep_mask, within 1e-6; the LSE bitwise
  that of the spec without dropout); torch.autograd.detect_anomaly over rows without keys
  (kv_len = 0) and over linear attention (no NaN reported);
- linear attention: gradients of q, k, v and the initial state (S0, z0) from o, S, z or all three,
  for 11 subsets of q, k, v and the state requiring grad (41 cases within 2e-6 of the reference;
  attncc returns zeros where the reference's autograd returns None for an unused leaf, as torch's
  fused ops do); the initial state or k changed in place after the forward (autograd's error);
  step() and decode() with any argument requiring grad (a NotImplementedError saying to detach);
- dropout: dropout_p 0, 1, 1.5, -0.1, nan, inf, True, a 0-d tensor, numpy float32, a tensor that
  requires grad; seeds -1, 2**63, 2**63 - 1, 1.5, True, "1", a 0-d int / float tensor, numpy int64;
  training=0; seeds 0 / 2**32 and 2**31 / 2**31 + 2**32 draw different masks; dropout keywords on a
  spec without dropout, and on decode (refused with the hint);
- decode: kv_len past the capacity, negative, float, of the wrong length or 2-D, a Python int, a list;
  Nq = 17; block tables with too few pages, page numbers out of range or negative (refused), negative
  numbers in pages kv_len does not reach (taken), float, 1-D, of the wrong batch; page size 8; a paged
  cache without block_table and a contiguous cache with one;
- packed calls: max_seqlen_q / max_seqlen_k below the longest sequence or 0 (refused), one of them
  given (the other computed), max_seqlen without cu_seqlens, cu_seqlens_q alone;
- keyword vs positional: q=, k=, v= by keyword (runs), SDPA's query= / key= / value= (Python's missing-
  argument error), return_lse as a 4th positional (refused); params named like the entry points'
  keywords (seed, training, dropout_p on specs with and without dropout, kv_len, block_table,
  return_lse, cu_seqlens_q, max_seqlen_q, q_offset, q, k, v, k_cache: a SpecError where they would
  shadow one; scale, keep_mask, pattern, names of the generated module's own globals: o against the
  reference, decode runs), 52 specs;
- torch.set_default_dtype(torch.float64) and torch.use_deterministic_algorithms(True) (whose
  torch.empty fills memory with NaN): causal at D / Dv 16/16, 5/5, 16/13, 8/20 in float32 and
  float16, sliding window, dilated (residue classes), documents, padding with an empty row, o, LSE and
  every gradient from both against the reference (as without them), decode bitwise as without;
- outputs never alias: o, LSE, gradients, linear states and step()'s state across two calls and
  against the inputs (a padded Dv, empty Nq / Nk, decode with kv_len = 0, residue / column splits),
  16 cases;
- an [inputs] tensor that requires grad under torch.no_grad / inference_mode (runs); scale= as a tensor
  that requires grad under no_grad (runs) and in decode (refused);
- q, k or v changed in place when only a learned table (T5 bias, ALiBi slopes) requires grad, losses on
  o and on the LSE (8: autograd's error);
- the LSE in the loss over rows without keys (padding kv_len = 0, k_offset past the queries) through
  where(isfinite), nan_to_num, clamp, exp, softplus and beside o (12: gradients within 1e-5 of the
  reference, finite);
- residue-class (dilated, 300 rows) and column (strided, 1100 rows) splits with q, k, v, or k and v
  alone requiring grad, losses on o, the LSE or both (18, within 2e-6);
- o, the LSE and dq, dk, dv contiguous for q, k, v contiguous, BNHD-transposed, batch-expanded,
  stride-2 and at a storage offset, Dv 8 and 5 (50), decode's o and LSE (10);
- the signature cache, randomized: 80 seeds x 3 calls of one signature (the third sometimes of another
  layout) of 7 specs with [b, n], [h], [h, n] and 0-d inputs (float / int / bool; learned or not) passed in
  each accepted dtype, plain, expanded, stride-2 or transposed, float32 / float16 q, k, v: o and the
  gradients of q and the learned input against the reference, clean after the fix below; under
  torch.compile (backends eager and aot_eager) a table with the negative bit alternating with a plain
  one of the same strides (10, clean);
- numbers in other dresses: scale= as Fraction (taken), Decimal, 0-d / 1-element numpy arrays, lists,
  tuples, complex (refused, naming scale); q_offset= and int params as numpy int8 / uint64 and [1]
  tensors (taken), floats, float tensors, Fraction(3, 1), 0-d arrays (refused); attncc.compile dicts with
  numpy / torch numbers, None, non-string keys, bad names (SpecError naming the key), 13;
- the Hugging Face integration: Llama and Mistral (window 4) with 2D attention masks of dtype int64,
  bool, int32, float32, float16, uint8, none, all ones, and a row of all zeros, left / right padding and
  a hole: logits of the rows with keys within 2.2e-7 of eager's (18).

Left as they are: ``attncc.reference`` given a keep_mask with ``dropout_p=0`` drops its False pairs without
rescaling (the mask contradicts p = 0; the kernels keep every pair there, and dropout_keep_mask(dropout_p=0)
is all True); a 0-d meta tensor as ``scale=`` / ``q_offset=`` raises torch's "Tensor.item() cannot be called
on meta tensors", which does not name the argument; ``q_offset=Fraction(3, 1)`` is refused as "float
3.0"; a contiguous cache passed to decode with block_table= is refused as a paged one ("page size (k_cache
dim 1) must be >= 16, got 2"); the backward's saved-tensor-hook path (runtime.autograd.backward) still
reads a hook's copy of a learned table of another dtype with ``.to()`` (an expanded table densified; its
memo is dropped then, so the values are right).

Found and fixed:
- The signature cache's fast path (runtime.call._rebind: a call with the shapes, strides and dtypes of
  an earlier one) converted an [inputs] tensor of another dtype than declared with ``.to(dtype)``, where
  the first call's checks use ``converted()``, which keeps an expanded (stride-0) table expanded, and
  the launch kept with the signature had bound the first call's strides: from the second call on, a
  bfloat16 ``[b, h, n]`` bias expanded over heads in a float32 input was read at the expanded strides
  from its dense copy (batch row 1 read row 0's bias: o 3.2 off, silently); a table expanded to 2**36
  positions (bfloat16 in a float32 input, int8 in an int32 one) failed allocating 512 GiB where the
  first call ran; every repeated call of an expanded mask copied the whole view.
- attncc.reference's ``keep_mask`` (docs §6: bool, broadcastable to [B, Hq, Nq, Nk]) was multiplied in
  as it came: an int mask holding 2 doubled its pairs' weights (o 2.9 off, silently), a 5-D mask
  broadcast o to 5-D, a mask of the wrong length raised torch's "The size of tensor a (12) must match
  the size of tensor b (5)" and a list AttributeError. It is checked now (bool, or 0 / 1 only; the
  call's pairs), packed calls too, and a list is taken as the packed path took it.
- decode() of a spec with dropout, given ``dropout_p=`` (0.0, say, by code that passes it to attention
  too), was refused with the hint for specs without dropout ("dropout is the spec's [score].dropout"),
  and the docs did not say that decode runs without the spec's dropout; the hint and docs §6 say so.
- Linear attention's backward (runtime.linear.LinearAttentionFunction) read the saved denominators and
  the initial state (S0, z0) at contiguous strides: saved-tensor hooks that give them back in another
  layout (docs §6: offloading, compression "may give the saved tensors back in another layout: the
  gradients are the same") made dq, dk, dv and the state's gradients 0.3 .. 4.2 (elu+1) and 27
  (performer) off, silently. They are made contiguous there now. Softmax attention's backward, given
  q, o, the LSE and a learned table each in another layout (24 cases over causal, t5_bias, alibi,
  losses on o and on the LSE; document masks, dilated residue classes and RoPE, 6; attncc.distributed
  over 4 chunks of one rank, 2), was right.
- attncc.reference took a complex q, k or v, dropped its imaginary part (a UserWarning) and returned o; a
  TypeError now, as attention()'s. (Shape errors of q, k, v: the same type and meaning as attention()'s, 14.)
- The transformers integration's register(name, spec=module) took a generated linear attention module (a
  spec text or file of one was refused), and the model's forward failed with "attention() got an
  unexpected keyword argument 'scale'"; refused at register now, with the spec file's error.
- The same integration took a module's softcap as unknown and never checked it: a Gemma 2 model
  (attn_logit_softcapping 0.02) on the module of a causal spec ran without its softcap (logits 0.3 % off
  eager's, silently) where the spec as text or a path was refused ("the model asks for softcap = ..., the
  spec has none"). Generated modules now carry ``SPEC.softcap`` (runtime.spec_info.SpecInfo; the
  softmax template writes it where the spec has one), which the integration checks for every user spec.
- The integration ran a user's spec with [rope] through decode for generation's steps and short prompts;
  decode rotates q only and takes the cache's keys as rotated already, but the model's cache holds them as
  the model wrote them (attention rotates them in the kernels): the steps' logits were 2.3e-3 (Llama) and
  6.6e-4 (GPT-2) relative off the same model's full forward, silently. Such calls run attention now (docs
  §6 says so).
- A user's spec with random_blocks() (whose decode raises NotImplementedError) failed every call of 16
  tokens or fewer through the integration, a plain forward included; generated modules now carry
  ``SPEC.decode`` (False there) and such calls run attention.
- Linear attention's step(..., seed=) of a feature map without randomness was refused naming
  ``attention`` (templates/linear.py.j2); it names step now.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from attncc.runtime import call as rt_call

BIAS_TABLE = '[inputs]\nm = { dims = ["b", "n"], dtype = "float32" }\n[score]\nbias = "m[b, j]"\n'
DOC_TABLE = '[inputs]\nd = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "d[b, i] == d[b, j]"\n'


def _qk(seed, B=2, H=2, N=20, D=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)


def test_repeated_call_keeps_an_expanded_input_expanded():
    """The second call of a signature (the cache's fast path) converts an [inputs] tensor as the first
    did: a stride-0 table stays stride 0 (``.to`` wrote a dense copy of the whole view), and both
    calls give the same o, bitwise."""
    m = attncc.compile(BIAS_TABLE)
    spec = m.SPEC
    q, k = _qk(25)
    table = torch.randn(2, 1, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).expand(2, 4096)
    outs, strides = [], []
    for _ in range(2):
        hits = rt_call.BIND_STATS["hit"]
        call = rt_call.bind(spec, q, k, k, kwargs={"m": table})
        strides.append(call.inputs["m"].stride())
        outs.append(m.attention(q, k, k, m=table))
    assert rt_call.BIND_STATS["hit"] > hits  # the second bind took the fast path
    assert strides[0] == strides[1] == (strides[0][0], 0), strides
    assert torch.equal(outs[0], outs[1])
    ref = attncc.reference(attncc.parse_spec(BIAS_TABLE), q.double(), k.double(), k.double(), m=table[:, :20])
    assert (outs[1].double() - ref).abs().max() < 1e-5


HEAD_BIAS = '[inputs]\nm = { dims = ["b", "h", "n"], dtype = "float32" }\n[score]\nbias = "m[b, h, j]"\n'


def test_repeated_calls_read_an_expanded_input_of_another_dtype_right():
    """A bfloat16 bias expanded over heads, in a float32 input, three calls of one signature: each o is
    the reference's (the second and third read the first call's strides from a dense copy: 3.2 off)."""
    m, p = attncc.compile(HEAD_BIAS), attncc.parse_spec(HEAD_BIAS)
    g = torch.Generator().manual_seed(35)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    for _ in range(3):
        bias = (3 * torch.randn(2, 1, 16, generator=g)).to(torch.bfloat16).expand(2, 2, 16)
        o = m.attention(q, k, v, m=bias)
        ref = attncc.reference(p, q.double(), k.double(), v.double(), m=bias)
        assert (o.double() - ref).abs().max() < 1e-5


def test_repeated_call_keeps_an_expanded_int_input_expanded():
    """Likewise an int8 table in an int32 input (widened), expanded to 2**36 positions: the second call
    allocated 2**38 bytes and failed."""
    m = attncc.compile(DOC_TABLE)
    q, k = _qk(26)
    ids = torch.tensor([[0], [1]], dtype=torch.int8).expand(2, 2**36)
    first = m.attention(q, k, k, d=ids)
    second = m.attention(q, k, k, d=ids)
    assert torch.equal(first, second)


def _dropout_case(seed, B=2, H=2, N=12, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    m = attncc.compile(DROPOUT)
    keep = m.dropout_keep_mask(q, k, v, seed=seed, dropout_p=0.3)
    return m, attncc.parse_spec(DROPOUT), q, k, v, keep


DROPOUT = '[mask]\nwhere = "j <= i"\n[score]\ndropout = 0.3\n'


@pytest.mark.parametrize("form", ["bool", "int", "float", "list", "rows"])
def test_reference_takes_keep_masks_of_zeros_and_ones(form):
    m, p, q, k, v, keep = _dropout_case(31)
    if form == "rows":  # batch row 0's mask broadcast over the batch
        keep = keep[:1].expand_as(keep).contiguous()
    given = {"bool": keep, "int": keep.int(), "float": keep.float(), "list": keep.tolist(), "rows": keep[:1]}[form]
    ref = attncc.reference(p, q.double(), k.double(), v.double(), keep_mask=given, dropout_p=0.3)
    want = attncc.reference(p, q.double(), k.double(), v.double(), keep_mask=keep, dropout_p=0.3)
    assert torch.equal(ref, want)
    o = m.attention(q, k, v, seed=31, dropout_p=0.3)
    assert form == "rows" or (o.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("bad, says", [
    (lambda keep: keep.int() * 2, "0 and 1"),                 # doubled the kept pairs' weights
    (lambda keep: keep.float() * 0.5, "0 and 1"),
    (lambda keep: keep[None], "[B, Hq, Nq, Nk] = [2, 2, 12, 12], got shape [1, 2, 2, 12, 12]"),  # o came 5-D
    (lambda keep: keep[:, :, :5], "got shape [2, 2, 5, 12]"),  # torch's broadcasting error
    (lambda keep: keep[..., :1].expand(2, 2, 12, 3), "got shape [2, 2, 12, 3]"),
])
def test_reference_refuses_keep_masks_that_are_not_the_calls_pairs(bad, says):
    _, p, q, k, v, keep = _dropout_case(32)
    with pytest.raises(ValueError, match="keep_mask") as err:
        attncc.reference(p, q, k, v, keep_mask=bad(keep), dropout_p=0.3)
    assert says in str(err.value)


def test_reference_refuses_a_packed_keep_mask_of_other_values():
    _, p, q, k, v, keep = _dropout_case(33, B=1)
    cu = torch.tensor([0, 5, 12])
    with pytest.raises(ValueError, match="0 and 1"):
        attncc.reference(p, q, k, v, keep_mask=keep[:, :, :7, :7].int() * 3, dropout_p=0.3, cu_seqlens_q=cu,
                         cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"\[S, Hq, max_seqlen_q, max_seqlen_k\] = \[2, 2, 7, 7\]"):
        attncc.reference(p, q, k, v, keep_mask=keep[:, :, :3], dropout_p=0.3, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_decode_of_a_dropout_spec_says_it_runs_without_dropout():
    """decode() of a spec with dropout was told "dropout is the spec's [score].dropout" for dropout_p=, the
    hint for a spec without dropout; it runs without dropout (inference), which the hint says now."""
    m = attncc.compile(DROPOUT)
    q, k = _qk(34)
    with pytest.raises(TypeError, match="decode\\(\\) runs without it"):
        m.decode(q[:, :, :1], k, k, kv_len=[3, 20], dropout_p=0.0)
    o = m.decode(q[:, :, :1], k, k, kv_len=[3, 20])
    want = attncc.reference(attncc.parse_spec(DROPOUT), q[:1, :, :1].double(), k[:1, :, :3].double(),
                            k[:1, :, :3].double(), q_offset=2)
    assert (o[:1].double() - want).abs().max() < 1e-5


def test_step_names_itself_when_refusing_seed():
    """step(..., seed=) of a feature map without randomness was refused as "linear_elu.attention: seed= ..."."""
    from cases import module

    m = module("linear_elu")
    q = torch.randn(1, 2, 8)
    with pytest.raises(TypeError, match=r"linear_elu\.step: seed= applies to the performer"):
        m.step(q, q, q, seed=3)
    with pytest.raises(TypeError, match=r"linear_elu\.attention: seed= applies to the performer"):
        m.attention(q[:, :, None], q[:, :, None], q[:, :, None], seed=3)


def _relaid(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in another layout: dims 1 and 2 swapped in memory (a saved-tensor hook's copy)."""
    if t.dim() < 3:
        return t
    out = torch.empty(t.shape[0], t.shape[2], t.shape[1], *t.shape[3:], dtype=t.dtype).transpose(1, 2)
    return out.copy_(t)


@pytest.mark.parametrize("name", ["linear_elu", pytest.param("performer", marks=pytest.mark.slow)])  # 12 s
def test_linear_backward_reads_saved_tensors_in_another_layout(name):
    """Linear attention's backward read the saved denominators and initial state at contiguous strides:
    saved-tensor hooks that give them back in another layout (offloading) gave gradients 0.3 (elu+1 with
    a state) to 27 (performer) off, silently; softmax attention's backward was right (its layouts are read)."""
    from cases import module

    m = module(name)
    g = torch.Generator().manual_seed(36)
    q, k, v = (torch.randn(2, 2, 20, 8, generator=g).requires_grad_() for _ in range(3))
    state = (torch.randn(2, 2, 8, 8, generator=g).requires_grad_(),
             torch.rand(2, 2, 8, generator=g).add(1).requires_grad_()) if name == "linear_elu" else None
    w = torch.randn(2, 2, 20, 8, generator=g)
    leaves = (q, k, v, *(state or ()))

    def grads(hooked):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _relaid if hooked else (lambda t: t)):
            o = m.attention(q, k, v, initial_state=state) if state else m.attention(q, k, v)
        return torch.autograd.grad((o * w).sum(), leaves)

    for plain, hooked in zip(grads(False), grads(True)):
        assert (plain - hooked).abs().max() < 1e-6


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_reference_refuses_complex_operands(which):
    """attncc.reference cast a complex q, k or v to float64, dropping its imaginary part (a UserWarning),
    and returned an output; attention() refuses them (TypeError), and so does the reference now."""
    p = attncc.parse_spec('[mask]\nwhere = "j <= i"\n')
    ops = {n: torch.randn(1, 2, 5, 4, dtype=torch.float64) for n in "qkv"}
    ops[which] = torch.randn(1, 2, 5, 4, dtype=torch.complex128)
    with pytest.raises(TypeError, match=f"{which} must be a real tensor"):
        attncc.reference(p, ops["q"], ops["k"], ops["v"])


def test_hf_register_refuses_a_linear_module():
    """register(name, spec=<a generated linear module>) was taken (a spec file of it was refused), and the
    model's first forward failed with "attention() got an unexpected keyword argument 'scale'"."""
    pytest.importorskip("transformers")
    from cases import module
    from attncc.integrations import transformers as attncc_hf

    with pytest.raises(ValueError, match="linear_elu is a linear attention spec; models call softmax"):
        attncc_hf.register("attncc_probe25_linear", spec=module("linear_elu"))


@pytest.mark.parametrize("name, cap", [("causal", 0.02), ("softcap", 30.0), ("softcap", 0.02)])
def test_hf_user_module_is_checked_against_the_models_softcap(name, cap):
    """A user's pattern registered as a generated module had its softcap taken as unknown: a Gemma 2 model
    (attn_logit_softcapping 0.02) on the module of a spec without softcap ran without the model's softcap
    (logits 0.3 % off eager's, silently), where the same spec as text or a path was refused. A module's
    SPEC.softcap says it now: refused the same way; a module whose softcap is the model's runs."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, Gemma2Config

    from attncc.integrations import transformers as attncc_hf
    from cases import module
    from hf_cases import model_pair, rel

    impl = attncc_hf.register(f"attncc_probe25_{name}", spec=module(name))
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_logit_softcapping=cap,
                  final_logit_softcapping=None, sliding_window=64, query_pre_attn_scalar=8)
    ref, ours = model_pair(Gemma2Config, "eager", impl, AutoModelForCausalLM, common)
    ids = torch.randint(2, 99, (2, 9), generator=torch.Generator().manual_seed(37))
    with torch.no_grad():
        if name == "softcap" and cap == 30.0:
            assert rel(ours(ids).logits, ref(ids).logits) < 1e-5
        else:
            has = "30.0" if name == "softcap" else "none"
            with pytest.raises(ValueError, match=f"the model asks for softcap = 0.02, the spec has {has}"):
                ours(ids)


def test_hf_rope_spec_generates_as_its_full_forward():
    """A user's spec with [rope] ran generation's steps (and short prompts) through decode, which rotates q
    only and takes the cache's keys as rotated already; the model's cache holds them as the model wrote
    them, which attention rotates in the kernels: the steps' logits were 2.3e-3 (relative) off the same
    model's full forward, silently. Those calls run attention now."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attncc.integrations import transformers as attncc_hf

    spec = '[mask]\nwhere = "j <= i"\n[rope]\ntheta = 10000.0\n'
    impl = attncc_hf.register("attncc_probe25_rope", spec=spec)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    ids = torch.randint(2, 99, (1, 15), generator=torch.Generator().manual_seed(38))
    with torch.no_grad():  # a prompt of 15 and 3 steps (decode's, before), the whole 18 tokens: attention
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        full = model(out.sequences, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    steps = torch.stack(out.logits, 1)
    assert ((steps - full).abs().max() / full.abs().max()).item() < 1e-5


def test_hf_random_blocks_spec_runs_without_decode():
    """A user's spec with random_blocks() (no decode: it raises NotImplementedError) failed every call of 16
    tokens or fewer, a plain forward of 6 included, where attention runs it; such calls run attention now
    (SPEC.decode says whether a module has one)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attncc.integrations import transformers as attncc_hf
    from cases import module

    impl = attncc_hf.register("attncc_probe25_random_blocks", spec=module("bigbird"))
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    ids = torch.randint(2, 99, (1, 6), generator=torch.Generator().manual_seed(39))
    with torch.no_grad():
        steps = model(ids).logits
        whole = model(ids, use_cache=False).logits
    assert torch.equal(steps, whole) and attncc_hf.registered(impl).calls["decode"] == 0
