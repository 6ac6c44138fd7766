"""What generated kernels import at run time: argument checks, configs, launch helpers.

Imports torch (and Triton when launching) only: never sympy, networkx or jinja2; of attncc, the
shared vocabulary of :mod:`attncc.core` alone. The names below load on first use (PEP 562), so
that importing the package costs nothing until a call needs it.
"""
import importlib
import sys
import types

# name -> (module, attribute in it); a module's name alone for the submodules
_EXPORTS = {
    "backend": ("attncc.runtime.backend", None),
    "blocks": ("attncc.runtime.blocks", None),
    "decode": ("attncc.runtime.decode", None),
    "semantics": ("attncc.core.semantics", None),  # the built-ins' numbers (``_rt.semantics.alibi_slope``)
    "tiles": ("attncc.runtime.tiles", None),
    "Call": ("attncc.runtime.call", "Call"),
    "bind": ("attncc.runtime.call", "bind"),
    "dropout_mask_shape": ("attncc.runtime.call", "dropout_mask_shape"),
    "dropout_settings": ("attncc.runtime.call", "dropout_settings"),
    "wide_positions": ("attncc.runtime.call", "wide_positions"),
    "on_q_device": ("attncc.runtime.call", "on_q_device"),
    "interpreting": ("attncc.runtime.call", "interpreting"),
    "register_kernels": ("attncc.runtime.compiled", "register_kernels"),
    "residue_split": ("attncc.runtime.residue", "split"),
    "column_split": ("attncc.runtime.residue", "column_split"),
    "eager_when_traced": ("attncc.runtime.compiled", "eager_when_traced"),
    "gluon_backward": ("attncc.runtime.backend", "gluon_backward"),
    "gluon_backward_selected": ("attncc.runtime.backend", "gluon_backward_selected"),
    "gluon_forward": ("attncc.runtime.backend", "gluon_forward"),
    "gluon_fragments": ("attncc.runtime.gluon.fragments", "FragmentFile"),
    "gluon_selected": ("attncc.runtime.backend", "gluon_selected"),
    "SpecInfo": ("attncc.runtime.spec_info", "SpecInfo"),
    "ParamInfo": ("attncc.runtime.spec_info", "ParamInfo"),
    "InputInfo": ("attncc.runtime.spec_info", "InputInfo"),
    "KernelConfig": ("attncc.runtime.configs", "KernelConfig"),
    "padded_dim": ("attncc.runtime.configs", "padded_dim"),
    **{name: ("attncc.runtime.launch", name) for name in (
        "LN2", "LOG2E", "backward_configs", "bound_launch", "cdiv", "dot_operand", "ensure_allocator", "fast_kernel", "fast_math",
        "grad_operand", "grads_as_inputs", "kernel_operands", "launch", "next_power_of_2", "pick_config",
        "run_attention", "shared_tile_config", "tma_ready")},
    **{name: ("attncc.runtime.autograd", name) for name in ("keep_raw_lse", "raw_lse", "seal_raw_lse")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attncc.runtime' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    if attribute is None:  # a module (``from attncc.runtime import blocks``)
        return importlib.import_module(module)
    # The first use of a function or class loads the whole runtime, as an eager import did: its
    # Triton kernels (decoding's merge kernel, say) are then made under the TRITON_INTERPRET
    # setting of that moment, the one the generated module's own kernels get.
    for export, (module, attribute) in _EXPORTS.items():
        value = importlib.import_module(module)
        globals()[export] = value if attribute is None else getattr(value, attribute)  # later lookups: plain reads
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule sets it as an attribute of this package; ``launch`` must stay the
        # function of that name (generated modules call ``_rt.launch``), not its module.
        if name == "launch" and isinstance(value, types.ModuleType):
            value = value.launch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
