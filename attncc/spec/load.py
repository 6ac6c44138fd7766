"""Read a TOML spec, validate every key, and build the Pattern."""
from __future__ import annotations

import hashlib
import keyword
import math
import tomllib
from pathlib import Path
from typing import Any, Dict

import sympy

from attncc.core.semantics import (FLOAT32_MAX, FLOAT32_TINY, INT_LIMIT, INT_PARAM_MIN, MAX_HEAD_DIM, MAX_SPEC_BYTES,
                                    MAX_TOML_NESTING, float32_holds)
from attncc.spec import names as N
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
from attncc.spec.errors import SpecError
from attncc.spec.expr import BOOL, FUNCTIONS, Scope, parse_expression, score_algebra
from attncc.spec.ir import TAYLOR_MAX_HEAD_DIM, FeatureMap, InputDecl, Param, Pattern, Rope

TOP_KEYS = ("name", "kind", "head_dim", "value_dim", "dtypes", "heads", "params", "inputs",
            "mask", "score", "rope", "feature_map", "description")
DTYPES = ("bfloat16", "float16", "float32")
INPUT_DTYPES = ("int32", "int64", "int16", "int8", "uint8", "bool", "float16", "bfloat16", "float32", "float64")
FEATURE_MAPS = ("elu+1", "relu", "identity", "performer", "cosformer", "taylor")
DROPOUT_KEYWORDS = set(N.DROPOUT_KEYWORDS)
RESERVED = set(S.INDEX_VARS) | set(S.ALIASES) | {"s", "inf", "causal", "alibi", "n_heads"} | set(FUNCTIONS)
# Integer params reach the kernels as int32 or int64; a spec's value takes the bounds a call's
# override does (core.semantics.param_value: from -2**31 to 2**62 - 1, so that the kernels' int64
# sums of positions and params never wrap), else a spec whose every call fails would load.
SEED_MAX = 2**63 - 1
MAX_HEADS = 2**16
MAX_FEATURES = 2**16  # performer's random features


class _Checker:
    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, message: str):
        raise SpecError(self.file, key, message)

    def table(self, data: Dict[str, Any], key: str, allowed) -> Dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.fail(f"[{key}]", f"expected a table, got {_kind(value)} {value!r}")
        for k in value if allowed is not None else ():  # None: any key (params, inputs)
            if k not in allowed:
                self.fail(f"[{key}].{k}", f"unknown key (expected one of: {', '.join(allowed)})")
        return value

    def int_(self, value, key, minimum=None):
        if type(value) is not int:
            self.fail(key, f"expected an integer, got {_kind(value)} {value!r}")
        if minimum is not None and value < minimum:
            self.fail(key, f"expected an integer >= {minimum}, got {value}")
        return value

    def number(self, value, key, positive=False, float32=False):
        """A finite number; ``float32``: one the kernels can hold in float32 (positive ones as a
        normal number: a scale of 1e-40 would be 0 there)."""
        if type(value) not in (int, float):
            self.fail(key, f"expected a number, got {_kind(value)} {value!r}")
        if not math.isfinite(value):
            self.fail(key, f"expected a finite number, got {value}")
        if positive and not value > 0:
            self.fail(key, f"expected a positive number, got {value}")
        if float32 and not float32_holds(value):
            self.fail(key, f"expected a number in float32's range ({FLOAT32_TINY:.6g} to {FLOAT32_MAX:.6g} in "
                           f"magnitude), got {value}")
        return float(value)

    def bool_(self, value, key):
        if type(value) is not bool:
            self.fail(key, f"expected true or false, got {_kind(value)} {value!r}")
        return value

    def choice(self, value, key, options):
        if value not in options:
            self.fail(key, f"expected one of {', '.join(map(repr, options))}, got {value!r}")
        return value

    def identifier(self, value, key):
        """An ASCII Python identifier (Python reads others after NFKC normalization: two names
        could become one) of at most N.MAX_NAME_LENGTH characters."""
        if not isinstance(value, str) or not (value.isascii() and value.isidentifier()):
            self.fail(key, f"expected a Python identifier (ASCII letters, digits, _), got {_short(value)}")
        if keyword.iskeyword(value):
            self.fail(key, f"expected a Python identifier that is not a keyword of Python, got {value!r}")
        if len(value) > N.MAX_NAME_LENGTH:
            self.fail(key, f"names are at most {N.MAX_NAME_LENGTH} characters, got {len(value)}: {_short(value)}")
        return value

    def module_name(self, value, key):
        """The generated module's name: an identifier that shadows no module and is not private."""
        self.identifier(value, key)
        if value.startswith("_"):
            self.fail(key, f"the module name may not start with '_', got {value!r}")
        if value in N.SHADOWED_MODULES:
            self.fail(key, f"{value!r} is the name of a Python or attncc module; generated/{value}.py would shadow "
                           f"it (choose another name)")
        if value.lower() in N.WINDOWS_DEVICE_NAMES:
            self.fail(key, f"{value!r} is a device name on Windows, where generated/{value}.py cannot be a file "
                           f"(choose another name)")
        return value

    def variable(self, value, key, what):
        """A param or input name: an identifier that is no built-in, loop bound or call keyword."""
        self.identifier(value, key)
        if value in RESERVED:
            self.fail(key, f"'{value}' is a built-in name and cannot be {what}")
        if value in N.LOOP_BOUND_NAMES:
            self.fail(key, f"'{value}' is the name of a loop-bound symbol of the kernels and cannot be {what}")
        fn = N.call_keyword(value)
        if fn is not None:
            self.fail(key, f"'{value}' is a keyword argument of the generated {fn}: {what} of that name "
                           f"could not be passed (rename it)")
        return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _nesting(value) -> int:
    """How deeply tables and arrays nest in parsed TOML (iterative: any depth is safe)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(v, dict):
            todo.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, depth + 1) for x in v)
    return deepest


def parse_spec(text: str, path: str = "<string>") -> Pattern:
    """Parse the text of a TOML spec into a Pattern; ``path`` names it in errors."""
    c = _Checker(path)
    if text.startswith("\ufeff"):  # tomllib's error would be "Invalid statement (at line 1, column 1)"
        raise SpecError(path, "", "not valid TOML: the text starts with a byte order mark (U+FEFF), which TOML does "
                                  "not allow (save the file as UTF-8 without BOM)")
    surrogate = _first_surrogate(text)
    if surrogate is not None:  # a str given to attncc.compile; a file's bytes decode to none (decode_spec)
        raise SpecError(path, "", f"not UTF-8 text: a lone surrogate U+{ord(text[surrogate]):04X} at offset {surrogate} "
                                  f"(TOML text is Unicode that UTF-8 can encode)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(path, "", f"not valid TOML: {e}") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int() limit)
        raise SpecError(path, "", f"not valid TOML here: {e}") from None
    except RecursionError:
        raise SpecError(path, "", "not valid TOML here: arrays or tables nested too deeply") from None
    if _nesting(data) > MAX_TOML_NESTING:  # not left to the recursion limit, which a host program may raise
        raise SpecError(path, "", f"not valid TOML here: arrays or tables nested too deeply "
                                  f"(more than {MAX_TOML_NESTING} levels)")
    for k in data:
        if k not in TOP_KEYS:
            c.fail(k, f"unknown key (expected one of: {', '.join(TOP_KEYS)})")

    stem = Path(path).stem if path != "<string>" else "pattern"
    if "name" in data:
        name = c.module_name(data["name"], "name")
    else:  # the file's name is the module's: say so when it cannot be one
        try:
            name = c.module_name(stem, "name")
        except SpecError as e:
            raise SpecError(path, "name", f"the spec has no name key, so its file name is the module's name: "
                                          f"{e.reason} (rename the file or give the spec a name = \"...\")") from None
    if "description" in data and not isinstance(data["description"], str):
        c.fail("description", f"expected a string, got {_kind(data['description'])} {_short(data['description'])}")
    kind = c.choice(data.get("kind", "softmax"), "kind", ("softmax", "linear"))

    hd = data.get("head_dim", 128)
    head_dims = tuple(hd) if isinstance(hd, list) else (hd,)
    if not head_dims:
        c.fail("head_dim", "expected an integer or a non-empty list of integers, got an empty list")
    for d in head_dims:
        if type(d) is not int:
            c.fail("head_dim", f"expected an integer or a list of integers, got {_kind(d)} {d!r}")
        if not 1 <= d <= MAX_HEAD_DIM:
            c.fail("head_dim", f"expected head dims between 1 and {MAX_HEAD_DIM} (the kernels' limit, which calls "
                               f"share: D and Dv up to {MAX_HEAD_DIM}), got {d}")
    if len(set(head_dims)) < len(head_dims):
        c.fail("head_dim", f"expected each head dim once, got {list(head_dims)}")
    value_dim = data.get("value_dim")
    if value_dim is not None:
        c.int_(value_dim, "value_dim", 1)
        if value_dim > MAX_HEAD_DIM:
            c.fail("value_dim", f"expected a value dim between 1 and {MAX_HEAD_DIM} (the kernels' limit, which calls "
                                f"share: D and Dv up to {MAX_HEAD_DIM}), got {value_dim}")

    dts = data.get("dtypes", list(DTYPES[:2]))
    dts = [dts] if isinstance(dts, str) else dts
    if not isinstance(dts, list) or not dts:
        c.fail("dtypes", f"expected a non-empty list of dtype names, got {dts!r}")
    for d in dts:
        c.choice(d, "dtypes", DTYPES)
    if len(set(dts)) < len(dts):
        c.fail("dtypes", f"expected each dtype once, got {dts!r}")

    heads = c.table(data, "heads", ("q", "kv"))
    hq = c.int_(heads["q"], "[heads].q", 1) if "q" in heads else None
    hkv = c.int_(heads["kv"], "[heads].kv", 1) if "kv" in heads else None
    for key, count in (("[heads].q", hq), ("[heads].kv", hkv)):
        if count is not None and count > MAX_HEADS:
            c.fail(key, f"expected at most {MAX_HEADS} heads, got {count}")
    if hq is not None and hkv is not None and hq % hkv:
        c.fail("[heads]", f"q = {hq} is not a multiple of kv = {hkv} (each kv head serves q // kv query heads)")

    if kind == "linear":
        for k in ("params", "inputs"):
            if k in data:
                c.fail(f"[{k}]", "is not allowed in a kind = \"linear\" spec (nothing in it reads params or inputs)")
    params = []
    for pname, value in c.table(data, "params", None).items():
        key = f"[params].{pname}"
        c.variable(pname, key, "a param")
        if type(value) is int:
            if not INT_PARAM_MIN <= value < INT_LIMIT:
                c.fail(key, f"expected an integer from -2**31 to 2**62 - 1 (what a call may pass), got {value}")
            params.append(Param(pname, value, "int"))
        elif type(value) is float:
            params.append(Param(pname, c.number(value, key, float32=True), "float"))
        else:
            c.fail(key, f"expected an integer or a float, got {_kind(value)} {_short(value)}")

    inputs = []
    for iname, decl in c.table(data, "inputs", None).items():
        key = f"[inputs].{iname}"
        if iname != N.DECODE_KV_LEN:  # checked below, with its dims
            c.variable(iname, key, "an input")
        if any(p.name == iname for p in params):
            c.fail(key, f"'{iname}' is already a variable, built-in or param name")
        if not isinstance(decl, dict):
            c.fail(key, f"expected a table like {{ dims = [\"b\", \"n\"], dtype = \"int32\" }}, got {decl!r}")
        for k in decl:
            if k not in ("dims", "dtype", "grad"):
                c.fail(f"{key}.{k}", "unknown key (expected one of: dims, dtype, grad)")
        dims = decl.get("dims")
        if not isinstance(dims, list):  # [] is a 0-d input: a scalar, used by name
            c.fail(f"{key}.dims", f"expected a list of \"b\", \"h\", \"n\" or sizes (or [] for a scalar), got {dims!r}")
        for d in dims:
            if not (d in ("b", "h", "n") or (type(d) is int and d > 0)):
                c.fail(f"{key}.dims", f"each dim is \"b\" (batch), \"h\" (query head), \"n\" (position) or a positive size; got {d!r}")
        dtype = c.choice(decl.get("dtype", "float32"), f"{key}.dtype", INPUT_DTYPES)
        grad = c.bool_(decl.get("grad", False), f"{key}.grad")
        if grad and not dtype.startswith(("float", "bfloat")):
            c.fail(f"{key}.grad", f"only floating inputs can have gradients; dtype is {dtype}")
        if iname == N.DECODE_KV_LEN and not (dims == ["b"] and dtype.startswith(("int", "uint"))):
            c.fail(key, f"an input named {iname} is decode()'s kv_len (the valid cache entries of each row): "
                        f"it needs dims = [\"b\"] and an integer dtype, got dims = {dims}, dtype = {dtype!r}")
        inputs.append(InputDecl(iname, tuple(dims), dtype, grad))

    scope = Scope(tuple(params), tuple(inputs))
    fields: Dict[str, Any] = {}
    counts: set = set()  # int params used as reductions' counts (expr.py: range(K))
    if kind == "linear":
        for k in ("mask", "score", "rope"):
            if k in data:
                c.fail(f"[{k}]", "is not allowed in a kind = \"linear\" spec (use [feature_map].causal for causality)")
        fm = c.table(data, "feature_map", ("name", "features", "causal", "normalize", "seed"))
        fm_name = c.choice(fm.get("name", "elu+1"), "[feature_map].name", FEATURE_MAPS)
        features = fm.get("features")
        if features is not None:
            c.int_(features, "[feature_map].features", 1)
            if features > MAX_FEATURES:
                c.fail("[feature_map].features", f"expected at most {MAX_FEATURES} features, got {features}")
            if fm_name != "performer":
                c.fail("[feature_map].features", f"only the performer map takes a feature count, not {fm_name!r}")
        elif fm_name == "performer":
            features = 256
        if fm_name == "taylor" and max(head_dims) > TAYLOR_MAX_HEAD_DIM:
            c.fail("head_dim", f"the taylor feature map has 1 + D + D^2 features and takes head dims up to "
                               f"{TAYLOR_MAX_HEAD_DIM}, got {list(head_dims)} (set head_dim, e.g. head_dim = 16)")
        fields["feature_map"] = FeatureMap(
            name=fm_name, features=features,
            seed=_seed(c, fm.get("seed", 0), "[feature_map].seed"),
            causal=c.bool_(fm.get("causal", True), "[feature_map].causal"),
            normalize=c.bool_(fm.get("normalize", True), "[feature_map].normalize"))
    else:
        if "feature_map" in data:
            c.fail("[feature_map]", "applies to kind = \"linear\" only; this spec is kind = \"softmax\"")
        mask_t = c.table(data, "mask", ("where",))
        mask = None
        if "where" in mask_t:
            mask, typ = parse_expression(mask_t["where"], scope, path, "[mask].where", counts)
            if typ != BOOL:
                c.fail("[mask].where", f"the mask must be a boolean expression, got a number ({typ})")
        score = c.table(data, "score", ("scale", "bias", "softcap", "mod", "dropout"))
        if "scale" in score:
            fields["scale"] = c.number(score["scale"], "[score].scale", positive=True, float32=True)
        if "softcap" in score:
            fields["softcap"] = c.number(score["softcap"], "[score].softcap", positive=True, float32=True)
        if "dropout" in score:
            p = c.number(score["dropout"], "[score].dropout")
            if not 0.0 <= p < 1.0:
                c.fail("[score].dropout", f"expected a probability in [0, 1), got {p}")
            fields["dropout"] = p
            names = {x.name for x in params} | {d.name for d in inputs}
            clash = sorted(names & DROPOUT_KEYWORDS)
            if p > 0 and clash:
                c.fail("[score].dropout", f"{', '.join(clash)} would shadow the keyword(s) of the same name that a "
                                          f"module with dropout takes ({', '.join(sorted(DROPOUT_KEYWORDS))}); rename")
            clash = sorted(names & set(N.REFERENCE_DROPOUT_KEYWORDS))
            if p > 0 and clash:
                c.fail("[score].dropout", f"{', '.join(clash)} would shadow attncc.reference's keyword of the same "
                                          f"name, its dropout keep mask; rename")
        if "bias" in score:
            bias, typ = parse_expression(score["bias"], scope, path, "[score].bias", counts)
            if typ == BOOL:
                c.fail("[score].bias", "the bias must be a number, got a boolean expression (masks go in [mask].where)")
            fields["bias"] = _score_algebra(c, "[score].bias", bias)
        if "mod" in score:
            mod, typ = parse_expression(score["mod"], Scope(scope.params, scope.inputs, allow_score=True), path,
                                        "[score].mod", counts)
            if typ == BOOL:
                c.fail("[score].mod", "the score transform must be a number, got a boolean expression")
            mod, extra_mask = split_mod_mask(_score_algebra(c, "[score].mod", mod))
            if extra_mask is not None:
                mask = extra_mask if mask is None else sympy.And(mask, extra_mask)
                fields["mod_mask"] = extra_mask
            if mod is not None and mod != S.s:
                fields["mod"] = mod
        for key, value in (("[score].bias", fields.get("bias")), ("[score].mod", fields.get("mod"))):
            if value is not None and value.has(RandomBlocks):
                c.fail(key, "random_blocks() selects pairs: it belongs in the mask ([mask].where, or the condition c "
                            "of a top-level where(c, s, -inf) in [score].mod), not in a score")
        if mask is sympy.true:
            mask = None
        # a mask that is never true (sympy.false) builds: every row is o = 0, lse = -inf (contract v1)
        fields["mask"] = mask
        if "rope" in data:
            rope = c.table(data, "rope", ("theta", "style", "rotary_dim"))
            rd = rope.get("rotary_dim")
            if rd is not None:
                c.int_(rd, "[rope].rotary_dim", 2)
                if rd % 2 or rd > min(head_dims):
                    c.fail("[rope].rotary_dim", f"expected an even number <= head_dim ({min(head_dims)}), got {rd}")
            elif any(d % 2 for d in head_dims):
                c.fail("[rope]", f"rotary embedding needs an even head_dim, got {head_dims}")
            fields["rope"] = Rope(theta=c.number(rope.get("theta", 10000.0), "[rope].theta", positive=True, float32=True),
                                  style=c.choice(rope.get("style", "neox"), "[rope].style", ("neox", "gptj")),
                                  rotary_dim=rd)

    params = [Param(p.name, p.value, p.kind, count=True) if p.name in counts else p for p in params]
    return Pattern(name=name, kind=kind, head_dims=head_dims, value_dim=value_dim, dtypes=tuple(dts),
                   heads_q=hq, heads_kv=hkv, params=tuple(params), inputs=tuple(inputs), source=path,
                   source_hash=spec_hash(text), **fields)


def spec_hash(text: str) -> str:
    """The spec's hash (the generated module's header, its ``SPEC.spec_hash``, the module cache and
    attncc.distributed's check that a pattern is the module's): sha256 of the text with its line
    ends as \n, hex, first 16 digits. TOML reads \r\n as \n, so a file checked out with CRLF
    line ends (git's autocrlf) is the same spec as its LF copy and must not make the shipped
    modules stale or the distributed check fail."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode()).hexdigest()[:16]


def _first_surrogate(text: str):
    """The offset of the first lone surrogate (U+D800..U+DFFF) in ``text``, or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _seed(c: _Checker, value, key) -> int:
    c.int_(value, key, 0)
    if value > SEED_MAX:
        c.fail(key, f"expected a seed below 2**63, got {value}")
    return value


def _score_algebra(c, key, e):
    """:func:`attncc.spec.expr.score_algebra` of ``e``, its refusal a SpecError at ``key``."""
    try:
        return score_algebra(e)
    except ValueError as err:
        c.fail(key, str(err))


def split_mod_mask(mod):
    """Take the mask out of a score transform ``where(c, e, -inf)``: returns ``(mod', mask)``.

    Only the conjuncts of ``c`` that are free of the score ``s`` go to the mask (block
    sparsity applies to them); a condition on ``s`` stays in the transform, evaluated per
    pair on the score in its own units (after scale and bias, as written): ``where(j <= i and
    s > 0, s, -inf)`` gives the mask ``j <= i`` and ``mod' = where(s > 0, s, -inf)``. Nested
    ``where(c1, where(c2, e, -inf), -inf)`` is ``where(c1 and c2, e, -inf)``, and
    ``where(c1, e1, where(c2, e2, -inf))`` keeps a pair where ``c1 or c2``.
    Returns ``(mod, None)`` when no part of a condition is free of ``s``. A transform that is
    ``-inf`` everywhere (sympy folds ``where(False, e, -inf)`` to ``-inf``) is the mask ``False``."""
    if mod == -sympy.oo:
        return S.s, sympy.false
    conds, e = [], mod
    while True:
        kept = _kept_where(e)
        if kept is None:
            break
        c, e = kept
        conds += _conjuncts(c)
    free = [c for c in conds if not c.has(S.s)]
    if not free:
        return mod, None
    on_s = [c for c in conds if c.has(S.s)]
    if on_s:
        e = sympy.Piecewise((e, sympy.And(*on_s)), (-sympy.oo, True))
    return e, sympy.And(*free)


def _kept_where(e):
    """``(c, v)`` when ``e`` is ``v`` where ``c`` holds and ``-inf`` elsewhere, else None."""
    if not isinstance(e, sympy.Piecewise) or len(e.args) < 2 or e.args[-1].cond is not sympy.true:
        return None
    pieces, last = e.args[:-1], e.args[-1].expr
    if len(pieces) == 1 and pieces[0].expr == -sympy.oo:  # where(c, -inf, v)
        return sympy.Not(pieces[0].cond), last
    if last != -sympy.oo or any(p.expr == -sympy.oo for p in pieces):
        return None
    keep = sympy.Or(*[p.cond for p in pieces])
    value = sympy.Piecewise(*[(p.expr, p.cond) for p in pieces[:-1]], (pieces[-1].expr, True))
    return keep, value


def _conjuncts(c):
    """The conjuncts of a condition (``And`` flattened, ``not (a or b)`` as ``not a``, ``not b``)."""
    if isinstance(c, sympy.And):
        return [x for a in c.args for x in _conjuncts(a)]
    if isinstance(c, sympy.Not) and isinstance(c.args[0], sympy.Or):
        return [x for a in c.args[0].args for x in _conjuncts(sympy.Not(a))]
    return [c]


def load_spec(path) -> Pattern:
    """Read and parse the spec file at ``path``."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(str(path), "", f"cannot read the spec: {e.strerror}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(path), "", f"a spec file is at most {MAX_SPEC_BYTES} bytes (1 MiB); this one is longer")
    return parse_spec(decode_spec(data, str(path)), str(path))


def decode_spec(data: bytes, path: str) -> str:
    """The text of a spec file's bytes: UTF-8, as TOML files are (never the locale's encoding, which
    read a spec differently from one machine to another), with universal newlines; or the SpecError
    naming the first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(path, "", f"not UTF-8 text (TOML files are UTF-8): byte 0x{data[e.start]:02x} at offset "
                                  f"{e.start} ({e.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as a file read as text
