"""The names generated code gives to what a spec names: one function per role, in one place.

A spec's params and inputs may be called anything a Python identifier can be (``x``, ``x_b``,
``x_ptr``, ``qk``, ``acc``, ``prm_a``...), so a name built by pasting a suffix onto them
(``x`` + ``_b_i`` and ``x_b`` + ``_i``) can meet another one, or a kernel's own local.
Every name derived from a spec identifier is therefore ``<role>_<identifier>`` with the role
from a prefix-free set, so the text determines both the role and the identifier
(injective by construction):

    prm_<p>          a param's value (kernel argument)
    ptr_<x>          an input's data pointer
    stride<d>_<x>    its stride along dim d
    size<d>_<x>      its size along dim d
    gptr_<x>         the fp32 buffer its gradient is added into (``grad = true``)
    gstride<d>_<x>   that buffer's stride along dim d
    t_<x>            an input tensor in the host function of the block-list kernel

The templates and the code generators never name a variable of their own with one of these
prefixes (``tests/test_names.py`` scans them), so no spec name can shadow a kernel local
either. (The block classifier names its leaves by the same rule: see
:mod:`attncc.analysis.classifier`.)
"""
from __future__ import annotations

import re
from typing import Sequence

# What a name made here looks like: a role, then the spec's identifier.
GENERATED = re.compile(r"^(prm|ptr|gptr|t|(?:g?stride|size)\d+)_")


def param_var(name: str) -> str:
    """The kernel variable holding the value of the spec param ``name``."""
    return f"prm_{name}"


def input_ptr(name: str) -> str:
    return f"ptr_{name}"


def input_stride(name: str, dim: int) -> str:
    return f"stride{dim}_{name}"


def input_size(name: str, dim: int) -> str:
    return f"size{dim}_{name}"


def grad_ptr(name: str) -> str:
    return f"gptr_{name}"


def grad_stride(name: str, dim: int) -> str:
    return f"gstride{dim}_{name}"


def host_tensor(name: str) -> str:
    return f"t_{name}"


def input_args(name: str, rank: int) -> list:
    """The kernel arguments of an input, in the order the host passes them:
    pointer, strides, sizes."""
    return ([input_ptr(name)] + [input_stride(name, d) for d in range(rank)]
            + [input_size(name, d) for d in range(rank)])


def grad_args(name: str, rank: int) -> list:
    """The kernel arguments of an input's gradient buffer: pointer, strides."""
    return [grad_ptr(name)] + [grad_stride(name, d) for d in range(rank)]



def dot_value(index: int) -> str:
    """The kernel variable holding lowered dot ``index``'s values on a tile (attncc.codegen.tile_dots)."""
    return f"dot{index}"


def dot_operand(index: int, query: bool) -> str:
    """The kernel variable holding the tile of lowered dot ``index``'s query operand (``query``) or
    key operand."""
    return f"dot{index}_{'q' if query else 'k'}"


def param_arg(param) -> str:
    """A param in a kernel's signature. Float params are float64 (Triton would make a Python
    float a float32 argument): masks compute with the value the reference uses."""
    return f"{param_var(param.name)}: tl.float64" if param.kind == "float" else param_var(param.name)


def param_value(param, float64: bool) -> str:
    """A param's value in printed code: float params in float32 (score) code are cast down, so
    that a float64 scalar does not turn a tile of scores into float64."""
    if param.kind == "float":
        if not float64:
            return f"tl.cast({param_var(param.name)}, tl.float32)"  # a Python float in the interpreter: no .to()
        return _float64(param_var(param.name))
    return param_var(param.name)


def _float64(var: str) -> str:
    """A float param's variable as a float64 value: a float64 argument when compiled; in the
    interpreter a Python float, which Triton would take as a float32 constant beside a tensor (0.3
    as 0.30000001192: `j * 0.1 > f` lost j = 3)."""
    return f"tl.full((), {var}, tl.float64)"


_FLOAT32_PARAM = re.compile(r"tl\.cast\((prm_\w+), tl\.float32\)")


def float64_text(text: str) -> str:
    """The float64 value of what score code names ``text``: a float param's own variable for its
    float32 cast (:func:`param_value`), anything else as it is."""
    m = _FLOAT32_PARAM.fullmatch(text)
    return _float64(m.group(1)) if m else text
