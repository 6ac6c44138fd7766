"""Probe 19 (non-finite rows and int params past 2**31): gradients of learned [inputs] tables when a
row's scores are +inf / NaN, and int params / offsets in [2**31, 2**32) under the interpreter,
against attncc.reference.

Found and fixed:

- With a +inf / NaN score in a row (docs/spec-language.md §1: that row's o and LSE are non-finite),
  the dQ kernel put NaN into the gradients of [inputs] table entries that no weighted pair of the
  call reads, where attncc.reference gives 0 or the finite value: a NaN row has lse2 = NaN, so
  ``p = exp2(s - lse2)`` is NaN even where s = -inf, and ``dS = p * (dP - delta)`` is NaN on lanes
  past the last key (``t[i, j]`` at j >= Nk of a [n, n] table bigger than the call), on pairs the
  mask removes (``t[i, j]`` at j > i under ``j <= i``; ``t[b, j]`` summed over the tile's rows),
  on pairs whose score is -inf (q = inf against a negative k), and per T5 bucket of any of those
  (``rel_bias[h, bucket(j - i)]``: 10 of 32 entries NaN instead of finite). Padding rows past
  Nq did the same where their score was +inf / NaN (a +inf entry of ``t[i, j]`` at i >= Nq).
  Fix (attncc/codegen/backward.py, _input_grad_lines): each term's dS is masked with the pairs'
  weight, ``(s != -inf) & row_live`` (s carries the mask's and the key bound's -inf in MASKED
  tiles), in MASKED tiles and in full tiles of query blocks that are not ``rows_exact`` (a ragged
  last block, or a row with lse2 NaN / -inf or non-finite delta), a uniform branch decided once
  per query block: full tiles of ordinary blocks run as before.
  Measured on seeds 0-199 of the random cases below (a learned table in the bias or the mod, a
  mask, +inf / -inf / NaN rows or a +inf table entry, Nq, Nk in 1..39): 41 failed before, 0 after.
- Under the Triton interpreter, an int param in [2**31, 2**32): Triton types it i64 (on the GPU
  too: Triton 3.6 has no u32 specialization, so ``p0 - i`` and ``i < p0`` are signed int64 there,
  and such a value makes the call WIDE through _int_reach), but the interpreter stores it as
  uint32 numpy data; its ``>>`` converted that data to int32 in place (``j < p0 // 268435456``:
  o all wrong, in every program after the first shift; the forward's heavy-rows dispatch shifted
  it before the WIDE casts), and the sum or difference of two such params wrapped at 2**32
  (``j < p0 + p1 - 4294967300``, ``where(p0 - p1 < 0, ...)``). decode too. Fix (templates/kernel.j2
  wide_casts, decode.py.j2): the WIDE casts make new int64 values (``tl.cast(x, tl.int64) + 0``: a
  no-op on the GPU) and come first in each kernel, before the dispatch. 11 of the tests below
  failed before.

Found here, fixed later (tests/test_probe_group19.py): a float coefficient times an integer
difference times a position, ``(p0 - 1000000000) * 0.01 * j`` with p0 = 1000000003, was compiled as
``0.01 * p0 * j - 10000000.0 * j`` in float32 (the spec keeps the grouping; codegen's score
printing distributed it): o 2.6x off. Any int params, not only past 2**31.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc

F64 = torch.float64


def _table_grads(text, table, *, Nq, Nk, B=1, H=2, D=8, seed=0, inject=None, q_offset=0, k_offset=0):
    """(kernel, reference) gradients of the learned table ``t0`` of ``o.sum() * do``; ``inject(q, k, v, t)``
    edits the inputs in place (non-finite values)."""
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H, Nk, D, generator=g)
    v = torch.randn(B, H, Nk, D, generator=g)
    t = table(g)
    do = torch.randn(B, H, Nq, D, generator=g)
    if inject is not None:
        inject(q, k, v, t)
    out = []
    for fn, cast in ((m.attention, lambda x: x.float()), (lambda *a, **kw: attncc.reference(p, *a, **kw), lambda x: x.double())):
        tt = cast(t).requires_grad_()
        o = fn(cast(q), cast(k), cast(v), t0=tt, q_offset=q_offset, k_offset=k_offset)
        (gt,) = torch.autograd.grad((o * cast(do)).sum(), tt)
        out.append(gt.double())
    return out


def _assert_same_grad(got, want, atol=1e-4):
    nan_got, nan_want = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_got, nan_want), (
        f"NaN at {nan_got.sum().item()} entries where the reference has {nan_want.sum().item()}; "
        f"first differing: {(nan_got != nan_want).nonzero()[:4].tolist()}")
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.equal(got[~fin & ~nan_want], want[~fin & ~nan_want])
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=atol)


def _q_inf(row, head=0, value=math.inf):
    def inject(q, k, v, t):
        q[0, head, row, 0] = value
    return inject


NN = '[inputs]\nt0 = { dims = ["n", "n"], dtype = "float32", grad = true }\n[score]\nbias = "t0[i, j]"\n'
NN_CAUSAL = NN + '[mask]\nwhere = "j <= i"\n'
T5 = '[inputs]\nt0 = { dims = ["h", 32], dtype = "float32", grad = true }\n[score]\nbias = "t0[h, bucket(j - i)]"\n'
BJ_CAUSAL = ('[inputs]\nt0 = { dims = ["b", "n"], dtype = "float32", grad = true }\n[mask]\nwhere = "j <= i"\n'
             '[score]\nbias = "t0[b, j]"\n')
BI = '[inputs]\nt0 = { dims = ["b", "n"], dtype = "float32", grad = true }\n[score]\nbias = "t0[b, i] * (j - i) * 0.1"\n'
SLOPES = ('[inputs]\nt0 = { dims = ["h"], dtype = "float32", grad = true }\n[mask]\nwhere = "causal"\n'
          '[score]\nbias = "t0[h] * (j - i)"\n')
MOD = ('[inputs]\nt0 = { dims = ["n", "n"], dtype = "float32", grad = true }\n[mask]\nwhere = "j <= i"\n'
       '[score]\nmod = "s * (1.0 + 0.1 * t0[i, j])"\n')
SOFTCAP = NN_CAUSAL.replace('[score]\n', '[score]\nsoftcap = 5.0\n')


@pytest.mark.parametrize("text, shape, inject, what", [
    (NN, (24, 24), _q_inf(3), "t[i, j] at j >= Nk and at pairs of score -inf: NaN, reference 0"),
    (NN, (24, 24), _q_inf(3, value=math.nan), "a NaN row: t[3, j >= Nk] NaN, reference 0"),
    (NN_CAUSAL, (24, 24), _q_inf(3), "t[3, j > 3] (masked) NaN, reference 0"),
    (T5, (2, 32), _q_inf(3), "buckets only masked / -inf / padding pairs of row 3 read: NaN, reference finite"),
    (BJ_CAUSAL, (1, 24), _q_inf(3), "t[b, j]: every column of row 3's tile NaN, reference finite"),
    (BI, (1, 24), None, "t[b, i] of a padding row i >= Nq holding +inf"),
    (SLOPES, (2,), _q_inf(3), "slopes: head 0 NaN (as the reference), head 1 finite"),
    (MOD, (24, 24), _q_inf(3), "a table in the mod (ds_t)"),
    (SOFTCAP, (24, 24), _q_inf(3), "softcap"),
])
def test_nan_row_leaves_unread_table_entries_alone(text, shape, inject, what):
    def table(g):
        t = torch.randn(*shape, generator=g)
        if text is BI:
            t[0, 21] = math.inf  # read only by padding rows (Nq = 20)
        return t
    got, want = _table_grads(text, table, Nq=20, Nk=20, inject=inject)
    _assert_same_grad(got, want)


def test_padding_row_plus_inf_entry_of_nn_table():
    """A +inf at t[21, 5] (Nq = 20): only the dQ tile's padding row reads it; its p = exp2(inf - inf)
    was NaN, added to t[21, j] and nowhere the reference reads."""
    def table(g):
        t = torch.randn(24, 24, generator=g)
        t[21, 5] = math.inf
        return t
    got, want = _table_grads(NN, table, Nq=20, Nk=20)
    _assert_same_grad(got, want)
    assert (got[20:] == 0).all() and (got[:, 20:] == 0).all()


def test_full_tiles_skip_the_weight_mask_in_exact_blocks():
    """The weight mask is a uniform branch of the dQ tile (MASKED tiles, or query blocks whose rows
    are not all exact), decided once per query block: full tiles of ordinary blocks do not pay it."""
    from cases import ROOT

    src = (ROOT / "generated" / "t5_bias.py").read_text()
    tile = src[src.index("def _dq_tile("):src.index("def _bwd_dq_kernel(")]
    kernel = src[src.index("def _bwd_dq_kernel("):]
    assert "if MASKED or not rows_exact:" in tile
    assert tile.count("tl.where(weighted") == 1
    assert kernel.count("rows_exact = ") == 1 and kernel.index("rows_exact = ") < kernel.index("for kb in")


# --- seeded random cases: a learned table read by the bias or the mod, a mask, a non-finite row ---

ACCESSES = [  # (dims, access, table shape at (B, H, N))
    (["n", "n"], "t0[i, j]", lambda B, H, N: (N + 5, N + 7)),
    (["h", 32], "t0[h, bucket(j - i)]", lambda B, H, N: (H, 32)),
    (["b", "n"], "t0[b, j]", lambda B, H, N: (B, N + 6)),
    (["b", "n"], "t0[b, i]", lambda B, H, N: (B, N + 6)),
    (["h", 9], "t0[h, min(abs(i - j), 8)]", lambda B, H, N: (H, 9)),
    (["h"], "t0[h]", lambda B, H, N: (H,)),
    ([], "t0", lambda B, H, N: ()),
]
MASKS = [None, "j <= i", "abs(i - j) < 5", "j % 3 != 1 or j <= i"]
USES = ["bias = \"{a} * 0.5\"", "bias = \"{a} * (j - i) * 0.1\"", "mod = \"s + {a} * 0.3\"", "mod = \"s * (1.0 + 0.1 * {a})\""]


def _random_case(seed):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    dims, access, shape = pick(ACCESSES)
    mask = pick(MASKS)
    use = pick(USES).format(a=access)
    text = (f'[inputs]\nt0 = {{ dims = {dims!r}, dtype = "float32", grad = true }}\n'.replace("'", '"')
            + (f'[mask]\nwhere = "{mask}"\n' if mask else "") + f"[score]\n{use}\n"
            + ("softcap = 4.0\n" if torch.rand(1, generator=g) < 0.25 else ""))
    B, H = pick([1, 2]), pick([1, 2])
    Nq, Nk = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    N = max(Nq, Nk) + 4
    rows = [(int(torch.randint(B, (1,), generator=g)), int(torch.randint(H, (1,), generator=g)),
             int(torch.randint(Nq, (1,), generator=g))) for _ in range(int(torch.randint(0, 3, (1,), generator=g)))]
    kind = pick(["inf", "-inf", "nan", "table_inf", "none"])

    def inject(q, k, v, t):
        for b, h, r in rows:
            if kind in ("inf", "-inf", "nan"):
                q[b, h, r, 0] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[kind]
        if kind == "table_inf" and t.numel():
            t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = math.inf
    return text, (lambda gen: torch.randn(shape(B, H, N), generator=gen)), dict(Nq=Nq, Nk=Nk, B=B, H=H, inject=inject,
                                                                              seed=seed)


def check_random_case(seed):
    text, table, kw = _random_case(seed)
    got, want = _table_grads(text, table, **kw)
    try:
        _assert_same_grad(got, want, atol=2e-4)
    except AssertionError as e:
        return f"seed {seed}: {text!r} {dict((k, v) for k, v in kw.items() if k != 'inject')}: {e}"
    return None


# seeds 10, 18, 31, 47, 63, 65, 105 and 185 failed before the fix (41 of seeds 0-199 did; none after);
# 0-3 were clean
@pytest.mark.parametrize("seed", [10, 18, 31, 47, 63, 65, 105, 185, 0, 1, 2, 3])
def test_seeded_table_gradients_with_non_finite_rows(seed):
    assert check_random_case(seed) is None


# --- int params and positions in [2**31, 2**32) ------------------------------------------------

P, P1, OFF = 2**31 + 7, 2**31 + 12, 3 * 2**30
PARAMS = f'[params]\np0 = {P}\np1 = {P1}\n'


def _against_reference(text, nq=37, nk=29, backward=True, B=1, H=2, **kw):
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, 8, generator=g).requires_grad_(backward) for n in (nq, nk, nk))
    o = m.attention(q, k, v, **kw)
    qd, kd, vd = (x.detach().double().requires_grad_(backward) for x in (q, k, v))
    ref = attncc.reference(p, qd, kd, vd, **kw)
    err = float((o.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    assert err < 1e-5, f"o: {err:.3g}"
    if backward:
        do = torch.randn(o.shape, generator=g, dtype=F64)
        o.backward(do.float())
        ref.backward(do)
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            e = float((x.grad.double() - xd.grad).norm() / xd.grad.norm().clamp_min(1e-30))
            assert e < 1e-4, f"{name}: {e:.3g}"


@pytest.mark.parametrize("where, kw", [
    ("j < p0 // 268435456", {}),  # floor division by 2**28, printed as a shift: o all wrong before
    ("j <= p0 >> 28", {}),  # a shift
    ("j < p0 + p1 - 4294967300", {}),  # the sum of two such params wrapped at 2**32 (uint32)
    ("j + p0 - p1 > -3", {}),  # subtraction
    ("i - j < p0 - 2147483650", {}),  # subtraction, then comparison
    ("j + p0 > i + 2147483650", {}),  # comparison
    ("j % 4 != p0 % 4", {}),  # modulo
    ("j < (p0 // 100000000) % 13 + 3", {}),  # floor division and modulo by other divisors
    ("j <= i or j < p0 // 268435456", {}),  # a union with a band: its walks' bounds
    ("i - p0 < j", {"q_offset": OFF + 4, "k_offset": OFF}),  # positions in the same range
    ("j // 4 <= i // 4 and j < p1 - p0 + OFF + 8", {"q_offset": OFF, "k_offset": OFF + 4}),
])
def test_int_params_between_2_31_and_2_32_in_masks(where, kw):
    _against_reference(PARAMS + f'[mask]\nwhere = "{where.replace("OFF", str(OFF))}"\n', **kw)


@pytest.mark.parametrize("bias", [
    "where(p0 - p1 < 0, 1.0, 0.0) * j * 0.1",  # the difference of two params wrapped (uint32): bias lost
    "where(j < p0 // 268435456, 1.0, 0.0)",  # a shift in a score: 30% off before
    "((p0 - i) % 7) * 0.1",
    "(p0 // 268435456 - j) * 0.1",
    "where(i < p0 - 2147483640, 0.5, 0.0) + where(j < p0 + p1 - 4294967300, 0.25, 0.0)",
])
def test_int_params_between_2_31_and_2_32_in_scores(bias):
    _against_reference(PARAMS + f'[score]\nbias = "{bias}"\n')


def test_int_param_call_override_between_2_31_and_2_32():
    """A spec default of 5, a call's value past 2**31 (WIDE from the call's numbers)."""
    _against_reference('[params]\np0 = 5\n[mask]\nwhere = "j < p0 // 268435456"\n', p0=P + 10)


@pytest.mark.parametrize("text, kw", [
    (PARAMS + '[mask]\nwhere = "j < p0 // 268435456"\n', {}),
    (PARAMS + '[mask]\nwhere = "j < p0 + p1 - 4294967290"\n', {}),
    ('[params]\np0 = 5\n[mask]\nwhere = "j < p0 // 2"\n', {"p0": P + 10}),
])
def test_decode_int_params_between_2_31_and_2_32(text, kw):
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(0)
    n = 20
    q = torch.randn(2, 2, 1, 8, generator=g)
    k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(2))
    lengths = torch.tensor([n, n - 7], dtype=torch.int32)
    o = m.decode(q, k, v, kv_len=lengths, **kw)
    for b, length in enumerate(lengths.tolist()):
        ref = attncc.reference(p, *(x[b:b + 1, :, :length if x is not q else 1].double() for x in (q, k, v)),
                               q_offset=length - 1, **kw)
        torch.testing.assert_close(o[b:b + 1].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["(p0 - 1000000000) * 0.01 * j", "(p0 - 1000000000) * (j - i) * 0.1"])
def test_float_times_int_difference_times_position_keeps_its_grouping(bias):
    """The spec keeps ``j*(0.01*(p0 - 1000000000))`` (p0 = 1000000003, int32 range) but the kernels
    computed ``0.01 * p0 * j - 10000000.0 * j`` in float32: o 2.6x off (1.34x for the distance form),
    where docs §3 says the integer terms meet a float only once added up. Fixed by probe19-group
    (analysis.integer.integer_operands; tests/test_probe_group19.py)."""
    _against_reference(f'[params]\np0 = 1000000003\n[score]\nbias = "{bias}"\n', backward=False)
