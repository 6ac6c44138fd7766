"""Probe 25 (c) of the Hugging Face transformers integration: model families probes 19-21
(tests/test_probe_hf19.py, hf20, hf21) and tests/test_transformers.py did not build; tiny random-weight
models from configs (float32, CPU, no downloads) against the same weights under eager attention.

Probed clean (logits on the real tokens within 4e-7 relative of eager's with no, left and right padding;
greedy generate() with left padding token for token; 16 models): GPT-2 (plain, scale_attn_by_inverse_
layer_idx, scale_attn_weights=False), GPT-NeoX (rotary_pct 0.5), GPT-J and CodeGen (rotary_dim 4), OPT
(query pre-scaled, scaling 1), GPTBigCode (multi-query), Falcon (alibi=False), Phi (partial rotary 0.5),
Cohere, Persimmon, Nemotron, Mixtral (window 5, MQA); GPT-2, OPT, GPT-NeoX, GPTBigCode and Phi also with
static-cache and 2-beam generate() (left padding) and sequences packed by position_ids in training mode
(logits and gradients within 1e-6 of eager's); GPT-2 cross-attention (add_cross_attention) with and
without encoder padding; encoders (hidden states on the real tokens, left and right padding, within 3e-7):
DistilBERT, ALBERT, RoBERTa, XLM-R, CamemBERT, Data2VecText, ELECTRA, ESM. DeBERTa-v2 ignores the
attention implementation (its own code with its own mask: its output is eager's, attncc never runs). A fully padded
encoder row in BART-style cross-attention (EncoderDecoderModel BERT + GPT-2): attncc's output is sdpa's (eager
averages every key there); that model's generate() greedy, 2-beam and static with left / right padding equal
eager's; Llama under torch.compile (backend eager, graph breaks) with left padding within 3e-7.

Found and fixed:

* Models whose attention layers compute attention themselves rather than through transformers'
  AttentionInterface, with ALiBi added to the mask (Bloom, MPT, Falcon with alibi=True), load with
  attn_implementation="attncc" (transformers does not check a registered implementation), as do MPNet and
  RoFormer (relative positions added to the mask in their own attention code), and got attncc's
  KeyMask as their dense mask: "'KeyMask' object has no attribute 'dtype'" (Falcon), "unsupported operand
  type(s) for +: 'Tensor' and 'KeyMask'" (Bloom, MPNet, RoFormer), "... no attribute 'to'" (MPT).
  A KeyMask used as a tensor now says the model does not call the attention interface and to use eager or sdpa.
* Qwen2-MoE with its default config (use_sliding_window=False, sliding_window=0, every layer full attention)
  raised NotImplementedError ("a mask transformers builds from and_masks.<locals>.and_mask") on every
  forward: the model makes its sliding-window mask (window 0, which the integration does not map) beside
  the causal one though no layer uses it. The error is now raised by the call that uses such a mask.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

from hf_cases import padded, registering, rel  # noqa: E402

registered = registering({})
SPECIAL = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=99)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
               vocab_size=100, pad_token_id=0)


def _model(config, implementation: str, auto=AutoModelForCausalLM):
    torch.manual_seed(0)
    return auto.from_config(copy.deepcopy(config), attn_implementation=implementation).eval()


@pytest.mark.parametrize("config", [
    transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SPECIAL),
    transformers.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **SPECIAL),
    transformers.FalconConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, alibi=True, **SPECIAL),
    transformers.MPNetConfig(**ENCODER),
    transformers.RoFormerConfig(**ENCODER, embedding_size=32),
], ids=["bloom", "mpt", "falcon_alibi", "mpnet", "roformer"])
def test_models_with_their_own_attention_code_are_told_so(config):
    ids, mask = padded("left", seq=8)
    auto = AutoModel if config.model_type in ("mpnet", "roformer") else AutoModelForCausalLM
    with torch.no_grad(), pytest.raises((AttributeError, NotImplementedError), match="attention interface"):
        _model(config, "attncc", auto)(ids, attention_mask=mask)


def test_gpt2_scaled_by_inverse_layer_index_matches_eager():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     scale_attn_by_inverse_layer_idx=True, **SPECIAL)
    ref, ours = _model(config, "eager"), _model(config, "attncc")
    ids, mask = padded("left", seq=12)
    with torch.no_grad():
        a, b = (m(ids, attention_mask=mask).logits[mask.bool()] for m in (ref, ours))
    assert rel(b, a) < 2e-6


def test_qwen2_moe_makes_a_mask_no_layer_uses():
    config = transformers.Qwen2MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1,
                                         max_position_embeddings=64, **SPECIAL)
    assert config.sliding_window == 0 and set(config.layer_types) == {"full_attention"}
    ref, ours = _model(config, "eager"), _model(config, "attncc")
    ids, mask = padded("right", seq=12)
    with torch.no_grad():
        a, b = (m(ids, attention_mask=mask).logits[mask.bool()] for m in (ref, ours))
    assert rel(b, a) < 2e-6
