"""Probe mladot22: ``dot(x[..., :], y[..., :])`` of a per-query and a per-key input as a tile product.

Defect (long-standing): the parser writes a dot out as its R products, and the kernels computed it
so: R gathers and products per pair of every score tile, 2R gradient terms in the dQ tile. At MLA's
decoupled RoPE part (``bias = "0.125 * dot(q_rope[b, h, i, :], k_rope[b, j, :])"``, R = 64,
tests/gpu/test_gpu_v1.py "v1_mla_dot") Triton compiled the kernels for 13-20+ minutes on an H100 (its
TTGIR passes); on this machine's CPU the forward alone took 170 s of CPU to PTX (148 s in TTGIR),
the dQ kernel had not finished after 150 s of CPU. Fixed: attncc.analysis.tile_dot finds such dots (a Plan's
``lowering``: TileDot, the bias or mod with a DotTile value per dot), attncc.codegen.tile_dots
renders them as ``tl.dot(resident tile, tl.trans(streamed tile))`` in the forward, dQ, dK/dV and
decode kernels, and the learned operands' gradients as ``dS @ Y`` and ``dS^T @ X`` with atomics;
the Gluon target refuses such Plans with the reason (it has no tile product).

Probed (under the interpreter, against the float64 attncc.reference): forward, LSE and the
gradients of q, k, v, both dot operands and a learned 0-d temperature, at R in {1, 3, 16, 17, 64},
float32 (R = 1, 16, 17, 64) and bfloat16 (R = 3, 64), GQA (4 query heads on 2), Nq != Nk, q and k offsets, a mask, a softcap, a mod,
a coefficient of a number, of 1/8 and of a param, a key operand read by the kv head (h // 2), a dot
in the mod (``score + rs * dot(...)``), decoding (the head-read key operand falls back to the
written-out form there), k and v of batch 1 broadcast over q's batch (6 cases); bfloat16
operands exactly against the reference given the same bfloat16 values (2); dots that do not fit a
tile product stay written out, correctly (both operands on i, one on neither, a partial sum, inside
a function: 4 patterns, one run); the generated source (tl.dot, no 64-way unroll, Gluon refused);
the sm90 PTX compile of the v1_mla_dot kernels at R = 64 (slow: a child process).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attncc
from attncc.analysis import analyze
from attncc.analysis.builtin import gluon_fit
from attncc.module_cache import toml_text
from cases import build_inline, rel_err, vjp_case



def _spec(R, dtype, *, bias=None, mod=None, mask=None, softcap=None, key_dims=("b", "n"), params=None, temp=False):
    inputs = {"q_rope": {"dims": ["b", "h", "n", R], "dtype": dtype, "grad": True},
              "k_rope": {"dims": [*key_dims, R], "dtype": dtype, "grad": True}}
    if temp:
        inputs["temp"] = {"dims": [], "dtype": "float32", "grad": True}
    keys = {"head_dim": [16], "heads": {"q": 4, "kv": 2}, "inputs": inputs, "params": params or {},
            "score": {k: v for k, v in (("bias", bias), ("mod", mod), ("softcap", softcap)) if v is not None}}
    if mask:
        keys["mask"] = {"where": mask}
    return keys


MLA = "0.125 * dot(q_rope[b, h, i, :], k_rope[b, j, :])"
VARIANTS = {
    # MLA's: causal, a learned temperature in the mod
    "mla": lambda R, dt: _spec(R, dt, bias=MLA, mod="s * temp", mask="causal", temp=True),
    # a mask, a softcap, another bias term, 1/8, the key operand read by the kv head
    "masked": lambda R, dt: _spec(R, dt, bias="dot(q_rope[b, h, i, :], k_rope[b, h // 2, j, :]) / 8 + 0.01 * (i - j)",
                                  mask="j <= i + 3", softcap=5.0, key_dims=("b", "h", "n")),
    # a dot in the mod, by a param
    "mod": lambda R, dt: _spec(R, dt, mod="score + rs * dot(q_rope[b, h, i, :], k_rope[b, j, :])", params={"rs": 0.5},
                               mask="abs(i - j) <= 12"),
}
# (bfloat16 "mla": the temperature's gradient, a sum that cancels across each row, is 22% off the
# reference at bfloat16's o and dO, written out or not)
CASES = [(1, "float32", "mla"), (3, "bfloat16", "masked"), (16, "float32", "mod"), (17, "float32", "masked"),
         (64, "bfloat16", "mod"), (64, "float32", "mla")]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    texts = {f"dot_{v}_{R}_{dt}": toml_text(VARIANTS[v](R, dt)) for R, dt, v in CASES}
    return build_inline(texts, tmp_path_factory.mktemp("mladot22"))


def _tables(p, B, n, gen):
    return {d.name: torch.randn([{"b": B, "h": 4, "n": n}.get(x, x) for x in d.dims], generator=gen) * 0.5
            + (1.0 if d.name == "temp" else 0.0) for d in p.inputs}


@pytest.mark.parametrize("R, dtype, variant", CASES, ids=[f"{v}-R{R}-{dt}" for R, dt, v in CASES])
def test_lowered_dots_match_the_reference(kernels, R, dtype, variant):
    """o, LSE and every gradient (q, k, v, both operands, the temperature) against the reference,
    GQA, Nq != Nk, offsets; decode's last rows; k, v of batch 1 broadcast over q's batch."""
    name = f"dot_{variant}_{R}_{dtype}"
    p, mod = kernels[name]
    assert analyze(p).dots, "the dot is lowered"
    gen = torch.Generator().manual_seed(R)
    torch_dtype = getattr(torch, dtype)
    tol = 1e-3 if dtype == "float32" else 2e-2  # (bfloat16: o, dq, dk, dv rounded to it)
    # the tables in the operands' dtype, so that the reference reads the values the kernels do (a learned
    # temperature's gradient cancels across a row: a rounding of the tables moved it by 20%)
    kw = {n: t.to(torch_dtype) if t.dim() else t for n, t in _tables(p, 2, 40, gen).items()}
    vjp_case(name, p=p, mod=mod, B=2, Nq=21, Nk=27, q_offset=5, k_offset=2, kw=kw, seed=R, dtype=torch_dtype, tol=tol)
    # decoding: the last 3 rows of a 40-row sequence
    q, k, v = (torch.randn(2, h, 40, 16, generator=gen).to(torch_dtype) for h in (4, 2, 2))
    read = kw
    last = mod.decode(q[:, :, -3:], k, v, kv_len=torch.tensor([40, 40], dtype=torch.int32), **read)
    want = attncc.reference(p, q.double(), k.double(), v.double(), **{n: t.double() for n, t in read.items()})
    assert rel_err(last, want[:, :, -3:]) < tol
    # k, v of batch 1 for a q of batch 2
    o = mod.attention(q[:, :, :23], k[:1], v[:1], **read)
    want = attncc.reference(p, q[:, :, :23].double(), k[:1].expand(2, -1, -1, -1).double(),
                            v[:1].expand(2, -1, -1, -1).double(), **{n: t.double() for n, t in read.items()})
    assert rel_err(o, want) < tol


@pytest.mark.parametrize("R, variant", [(3, "masked"), (64, "mod")])
def test_bfloat16_operands_exactly(kernels, R, variant):
    """bfloat16 tiles straight into tl.dot (float32 products and sums): the LSE against the reference
    given the same bfloat16 values, to float32's rounding (the interpreter computes bfloat16 dots
    wrongly: the module hands it float32, _rt.dot_operand; a wrong product was off by 1e10)."""
    p, mod = kernels[f"dot_{variant}_{R}_bfloat16"]
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen).bfloat16() for h, n in ((4, 19), (2, 25), (2, 25)))
    kw = {n: t.bfloat16() if t.dim() else t for n, t in _tables(p, 2, 30, gen).items()}
    o, lse = mod.attention(q, k, v, q_offset=4, k_offset=1, return_lse=True, **kw)
    ro, rlse = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=4, k_offset=1, return_lse=True,
                                **{n: t.double() for n, t in kw.items()})
    finite = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], rlse[finite]) < 1e-5
    assert rel_err(o, ro) < 1e-2  # (o is rounded to bfloat16)


def test_forced_gluon_names_the_dot(kernels, monkeypatch):
    """ATTNCC_BACKEND=gluon on a spec with a tile dot is refused, naming the dot (auto keeps tl)."""
    p, mod = kernels["dot_mla_1_float32"]
    assert mod.SPEC.gluon is None and "dot(q_rope[b, h, i, :], k_rope[b, j, :])" in mod.SPEC.gluon_reason
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 8, 16, generator=gen) for h in (4, 2, 2))
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    with pytest.raises(ValueError, match=r"tile product \(tl\.dot\)"):
        mod.attention(q, k, v, **_tables(p, 1, 8, gen))


NOT_LOWERED = {
    "both_on_i": "dot(x[b, i, :], y[b, i, :]) * 0.1",
    "one_on_neither": "dot(z[b, h, :], y[b, j, :])",
    "partial": "sum(x[b, i, t] * y[b, j, t] for t in range(2))",
    "in_a_function": "tanh(dot(x[b, i, :], y[b, j, :]))",
}


def test_dots_that_do_not_fit_stay_written_out(tmp_path):
    """A dot whose operands are not one per-query and one per-key vector over a whole axis keeps the
    written-out form, and computes it right (o, LSE, every gradient)."""
    inputs = {"x": {"dims": ["b", "n", 3], "dtype": "float32", "grad": True},
              "y": {"dims": ["b", "n", 3], "dtype": "float32", "grad": True},
              "z": {"dims": ["b", "h", 3], "dtype": "float32", "grad": True}}
    for name, bias in NOT_LOWERED.items():
        p = attncc.parse_spec(toml_text({"head_dim": [16], "inputs": inputs, "score": {"bias": bias}}))
        assert analyze(p).dots == (), name
    keys = {"head_dim": [16], "heads": {"q": 4, "kv": 2}, "inputs": inputs, "mask": {"where": "causal"},
            "score": {"bias": " + ".join(NOT_LOWERED.values())}}
    (p, mod), = build_inline({"dot_written": toml_text(keys)}, tmp_path).values()
    assert analyze(p).dots == ()
    gen = torch.Generator().manual_seed(3)
    vjp_case("dot_written", p=p, mod=mod, B=2, Nq=13, Nk=17, k_offset=3, kw=_tables(p, 2, 20, gen), seed=3)


def _source(keys):
    from attncc.codegen import render

    return render(attncc.parse_spec(toml_text(keys)))


def test_the_kernels_take_the_dot_as_one_tile_product():
    """v1_mla_dot at R = 64: each kernel computes the dot with one tl.dot of a query tile and a key
    tile (the dQ kernel its two gradients with two more), no term by term; Gluon refuses it with the
    reason. Before: 64 loads of q_rope's entries per kernel and 128 gradient terms."""
    keys = dict(_spec(64, "bfloat16", bias=MLA, mod="s * temp", mask="causal", temp=True), name="v1_mla_dot")
    src = _source(keys)
    forward, dq, dkdv, decode = ("def _fwd_tile(", "def _dq_tile(", "def _dkdv_tile(", "def _dec_tile(")
    for fn in (forward, dq, decode):
        body = src[src.index(fn):].split("\n\n\n")[0]
        assert "dot0 = tl.dot(dot0_q, tl.trans(dot0_k))" in body, fn
    body = src[src.index(dkdv):].split("\n\n\n")[0]
    assert "dot0 = tl.dot(dot0_k, tl.trans(dot0_q))" in body
    body = src[src.index(dq):].split("\n\n\n")[0]
    assert 'tl.dot(gdot0, dot0_k.to(tl.float32), input_precision="tf32x3")' in body
    assert 'tl.dot(tl.trans(gdot0), dot0_q.to(tl.float32), input_precision="tf32x3")' in body
    # no written-out terms: a tile of q_rope is read once per kernel (forward, dQ, dK/dV, decode), its
    # axis by one arange, never entry by entry (written out: 64 reads in each kernel)
    assert src.count("tl.load(ptr_q_rope") == 4 and "tl.arange(0, 64)[None, :] * stride3_q_rope" in src
    assert "63 * stride3_q_rope" not in src and "row63" not in src
    p = attncc.parse_spec(toml_text(keys))
    fit = gluon_fit(analyze(p))
    assert fit.kind is None and "dot(q_rope[b, h, i, :], k_rope[b, j, :])" in fit.reason
    assert "gluon_reason=" in src and "tl.dot" in fit.reason


# -- the sm90 compile of the v1_mla_dot kernels ------------------------------------------------------

def _child(out_path, R):
    """Records v1_mla_dot's launches (forward and backward, bfloat16, head dim 128) as on a GPU and
    compiles each to PTX for sm90; writes {kernel: CPU seconds} (Triton compiles in this thread: its
    CPU time, unlike the wall time, does not grow with the machine's load)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import attncc.runtime.call
    from kernel_compile import compile_launch, recorded_launches

    keys = dict(_spec(R, "bfloat16", bias=MLA, mod="s * temp", mask="causal", temp=True), name="v1_mla_dot",
                head_dim=[128])
    mod = attncc.compile(keys)
    from test_sm90_compile import _interpreting

    # the argument checks (and a backward's second look at the device) take CPU tensors under the interpreter only
    attncc.runtime.call._bind_checked = _interpreting(attncc.runtime.call._bind_checked)
    attncc.runtime.call.Call.check_device = _interpreting(attncc.runtime.call.Call.check_device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(1, h, 200, 128, generator=gen) / 4).bfloat16().requires_grad_() for h in (4, 2, 2))
    kw = {"q_rope": torch.randn(1, 4, 200, R, generator=gen).bfloat16().requires_grad_(),
          "k_rope": torch.randn(1, 200, R, generator=gen).bfloat16().requires_grad_(),
          "temp": torch.tensor(1.0, requires_grad=True)}
    with recorded_launches() as launches:
        o = mod.attention(q, k, v, **kw)
        torch.autograd.grad(o.float().sum(), [q, k, v, *kw.values()])
    seconds = {}
    for launch in launches:
        start = time.process_time()
        compile_launch(launch, "ptx")
        seconds[launch.name] = time.process_time() - start
    Path(out_path).write_text(json.dumps(seconds))


@pytest.mark.slow
def test_the_mla_kernels_compile_for_sm90_in_seconds(tmp_path):
    """The forward, dQ and dK/dV kernels of v1_mla_dot (R = 64, bfloat16, head dim 128, the built-in
    configs) compile to PTX for sm90 in a child process without a GPU, each well under a minute of
    CPU (measured on this 2-core machine: forward 1.3 s, dQ 6.1 s, dK/dV 2.4 s; written out, the
    forward took 170 s, 148 s of it in TTGIR, and the dQ kernel had not finished after 150 s)."""
    from kernel_compile import without_interpreter

    env = dict(without_interpreter(), ATTNCC_CACHE_DIR=str(tmp_path / "cache"), ATTNCC_FAST_LAUNCH="0")
    out = tmp_path / "seconds.json"
    run = subprocess.run([sys.executable, __file__, "--child", str(out), "64"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-4000:]
    seconds = json.loads(out.read_text())
    assert set(seconds) == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}, seconds
    assert all(s < 60 for s in seconds.values()), seconds


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], int(sys.argv[3]))
