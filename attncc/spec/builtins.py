"""Built-ins of the expression language as sympy functions.

They stay opaque nodes in the sympy trees (the analysis knows what they mean;
codegen renders them), with numeric evaluation from :mod:`attncc.runtime.semantics`.
"""
from __future__ import annotations

import sympy
from sympy.logic.boolalg import BooleanFunction

from attncc.runtime import semantics


class Bucket(sympy.Function):
    """T5 relative position bucket: ``Bucket(d, num_buckets, max_distance, bidirectional)``
    with ``d = j - i``; bidirectional is 1 or 0."""

    is_integer = True
    nargs = 4

    @classmethod
    def eval(cls, d, num_buckets, max_distance, bidirectional):
        if all(a.is_Integer for a in (d, num_buckets, max_distance, bidirectional)):
            return sympy.Integer(semantics.t5_bucket(int(d), int(num_buckets), int(max_distance), bool(bidirectional)))
        return None

    @property
    def options(self):
        _, nb, md, bd = self.args
        return int(nb), int(md), bool(bd)


class AlibiSlope(sympy.Function):
    """ALiBi slope of query head ``h`` among ``n_heads`` heads: ``AlibiSlope(h, n_heads)``."""

    is_real = True
    is_positive = True
    nargs = 2

    @classmethod
    def eval(cls, h, n_heads):
        if h.is_Integer and n_heads.is_Integer:
            return sympy.Float(semantics.alibi_slope(int(h), int(n_heads)))
        return None


class Sigmoid(sympy.Function):
    """The logistic function; derivative sigmoid(x) * (1 - sigmoid(x))."""

    is_real = True
    nargs = 1

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * (1 - Sigmoid(x))

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sympy.exp(-x))

    def _eval_evalf(self, prec):
        # numeric when its argument is: makes sigmoid(0.5) comparable (min, max, where)
        if self.args[0].is_number:
            return self._eval_rewrite_as_exp(self.args[0])._eval_evalf(prec)
        return None


class RandomBlocks(BooleanFunction):
    """BigBird random blocks: true when key block ``j // block`` is one of the ``r``
    seeded random key blocks of query block ``i // block`` (out of ``ceil(n_k / block)``).
    Args: ``(i, j, n_k, r, block, seed)``."""

    nargs = 6

    @classmethod
    def eval(cls, i, j, n_k, r, block, seed):
        if all(a.is_Integer for a in (i, j, n_k, r, block, seed)):
            nkb = -(-int(n_k) // int(block))
            chosen = semantics.random_block_set(int(i) // int(block), nkb, int(r), int(seed))
            return sympy.true if int(j) // int(block) in chosen else sympy.false
        return None

    @property
    def options(self):
        _, _, _, r, block, seed = self.args
        return int(r), int(block), int(seed)

    def _eval_simplify(self, **kwargs):
        return self

    def to_nnf(self, simplify=True):
        return self

    def to_anf(self, deep=True):
        return self
