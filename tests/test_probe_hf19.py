"""Probe 19: the Hugging Face transformers integration against transformers' own sdpa / eager attention,
on tiny random-weight models built from configs (float32, no downloads).

Probed clean (logits and every parameter's gradient of a forward+backward within 1e-5 relative, greedy
generate() token ids equal to sdpa's / eager's): Llama, Mistral, Qwen2 (sliding layers from
max_window_layers), Qwen3 (head_dim 12), Phi3 (head_dim 24, 3 query heads on 1 kv head), Starcoder2
(sliding window), Granite (attention_multiplier as ``scaling``), Gemma 2 / Gemma 3 (softcap,
query_pre_attn_scalar, alternating sliding and global layers), Cohere2 and Olmo3 (sliding / global
layers), DeepSeek-V3 (MLA: value head dim 8, query/key head dim 20), BERT (bidirectional, right
padding); left, right and no padding; dynamic and static caches; a chat continuing on a sliding-window
cache that dropped keys (prompts of 7 and 3 tokens at cache offsets); output_attentions (a warning and
no weights, as sdpa); Llama 4's chunked attention is refused clearly.

Found and fixed:

* FlashAttention's varlen keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)``) were ignored: with the model's cache on (the default) the packed row
  ran as one sequence, each sequence attending to the ones before it (logits 1.3x their size off from the
  sequences run apart). They are now honoured (the kernels' cu_seqlens).
* Sequences packed in a row found from ``position_ids`` (no cache: training) raised NotImplementedError;
  transformers' packed mask is now recognized and runs through cu_seqlens (the rows one after another).
  With a registered spec (which replaces the model's mask) packing is an error instead of silently
  attending across the sequences.
* ``sinks`` (Inkling 2's per-token sinks), ``indices`` (DeepSeek-V3.2 / GLM DSA sparse indexers) and
  ``block_indices`` (MiniMax-M3's block-sparse indexer, which builds its mask only for eager / sdpa) were
  silently ignored (dense attention where the model asks for sparse or sinks); they are now refused.

Added: GPT-OSS's attention sinks (``s_aux``, refused before) as the output scaled by sigmoid(lse - s_aux)
from the kernels' log-sum-exp: logits, gradients (the sinks' included) and generations of eager's.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402
from hf_cases import encoder_step, grads_rel, registering, rel, training_step  # noqa: E402
from hf_cases import padded as _padded  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=99, initializer_range=0.2)


registered = registering({"name": "attncc_p19"})


def models(config_class, reference="sdpa", impl="attncc_p19", **overrides):
    kw = {k: v for k, v in dict(COMMON, **overrides).items() if v is not None}
    config = config_class(**kw)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def padded(padding, seq=12, seed=1):
    return _padded(padding, seq, seed, right_pads=3)


# -- packed sequences ------------------------------------------------------------------------------

IDS = torch.randint(2, 99, (2, 12), generator=torch.Generator().manual_seed(3))
POSITIONS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], [5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
CU = torch.tensor([0, 5, 8, 12, 15, 24], dtype=torch.int32)  # the rows one after another
FLASH_KWARGS = dict(cu_seq_lens_q=CU, cu_seq_lens_k=CU, max_length_q=9, max_length_k=9)


def apart(model):
    """The logits of each packed sequence run alone (positions as packed)."""
    ids, positions = IDS.reshape(1, -1), POSITIONS.reshape(1, -1)
    with torch.no_grad():
        return torch.cat([model(ids[:, s:e], position_ids=positions[:, s:e]).logits
                          for s, e in zip(CU[:-1].tolist(), CU[1:].tolist())], 1).reshape(2, 12, -1)


@pytest.mark.parametrize("use_cache", [True, None])
def test_flash_attention_varlen_keywords_are_honoured(use_cache):
    """cu_seq_lens_q / cu_seq_lens_k were ignored: with the cache on (transformers then finds no packing
    in position_ids) the rows ran as one sequence each, logits off by 1.3x their size."""
    ref, ours = models(transformers.LlamaConfig)
    want = apart(ref)
    with torch.no_grad():
        got = ours(IDS, position_ids=POSITIONS, use_cache=use_cache, **FLASH_KWARGS).logits
    assert rel(got, want) < 1e-5


def test_packed_position_ids_run_as_separate_sequences():
    """transformers' packed-sequence mask (no cache: training) raised NotImplementedError; it runs through
    cu_seqlens now: logits and gradients of sdpa's dense packed mask, a sliding window within each."""
    ref, ours = models(transformers.MistralConfig, sliding_window=3)
    want = apart(ref)
    for model in (ref, ours):
        out = model(IDS, position_ids=POSITIONS, use_cache=False, labels=IDS)
        out.loss.backward()
        assert rel(out.logits.detach(), want) < 1e-5
    assert grads_rel(ref, ours) < 1e-4


def test_what_packing_cannot_run_with_is_an_error():
    _, ours = models(transformers.LlamaConfig)
    with pytest.raises(ValueError, match="need both cu_seq_lens_q and cu_seq_lens_k"):
        ours(IDS, position_ids=POSITIONS, cu_seq_lens_q=CU)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="with a padding mask"):
        ours(IDS, attention_mask=mask, **FLASH_KWARGS)
    attncc_hf.register("attncc_p19_spec", spec='head_dim = 16\n[mask]\nwhere = "j <= i"\n')
    _, custom = models(transformers.LlamaConfig, impl="attncc_p19_spec")
    with pytest.raises(NotImplementedError, match="packs sequences in a row"):
        custom(IDS, position_ids=POSITIONS, use_cache=False)


@pytest.mark.parametrize("name", ["sinks", "indices", "block_indices", "position_bias"])
def test_keywords_that_change_the_result_are_refused(name):
    """Inkling 2 passes sinks=, the sparse-indexer models indices= / block_indices= to any implementation
    but eager and sdpa (MiniMax-M3 builds its block mask only for those two): all were ignored."""
    q = torch.randn(1, 4, 6, 16)
    k = v = torch.randn(1, 2, 6, 16)
    module = type("Attention", (), {"is_causal": True})()
    with pytest.raises(NotImplementedError, match=f"{name} .* is not supported"):
        attncc_hf.registered("attncc_p19").forward(module, q, k, v, None, **{name: torch.zeros(1)})


# -- model families: clean regressions ---------------------------------------------------------------

FAMILIES = {
    # head_dim 24 (not a power of two), 3 query heads on one kv head
    "phi3": (transformers.Phi3Config, "sdpa", dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1,
                                                   head_dim=None)),
    # MLA: query/key head dim 20, value head dim 8
    "deepseek_v3": (transformers.DeepseekV3Config, "eager", dict(
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=8, head_dim=None,
        n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=2, num_key_value_heads=4,
        rope_interleave=False)),
    "qwen2_sliding": (transformers.Qwen2Config, "sdpa", dict(use_sliding_window=True, sliding_window=5,
                                                            max_window_layers=1)),
}


@pytest.mark.parametrize("family, padding", [("phi3", "left"), ("deepseek_v3", "right"), ("qwen2_sliding", "left")])
def test_families_logits_gradients_and_generation(family, padding):
    config_class, reference, overrides = FAMILIES[family]
    ref, ours = models(config_class, reference, **overrides)
    same_training_step_and_generation(ref, ours, padding,
                                      cache_implementation="static" if family == "qwen2_sliding" else None)


def same_training_step_and_generation(ref, ours, padding="left", cache_implementation=None):
    """Logits and gradients of a padded batch's loss, then greedy generations, equal the reference's."""
    logits_rel, grad_rel = training_step(ref, ours, *padded(padding))
    assert logits_rel < 2e-5 and grad_rel < 1e-4
    ids, mask = padded("left", seq=10, seed=2)
    args = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    if cache_implementation is not None:
        args["cache_implementation"] = cache_implementation
    assert torch.equal(ours.generate(ids, **args), ref.generate(ids, **args))


def test_bert_bidirectional_with_right_padding():
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = AutoModel.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = AutoModel.from_config(copy.deepcopy(config), attn_implementation="attncc_p19")
    ours.load_state_dict(ref.state_dict())
    states_rel, grad_rel = encoder_step(ref, ours, *padded("right"))
    assert states_rel < 1e-5 and grad_rel < 1e-4


def test_gpt_oss_attention_sinks():
    """s_aux: one logit per head with a value of zero, in the softmax; sliding and full layers."""
    ref, ours = models(transformers.GptOssConfig, "eager", num_local_experts=2, num_experts_per_tok=1,
                       sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2, generator=torch.Generator().manual_seed(5))
    ours.load_state_dict(ref.state_dict())
    same_training_step_and_generation(ref, ours)
