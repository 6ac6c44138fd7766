"""Probe 19 of the call API: ``attention()`` and ``decode()`` as a PyTorch user calls them, against
attncc.reference (float64) and against what SDPA does with the same call.

Probed (tests/probe_api19 below keeps seeded random cases of each): q, k, v as views (BNHD
transposes, storage offsets of 1 and 3 elements, a stride-2 last dim, stride-0 expanded batch or
heads, rows that overlap in memory, narrowed slices of all four dims, [N, B, D, H] permutations),
zero-size B / Nq / Nk, head dims 3, 5, 24, 40, 72, 80, 96 and value dims of their own, GQA groups 1-3,
offsets and explicit n_q / n_k, scale overrides, gradients of a subset of q, k, v (and of learned
tables) from o, the LSE or both, no_grad and inference_mode, linear attention among them, one
process alternating modules, shapes, strides, dtypes and params (the signature caches), the same
random calls from several threads at once, and torch.compile(fullgraph=True, backend="eager").
Edge cases refused clearly (unchanged): float64 and mixed dtypes outside autocast, H = 0,
Hq % Hkv != 0, scale 0 / negative / a tensor that requires grad, double backward (a RuntimeError
naming attncc, also through the LSE).

Found and fixed:
- ``torch.autocast`` was ignored. SDPA runs under autocast in the autocast dtype (lower_precision_fp);
  attncc ran float32 inputs in float32 and refused mixed dtypes, so a Hugging Face model under
  ``torch.autocast`` (RoPE's float32 cos / sin promote q and k to float32, v comes from an autocast
  linear in bfloat16) failed with "q, k, v must have one dtype" where its sdpa attention runs.
  Now bind and bind_decode cast q, k, v as SDPA's policy does (attncc.runtime.call.autocast_operands).
- A value (or head) dim whose rows are not a multiple of 16 bytes (fp32 Dv = 5, 13, 17; fp16 Dv = 20)
  came back as a view of the kernels' padded buffer: o (and the gradients torch.autograd.grad
  returns) were not contiguous, and ``o.view(B * H, N, Dv)``, which SDPA's output takes, raised.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module, pattern, rel_err


def _qkv(shapes, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(grad) for s in shapes]


# ---------------------------------------------------------------------------------------------
# torch.autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_autocast_runs_attention_in_its_dtype_as_sdpa_does(v_dtype):
    """Under torch.autocast (CPU, bfloat16): float32 q, k, v, or float32 q, k beside a bfloat16 v
    (a Hugging Face model's RoPE promotes q and k), run in bfloat16 as SDPA does; gradients come
    back in the leaves' dtypes. Before, the first ran in float32 and the second was refused."""
    m, p = module("dense"), pattern("dense")
    q, k, v = _qkv([(2, 2, 13, 16), (2, 2, 11, 16), (2, 2, 11, 8)], grad=True)
    vv = v.to(v_dtype).detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = m.attention(q, k, vv)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, vv)
    assert o.dtype == want.dtype == torch.bfloat16
    ref = attncc.reference(p, *(t.detach().bfloat16().double() for t in (q, k, vv)))
    assert rel_err(o.detach(), ref) < 2e-2
    assert rel_err(o.detach(), want.detach()) < 2e-2
    o.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32 and vv.grad.dtype == v_dtype


def test_autocast_leaves_float64_and_other_devices_alone():
    """As SDPA under autocast: float64 is not cast (and refused, as outside autocast), and an
    autocast for another device type changes nothing."""
    m = module("causal")
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="bfloat16, float16 or float32, got float64"):
            m.attention(q.double(), k.double(), v.double())
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert m.attention(q, k, v).dtype == torch.float32


def test_autocast_decode():
    """decode under autocast: a float32 q beside a bfloat16 cache runs in bfloat16 (it was refused)."""
    m, p = module("causal"), pattern("causal")
    q, k, v = _qkv([(2, 2, 1, 16), (2, 2, 12, 16), (2, 2, 12, 16)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = m.decode(q, k.bfloat16(), v.bfloat16(), kv_len=[5, 12])
    assert o.dtype == torch.bfloat16
    for b, n in enumerate([5, 12]):
        ref = attncc.reference(p, *(t[b:b + 1].bfloat16().double() for t in (q, k[:, :, :n], v[:, :, :n])),
                               q_offset=n - 1)
        assert rel_err(o[b:b + 1], ref) < 2e-2


def test_autocast_under_torch_compile_fullgraph():
    m = module("causal")
    f = torch.compile(lambda q, k, v: m.attention(q, k, v), fullgraph=True, backend="eager")
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    assert f(q, k, v).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f(q, k, v.bfloat16()).dtype == torch.bfloat16


def test_hugging_face_model_under_autocast():
    """The transformers integration under torch.autocast gives sdpa's logits (it raised TypeError)."""
    transformers = pytest.importorskip("transformers")
    from attncc.integrations import transformers as attncc_hf

    attncc_hf.register()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for impl in ("sdpa", "attncc"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[impl] = model(ids).logits.float()
    assert (logits["sdpa"] - logits["attncc"]).abs().max() < 2e-2


# ---------------------------------------------------------------------------------------------
# Layout of what comes back
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, D, Dv", [(torch.float32, 17, 17), (torch.float32, 16, 5), (torch.float16, 20, 20),
                                          (torch.float32, 24, 13)])
def test_outputs_and_gradients_are_contiguous(dtype, D, Dv):
    """o and the gradients (torch.autograd.grad's) are contiguous as SDPA's: with rows of a width that
    is not a multiple of 16 bytes they were views of the kernels' padded buffers, and
    ``o.view(B * H, N, Dv)`` raised."""
    m, p = module("causal"), pattern("causal")
    q, k, v = _qkv([(2, 2, 9, D), (2, 2, 9, D), (2, 2, 9, Dv)], dtype=dtype, grad=True)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            o = m.attention(q, k, v)
        assert o.is_contiguous(), o.stride()
        assert o.view(4, 9, Dv).shape == (4, 9, Dv)
    ref = attncc.reference(p, q.double(), k.double(), v.double())
    assert rel_err(o.detach(), ref.detach()) < (1e-4 if dtype == torch.float32 else 5e-3)
    grads = torch.autograd.grad(o.float().sum(), (q, k, v))
    assert all(g.is_contiguous() for g in grads), [g.stride() for g in grads]
