"""Gluon attention kernels for Hopper (sm90): the second code-generation target of issue 20.

`fwd_pipelined` is the plain one-instruction-stream forward, `fwd_ws` the FlashAttention-3
structure, `bwd` the backward (dK/dV and dQ kernels; `preprocess` writes their delta and lse2),
`bwd_fused` the backward with dQ fused into the dK/dV program (ATTNCC_GLUON_BWD=fused), `bwd_ws`
the same warp-specialized (producer and dQ writer warps, two consumer warpgroups; ATTNCC_GLUON_BWD=ws);
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
# (attncc.runtime.backend): the Gluon forward where the spec's Plan has it picked
# (SpecInfo.gluon_auto, attncc.analysis.builtin.GluonFit.auto) and the head dim is one of
# AUTO_HEAD_DIMS. On: the Gluon paths passed tests/gpu/test_gpu_gluon.py and test_gpu_gluon_specs.py
# on an H100 (2026-12-05: 270 tests, bf16 and fp16, every spec with a Gluon forward), where its
# forward took 0.84-0.96x the tl forward's time at head dims 128 and 256 (dense, causal, GQA, the
# single-segment rendered walks) and 1.01x at 64 (docs/gluon.md "Which forward auto picks").
AUTO_SELECTS_GLUON = True
AUTO_HEAD_DIMS = (128, 256)
# ... and only for calls of at least this many (batch x query head x query x key) pairs: below it a
# call is bound by the host, where the Gluon forward's launch (tensor descriptors, Triton's
# specialization of its ~30 arguments) costs more than the tl forward's (H100, 2026-12-05, causal
# B=2 H=16 N=1024 = 2**25 pairs: host 320 vs 64 us per forward; `python -m bench host`) and its
# GPU time gains little (~20 us of kernel at N = 1024). 2**28: causal B=2 H=16 from N = 4096.
AUTO_MIN_PAIRS = 2 ** 28

# The same for the Gluon backward (attncc.runtime.backend: a generated module's `_backward`), for every
# Plan whatever it is. False: with two-warpgroup programs it took 0.98-1.09x the tl backward's time
# (split) and 1.03-1.09x (fused) on an H100 (2026-12-05).
AUTO_SELECTS_GLUON_BACKWARD = False
# ... but auto takes it where the Plan picks it (SpecInfo.gluon_backward_auto,
# attncc.analysis.builtin.GluonFit.backward_auto: the built-in walks and single-segment rendered ones,
# measured 0.85-0.98x the tl backward's f+b time with split's one-warpgroup tiles of session 24; the ws
# kernel, the default method since session 28, 0.79-0.92x on every walk measured) at these head dims, for calls
# of at least AUTO_MIN_PAIRS pairs (D = 64: causal 8K split 5.331 ms against tl's 5.519; ws 4.940 / 5.356).
AUTO_BWD_HEAD_DIMS = (64, 128)
