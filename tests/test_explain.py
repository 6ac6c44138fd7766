"""``attncc explain``: exact numbers without torch for closed forms, the score section, the
dtype of the bytes line, a quiet exit into a closed pipe, the legend of ``--png``."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attncc import report
from attncc.analysis import analyze
from attncc.core import tiles
from attncc.explain import main_explain
from attncc.report import explain_data
from attncc.spec import load_spec, parse_spec
from tile_oracle import mask_spec, random_cover_mask, random_overrides, tile_classes

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
N_COVER_MASKS = 120
# static specs with closed forms at every size, and those whose walks take exact block lists:
# explain imports no torch for any of them (attncc.pair_counts counts the latter's pairs in numpy)
CLOSED_FORM_SPECS = ["causal", "sliding_window", "alibi", "softcap", "prefix_lm", "sink_window", "longformer",
                     "chunked_local", "block_diagonal", "dense", "t5_bias", "gqa", "cross_causal", "causal_dropout"]
BLOCK_LIST_SPECS = ["bigbird", "dilated", "strided", "neighborhood_2d"]


def _explain(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main_explain([str(a) for a in argv]) == 0
    return out.getvalue()


def _json(argv) -> dict:
    return json.loads(_explain(list(argv) + ["--json"]))


def _truth(pattern, n_q, n_k, block_m, block_n, params, batch, heads):
    """(allowed pairs, {walk: {class: count}}) over all batch rows and heads, from every pair."""
    from attncc._reference import pair_mask

    mask = pair_mask(pattern, q_rows=n_q, k_rows=n_k, batch=batch, heads=heads, params=params)
    counts = {"forward": dict.fromkeys(("empty", "full", "partial"), 0), "dkdv": dict.fromkeys(("empty", "full", "partial"), 0)}
    for b in range(batch):
        for h in range(heads):
            for walk, classes in zip(("forward", "dkdv"), tile_classes(mask[b, h], block_m, block_n)):
                for name, cls in (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL)):
                    counts[walk][name] += int((classes == cls).sum())
    return int(mask.sum()), counts


# ---------------------------------------------------------------------------
# exact, and fast: closed forms in plain Python ints
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [
    "b < 1 and j <= i",  # a guard on the batch row
    "h >= 1 or j <= i",  # full rows on some heads
    "(h == 0 and j < 5) or (j <= i and i - j < 20)",  # a column on head 0 only
    "(b == 1 and j < 3) or (j <= i and i - j < 30)",
])
def test_closed_forms_per_batch_row_and_head_equal_brute_force(mask):
    pattern = parse_spec(mask_spec("bh", mask, {}))
    plan = analyze(pattern)
    assert plan.forward.kind.value == "bands", plan.forward.reason
    for n_q, n_k, (block_m, block_n) in [(77, 140, (16, 32)), (130, 61, (32, 16)), (64, 64, (16, 16))]:
        d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, batch=2, heads=3)
        allowed, counts = _truth(pattern, n_q, n_k, block_m, block_n, {}, 2, 3)
        assert d["allowed_pairs"] == allowed
        assert {w: d["walks"][w]["tiles"] for w in counts} == counts


def test_closed_forms_equal_brute_force_and_take_the_fast_path(monkeypatch):
    """Seeded random masks of the shapes closed forms cover, random lengths, tiles and call-time
    params: explain's allowed pairs and both walks' tile counts equal the brute-force truth,
    and most cases never evaluate a pair (the tensor path is counted)."""
    every_pair = []
    original = report._every_pair_numbers
    monkeypatch.setattr(report, "_every_pair_numbers", lambda *a, **k: every_pair.append(1) or original(*a, **k))
    rng = random.Random(2101)
    for n in range(N_COVER_MASKS):
        mask, params = random_cover_mask(rng)
        pattern = parse_spec(mask_spec(f"cover{n}", mask, params))
        plan = analyze(pattern)
        n_q, n_k = rng.randint(1, 200), rng.randint(1, 200)
        block_m, block_n = rng.choice([(16, 16), (32, 16), (16, 32), (64, 32), (128, 64)])
        over = random_overrides(rng, params)
        d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=over)
        allowed, counts = _truth(pattern, n_q, n_k, block_m, block_n, over, 1, 1)
        case = f"{mask!r} params={params} call params={over} {n_q}x{n_k} tile {block_m}x{block_n}"
        assert d["allowed_pairs"] == allowed, case
        assert {w: d["walks"][w]["tiles"] for w in counts} == counts, case
    assert len(every_pair) < N_COVER_MASKS // 3, f"{len(every_pair)} of {N_COVER_MASKS} cases evaluated every pair"


@pytest.mark.parametrize("name", ["strided", "dilated", "bigbird"])
def test_block_list_specs_evaluate_every_pair_once(name, monkeypatch):
    """Specs without closed forms: the numbers from one pass over the pairs, equal to the truth."""
    from cases import SMALL_PARAMS

    pattern = load_spec(SPECS / f"{name}.toml")
    params = SMALL_PARAMS.get(name, {})
    calls = []
    original = report._every_pair_numbers
    monkeypatch.setattr(report, "_every_pair_numbers", lambda *a, **k: calls.append(1) or original(*a, **k))
    d = explain_data(analyze(pattern), n_q=150, n_k=97, block_m=32, block_n=16, params=params, batch=2, heads=2)
    allowed, counts = _truth(pattern, 150, 97, 32, 16, {**pattern.param_values, **params}, 2, 2)
    assert calls == [1]
    assert d["allowed_pairs"] == allowed
    assert {w: d["walks"][w]["tiles"] for w in counts} == counts


def test_explain_of_a_static_spec_imports_no_torch():
    """What made `attncc explain` take seconds: importing torch, and evaluating every pair with
    the float64 reference. A static spec needs neither (nor does its --json): closed forms count
    in Python ints, exact block lists in numpy; the check runs in a fresh interpreter."""
    specs = [str(SPECS / f"{n}.toml") for n in CLOSED_FORM_SPECS + BLOCK_LIST_SPECS]
    code = ("import contextlib, io, sys\n"
            "from attncc.explain import main_explain\n"
            f"for spec in {specs!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main_explain([spec, '--n', '8192']) == 0\n"
            "        assert main_explain([spec, '--n', '1000', '--nk', '333', '--json', '--batch', '2']) == 0\n"
            "assert 'torch' not in sys.modules, 'explain imported torch'\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=300)


# ---------------------------------------------------------------------------
# the score section
# ---------------------------------------------------------------------------

def test_score_section_names_bias_softcap_mod_and_what_the_kernels_do(tmp_path):
    d = _json([SPECS / "alibi.toml", "--n", "256", "--head-dim", "64"])["score"]
    assert d["bias"] == "(-i + j)*AlibiSlope(h, n_heads)" and d["scale"] == pytest.approx(0.125) and d["scale_default"]
    # the distance stays whole in the key loop (c0 * j and a dropped c0 * i lose digits at large i)
    assert d["dropped"] == []
    assert d["hoisted_per_program"] == ["c0 = AlibiSlope(h, n_heads)"] and d["loop_bias"] == "c0*float(-i + j)"
    text = _explain([SPECS / "alibi.toml", "--n", "256"])
    for want in ("  score       scale = ", "    bias      (-i + j)*AlibiSlope(h, n_heads)",
                 "    hoisted   c0 = AlibiSlope(h, n_heads)  (once per program)", "    key loop  s = scale*qk + c0*float(-i + j)"):
        assert want in text, text

    d = _json([SPECS / "softcap.toml", "--n", "256"])["score"]
    assert d["softcap"] == 30.0 and d["softcap_from_mod"] is None and d["mod"] is None
    assert "    softcap   30.0" in _explain([SPECS / "softcap.toml", "--n", "256"])

    spec = tmp_path / "cond.toml"
    spec.write_text('head_dim = 16\n[score]\nscale = 0.5\nsoftcap = 2.0\nbias = "0.5 * (i - j)"\n'
                    'mod = "where(j <= i and s > -0.5, s * 1.5, -inf)"\n')
    d = _json([spec, "--n", "64"])["score"]
    assert d["mask_from_mod"] == "i >= j" and d["mod"] == "where(s > -0.5, 1.5*s, -inf)"
    assert d["conditions"] == [{"where": "s > -0.5", "on_score": True}]
    assert d["bias"] == "0.5*(i - j)" and d["softcap"] == 2.0 and d["scale"] == 0.5 and not d["scale_default"]
    assert d["dropped"] == []  # with a mod and a softcap the bias stays whole in the key loop
    assert d["key_loop"] == ["s = scale*qk + 0.5*float(i - j)", "s = where(s > -0.5, 1.5*s, -inf)",
                             "s = 2.0*tanh(s/2.0)  (a removed pair stays -inf)"]
    text = _explain([spec, "--n", "64"])
    for want in ("    bias      0.5*(i - j)", "    mod       where(s > -0.5, 1.5*s, -inf)", "    softcap   2.0",
                 "    per pair  s > -0.5  (a condition the key loop evaluates per pair, on the score after scale "
                 "and bias)", "became the mask"):
        assert want in text, text


def test_score_section_of_a_plain_spec_and_of_dropout():
    d = _json([SPECS / "causal.toml", "--n", "64", "--head-dim", "16"])["score"]
    assert d["scale"] == 0.25 and d["key_loop"] == ["s = scale*qk"] and d["bias"] is d["mod"] is d["softcap"] is None
    assert "    dropout   p = 0.1" in _explain([SPECS / "causal_dropout.toml", "--n", "64"])


# ---------------------------------------------------------------------------
# the bytes line: dtype and head dims
# ---------------------------------------------------------------------------

def test_bytes_follow_dtype_and_head_dims(tmp_path):
    argv = [SPECS / "causal.toml", "--n", "1000", "--nk", "500", "--batch", "2", "--heads", "3"]
    d = _json(argv)
    assert d["dtype"] == "bf16" and d["head_dim"] == d["value_dim"] == 64  # the spec's first head dim
    assert d["bytes"] == 2 * 2 * 3 * (1000 * 64 + 500 * 128 + 1000 * 64)
    for flag, element in (("fp32", 4), ("fp16", 2), ("float32", 4), ("bfloat16", 2)):
        assert _json(argv + ["--dtype", flag])["bytes"] == element // 2 * d["bytes"]
    assert "(q, k, v, o in fp32 + " in _explain(argv + ["--dtype", "fp32"])
    assert "(q, k, v, o in bf16 + " in _explain(argv)
    d = _json(argv + ["--head-dim", "32", "--value-dim", "96"])
    assert d["bytes"] == 2 * 2 * 3 * (1000 * 32 + 500 * (32 + 96) + 1000 * 96)
    assert d["flops"] == 2 * (32 + 96) * d["allowed_pairs"]
    spec = tmp_path / "f32.toml"
    spec.write_text('head_dim = [48, 96]\nvalue_dim = 80\ndtypes = ["float32"]\n[heads]\nq = 4\nkv = 2\n')
    d = _json([spec, "--n", "100"])
    assert (d["dtype"], d["head_dim"], d["value_dim"], d["heads"], d["heads_kv"]) == ("fp32", 48, 80, 4, 2)
    assert d["bytes"] == 4 * (4 * 100 * 48 + 2 * 100 * (48 + 80) + 4 * 100 * 80)
    assert "heads_kv=2 head_dim=48 (spec: 48, 96) value_dim=80" in _explain([spec, "--n", "100"])
    assert _json([spec, "--n", "100", "--head-dim", "96"])["bytes"] == 4 * (4 * 100 * 96 + 2 * 100 * (96 + 80)
                                                                             + 4 * 100 * 80)


def test_bad_dtype_and_sizes_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main_explain([str(SPECS / "causal.toml"), "--dtype", "int8"])
    assert e.value.code == 2 and "expected one of bf16, fp16, fp32" in capsys.readouterr().err
    assert main_explain([str(SPECS / "causal.toml"), "--head-dim", "0"]) == 2
    assert "--head-dim must be positive, got 0" in capsys.readouterr().err
    # lengths past 2**24: refused at once (the counts take time in proportion to them: a probe's
    # --n 10**12 ran without end)
    assert main_explain([str(SPECS / "causal.toml"), "--n", str(10**12)]) == 2
    assert "lengths up to 2**24" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# a closed pipe (`attncc explain ... | head`)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["explain", "specs/causal.toml", "--n", "256"],
                                  ["explain", "specs/causal.toml", "--n", "256", "--json"],
                                  ["build", "specs/causal.toml", "--out", "{tmp}"],
                                  ["tune", "--show"]],
                         ids=["explain", "explain-json", "build", "tune-show"])
def test_a_closed_pipe_ends_quietly(argv, tmp_path):
    """stdout a pipe whose reader is gone before the first write: no traceback, status 141."""
    read, write = os.pipe()
    os.close(read)
    env = dict(os.environ, PYTHONPATH=str(ROOT), ATTNCC_CACHE_DIR=str(tmp_path / "cache"))
    try:
        proc = subprocess.run([sys.executable, "-m", "attncc", *[a.format(tmp=tmp_path) for a in argv]], cwd=ROOT,
                              env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr


# ---------------------------------------------------------------------------
# --png
# ---------------------------------------------------------------------------

def test_png_has_legends_and_names_the_synthetic_inputs(tmp_path):
    pytest.importorskip("matplotlib")
    from attncc.analysis.graph import plan_grid
    from attncc.explain import PAIR_LEGEND, TILE_LEGEND, figure

    assert [label.split(":")[0] for _, label in TILE_LEGEND] == ["empty", "partial", "full"]
    assert (tiles.EMPTY, tiles.PARTIAL, tiles.FULL) == (0, 1, 2)  # the colours' order
    out = _explain([SPECS / "document.toml", "--n", "300", "--png", tmp_path / "doc.png"])
    assert "wrote" in out and (tmp_path / "doc.png").stat().st_size > 0
    d = _json([SPECS / "document.toml", "--n", "300"])
    plan = analyze(load_spec(SPECS / "document.toml"))
    inputs = report.synthesize_inputs(plan, batch=1, heads=1, positions=300)
    grid = plan_grid(plan, q_rows=300, k_rows=300, block_m=128, block_n=64, inputs=inputs)
    fig = figure(d, grid[0, 0], torch.ones(300, 300, dtype=torch.bool))
    tile_ax, pair_ax = fig.axes
    assert [t.get_text() for t in tile_ax.get_legend().get_texts()] == [label for _, label in TILE_LEGEND]
    assert [t.get_text() for t in pair_ax.get_legend().get_texts()] == [label for _, label in PAIR_LEGEND]
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "synthetic inputs" in notes and "doc: ids of 4 equal segments" in notes
    static = figure(_json([SPECS / "causal.toml", "--n", "300"]),
                    plan_grid(analyze(load_spec(SPECS / "causal.toml")), q_rows=300, k_rows=300, block_m=128,
                              block_n=64)[0, 0])
    assert len(static.axes) == 1 and not static.texts and static.axes[0].get_legend() is not None


def test_png_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(SystemExit, match=r"needs matplotlib: pip install 'attncc\[viz\]'"):
        main_explain([str(SPECS / "causal.toml"), "--n", "300", "--png", str(tmp_path / "x.png")])
    assert capsys.readouterr().out == "" and not (tmp_path / "x.png").exists()


def test_a_param_given_twice_is_refused(capsys):
    """--param w=1 --param w=2 is an error (status 2), not the last one silently."""
    assert main_explain([str(SPECS / "sliding_window.toml"), "--param", "window=8", "--param", "window=9"]) == 2
    assert "--param window given more than once" in capsys.readouterr().err
