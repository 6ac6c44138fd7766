"""The Pattern IR evaluated node by node on arrays: one evaluator, two array backends.

:class:`Evaluator` walks a sympy tree of the Pattern IR (a mask, a bias, a mod) and computes it on
arrays that broadcast, with the semantics of docs/spec-language.md: int64 for integers, float64
for reals, bool for conditions; Python's ``//`` and ``%`` (floor division, the sign of the divisor)
for integers and floats alike, never a float division for an integer one; float arithmetic in the
order and grouping written. Every IR node is evaluated here and only here. The arrays come from a
backend, which supplies the few operations that the array libraries spell differently:

- :class:`TorchArrays`: torch tensors on one device, for the float64 reference
  (:func:`attncc._reference.evaluate`);
- :data:`NUMPY`: numpy arrays, for ``attncc explain``'s allowed pairs per tile
  (:mod:`attncc.pair_counts`), which must not import torch. What numpy may round otherwise than
  torch (``exp``, ``sin``, ``sigmoid``, a power but the correctly rounded ones) it refuses with
  :class:`NotExact`: the caller takes the reference.

The two agree bit for bit on every operation they both do (tests/test_evaluator.py). Errors are
the reference's: ``ValueError`` for a value the language refuses (a divisor 0 of params and sizes,
a number where a condition belongs), ``ZeroDivisionError`` for an
integer division by 0 that varies per pair, ``NotImplementedError`` for a node it cannot evaluate.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Mapping

import numpy as np
import sympy
from sympy.core.function import AppliedUndef

from attncc.core import semantics
from attncc.core.lazy import lazy_module
from attncc.spec import symbols as S
from attncc.spec.expr import integer_comparison, spec_text
from attncc.spec.signs import nonzero, per_pair, signs_of
from attncc.spec.builtins import (SHIFT_LIMIT, AlibiSlope, BitAnd, BitOr, BitXor, Bucket, FloatDiv, RandomBlocks, Shift,
                                  Sigmoid, ToFloat, divides, quotient)

torch = lazy_module("torch")  # on first use: explain's pair counts never import it

INT, FLOAT, BOOL = "int", "float", "bool"  # the three kinds of value: int64, float64, bool arrays

# float functions of one argument, by the name both backends know them by
_UNARY = {sympy.exp: "exp", sympy.log: "log", sympy.sin: "sin", sympy.cos: "cos", sympy.tan: "tan",
          sympy.tanh: "tanh", sympy.erf: "erf", Sigmoid: "sigmoid"}
_RELATIONS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
              "!=": operator.ne}
_BITWISE = {BitAnd: operator.and_, BitOr: operator.or_, BitXor: operator.xor}  # int64 two's complement:
# Python's for every int64


class NotExact(NotImplementedError):
    """The backend may round this operation otherwise than the reference's (torch): take the reference."""


# ---------------------------------------------------------------------------------------------
# backends: what torch and numpy spell differently. Both take Python's operators for + - * /,
# comparisons, & | ^ ~ (logical on bool, bitwise on int64), << >> and abs().
# ---------------------------------------------------------------------------------------------

class TorchArrays:
    """torch tensors on ``device``; every operation of the language."""

    def __init__(self, device):
        self.device = device
        self.dtypes = {INT: torch.int64, FLOAT: torch.float64, BOOL: torch.bool}

    def is_array(self, v) -> bool:
        return isinstance(v, torch.Tensor)

    def asarray(self, v):
        return v.to(self.device)

    def const(self, value, kind):
        return torch.tensor(value, dtype=self.dtypes[kind], device=self.device)

    def zeros(self, shape, kind):
        return torch.zeros(shape, dtype=self.dtypes[kind], device=self.device)

    @staticmethod
    def kind(x) -> str:
        return FLOAT if x.is_floating_point() else BOOL if x.dtype == torch.bool else INT

    def cast(self, x, kind):
        return x.to(self.dtypes[kind])

    @staticmethod
    def size(x) -> int:
        return x.numel()

    @staticmethod
    def where(c, a, b):
        return torch.where(c, a, b)

    @staticmethod
    def minimum(a, b):
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        return torch.maximum(a, b)

    @staticmethod
    def extreme(args, largest: bool):
        """min / max of 3+ arrays with torch.amax's gradient at ties (shared evenly by the tied ones)."""
        stacked = torch.stack(torch.broadcast_tensors(*args))
        return stacked.amax(0) if largest else stacked.amin(0)

    @staticmethod
    def floor_divide(n, d):
        return torch.div(n, d, rounding_mode="floor")

    @staticmethod
    def remainder(a, m):
        if not a.is_floating_point():
            return torch.remainder(a, m)
        # Python's float %, which numpy's is (CPython's algorithm, on an exact fmod). torch's is not:
        # its vectorized fmod gives NaN once the quotient passes ~1e300 (1e300 % 0.1, x % 5e-324),
        # and an exact multiple keeps the dividend's sign (-4.0 % 2.0 is -0.0; Python's 0.0).
        return _by_numpy(np.remainder, torch.remainder, a, m)

    @staticmethod
    def broadcast(*xs):
        return torch.broadcast_tensors(*xs)

    @staticmethod
    def unique(x):
        """(the distinct values, as a list; for each entry of ``x``, the index of its value)."""
        values, inverse = torch.unique(x, return_inverse=True)
        return values.tolist(), inverse.reshape(x.shape)

    @staticmethod
    def sqrt(x):
        # correctly rounded, as the language's (numpy's is; torch's CPU kernel for float64 is not
        # always: sqrt(51.0) is 7.1414284285428495, one ulp above the square root's rounding)
        return _by_numpy(np.sqrt, torch.sqrt, x)

    @staticmethod
    def function(name, x):
        return getattr(torch, name)(x)

    @staticmethod
    def power(x, y):
        return torch.pow(x, y)

    @staticmethod
    def tracks_gradients() -> bool:
        return torch.is_grad_enabled()

    @staticmethod
    def gradient_only_where(x, live):
        """``x``, through which autograd passes a gradient only where ``live`` holds: elsewhere its
        value is used as it is, but a derivative of it there (inf or NaN at a branch that is not
        taken, ``sqrt(s)`` at s < 0) never meets the zero gradient it gets (0 * inf is NaN)."""
        if live is None or not x.requires_grad:
            return x
        return torch.where(live, x, x.detach())


def _by_numpy(np_op, torch_op, *xs):
    """``torch_op(*xs)`` with numpy's exact value: through numpy on the CPU, unless a gradient
    flows through it (a score of an input with ``grad = true``: torch's op, to differentiate;
    the score is compared with a tolerance, not bit for bit)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return torch_op(*xs)
    xs = torch.broadcast_tensors(*xs)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN and inf are the values (sqrt(-1)), as torch's
        return torch.from_numpy(np.asarray(np_op(*[x.cpu().numpy() for x in xs]))).to(xs[0].device)


class NumpyArrays:
    """numpy arrays; refuses (:class:`NotExact`) what numpy may round otherwise than torch."""

    dtypes = {INT: np.dtype(np.int64), FLOAT: np.dtype(np.float64), BOOL: np.dtype(np.bool_)}

    @staticmethod
    def is_array(v) -> bool:
        return isinstance(v, (np.ndarray, np.generic))

    @staticmethod
    def asarray(v):
        return np.asarray(v)

    def const(self, value, kind):
        return np.asarray(value, dtype=self.dtypes[kind])

    def zeros(self, shape, kind):
        return np.zeros(shape, dtype=self.dtypes[kind])

    @staticmethod
    def kind(x) -> str:
        return FLOAT if x.dtype.kind == "f" else BOOL if x.dtype.kind == "b" else INT

    def cast(self, x, kind):
        return x.astype(self.dtypes[kind], copy=False)

    @staticmethod
    def size(x) -> int:
        return int(np.size(x))

    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    floor_divide = staticmethod(np.floor_divide)  # Python's, for floats too (1 // 0.1 is 9.0, as torch's)
    remainder = staticmethod(np.remainder)  # Python's, for floats too
    broadcast = staticmethod(np.broadcast_arrays)
    sqrt = staticmethod(np.sqrt)  # correctly rounded, as torch's

    @staticmethod
    def extreme(args, largest: bool):
        stacked = np.stack(np.broadcast_arrays(*args))
        return stacked.max(0) if largest else stacked.min(0)

    @staticmethod
    def unique(x):
        values, inverse = np.unique(x, return_inverse=True)
        return values.tolist(), inverse.reshape(np.shape(x))

    @staticmethod
    def function(name, x):
        raise NotExact(f"{name}() may round otherwise in numpy than in torch")

    @staticmethod
    def power(x, y):
        raise NotExact("a power numpy may round otherwise than torch")

    @staticmethod
    def tracks_gradients() -> bool:
        return False


NUMPY = NumpyArrays()


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------

def zero_divisor(divisor, e, env: Mapping[str, Any] = None) -> None:
    """An integer ``//`` or ``%`` by 0 (docs/spec-language.md, "Division"): a divisor of params and
    sizes only is a ValueError naming the expression as written and the values, as the generated
    modules raise before a launch; one that varies per pair (which ``attncc build`` refuses unless
    it cannot be 0) raises ZeroDivisionError, as Python."""
    if per_pair(divisor):
        raise ZeroDivisionError(f"integer division by zero in {spec_text(e)}")
    values = {s.name: _one_value((env or {}).get(s.name)) for s in divisor.free_symbols}
    named = ", ".join(f"{n} = {v}" for n, v in sorted(values.items()) if v is not None)
    raise ValueError(f"division by zero: the divisor of {spec_text(e)} is 0"
                     + (f" with {named}" if named else " with these params and sizes"))


def _one_value(x):
    """A param's or size's value for a message: a number, or None for what is not one value (the
    per-sequence lengths of a packed call)."""
    if isinstance(x, (int, float)):
        return x
    if hasattr(x, "numel") and x.numel() == 1 or isinstance(x, (np.ndarray, np.generic)) and x.size == 1:
        return x.reshape(-1)[0].item()
    return None


class Evaluator:
    """A Pattern expression on the arrays of ``arrays`` (a backend above). ``env`` maps symbol
    names (``b``, ``h``, ``i``, ``j``, ``n_q``, ``n_k``, ``n_heads``, ``s``, params) to arrays
    that broadcast or Python numbers, and input names to the input arrays."""

    def __init__(self, arrays, env: Mapping[str, Any], live=None):
        self.arrays = arrays
        self.env = env
        # Where the value being computed reaches the result (a bool array, None: everywhere): the
        # pairs that a gradient may reach through it. A branch of a where() that is not taken, or a
        # pair the mask removes (the reference's ``live``), passes none to s and to the inputs,
        # whatever the derivative there: torch's own where() and maximum() select so, and so do the
        # kernels (attncc.analysis.derivative, and dS of a pair with P = 0).
        self.live = live
        # Where the integer divisions being computed count (a bool array, None: everywhere): a
        # conjunct that divides is computed where the other conjuncts hold (:meth:`conjunction`).
        self.guard = None
        # what the guard's conjuncts say of the signs of params (attncc.spec.signs.signs_of)
        self.guard_signs = {}

    # --- kinds ---

    def is_int(self, x) -> bool:
        return self.arrays.kind(x) == INT

    def common(self, *xs):
        """One kind for all: float if any is, else int if any is not bool (a bool counts as 0 or 1)."""
        kinds = {self.arrays.kind(x) for x in xs}
        kind = FLOAT if FLOAT in kinds else INT if INT in kinds else BOOL
        return [self.arrays.cast(x, kind) for x in xs]

    def numbers(self, *xs):
        """:meth:`common` for arithmetic: conditions alone count as the ints 0 and 1 too."""
        out = self.common(*xs)
        return [self.arrays.cast(x, INT) for x in out] if self.arrays.kind(out[0]) == BOOL else out

    def float_(self, e):
        return self.arrays.cast(self(e), FLOAT)

    def bool_(self, e):
        x = self(e)
        if self.arrays.kind(x) != BOOL:
            raise ValueError(f"expected a condition, got a number: {e}")
        return x

    def scalar_int(self, x, what: str) -> int:
        if self.arrays.size(x) != 1 or not self.is_int(x):
            raise ValueError(f"{what} must be a single integer, got {x!r}")
        return int(x.reshape(()))

    def integers(self, e, args=None):
        """The operands ``args`` (default: all) of an integer operator ``e``, as int64 arrays (broadcast)."""
        args = e.args if args is None else args
        values = [self(a) for a in args]
        for a, x in zip(args, values):
            if not self.is_int(x):
                raise ValueError(f"{type(e).__name__} takes integers, got {self.arrays.kind(x)}: {a}")
        return self.arrays.broadcast(*[self.arrays.cast(x, INT) for x in values])

    def lookup(self, x, fn, kind):
        """``fn`` of every entry of an integer array, through a table over its distinct values."""
        values, inverse = self.arrays.unique(x)
        return self.arrays.const([fn(int(v)) for v in values], kind)[inverse]

    # --- the nodes ---

    def __call__(self, e):  # noqa: C901 - one flat dispatch reads best here
        ar = self.arrays
        if e is sympy.true or e is sympy.false:
            return ar.const(bool(e), BOOL)
        if e.is_Integer:
            return ar.const(int(e), INT)
        if e.is_Rational:
            return ar.const(int(e.p) / int(e.q), FLOAT)  # Python's int / int is correctly rounded
        if e.is_Float:
            return ar.const(float(e), FLOAT)
        if e in (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            return ar.const(float(e) if e is not sympy.zoo else math.inf, FLOAT)
        if e.is_Symbol:
            return self.value(e.name)
        if isinstance(e, AppliedUndef):
            return self.input(e)
        if isinstance(e, Bucket):
            d = self(e.args[0])
            if not self.is_int(d):
                raise ValueError(f"bucket() needs an integer distance, got {ar.kind(d)}: {e}")
            nb, md, bidir = e.options
            return self.lookup(d, lambda v: semantics.t5_bucket(v, nb, md, bidir), INT)
        if isinstance(e, AlibiSlope):
            hh, nh = self(e.args[0]), self.scalar_int(self(e.args[1]), "n_heads")
            if not self.is_int(hh):
                raise ValueError(f"alibi_slope() needs an integer head, got {ar.kind(hh)}: {e}")
            return self.lookup(hh, lambda v: semantics.alibi_slope(v, nh), FLOAT)
        if isinstance(e, RandomBlocks):
            return self.random_blocks(e)
        if isinstance(e, ToFloat):  # its own arithmetic (exact in integers), then one conversion
            return self.float_(e.args[0])
        if isinstance(e, FloatDiv):
            return self.float_(e.args[0]) / self.float_(e.args[1])
        if type(e) in _UNARY and len(e.args) == 1:
            return ar.function(_UNARY[type(e)], self.float_(e.args[0]))
        if isinstance(e, tuple(_BITWISE)):
            return _BITWISE[type(e)](*self.integers(e))
        if isinstance(e, Shift):  # floor(x * 2**n), n clamped to [-SHIFT_LIMIT, SHIFT_LIMIT]
            x, n = self.integers(e)
            n = ar.minimum(ar.maximum(n, ar.const(-SHIFT_LIMIT, INT)), ar.const(SHIFT_LIMIT, INT))
            zero = ar.const(0, INT)
            return ar.where(n >= 0, x << ar.maximum(n, zero), x >> ar.maximum(-n, zero))
        if e.is_Add:
            terms = self.numbers(*[self(a) for a in e.args])
            out = terms[0]
            for t in terms[1:]:
                out = out + t
            return out
        if e.is_Mul:
            num, den = sympy.fraction(e)
            if den != 1:
                # a/c as one division, not a * (1/c): 49 * (1/49) is not 1.0 in float64.
                return self.float_(num) / self.float_(den)
            factors = self.numbers(*[self(a) for a in e.args])
            out = factors[0]
            for f in factors[1:]:
                out = out * f
            return out
        if e.is_Pow:
            return self.power(e)
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = quotient(e.args[0])
            n, d = self.numbers(self(num), self(den))
            d = self.divisor(d, den, e)
            # Python's // of ints, and of floats (the floor of the exact quotient: 1 // 0.1 is 9.0)
            return -ar.floor_divide(-n, d) if isinstance(e, sympy.ceiling) else ar.floor_divide(n, d)
        if isinstance(e, sympy.Mod):
            a, m = self.numbers(self(e.args[0]), self(e.args[1]))
            m = self.divisor(m, e.args[1], e)
            return ar.remainder(a, m)
        if isinstance(e, sympy.Abs):
            return abs(self.numbers(self(e.args[0]))[0])
        if isinstance(e, (sympy.Min, sympy.Max)):
            args = self.common(*[self(a) for a in e.args])
            if len(args) > 2:  # ties share the gradient evenly, as the kernels' (analysis.derivative)
                return ar.extreme(args, isinstance(e, sympy.Max))
            return (ar.minimum if isinstance(e, sympy.Min) else ar.maximum)(*args)
        if isinstance(e, sympy.Piecewise):
            conds = [None if cond is sympy.true else self.bool_(cond) for _, cond in e.args]
            out = None
            for (value, _), cond, live in reversed(list(zip(e.args, conds, self.branches(conds)))):
                v = self.under(live, value)
                if out is None:
                    out = v if cond is None else ar.where(cond, *self.common(v, ar.const(math.nan, FLOAT)))
                else:
                    out = ar.where(cond, *self.common(v, out))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            e = integer_comparison(e)
            if not isinstance(e, sympy.core.relational.Relational):  # settled once in integers
                return self(e)
            a, c = self.common(self(e.lhs), self(e.rhs))
            return _RELATIONS[e.rel_op](a, c)
        if isinstance(e, sympy.And):
            return self.conjunction(e.args)
        if isinstance(e, sympy.Or):
            return self.fold(operator.or_, e.args)
        if isinstance(e, sympy.Xor):
            return self.fold(operator.xor, e.args)
        if isinstance(e, sympy.Not):
            return ~self.bool_(e.args[0])
        if isinstance(e, sympy.ITE):
            c, a, d = e.args
            return ar.where(self.bool_(c), self.bool_(a), self.bool_(d))
        if e.is_number:  # pi, E, and other constants sympy keeps symbolic
            return ar.const(float(e), FLOAT)
        raise NotImplementedError(f"cannot evaluate {type(e).__name__}: {e}")

    def branches(self, conds):
        """For the conditions of a Piecewise (None: True), where each branch is the one taken,
        within :attr:`live`; all None where no gradient is tracked."""
        if not self.arrays.tracks_gradients():
            return [self.live] * len(conds)
        out, before = [], None
        for c in conds:
            taken = c if before is None else (~before if c is None else c & ~before)
            out.append(taken if self.live is None else taken & self.live)
            if c is not None:
                before = c if before is None else before | c
        return out

    def under(self, live, e):
        """``self(e)`` with :attr:`live` set to ``live`` for it."""
        outer, self.live = self.live, live
        try:
            return self(e)
        finally:
            self.live = outer

    def divisor(self, d, divisor, e):
        """The values ``d`` of ``divisor`` in ``e``: an integer 0 where :attr:`guard` holds raises
        (:func:`zero_divisor`); outside it, where the result does not count, 1 stands for it. A
        divisor of params and sizes only raises wherever it is 0, guard or not, as the generated
        modules check it before a launch (a conjunct such as ``j < w2`` beside ``i // (w - 1)``
        that no pair of this call meets does not excuse ``w = 1``), unless the guard's conjuncts
        keep it nonzero (``w != 0 and i % w == 1``), which the modules do not check either: the
        rule of ``attncc.codegen.bounds``, :func:`attncc.spec.signs.nonzero`."""
        if not self.is_int(d):
            return d
        zero = d == 0
        guarded = self.guard is not None and (per_pair(divisor) or self._kept_nonzero(divisor))
        if bool((zero & self.guard if guarded else zero).any()):
            zero_divisor(divisor, e, self.env)
        return d if self.guard is None else self.arrays.where(zero, self.arrays.const(1, INT), d)

    def _kept_nonzero(self, divisor) -> bool:
        return bool(self.guard_signs) and nonzero(divisor.xreplace(self.guard_signs))

    def conjunction(self, args):
        """``and`` of ``args``, those that divide (``//``, ``%``) computed where the others hold:
        sympy writes a condition on a ``where`` divisor out case by case (``(j - i) % where(d == 0, 3,
        d) == 0`` in a score's where is ``(d == 0 and (j - i) % 3 == 0) or (d != 0 and (j - i) % d ==
        0)``), whose second case divides by ``d`` where the first is taken; Python never did.
        ``attncc.codegen.bounds.check_divisors`` proves the divisors under the same guards."""
        dividing = [a for a in args if divides(a)]
        plain = [a for a in args if not divides(a)]
        if not (dividing and plain):
            return self.fold(operator.and_, args)
        held = self.fold(operator.and_, plain)
        outer, self.guard = self.guard, held if self.guard is None else held & self.guard
        outer_signs = self.guard_signs
        self.guard_signs = {**outer_signs, **{k: v for a in plain for k, v in signs_of(a, True).items()}}
        try:
            return held & self.fold(operator.and_, dividing)
        finally:
            self.guard, self.guard_signs = outer, outer_signs

    def fold(self, op, args):
        out = self.bool_(args[0])
        for a in args[1:]:
            out = op(out, self.bool_(a))
        return out

    def value(self, name):
        if name not in self.env:
            raise ValueError(f"no value for '{name}' (known: {', '.join(sorted(self.env))})")
        v = self.env[name]
        if self.arrays.is_array(v):
            return self.gradient_here(self.arrays.asarray(v))
        if isinstance(v, bool):
            return self.arrays.const(v, BOOL)
        if isinstance(v, int):
            return self.arrays.const(v, INT)
        return self.arrays.const(float(v), FLOAT)

    def power(self, e):
        ar = self.arrays
        base, ex = e.args
        if ex.is_Integer and ex < 0:
            return 1.0 / self.float_(base**-ex)
        x = self.numbers(self(base))[0]
        if self.is_int(x) and ex.is_Integer:
            return x ** int(ex)
        # x ** 2 is x * x and x ** 0.5 is sqrt(x), correctly rounded (torch.pow is not always):
        # a mask comparing them decides exactly (docs/spec-language.md)
        k = float(ex) if ex.is_number and ex.is_real else None
        x = ar.cast(x, FLOAT)
        if k in (1.0, 2.0, 3.0, 4.0):
            out = x
            for _ in range(int(k) - 1):
                out = out * x
            return out
        if k in (0.5, -0.5):
            root = ar.sqrt(x)
            return root if k > 0 else 1.0 / root
        return ar.power(x, self.float_(ex))

    def input(self, e):
        ar = self.arrays
        name = e.func.__name__
        if name not in self.env or not ar.is_array(self.env[name]):
            raise ValueError(f"input '{name}' was not given (an array is needed)")
        t = ar.asarray(self.env[name])
        if t.ndim != len(e.args):
            raise ValueError(f"input '{name}' is indexed with {len(e.args)} indices but has {t.ndim} dims (shape {tuple(t.shape)})")
        idx = [self(a) for a in e.args]
        for k, x in enumerate(idx):
            if not self.is_int(x):
                raise ValueError(f"index {k} of input '{name}' is not an integer ({ar.kind(x)}): {e.args[k]}")
        idx = ar.broadcast(*idx)
        kind = FLOAT if ar.kind(t) == FLOAT else INT  # bool inputs are compared with != 0
        # An index outside the tensor (negative ones included: no wrap-around) reads 0, as the
        # kernels' masked loads do (docs/spec-language.md, [inputs]); such a read passes no gradient.
        inside = None
        for k, x in enumerate(idx):
            ok = (x >= 0) & (x < t.shape[k])
            inside = ok if inside is None else inside & ok
        # (the entries read are cast, not the whole tensor: an expanded table of 2**40 entries is
        # read in place by the kernels, and its float64 copy would not fit in memory)
        if inside is None or bool(inside.all()):
            return self.gradient_here(ar.cast(t[tuple(idx)], kind))
        shape = tuple(inside.shape)
        if not bool(inside.any()):
            return ar.zeros(shape, kind)
        zero = ar.const(0, INT)
        idx = [ar.where(inside, x, zero) for x in idx]  # 0 is in range in every dim (some pair reads inside)
        value = self.gradient_here(ar.cast(t[tuple(idx)], kind))
        return ar.where(inside, value, ar.zeros(shape, kind))

    def gradient_here(self, x):
        """A value of ``s`` or of an input, passing gradients only within :attr:`live`."""
        if self.live is None or not self.arrays.tracks_gradients():
            return x
        return self.arrays.gradient_only_where(x, self.live)

    def random_blocks(self, e):
        """True where key block ``j // block`` is one of the random key blocks of query block
        ``i // block`` (any query block has its set; a key block outside ``[0, ceil(n_k / block))``
        is in none), as :meth:`RandomBlocks.eval` decides constants."""
        ar = self.arrays
        ii, jj = self.integers(e, e.args[:2])
        nk = self.scalar_int(self(e.args[2]), "n_k")
        r, block, seed = e.options
        qb, kb = ar.floor_divide(ii, ar.const(block, INT)), ar.floor_divide(jj, ar.const(block, INT))
        n_kb = -(-nk // block)
        rows, row_of = ar.unique(qb)
        table = ar.zeros((max(len(rows), 1), n_kb + 1), BOOL)  # column n_kb: the key blocks of none
        for q, row in enumerate(rows):
            chosen = semantics.random_block_set(row, n_kb, r, seed)
            if chosen:
                table[q, list(chosen)] = True
        kb = ar.where((kb < 0) | (kb >= n_kb), ar.const(n_kb, INT), kb)
        return table[row_of, kb]
