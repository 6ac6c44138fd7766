"""Probe 21: the Hugging Face transformers integration on static caches, chunked prefill and what probes 19
and 20 (tests/test_probe_hf19.py, test_probe_hf20.py) did not cover; tiny random-weight models built from
configs (CPU, no downloads), compared with transformers' eager attention on the same weights (the
reference gets a user's pattern as a dense 4-D mask over the same cache).

Probed clean (float32 logits within 2e-6 relative of eager's, generations token for token with every
step's logits within 2e-6; about 90 cases, the user's window spec on a static sliding cache kept as a
test marked slow):

* prefill in chunks (3 to 1 + 1 + 12 tokens per call, 11 splits) appended to static and dynamic caches,
  left / right / mixed padding (a batch of 4: left, right, none, a hole), for Llama, Mistral (window 3 and
  4: the static sliding layers filling, becoming full at an offset, full; windows 1, 2 and 40 with static
  generate()), Gemma 2 (hybrid, softcap), Gemma 3 and Qwen2 (sliding layers from max_window_layers);
  gradients through two chunks on a DynamicCache, built-in and a user's causal spec;
  a user's window spec (the layer's window as its param, key_ok) the same way, and its generate() with
  left padding on static and dynamic caches; a user's causal spec with key_ok: greedy and 2-beam
  generate() with left padding on static and dynamic caches, prompt-lookup decoding on a StaticCache of
  40 slots (crop leaves stale keys past the tokens);
* BART decoder calls of 4, 1 and 4 tokens on static and dynamic EncoderDecoderCaches, the cross-attention
  over left-padded encoder states (a static cross cache longer than the encoder states is refused: "the
  mask was made for 10 keys, the call has 16"); Llama with is_causal=False (bidirectional) on static and
  dynamic caches in chunks with a padding mask; DeepSeek-V3 (MLA, value dim 8) static generate() and
  chunks; assisted generation;
* batch 1 against batch 2 and 4 rows run one at a time; GQA 8:1 at head dim 6, 3:1 at 10, 1:1 at 8 and
  28, 5:1 at 4, logits and static generate(); a spec's head_dim other than the model's (it runs: head_dim
  is what tune tunes);
* float16 and bfloat16 on the CPU against float32 eager: errors 0.003 (float16) and 0.023 (bfloat16),
  eager's own 0.003 and 0.024 (sdpa 0.017); float16 generations equal eager's; one bfloat16 generation
  differs from eager's at a near tie (float32 logits 3.945 and 3.906, both 3.906 in attncc's bfloat16
  run); a user's spec in bfloat16 the same; chunks on a static cache in both.

Not changed: transformers' eager and sdpa attend a static cache's empty slots themselves under a model's
own bidirectional mask without a padding mask (Llama with is_causal=False, StaticCache, no
attention_mask); so does attncc there (such a call cannot be told from cross-attention's, whose keys past
the queries are the encoder's). A 2D mask shorter than the queries' positions leaves their rows without
a key: output 0, as sdpa (eager averages every key).

Found and fixed:

* A user's spec that lets a query see later keys (bidirectional, prefix-LM, a look-ahead ``j <= i + 2``)
  on a StaticCache without a padding mask attended the cache's empty slots (zero keys and values past the
  tokens written so far): logits 0.6x their size off, silently (eager, given the pattern, sees the
  tokens only). The same call with an all-ones padding mask (what generate() passes) raised "the batch
  has padding" for a spec without key_ok: transformers pads the 2D mask with False over the empty slots.
  The mask function now ends the call's keys at the last one that holds a token (the 2D mask's end, and,
  under a mask built on transformers' causal one, the last query): the kernels never see the empty
  slots, a padding mask with no padding among the tokens is no padding, and a spec's ``n_k`` (bottom-right
  causal ``j - n_k <= i - n_q`` saw 24 - n_q keys ahead) is the tokens' count.
* The same under a mask transformers builds from its causal one with an overlay the integration does not
  map (``or_masks``: PaliGemma's prefix, Gemma 3's image blocks), which a user's spec may replace: the keys
  now end at the last query there too (``built_on_causal``).
* A backward through chunks appended to a StaticCache (two forward calls, one loss) raised PyTorch's
  "modified by an inplace operation": the kernels saved the cache's own tensors, which the next chunk
  writes into (a static sliding layer just full too). Keys that need gradients and are a static cache's
  storage (cut before empty slots, or marked by transformers with torch._dynamo.mark_static_address) reach
  the kernels as a copy (eager and sdpa work with GQA, where repeat_kv copies them).
"""
from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402
from hf_cases import grads_rel, model_pair, padded, registering, rel  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=99, initializer_range=0.2)
IMPL = "attncc_p21"


registered = registering({"name": IMPL})


def models(config_class=transformers.LlamaConfig, reference="eager", impl=IMPL, auto=AutoModelForCausalLM,
           common=COMMON, **overrides):
    return model_pair(config_class, reference, impl, auto, common, **overrides)


def chunks(total, seed, pieces=3):
    """``pieces`` lengths >= 1 adding up to ``total``, drawn from ``seed``."""
    cuts = torch.randperm(total - 1, generator=torch.Generator().manual_seed(seed))[:pieces - 1] + 1
    bounds = [0, *sorted(cuts.tolist()), total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def dense(allowed, start, n, capacity, batch=2):
    """eager's additive 4-D mask of queries [start, start + n) over a cache of ``capacity`` slots: the
    pattern ``allowed(i, j)`` over the keys that hold tokens (j < start + n)."""
    i = torch.arange(start, start + n)[:, None]
    j = torch.arange(capacity)[None, :]
    ok = allowed(i, j) & (j < start + n)
    return torch.zeros(n, capacity).masked_fill(~ok, float("-inf"))[None, None].expand(batch, 1, n, capacity)


# -- the defect: a user's spec over a static cache's empty slots ----------------------------------------

PATTERNS = {  # spec's [mask].where (absent: every key), the same pattern over position tensors
    "bidirectional": (None, lambda i, j: torch.ones_like(i * j, dtype=torch.bool)),
    "prefix_lm": ("j <= i or j < 6", lambda i, j: (j <= i) | (j < 6)),
    "look_ahead": ("j <= i + 2", lambda i, j: j <= i + 2),
    # bottom-right causal: n_k was the cache's 24 slots, the queries saw 24 - n_q keys ahead
    "bottom_right": ("j - n_k <= i - n_q", lambda i, j: j <= i),
}


def pattern_impl(name, decode=True):
    """The registered name of the spec of pattern ``name``."""
    where, _ = PATTERNS[name]
    spec = f'name = "p21_{name}"\nhead_dim = 16\n' + ("" if where is None else f'[mask]\nwhere = "{where}"\n')
    return attncc_hf.register(f"p21_{name}_{decode}", spec=spec, decode=decode)


@pytest.mark.parametrize("pattern, seed, ones_mask, decode", [
    ("bidirectional", 0, False, True), ("prefix_lm", 1, True, True), ("look_ahead", 2, False, False),
    ("bottom_right", 3, False, True)])
def test_a_spec_seeing_later_keys_never_attends_a_static_caches_empty_slots(pattern, seed, ones_mask, decode):
    """A 14-token prompt in three seeded chunks appended to a StaticCache of 24 slots, with no padding mask
    or an all-ones one, through decode or attention: each chunk's logits are eager's with the pattern over
    the tokens written so far."""
    impl = pattern_impl(pattern, decode)
    ref, ours = models(impl=impl)
    ids = torch.randint(2, 99, (2, 14), generator=torch.Generator().manual_seed(seed))
    caches = [StaticCache(config=m.config, max_cache_len=24) for m in (ref, ours)]
    start = 0
    for n in chunks(14, seed):
        part = ids[:, start:start + n]
        mask = torch.ones(2, start + n, dtype=torch.long) if ones_mask else None
        with torch.no_grad():
            want = ref(part, attention_mask=dense(PATTERNS[pattern][1], start, n, 24), cache=caches[0]).logits
            got = ours(part, attention_mask=mask, cache=caches[1]).logits
        assert rel(got, want) < 2e-6, (start, n)
        start += n
    assert bool(attncc_hf.registered(impl).calls["decode"]) == decode  # chunks of at most 12 queries


def test_a_mask_built_on_causal_with_an_overlay_ends_the_keys_at_the_last_query():
    """A mask function transformers builds from causal_mask_function with an overlay it does not map
    (or_masks: PaliGemma's prefix, Gemma 3's image blocks), a user's spec, no padding mask: the keys past the
    last query (a static cache's zero slots) were attended. Queries at positions 5..7 of a 16-slot cache."""
    impl = attncc_hf.registered(pattern_impl("look_ahead"))
    overlay = mu.or_masks(mu.causal_mask_function, lambda b, h, i, j: j < 2)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 3, 16, generator=gen)
    k, v = (torch.randn(2, 2, 16, 16, generator=gen).index_fill(2, torch.arange(8, 16), 0.0) for _ in range(2))
    key_mask = impl.mask(2, 3, 16, q_offset=5, mask_function=overlay)
    module = type("Attention", (), {"is_causal": True})()
    with torch.no_grad():
        got, _ = impl.forward(module, q, k, v, key_mask, scaling=0.25)
    i, j = torch.arange(5, 8)[:, None], torch.arange(16)[None, :]
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~((j <= i + 2) & (j < 8)), -torch.inf)
    want = (torch.softmax(scores, -1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert rel(got, want) < 2e-6


@pytest.mark.parametrize("config_class, first, window", [(transformers.LlamaConfig, 5, None),
                                                         (transformers.MistralConfig, 4, 4)])
def test_gradients_through_chunks_on_a_static_cache(config_class, first, window):
    """Two chunks (left padding) on a StaticCache, one backward: the kernels had saved the cache itself for
    it, which the second chunk writes in place (RuntimeError "modified by an inplace operation"; eager's
    repeat_kv copies the keys with GQA): Llama's cache with empty slots after 5 tokens, Mistral's sliding
    layers (window 4) just full after 4. Logits and gradients of eager's."""
    ref, ours = models(config_class, sliding_window=window)
    ids, mask = padded("left", seq=12, pads=3)
    real = mask.bool()
    weights = torch.randn(2, 12, COMMON["vocab_size"], generator=torch.Generator().manual_seed(1))[real]
    logits = []
    for model in (ref, ours):
        cache = StaticCache(config=model.config, max_cache_len=16)
        head = model(ids[:, :first], attention_mask=mask[:, :first], cache=cache).logits
        out = torch.cat([head, model(ids[:, first:], attention_mask=mask, cache=cache).logits], 1)[real]
        (out * weights).sum().backward()
        logits.append(out.detach())
    assert rel(logits[1], logits[0]) < 2e-6 and grads_rel(ref, ours) < 1e-5


# -- clean regressions ----------------------------------------------------------------------------------

WINDOW_SPEC = """name = "p21_window"
head_dim = 16
[params]
sliding_window = 1000000
[inputs]
key_ok = { dims = ["b", "n"], dtype = "bool" }
[mask]
where = "j <= i and i - j < sliding_window and key_ok[b, j]"
"""


@pytest.mark.slow
def test_chunked_prefill_of_a_users_window_on_a_static_sliding_cache():
    """A left-padded 14-token batch in chunks of 3, 6 and 5 appended to a StaticCache whose sliding layers
    (window 4) hold 4 slots: filling, becoming full (keys at an offset), full; Mistral's layer window as the
    spec's param: the logits of eager's full pass."""
    impl = attncc_hf.register("p21_window", spec=WINDOW_SPEC)
    ref, ours = models(transformers.MistralConfig, impl=impl, sliding_window=4)
    ids, mask = padded("left", seq=14, pads=3)
    cache = StaticCache(config=ours.config, max_cache_len=24)
    got, start = [], 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        for n in (3, 6, 5):
            got.append(ours(ids[:, start:start + n], attention_mask=mask[:, :start + n], cache=cache).logits)
            start += n
    real = mask.bool()
    assert rel(torch.cat(got, 1)[real], want[real]) < 2e-6
