"""Pure-Python definitions of the built-ins' numbers, shared by every stage.

The generated modules, the analysis and the reference all take these values from
here, so the three can never disagree on what ``bucket``, ``alibi`` or
``random_blocks`` mean. The check of a param's value (:func:`param_value`) lives here too, for
the calls of the generated modules and ``attncc explain --param`` alike. Nothing here imports
torch, sympy or Triton.
"""
from __future__ import annotations

import functools
import math
import numbers
import random
import sys
from typing import Optional, Tuple, Union


# The largest head dim (D, and Dv) the kernels take: specs' head_dim / value_dim and calls share it.
MAX_HEAD_DIM = 256
MAX_SPEC_BYTES = 2**20  # a spec file: read at most this much (/dev/zero, a huge file: a SpecError, not all memory)
MAX_TOML_NESTING = 16  # tables and arrays nested in a spec (it needs 3: a table of inline tables of lists)

# Positions and int params stay below this, so that the kernels' int64 arithmetic on them (sums,
# small multiples) is exact; int params start at -2**31 (a call's check, and explain's --param).
INT_LIMIT = 2**62
INT_PARAM_MIN = -(2**31)

# float32's largest and smallest normal numbers. The kernels compute with float params, scales,
# softcaps and RoPE's theta in float32: a value past them would be inf or 0 there.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


# Keywords of FlexAttention's flex_attention, torch's scaled_dot_product_attention and
# FlashAttention that a port passes out of habit, each with what says the same here: a call that
# gets one (and has no param or input of that name) says it beside "unexpected keyword".
FOREIGN_KEYWORDS = {
    "enable_gqa": "no flag needed: k, v with fewer heads than q (Hq a multiple of Hkv) are GQA",
    "block_mask": "the mask is the spec's [mask].where; there is no block mask to create",
    "mask_mod": "the mask is the spec's [mask].where",
    "score_mod": "the score transform is the spec's [score].mod (or [score].bias)",
    "kernel_options": "tile configs come from `attncc tune`, not from the call",
    "return_aux": "pass return_lse=True for the log-sum-exp",
    "attn_mask": "the mask is the spec's [mask].where (a mask tensor becomes an [inputs] entry read there)",
    "is_causal": "causal attention is the spec's [mask] where = \"causal\"",
    "causal": "causal attention is the spec's [mask] where = \"causal\"",
    "softmax_scale": "the softmax scale is scale=",
    "window_size": "a window is the spec's [mask].where (\"j <= i and i - j < window\" with a param window)",
    "dropout_p": "dropout is the spec's [score].dropout, which attention() applies; decode() runs without it",
    # FlashAttention's flash_attn_varlen_func / flash_attn_with_kvcache and its other options
    "cu_seqlens": "packed sequences take cu_seqlens_q= and cu_seqlens_k= (both)",
    "max_seqlen": "packed sequences take max_seqlen_q= and max_seqlen_k=, beside cu_seqlens_q= and cu_seqlens_k=",
    "block_table": "a paged KV cache is read by decode(q, k_pages, v_pages, kv_len=..., block_table=...)",
    "cache_seqlens": "a KV cache is read by decode(q, k_cache, v_cache, kv_len=...), its lengths are kv_len=",
    "seqused_k": "a KV cache is read by decode(q, k_cache, v_cache, kv_len=...), its lengths are kv_len=",
    "softcap": "a logit softcap is the spec's [score].softcap",
    "alibi_slopes": "ALiBi is the spec's [score].bias = \"alibi\" (learned slopes: an [inputs] table read in the bias)",
    "sm_scale": "the softmax scale is scale=",
    "return_attn_probs": "pass return_lse=True for the log-sum-exp (the probabilities are never formed)",
}


def foreign_keyword_hints(names) -> str:
    """What says the same as each of ``names`` that is another library's keyword, as the tail of an
    "unexpected keyword" error (`` (name: what to write; ...)``), or ''."""
    hints = "; ".join(f"{n}: {FOREIGN_KEYWORDS[n]}" for n in sorted(names) if n in FOREIGN_KEYWORDS)
    return f" ({hints})" if hints else ""


def plain_number(value, what: str = "a number"):
    """``value`` as a Python number when it is one in another dress, as a call's scalar arguments
    (params, ``scale=``, offsets) may come from configs and tensors: a numpy scalar, or a
    one-element tensor (its ``item()``: a host sync for a GPU tensor). Anything else comes back as
    it is, and a boolean of any kind stays a boolean (``torch.tensor(True)`` becomes ``True``), for
    the caller to refuse with its own message. Duck-typed: nothing here imports torch or numpy.

    A tensor that requires grad (with autograd on) is refused with a ``TypeError`` naming ``what``:
    its number is read on the host, so it would get no gradient, silently (a learned temperature
    passed as ``scale=``)."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, numbers.Integral):  # numpy's integers (numpy's bool is no Integral)
        return int(value)
    if isinstance(value, numbers.Real):  # numpy's floats
        return float(value)
    kind = type(value)  # (methods looked up on the type: torch.compile traces that, not callable() of a bound one)
    if callable(getattr(kind, "numel", None)) and callable(getattr(kind, "item", None)) and value.numel() == 1:
        if getattr(value, "requires_grad", False) and _grad_enabled():
            raise TypeError(f"{what} is read as a number on the host and gets no gradient, but the tensor given "
                            f"requires grad: pass it detached, or learn it as an [inputs] tensor with grad = true "
                            f"(a scalar: dims = [], mod = \"s * temp\")")
        if getattr(getattr(value, "dtype", None), "is_floating_point", False) and _compiling():
            # Traced, a float tensor's item() is a number unknown until run time, and the checks
            # of its value (scale > 0, in float32's range) failed with dynamo's data-dependent guard
            # error, which named no argument. (Without fullgraph=True dynamo runs this call eagerly.)
            raise TypeError(f"{what}: a float tensor's value is unknown while torch.compile traces (it would "
                            f"need a guard on data): pass a Python float (torch.compile specializes on it), or "
                            f"call .item() outside the compiled function")
        return value.item()  # a tensor of one element: int, float, bool (or complex, refused by the caller)
    return value


def _compiling() -> bool:
    """Whether torch.compile is tracing (torch is imported: a tensor came)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def _grad_enabled() -> bool:
    """torch's grad mode (torch is imported: a tensor came)."""
    torch = sys.modules.get("torch")
    return torch is None or torch.is_grad_enabled()


def param_float(value) -> float:
    """A float param's value as every stage takes it: a Python float, and -0.0 as 0.0. The two are
    equal numbers, so the caches keyed by a call's params (its signature, its block lists) cannot
    tell them apart; they must then mean the same (``1 / w`` is inf at both)."""
    return float(value) + 0.0  # (-0.0 + 0.0 is 0.0)


def float32_holds(value) -> bool:
    """Whether float32 holds the number ``value`` as itself: finite, and zero or a normal number in
    magnitude (what a float param must be, in a spec and in a call's override)."""
    try:
        value = float(value)
    except OverflowError:  # an int past float64's range
        return False
    # (comparisons only, which torch.compile traces on a symbolic float: NaN and inf fail the first)
    return abs(value) <= FLOAT32_MAX and (value == 0 or abs(value) >= FLOAT32_TINY)


def positions_to_cover(read_at: str, ends: Optional[Tuple[int, int]], both):
    """How many positions an input's ``"n"`` dim must hold: the query positions' end where every read
    indexes it with ``i`` itself (``read_at`` "i", attncc.spec.Pattern.position_axes), the keys'
    where with ``j`` ("j"), else ``both`` (the end of either; also when ``ends`` is None)."""
    if ends is not None and read_at == "i":
        return ends[0]
    if ends is not None and read_at == "j":
        return ends[1]
    return both


def input_dtype_accepted(given, declared) -> bool:
    """Whether a tensor of dtype ``given`` may be passed for an [inputs] entry declared ``declared``
    (torch dtypes; compared by their attributes, so this module needs no torch): a float tensor for a
    float input, an integer one for an integer or bool input (read as ``!= 0``), a bool one for a
    bool input; never a complex one. The generated modules and attncc.reference refuse the rest."""
    if given == declared:
        return True
    if given.is_complex or given.is_floating_point != declared.is_floating_point:
        return False
    # uint64: values past 2**63, which no signed type holds, and the kernels' and the reference's
    # arithmetic on an input's values is int64 (:func:`input_dtype_hint` says so)
    return str(given) not in ("torch.bool", "torch.uint64")


def input_dtype_hint(given) -> str:
    """What to add to the refusal of an input of dtype ``given`` (:func:`input_dtype_accepted`)."""
    if str(given) == "torch.uint64":
        return ", whose values no signed integer type holds (the values of integer inputs are computed on in int64): pass it as int64"
    return ""


def int_argument(what: str, value, minimum: int = 0, maximum: int = INT_LIMIT - 1) -> int:
    """``value`` as an int in ``[minimum, maximum]``, as a call takes its integer arguments (offsets,
    lengths, seeds, int params), or a TypeError / ValueError that names it (``what``: "causal.attention:
    q_offset"), says what it must be and what came. numpy's integers and one-element integer tensors
    are ints (:func:`plain_number`); booleans and floats, even integral ones, are not."""
    value = plain_number(value, what)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {_bound(minimum)}, got {value}")
    if value > maximum:
        raise ValueError(f"{what} must be <= {_bound(maximum)}, got {value}")
    return value


def _bound(n: int) -> str:
    """A bound of :func:`int_argument` as a reader knows it: ``2**62 - 1 (4611686018427387903)``,
    ``-2**31 (-2147483648)``; small ones as they are."""
    if n + 1 > 2**16 and (n + 1) & n == 0:
        return f"2**{(n + 1).bit_length() - 1} - 1 ({n})"
    if n < -2**16 and -n & (-n - 1) == 0:
        return f"-2**{(-n).bit_length() - 1} ({n})"
    return str(n)


def dropout_probability(what: str, value) -> float:
    """A call's ``dropout_p`` as a float in ``[0, 1)``, or a TypeError (not a number: a boolean of
    any kind, a string) / ValueError (outside ``[0, 1)``, NaN) naming ``what``. The one check of it:
    the generated modules' calls and ``attncc.reference`` both take it."""
    value = plain_number(value, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def param_value(name: str, kind: str, value, *, count: Optional[int] = None, who: str = "") -> Union[int, float]:
    """The value of the param ``name`` (``kind`` "int" or "float") that a call passes, as the kernels
    take it, or a TypeError / ValueError naming ``who`` (the function called, "causal.attention") and
    the param. An int param takes an int from ``INT_PARAM_MIN`` to ``INT_LIMIT - 1`` (:func:`int_argument`),
    at most ``count`` when it counts a reduction's terms (``range(K)``: the kernels unroll to the
    spec's value); a float param a number that float32 holds (:func:`float32_holds`), as a Python
    float (:func:`param_float`). numpy's numbers and one-element tensors are numbers (:func:`plain_number`).

    The one check of a param's value: the generated modules' calls (attncc.runtime.call) and
    ``attncc explain --param`` both take it, so explain never describes a value that no call takes,
    nor refuses one that a call takes."""
    what = f"{who}: param {name}" if who else f"param {name}"
    if kind == "int":
        value = int_argument(what, value, minimum=INT_PARAM_MIN)
        if count is not None and value > count:
            raise ValueError(f"{what} counts the terms of a reduction (range({name})), which the kernels unroll to "
                             f"its value in the spec, {count}: a call may pass at most {count}, got {value}")
        return value
    value = plain_number(value, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    if not float32_holds(value):
        raise ValueError(f"{what} must be a finite number in float32's range ({FLOAT32_TINY:.6g} to "
                         f"{FLOAT32_MAX:.6g} in magnitude, or 0), got {value!r}")
    return param_float(value)


def alibi_slope(h: int, n_heads: int) -> float:
    """ALiBi's slope of head ``h`` among ``n_heads`` (Press et al., including the
    rule for head counts that are not powers of two)."""
    cp = alibi_closest_power_of_two(n_heads)
    if h < cp:
        return 2.0 ** (-8.0 * (h + 1) / cp)
    return 2.0 ** (-4.0 * (2 * (h - cp) + 1) / cp)


def alibi_closest_power_of_two(n_heads: int) -> int:
    return 1 << (int(n_heads).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def bucket_thresholds(num_buckets: int, max_distance: int, bidirectional: bool) -> Tuple[int, Tuple[int, ...]]:
    """The T5 bucket of a distance ``n >= 0`` (after the sign split) as thresholds.

    Returns ``(max_exact, thresholds)``: for ``n < max_exact`` the bucket is ``n``;
    otherwise it is ``max_exact + #{t in thresholds : n >= t}``. This is exactly the
    T5 formula ``max_exact + floor(log(n / max_exact) / log(max_distance / max_exact)
    * (nb - max_exact))`` capped at ``nb - 1``, evaluated once in float64 here so that
    kernels compare integers instead of taking logarithms.
    """
    nb = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb // 2
    if max_exact < 1:
        return max_exact, ()
    thresholds = []
    k = 1
    n = max_exact
    while k <= nb - max_exact - 1:
        if _t5_large(n, nb, max_exact, max_distance) >= max_exact + k:
            thresholds.append(n)
            k += 1
        else:
            n += 1
    return max_exact, tuple(thresholds)


def _t5_large(n: int, nb: int, max_exact: int, max_distance: int) -> int:
    if max_distance <= max_exact:
        return nb - 1
    return max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact))


def t5_bucket(d: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True) -> int:
    """T5's relative position bucket of ``d = j - i`` (key minus query position)."""
    ret = 0
    n = -d
    nb = num_buckets
    if bidirectional:
        nb //= 2
        ret += nb if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = nb // 2
    if n < max_exact:
        return ret + n
    return ret + min(_t5_large(n, nb, max_exact, max_distance), nb - 1)


@functools.lru_cache(maxsize=4096)
def random_block_set(query_block: int, n_key_blocks: int, r: int, seed: int) -> Tuple[int, ...]:
    """BigBird's random key blocks of one query block: ``r`` distinct key blocks out of
    ``n_key_blocks``, drawn from a generator seeded by (seed, query block, key blocks)."""
    if n_key_blocks <= 0:
        return ()
    rng = random.Random(f"attncc.random_blocks:{seed}:{query_block}:{n_key_blocks}")
    return tuple(sorted(rng.sample(range(n_key_blocks), min(r, n_key_blocks))))


SHIFT_LIMIT = 63  # |n| of a shift by an amount that is not a constant is taken up to this


def shift(x: int, n: int) -> int:
    """``floor(x * 2**n)``: Python's ``x << n`` for n >= 0 and ``x >> -n`` for n < 0, with ``n``
    clamped to [-SHIFT_LIMIT, SHIFT_LIMIT] (past it an int64 is 0, -1, or overflows anyway)."""
    n = max(-SHIFT_LIMIT, min(SHIFT_LIMIT, n))
    return x << n if n >= 0 else x >> -n
