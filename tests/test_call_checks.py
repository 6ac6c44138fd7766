"""Bad calls get a clear error before any launch: what was expected and what came."""
from __future__ import annotations

import math

import numpy
import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from cases import module


def qkv(B=1, Hq=4, Hkv=2, Nq=16, Nk=16, D=16, dtype=torch.float32):
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, D, dtype=dtype))


@pytest.mark.parametrize("mutate, error, message", [
    (lambda q, k, v: (q[0], k, v), ValueError, "must have 4 dims"),
    (lambda q, k, v: (q, k[:, :, :, :8], v), ValueError, "head dims differ"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "must be a multiple of the key/value head count"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "k has 2 heads but v has 1"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "k has 16 positions but v has 5"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "bfloat16, float16 or float32"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
])
def test_bad_tensors(mutate, error, message):
    q, k, v = mutate(*qkv())
    with pytest.raises(error, match=message):
        module("causal").attention(q, k, v)


def test_fixed_head_counts_are_checked():
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match=r"fixes \[heads\].q = 32"):
        module("gqa").attention(q, k, v)
    with pytest.raises(ValueError, match=r"fixes \[heads\].kv = 1"):
        module("mqa").attention(q, k, v)


def test_unknown_keyword_names_the_known_ones():
    with pytest.raises(TypeError, match="unexpected keyword.*windw.*known inputs and params: window"):
        module("sliding_window").attention(*qkv(), windw=3)


@pytest.mark.parametrize("bad", [2.5, 3.0, True, numpy.bool_(True), torch.tensor(3.0), torch.tensor(True),
                                 torch.tensor([3, 4]), "3"])
def test_param_type(bad):
    with pytest.raises(TypeError, match="window must be an int"):
        module("sliding_window").attention(*qkv(), window=bad)


@pytest.mark.parametrize("same", [numpy.int64(3), numpy.int32(3), torch.tensor(3), torch.tensor([3], dtype=torch.int16)])
def test_int_param_of_other_integer_types(same):
    """numpy's integers and one-element integer tensors are ints (a config file's values often are)."""
    m = module("sliding_window")
    q, k, v = qkv()
    assert torch.equal(m.attention(q, k, v, window=same), m.attention(q, k, v, window=3))


FLOAT_PARAM = {"name": "float_param_check", "head_dim": 16, "params": {"w": 0.5}, "score": {"mod": "s * w"}}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e300, -1e39, 1e-300, 1e-45,
                                 pytest.param(10**400, id="10**400")])
def test_float_param_overrides_must_fit_float32(bad):
    """A call's float param is held to the spec's rule for its value (finite, in float32's range).
    The kernels compute with it in float32: ``w = 1e300`` was inf there and every row NaN, while
    the float64 reference gave finite numbers; NaN passed too. attention, decode and the reference
    refuse it alike."""
    m = attncc.compile(FLOAT_PARAM)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="param w must be a finite number in float32's range"):
        m.attention(q, k, v, w=bad)
    with pytest.raises(ValueError, match="param w must be a finite number in float32's range"):
        m.decode(q[:, :, :1], k, v, kv_len=[16], w=bad)
    with pytest.raises(ValueError, match="float32's range"):
        attncc.reference(attncc.parse_spec(toml_text(FLOAT_PARAM)), q, k, v, w=bad)


@pytest.mark.parametrize("good", [0, 0.0, 3, -2.5, 3e38, -1.2e-38])
def test_float_params_in_float32s_range_pass(good):
    m = attncc.compile(FLOAT_PARAM)
    q, k, v = qkv()
    want = attncc.reference(attncc.parse_spec(toml_text(FLOAT_PARAM)), q.double(), k.double(), v.double(), w=good)
    got = m.attention(q, k, v, w=good)
    if abs(good) < 1e30:  # (3e38 * s overflows float32, as the spec's own 3e38 would)
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_missing_input():
    with pytest.raises(ValueError, match="missing input 'doc'.*b, n.*int32"):
        module("document").attention(*qkv())


@pytest.mark.parametrize("doc, error, message", [
    (torch.zeros(1, 10, dtype=torch.int32), ValueError, r"must cover positions 0\.\.15"),
    (torch.zeros(2, 16, dtype=torch.int32), ValueError, r"dim 0 \('b'\) must be 1, got 2"),
    (torch.zeros(16, dtype=torch.int32), ValueError, "must have 2 dims"),
    (torch.zeros(1, 16), TypeError, "must be int32, got float32"),
    ([0] * 16, TypeError, "must be a torch.Tensor"),
])
def test_bad_input_tensor(doc, error, message):
    with pytest.raises(error, match=message):
        module("document").attention(*qkv(), doc=doc)


def test_int64_document_ids_are_accepted():
    q, k, v = qkv()
    doc = torch.zeros(1, 16, dtype=torch.int64)
    a = module("document").attention(q, k, v, doc=doc)
    b = module("document").attention(q, k, v, doc=doc.int())
    assert torch.equal(a, b)


def test_offsets_must_be_non_negative_ints():
    with pytest.raises(ValueError, match="q_offset must be >= 0"):
        module("causal").attention(*qkv(), q_offset=-1)
    with pytest.raises(TypeError, match="k_offset must be an int"):
        module("causal").attention(*qkv(), k_offset=1.5)


def test_empty_sequences():
    q, k, v = qkv(Nq=0)
    assert module("causal").attention(q, k, v).shape == (1, 4, 0, 16)
    q, k, v = qkv(Nk=0)
    o, lse = module("causal").attention(q, k, v, return_lse=True)
    assert (o == 0).all() and (lse == float("-inf")).all()


def test_return_lse_must_be_bool():
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        module("causal").attention(*qkv(), return_lse="yes")


def test_head_dims_past_the_kernels_limit_are_refused_by_spec_and_call():
    """Specs and calls share one limit (256): a spec may not promise head dims no call can take."""
    from attncc.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match=r"between 1 and 256 .*calls share"):
        parse_spec("head_dim = 512")
    with pytest.raises(SpecError, match=r"value_dim.*between 1 and 256"):
        parse_spec("value_dim = 384")
    q, k, v = qkv(D=16)
    v = torch.randn(1, 2, 16, 288)
    with pytest.raises(ValueError, match=r"D and Dv from 1 to 256 .*head_dim.*got D = 16, Dv = 288"):
        module("causal").attention(q, k, v)


def test_rotary_dim_larger_than_the_call_head_dim_is_refused(tmp_path):
    """A fixed [rope].rotary_dim past the call's head dim used to run (rotating garbage) while
    attncc.reference refused it; so did an odd head dim rotated whole."""
    import attncc
    from cases import build_inline

    p, mod = build_inline({"rope16": 'head_dim = [16, 32]\n[rope]\nrotary_dim = 16\n[mask]\nwhere = "causal"\n'},
                          tmp_path)["rope16"]
    q, k, v = qkv(D=8)
    with pytest.raises(ValueError, match=r"rotary_dim = 16 needs an even rotary dim of at most the head dim, got head dim D = 8"):
        mod.attention(q, k, v)
    with pytest.raises(ValueError, match="rotary_dim 16"):
        attncc.reference(p, q, k, v)
    with pytest.raises(ValueError, match="rotary_dim = 16"):
        mod.decode(q[:, :, -1:], k, v, kv_len=torch.tensor([16]))
    q, k, v = qkv(D=15)
    with pytest.raises(ValueError, match=r"\[rope\] \(rotating the whole head\) needs an even rotary dim"):
        module("rope_causal").attention(q, k, v)
    q, k, v = qkv(D=16)
    assert mod.attention(q, k, v).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("kw", [dict(n_q=39), dict(n_k=39), dict(q_offset=5, n_q=44), dict(k_offset=1, n_k=40)])
def test_lengths_shorter_than_the_calls_positions_are_refused(kw):
    # n_q / n_k are the lengths of the sequences the rows are part of: rows past them mean nothing
    with pytest.raises(ValueError, match=r"n_[qk] = \d+ is shorter than the call's"):
        module("causal").attention(*qkv(Nq=40, Nk=40), **kw)


def test_lengths_that_cover_the_calls_positions_pass():
    o = module("causal").attention(*qkv(Nq=40, Nk=40), q_offset=5, n_q=45, k_offset=1, n_k=41)
    assert o.shape[2] == 40


def test_meta_tensors_are_refused_by_name():
    q, k, v = (t.to("meta") for t in qkv())
    with pytest.raises(ValueError, match="tensors are on meta"):
        module("causal").attention(q, k, v)
