"""Spec parsing: every shipped spec loads, malformed specs fail with the key and the reason."""
from __future__ import annotations

from pathlib import Path

import pytest
import sympy

from attncc.spec import Pattern, SpecError, load_spec, parse_spec
from attncc.spec import symbols as S
from attncc.spec.builtins import AlibiSlope, Bucket, RandomBlocks

SPECS = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.toml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_spec_parses_hashable_and_stable(path):
    a, b = load_spec(path), load_spec(path)
    assert isinstance(a, Pattern)
    assert a == b and hash(a) == hash(b)
    assert a.name == path.stem
    assert a.source == str(path) and len(a.source_hash) == 16
    assert {a: 1}[b] == 1  # usable as a cache key


def test_specs_folder_is_not_empty():
    assert len(SPECS) >= 15


# --- malformed specs ----------------------------------------------------------------------

T_INPUT = '[inputs]\nt = { dims = ["h", 32], dtype = "float32" }\n'

MALFORMED = [
    # (id, spec text, key the message names, substring of the message)
    ("unknown-top-level-key", 'flavour = "sparse"', "flavour", "unknown key"),
    ("unknown-table-key", "[score]\nscal = 0.1", "[score].scal", "unknown key"),
    ("unknown-variable", '[mask]\nwhere = "j <= k"', "[mask].where", "unknown variable 'k'"),
    ("input-wrong-dims", '[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "doc[i] == doc[j]"',
     "[mask].where", "has 2 dims (b, n), indexed with 1"),
    ("input-without-index", '[inputs]\nkv_len = { dims = ["b"], dtype = "int32" }\n[mask]\nwhere = "j < kv_len"',
     "[mask].where", "must be indexed"),
    ("index-non-input", '[params]\nw = 3\n[mask]\nwhere = "w[0] < i"', "[mask].where", "only inputs from [inputs] can be indexed"),
    ("float-index", '[inputs]\nt = { dims = ["n"], dtype = "float32" }\n[score]\nbias = "t[i / 2]"',
     "[score].bias", "must be an integer expression"),
    ("slice-index", '[inputs]\nt = { dims = ["n"], dtype = "float32" }\n[score]\nbias = "t[1:2]"', "[score].bias",
     "only allowed in dot(...)"),
    ("heads-not-divisible", "[heads]\nq = 6\nkv = 4", "[heads]", "not a multiple of kv = 4"),
    ("heads-zero", "[heads]\nkv = 0", "[heads].kv", "expected an integer >= 1"),
    ("feature-map-on-softmax", '[feature_map]\nname = "relu"', "[feature_map]", 'kind = "linear" only'),
    ("mask-on-linear", 'kind = "linear"\n[mask]\nwhere = "causal"', "[mask]", "not allowed in a kind = \"linear\""),
    ("score-on-linear", 'kind = "linear"\n[score]\nsoftcap = 3.0', "[score]", "not allowed in a kind = \"linear\""),
    ("bad-kind", 'kind = "sparse"', "kind", "expected one of 'softmax', 'linear'"),
    ("float-head-dim", "head_dim = 64.0", "head_dim", "got a float 64.0"),
    ("empty-head-dim", "head_dim = []", "head_dim", "empty list"),
    ("float-head-count", "[heads]\nq = 2.5", "[heads].q", "expected an integer, got a float 2.5"),
    ("value-dim-zero", "value_dim = 0", "value_dim", "expected an integer >= 1"),
    ("mask-not-boolean", '[mask]\nwhere = "i + j"', "[mask].where", "must be a boolean expression"),
    ("mask-not-string", "[mask]\nwhere = 5", "[mask].where", "expected an expression as a string"),
    ("bias-boolean", '[score]\nbias = "i < j"', "[score].bias", "must be a number, got a boolean"),
    ("mod-boolean", '[score]\nmod = "s > 0"', "[score].mod", "must be a number, got a boolean"),
    ("score-outside-mod", '[score]\nbias = "s * 2"', "[score].bias", "'s' is only allowed in [score].mod"),
    ("score-alias-in-mask", '[mask]\nwhere = "score > 0"', "[mask].where", "'score' is only allowed in [score].mod"),
    ("inf-outside-mod", '[score]\nbias = "-inf"', "[score].bias", "'inf' is only allowed"),
    ("unknown-function", '[mask]\nwhere = "foo(i) < j"', "[mask].where", "unknown function 'foo'"),
    ("builtin-called", '[mask]\nwhere = "causal(i)"', "[mask].where", "unknown function 'causal'"),
    ("function-as-variable", '[mask]\nwhere = "abs < i"', "[mask].where", "'abs' is a function"),
    ("attribute-access", '[mask]\nwhere = "i.real < j"', "[mask].where", "attribute access is not part"),
    ("lambda", '[score]\nbias = "lambda x: x"', "[score].bias", "lambda is not part"),
    ("called-lambda", '[score]\nbias = "(lambda x: x)(i)"', "[score].bias", "only the language's functions can be called"),
    ("conditional-expression", '[score]\nbias = "1 if i < j else 0"', "[score].bias", "where(cond, a, b)"),
    ("walrus", '[mask]\nwhere = "(x := i) < j"', "[mask].where", "':=' is not part"),
    ("xor-float", '[mask]\nwhere = "(i / 2) ^ 3 > 1"', "[mask].where", "'^' needs integers"),
    ("is-comparison", '[mask]\nwhere = "i is j"', "[mask].where", "comparison Is is not allowed"),
    ("string-constant", "[mask]\nwhere = \"i < 'a'\"", "[mask].where", "constant 'a' is not allowed"),
    ("syntax-error", '[mask]\nwhere = "j <= i and"', "[mask].where", "syntax error"),
    ("syntax-error-column", '[mask]\nwhere = "i +* j"', "[mask].where", "column 4: syntax error"),
    ("unknown-dtype", 'dtypes = ["float8"]', "dtypes", "got 'float8'"),
    ("unknown-input-dtype", '[inputs]\nx = { dims = ["b"], dtype = "complex64" }', "[inputs].x.dtype", "got 'complex64'"),
    ("bad-dims-entry", '[inputs]\nx = { dims = ["b", "m"], dtype = "int32" }', "[inputs].x.dims", "got 'm'"),
    ("unknown-input-key", '[inputs]\nx = { dims = ["b"], dtype = "int32", shape = 3 }', "[inputs].x.shape", "unknown key"),
    ("grad-on-int-input", '[inputs]\nx = { dims = ["b"], dtype = "int32", grad = true }', "[inputs].x.grad",
     "only floating inputs can have gradients"),
    ("inputs-not-a-table", "inputs = 3", "[inputs]", "expected a table"),
    ("params-not-a-table", "params = 3", "[params]", "expected a table"),
    ("param-shadows-variable", "[params]\ni = 3", "[params].i", "built-in name"),
    ("param-shadows-alias", "[params]\nq_idx = 3", "[params].q_idx", "built-in name"),
    ("param-not-identifier", '[params]\n"my-param" = 3', "[params].my-param", "Python identifier"),
    ("param-string", '[params]\nw = "x"', "[params].w", "expected an integer or a float"),
    ("param-boolean", "[params]\nw = true", "[params].w", "got a boolean"),
    ("input-shadows-param", '[params]\nx = 3\n[inputs]\nx = { dims = ["b"], dtype = "int32" }', "[inputs].x",
     "already a variable"),
    ("rope-odd-rotary-dim", "head_dim = 64\n[rope]\nrotary_dim = 31", "[rope].rotary_dim", "even number <= head_dim (64)"),
    ("rope-rotary-dim-too-big", "head_dim = [64, 128]\n[rope]\nrotary_dim = 96", "[rope].rotary_dim", "got 96"),
    ("rope-odd-head-dim", "head_dim = 63\n[rope]\ntheta = 10.0", "[rope]", "even head_dim"),
    ("rope-bad-style", '[rope]\nstyle = "llama"', "[rope].style", "got 'llama'"),
    ("rope-theta-string", '[rope]\ntheta = "big"', "[rope].theta", "expected a number"),
    ("unknown-feature-map", 'kind = "linear"\n[feature_map]\nname = "softplus"', "[feature_map].name", "got 'softplus'"),
    ("features-on-non-performer", 'kind = "linear"\n[feature_map]\nname = "relu"\nfeatures = 64', "[feature_map].features",
     "only the performer map"),
    ("negative-seed", 'kind = "linear"\n[feature_map]\nseed = -1', "[feature_map].seed", "expected an integer >= 0"),
    ("dropout-one", "[score]\ndropout = 1.0", "[score].dropout", "probability in [0, 1)"),
    ("negative-softcap", "[score]\nsoftcap = -5.0", "[score].softcap", "expected a positive number"),
    ("negative-scale", "[score]\nscale = -1.0", "[score].scale", "expected a positive number"),
    ("bucket-non-constant-option", "[params]\nnb = 32\n" + T_INPUT + '[score]\nbias = "t[h, bucket(j - i, num_buckets=nb)]"',
     "[score].bias", "'num_buckets' must be a constant integer"),
    ("bucket-unknown-option", T_INPUT + '[score]\nbias = "t[h, bucket(j - i, buckets=16)]"', "[score].bias",
     "no option 'buckets'"),
    ("bucket-too-few-buckets", T_INPUT + '[score]\nbias = "t[h, bucket(j - i, num_buckets=3)]"', "[score].bias",
     "num_buckets >= 4 when bidirectional"),
    ("bucket-float-distance", T_INPUT + '[score]\nbias = "t[h, bucket((j - i) / 2)]"', "[score].bias",
     "distance must be an integer expression"),
    ("random-blocks-non-constant-r", '[params]\nr = 3\n[mask]\nwhere = "random_blocks(r)"', "[mask].where",
     "count r must be a constant"),
    ("random-blocks-boolean-block", '[mask]\nwhere = "random_blocks(2, block=True)"', "[mask].where",
     "'block' must be an integer"),
    ("not-of-number", '[mask]\nwhere = "not i"', "[mask].where", "'not' needs a boolean expression"),
    # contract v1: a boolean counts as 0 or 1 in arithmetic (tests/test_language_v1.py), so this is a number
    ("where-mixed-branches", '[mask]\nwhere = "where(i < j, i < 3, 5)"', "[mask].where", "must be a boolean expression, got a number"),
    ("where-arity", '[mask]\nwhere = "where(i < j, True)"', "[mask].where", "takes 3 arguments"),
    ("name-not-identifier", 'name = "my-spec"', "name", "Python identifier"),
    ("name-keyword", 'name = "class"', "name", "not a keyword of Python"),
]


@pytest.mark.parametrize("text,key,fragment", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_spec_is_refused(text, key, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.toml")
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"bad.toml: {key}")  # names the file and the key first
    assert info.value.key == key and info.value.file == "bad.toml"


def test_invalid_toml_names_the_file():
    with pytest.raises(SpecError, match=r"^bad\.toml: not valid TOML"):
        parse_spec('[mask\nwhere = "causal"', "bad.toml")


def test_missing_file():
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec("no/such/spec.toml")


def test_expression_errors_carry_the_column():
    with pytest.raises(SpecError) as info:
        parse_spec('[mask]\nwhere = "j <= i and q < 3"')
    assert info.value.column == 12 and "unknown variable 'q'" in info.value.reason


# --- what parses, and to what ---------------------------------------------------------------


def mask_of(where, extra=""):
    return parse_spec(f'{extra}\n[mask]\nwhere = "{where}"').mask


def test_aliases():
    assert mask_of("kv_idx <= q_idx") == mask_of("j <= i")
    p = parse_spec('[score]\nmod = "score * 2"')
    assert p.mod == 2 * S.s


def test_chained_comparison_is_a_conjunction():
    m = mask_of("0 <= i - j < w", "[params]\nw = 8")
    w = sympy.Symbol("w", integer=True)
    assert m == sympy.And(sympy.Le(0, S.i - S.j), sympy.Lt(S.i - S.j, w))
    assert mask_of("0 <= i - j < w", "[params]\nw = 8") == mask_of("0 <= i - j and i - j < w", "[params]\nw = 8")


def test_where_minus_inf_in_mod_folds_into_the_mask():
    p = parse_spec('[score]\nmod = "where(j <= i, s * 2, -inf)"')
    assert p.mask.canonical == sympy.Le(S.j, S.i).canonical and p.mod == 2 * S.s  # Piecewise reorders
    q = parse_spec('[mask]\nwhere = "i < 100"\n[score]\nmod = "where(i - j < 4, -inf, s)"')
    assert q.mod is None  # what is left is the identity
    assert q.mask == sympy.And(sympy.Lt(S.i, 100), sympy.Not(sympy.Lt(S.i - S.j, 4)))
    # not at the top level: stays a score transform
    r = parse_spec('[score]\nmod = "2 * where(j <= i, s, -inf)"')
    assert r.mask is None and r.mod.has(sympy.Piecewise)


def test_causal_and_alibi_builtins():
    assert mask_of("causal") == sympy.Le(S.j, S.i)
    p = parse_spec('[mask]\nwhere = "causal"\n[score]\nbias = "alibi"')
    assert p.bias == AlibiSlope(S.h, S.n_heads) * (S.j - S.i)


def test_bucket_and_random_blocks_options():
    p = parse_spec(T_INPUT + '[score]\nbias = "t[h, bucket(j - i, 16, max_distance=64, bidirectional=False)]"')
    (bucket,) = p.bias.atoms(Bucket)
    assert bucket.args[0] == S.j - S.i and bucket.options == (16, 64, False)
    (rb,) = mask_of("random_blocks(3, block=32, seed=7)").atoms(RandomBlocks) | set()
    assert rb.options == (3, 32, 7)
    assert load_spec(SPECS[0].parent / "t5_bias.toml").bias.atoms(Bucket).pop().options == (32, 128, True)


def test_boolean_operators():
    assert mask_of("(i < 4) & ~(j > 2) | (i == j)") == mask_of("(i < 4 and not j > 2) or i == j")


def test_params_defaults_and_kinds():
    p = parse_spec("[params]\nwindow = 1024\ntemperature = 0.5\n")
    assert p.param_values == {"window": 1024, "temperature": 0.5}
    assert p.param("window").kind == "int" and p.param("window").symbol.is_integer
    assert p.param("temperature").kind == "float"
    assert load_spec(SPECS[0].parent / "sliding_window.toml").param_values == {"window": 1024}


def test_defaults():
    p = parse_spec("", "specs/my_pattern.toml")
    assert (p.name, p.kind, p.head_dims, p.dtypes, p.mask, p.scale, p.rope) == (
        "my_pattern", "softmax", (128,), ("bfloat16", "float16"), None, None, None)
    lin = parse_spec('kind = "linear"\n[feature_map]\nname = "performer"')
    assert lin.feature_map.features == 256 and lin.feature_map.causal and lin.feature_map.normalize
    rope = parse_spec("[rope]\n").rope
    assert (rope.theta, rope.style, rope.rotary_dim) == (10000.0, "neox", None)


def test_inputs_and_heads():
    p = load_spec(SPECS[0].parent / "t5_bias.toml")
    (decl,) = p.inputs
    assert (decl.name, decl.dims, decl.dtype, decl.grad) == ("rel_bias", ("h", 32), "float32", True)
    g = load_spec(SPECS[0].parent / "gqa.toml")
    assert (g.heads_q, g.heads_kv) == (32, 8)
    bool_input = parse_spec('[inputs]\nkeep = { dims = ["b", "n"], dtype = "bool" }\n[mask]\nwhere = "keep[b, j]"')
    assert bool_input.mask == sympy.Ne(sympy.Function("keep", real=True)(S.b, S.j), 0)


@pytest.mark.parametrize("key, value, said", [("dtypes", '["float16", "float16"]', "each dtype once"),
                                              ("head_dim", "[64, 128, 64]", "each head dim once")])
def test_a_list_names_each_entry_once(key, value, said):
    """A dtype or head dim listed twice is an error naming the key (tune would time it twice)."""
    with pytest.raises(SpecError, match=said):
        parse_spec(f'{key} = {value}\n[mask]\nwhere = "j <= i"\n')
