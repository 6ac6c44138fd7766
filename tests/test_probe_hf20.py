"""Probe 20: the Hugging Face transformers integration, what probe 19 (tests/test_probe_hf19.py) and
tests/test_transformers.py did not cover; tiny random-weight models built from configs (float32, CPU, no
downloads), compared with transformers' sdpa / eager attention on the same weights, generations compared
token by token and by the logits of every step.

Probed clean (logits within 2e-6 relative, every step's generation logits within 2e-6, gradients within
1e-5 of the reference's):

* generation: static caches (``cache_implementation="static"``, the slots past the current length zeros)
  and hybrid caches (Gemma 2 / Gemma 3 / GPT-OSS alternating sliding and global layers, the static sliding
  layers rolling) with left padding, greedy and beam search (2 and 3 beams: cache reordering), for Llama,
  Mistral (window 4), Gemma 2 (softcap, query_pre_attn_scalar), Gemma 3, GPT-OSS (sinks); a continued
  generation on a prefilled DynamicCache / StaticCache (5 tokens through decode, 19 through attention at
  cache offsets on a sliding cache that dropped keys); assisted generation (a 1-layer assistant) and
  prompt-lookup decoding (several candidate queries per step, the sliding layer recording its past);
  a user's spec with and without key_ok under static caches;
* encoders and masks: BERT (left / right padding, 10 and 20 tokens: decode and attention), ModernBERT
  (bidirectional sliding window |i - j| <= 3 on alternate layers, padding; gradients), Llama with
  ``is_causal=False`` (the bidirectional mask of create_causal_mask), SigLIP / ViT (no mask) and CLIP text
  (causal + padding); BART cross-attention with left / right encoder padding and 12 / 20 / 24 decoder
  queries (gradients), beam search with dynamic and static encoder-decoder caches; Whisper; GQA 5:1 at head
  dim 20; attention dropout in train mode against eager's definition (softmax, then the kept pairs scaled
  by 1 / (1 - p); dropout_keep_mask at the seed drawn from torch's generator) with GQA 3:1, head dim 12,
  softcap, windows, bidirectional and padding, gradients too; gradient checkpointing with dropout (the
  recomputed forward draws the same mask: gradients bitwise those without checkpointing);
* refused clearly: PaliGemma's token_type_ids prefix (the or_masks block overlay: NotImplementedError naming
  it), T5's position_bias, a 4-D / 3-D mask, a [1, N] padding mask for a batch of 2 (the kernels' key_ok
  check); output_attentions warns and returns no weights, as sdpa does in this transformers version (an
  empty tuple).

Found and fixed:

* A registered spec with a param (or input) named ``scale``: the model's ``scaling`` was passed as the
  call's ``scale=``, which such a spec routes to the param (contract: "a param named scale takes the
  call's scale= keyword; the softmax scale then stays the spec's"). A Granite model (attention_multiplier
  0.7) with the spec ``bias = "-scale * (i - j)"`` (scale = 0: plain causal) got the slope 0.7 and the
  softmax scale 1/4: logits off by 1.4x their size, silently. Now the param keeps the value the model
  forwards (``model(ids, scale=...)``) or its default, and a model's scaling other than the spec's softmax
  scale is refused, as is one other than an explicit ``[score].scale`` (the model's scaling overrode it
  silently; softcap already had this rule).
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402
from hf_cases import encoder_step, grads_rel, model_pair, padded, registering, rel, training_step  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=99, initializer_range=0.2)
GEMMA2 = dict(sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=None,
              layer_types=["sliding_attention", "full_attention"])
IMPL = "attncc_p20"


registered = registering({"name": IMPL})


def models(config_class, reference="sdpa", impl=IMPL, auto=AutoModelForCausalLM, common=COMMON, **overrides):
    return model_pair(config_class, reference, impl, auto, common, **overrides)


def same_generation(ref, ours, ids, **args):
    """The same tokens, and every step's logits within 2e-6 of the reference's."""
    args = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, **args)
    want, got = ref.generate(ids, **args), ours.generate(ids, **args)
    assert torch.equal(got.sequences, want.sequences), (got.sequences, want.sequences)
    assert max(rel(b, a) for a, b in zip(want.logits, got.logits)) < 2e-6


# -- the defect: a spec's param named scale ------------------------------------------------------------

SLOPE_SPEC = """name = "slope"
head_dim = 16
[params]
scale = 0.0
[mask]
where = "j <= i"
[score]
bias = "-scale * (i - j)"
"""


def test_a_specs_param_named_scale_does_not_take_the_models_scaling():
    """Granite's attention_multiplier (0.7) reached the spec's param scale (the bias slope) and the softmax
    scale stayed 1/sqrt(16): logits 1.4x their size off. The param keeps its default (0: plain causal), and
    the model's scaling, other than the spec's softmax scale, is refused."""
    attncc_hf.register("p20_slope", spec=SLOPE_SPEC)
    ref, ours = models(transformers.GraniteConfig, impl="p20_slope", attention_multiplier=0.7)
    ids, _ = padded(None, seq=10)
    with pytest.raises(ValueError, match=r"scaling = 0\.7.*param scale.*softmax scale stays 0\.25"):
        with torch.no_grad():
            ours(ids)
    # the model's scaling is the spec's softmax scale: the param keeps its default, or what the model forwards
    ref, ours = models(transformers.GraniteConfig, impl="p20_slope", attention_multiplier=0.25)
    with torch.no_grad():
        assert rel(ours(ids).logits, ref(ids).logits) < 2e-6
        sloped = ours(ids, scale=0.5).logits
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    bias = torch.where(j <= i, -0.5 * (i - j).float(), float("-inf"))[None, None]
    with torch.no_grad():
        assert rel(sloped, ref(ids, attention_mask=bias.expand(2, 1, 10, 10)).logits) < 2e-6


def test_a_specs_explicit_scale_other_than_the_models_is_refused():
    """[score].scale = 0.3 with Gemma 2's scaling 24**-0.5: the model's scaling overrode the spec's silently
    (a softcap other than the spec's was already refused)."""
    spec = 'head_dim = 16\n[score]\nscale = 0.3\nsoftcap = 5.0\n[mask]\nwhere = "j <= i"\n'
    attncc_hf.register("p20_scaled", spec=spec)
    _, ours = models(transformers.Gemma2Config, "eager", impl="p20_scaled", **GEMMA2)
    with pytest.raises(ValueError, match=r"scaling = 0\.204.*\[score\]\.scale = 0\.3"):
        with torch.no_grad():
            ours(padded(None, seq=6)[0])
    attncc_hf.register("p20_scaled_same", spec=spec.replace("0.3", repr(24 ** -0.5)))
    ref, ours = models(transformers.Gemma2Config, "eager", impl="p20_scaled_same",
                       **dict(GEMMA2, layer_types=["full_attention"] * 2))
    ids, _ = padded(None, seq=10)
    with torch.no_grad():
        assert rel(ours(ids).logits, ref(ids).logits) < 2e-6


WINDOW_SPEC = """name = "windowed"
head_dim = 16
[params]
sliding_window = 1000000
[mask]
where = "j <= i and i - j < sliding_window"
"""


def test_a_specs_param_named_sliding_window_takes_the_models_window():
    """transformers passes the layer's window as the attention function's named argument sliding_window,
    not among its keyword arguments: a spec's param of that name kept its default (1000000, plain causal)
    under Mistral's window of 4, logits off silently. Now it takes the layer's window, as a param named
    like a model keyword does."""
    attncc_hf.register("p20_window", spec=WINDOW_SPEC)
    ref, ours = models(transformers.MistralConfig, impl="p20_window", sliding_window=4)
    ids, _ = padded(None, seq=12)
    with torch.no_grad():
        assert rel(ours(ids).logits, ref(ids).logits) < 2e-6


# -- generation with every cache kind: clean regressions ---------------------------------------------------

@pytest.mark.parametrize("cache", ["static", None])
def test_gemma2_hybrid_cache_left_padding_and_beams(cache):
    """Sliding (window 5) and global layers, softcap, query_pre_attn_scalar; an 8-token prompt with 3 pads,
    7 new tokens: the static sliding layer rolls; beam search reorders the caches."""
    ref, ours = models(transformers.Gemma2Config, "eager", **GEMMA2)
    ids, mask = padded("left", seq=8, pads=3)
    same_generation(ref, ours, ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, num_beams=2,
                    cache_implementation=cache)


def test_continuing_on_a_prefilled_static_sliding_cache():
    """19 new tokens (attention at cache offsets) after a left-padded 8-token prompt, window 4."""
    from transformers import StaticCache

    ref, ours = models(transformers.MistralConfig, sliding_window=4)
    ids, mask = padded("left", seq=8, pads=3)
    more = torch.randint(2, 99, (2, 19), generator=torch.Generator().manual_seed(7))
    logits = []
    for model in (ref, ours):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            model(ids, attention_mask=mask, cache=cache)
            full_mask = torch.cat([mask, torch.ones(2, 19, dtype=torch.long)], 1)
            logits.append(model(more, attention_mask=full_mask, cache=cache).logits)
    assert rel(logits[1], logits[0]) < 2e-6


def test_prompt_lookup_decoding_on_a_sliding_window():
    """Several candidate tokens per step verified at once, the sliding layer recording its past for crop."""
    ref, ours = models(transformers.MistralConfig, sliding_window=4)
    ids, mask = padded(None, seq=8, batch=1)
    same_generation(ref, ours, ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                    prompt_lookup_num_tokens=3)


def test_gqa_five_to_one_head_dim_20():
    ref, ours = models(transformers.LlamaConfig, hidden_size=60, num_attention_heads=5, num_key_value_heads=1,
                       head_dim=20)
    ids, mask = padded("left", seq=20, pads=6)
    logits_rel, grad_rel = training_step(ref, ours, ids, mask)
    assert logits_rel < 2e-6 and grad_rel < 1e-5
    same_generation(ref, ours, ids, attention_mask=mask, max_new_tokens=3, cache_implementation="static")


# -- encoders, cross-attention, dropout: clean regressions --------------------------------------------------

def test_modernbert_bidirectional_sliding_window_with_padding():
    config = transformers.ModernBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64, local_attention=6,
                                           global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2, cls_token_id=1, sep_token_id=2, initializer_range=0.2)
    ref, ours = models(lambda **_: config, auto=AutoModel)
    states_rel, grad_rel = encoder_step(ref, ours, *padded("left", seq=20))
    assert states_rel < 2e-6 and grad_rel < 1e-5


def test_bart_cross_attention_with_encoder_padding_and_beams():
    config = transformers.BartConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=99, decoder_start_token_id=1, forced_eos_token_id=None, init_std=0.3)
    ref, ours = models(lambda **_: config, "eager", auto=AutoModelForSeq2SeqLM)
    src, src_mask = padded("left", seq=20, pads=7)
    tgt = torch.randint(2, 99, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        args = dict(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt)
        assert rel(ours(**args).logits, ref(**args).logits) < 2e-6
    same_generation(ref, ours, src, attention_mask=src_mask, max_new_tokens=4, min_new_tokens=4, num_beams=2,
                    cache_implementation="static")


def test_dropout_is_eagers_with_the_drawn_keep_mask():
    """Softmax, then the kept pairs scaled by 1 / (1 - p): GQA 3:1, head dim 12, a causal window, softcap,
    scaling, left padding; the output and the gradients of q, k, v."""
    impl = attncc_hf.registered(IMPL)
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hk, N, D, p, window, softcap, scale = 2, 6, 2, 20, 12, 0.3, 5, 4.0, 0.41
    q = torch.randn(B, Hq, N, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, Hk, N, D, generator=gen, requires_grad=True) for _ in range(2))
    padding = torch.ones(B, N, dtype=torch.long)
    padding[1, :4] = 0
    key_mask = impl.mask(B, N, N, mask_function=mu.sliding_window_causal_mask_function(window),
                         attention_mask=padding)
    torch.manual_seed(5)
    o, _ = impl.forward(type("A", (), {"is_causal": True})(), q, k, v, key_mask, scaling=scale, dropout=p,
                        softcap=softcap)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())  # the seed the call drew (attncc.runtime.call)
    kind = attncc_hf.MaskKind(causal=True, window=window)
    keep = impl._builtin_module(kind, True, softcap, p, q, v).dropout_keep_mask(q, k, v, seed=seed, dropout_p=p)
    s = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * scale
    s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    allowed = ((j <= i) & (i - j < window))[None, None] & padding.bool()[:, None, None, :]
    probs = torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1))
    want = ((probs * keep / (1 - p)) @ v.repeat_interleave(3, 1)).transpose(1, 2)
    real = padding.bool()
    assert rel(o[real], want[real]) < 2e-6
    go = torch.randn(o.shape, generator=gen)
    got = torch.autograd.grad((o * go)[real].sum(), (q, k, v))
    expected = torch.autograd.grad((want * go)[real].sum(), (q, k, v))
    assert max(rel(a, b) for a, b in zip(got, expected)) < 2e-6


def test_what_cannot_be_honoured_is_refused_clearly():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        text_config=dict(model_type="gemma", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=100),
        image_token_id=98, projection_dim=32, pad_token_id=0)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration._from_config(config, attn_implementation=IMPL).eval()
    ids = torch.cat([torch.full((2, 4), 98), torch.randint(2, 90, (2, 6))], 1)
    token_types = torch.cat([torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="or_masks.*not one of the masks"):
        model(input_ids=ids, pixel_values=torch.randn(2, 3, 16, 16), token_type_ids=token_types)
    _, ours = models(transformers.LlamaConfig)
    ids, mask = padded("left", seq=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="key_ok dim 0"):
            ours(ids, attention_mask=mask[1:])
        with pytest.raises(ValueError, match="expected a 2D padding mask"):
            ours(ids, attention_mask=mask[:, None])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ours(ids, attention_mask=mask, output_attentions=True)
    assert not out.attentions and any("returns no attention weights" in str(w.message) for w in caught)
