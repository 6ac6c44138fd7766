"""Probe 26 generator: the serving path as a FlashAttention ``flash_attn_with_kvcache`` / vLLM /
Hugging Face user drives it, every output against attncc.reference (float64) on the equivalent
full attention (unpaged, unpadded: row b is the first kv_len[b] positions, q at the end).

- ``serve``: the shipped softmax specs with decode (sliding window, sink + window, ALiBi and learned
  slopes, softcap, chunked, documents, key padding, T5 tables, RoPE, GQA / MQA ...): contiguous caches
  (also a [B, Nmax, Hkv, D] cache viewed as [B, Hkv, Nmax, D]) and paged ones (page sizes 16, 17, 24,
  31, 32, 48, pages shuffled, a first page shared by every row, spare pages, unused table columns of
  -1 or 10**6, int32 / int64 tables, transposed or strided tables), kv_len of 0, 1, a page boundary,
  the capacity and random (int32 / int64, strided), Nq of 1 to 16 (query rows before position 0 see
  nothing), head dims 4 to 40 and Dv != D, float32 / float16 / bfloat16, scale=.
- ``fuzz``: tests/fuzz_specs.py's random specs and decode calls, with kv_len of 0 and below Nq, odd
  page sizes and forced split counts (ATTNCC_DECODE_SPLITS), which its own decode plans do not draw.
- ``step``: linear attention's ``step`` token by token after a chunked prefix (``attention(...,
  return_state=True)``), [B, H, D] and [B, H, 1, D] forms mixed, against the reference and the
  state of one whole call.

    python tests/probe_decode26.py serve --cases 200 --start 0
    python tests/probe_decode26.py fuzz --cases 400
    python tests/probe_decode26.py step --cases 60 --verbose
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import random
from dataclasses import replace

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
import fuzz_specs as F  # noqa: E402
from attncc._reference import rotary  # noqa: E402
from cases import REL_TOL, SMALL_PARAMS, heads_for, inputs_for, pattern, rel_err, run_seeds, seed_parser, seeds_of  # noqa: E402
from test_decode import decode_module  # noqa: E402

SERVE_SPECS = ("causal", "sliding_window", "alibi", "alibi_learned", "softcap", "gqa", "mqa", "rope_causal", "dense",
               "longformer", "prefix_lm", "document", "padding", "t5_bias", "cross_causal", "dilated", "strided",
               "local_bidirectional", "chunked_local", "sink_window", "neighborhood_2d", "block_diagonal")
PAGE_SIZES = (16, 17, 24, 31, 32, 48)
LSE_TOL = {torch.float32: 1e-3, torch.float16: 6e-2, torch.bfloat16: 6e-2}


@contextlib.contextmanager
def forced_splits(splits):
    """ATTNCC_DECODE_SPLITS for one call (None: the runtime's own count)."""
    saved = os.environ.get("ATTNCC_DECODE_SPLITS")
    try:
        if splits is None:
            os.environ.pop("ATTNCC_DECODE_SPLITS", None)
        else:
            os.environ["ATTNCC_DECODE_SPLITS"] = str(splits)
        yield
    finally:
        if saved is None:
            os.environ.pop("ATTNCC_DECODE_SPLITS", None)
        else:
            os.environ["ATTNCC_DECODE_SPLITS"] = saved


def compare_rows(o, lse, kv_len, Nq, reference, dtype):
    """Problems of decode's o, lse [B, Hq, Nq, .] against ``reference(b, first, n)`` -> (o, lse) of
    row b's query rows first.. (those at positions >= 0) over its n cached keys."""
    problems = []
    for b, n in enumerate(kv_len):
        first = max(0, Nq - n)
        if (o[b, :, :first] != 0).any() or (lse[b, :, :first] != -math.inf).any():
            problems.append(f"row {b}: query rows before position 0 are not o = 0, lse = -inf")
        if first == Nq:
            continue
        ref, ref_lse = reference(b, first, n)
        got, got_lse = o[b:b + 1, :, first:], lse[b:b + 1, :, first:]
        err = rel_err(got, ref)
        if not err < REL_TOL[dtype]:
            problems.append(f"row {b} (kv_len {n}): o off by {err:.3g}")
        finite = torch.isfinite(ref_lse)
        if not torch.equal(torch.isfinite(got_lse), finite) or (got[~finite] != 0).any():
            problems.append(f"row {b}: rows without keys differ")
        elif finite.any():
            diff = (got_lse[finite].double() - ref_lse[finite]).abs()
            if (diff > LSE_TOL[dtype] + 1e-5 * ref_lse[finite].abs()).any():
                problems.append(f"row {b}: lse off by {float(diff.max()):.3g}")
    return problems


def _page_table(r, gen, kv_len, B, per_row, page, share):
    """A block table [B, per_row] over shuffled pages (a few spare ones), unused entries garbage;
    with ``share`` every row's first page is row 0's (a shared prefix). Returns (table, num_pages)."""
    n_pages = B * per_row + r.randint(0, 3)
    order = torch.randperm(n_pages, generator=gen).tolist()
    table = torch.full((B, per_row), r.choice((-1, 10**6)), dtype=r.choice((torch.int32, torch.int64)))
    for b in range(B):
        for p in range(-(-kv_len[b] // page)):
            table[b, p] = order[0] if share and p == 0 else order[b * per_row + p]
    return table, n_pages


def _table_layout(r, table):
    """The table as given: contiguous, column-major, or every other column of a wider tensor."""
    layout = r.choice(("contiguous", "contiguous", "transposed", "strided"))
    if layout == "transposed":
        return table.t().contiguous().t(), layout
    if layout == "strided":
        wide = torch.full((table.shape[0], 2 * table.shape[1]), 7, dtype=table.dtype)
        wide[:, ::2] = table
        return wide[:, ::2], layout
    return table, layout


def serve_case(seed):
    """One call of a shipped spec's decode: (problems, description)."""
    r, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    name = r.choice(SERVE_SPECS)
    p = pattern(name)
    Hq, Hkv = heads_for(p)
    if p.heads_q is None and p.heads_kv is None:
        Hkv = r.choice((1, 2, 3))
        Hq = Hkv * r.choice((1, 2, 3))
    B, Nq = r.randint(1, 3), r.choice((1, 1, 2, 3, 5, 16))
    D = r.choice((4, 8, 12, 16, 20, 32, 40))
    D += D % 2 if p.rope is not None else 0
    Dv = D if r.random() < 0.7 else r.choice((8, 24))
    dtype = r.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))
    page = r.choice(PAGE_SIZES) if r.random() < 0.6 else 0
    capacity = r.randint(1, 100)
    if page:  # whole pages, and now and then unused table columns
        capacity = (-(-capacity // page) + r.choice((0, 0, 1, 3))) * page
    lengths = [0, 1, capacity, max(0, capacity - 1), r.randint(0, capacity)]
    if page:
        lengths += [min(capacity, page), min(capacity, 2 * page)]
    kv_len = [r.choice(lengths) for _ in range(B)]
    share = bool(page) and r.random() < 0.4
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k_raw = torch.randn(B, Hkv, capacity, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, capacity, Dv, generator=gen).to(dtype)
    if share:  # one prefix page for every row: the same keys there
        k_raw[1:, :, :page] = k_raw[:1, :, :page]
        v[1:, :, :page] = v[:1, :, :page]
    kw = dict(SMALL_PARAMS.get(name, {}), **{n: t for n, t in inputs_for(p, B, Hq, capacity, gen).items()
                                            if n != "kv_len"})
    if r.random() < 0.3:
        kw["scale"] = r.choice((0.05, 0.3, 1.0))
    k = k_raw
    if p.rope is not None:  # the cache holds keys rotated at their positions
        k = rotary(k_raw.double(), torch.arange(capacity), p.rope.theta, p.rope.style, p.rope.rotary_dim or D).to(dtype)
    lens = torch.tensor(kv_len, dtype=r.choice((torch.int32, torch.int64)))
    if r.random() < 0.3:
        lens = torch.stack([lens, lens + 1000], 1)[:, 0]
    if r.random() < 0.3:  # q as a [B, Nq, Hq, D] tensor's view
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    desc = dict(name=name, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, D=D, Dv=Dv, dtype=str(dtype)[6:], page=page,
                capacity=capacity, kv_len=kv_len)
    if page:
        table, n_pages = _page_table(r, gen, kv_len, B, capacity // page, page, share)
        kc = torch.full((n_pages, page, Hkv, D), math.nan, dtype=dtype)
        vc = torch.full((n_pages, page, Hkv, Dv), math.nan, dtype=dtype)
        for b in range(B):
            for j in range(kv_len[b]):
                kc[table[b, j // page], j % page] = k[b, :, j]
                vc[table[b, j // page], j % page] = v[b, :, j]
        table, layout = _table_layout(r, table)
        desc.update(share=share, table=f"{str(table.dtype)[6:]} {layout}")
    else:
        kc, vc, table = k.clone(), v.clone(), None
        for b in range(B):  # never read: the cache past kv_len
            kc[b, :, kv_len[b]:] = math.nan
            vc[b, :, kv_len[b]:] = math.nan
        if r.random() < 0.3:  # flash_attn's [B, Nmax, Hkv, D] cache, viewed
            kc, vc = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kc, vc))
            desc.update(layout="bnhd")
    o, lse = decode_module(name).decode(q, kc, vc, kv_len=lens, block_table=table, return_lse=True, **kw)

    def reference(b, first, n):
        inputs = {m: t[b:b + 1] if p.input(m).dims[0] == "b" else t for m, t in kw.items()
                  if isinstance(t, torch.Tensor)}
        if any(d.name == "kv_len" for d in p.inputs):
            inputs["kv_len"] = torch.tensor([n], dtype=torch.int32)
        rest = {m: x for m, x in kw.items() if not isinstance(x, torch.Tensor)}
        return attncc.reference(p, q[b:b + 1, :, first:].double(), k_raw[b:b + 1, :, :n].double(),
                                v[b:b + 1, :, :n].double(), return_lse=True, q_offset=n - Nq + first, **inputs, **rest)

    return compare_rows(o, lse, kv_len, Nq, reference, dtype), desc


def draw_fuzz(seed):
    """A random spec and decode plan of tests/fuzz_specs.py, with this probe's kv_len (0, 1, below
    Nq, a page boundary, the capacity), page size and split count; None when none is drawn."""
    rng = random.Random(seed)
    for _ in range(200):
        _, draft = F.random_spec(rng)
        plan = F.random_call(rng, draft, backward=False)
        if plan.decode is not None:
            break
    else:
        return None
    r = random.Random(seed * 7 + 1)
    page = r.choice((0, 0, 16, 17, 24, 31, 48))
    capacity = -(-plan.Nk // page) * page if page else plan.Nk
    lengths = [0, 1, max(0, plan.Nq - 1), capacity, r.randint(0, capacity), r.randint(0, capacity)]
    lengths += [page, min(capacity, 2 * page)] if page else []
    dp = replace(plan.decode, kv_lens=tuple(min(capacity, r.choice(lengths)) for _ in range(plan.B)),
                 capacity=capacity, page_size=page, table_layout=plan.decode.table_layout if page else "contiguous")
    return draft, replace(plan, decode=dp, Nk=capacity), r.choice((None, 1, 2, 3, 7))


def fuzz_case(seed):
    drawn = draw_fuzz(seed)
    if drawn is None:
        return [], {}
    draft, plan, splits = drawn
    desc = dict(call=plan.describe(), splits=splits, spec=draft.text)
    built = F.build_spec(draft.text)
    if isinstance(built, Exception):
        return [], dict(desc, built=str(built)[:100])
    pattern_, mod = built
    a = F.call_arguments(draft, plan)
    k = a.k
    if pattern_.rope is not None:
        rope = pattern_.rope
        k = rotary(k.double(), torch.arange(plan.Nk), rope.theta, rope.style, rope.rotary_dim or plan.D).to(k.dtype)
    kc, vc, kv_len, table = F._decode_cache(plan, k, a.v)
    extra = {} if plan.scale is None else {"scale": plan.scale}
    with forced_splits(splits), torch.no_grad():
        o, lse = mod.decode(a.q, kc, vc, kv_len=kv_len, block_table=table, return_lse=True, **a.params, **a.inputs,
                            **extra)

    def reference(b, first, n):
        ref, ref_lse = attncc.reference(pattern_, a.q[:, :, first:].double(), a.k[:, :, :n].double(),
                                        a.v[:, :, :n].double(), return_lse=True, q_offset=n - plan.Nq + first,
                                        **a.params, **a.inputs, **extra)
        return ref[b:b + 1], ref_lse[b:b + 1]

    return compare_rows(o, lse, plan.decode.kv_lens, plan.Nq, reference, F._DT[plan.dtype]), desc


def step_case(seed):
    """Linear attention: a chunked prefix, then step() token by token, against the reference; the
    final state against one whole call's."""
    r, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    name = r.choice(("linear_elu", "linear_taylor", "performer"))
    p, mod = pattern(name), importlib.import_module(f"generated.{name}")
    Hkv, B = r.choice((1, 2)), r.randint(1, 2)
    Hq = Hkv * r.choice((1, 2, 3))
    D = r.choice((4, 8, 16) if name == "performer" else (4, 8))
    Dv, N = r.choice((D, 5, 12)), r.randint(2, 40)
    dtype = r.choice((torch.float32, torch.float16, torch.bfloat16))
    q, k = (torch.randn(B, H, N, D, generator=gen).mul(0.5).to(dtype) for H in (Hq, Hkv))
    v = torch.randn(B, Hkv, N, Dv, generator=gen).to(dtype)
    prefix = r.randint(0, N - 1)
    desc = dict(name=name, B=B, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv, N=N, dtype=str(dtype)[6:], prefix=prefix)
    outs, state = [], None
    if prefix:
        o, state = mod.attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], return_state=True)
        outs.append(o)
    for t in range(prefix, N):
        token = (lambda x: x[:, :, t]) if r.random() < 0.5 else (lambda x: x[:, :, t:t + 1])
        o, state = mod.step(token(q), token(k), token(v), state, position=t)
        outs.append(o if o.dim() == 4 else o.unsqueeze(2))
    ref = attncc.reference(p, q.double(), k.double(), v.double())
    _, (S, z) = mod.attention(q, k, v, return_state=True)
    problems = [f"{what} off by {err:.3g}" for what, err, tol in (
        ("o", rel_err(torch.cat(outs, 2), ref), REL_TOL[dtype]),
        ("S", rel_err(state[0], S), 1e-4 if dtype == torch.float32 else 3e-3),
        ("z", rel_err(state[1], z), 1e-4 if dtype == torch.float32 else 3e-3)) if not err < tol]
    return problems, desc


PROBES = {"serve": serve_case, "fuzz": fuzz_case, "step": step_case}


def main(argv=None) -> int:
    ap = seed_parser(50, description=__doc__.split("\n\n")[0])
    ap.add_argument("probe", choices=sorted(PROBES))
    args = ap.parse_args(argv)
    seeds = seeds_of(args)
    return run_seeds(seeds, PROBES[args.probe], verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
