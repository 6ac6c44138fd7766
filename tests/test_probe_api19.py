"""Probe 19 of the call API: ``attention()`` and ``decode()`` as a PyTorch user calls them, against
attncc.reference (float64) and against what SDPA does with the same call.

Probed (seeded random calls, some kept below as regression tests; about 900 ran clean after the
fixes): q, k, v as views (BNHD
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
from cases import module, one_grid_at_a_time, pattern, rel_err


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


# ---------------------------------------------------------------------------------------------
# Seeded random calls (the probe's generator, kept as regression tests: all passed after the fixes)
# ---------------------------------------------------------------------------------------------

SPECS = ["causal", "sliding_window", "alibi", "softcap", "document", "dense", "gqa", "prefix_lm", "t5_bias",
         "rope_causal", "strided", "dilated", "linear_elu", "chunked_local", "cross_causal", "padding", "alibi_learned"]
TOL = {torch.float32: 2e-3, torch.float16: 3e-2}
VIEWS = ["dense", "bnhd", "offset1", "offset3", "step", "exp_b", "exp_h", "overlap", "narrow", "permuted"]


def _view(kind, shape, dtype, gen):
    """(a leaf, the [B, H, N, D] view of it an operand is made of)."""
    B, H, N, D = shape
    leaf_shape, view = {
        "dense": (shape, lambda x: x),
        "bnhd": ((B, N, H, D), lambda x: x.transpose(1, 2)),
        "offset1": ((B * H * N * D + 1,), lambda x: x[1:].view(shape)),  # 4 bytes off 16-byte alignment
        "offset3": ((B * H * N * D + 3,), lambda x: x[3:].view(shape)),
        "step": ((B, H, N, 2 * D), lambda x: x[..., 1::2]),
        "exp_b": ((1, H, N, D), lambda x: x.expand(shape)),
        "exp_h": ((B, 1, N, D), lambda x: x.expand(shape)),
        "overlap": ((B * H * N + D + 1,), lambda x: x.as_strided(shape, (H * N, N, 1, 1), 1)),  # rows overlap
        "narrow": ((B, H + 1, N + 2, D + 3), lambda x: x[:, 1:, 2:, 3:]),
        "permuted": ((N, B, D, H), lambda x: x.permute(1, 3, 0, 2)),
    }[kind]
    return torch.randn(leaf_shape, generator=gen).to(dtype), view


def _random_case(rnd):
    name = rnd.choice(SPECS)
    p = pattern(name)
    linear = p.kind == "linear"
    Hkv = p.heads_kv or rnd.choice([1, 2])
    Hq = p.heads_q or Hkv * rnd.choice([1, 2, 3])
    Nq = rnd.choice([0, 1, 7, 19, 33])
    Nk = Nq if linear else rnd.choice([0, 1, 8, 21, 33])
    D = rnd.choice([5, 16, 24]) if linear else rnd.choice([24, 40, 72, 6, 16]) if p.rope else \
        rnd.choice([24, 40, 72, 80, 96, 5, 16, 3])
    qo, ko = (0, 0) if linear else (rnd.choice([0, 0, 3, 17]), rnd.choice([0, 0, 2, 9]))
    return dict(name=name, dtype=rnd.choice([torch.float32, torch.float32, torch.float16]),
                B=rnd.choice([0, 1, 1, 2, 2]), Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=rnd.choice([D, D, 8, 13, 40]),
                qo=qo, ko=ko, nq=None if linear or rnd.random() < 0.7 else qo + Nq + rnd.choice([0, 5]),
                nk=None if linear or rnd.random() < 0.7 else ko + Nk + rnd.choice([0, 5]),
                scale=None if linear else rnd.choice([None, None, 0.07, 1, 3.0]),
                mode=rnd.choice(["grad", "grad", "grad", "no_grad", "inference"]),
                grads=[rnd.random() < 0.6 for _ in range(3)], views=[rnd.choice(VIEWS) for _ in range(3)],
                loss="og" if linear else rnd.choice(["o", "og", "lse", "both"]), seed=rnd.randrange(2**31))


def _run_case(c):
    """One call of the module and of the reference (float64) with the same views; a list of what differs."""
    from cases import SMALL_PARAMS, inputs_for

    p, mod = pattern(c["name"]), module(c["name"])
    linear = p.kind == "linear"
    gen = torch.Generator().manual_seed(c["seed"])
    dt, B, Hq = c["dtype"], c["B"], c["Hq"]
    shapes = [(B, Hq, c["Nq"], c["D"]), (B, c["Hkv"], c["Nk"], c["D"]), (B, c["Hkv"], c["Nk"], c["Dv"])]
    views = [_view(kind, s, dt, gen) for kind, s in zip(c["views"], shapes)]
    n = max(c["qo"] + c["Nq"], c["ko"] + c["Nk"], c["nq"] or 0, c["nk"] or 0, 1)
    kw = dict(SMALL_PARAMS.get(c["name"], {}), **inputs_for(p, max(B, 1), Hq, n, gen))
    kw = {k: t[:B] if any(d.name == k and d.dims[0] == "b" for d in p.inputs) else t for k, t in kw.items()}
    learned = [d.name for d in p.inputs if d.grad]
    pos = {} if linear else dict(q_offset=c["qo"], k_offset=c["ko"], n_q=c["nq"], n_k=c["nk"])
    if c["scale"] is not None:
        pos["scale"] = c["scale"]
    g = torch.randn(B, Hq, c["Nq"], c["Dv"], generator=gen)
    gl = torch.randn(B, Hq, c["Nq"], generator=gen)
    want_grad = c["mode"] == "grad"

    def call(fn, cast, context):
        leaves = [cast(leaf).detach().clone().requires_grad_(want_grad and wants)
                  for (leaf, _), wants in zip(views, c["grads"])]
        ops = [view(leaf) for leaf, (_, view) in zip(leaves, views)]
        inputs = {k: cast(t).detach().clone().requires_grad_(want_grad) if k in learned else t for k, t in kw.items()}
        with context():
            o, lse = (fn(*ops, **pos, **inputs), None) if linear else fn(*ops, return_lse=True, **pos, **inputs)
        wrt = [t for t in [*leaves, *(inputs[k] for k in learned)] if t.requires_grad]
        if not wrt:
            return o, lse, []
        terms = {"o": o.sum(), "og": (o * cast(g)).sum()}
        if lse is not None:
            terms["lse"] = torch.where(torch.isfinite(lse).detach(), lse * cast(gl), 0).sum()
            terms["both"] = terms["og"] + terms["lse"]
        loss = terms[c["loss"]]
        if not loss.requires_grad:
            return o, lse, [torch.zeros_like(t) for t in wrt]
        return o, lse, torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)

    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[c["mode"]]
    o, lse, got = call(mod.attention, lambda t: t.to(dt) if t.is_floating_point() else t, context)
    ref, ref_lse, want = call(lambda *a, **k: attncc.reference(p, *a, **k), lambda t: t.double(), context)
    problems = []
    if o.shape != ref.shape or o.dtype != dt or not o.is_contiguous():
        problems.append(f"o: shape {tuple(o.shape)}, {o.dtype}, strides {o.stride()}")
    if ref.numel() and ref.abs().max() > 0 and rel_err(o.detach(), ref.detach()) > TOL[dt]:
        problems.append(f"o off by {rel_err(o.detach(), ref.detach()):.3g}")
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(lse), finite):
            problems.append("lse: other rows without keys")
        elif finite.any() and (lse.detach()[finite].double() - ref_lse.detach()[finite]).abs().max() > 50 * TOL[dt]:
            problems.append("lse off")
    largest = max([float(r.abs().max()) for r in want if r.numel()] + [1.0])
    for i, (x, r) in enumerate(zip(got, want)):
        if not torch.isfinite(x).all():
            problems.append(f"gradient {i} not finite")
        elif r.numel() and float(r.abs().max()) > 1e-6:
            if rel_err(x, r) > 10 * TOL[dt]:
                problems.append(f"gradient {i} off by {rel_err(x, r):.3g}")
        elif x.numel() and float(x.abs().max()) > 10 * TOL[dt] * largest:
            problems.append(f"gradient {i} should be ~0, is {float(x.abs().max()):.3g}")
    return problems


@pytest.mark.parametrize("block", range(3))
def test_random_calls_of_views_and_odd_dims(block):
    """One process alternating modules, shapes, layouts, dtypes, params and modes (the signature
    caches see them in turn): each call against the reference."""
    import random

    rnd = random.Random(1900 + block)
    failures = []
    for _ in range(12):
        c = _random_case(rnd)
        problems = _run_case(c)
        if problems:
            failures.append((c, problems))
    assert not failures, failures


def test_random_calls_from_threads(monkeypatch):
    """The same random calls from three threads at once (the runtime's caches are shared; Triton's
    interpreter runs one grid at a time, its program ids are global)."""
    import random
    import threading

    one_grid_at_a_time(monkeypatch)
    failures = []

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(6):
            c = _random_case(rnd)
            try:
                problems = _run_case(c)
            except Exception as e:  # noqa: BLE001 - reported with the case
                problems = [repr(e)]
            if problems:
                failures.append((c, problems))

    threads = [threading.Thread(target=worker, args=(1950 + i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


# ---------------------------------------------------------------------------------------------
# Refused clearly (unchanged; pinned with their messages)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, error, message", [
    (dict(dtypes=(torch.float64,) * 3), TypeError, "bfloat16, float16 or float32, got float64"),
    (dict(dtypes=(torch.float32, torch.float16, torch.float32)), TypeError, "must have one dtype"),
    (dict(heads=(0, 0)), ValueError, "each needs at least one head"),
    (dict(heads=(3, 2)), ValueError, "multiple of the key/value head count"),
    (dict(scale=0), ValueError, "finite positive number"),
    (dict(scale=-0.5), ValueError, "finite positive number"),
    (dict(scale=torch.tensor(0.5, requires_grad=True)), TypeError, "gets no gradient"),
    (dict(n_q=8), ValueError, "n_q = 8 is shorter"),
])
def test_refused_with_a_clear_error(args, error, message):
    m = module("causal")
    Hq, Hkv = args.get("heads", (2, 2))
    dq, dk, dv = args.get("dtypes", (torch.float32,) * 3)
    q, k, v = (torch.randn(1, h, 9, 16).to(d) for h, d in ((Hq, dq), (Hkv, dk), (Hkv, dv)))
    kw = {name: args[name] for name in ("scale", "n_q") if name in args}
    with pytest.raises(error, match=message):
        m.attention(q, k, v, **kw)


@pytest.mark.parametrize("through", ["o", "lse"])
def test_double_backward_raises(through):
    m = module("alibi")
    q, k, v = _qkv([(1, 2, 9, 16)] * 3, grad=True)
    o, lse = m.attention(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad((o if through == "o" else lse).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q, k, v))
