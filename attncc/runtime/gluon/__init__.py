"""Gluon attention kernels for Hopper (sm90): the second code-generation target of issue 20.

`fwd_pipelined` is the plain one-instruction-stream forward, `fwd_ws` the FlashAttention-3
structure, `bwd` the backward (dK/dV and dQ kernels; `preprocess` writes their delta and lse2),
`bwd_fused` the backward with dQ fused into the dK/dV program (ATTNCC_GLUON_BWD=fused);
`walks` gives the contract of the pattern fragments the kernels inline and holds the built-in dense
and causal walks; codegen renders the others from a Plan, the backward's query-block walk, mask and
score derivative too (generated/<name>_gluon.py, loaded by `fragments`); `launch` builds descriptors and grids, launches,
and compiles every variant for sm90 without a GPU. A generated module whose Plan the kernels compute
(`SpecInfo.gluon`) reaches them through `attncc.runtime.backend`; docs/gluon.md has the design and
the status.

The names below import nothing (no Triton, no torch): `attncc explain` and the backend read them.
"""

HEAD_DIMS = (64, 128, 256)
# The backward's: at 256, dK and dV of one warpgroup's 64 keys are 2 x 128 fp32 registers per thread.
BWD_HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float16")
CAPABILITY = (9, 0)  # sm90: H100, H200 (wgmma, TMA, setmaxnreg)

# What ATTNCC_BACKEND=auto (the default) picks on an sm90 GPU for a call the Gluon forward can run
# (attncc.runtime.backend). False in this version: the Gluon kernels passed their own checks on an
# H200 (tests/gpu/test_gpu_gluon.py) and reach 0.96-1.00x cuDNN's forward, but the wiring through
# the generated modules has not run on a GPU yet. Once tests/gpu/test_gpu_gluon_specs.py passes
# there, auto-selection is this one switch.
AUTO_SELECTS_GLUON = False

# The same for the Gluon backward (attncc.runtime.backend: a generated module's `_backward`). False:
# it has not run on a GPU at all (written without one; tests/test_gluon_compile.py compiles it for
# sm90, tests/test_gluon_bwd.py checks its tile loop's numerics on the CPU). Once
# tests/gpu/test_gpu_gluon.py and tests/gpu/test_gpu_gluon_specs.py pass its backward tests on an
# H100/H200 and it is timed (`python -m bench gluon-wired`), auto-selection is this switch.
AUTO_SELECTS_GLUON_BACKWARD = False
