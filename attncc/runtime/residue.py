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

from attncc.runtime.call import env

STEP, CQ, CK = "_rs_step", "_rs_cq", "_rs_ck"  # attncc.analysis.residue.HIDDEN
MAX_CLASSES = 64  # more classes than this run whole (a launch per class)
POSITION_LIMIT = 2**30  # the views' positions STEP * row + CQ stay far inside int32


@dataclass(frozen=True)
class _Class:
    rq: int  # first query row of the class
    rk: int  # first key row
    nq: int  # its query rows
    nk: int  # its key rows


def min_rows() -> int:
    """Rows per class below which a call runs whole (``ATTNCC_RESIDUE_MIN_ROWS``, default 128:
    a class should fill at least one tile of the kernels)."""
    text = env("ATTNCC_RESIDUE_MIN_ROWS")
    if text is None:
        return 128
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"ATTNCC_RESIDUE_MIN_ROWS must be an int >= 0, got {text!r}")
    return value


def classes(call, modulus: Union[str, int]) -> Optional[List[_Class]]:
    """The classes a call splits into, or None when it runs whole."""
    m = call.params[modulus] if isinstance(modulus, str) else modulus
    if not isinstance(m, int) or isinstance(m, bool) or not 2 <= m <= MAX_CLASSES or call.varlen:
        return None
    if max(call.q_offset + call.Nq, call.k_offset + call.Nk) >= POSITION_LIMIT:
        return None
    if min(call.Nq, call.Nk) < m * min_rows():
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
    return call.replace(q=call.q[:, :, part.rq::m], k=call.k[:, :, part.rk::m], v=call.v[:, :, part.rk::m],
                        Nq=part.nq, Nk=part.nk, q_offset=0, k_offset=0, params=params, memo=None,
                        for_backward=None if call.for_backward is None else {})


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
