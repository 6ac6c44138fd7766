"""Validate a call of a generated ``attention`` before anything is launched.

Every message says what was expected and what came, so that a wrong shape, dtype,
device, head count or keyword never turns into a wrong answer or a launch error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from attncc.runtime.spec_info import SpecInfo

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64, "int32": torch.int32, "int64": torch.int64, "int16": torch.int16,
           "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Call:
    """A validated call: sizes, positions and the resolved params and inputs."""

    spec: SpecInfo
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    q_offset: int
    k_offset: int
    n_q: int
    n_k: int
    scale: float
    return_lse: bool
    params: Dict[str, object] = field(default_factory=dict)
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    # A dict when a backward pass will follow (the autograd path sets it): the forward keeps
    # there what the backward of the same call reuses (the transposed block lists). None otherwise.
    for_backward: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv


def _dtype_name(t: torch.dtype) -> str:
    return _NAMES.get(t, str(t).replace("torch.", ""))


def _int_arg(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def bind(spec: SpecInfo, q, k, v, *, return_lse=False, q_offset=0, k_offset=0, n_q=None, n_k=None,
         scale=None, kwargs: Optional[dict] = None) -> Call:
    """Check the arguments of ``attention(q, k, v, ...)`` against the spec; return the Call."""
    name = spec.name
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.attention: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}.attention: {arg} must have 4 dims [B, H, N, D] (SDPA layout), got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}.attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}.attention: q, k, v must have one dtype, got {_dtype_name(q.dtype)}, {_dtype_name(k.dtype)}, {_dtype_name(v.dtype)}")
    # `dtypes` in the spec says what to tune ahead of time; the kernels take all three.
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name}.attention: q, k, v must be bfloat16, float16 or float32, got {_dtype_name(q.dtype)}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name}.attention: tensors are on {q.device}; the kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"{name}.attention: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hkv != Hv:
        raise ValueError(f"{name}.attention: k has {Hkv} heads but v has {Hv}")
    if Nk != Nv:
        raise ValueError(f"{name}.attention: k has {Nk} positions but v has {Nv}")
    if Dk != D:
        raise ValueError(f"{name}.attention: q and k head dims differ: {D} vs {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{name}.attention: q has {Hq} heads, k/v have {Hkv}: the query head count must be a multiple of the key/value head count")
    if spec.heads_q is not None and Hq != spec.heads_q:
        raise ValueError(f"{name}.attention: the spec fixes [heads].q = {spec.heads_q}, q has {Hq} heads")
    if spec.heads_kv is not None and Hkv != spec.heads_kv:
        raise ValueError(f"{name}.attention: the spec fixes [heads].kv = {spec.heads_kv}, k/v have {Hkv} heads")
    if not 1 <= D <= 256 or not 1 <= Dv <= 256:
        raise ValueError(f"{name}.attention: head dims up to 256 are supported, got D = {D}, Dv = {Dv}")
    if spec.value_dim is not None and Dv != spec.value_dim:
        raise ValueError(f"{name}.attention: the spec fixes value_dim = {spec.value_dim}, v has {Dv}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{name}.attention: return_lse must be a bool, got {return_lse!r}")

    q_offset = _int_arg("q_offset", q_offset)
    k_offset = _int_arg("k_offset", k_offset)
    n_q = q_offset + Nq if n_q is None else _int_arg("n_q", n_q)
    n_k = k_offset + Nk if n_k is None else _int_arg("n_k", n_k)
    if scale is None:
        scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise TypeError(f"{name}.attention: scale must be a positive number, got {scale!r}")

    kwargs = dict(kwargs or {})
    params = {}
    for p in spec.params:
        value = kwargs.pop(p.name, p.default)
        if p.kind == "int":
            value = _int_arg(p.name, value, minimum=-(2**31))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}.attention: param {p.name} must be a number, got {value!r}")
        params[p.name] = value if p.kind == "int" else float(value)
    inputs = {}
    n_max = max(q_offset + Nq, k_offset + Nk)
    for d in spec.inputs:
        if d.name not in kwargs:
            raise ValueError(f"{name}.attention: missing input {d.name!r}: a tensor with dims ({', '.join(map(str, d.dims))}) of {d.dtype}")
        t = kwargs.pop(d.name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.attention: input {d.name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name}.attention: input {d.name} is on {t.device}, q is on {q.device}")
        if t.dim() != len(d.dims):
            raise ValueError(f"{name}.attention: input {d.name} must have {len(d.dims)} dims ({', '.join(map(str, d.dims))}), got shape {tuple(t.shape)}")
        for axis, (dim, size) in enumerate(zip(d.dims, t.shape)):
            want = {"b": B, "h": Hq}.get(dim, dim)
            if dim == "n":
                if size < n_max:
                    raise ValueError(f"{name}.attention: input {d.name} dim {axis} ('n') must cover positions 0..{n_max - 1}, got size {size}")
            elif size != want:
                raise ValueError(f"{name}.attention: input {d.name} dim {axis} ({dim!r}) must be {want}, got {size}")
        want_dtype = _DTYPES[d.dtype]
        if t.dtype != want_dtype:
            if t.dtype.is_floating_point != want_dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"{name}.attention: input {d.name} must be {d.dtype}, got {_dtype_name(t.dtype)}")
            t = t.to(want_dtype)
        inputs[d.name] = t
    if kwargs:
        known = [p.name for p in spec.params] + [d.name for d in spec.inputs]
        raise TypeError(f"{name}.attention: unexpected keyword(s) {', '.join(sorted(kwargs))}; "
                        f"known inputs and params: {', '.join(known) or 'none'}")
    return Call(spec, q, k, v, B, Hq, Hkv, Nq, Nk, D, Dv, q_offset, k_offset, n_q, n_k, float(scale),
                return_lse, params, inputs)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
