"""attncc as a Hugging Face transformers attention implementation: tiny random models built from
configs (no downloads) give the logits, gradients and greedy generations of transformers' own
sdpa / eager attention, with padding, sliding windows, softcapping and GQA."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402
from hf_cases import registering  # noqa: E402

SEQ = 24
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=99,
              initializer_range=0.2)  # scores of a few units: softcap, windows and padding all show
WINDOW = 8  # < SEQ, and < the prompts of the generation tests: the sliding cache drops keys


def configs():
    return {
        "llama": (LlamaConfig(**COMMON), "sdpa"),
        "mistral": (MistralConfig(**COMMON, sliding_window=WINDOW), "sdpa"),
        # layer 0 sliding, layer 1 global; softcap on the scores; scaling 24**-0.5, not 16**-0.5;
        # eager: sdpa refuses softcap
        "gemma2": (Gemma2Config(**COMMON, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                                final_logit_softcapping=None, layer_types=["sliding_attention", "full_attention"]),
                   "eager"),
    }


registered = registering({}, {"name": "attncc_no_decode", "decode": False})


def models(kind, impl="attncc", **overrides):
    """(reference model, attncc model) with the same random weights."""
    config, reference = configs()[kind]
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == impl and ref.config._attn_implementation == reference
    return ref, ours


def batch(padding="left", seq=SEQ, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (2, seq), generator=gen)
    mask = torch.ones(2, seq, dtype=torch.long)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, -6:] = 0
    ids[mask == 0] = 0
    return ids, mask


def close(a, b, what, rel=2e-5):
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-6, f"{what}: max |diff| {err:.2e}, max |ref| {b.abs().max():.2e}"


@pytest.mark.parametrize("kind, padding", [("llama", "left"), ("llama", "right"), ("mistral", "left"),
                                           ("gemma2", "left"), ("llama", None)])
def test_logits_and_gradients_equal_transformers_attention(kind, padding):
    ref, ours = models(kind)
    ids, mask = batch(padding)
    real = mask.bool()  # padded positions' outputs are arbitrary (no key to attend) and unused
    # the loss at t compares logits[t - 1] with labels[t]: both positions real
    labels = torch.where(real & torch.roll(real, 1, 1), ids, -100)
    out = {}
    for name, model in (("ref", ref), ("ours", ours)):
        result = model(ids, attention_mask=mask if padding else None, labels=labels)
        result.loss.backward()
        out[name] = result.logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    close(out["ours"][0][real], out["ref"][0][real], "logits")
    for n, g in out["ref"][1].items():
        if g is not None and g.abs().max() > 0:
            close(out["ours"][1][n], g, n, rel=1e-4)


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_greedy_generation_with_a_kv_cache_equals_transformers(kind):
    """Prompts of 20 tokens (prefill through attention, longer than the window) with left padding;
    four new tokens through decode, the sliding layers' cache holding only the last keys."""
    ref, ours = models(kind)
    ids, mask = batch("left", seq=20, seed=2)
    args = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    calls = attncc_hf.registered().calls
    before = dict(calls)
    expected = ref.generate(ids, **args)
    got = ours.generate(ids, **args)
    assert torch.equal(got, expected), (got[:, 20:], expected[:, 20:])
    layers = COMMON["num_hidden_layers"]
    assert calls["attention"] - before.get("attention", 0) == layers  # the prompt
    assert calls["decode"] - before.get("decode", 0) == 3 * layers  # the steps after the first token


def test_generation_through_attention_only_is_the_same():
    ref, ours = models("mistral", impl="attncc_no_decode")
    ids, mask = batch("left", seq=12, seed=3)
    args = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(ours.generate(ids, **args), ref.generate(ids, **args))
    assert attncc_hf.registered("attncc_no_decode").calls["decode"] == 0


def test_no_dense_mask_reaches_the_kernels(monkeypatch):
    seen = []
    real_run = attncc_hf._Implementation._run

    class Kernels:  # the generated module, recording the tensors each call hands it
        def __init__(self, module, mask):
            self.module, self.mask = module, mask

        def attention(self, *args, **kwargs):
            shapes = [tuple(t.shape) for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
            seen.append((self.mask, shapes))
            return self.module.attention(*args, **kwargs)

    def spy(self, run, mask, *rest):
        return real_run(self, Kernels(run, mask), mask, *rest)

    monkeypatch.setattr(attncc_hf._Implementation, "_run", spy)
    _, ours = models("mistral")
    ids, mask = batch("left")
    with torch.no_grad():
        ours(ids, attention_mask=mask)
    assert len(seen) == COMMON["num_hidden_layers"]
    for key_mask, tensors in seen:
        assert isinstance(key_mask, attncc_hf.KeyMask)
        assert key_mask.kind == attncc_hf.MaskKind(causal=True, window=WINDOW)
        q, k, v = (2, 4, SEQ, 16), (2, 2, SEQ, 16), (2, 2, SEQ, 16)
        assert tensors == [q, k, v, (2, SEQ)]  # padding as one flag per key: key_ok, no [B, 1, N, N]


PREFIX_SPEC = """name = "prefix_lm_padded"
head_dim = 16
dtypes = ["float32"]
[params]
prefix = 4
[inputs]
key_ok = { dims = ["b", "n"], dtype = "bool" }
[mask]
where = "(j <= i or j < prefix) and key_ok[b, j]"
"""


def test_a_users_spec_replaces_the_mask():
    """Prefix-LM on a Llama: the reference gets the same pattern as a dense 4-D mask."""
    attncc_hf.register("attncc_prefix", spec=PREFIX_SPEC)
    ref, ours = models("llama", impl="attncc_prefix")
    ids, mask = batch("right")
    prefix = 6
    i, j = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    dense = ((j <= i) | (j < prefix))[None, None] & mask.bool()[:, None, None, :]
    real = mask.bool()
    with torch.no_grad():
        expected = ref(ids, attention_mask=dense).logits
        got = ours(ids, attention_mask=mask, prefix=prefix).logits  # the param reaches the kernels as a kwarg
        default = ours(ids, attention_mask=mask).logits  # the spec's prefix = 4
    close(got[real], expected[real], "logits")
    assert not torch.allclose(default[real], expected[real], atol=1e-3)


def test_what_cannot_be_mapped_is_an_error():
    _, ours = models("llama")
    ids, mask = batch(None, seq=8)
    dense = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(TypeError, match="no dense masks"):
        ours(ids, attention_mask=dense)
    from transformers import masking_utils

    chunked = masking_utils.and_masks(masking_utils.causal_mask_function,  # Llama 4's chunked attention
                                      masking_utils.chunked_overlay(4, torch.zeros(2, dtype=torch.long)))
    unmapped = attncc_hf.registered().mask(2, 8, 8, mask_function=chunked)  # refused where a layer uses it
    q = torch.randn(2, 4, 8, 16)
    with pytest.raises(NotImplementedError, match="not one of the masks"):
        attncc_hf.registered().forward(None, q, q, q, unmapped)

    attncc_hf.register("attncc_causal_only", spec='head_dim = 16\n[mask]\nwhere = "j <= i"\n')
    _, custom = models("llama", impl="attncc_causal_only")
    with pytest.raises(ValueError, match="has no input key_ok"):
        custom(*batch("left", seq=8))
    _, gemma = models("gemma2", impl="attncc_causal_only")
    with pytest.raises(ValueError, match="softcap = 5.0, the spec has none"):
        gemma(ids)


def test_dropout_while_training():
    _, ours = models("llama", attention_dropout=0.5)
    ids, mask = batch(None, seq=8)
    ours.eval()
    with torch.no_grad():
        plain = ours(ids).logits
    ours.train()
    with torch.no_grad():
        torch.manual_seed(5)
        first = ours(ids).logits
        torch.manual_seed(5)
        again = ours(ids).logits
    assert torch.equal(first, again) and not torch.allclose(first, plain, atol=1e-3)


def test_cross_attention_sees_every_encoder_key():
    """An encoder-decoder model (tiny BART): a decoder call of at most 16 queries without gradients
    went to decode with kv_len = the queries' count, so cross-attention saw only the first Nq encoder
    states (logits off by 9 at a max of 8.6; generation saw only the first; found by a probe). Its
    decoder self-attention still runs decode; the logits and greedy generation equal eager's."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig

    config = BartConfig(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=99, decoder_start_token_id=1,
                        forced_eos_token_id=None, init_std=0.3)
    torch.manual_seed(0)
    ref = AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    ours = AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation="attncc").eval()
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(2, 99, (2, 20), generator=gen)  # 20 encoder states
    tgt = torch.randint(2, 99, (2, 12), generator=gen)  # 12 decoder queries: <= 16
    calls = attncc_hf.registered().calls
    before = dict(calls)
    with torch.no_grad():
        close(ours(input_ids=src, decoder_input_ids=tgt).logits, ref(input_ids=src, decoder_input_ids=tgt).logits,
              "logits")
        args = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1)
        assert torch.equal(ours.generate(src, **args), ref.generate(src, **args))
    assert calls["decode"] > before.get("decode", 0)  # the decoder's self-attention steps


@pytest.mark.parametrize("nq, nk", [(6, 10), (10, 10), (10, 6)])
def test_no_mask_is_sdpas_is_causal(nq, nk):
    """A model that builds no mask (attention_mask=None, causal module): the queries are the keys'
    last Nq positions; with more queries than keys top-left, as sdpa's is_causal (it refused a
    negative q_offset)."""
    fn = attncc_hf.registered()
    module = type("Attention", (), {"is_causal": True})()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, nq, 16, generator=gen)
    k, v = (torch.randn(2, 4, nk, 16, generator=gen) for _ in range(2))
    o, _ = fn.forward(module, q, k, v, None)
    shift = max(nk - nq, 0)
    allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + shift
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    close(o, want.transpose(1, 2), "o")
