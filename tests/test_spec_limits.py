"""Hostile and degenerate specs: resource limits, non-real and non-finite constants, reserved and
shadowing names. Each is a SpecError naming the file and the key, raised at once; a seeded random
search over the grammar and over mutated specs finds nothing else (no other exception, no hang)."""
from __future__ import annotations

import contextlib
import inspect
import random
import signal
import time
from pathlib import Path

import pytest

from attncc.spec import Pattern, SpecError, parse_spec
from attncc.spec import names as N
from attncc.spec.expr import FUNCTIONS

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.toml"))
T = '[inputs]\nt = { dims = ["n"], dtype = "float32" }\n'

REFUSED = [
    # (id, spec text, key, substring of the message)
    ("power-of-sum", '[score]\nbias = "(i - j + 1) ** 100000"', "[score].bias", "exponents up to 64"),
    ("tower", '[score]\nbias = "9**9**9"', "[score].bias", "too large to compute exactly"),
    ("huge-power", '[score]\nbias = "10**100000"', "[score].bias", "too large to compute exactly"),
    ("exp2-huge", '[score]\nbias = "exp2(2**62)"', "[score].bias", "too large to compute exactly"),
    ("exp2-huge-plus-input", T + '[score]\nbias = "exp2(2**62 + t[j])"', "[score].bias", "too large to compute exactly"),
    ("power-plus-variable", '[score]\nbias = "(i + 1) ** (100000 + j)"', "[score].bias", "exponents up to 64"),
    ("expansion-plus-variable", '[score]\nbias = "(i + j + b + h + n_q + n_k + 1) ** (8 + j)"', "[score].bias", "expands to about"),
    ("random-blocks-in-bias", '[score]\nbias = "where(random_blocks(2), 1.0, 0.0)"', "[score].bias", "belongs in the mask"),
    ("random-blocks-in-mod", '[score]\nmod = "s + where(random_blocks(2), 1.0, 0.0)"', "[score].mod", "belongs in the mask"),
    ("sqrt2-power", '[score]\nbias = "sqrt(2) ** 100000"', "[score].bias", "not a finite number in float64"),  # sqrt(2) is the float 1.414...: Python overflows too
    ("expansion", '[score]\nbias = "(i + j + b + h + n_q + n_k + 1) ** 8"', "[score].bias", "expands to about"),
    ("product-expansion", '[score]\nbias = "(i+j+1)*(i+j+2)*(i+j+3)*(i+j+4)*(i+j+5)*(i+j+6)"', "[score].bias", "expands to about"),
    ("int-literal", '[mask]\nwhere = "j <= i + 99999999999999999999"', "[mask].where", "beyond int64"),
    ("int-product", '[mask]\nwhere = "j <= i + 2**62 * 4"', "[mask].where", "beyond int64"),
    ("float-literal-inf", '[score]\nbias = "1e999 * i"', "[score].bias", "not a finite number"),
    ("float-overflow", '[score]\nbias = "1e300 * 1e300 + i"', "[score].bias", "not a finite number"),
    ("exp-overflow", '[score]\nbias = "exp(1000)"', "[score].bias", "not a finite number"),
    ("exp-tower", '[score]\nbias = "exp(exp(exp(100)))"', "[score].bias", "not a finite number"),
    ("log-negative", '[score]\nbias = "log(-1)"', "[score].bias", "not a real number"),
    ("log-negative-expr", '[score]\nbias = "log(sin(5)) + i"', "[score].bias", "not a real number"),
    ("sqrt-negative", '[score]\nbias = "sqrt(-1) * i"', "[score].bias", "not a real number"),
    ("cube-root-negative", '[score]\nbias = "(-8) ** (1/3)"', "[score].bias", "not a real number"),
    ("zero-negative-power", '[score]\nbias = "0 ** -1"', "[score].bias", "undefined"),
    ("log-zero", '[score]\nbias = "log(0) * j"', "[score].bias", "undefined"),
    ("div-float-zero", '[score]\nbias = "i / 0.0"', "[score].bias", "division by zero"),
    ("mod-float-zero", '[mask]\nwhere = "i % 0.0 < 1"', "[mask].where", "modulo by zero"),
    ("inf-minus-inf", '[score]\nmod = "s + inf - inf"', "[score].mod", "undefined"),
    ("deep-unary", '[score]\nbias = "' + "-" * 500 + 'i"', "[score].bias", "nested too deeply"),
    ("deep-calls", '[score]\nbias = "' + "abs(" * 150 + "i" + ")" * 150 + '"', "[score].bias", "nested too deeply"),
    ("deep-parens", '[score]\nbias = "' + "(" * 1000 + "i" + ")" * 1000 + '"', "[score].bias", "at most 2000 characters"),
    ("long", '[score]\nbias = "' + " + ".join(["i"] * 700) + '"', "[score].bias", "at most 2000 characters"),
    ("random-blocks-r", '[mask]\nwhere = "random_blocks(1000000000)"', "[mask].where", "r <= 1024"),
    ("random-blocks-block", '[mask]\nwhere = "random_blocks(3, block=0)"', "[mask].where", "between 1 and 65536"),
    ("random-blocks-huge-block", '[mask]\nwhere = "random_blocks(3, block=1099511627776)"', "[mask].where", "between 1 and 65536"),
    ("random-blocks-seed-huge", '[mask]\nwhere = "random_blocks(3, seed=100000000000000000000)"', "[mask].where", "seed must be between"),
    ("bucket-count", T + '[score]\nbias = "t[bucket(j - i, num_buckets=1000000000)]"', "[score].bias", "num_buckets <= 1024"),
    ("bucket-distance-literal", T + '[score]\nbias = "t[bucket(j - i, max_distance=1099511627776)]"', "[score].bias",
     "max_distance <= 1048576"),
    ("toml-huge-int", "[params]\nw = 1" + "0" * 5000, "", "not valid TOML here"),
    ("toml-deep-tables", "description = " + "{a = " * 3000 + "1" + "}" * 3000, "", "nested too deeply"),
    # names
    ("name-length", 'name = "' + "a" * 300 + '"', "name", "at most 64 characters"),
    ("param-name-length", "[params]\n" + "w" * 65 + " = 1", "[params]." + "w" * 65, "at most 64 characters"),
    ("input-name-length", "[inputs]\n" + "x" * 65 + ' = { dims = ["b"], dtype = "int32" }', "[inputs]." + "x" * 65,
     "at most 64 characters"),
    ("name-non-ascii", 'name = "caf\u00e9"', "name", "Python identifier"),
    ("param-nfkc", '[params]\n"\ufb01" = 1', "[params].\ufb01", "Python identifier"),
    ("name-torch", 'name = "torch"', "name", "would shadow it"),
    ("name-triton", 'name = "triton"', "name", "would shadow it"),
    ("name-attncc", 'name = "attncc"', "name", "would shadow it"),
    ("name-generated", 'name = "generated"', "name", "would shadow it"),
    ("name-stdlib-math", 'name = "math"', "name", "would shadow it"),
    ("name-stdlib-random", 'name = "random"', "name", "would shadow it"),
    ("name-dunder-init", 'name = "__init__"', "name", "may not start with '_'"),
    ("name-private", 'name = "_kernels"', "name", "may not start with '_'"),
    ("input-kv-len-dims", '[inputs]\nkv_len = { dims = ["b", "n"], dtype = "int32" }', "[inputs].kv_len", 'dims = ["b"]'),
    ("input-kv-len-float", '[inputs]\nkv_len = { dims = ["b"], dtype = "float32" }', "[inputs].kv_len", "integer dtype"),
    ("param-kv-len", "[params]\nkv_len = 3", "[params].kv_len", "decode()"),
    # values
    ("param-nan", "[params]\nw = nan", "[params].w", "finite"),
    ("param-inf", "[params]\nw = -inf", "[params].w", "finite"),
    ("param-float-beyond-float32", "[params]\nw = 1e39", "[params].w", "float32's range"),
    ("param-int-huge", "[params]\nw = 9223372036854775808", "[params].w", "from -2**31 to 2**62 - 1"),
    # past what a call may pass (2**62 - 1): such a spec would load and refuse every call
    ("param-int-past-calls", "[params]\nw = 4611686018427387904", "[params].w", "from -2**31 to 2**62 - 1"),
    ("param-int-very-negative", "[params]\nw = -2147483649", "[params].w", "from -2**31 to 2**62 - 1"),
    ("scale-inf", "[score]\nscale = inf", "[score].scale", "finite"),
    ("scale-nan", "[score]\nscale = nan", "[score].scale", "finite"),
    ("scale-below-float32", "[score]\nscale = 1e-40", "[score].scale", "float32's range"),
    ("softcap-inf", "[score]\nsoftcap = inf", "[score].softcap", "finite"),
    ("theta-inf", "[rope]\ntheta = inf", "[rope].theta", "finite"),
    ("dropout-nan", "[score]\ndropout = nan", "[score].dropout", "finite"),
    ("value-dim-huge", "value_dim = 1000000", "value_dim", "between 1 and 256"),
    ("heads-huge", "[heads]\nq = 100000000000", "[heads].q", "at most 65536"),
    ("features-huge", 'kind = "linear"\n[feature_map]\nname = "performer"\nfeatures = 1000000000', "[feature_map].features",
     "at most 65536"),
    ("linear-seed-huge", 'kind = "linear"\n[feature_map]\nseed = 18446744073709551616', "[feature_map].seed", "below 2**63"),
    ("linear-params", 'kind = "linear"\n[params]\nw = 3', "[params]", "not allowed in a kind = \"linear\""),
    ("linear-inputs", 'kind = "linear"\n[inputs]\nx = { dims = ["b"], dtype = "int32" }', "[inputs]", "not allowed"),
]


@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    """Fail (instead of hanging) when the block runs longer than ``seconds`` (main thread only)."""
    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("text,key,fragment", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_at_once_with_file_and_key(text, key, fragment):
    start = time.perf_counter()
    with time_limit(20, text[:80]), pytest.raises(SpecError) as info:
        parse_spec(text, "bad.toml")
    assert time.perf_counter() - start < 8.0  # (exponential work takes minutes; a busy 2-core CI machine seconds)
    message = str(info.value)
    assert fragment in message, message
    assert message.startswith(f"bad.toml: {key}") and info.value.key == key and info.value.file == "bad.toml"


ACCEPTED = [
    '[score]\nbias = "(i - j) ** 2 / 10 + log(2) + sqrt(3) + exp(-1) + 2 ** (i - j)"',
    '[score]\nbias = "(i - j + 1) ** 10"',
    '[params]\nw = 100000\n[score]\nbias = "(i - j + 1) ** w"',  # a param exponent is not expanded
    '[mask]\nwhere = "j <= i + 2**62"',
    '[score]\nmod = "where(s > 0, s, -inf)"',
    '[score]\nmod = "max(s, -inf) + exp(-inf)"',
    '[params]\nw = 4611686018427387903\nu = -2147483648\nf = 3.4e38\n[mask]\nwhere = "j <= i + w + u"',
    '[params]\nscale = 0.5\n[score]\nbias = "scale * (j - i)"',  # takes attention(scale=...)
    '[inputs]\nkv_len = { dims = ["b"], dtype = "int32" }\n[mask]\nwhere = "j < kv_len[b]"',
    '[params]\nlo = 1\nhi = 2\n[mask]\nwhere = "j <= i + hi - lo"',
    "name = \"" + "a" * 64 + "\"",
    "[score]\nscale = 1e-30\nsoftcap = 3e38",
    '[score]\nbias = "max(-sigmoid(0.663), j - i) + min(sigmoid(1), 0.2)"',  # sympy's Max raised ValueError
    '[score]\nmod = "where(random_blocks(2), s, -inf)"',  # a mask written in mod
    '[mask]\nwhere = "where(i < 5, random_blocks(2), causal)"',
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_legitimate_specs_near_the_limits_parse(text):
    assert isinstance(parse_spec(text, "ok.toml"), Pattern)


# --- reserved names, from the generated functions themselves ------------------------------

def _keywords(fn):
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def test_reserved_call_keywords_are_those_of_the_generated_functions():
    import generated.causal
    import generated.causal_dropout
    import generated.padding

    assert _keywords(generated.causal.attention) == set(N.ATTENTION_KEYWORDS)
    assert _keywords(generated.causal_dropout.attention) == set(N.ATTENTION_KEYWORDS) | set(N.DROPOUT_KEYWORDS)
    assert _keywords(generated.padding.decode) == set(N.DECODE_KEYWORDS)
    assert N.DECODE_KV_LEN in N.DECODE_KEYWORDS


@pytest.mark.parametrize("name", sorted(set(N.ATTENTION_KEYWORDS + N.DECODE_KEYWORDS) - {"scale", "n_q", "n_k", "k_offset"}))
def test_params_and_inputs_named_like_call_keywords_are_refused(name):
    with pytest.raises(SpecError, match="keyword argument of the generated"):
        parse_spec(f"[params]\n{name} = 1", "bad.toml")
    if name != N.DECODE_KV_LEN:
        with pytest.raises(SpecError, match="keyword argument of the generated"):
            parse_spec(f'[inputs]\n{name} = {{ dims = ["b"], dtype = "int32" }}', "bad.toml")


def test_loop_bound_names_are_refused():
    from attncc.analysis.symbols import BOUND_SYMBOLS

    assert set(BOUND_SYMBOLS) == set(N.LOOP_BOUND_NAMES)
    for name in BOUND_SYMBOLS:
        with pytest.raises(SpecError, match="loop-bound symbol"):
            parse_spec(f"[params]\n{name} = 1", "bad.toml")


def test_no_shipped_spec_uses_a_refused_name():
    for path in SPECS:
        assert parse_spec(path.read_text(), str(path)).name not in N.SHADOWED_MODULES


# --- randomized robustness ----------------------------------------------------------------

NAMES = ["i", "j", "b", "h", "n_q", "n_k", "q_idx", "kv_idx", "w", "f", "causal", "alibi", "s", "score", "inf",
         "nan", "x", "k_offset", "__import__", "t", "doc"]


def _number(rng):
    return rng.choice([
        str(rng.randrange(-3, 10)), str(rng.randrange(2**70)), f"10**{rng.randrange(400)}", f"{rng.random():.3g}",
        f"{rng.random()}e{rng.randrange(-400, 400)}", "0", "0.0", "1e999", str(2**63), str(2**63 - 1), "True", "False"])


def _expr(rng, depth=0):
    if depth > 4 or rng.random() < 0.25:
        r = rng.random()
        if r < 0.45:
            return rng.choice(NAMES)
        if r < 0.85:
            return _number(rng)
        return rng.choice(["t[i]", "t[j - i]", "doc[b, i]", "t[i / 2]", "t", "doc[b]", "'a'", "None", "[1]"])
    a, b = _expr(rng, depth + 1), _expr(rng, depth + 1)
    r = rng.random()
    if r < 0.35:
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**", "**", "&", "|", "and", "or", "<", "<=", "==", "!=", ">", "^"])
        return f"({a} {op} {b})"
    if r < 0.45:
        return f"{rng.choice(['-', '+', 'not ', '~'])}({a})"
    fn = rng.choice(FUNCTIONS + ("foo", "eval"))
    if fn == "bucket":
        opts = rng.choice(["", f", num_buckets={rng.choice([2, 4, 32, 10**9])}", f", max_distance={rng.choice([1, 128, 2**40])}",
                           ", bidirectional=False", ", num_buckets=w"])
        return f"bucket({a}{opts})"
    if fn == "random_blocks":
        return f"random_blocks({rng.choice([0, 3, 10**9, -1, 'w'])}{rng.choice(['', ', block=16', ', seed=2**70', ', block=0'])})"
    args = [a, b, _expr(rng, depth + 1)][:rng.choice([1, 1, 2, 3])]
    return f"{fn}({', '.join(args)})"


def _int(rng, depth=0):
    """A well-typed integer expression (rarely with a hostile number)."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(["i", "j", "b", "h", "n_q", "n_k", "w", str(rng.randrange(1, 9)), rng.choice(["2**62", "3**39", "0"])])
    a, b = _int(rng, depth + 1), _int(rng, depth + 1)
    return rng.choice([f"({a} + {b})", f"({a} - {b})", f"({a} * {b})", f"({a} // {b})", f"({a} % {b})",
                       f"({a} ** {rng.choice([2, 3, 17, 65, 'w', b])})", f"abs({a})", f"min({a}, {b})",
                       f"max({a}, {b}, 1)", f"bucket({a}, num_buckets={rng.choice([8, 32, 1024])})"])


def _float(rng, depth=0):
    """A well-typed float expression."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(["f", "alibi", "t[i]", "t[j]", f"{rng.random():.3g}", _int(rng, 3),
                           rng.choice(["1e300", "1e-300", "0.0", "-1.5"])])
    a, b = _float(rng, depth + 1), _float(rng, depth + 1)
    fn = rng.choice(["log", "sqrt", "exp", "exp2", "log2", "tanh", "sigmoid", "sin", "cos", "tan"])
    return rng.choice([f"({a} + {b})", f"({a} * {b})", f"({a} / {b})", f"({a} ** {rng.choice(['0.5', '2', '-1', 'f', b])})",
                       f"{fn}({a})", f"-{a}", f"where({_bool(rng, depth + 1)}, {a}, {b})", f"max({a}, {b})"])


def _bool(rng, depth=0):
    """A well-typed boolean expression."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(["causal", "True", f"random_blocks({rng.choice([0, 2, 1024])})", f"j <= i + {_int(rng, 3)}",
                           "doc[b, i] == doc[b, j]"])
    a, b = _bool(rng, depth + 1), _bool(rng, depth + 1)
    x, y = (_int(rng, depth + 1), _int(rng, depth + 1)) if rng.random() < 0.6 else (_float(rng, depth + 1), _float(rng, depth + 1))
    return rng.choice([f"({a}) & ({b})", f"({a}) | ({b})", f"not ({a})", f"{x} < {y}", f"{x} == {y}", f"{x} >= {y} > 0"])


def _mutate(rng, text):
    """A spec text with a few random edits: characters, numbers, names and keys."""
    for _ in range(rng.randrange(1, 4)):
        r = rng.random()
        pos = rng.randrange(len(text) + 1)
        if r < 0.3:
            text = text[:pos] + rng.choice(['"', "'", "[", "]", "=", "\n", "(", ")", "**", "9" * 30, "nan", "inf", "\\", "#",
                                            "{", "}", ",", "\x00", "\u2028"]) + text[pos:]
        elif r < 0.5:
            text = text[:pos] + text[pos + rng.randrange(1, 6):]
        elif r < 0.8:
            text = text + rng.choice(["\n[params]\nw = 1" + "0" * 4400, "\nx = " + "[" * 2000 + "]" * 2000,
                                      "\nx = " + "{a = " * 2000 + "1" + "}" * 2000, "\n[params]\nw = 1e999", "\n[params]\nq = 1", '\nname = "torch"', "\n[score]\nscale = nan",
                                      '\n[score]\nbias = "' + _expr(rng) + '"', "\nhead_dim = 100000000000000000000"])
        else:
            text = text.replace(rng.choice(["i", "j", "=", "1", "causal", "dims", "n"]), rng.choice(["9**9**9", "", "k_offset", "-"]), 1)
    return text


def _parse_only_pattern_or_spec_error(text):
    start = time.perf_counter()
    try:
        with time_limit(20, text[:200]):
            result = parse_spec(text, "fuzz.toml")
        assert isinstance(result, Pattern)
    except SpecError:
        pass
    except Exception as e:  # noqa: BLE001: anything else is the bug this test is for
        raise AssertionError(f"{type(e).__name__}: {e}\nfor the spec:\n{text}") from e
    assert time.perf_counter() - start < 8.0, text  # (as above: room for a busy CI machine)


def test_random_expressions_give_a_pattern_or_a_spec_error():
    rng = random.Random(1515)
    header = 'head_dim = 16\n[params]\nw = 3\nf = 0.5\n' + T + '[inputs.doc]\ndims = ["b", "n"]\ndtype = "int32"\n'
    for n in range(600):
        if n % 2:  # well-typed, to reach the checks past the types
            key, expr = rng.choice([("[mask]\nwhere", _bool), ("[score]\nbias", _float), ("[score]\nmod", _float)])
            expr = expr(rng) + rng.choice(["", "", " + s"] if key == "[score]\nmod" else [""])
        else:
            key, expr = rng.choice(["[mask]\nwhere", "[score]\nbias", "[score]\nmod"]), _expr(rng)
        expr = expr.replace("\\", "\\\\").replace('"', '\\"')
        _parse_only_pattern_or_spec_error(f'{header}{key} = "{expr}"\n')


def test_mutated_specs_give_a_pattern_or_a_spec_error():
    rng = random.Random(2626)
    texts = [p.read_text() for p in SPECS]
    for _ in range(800):
        _parse_only_pattern_or_spec_error(_mutate(rng, rng.choice(texts)))


def test_constant_float_arithmetic_is_pythons():
    """Float constants are computed as Python computes them (no exact power to refuse): (1/3) ** 10**8 is 0.0."""
    from attncc.spec import parse_spec

    assert float(parse_spec('[score]\nbias = "(1/3) ** 100000000 + 0.5"\n').bias) == (1 / 3) ** 100000000 + 0.5
