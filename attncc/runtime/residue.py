"""Calls of a pattern split by residue class (attncc.analysis.residue): the rows and keys of each
class ``c`` modulo m (positions ``c, c + m, c + 2m, ...``) run as one call of strided views, the
kernels told where the views' rows sit by three hidden params (``STEP = m``, ``CQ`` and ``CK`` the
positions of their first row and key), and the results are written back to the class's rows.

A class's tiles hold only pairs the residue conjunct allows, so a dilated window of width w walks
w / m keys per row, in tiles as dense as a plain window's, instead of w keys of which 1 in m count.
Calls too small to fill tiles per class, packed (varlen) calls and positions near 2**30 run whole
(``STEP = 1``: the spec's own pattern)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import torch

from attncc.core.splits import CK, CK2, CQ, PART, SK, STEP
from attncc.runtime.call import env

MAX_CLASSES = 64  # more classes than this run whole (a launch per class)
POSITION_LIMIT = 2**30  # the views' positions STEP * row + CQ stay far inside int32


@dataclass(frozen=True)
class _Class:
    rq: int  # first query row of the class
    rk: int  # first key row
    nq: int  # its query rows
    nk: int  # its key rows


def _rows_setting(name: str, default: int) -> int:
    """The int >= 0 in environment variable ``name`` (``default`` when unset)."""
    text = env(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {text!r}")
    return value


def min_rows() -> int:
    """Rows per class below which a call runs whole (``ATTNCC_RESIDUE_MIN_ROWS``, default 128:
    a class should fill at least one tile of the kernels)."""
    return _rows_setting("ATTNCC_RESIDUE_MIN_ROWS", 128)


def _split_modulus(call, modulus: Union[str, int], most: Optional[int]) -> Optional[int]:
    """m (``modulus``: an int param's name or a literal) where the call may split: 2 <= m (<= ``most``),
    not packed, positions below POSITION_LIMIT; else None."""
    m = call.params[modulus] if isinstance(modulus, str) else modulus
    if not isinstance(m, int) or isinstance(m, bool) or m < 2 or (most is not None and m > most) or call.varlen:
        return None
    return None if max(call.q_offset + call.Nq, call.k_offset + call.Nk) >= POSITION_LIMIT else m


def _part_call(call, **changes):
    """A part of ``call``: its own Call, with no signature memo (its sizes and params are not the
    call's) and, where the call keeps things for its backward, a dict of its own."""
    return call.replace(memo=None, for_backward=None if call.for_backward is None else {}, **changes)


def classes(call, modulus: Union[str, int]) -> Optional[List[_Class]]:
    """The classes a call splits into, or None when it runs whole."""
    m = _split_modulus(call, modulus, MAX_CLASSES)
    if m is None or min(call.Nq, call.Nk) < m * min_rows():
        return None
    out = []
    for c in range(m):
        rq, rk = (c - call.q_offset) % m, (c - call.k_offset) % m
        out.append(_Class(rq, rk, len(range(rq, call.Nq, m)), len(range(rk, call.Nk, m))))
    return out


def _sub_call(call, part: _Class, m: int):
    """The call of one class: strided views of q, k, v at positions ``m * row + CQ`` / ``CK``."""
    params = dict(call.params)
    params[STEP], params[CQ], params[CK] = m, call.q_offset + part.rq, call.k_offset + part.rk
    return _part_call(call, q=call.q[:, :, part.rq::m], k=call.k[:, :, part.rk::m], v=call.v[:, :, part.rk::m],
                      Nq=part.nq, Nk=part.nk, q_offset=0, k_offset=0, params=params)


def split(forward: Callable, backward: Optional[Callable], modulus: Union[str, int]):
    """``(forward, backward)`` of a generated module, each running a call class by class where
    :func:`classes` splits it (see the module doc), and as they are otherwise."""

    def split_forward(call):
        parts = classes(call, modulus)
        if parts is None:
            return forward(call)
        m = len(parts)
        o = torch.zeros(call.B, call.Hq, call.Nq, call.Dv, dtype=call.q.dtype, device=call.q.device)
        lse = torch.full((call.B, call.Hq, call.Nq), -math.inf, dtype=torch.float32, device=call.q.device)
        for part in parts:
            if part.nq and part.nk:  # (a class without keys keeps o = 0, lse = -inf)
                o_c, lse_c = forward(_sub_call(call, part, m))
                o[:, :, part.rq::m] = o_c
                lse[:, :, part.rq::m] = lse_c
        return o, lse

    def split_backward(call, o, lse, do, dlse=None):
        parts = classes(call, modulus)
        if parts is None:
            return backward(call, o, lse, do, dlse)
        m = len(parts)
        dq = torch.zeros(call.B, call.Hq, call.Nq, call.D, dtype=call.q.dtype, device=call.q.device)
        dk = torch.zeros(call.B, call.Hkv, call.Nk, call.D, dtype=call.k.dtype, device=call.q.device)
        dv = torch.zeros(call.B, call.Hkv, call.Nk, call.Dv, dtype=call.v.dtype, device=call.q.device)
        for part in parts:
            if not (part.nq and part.nk):
                continue
            rows = slice(part.rq, None, m)
            dlse_c = None if dlse is None else dlse[:, :, rows].contiguous()
            dq_c, dk_c, dv_c, grads = backward(_sub_call(call, part, m), o[:, :, rows], lse[:, :, rows].contiguous(),
                                               do[:, :, rows], dlse_c)
            if grads:  # (the split takes patterns without [inputs]: nothing else has a gradient)
                raise AssertionError("attncc (internal): a residue-split call returned input gradients")
            dq[:, :, rows] = dq_c
            dk[:, :, part.rk::m] = dk_c
            dv[:, :, part.rk::m] = dv_c
        return dq, dk, dv, {}

    return split_forward, (split_backward if backward is not None else None)


# --------------------------------------------------------------------------------------------
# Summary columns (attncc.analysis.residue.ColumnSplit)

def column_min_rows() -> int:
    """Query and key rows below which a call with summary columns runs whole
    (``ATTNCC_COLUMN_MIN_ROWS``, default 1024: two calls and a merge cost more than they save below)."""
    return _rows_setting("ATTNCC_COLUMN_MIN_ROWS", 1024)


def column_parts(call, modulus: Union[str, int], constant: int, names: tuple):
    """(the call of part 0, of part 1 or None when the columns' class has no key, its first key row,
    m) where a call splits (see :func:`column_split`), else None."""
    # m <= Nk: a larger m leaves the columns one key at most (nothing to gain), and its strided view
    # of k would step past the tensor (a stride of m * row stride: past 2**63 for m = 2**58, say)
    m = _split_modulus(call, modulus, call.Nk)
    if m is None or min(call.Nq, call.Nk) < column_min_rows():
        return None
    r = constant + sum(call.params[name] for name in names)
    rk = (r - call.k_offset) % m  # the first key row at a position = r (mod m)
    whole, columns = dict(call.params), dict(call.params)
    whole[PART] = 0
    columns[PART], columns[SK], columns[CK2] = 1, m, call.k_offset + rk
    # (both parts write their LSE, whether the call returns it or not: the merge weighs them by it)
    rest = _part_call(call, params=whole, return_lse=True)
    nk = len(range(rk, call.Nk, m))
    cols = None if nk == 0 else _part_call(call, k=call.k[:, :, rk::m], v=call.v[:, :, rk::m], Nk=nk, k_offset=0,
                                           params=columns, return_lse=True)
    return rest, cols, rk, m


def column_split(forward: Callable, backward: Optional[Callable], modulus: Union[str, int], constant: int,
                 names: tuple):
    """``(forward, backward)`` of a generated module whose mask has summary columns ``j % m == r``
    (``r = constant + sum of the params named``): a call runs as part 0 (the rest of the mask, every
    key) and part 1 (the columns, the keys of class ``r % m`` as strided views), merged by their
    log-sum-exp; the backward of each part takes the merged o and LSE, so their gradients add up
    to the whole call's. Calls too small, packed or near 2**30 run whole (part 2, the spec's mask)."""

    def parts(call):
        return column_parts(call, modulus, constant, names)

    def split_forward(call):
        split = parts(call)
        if split is None:
            return forward(call)
        rest, cols, _, _ = split
        o, lse = forward(rest)
        if cols is None:
            return o, lse
        o_c, lse_c = forward(cols)
        both = torch.logaddexp(lse, lse_c)
        none = torch.isneginf(both)  # rows without keys in either part: o = 0, lse = -inf
        w = torch.where(none, 0.0, torch.exp(lse - both)).unsqueeze(-1)
        w_c = torch.where(none, 0.0, torch.exp(lse_c - both)).unsqueeze(-1)
        merged = (w * o.float() + w_c * o_c.float()).to(o.dtype)
        return merged, both

    def split_backward(call, o, lse, do, dlse=None):
        split = parts(call)
        if split is None:
            return backward(call, o, lse, do, dlse)
        rest, cols, rk, m = split
        dq, dk, dv, grads = backward(rest, o, lse, do, dlse)
        if cols is not None:
            dq_c, dk_c, dv_c, grads_c = backward(cols, o, lse, do, dlse)
            if grads or grads_c:
                raise AssertionError("attncc (internal): a column-split call returned input gradients")
            dq = dq + dq_c
            dk[:, :, rk::m] += dk_c
            dv[:, :, rk::m] += dv_c
        return dq, dk, dv, {}

    return split_forward, (split_backward if backward is not None else None)
