"""What generated kernels import at run time: argument checks, configs, launch helpers.

Imports torch (and Triton when launching) only: never sympy, networkx or jinja2.
"""
from attncc.runtime import blocks, decode, semantics, tiles
from attncc.runtime.call import Call, bind, dropout_mask_shape, dropout_settings, wide_positions
from attncc.runtime.call import _interpreting as interpreting
from attncc.runtime.compiled import register_kernels
from attncc.runtime.launch import (LN2, LOG2E, KernelConfig, ensure_allocator, fast_math, grad_operand,
                                   grads_as_inputs, kernel_operands, launch, padded_dim, pick_config, run_attention,
                                   shared_tile_config,
                                   tma_ready)
from attncc.runtime.spec_info import InputInfo, ParamInfo, SpecInfo

__all__ = ["blocks", "decode", "semantics", "tiles", "Call", "bind", "register_kernels", "dropout_mask_shape",
           "dropout_settings", "wide_positions", "KernelConfig", "pick_config", "shared_tile_config", "padded_dim", "tma_ready",
           "ensure_allocator", "fast_math", "interpreting", "kernel_operands", "launch", "run_attention",
           "grad_operand", "grads_as_inputs", "SpecInfo", "ParamInfo", "InputInfo", "LOG2E", "LN2"]
