"""Generated ``decode`` (KV cache, contiguous and paged, split-KV) against attncc.reference.

Row b of a decode call is the last Nq query rows of a sequence of length kv_len[b]: the
reference runs on the cache's first kv_len[b] keys with q_offset = kv_len[b] - Nq. The cache
beyond kv_len (and, for windows, before the window) is NaN, so reading it would show.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import jinja2
import pytest
import torch

import attncc
from attncc._reference import rotary
from cases import REL_TOL, SMALL_PARAMS, heads_for, inputs_for, pattern, rel_err

_BUILT = {}


@functools.lru_cache(maxsize=None)
def _build_dir():
    return tempfile.mkdtemp(prefix="attncc_decode_")


def decode_module(name):
    """generated.<name> when it has decode (templates/softmax.py.j2 includes decode.py.j2),
    else the module rendered now with the include added."""
    if name in _BUILT:
        return _BUILT[name]
    mod = importlib.import_module(f"generated.{name}")
    if not hasattr(mod, "decode"):
        import attncc.codegen as cg

        shared = cg._environment()  # one per process: an overlay takes the changed template in front
        src = (cg.TEMPLATES / "softmax.py.j2").read_text()
        if 'include "decode.py.j2"' not in src:
            src += '{% include "decode.py.j2" %}\n'
        env = shared.overlay(loader=jinja2.ChoiceLoader([jinja2.DictLoader({"softmax.py.j2": src}), shared.loader]))
        original = cg._environment
        cg._environment = lambda: env
        try:
            text = cg.render(pattern(name))
        finally:
            cg._environment = original
        path = Path(_build_dir()) / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(f"_decode_build_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    _BUILT[name] = mod
    return mod


def make_cache(k, v, kv_len, page_size, gen, *, spare=3):
    """The logical cache k/v [B, Hkv, Nmax, D] as pages [P, page_size, Hkv, D] in a random
    order, with spare pages; block-table entries past each row's pages are garbage."""
    B, Hkv, Nmax, D = k.shape
    per_row = -(-Nmax // page_size)
    n_pages = B * per_row + spare
    order = torch.randperm(n_pages, generator=gen)
    table = torch.full((B, per_row), 10**6, dtype=torch.int32)
    kp = torch.full((n_pages, page_size, Hkv, D), math.nan, dtype=k.dtype)
    vp = torch.full((n_pages, page_size, Hkv, v.shape[-1]), math.nan, dtype=v.dtype)
    for b in range(B):
        for p in range(-(-int(kv_len[b]) // page_size)):
            page = int(order[b * per_row + p])
            table[b, p] = page
            rows = slice(p * page_size, min((p + 1) * page_size, Nmax))
            n = rows.stop - rows.start
            kp[page, :n] = k[b, :, rows].transpose(0, 1)
            vp[page, :n] = v[b, :, rows].transpose(0, 1)
    return kp, vp, table


def run_decode(name, *, Nq=1, paged=False, heads=None, B=3, Nmax=70, D=32, dtype=torch.float32, kv_len=None,
               page_size=16, seed=0, nan_before=None, params=None):
    p = pattern(name)
    Hq, Hkv = heads or heads_for(p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k_raw = torch.randn(B, Hkv, Nmax, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nmax, D, generator=gen).to(dtype)
    if kv_len is None:  # a full row, an empty row, one shorter than Nq, random others
        kv_len = [Nmax, 0, max(1, Nq - 2)] + torch.randint(1, Nmax + 1, (max(B - 3, 0),), generator=gen).tolist()
        kv_len = kv_len[:B]
    kv_len = torch.tensor(kv_len, dtype=torch.int32)
    capacity = -(-Nmax // page_size) * page_size if paged else Nmax  # inputs along positions cover it
    kw = dict(SMALL_PARAMS.get(name, {}), **(params or {}),
              **{n: t for n, t in inputs_for(p, B, Hq, capacity, gen).items() if n != "kv_len"})
    k = k_raw
    if p.rope is not None:  # the cache holds keys rotated at their positions
        rd = p.rope.rotary_dim or D
        k = rotary(k_raw.double(), torch.arange(Nmax), p.rope.theta, p.rope.style, rd).to(dtype)
    k, v_c = k.clone(), v.clone()
    for b in range(B):  # never read: the cache past kv_len, and what a window leaves behind
        k[b, :, int(kv_len[b]):] = math.nan
        v_c[b, :, int(kv_len[b]):] = math.nan
        if nan_before is not None:
            stop = nan_before(int(kv_len[b]), Nq)
            k[b, :, :stop] = math.nan
            v_c[b, :, :stop] = math.nan
    if paged:
        kc, vc, table = make_cache(k, v_c, kv_len, page_size, gen)
        o, lse = decode_module(name).decode(q, kc, vc, kv_len=kv_len, block_table=table, return_lse=True, **kw)
    else:
        o, lse = decode_module(name).decode(q, k, v_c, kv_len=kv_len, return_lse=True, **kw)
    assert o.shape == (B, Hq, Nq, D) and o.dtype == dtype and lse.shape == (B, Hq, Nq) and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    for b in range(B):
        L = int(kv_len[b])
        first = max(0, Nq - L)  # query rows at negative positions see nothing
        assert (o[b, :, :first] == 0).all() and (lse[b, :, :first] == -math.inf).all()
        if first == Nq:
            continue
        inputs = {n: t[b:b + 1] if p.input(n).dims[0] == "b" else t for n, t in kw.items()
                  if isinstance(t, torch.Tensor)}
        if any(d.name == "kv_len" for d in p.inputs):
            inputs["kv_len"] = kv_len[b:b + 1]
        params = {n: x for n, x in kw.items() if not isinstance(x, torch.Tensor)}
        ref, ref_lse = attncc.reference(p, q[b:b + 1, :, first:].double(), k_raw[b:b + 1, :, :L].double(),
                                        v[b:b + 1, :, :L].double(), return_lse=True, q_offset=L - Nq + first,
                                        **inputs, **params)
        got, got_lse = o[b:b + 1, :, first:], lse[b:b + 1, :, first:]
        assert rel_err(got, ref) < REL_TOL[dtype], (b, rel_err(got, ref))
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(got_lse), finite)
        assert torch.allclose(got_lse[finite].double(), ref_lse[finite], atol=1e-3 if dtype == torch.float32 else 5e-2)
        assert (got[~finite] == 0).all()
    return o, lse


SPECS = ["causal", "sliding_window", "alibi", "softcap", "gqa", "mqa", "rope_causal", "dense"]


# (Nq, paged) of every spec: two of the four by default, in turn over the specs (each on four specs),
# all four with -m slow
DECODE_CALLS = [(1, False), (4, False), (1, True), (4, True)]
DECODE_CASES = [pytest.param(name, Nq, paged, id=f"{name}-{Nq}-{'paged' if paged else 'contiguous'}",
                             marks=() if (c - n) % 4 in (0, 1) else pytest.mark.slow)
                for n, name in enumerate(SPECS) for c, (Nq, paged) in enumerate(DECODE_CALLS)]


@pytest.mark.parametrize("name, Nq, paged", DECODE_CASES)
def test_decode_matches_reference(name, Nq, paged):
    run_decode(name, Nq=Nq, paged=paged, seed=Nq + 2 * paged)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (3, 3), (32, 1)], ids=["gqa", "mqa", "mha", "mqa32"])
def test_decode_head_groups(heads):
    # (32, 1) with Nq = 4: 128 rows per group, more than one program's tile: the group is cut
    run_decode("causal", Nq=4, heads=heads, paged=True, B=2, kv_len=[70, 37], seed=5)


@pytest.mark.parametrize("name", ["longformer", "prefix_lm", "document", "padding", "t5_bias", "cross_causal",
                                  "dilated", "strided", "local_bidirectional", "chunked_local", "sink_window",
                                  "neighborhood_2d", "block_diagonal"])
def test_decode_other_specs(name):
    run_decode(name, Nq=4, paged=name in ("document", "longformer", "sink_window"), seed=11)


@pytest.mark.parametrize("name, params", [("chunked_local", {"chunk": -8}), ("block_diagonal", {"chunk": -5}),
                                          ("chunked_local", {"chunk": 1})])
def test_params_that_break_the_closed_forms_monotonicity(name, params):
    """Chunks of a negative size (``i // -8 == j // -8``) make the closed form's bounds decrease with
    the row: decode then visits every block below kv_len, masked (``CLOSED`` false), as the forward
    takes its exact lists. It walked the closed form regardless and skipped allowed pairs (error 1.3)."""
    run_decode(name, Nq=4, paged=True, seed=12, params=params)
    run_decode(name, Nq=1, seed=13, params=params)


@pytest.mark.parametrize("splits", ["1", "3", "9"])
def test_split_counts(splits, monkeypatch):
    """One split (the kernel writes o itself), several, and more splits than key blocks."""
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", splits)
    run_decode("alibi", Nq=4, paged=True, seed=3)
    run_decode("sliding_window", Nq=1, seed=4)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_window_reads_only_its_pages(paged):
    """Everything before the window's first key block is NaN: skipped blocks are never read."""
    window = SMALL_PARAMS["sliding_window"]["window"]
    block = 16  # the interpreter's key tile, and the page size

    def nan_before(L, Nq):
        return (max(0, L - Nq - window + 1) // block) * block

    run_decode("sliding_window", Nq=4, paged=paged, B=4, Nmax=100, kv_len=[100, 77, 50, 31], page_size=block,
               nan_before=nan_before, seed=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    run_decode("causal", Nq=4, paged=True, dtype=dtype, seed=9)


def test_page_size_not_a_multiple_of_the_tile():
    run_decode("rope_causal", Nq=4, paged=True, page_size=24, seed=10)


def test_without_lse_and_int64_kv_len_and_list():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    mod = decode_module("causal")
    a = mod.decode(q, k, v, kv_len=torch.tensor([40, 17]))
    b = mod.decode(q, k, v, kv_len=[40, 17])
    full = mod.attention(q[1:], k[1:, :, :17], v[1:, :, :17], q_offset=16)
    assert torch.equal(a, b) and rel_err(a[1:], full) < 1e-5


def test_decode_is_attention_of_the_last_rows():
    """decode(q_last, cache) == attention(q_all, cache)[last rows] for a spec with params."""
    gen = torch.Generator().manual_seed(1)
    N, Nq = 45, 3
    q = torch.randn(1, 4, N, 32, generator=gen)
    k, v = torch.randn(1, 2, N, 32, generator=gen), torch.randn(1, 2, N, 32, generator=gen)
    mod = decode_module("sliding_window")
    full = mod.attention(q, k, v, window=7)
    last = mod.decode(q[:, :, -Nq:], k, v, kv_len=torch.tensor([N], dtype=torch.int32), window=7)
    assert rel_err(last, full[:, :, -Nq:]) < 1e-5


def _args(B=2, Hq=4, Hkv=2, Nq=1, Nmax=32, D=16):
    return (torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nmax, D), torch.randn(B, Hkv, Nmax, D))


def _paged(B=2, pages=3, page=16, Hkv=2, D=16):
    kc, vc = torch.randn(B * pages, page, Hkv, D), torch.randn(B * pages, page, Hkv, D)
    return kc, vc, torch.arange(B * pages, dtype=torch.int32).view(B, pages)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, q, k, v: m.decode(q.expand(2, 4, 17, 16), k, v, kv_len=[1, 1]), ValueError, "1 to 16 query rows"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=[40, 1]), ValueError, r"kv_len must be in 0\.\.32"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=[-1, 1]), ValueError, r"kv_len must be in 0\.\.32"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=torch.tensor([1, 2, 3])), ValueError, r"kv_len must have shape \[B\]"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=torch.tensor([1.0, 2.0])), TypeError, "kv_len must be int32 or int64"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=None), TypeError, "kv_len must be a tensor"),
    (lambda m, q, k, v: m.decode(q, k[:, :, :8], v, kv_len=[1, 1]), ValueError, "must agree on heads and length"),
    (lambda m, q, k, v: m.decode(q, k[:1], v[:1], kv_len=[1, 1]), ValueError, "batch sizes differ"),
    (lambda m, q, k, v: m.decode(q[:, :3], k, v, kv_len=[1, 1]), ValueError, "multiple of the key/value head count"),
    (lambda m, q, k, v: m.decode(q, k[..., :8], v, kv_len=[1, 1]), ValueError, "head dims differ"),
    (lambda m, q, k, v: m.decode(q, k.half(), v, kv_len=[1, 1]), TypeError, "one dtype"),
    (lambda m, q, k, v: m.decode(q[0], k, v, kv_len=[1, 1]), ValueError, r"q must have 4 dims \[B, Hq, Nq, D\]"),
    (lambda m, q, k, v: m.decode(q, k, v, kv_len=[1, 1], windw=3), TypeError, "unexpected keyword"),
])
def test_bad_calls(call, error, message):
    with pytest.raises(error, match=message):
        call(decode_module("sliding_window"), *_args())


@pytest.mark.parametrize("mutate, error, message", [
    (lambda kc, vc, t: (kc, vc, t.float()), TypeError, "block_table must be int32 or int64, got float32"),
    (lambda kc, vc, t: (kc, vc, t[:1]), ValueError, r"block_table must have shape \[B, pages\]"),
    (lambda kc, vc, t: (kc, vc, t.tolist()), TypeError, "block_table must be a torch.Tensor"),
    (lambda kc, vc, t: (kc[:, :8], vc[:, :8], t), ValueError, "page size .* must be >= 16"),
    (lambda kc, vc, t: (kc, vc[:-1], t), ValueError, "must agree on"),
    (lambda kc, vc, t: (kc, vc, t + 100), ValueError, "page numbers outside"),
])
def test_bad_page_tables(mutate, error, message):
    kc, vc, table = mutate(*_paged())
    q = torch.randn(2, 4, 1, 16)
    with pytest.raises(error, match=message):
        decode_module("causal").decode(q, kc, vc, kv_len=[30, 5], block_table=table)


def test_missing_input_and_short_input():
    q, k, v = _args()
    with pytest.raises(ValueError, match="missing input 'doc'"):
        decode_module("document").decode(q, k, v, kv_len=[3, 3])
    with pytest.raises(ValueError, match=r"must cover the cache's positions 0\.\.31"):
        decode_module("document").decode(q, k, v, kv_len=[3, 3], doc=torch.zeros(2, 20, dtype=torch.int32))


def test_no_gradient():
    q, k, v = _args()
    with pytest.raises(NotImplementedError, match="no backward"):
        decode_module("causal").decode(q.requires_grad_(), k, v, kv_len=[3, 3])
    with torch.no_grad():
        decode_module("causal").decode(q, k, v, kv_len=[3, 3])


def test_random_blocks_have_no_decode():
    with pytest.raises(NotImplementedError, match="random_blocks"):
        decode_module("bigbird").decode(*_args(), kv_len=[3, 3])
