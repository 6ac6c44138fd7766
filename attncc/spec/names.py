"""Which names a spec may give its module, params and inputs, and why the others are refused.

One place for every reserved name; ``load.py`` checks against these, and tests check them against
the generated functions' signatures and the analysis' loop-bound symbols.
"""
from __future__ import annotations

import sys

MAX_NAME_LENGTH = 64  # module, param and input names

# The keyword arguments of the generated functions (templates/*.j2). A param or input of one of
# these names could not be passed: attention(q, k, v, k=3) is a TypeError.
ATTENTION_KEYWORDS = ("q", "k", "v", "return_lse", "q_offset", "k_offset", "n_q", "n_k", "scale",
                      "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
DROPOUT_KEYWORDS = ("dropout_p", "seed", "training")  # attention() of a spec with dropout takes these too
# attncc.reference takes its keep mask as keep_mask= (and its probability as dropout_p=): a spec with
# dropout cannot name a param or input so, or its keep mask could not be given
REFERENCE_DROPOUT_KEYWORDS = ("keep_mask",)
DECODE_KEYWORDS = ("q", "k_cache", "v_cache", "kv_len", "block_table", "return_lse", "scale")
# A param or input named `scale` takes the scale= keyword (attncc.runtime.call.scale_keyword), as in
# attncc.reference; an input `kv_len` with dims ["b"] is decode()'s kv_len (the cache lengths).
CALL_KEYWORD_EXCEPTIONS = ("scale",)
DECODE_KV_LEN = "kv_len"

# The symbols of the loop bounds (attncc.analysis.symbols.BOUND_SYMBOLS): a param of one of these
# names would be the bound itself in the key-range expressions.
LOOP_BOUND_NAMES = ("q_lo", "q_hi", "BLOCK_M", "BLOCK_N", "k_offset", "N_K")

# generated/<name>.py must not shadow a module that it, attncc or the user's program imports
# (a script run from generated/, or generated/ on sys.path, would import it instead).
# The packages `import torch, triton, attncc` and the compiler load count too (sympy imports mpmath, jinja2
# markupsafe, torch typing_extensions, torchgen, filelock, fsspec and tqdm): shadowing one breaks those imports
# (tests/test_probe_spec22.py lists them from a process that compiles and runs a spec). So do the modules the
# interpreter itself imports at startup from sys.path (site's sitecustomize and usercustomize): with
# generated/ on PYTHONPATH every Python process would run the module, importing torch.
SHADOWED_MODULES = frozenset(sys.stdlib_module_names) | {
    "torch", "triton", "attncc", "generated", "numpy", "sympy", "jinja2", "networkx", "pytest",
    "mpmath", "markupsafe", "typing_extensions", "torchgen", "filelock", "fsspec", "tqdm",
    "sitecustomize", "usercustomize"}

# Windows opens these device names whatever their case and extension (con.py is the console): a
# generated/<name>.py of one cannot be written or imported there.
WINDOWS_DEVICE_NAMES = frozenset({"con", "prn", "aux", "nul"} | {f"{d}{k}" for d in ("com", "lpt") for k in range(1, 10)})


def call_keyword(name: str) -> str | None:
    """The generated function whose keyword ``name`` is (never one of the exceptions), or None."""
    if name in CALL_KEYWORD_EXCEPTIONS:
        return None
    if name in ATTENTION_KEYWORDS:
        return "attention()"
    if name in DECODE_KEYWORDS:
        return "decode()"
    return None
