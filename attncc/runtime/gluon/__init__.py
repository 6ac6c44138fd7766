"""Gluon forward kernels for Hopper (sm90): the second code-generation target of issue 20.

`fwd_pipelined` is the plain one-instruction-stream kernel, `fwd_ws` the FlashAttention-3
structure; `walks` gives the contract of the pattern fragments the kernels inline and holds the
built-in dense and causal walks; codegen renders the others from a Plan (generated/<name>_gluon.py,
loaded by `fragments`); `launch` builds descriptors and grids, launches, and compiles every variant
for sm90 without a GPU. A generated module whose Plan the kernels compute (`SpecInfo.gluon`)
reaches them through `attncc.runtime.backend`; docs/gluon.md has the design and the status.

The names below import nothing (no Triton, no torch): `attncc explain` and the backend read them.
"""

HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16")
CAPABILITY = (9, 0)  # sm90: H100, H200 (wgmma, TMA, setmaxnreg)

# What ATTNCC_BACKEND=auto (the default) picks on an sm90 GPU for a call the Gluon forward can run
# (attncc.runtime.backend). False in this version: the Gluon kernels passed their own checks on an
# H200 (tests/gpu/test_gpu_gluon.py) and reach 0.96-1.00x cuDNN's forward, but the wiring through
# the generated modules has not run on a GPU yet. Once tests/gpu/test_gpu_gluon_specs.py passes
# there, auto-selection is this one switch.
AUTO_SELECTS_GLUON = False
