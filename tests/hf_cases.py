"""What the Hugging Face tests (tests/test_transformers.py, test_probe_hf19.py, hf20, hf21) share: attncc
registered for a test module, a padded batch of token ids, relative differences of logits and of a
model's gradients, one training step of two models."""
from __future__ import annotations

import pytest
import torch


def registering(*registrations: dict):
    """A module-scoped autouse fixture: ``attncc.integrations.transformers.register(**r)`` for each of
    ``registrations``, the modules compiled into a cache folder of the test module's own."""
    from attncc.integrations import transformers as attncc_hf

    @pytest.fixture(scope="module", autouse=True)
    def registered(tmp_path_factory):
        mp = pytest.MonkeyPatch()
        mp.setenv("ATTNCC_CACHE_DIR", str(tmp_path_factory.mktemp("attncc_cache")))
        for r in registrations:
            attncc_hf.register(**r)
        yield
        mp.undo()
    return registered


def model_pair(config_class, reference: str, impl: str, auto, common: dict, **overrides):
    """(reference, ours) in eval mode: one random model of ``config_class(**common, **overrides)`` (None
    values left out) under transformers' ``reference`` attention and, with the same weights, under ``impl``."""
    import copy

    config = config_class(**{k: v for k, v in dict(common, **overrides).items() if v is not None})
    torch.manual_seed(0)
    ref = auto.from_config(copy.deepcopy(config), attn_implementation=reference)
    ours = auto.from_config(copy.deepcopy(config), attn_implementation=impl)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def grads_rel(ref, ours):
    """The largest difference of a parameter's gradient, relative to its largest entry (at least 1e-4 of
    the model's largest: a key projection's bias has gradient 0, up to rounding)."""
    pairs = [(p.grad, q.grad) for p, q in zip(ref.parameters(), ours.parameters()) if p.grad is not None]
    floor = 1e-4 * max(g.abs().max().item() for g, _ in pairs)
    return max(((g - h).abs().max() / max(g.abs().max().item(), floor)).item() for g, h in pairs)


def padded(padding, seq=12, seed=1, batch=2, pads=4, right_pads=None):
    """Token ids [batch, seq] and their attention mask: row 1 has ``pads`` pad tokens on the left
    (``padding="left"``) or ``right_pads`` (default ``pads``) on the right, or none (None)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding == "left":
        mask[1, :pads] = 0
    elif padding == "right":
        mask[1, -(pads if right_pads is None else right_pads):] = 0
    ids[mask == 0] = 0
    return ids, mask


def training_step(ref, ours, ids, mask):
    """One loss.backward() of each model on the padded batch: (logits' relative difference on the real
    tokens, the gradients' :func:`grads_rel`)."""
    real = mask.bool()
    labels = torch.where(real & torch.roll(real, 1, 1), ids, -100)
    logits = []
    for model in (ref, ours):
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        logits.append(out.logits.detach()[real])
    return rel(logits[1], logits[0]), grads_rel(ref, ours)


def encoder_step(ref, ours, ids, mask, seed=4):
    """An encoder's hidden states on the real tokens, and the gradients of a random projection of them
    (a sum of squares after a LayerNorm is constant: no gradient to compare): (the states' relative
    difference, the gradients' :func:`grads_rel`)."""
    real = mask.bool()
    outs = []
    weights = None
    for model in (ref, ours):
        h = model(ids, attention_mask=mask).last_hidden_state[real]
        if weights is None:
            weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed))
        (h * weights).sum().backward()
        outs.append(h.detach())
    return rel(outs[1], outs[0]), grads_rel(ref, ours)
