"""Probe 19, review: an adversarial pass over what landed on main in session 19 (0555a88..6240c1f), each
change tried against the callers it did not name and against the others.

Probed clean:
- float [inputs] passed in another float type than declared (a float32 / float64 table declared
  bfloat16, grad = true): output, dq and the table's gradient (in the passed dtype) against
  attncc.reference, over every combination of torch.autocast (CPU bfloat16) x torch.compile (none,
  backend "eager", "aot_eager") x torch.utils.checkpoint (non-reentrant) x saved-tensor hooks that
  copy x table dtype: 48 cases, all within 3e-7 (3.8e-3 under autocast, bfloat16's rounding).
- torch.autocast beside decode (contiguous, Dv = 5), varlen calls and linear attention (casts reach
  their gradients); o and gradients contiguous for a padded value dim in decode, varlen and linear
  attention (the padded-dim change was the softmax forward's and its gradients' only).
- the Hugging Face integration: GPT-OSS (sinks on sliding and full layers, GQA) with sequences packed
  by position_ids in training (logits equal eager's, every gradient within 4e-6) and with
  FlashAttention's cu_seq_lens_q / cu_seq_lens_k, with and without the cache (logits of the sequences
  run apart within 6e-7).
- env_flag / parse_fields / tune's cache glob / keep_in_process / walks' int64 n_heavy / float64
  comparisons / torch-spelling hints: read against their callers; host ops (tests/test_host_ops.py) pass.

Found and fixed:
- ``TRITON_INTERPRET=false`` (or off, no, 2): attncc.runtime.call.interpreting() took any value but ""
  and "0" for on, Triton takes 1 / true / yes / on / y (any case) and nothing else. So attncc took the
  interpreter's ways (CPU tensors accepted, the interpreter's 32x32 configs, bfloat16 operands widened
  to float32, no tuning, no fast launch) while Triton compiled for a GPU: on a machine without one, a
  CPU call failed inside Triton with "0 active drivers ([]). There should only be one." instead of
  attncc's "tensors are on cpu; the kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1";
  on a GPU every call ran the interpreter's small configs. interpreting() now reads the variable as
  Triton does (call.TRITON_ON, one cached lookup per raw value, as cheap as before).
- attncc.distributed.attention under torch.autocast: q, k, v were cast per chunk pair (by bind), so o
  came back in the autocast dtype from a one-chunk layout and in q's (float32) from several, and the
  pairs' backward, outside autocast, recomputed P from float32 q, k against the bfloat16 forward's
  LSE. It now casts q, k, v once on entry as the module's attention does (autocast_operands).
- The torch-spelling hints of spec errors (new this session): ``x.long()`` / ``x.int()`` /
  ``x.to(torch.int64)`` were answered "write x (no cast)", which silently drops torch's truncation of
  a float x toward 0 (``s + (s * 3).long()`` ported so is another score); the hint now gives the
  truncation, ``where(x >= 0, x // 1, -(-x // 1))`` (checked against torch here). ``x.where(cond, y)``
  was answered "write where(...)", whose arguments are (cond, x, y): the hint says so. floor / ceil /
  trunc / log1p / expit had none.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.utils.checkpoint as checkpoint

import attncc
import attncc.distributed as cp
from attncc.runtime.call import TRITON_ON, interpreting
from cases import module, pattern, rel_err


# -- TRITON_INTERPRET as Triton reads it -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "1", "false", "true", "False", "TRUE", "no", "yes", "off", "ON", "y",
                                   "2", "", " 1"])
def test_interpreting_reads_triton_interpret_as_triton_does(value, monkeypatch):
    knobs = pytest.importorskip("triton.knobs")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is (value.lower() in TRITON_ON)
    assert interpreting() is bool(knobs.runtime.interpret)


@pytest.mark.parametrize("value", ["false", "off", "2"])
def test_triton_interpret_off_spelled_otherwise_gets_the_cpu_error(value, monkeypatch):
    """Before: attncc took these for on, Triton for off, and the call failed inside Triton ("0 active
    drivers") on a machine without a GPU."""
    m = module("causal")
    q = torch.randn(1, 2, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    with pytest.raises(ValueError, match="tensors are on cpu; the kernels run on a CUDA GPU, or on the CPU under "
                                         "TRITON_INTERPRET=1"):
        m.attention(q, q, q)


# -- attncc.distributed under torch.autocast ------------------------------------------------------------

@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_distributed_under_autocast_runs_as_the_module(v_dtype):
    """One rank, one chunk (the module's attention) and three chunks (the chunk pairs): o in bfloat16
    either way (it was float32 from the chunk pairs), values and gradients of the bfloat16 casts."""
    m, p = module("causal"), pattern("causal")
    gen = torch.Generator().manual_seed(5)
    n = 26
    q, k, v, do = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(4))
    rl = [t.bfloat16().double().requires_grad_() for t in (q, k, v.to(v_dtype))]
    ref = attncc.reference(p, *rl)
    ref_grads = torch.autograd.grad(ref, rl, do.double())
    for layout in (cp.Layout((0, 26), (0,), 1), cp.Layout((0, 5, 17, 26), (0, 0, 0), 1)):
        leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.to(v_dtype).requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, lse = cp.attention(*leaves, module=m, layout=layout, return_lse=True)
        assert o.dtype == torch.bfloat16, (layout.bounds, o.dtype)
        assert rel_err(o.detach(), ref.detach()) < 1e-2
        grads = torch.autograd.grad(o.float(), leaves, do)
        assert [g.dtype for g in grads] == [torch.float32, torch.float32, v_dtype]
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-2


# -- clean: float inputs of another dtype x autocast x compile x checkpoint x saved-tensor hooks ----------

MIXED = '''[inputs]
tab = { dims = ["h", 9], dtype = "bfloat16", grad = true }
[mask]
where = "j <= i"
[score]
bias = "tab[h, min(i - j, 8)]"
'''


@pytest.mark.parametrize("autocast, compiled, ckpt, hooks, tab_dtype", [
    (True, "aot_eager", True, True, torch.float32),
    (True, None, False, True, torch.float64),
    (False, "aot_eager", False, True, torch.float64),
    (True, "eager", True, False, torch.float32),
])
def test_table_of_another_dtype_through_autocast_compile_checkpoint_hooks(autocast, compiled, ckpt, hooks, tab_dtype):
    m, p = attncc.compile(MIXED), attncc.parse_spec(MIXED)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 13, 8, generator=g) for _ in range(4))
    base = torch.randn(2, 9, generator=g)
    rq, rt = q.double().requires_grad_(), base.bfloat16().double().requires_grad_()
    (attncc.reference(p, rq, k.double(), v.double(), tab=rt) * do.double()).sum().backward()

    tab, leaf = base.to(tab_dtype).requires_grad_(), q.clone().requires_grad_()
    f = lambda qq, t: m.attention(qq, k, v, tab=t)  # noqa: E731
    if compiled:
        f = torch.compile(f, backend=compiled, fullgraph=not ckpt)
    if ckpt:
        inner = f
        f = lambda qq, t: checkpoint.checkpoint(inner, qq, t, use_reentrant=False)  # noqa: E731
    pack = (lambda t: t.clone()) if hooks else (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = f(leaf, tab)
        (o.float() * do).sum().backward()
    tol = 1e-2 if autocast else 1e-5
    assert o.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert tab.grad.dtype == tab_dtype and leaf.grad.dtype == torch.float32
    for got, want in ((o.detach(), None), (leaf.grad, rq.grad), (tab.grad, rt.grad)):
        if want is not None:
            assert rel_err(got, want) < tol


# -- the torch-spelling hints of spec errors say what computes torch's value -------------------------------

@pytest.mark.parametrize("written, hint", [
    ("s + (s * 3).long()", "torch truncates a float x toward 0: where(x >= 0, x // 1, -(-x // 1))"),
    ("s + (s * 3).int()", "torch truncates a float x toward 0"),
    ("s + (s * 3).to(torch.int64)", "torch truncates a float x toward 0"),
    ("s.where(i >= j, -inf)", "write where(cond, x, y) for x.where(cond, y)"),
    ("torch.where(i >= j, s, -inf)", "write where(...) for torch.where(...)"),
    ("s + torch.trunc(s * 3)", "write where(x >= 0, x // 1, -(-x // 1)) for torch.trunc(...)"),
    ("s + torch.floor(s * 3)", "write x // 1 for torch.floor(...)"),
    ("s + (s * 3).ceil()", "write -(-x // 1) for (s * 3).ceil(...)"),
])
def test_torch_spelling_hints(written, hint):
    """``x.long()`` / ``x.int()`` / ``x.to(torch.int64)`` were answered "write x (no cast)", which drops
    torch's truncation of a float x; ``x.where(cond, y)`` "write where(...)", whose arguments are
    (cond, x, y). floor / ceil / trunc had no hint."""
    with pytest.raises(Exception, match=__import__("re").escape(hint)):
        attncc.parse_spec(f'[score]\nmod = "{written}"\n')


@pytest.mark.parametrize("written, torch_fn", [
    ("s + where(s * 3 >= 0, (s * 3) // 1, -(-(s * 3) // 1))", lambda s: s + (s * 3).trunc()),
    ("s + (s * 3) // 1", lambda s: s + (s * 3).floor()),
    ("s + -(-(s * 3) // 1)", lambda s: s + (s * 3).ceil()),
])
def test_the_hinted_spellings_compute_what_torch_does(written, torch_fn):
    text = f'[score]\nmod = "{written}"\n'
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 7, 16, generator=g) for _ in range(3))
    s = (q.double() @ k.double().transpose(-1, -2)) / 4
    want = torch.softmax(torch_fn(s), -1) @ v.double()
    assert (attncc.reference(p, q.double(), k.double(), v.double()) - want).abs().max() < 1e-12
    assert (m.attention(q, k, v).double() - want).abs().max() < 1e-5
