"""Probe 21: the Hugging Face transformers integration on static caches, chunked prefill and what probes 19
and 20 (tests/test_probe_hf19.py, test_probe_hf20.py) did not cover; tiny random-weight models built from
configs (CPU, no downloads), compared with transformers' eager attention on the same weights (the
reference gets a user's pattern as a dense 4-D mask over the same cache).

Found and fixed:

* A user's spec that lets a query see later keys (bidirectional, prefix-LM, a look-ahead ``j <= i + 2``)
  on a StaticCache without a padding mask attended the cache's empty slots (zero keys and values past the
  tokens written so far): logits 0.6x their size off, silently (eager, given the pattern, sees the
  tokens only). The same call with an all-ones padding mask (what generate() passes) raised "the batch
  has padding" for a spec without key_ok: transformers pads the 2D mask with False over the empty slots.
  The mask function now ends the call's keys at the last one that holds a token (the 2D mask's end, and,
  under a model's causal mask, the last query): the kernels never see the empty slots, a padding mask
  with no padding among the tokens is no padding, and ``n_k`` is the tokens' count.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, StaticCache  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

from attncc.integrations import transformers as attncc_hf  # noqa: E402
from hf_cases import rel  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=99, initializer_range=0.2)
IMPL = "attncc_p21"


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNCC_CACHE_DIR", str(tmp_path_factory.mktemp("attncc_cache")))
    attncc_hf.register(IMPL)
    yield
    mp.undo()


def models(config_class=transformers.LlamaConfig, reference="eager", impl=IMPL, auto=AutoModelForCausalLM,
           common=COMMON, **overrides):
    config = config_class(**{k: v for k, v in dict(common, **overrides).items() if v is not None})
    torch.manual_seed(0)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = auto.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


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
    ("look_ahead", 3, True, True), ("bottom_right", 4, False, True)])
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
