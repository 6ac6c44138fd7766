"""Probe 18 of the Gluon sm90 path (tests/probe_gluon18.py: seeded random specs through the generated
modules with ATTNCC_BACKEND=gluon, the kernels emulated on the CPU, against attncc.reference): what
it found, each as a small seeded regression.

- A spec with RoPE whose Gluon walk reads block lists (a mask with no closed form, or one reading
  [inputs]) handed the Gluon kernel the lists but not the rotated q and k: its forward attended
  with unrotated q and k (templates/softmax.py.j2, ``_forward``'s Gluon branch).
- The emulation (tests/gluon_host.py) ran the fragments' @gluon.jit helpers only where it had a host
  version of them: a score with ``(i - j) % 5`` (``_mod_sum``, ``_mod_wraps``) raised instead of
  running; it now runs every helper as written, with Triton's integer ``//`` and ``%`` (truncating:
  a ``%`` printed on an operand that may be negative gives what the GPU gives).
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from attncc.codegen import render_gluon  # noqa: E402
from attncc.runtime import backend  # noqa: E402
from attncc.runtime.gluon import launch  # noqa: E402
from attncc.spec import parse_spec  # noqa: E402
from gluon_host import Fragments, as_python, emulate_forward, emulated_forwards, load_fragments  # noqa: E402



@pytest.fixture
def emulated(monkeypatch):
    """ATTNCC_BACKEND=gluon on the CPU, the forward kernels emulated at small tiles."""
    stubs = emulated_forwards(monkeypatch)
    monkeypatch.setattr(backend, "gluon_config", lambda D: launch.GluonConfig("pipelined", block_m=32, block_n=16,
                                                                               stages=2))
    return stubs


ROPE_LISTS = {  # RoPE beside a walk over block lists: exact ones (a stride), data-dependent ones ([inputs])
    "strided": '[mask]\nwhere = "j <= i and ((i - j) < 5 or j % 7 == 6)"\n',
    "document": '[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "doc[b, i] == doc[b, j]"\n',
}


@pytest.mark.parametrize("name", sorted(ROPE_LISTS))
def test_rope_with_a_block_list_walk_reads_the_rotated_q_and_k(emulated, tmp_path, monkeypatch, name):
    """Probe 18 seed 17 (fp16, D = 64, a document-like mask over an int64 input, RoPE): the Gluon
    kernel read the call's q and k, not their rotated copies; o was 47% off."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    text = f'name = "rope_{name}"\nhead_dim = 64\ndtypes = ["float16"]\n[rope]\ntheta = 500.0\n' + ROPE_LISTS[name]
    pat, mod = parse_spec(text), attncc.compile(text)
    assert mod.SPEC.gluon == "rendered" and mod.SPEC.gluon_fragments.load().LISTS
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 45, 64, generator=gen).to(torch.float16)
    k, v = (torch.randn(2, 1, 43, 64, generator=gen).to(torch.float16) for _ in range(2))
    inputs = {"doc": (torch.arange(80).view(1, -1) // 9 + torch.tensor([[0], [1]])).to(torch.int32)} \
        if name == "document" else {}
    o, lse = mod.attention(q, k, v, q_offset=29, k_offset=31, return_lse=True, **inputs)
    (r,) = emulated["pipelined"].results
    out, out_lse, q_seen, k_seen = r.out, r.lse, r.q, r.k
    call = attncc.runtime.bind(mod.SPEC, q, k, v, q_offset=29, k_offset=31, kwargs=dict(inputs))
    q_rot, k_rot = mod._rotated(call, q.contiguous(), k.contiguous())
    assert torch.equal(q_seen, q_rot) and torch.equal(k_seen, k_rot)
    # exactly the unrotated pattern's on the rotated copies, and the rotated pattern's within fp16
    plain = dataclasses.replace(pat, rope=None)
    ref, ref_lse = attncc.reference(plain, q_rot.double(), k_rot.double(), v.double(), return_lse=True, q_offset=29,
                                    k_offset=31, **inputs)
    assert float((out - ref).abs().max()) < 1e-9
    ref, ref_lse = attncc.reference(pat, q.double(), k.double(), v.double(), return_lse=True, q_offset=29,
                                    k_offset=31, **inputs)
    assert float((o.double() - ref).abs().max()) < 2e-2
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and float((lse[seen] - ref_lse[seen]).abs().max()) < 2e-2


@gluon.jit
def _int_ops(a, b):
    return a // b, a % b


def test_the_emulation_has_tritons_integer_division():
    """Runtime integers (tensors) divide as Triton's do, truncating; constexprs (Python ints) and
    floats as Python's."""
    ops = as_python(_int_ops)
    assert [int(x) for x in ops(torch.tensor(-7), torch.tensor(3))] == [-2, -1]
    assert [int(x) for x in ops(torch.tensor(7), -3)] == [-2, 1]
    assert ops(-7, 3) == (-3, 2)
    assert [float(x) for x in ops(torch.tensor(-7.0), 2.0)] == [-4.0, 1.0]


@pytest.mark.parametrize("bias", ["0.25 * ((i - j) % 5)", "0.5 * ((j - i) // 3 % 4)", "0.1 * (max(i, j) % 7)"])
def test_helpers_the_emulation_has_no_host_version_of_run_as_written(tmp_path, bias):
    """Probe 18 seed 20 (a bias reading ``doc_i[h, (i - j) % 5]``): the score's ``_mod_sum`` and
    ``_mod_wraps`` were left as @gluon.jit functions and raised on the host."""
    pat = parse_spec(f'name = "helpers"\n[score]\nbias = "{bias}"\n[mask]\nwhere = "j <= i + 3"\n')
    frag = Fragments(load_fragments(render_gluon(pat), tmp_path, "helpers"))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 37, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 53, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    for q_offset, k_offset in ((0, 0), (5, 19), (30, 0)):
        o, lse = emulate_forward(frag, q, k, v, scale=0.3, q_offset=q_offset, k_offset=k_offset, block_m=16, block_n=16)
        ref, ref_lse = attncc.reference(pat, q, k, v, return_lse=True, scale=0.3, q_offset=q_offset, k_offset=k_offset)
        assert float((o - ref).abs().max()) < 1e-5
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), seen)


@pytest.fixture
def emulated_backward(monkeypatch):
    """The Gluon backward's kernels emulated (tests/gluon_emulation.py), CPU tensors let through."""
    from gluon_emulation import EmulatedKernel

    from attncc.runtime.gluon import bwd, bwd_fused

    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused):
        monkeypatch.setattr(kernel, "run", EmulatedKernel(kernel))


def _backward_against_reference(pat, q, k, v, do, method, config, frag=None, **pos):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, lse = attncc.reference(pat, *leaves, return_lse=True, **pos)
    want = torch.autograd.grad([o], leaves, [do.double()])
    if frag is None:
        fragments = dict(pattern="dense")
    else:
        call = types.SimpleNamespace(params={}, Nq=q.shape[2], Nk=k.shape[2], **pos)
        fragments = dict(walk=frag.walk, qwalk=frag.qwalk, mask=frag.mask, qmask=frag.qmask, score=frag.score,
                         score_grad=frag.score_grad, segments=frag.SEGMENTS, qsegments=frag.QSEGMENTS,
                         pattern_args=frag.pattern_args(call))
    got = launch.attention_backward(q, k, v, o.detach().to(q.dtype), lse.detach().float(), do, None, **pos,
                                    config=config, method=method, **fragments)
    for g, w in zip(got, want):
        assert not torch.isnan(g).any()
        if w.norm() < 1e-9:  # (max(s, j**2): the scores do not depend on q, k at all)
            assert float(g.abs().max()) < 1e-4
        else:
            assert float((g.double() - w).norm() / w.norm()) < 5e-3


BWD_SMALL = launch.GluonBwdConfig(kv_block_n=128, kv_block_m=64, kv_stages=2, q_block_m=128, q_block_n=64, q_stages=2)


@pytest.mark.parametrize("method", ["split", "fused"])
@pytest.mark.parametrize("score", ['bias = "0.5 * j"', 'mod = "max(s, j ** 2)"'])
def test_fused_dq_ignores_the_keys_past_nk(emulated_backward, tmp_path, method, score):
    """Probe 18 (fragments seed 471: ``mod = "max(s, (j) ** 2)"``, fp16, fused): the fused kernel's
    dQ = dS K read dS^T's rows past Nk, where P^T of a zero K row's score overflows when the score
    grows with the key (here by 50 and 10**4 over 128 keys): inf * 0, NaN in dQ. Split never read them."""
    pat = parse_spec(f'name = "keys_past"\n[score]\n{score}\n')
    frag = load_fragments(render_gluon(pat), tmp_path, "keys_past")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 18, 64, generator=gen).to(torch.float16)
    k, v = (torch.randn(2, 1, 77, 64, generator=gen).to(torch.float16) for _ in range(2))
    do = torch.randn(q.shape, generator=gen).to(torch.float16)
    _backward_against_reference(pat, q, k, v, do, method, BWD_SMALL, frag, q_offset=47, k_offset=23, n_q=65, n_k=100)


@pytest.mark.parametrize("method", ["split", "fused"])
def test_fused_dq_of_rows_far_below_zero(emulated_backward, method):
    """The built-in dense walk, a query row whose every score is about -30 (its LSE too): P^T of the
    zero K rows past Nk is e^30, dS^T past fp16's range; the fused dQ was NaN."""
    pat = parse_spec('name = "dense"\n')
    gen = torch.Generator().manual_seed(3)
    k = 0.1 * torch.randn(1, 1, 77, 64, generator=gen)
    k[..., 0] += 4.0  # every key along one direction, every query against it: q . k = -240 +- 6
    q = torch.zeros(1, 1, 20, 64)
    q[..., 0] = -60.0
    q, k = (q + 0.01 * torch.randn(q.shape, generator=gen)).to(torch.float16), k.to(torch.float16)
    v = torch.randn(1, 1, 77, 64, generator=gen).to(torch.float16)
    do = torch.randn(q.shape, generator=gen).to(torch.float16)
    lse = attncc.reference(pat, q.double(), k.double(), v.double(), return_lse=True)[1]
    assert float(lse.max()) < -20
    _backward_against_reference(pat, q, k, v, do, method, BWD_SMALL)
