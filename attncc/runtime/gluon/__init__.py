"""Gluon forward kernels for Hopper (sm90): the second code-generation target of issue 20.

`fwd_pipelined` is the plain one-instruction-stream kernel, `fwd_ws` the FlashAttention-3
structure; `walks` holds the pattern fragments (the built-in dense and causal walks; codegen will
render others); `launch` builds descriptors and grids, launches, and compiles every variant for
sm90 without a GPU. A generated module whose Plan is a built-in walk (`SpecInfo.gluon`) reaches
them through `attncc.runtime.backend`; docs/gluon.md has the design and the status.

The names below import nothing (no Triton): `attncc explain` and the backend's checks read them.
"""

HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16")
CAPABILITY = (9, 0)  # sm90: H100, H200 (wgmma, TMA, setmaxnreg)
