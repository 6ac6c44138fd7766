"""The runtime side of generated linear attention: state checks, tile configs, the
projection cache and the autograd wiring.

A generated linear module (templates/linear.py.j2) defines the kernels and two launchers,
``_forward(lc, q, k, v, s0, z0, save_den)`` and ``_backward(lc, saved, do, ds, dz)``;
:func:`run_linear` calls them, through :class:`LinearAttentionFunction` when a gradient
is wanted.

The state of linear attention after keys ``k_0 .. k_{n-1}`` is the pair
``S = sum_j phi(k_j) v_j^T`` (``[B, Hkv, F, Dv]``) and ``z = sum_j phi(k_j)``
(``[B, Hkv, F]``), both float32. It depends on the keys and values only, so there is one
per key/value head (GQA and MQA share it among the query heads of a group).

Torch only: no sympy, no Triton at import.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from attncc.core.feature_maps import performer_projection
from attncc.runtime import call as _call
from attncc.runtime.autograd import no_double_backward
from attncc.runtime.call import Call, interpreting
from attncc.runtime.configs import padded_dim

State = Tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LinearConfig:
    """Tiles of the linear kernels. ``chunk``: rows per chunk (the quadratic block), forward;
    ``scan_dv``: value columns per program of the sequential state scan (fewer columns, more
    programs: the scan is parallel over (b, kv head, feature block, value block) only);
    ``bwd_chunk`` and ``bwd_warps``: rows per chunk and warps of the backward's dq and dk/dv kernels
    (they recompute the states themselves); 64 rows with 4 warps measured fastest on an H100 at
    D = 128 (``python -m bench linear-elu-16k --sweep linear-bwd-chunks``, docs/performance.md)."""

    chunk: int = 64
    scan_dv: int = 64
    out_dv: int = 128
    bwd_chunk: int = 64
    num_warps: int = 8
    bwd_warps: int = 4
    scan_warps: int = 8
    num_stages: int = 2


CONFIG_ENV = "ATTNCC_LINEAR_CONFIG"
_TILE_FIELDS = ("chunk", "scan_dv", "out_dv", "bwd_chunk")  # dot dims: powers of two >= 16


def _env_config() -> dict:
    """``ATTNCC_LINEAR_CONFIG="chunk=32,bwd_chunk=64,num_warps=4"`` forces fields of LinearConfig
    (benchmarks, e.g. ``python -m bench linear-elu-16k --sweep linear-bwd-chunks``). Read at every call."""
    text = os.environ.get(CONFIG_ENV, "")
    names = [f.name for f in dataclasses.fields(LinearConfig)]
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = (x.strip() for x in part.partition("="))
        if key not in names:
            raise ValueError(f"{CONFIG_ENV}: unknown field {key!r} in {text!r} (fields: {', '.join(names)})")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: {key} must be an integer, got {value!r}") from None
        power_of_two = key != "num_stages"  # tiles and warp counts
        if n < 1 or (power_of_two and n & (n - 1)) or (key in _TILE_FIELDS and n < 16):
            need = "a power of two >= 16" if key in _TILE_FIELDS else "a power of two" if power_of_two else ">= 1"
            raise ValueError(f"{CONFIG_ENV}: {key} must be {need}, got {n}")
        fields[key] = n
    return fields


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_config(call: Call, block_f: int, num_fb: int, projection: bool = False) -> LinearConfig:
    """Tiles for a call: 16-row chunks under the interpreter (the tests), else 64-row forward chunks
    while the [chunk, feature block] and [chunk, Dv] tiles stay within 128 columns, 32 above, and
    64-row backward chunks with 4 warps (32 rows, 8 warps above 128 columns: not measured there).
    ``projection``: the feature map projects q and k (the performer's W): its backward kernels hold
    the projection's tiles besides the states, which are float32 but for bfloat16 operands, and
    at 64 rows need more shared memory than an sm90 program has (Triton 3.6: 237568 bytes for
    the dQ kernel in float16, 328192 for dK/dV in float32; tests/test_sm90_compile.py compiles
    them): 32 rows there.
    ``python -m bench linear-elu-16k --sweep linear-configs`` times alternatives."""
    dv_pad = padded_dim(call.Dv)
    if interpreting():
        cfg = LinearConfig(chunk=16, scan_dv=min(dv_pad, 32), out_dv=min(dv_pad, 32), bwd_chunk=16, num_warps=4,
                           bwd_warps=4, scan_warps=4, num_stages=1)
    else:
        wide = max(padded_dim(call.D), dv_pad, block_f) > 128
        chunk = 32 if wide else 64
        # The scan is sequential over chunks: split Dv until the programs fill the GPU.
        scan_dv = min(dv_pad, 64)
        while scan_dv > 32 and call.B * call.Hkv * num_fb * (-(-call.Dv // scan_dv)) < _sm_count(call.q.device):
            scan_dv //= 2
        float32_states = call.q.dtype != torch.bfloat16
        cfg = LinearConfig(chunk=chunk, scan_dv=scan_dv, out_dv=min(dv_pad, 128),
                           bwd_chunk=32 if projection and float32_states else chunk, bwd_warps=8 if wide else 4)
    forced = _env_config()
    return dataclasses.replace(cfg, **forced) if forced else cfg


_PROJECTIONS = {}


def projection(features: int, dim: int, seed: int, device) -> torch.Tensor:
    """performer_projection as float32 on ``device``, cached (every layer asks again)."""
    key = (features, dim, seed, str(device))
    w = _PROJECTIONS.get(key)
    if w is None:
        if len(_PROJECTIONS) > 64:
            _PROJECTIONS.clear()
        w = _PROJECTIONS[key] = performer_projection(features, dim, seed, dtype=torch.float32, device=device)
    return w


@dataclass
class LinearCall:
    """A validated linear-attention call with what its kernels need.

    ``features`` F, the feature dimension; features come in ``num_fb`` blocks of
    ``fb_width`` (padded to ``block_f``) columns. ``proj``: the performer's ``W [F, D]``
    (float32) or None. ``angle``: cosFormer's ``pi / (2 M)``, else 0. ``s0``/``z0``: the
    initial state (float32, contiguous) or None; ``return_state``: the final one is wanted."""

    call: Call
    features: int
    fb_width: int
    block_f: int
    proj: Optional[torch.Tensor] = None
    angle: float = 0.0
    s0: Optional[torch.Tensor] = None
    z0: Optional[torch.Tensor] = None
    return_state: bool = False
    cfg: LinearConfig = LinearConfig()

    @property
    def num_fb(self) -> int:
        return -(-self.features // self.fb_width)


def check_state(name: str, state, B: int, Hkv: int, F: int, Dv: int, device, what: str = "initial_state"):
    """``state = (S, z)`` with ``S [B, Hkv, F, Dv]`` and ``z [B, Hkv, F]``, floating, on
    ``device``; returns them as contiguous float32 (the same tensors when they already are,
    so that gradients flow to them)."""
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(t, torch.Tensor) for t in state)):
        raise TypeError(f"{name}: {what} must be a pair (S, z) of tensors, S [B, Hkv, F, Dv] = [{B}, {Hkv}, {F}, {Dv}] "
                        f"and z [B, Hkv, F] = [{B}, {Hkv}, {F}] (as returned with return_state=True), got {type(state).__name__}")
    s, z = state
    _call.refuse_transforms(name, *state)  # a tangent on the state (forward-mode AD)
    for label, t, shape in (("S", s, (B, Hkv, F, Dv)), ("z", z, (B, Hkv, F))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} {label} must have shape {list(shape)} ([B, Hkv, F{', Dv' if label == 'S' else ''}] "
                             f"with F = {F} features), got {list(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: {what} {label} must be floating (it is kept in float32), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: {what} {label} is on {t.device}, q is on {device}")
    return s.float().contiguous(), z.float().contiguous()


def operand(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the kernels read it: last stride 1; and as float32 under the interpreter
    when it is bfloat16 (Triton 3.6's CPU interpreter computes bfloat16 dots wrongly)."""
    if interpreting() and t.dtype == torch.bfloat16:
        t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


class LinearAttentionFunction(torch.autograd.Function):
    """``o, S, z = f(q, k, v, s0, z0)`` with gradients for all five inputs.

    The forward keeps q, k, v, o, the denominators (float32 ``[B, Hq, Nq]``) and the
    initial state; the backward recomputes the per-chunk states (they would be twice the
    size of q, k, v to keep) and runs the generated backward launcher."""

    @staticmethod
    def forward(ctx, forward, backward, lc: LinearCall, q, k, v, s0, z0):
        lc = dataclasses.replace(lc, s0=s0, z0=z0)
        o, den, s, z = forward(lc, save_den=True)
        # without q, k, v and the state: they reach the backward through save_for_backward only, so that
        # saved-tensor hooks manage them (checkpointing, offloading; see AttentionFunction.forward)
        ctx.lc = dataclasses.replace(lc, call=lc.call.replace(q=None, k=None, v=None), s0=None, z0=None)
        ctx.backward_fn = backward
        ctx.has_init = s0 is not None
        ctx.save_for_backward(q, k, v, o, den, *((s0, z0) if s0 is not None else ()))
        if s is None:
            return o
        return o, s, z

    @staticmethod
    def backward(ctx, do, ds=None, dz=None):
        do, ds, dz = _call.backward_cotangents(f"{ctx.lc.call.spec.name}.attention's backward", do, ds, dz)
        q, k, v, o, den, *init = ctx.saved_tensors
        # the kernels read the denominators and the initial state at contiguous strides (q, k, v, o at
        # their own): saved-tensor hooks may give them back in another layout (an offloading hook's copy)
        den = None if den is None else den.contiguous()
        init = [t.contiguous() for t in init]
        call = dataclasses.replace(ctx.lc.call, q=q, k=k, v=v)
        call.check_device(f"{call.spec.name}.attention's backward")
        lc = dataclasses.replace(ctx.lc, call=call, s0=init[0] if init else None, z0=init[1] if init else None)
        if do is None:
            do = torch.zeros_like(o)
        differentiable = torch.is_grad_enabled()  # create_graph=True
        with torch.no_grad():
            dq, dk, dv, ds0, dz0 = ctx.backward_fn(lc, o, den, do, ds, dz)
        need = ctx.needs_input_grad
        grads = [dq if need[3] else None, dk if need[4] else None, dv if need[5] else None,
                 ds0 if ctx.has_init and need[6] else None, dz0 if ctx.has_init and need[7] else None]
        if differentiable:  # the gradients must not be differentiated: a second backward raises, as softmax's
            grads = no_double_backward(call.spec.name, grads, (q, k, v, *init, do, ds, dz))
        return (None, None, None, *grads)


def _differentiable(lc: LinearCall):
    """The tensors a gradient may flow to: q, k, v and the initial state."""
    return [lc.call.q, lc.call.k, lc.call.v] + ([lc.s0, lc.z0] if lc.s0 is not None else [])


def refuse_gradients(name: str, lc: LinearCall) -> None:
    """``step`` runs its kernel without autograd (as ``decode``): refused when q, k, v or the state want a gradient."""
    _call.refuse_gradients(name, _differentiable(lc), "q, k, v and the state (attention(..., initial_state=, "
                                                      "return_state=True) trains over chunks)")


def run_linear(lc: LinearCall, forward: Callable, backward: Callable):
    """``o`` or ``(o, (S, z))`` (``lc.return_state``), attached to autograd when q, k, v or
    the initial state want a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in _differentiable(lc)):
        out = LinearAttentionFunction.apply(forward, backward, lc, lc.call.q, lc.call.k, lc.call.v, lc.s0, lc.z0)
        return (out[0], (out[1], out[2])) if lc.return_state else out
    with torch.no_grad():
        o, _, s, z = forward(lc, save_den=False)
    return (o, (s, z)) if lc.return_state else o
