"""The index symbols every expression is written over."""
import sympy

b = sympy.Symbol("b", integer=True, nonnegative=True)  # batch row
h = sympy.Symbol("h", integer=True, nonnegative=True)  # query head
i = sympy.Symbol("i", integer=True, nonnegative=True)  # query position (global)
j = sympy.Symbol("j", integer=True, nonnegative=True)  # key position (global)
n_q = sympy.Symbol("n_q", integer=True, positive=True)  # query sequence length of this call
n_k = sympy.Symbol("n_k", integer=True, positive=True)  # key sequence length of this call
n_heads = sympy.Symbol("n_heads", integer=True, positive=True)  # query head count (ALiBi's slope rule)
s = sympy.Symbol("s", real=True)  # the score, in [score].mod only

INDEX_VARS = {"b": b, "h": h, "i": i, "j": j, "n_q": n_q, "n_k": n_k}
ALIASES = {"q_idx": "i", "kv_idx": "j", "score": "s"}
