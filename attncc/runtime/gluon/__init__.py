"""Gluon kernels for Hopper (sm90): the second code-generation target of issue 20.

Not wired into codegen yet (issue 17 first); see docs/gluon.md. `fwd_pipelined` is the plain
one-instruction-stream kernel, `fwd_ws` the FlashAttention-3 structure; `walks` holds the pattern
fragments codegen will render; `launch` builds descriptors and grids and compiles every variant
for sm90 without a GPU.
"""
