"""Probe 18: distributed attention, linear attention and decoding, found by seeded differential
probes against attncc.reference. Each test is a reduced reproducer of a silent wrong answer (or an
unclear error) that the probe found; they run in one process (one rank holding several chunks runs
the chunk pairs and their merge, the code every rank runs)."""
from __future__ import annotations

import pytest
import torch

import attncc
import attncc.distributed as cp
from cases import build_inline

D = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    head = "head_dim = 16\ndtypes = ['float32']\n"
    return build_inline({
        "p18_xge": head + "[inputs]\nx = { dims = ['b', 'n'], dtype = 'float32' }\n[mask]\nwhere = 'x[b, i] >= x[b, j]'\n",
        "p18_xge16": head + "[inputs]\nx = { dims = ['b', 'n'], dtype = 'float16' }\n[mask]\nwhere = 'x[b, i] >= x[b, j]'\n",
    }, tmp_path_factory.mktemp("p18"), prefix="_attncc_p18")


def _qkv(n, seed=0, heads=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("name, given, step", [("p18_xge", torch.float64, 1e-12), ("p18_xge16", torch.float32, 1e-4)])
def test_chunk_classes_read_inputs_at_their_declared_dtype(built, name, given, step):
    """A float input given wider than declared: the kernels and the reference read it rounded to
    the declared type (1 and 1 + 1e-12 are one float32 value, so x[i] >= x[j] holds), the chunk
    classes read it as given and called the pair (first half, second half) EMPTY: its keys were
    never computed, o off by 1.4 (max abs) with no error."""
    p, m = built[name]
    n = 16
    q, k, v = _qkv(n)
    x = torch.ones(1, n, dtype=given)
    x[0, n // 2:] += step
    lay = cp.Layout((0, n // 2, n), (0, 0), 1)
    classes = cp.chunk_classes(p, lay.bounds, inputs={"x": x})
    assert int(classes[0, 1]) != cp.EMPTY
    o = cp.attention(q, k, v, module=m, pattern=p, layout=lay, x=x)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), x=x)
    assert float((o.double() - ref).abs().max()) < 1e-5
    assert torch.allclose(o, m.attention(q, k, v, x=x), atol=1e-5)


def test_a_misspelt_comm_is_refused_on_one_process_too():
    """comm was checked only where world > 1: comm="rnig" ran on one process (tests, a laptop) and
    raised only on the cluster."""
    from cases import module

    q, k, v = _qkv(8, heads=2)
    for lay in (cp.Layout((0, 8), (0,), 1), cp.Layout((0, 4, 8), (0, 0), 1)):
        with pytest.raises(ValueError, match="comm must be one of allgather, ring, ulysses, auto; got 'rnig'"):
            cp.attention(q, k, v, module=module("causal"), layout=lay, comm="rnig")


def test_an_input_with_the_wrong_dims_names_the_distributed_call():
    """The chunk classes read the inputs before any kernel checks them: a 1-D doc gave
    "input 'doc': expected 2 dims, got shape (8,)" from the tile statistics, naming no caller."""
    from cases import module

    q, k, v = _qkv(8, heads=2)
    with pytest.raises(ValueError, match=r"attncc.distributed: input doc must have 2 dims \(b, n\), got shape \(8,\)"):
        cp.attention(q, k, v, module=module("document"), layout=cp.Layout((0, 4, 8), (0, 0), 1),
                     doc=torch.zeros(8, dtype=torch.int32))
