"""Probe 19 (what a user touches around the kernels: the command line, attncc.compile, the caches on
disk, the ATTNCC_* environment variables), as an attacker would.

Found and fixed (each test below failed before its fix):

- ``ATTNCC_CONFIG`` / ``_DKDV`` / ``_DQ`` were parsed with ``int()`` and ``KernelConfig(**fields)``:
  ``BLOCK_M=-16,BLOCK_N=16`` ran and returned o off by 1e33 (a silent wrong answer); ``BLOCK_M=48``
  raised "arange's range must be a power of 2" from inside Triton, ``BLOCK_M=0`` a ZeroDivisionError,
  ``abc`` "invalid literal for int()", a missing BLOCK_N or a misspelt key a TypeError of
  KernelConfig, none naming the variable; ``num_warps=3`` and ``warp_specialize=yes`` (read as
  False) were taken silently.
- ``ATTNCC_DECODE_CONFIG``: ``BLOCK_N=-16`` gave o off by 0.5 (silent), unknown keys
  (``block_n=32``, ``BLOCK_M=64``) were ignored without a word, ``BLOCK_N`` without ``=`` was "not
  enough values to unpack".
- ``ATTNCC_DECODE_SPLITS``: ``0`` and ``-3`` ran as 1 split silently, ``abc`` / ``1.5`` were bare
  int() errors.
- The on/off variables ``ATTNCC_TUNE``, ``ATTNCC_FAST_LAUNCH``, ``ATTNCC_DIRECT_LAUNCH`` and
  ``ATTNCC_CHECK_DECODE`` took any text: ``ATTNCC_TUNE=false`` turned tuning on,
  ``ATTNCC_FAST_LAUNCH=false`` left the fast launch on. They take 1/true/yes/on and 0/false/no/off
  now (runtime.call.env_flag) and name themselves otherwise.
- ``attncc tune --clear`` deleted every ``*.json`` of ``ATTNCC_CACHE_DIR`` (a project's
  package.json, when the variable names a folder of other things), and left a ``.lock`` file beside
  each; ``--show`` listed them as broken caches. Both take the tune cache's own file names now
  (``<gpu>__triton-<version>.json``).
- ``attncc tune --show --clear`` and ``attncc tune SPEC --clear`` cleared the cache and exited 0
  (nothing shown, nothing tuned); ``--batch 0`` / ``--heads 0`` were taken (kernels timed on an empty
  problem, on a GPU), and never mentioned on a machine without one.
- ``ATTNCC_TUNE=1`` with an ``ATTNCC_CACHE_DIR`` that cannot be written (a file, a read-only
  folder): the store after tuning raised out of the user's attention call, every call tuned again and
  raised again. On the fly the winner is now kept in the process with a warning (as the module cache
  falls back); ``attncc tune`` says it cannot write the cache (exit 2, no traceback).

Probed clean (a few seeds kept as tests at the end):
- 80 random specs whose params and inputs are named like the generated code's locals, arguments
  and helpers (o, lse, tl, triton, torch, B, H, Nq, stride_qb, acc, m_i, qk_scale, _fwd_kernel,
  SPEC, prm_w, ptr_d, tmp0, __class__, __builtins__, ...): all compiled, parsed, and ran forward and
  backward as attncc.reference;
- 400 random static specs through ``attncc explain --json`` (lengths 1-90, tiles 16-128, --param,
  --batch, --heads) against tiles counted by brute force on ``pair_mask``: empty / full / partial,
  allowed pairs, forward walk covering every non-empty tile;
- 60 random ``description`` strings (triple quotes, backslashes, jinja ``{{ }}`` ``{% %}``, NUL,
  U+2028, coding cookies, Python payloads) through attncc.compile: generated source parses, no code
  ran, lone surrogates refused as SpecError; odd TOML param values (0x10, 1_000, +3, -0.0, 0o7)
  right, bool / date / string / array / table / inf / nan / 2**63-1 refused by name;
- the command line: no command, unknown ones, spec files that are missing or folders, with
  leading dashes (after --), spaces, unicode, keywords, module names (torch, generated), 71-char
  names, dunder names: each a one-line error or a module that imports; explain's size options;
  a named pipe waits for its writer, as `cat` does (`attncc build <(...)` with a name key works).
"""
from __future__ import annotations

import ast
import fnmatch
import random

import pytest
import torch

import attncc
from attncc.cli import main as cli_main
from attncc.runtime import tuning
from attncc.runtime.call import env_flag
from attncc.runtime.configs import env_config
from attncc.spec import SpecError, parse_spec

CAUSAL = 'head_dim = 16\ndtypes = ["float32"]\n[mask]\nwhere = "j <= i"\n'


@pytest.fixture(scope="module")
def causal():
    return attncc.compile(CAUSAL)


def _qkv(n=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, 16, generator=gen) for _ in range(3)]


# -- ATTNCC_CONFIG* ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, match", [
    ("BLOCK_M=-16,BLOCK_N=16", "BLOCK_M must be one of 16, 32"),   # ran: o off by 1e33
    ("BLOCK_M=48,BLOCK_N=32", "BLOCK_M must be one of"),
    ("BLOCK_M=0,BLOCK_N=32", "BLOCK_M must be one of"),
    ("BLOCK_M=abc,BLOCK_N=32", "BLOCK_M must be an integer"),
    ("BLOCK_M=64", "BLOCK_N missing"),
    ("BLOCK_M=64,BLOCK_N=32,foo=1", "unknown field 'foo'"),
    ("BLOCK_M=16,BLOCK_N=16,num_warps=3", "num_warps must be one of"),
    ("BLOCK_M=16,BLOCK_N=16,num_stages=0", "num_stages must be >= 1"),
    ("BLOCK_M=16,BLOCK_N=16,warp_specialize=maybe", "warp_specialize must be 1 \\(or true, yes, on\\) or 0"),
    ("BLOCK_M=16,BLOCK_N=16,BLOCK_M=32", "BLOCK_M given twice"),
    ("BLOCK_M", "expected BLOCK_M=VALUE"),
])
@pytest.mark.parametrize("variable", ["ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ"])
def test_a_forced_config_is_checked_and_names_its_variable(causal, monkeypatch, variable, value, match):
    monkeypatch.setenv(variable, value)
    q, k, v = _qkv()
    q.requires_grad_(True)
    with pytest.raises(ValueError, match=f"^{variable}: {match}"):
        causal.attention(q, k, v).sum().backward()


def test_good_forced_configs_still_run(causal, monkeypatch):
    q, k, v = _qkv()
    ref = attncc.reference(parse_spec(CAUSAL), q, k, v)
    for value in ("BLOCK_M=16,BLOCK_N=32,num_warps=4,num_stages=1", " BLOCK_M = 32 , BLOCK_N = 16 , warp_specialize=0,"):
        monkeypatch.setenv("ATTNCC_CONFIG", value)
        assert torch.allclose(causal.attention(q, k, v).double(), ref, atol=1e-5)
    assert env_config().BLOCK_M == 32 and env_config().warp_specialize is False


# -- ATTNCC_DECODE_CONFIG, ATTNCC_DECODE_SPLITS --------------------------------------------------------

def _decode(module):
    gen = torch.Generator().manual_seed(1)
    kc, vc = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(2))
    qn = torch.randn(2, 2, 1, 16, generator=gen)
    kv_len = torch.tensor([33, 40])
    o = module.decode(qn, kc, vc, kv_len=kv_len)
    p = parse_spec(CAUSAL)
    ref = torch.cat([attncc.reference(p, qn[r:r + 1], kc[r:r + 1, :, :n], vc[r:r + 1, :, :n], q_offset=n - 1)
                     for r, n in enumerate(kv_len.tolist())])
    return (o.double() - ref).abs().max().item()


@pytest.mark.parametrize("variable, value, match", [
    ("ATTNCC_DECODE_CONFIG", "BLOCK_N=-16", "ATTNCC_DECODE_CONFIG: BLOCK_N must be one of"),  # o off by 0.5
    ("ATTNCC_DECODE_CONFIG", "block_n=32", "ATTNCC_DECODE_CONFIG: unknown field 'block_n'"),   # ignored
    ("ATTNCC_DECODE_CONFIG", "BLOCK_M=64", "ATTNCC_DECODE_CONFIG: unknown field 'BLOCK_M'"),   # ignored
    ("ATTNCC_DECODE_CONFIG", "BLOCK_N", "ATTNCC_DECODE_CONFIG: expected BLOCK_N=VALUE"),
    ("ATTNCC_DECODE_CONFIG", "BLOCK_N=abc", "ATTNCC_DECODE_CONFIG: BLOCK_N must be an integer"),
    ("ATTNCC_DECODE_SPLITS", "0", "ATTNCC_DECODE_SPLITS must be an int >= 1"),  # ran as 1
    ("ATTNCC_DECODE_SPLITS", "-3", "ATTNCC_DECODE_SPLITS must be an int >= 1"),
    ("ATTNCC_DECODE_SPLITS", "1.5", "ATTNCC_DECODE_SPLITS must be an int >= 1"),
])
def test_decode_settings_are_checked_and_name_their_variable(causal, monkeypatch, variable, value, match):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=match):
        _decode(causal)


def test_good_decode_settings_still_run(causal, monkeypatch):
    monkeypatch.setenv("ATTNCC_DECODE_CONFIG", "BLOCK_N=32,num_warps=4,num_stages=13")  # bench's paged sweep
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", "3")
    assert _decode(causal) < 1e-5


# -- on/off variables --------------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["ATTNCC_TUNE", "ATTNCC_FAST_LAUNCH", "ATTNCC_DIRECT_LAUNCH", "ATTNCC_CHECK_DECODE"])
def test_on_off_variables_take_on_and_off_and_name_themselves(monkeypatch, variable):
    for text, value in (("1", True), ("true", True), ("on", True), ("0", False), ("false", False), ("no", False)):
        monkeypatch.setenv(variable, text)
        assert env_flag(variable, not value) is value
    monkeypatch.setenv(variable, "")
    assert env_flag(variable, True) is True
    for text in ("2", "maybe", "-1", " 1"):
        monkeypatch.setenv(variable, text)
        with pytest.raises(ValueError, match=f"^{variable} must be 1 .* or 0 .*got {text!r}"):
            env_flag(variable, False)


def test_tune_false_is_off_and_a_bad_value_is_refused_by_the_calls(causal, monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setenv("ATTNCC_TUNE", "false")  # was on
    assert tuning.tuning_enabled() is False
    monkeypatch.setenv("ATTNCC_FAST_LAUNCH", "sometimes")
    with pytest.raises(ValueError, match="ATTNCC_FAST_LAUNCH must be"):
        causal.attention(*_qkv())
    monkeypatch.delenv("ATTNCC_FAST_LAUNCH")
    monkeypatch.setenv("ATTNCC_CHECK_DECODE", "sometimes")
    with pytest.raises(ValueError, match="ATTNCC_CHECK_DECODE must be"):
        _decode(causal)


# -- attncc tune --show / --clear in a folder of other things -------------------------------------------

def test_tune_clear_deletes_only_tune_cache_files(tune_cache, capsys):
    tune_cache.mkdir(parents=True)
    (tune_cache / "package.json").write_text('{"name": "mine"}')
    (tune_cache / "settings.json").write_text("{}")
    broken = tune_cache / "NVIDIA-H100__triton-3.6.0.json"
    broken.write_text("not json")
    assert cli_main(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert "(0 entries in 1 file(s))" in out and "package.json" not in out
    assert cli_main(["tune", "--clear"]) == 0
    assert "removed 1 cache file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in tune_cache.iterdir()) == ["NVIDIA-H100__triton-3.6.0.lock", "package.json",
                                                            "settings.json"]
    assert (tune_cache / "package.json").read_text() == '{"name": "mine"}'
    # every name the cache writes is one --show and --clear take
    for gpu in ("NVIDIA H100 80GB HBM3", "cpu", "\u00e9/..", ""):
        assert fnmatch.fnmatch(tuning.cache_file_name(gpu, "3.6.0+git1"), tuning.CACHE_FILE_GLOB)


def test_tune_clear_with_other_work_is_refused(tune_cache, capsys):
    """`attncc tune --show --clear` deleted the cache without showing it, `attncc tune SPEC --clear`
    deleted it without tuning (both exit 0)."""
    tune_cache.mkdir(parents=True)
    kept = tune_cache / "NVIDIA-H100__triton-3.6.0.json"
    kept.write_text("{}")
    for argv in (["--show", "--clear"], ["spec.toml", "--clear"], ["spec.toml", "--show"]):
        assert cli_main(["tune", *argv]) == 2
        assert "takes no other work" in capsys.readouterr().err
    assert kept.exists()


@pytest.mark.parametrize("argv, match", [(["--batch", "0"], "--batch: expected positive"),
                                         (["--batch", "-1"], "--batch: expected positive"),
                                         (["--heads", "0"], "--heads: expected positive"),
                                         (["--batch", "2,3"], "--batch: expected one positive")])
def test_tune_refuses_empty_problems(argv, match, capsys):
    """--batch 0 (or --heads 0) went on to time kernels that run nothing and store the winner as the
    shape's config; on a machine without a GPU the bad value was never mentioned."""
    with pytest.raises(SystemExit) as e:
        cli_main(["tune", "spec.toml", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


# -- ATTNCC_TUNE=1 with a cache folder that cannot be written ---------------------------------------------

def _tune_call():
    from attncc.runtime import bind

    from cases import module
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 50, 32, generator=gen) for _ in range(2))
    return bind(module("causal").SPEC, q, k, k.clone())


def test_tuning_on_the_fly_with_an_unwritable_cache_keeps_the_config_in_process(tmp_path, monkeypatch, caplog):
    """ATTNCC_CACHE_DIR naming a file (or a read-only folder) with ATTNCC_TUNE=1: the store after
    tuning raised FileExistsError out of the user's attention call, and the next call tuned again
    (nothing was kept) and raised again. The module cache falls back with a warning; so does this."""
    from attncc.runtime.launch import pick_config

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker))
    tuning._LOADED.clear()
    call = _tune_call()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU path, with fake runs and timers
    timed = []

    def timer(fn):
        fn()
        timed.append(1)
        return 1.0

    with caplog.at_level("WARNING", logger="attncc"):
        best = tuning.tune(call, "", lambda c: None, timer=timer, quick_timer=timer, keep=True)
    assert "this process only: cannot write" in caplog.text and "ATTNCC_CACHE_DIR" in caplog.text
    assert tuning.cached_config(call) == best and pick_config(call) == best
    n = len(timed)
    assert tuning.tune(call, "", lambda c: None, timer=timer, quick_timer=timer, keep=True) == best
    assert len(timed) == n  # kept: not tuned again
    with pytest.raises(OSError):  # `attncc tune` (keep=False) says so
        tuning.tune(call, "dq", lambda c: None, timer=timer, quick_timer=timer)
    tuning._LOADED.clear()


# -- seeded clean cases: spec names like the generated code's own, explain's counts ---------------------

# Not reserved by the spec language, but the names of the generated code's locals, arguments and helpers.
RISKY_NAMES = """o lse tl triton torch math B H Nq Nk GROUP Q K V O LSE stride_qb stride_kn qk_scale acc m_i l_i
m_new qb bh hk offs_i offs_m offs_j keep qk p alpha kb start_n row t n_partial SPEC attention decode call cfg _rt
_forward _backward _fwd_kernel _fwd_tile _load_rows self x tmp0 bucket0 k0 s0 h0 x0 CU_Q TOTAL_Q HEAD_DIM WIDE
VARLEN LISTS DOT_PRECISION prm_w ptr_d stride0_d size0_d gptr_d t_d __class__ __name__ __builtins__ __import__
float int print len exec eval dict type object inputs_and_params kwargs full_count list_width dq dk dv Delta
delta D Dv N M ds dp sm_scale pid Hl _tk_and _int_reach q_start k_start""".split()


def _named_spec(rng):
    p1, p2, inp, fp = rng.sample(RISKY_NAMES, 4)
    spec = {"head_dim": 16, "dtypes": ["float32"],
            "params": {p1: rng.randint(2, 9), p2: rng.randint(2, 7), fp: rng.choice([0.25, -0.5, 1.5])}}
    kind = rng.randrange(3)
    if kind == 0:
        spec["mask"] = {"where": f"j <= i and i - j < {p1}"}
        spec["score"] = {"bias": f"{fp} * ((i - j) % {p2})"}
    elif kind == 1:
        spec["inputs"] = {inp: {"dims": ["b", "n"], "dtype": "int32"}}
        spec["mask"] = {"where": f"{inp}[b, i] == {inp}[b, j] or j < {p1}"}
        spec["score"] = {"bias": f"{fp} * abs(i - j) / {p2}"}
    else:
        spec["inputs"] = {inp: {"dims": ["h"], "dtype": "float32", "grad": True}}
        spec["mask"] = {"where": f"i // {p2} == j // {p2} or j <= i - {p1}"}
        spec["score"] = {"bias": f"{inp}[h] * (j - i) + {fp}"}
    return spec, kind, (p1, p2, inp, fp)


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_params_and_inputs_named_like_generated_code_run_right(seed, tmp_path, monkeypatch):
    """Probed clean over 80 seeds (python: the same loop): every name compiled, parsed, and ran
    forward and backward as attncc.reference."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    from attncc.module_cache import toml_text

    rng = random.Random(seed)
    spec, kind, (p1, _, inp, _) = _named_spec(rng)
    mod = attncc.compile(spec)
    ast.parse(open(mod.__file__, encoding="utf-8").read())
    gen = torch.Generator().manual_seed(seed)
    B, H, N = 2, 2, 33
    q, k, v = (torch.randn(B, H, N, 16, generator=gen, requires_grad=True) for _ in range(3))
    kw = {p1: 5}
    if kind == 1:
        kw[inp] = torch.randint(0, 3, (B, N), generator=gen, dtype=torch.int32).sort(-1).values
    if kind == 2:
        kw[inp] = torch.randn(H, generator=gen).requires_grad_(True)
    leaves = [q, k, v] + ([kw[inp]] if kind == 2 else [])
    o = mod.attention(q, k, v, **kw)
    ref = attncc.reference(parse_spec(toml_text(spec)), q, k, v, **kw)
    assert (o.double() - ref).abs().max() < 1e-4
    go = torch.randn(o.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(o, leaves, go), torch.autograd.grad(ref, leaves, go.double())):
        assert (a.double() - b).abs().max() < 1e-3


EXPLAIN_MASKS = ["j <= i and i - j < a", "abs(i - j) <= a or j < c0", "i // a == j // a",
                 "j <= i and (i - j) % a == 0", "j < c0 or i < c0 or abs(i - j) < a", "2 * j <= i + a",
                 "j >= i - a and j <= i + c0", "i % a == j % a", "j <= i // a + c0", "(i + j) % a < c0",
                 "max(i, j) - min(i, j) < a", "j <= n_k - n_q + i"]


@pytest.mark.parametrize("seed", range(12))
def test_explain_json_counts_equal_brute_force(seed, tmp_path, capsys):
    """`attncc explain --json` against tiles counted on attncc._reference.pair_mask (probed clean
    over 400 seeds: random masks, lengths, tile shapes, --param, --batch, --heads)."""
    import json

    from attncc._reference import pair_mask

    rng = random.Random(seed)
    text = (f'[params]\na = {rng.randint(1, 9)}\nc0 = {rng.randint(0, 7)}\n[mask]\n'
            f'where = "{EXPLAIN_MASKS[seed % len(EXPLAIN_MASKS)]}"\n')
    path = tmp_path / "s.toml"
    path.write_text(text)
    nq, nk = rng.randint(1, 90), rng.randint(1, 90)
    bm, bn = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
    a, batch, heads = rng.randint(1, 12), rng.randint(1, 3), rng.randint(1, 3)
    assert cli_main(["explain", str(path), "--n", str(nq), "--nk", str(nk), "--block", f"{bm}x{bn}", "--json",
                     "--param", f"a={a}", "--batch", str(batch), "--heads", str(heads)]) == 0
    out = json.loads(capsys.readouterr().out)
    m = pair_mask(parse_spec(text), q_rows=nq, k_rows=nk, params={"a": a})[0, 0]
    tiles = [m[x:x + bm, y:y + bn] for x in range(0, nq, bm) for y in range(0, nk, bn)]
    n = batch * heads
    assert out["tiles"]["empty"] == n * sum(not t.any() for t in tiles)
    # a ragged last key block is never FULL (the kernels mask the keys past the end there)
    assert out["tiles"]["full"] == n * sum(bool(t.all()) and t.shape[1] == bn for t in tiles)
    assert out["allowed_pairs"] == n * int(m.sum())
    assert out["walks"]["forward"]["visited"] >= n * sum(bool(t.any()) for t in tiles)


def test_build_and_explain_take_bare_spec_names_as_tune_does(tmp_path, monkeypatch, capsys):
    """``attncc build causal`` / ``explain causal`` read specs/causal.toml where no file ``causal``
    exists (they said "cannot read the spec: No such file or directory"); a file of that name wins."""
    from pathlib import Path

    from attncc.explain import main_explain

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    assert cli_main(["build", "causal", "--out", str(out)]) == 0
    assert (out / "causal.py").read_text() == (root / "generated" / "causal.py").read_text()
    assert main_explain(["causal", "--n", "256"]) == 0
    assert "causal  (specs/causal.toml)" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "causal").write_text('[mask]\nwhere = "j == i"\n')
    assert main_explain(["causal", "--n", "256"]) == 0
    here = capsys.readouterr().out
    assert "causal  (causal)" in here and "8: 4 empty, 0 full, 4 partial" in here
    assert cli_main(["build", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_a_spec_with_crlf_line_ends_is_the_same_spec(tmp_path, monkeypatch):
    """A spec file checked out with CRLF line ends (git's autocrlf) hashes as its LF copy: the shipped
    modules are not stale (`build --check`) and the pattern is the module's (attncc.distributed checks
    the hash); they hashed the raw text."""
    from pathlib import Path

    from attncc.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    for spec in sorted((root / "specs").glob("*.toml")):
        crlf = tmp_path / spec.name
        crlf.write_bytes(spec.read_bytes().replace(b"\n", b"\r\n"))
        assert load_spec(str(crlf)).source_hash == load_spec(str(spec)).source_hash, spec.name
    assert parse_spec('[mask]\r\nwhere = "j <= i"\r\n').source_hash == parse_spec('[mask]\nwhere = "j <= i"\n').source_hash
    assert parse_spec('[mask]\nwhere = "j <= i"\n').source_hash != parse_spec('[mask]\nwhere = "j < i"\n').source_hash
    monkeypatch.chdir(tmp_path)
    for folder in ("generated", "specs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "generated" / "causal.py").write_text((root / "generated" / "causal.py").read_text())
    (tmp_path / "specs" / "causal.toml").write_bytes((tmp_path / "causal.toml").read_bytes())
    assert b"\r\n" in (tmp_path / "specs" / "causal.toml").read_bytes()
    assert cli_main(["build", "--check", "specs/causal.toml"]) == 0
