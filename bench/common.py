"""Shared pieces of the benchmark scripts: device and dtype, timing, FlexAttention, building specs
written inline, document ids, error-tolerant cases and markdown tables.

Import this module before torch or triton: with ``--smoke`` on the command line it turns on Triton's
interpreter, and every script then runs on the CPU at tiny sizes (a check that the script works,
not a measurement).
"""
from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEV = "cpu" if SMOKE else "cuda"
# bfloat16 on the GPU; float32 under the interpreter, which computes in numpy
DTYPE = torch.float32 if SMOKE else torch.bfloat16
# FLOPs of forward + backward as a multiple of the forward's (backward: 5 matmuls against 2)
FWD_BWD_FLOPS = 3.5


def banner(title: str) -> str:
    dev = "CPU (TRITON_INTERPRET=1, smoke sizes)" if SMOKE else torch.cuda.get_device_name()
    return (f"{title}: torch {torch.__version__}, triton {__import__('triton').__version__}, {dev}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def bench(fn, grad_to_none=None, warmup=100, rep=400):
    """Median milliseconds of ``fn()``: triton's do_bench on the GPU; one timed call in smoke mode."""
    if SMOKE:
        for x in grad_to_none or ():
            x.grad = None
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def heat_up(seconds: float = 30.0):
    """Keep the GPU busy with bf16 matmuls for ``seconds`` before timing: under sustained load the
    H100's clock settles 7-18% below its cool boost (measured: the same kernel timed first and a
    minute later), and without this the first implementation timed gets the cool clock."""
    if SMOKE:
        return
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench_grad(fn, tensors, warmup=50, rep=300):
    """Median milliseconds of a forward + backward ``fn()``, the gradients of ``tensors`` reset between runs."""
    fn()
    return bench(fn, grad_to_none=tensors, warmup=warmup, rep=rep)


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def attention_flops(B, H, Nq, Nk, D, density=1.0):
    """Forward FLOPs of softmax attention (two matmuls) over the allowed fraction of the pairs."""
    return 4 * B * H * Nq * Nk * D * density


def causal_density(N: int) -> float:
    return (N + 1) / (2 * N)


CAUSAL_SPECS = ("causal", "alibi", "softcap", "gqa", "rope_causal")


def density(spec: str, N: int, kw: dict) -> float:
    """Allowed fraction of the N x N pairs of a shipped self-attention spec (``kw``: its params and inputs)."""
    if spec == "dense":
        return 1.0
    if spec in CAUSAL_SPECS:
        return causal_density(N)
    if spec == "sliding_window":
        w = kw["window"]
        return sum(min(i + 1, w) for i in range(N)) / N / N
    if spec == "document":
        return doc_causal_density(kw["doc"])
    return pair_density(spec, N, kw)


def pair_density(spec: str, N: int, kw: dict, rows: int = 1024) -> float:
    """Allowed fraction of the N x N pairs of a static shipped spec, counted pair by pair with the
    reference's mask (``kw``: its params), ``rows`` query rows at a time on DEV."""
    from attncc import _reference
    from attncc.spec import load_spec

    p = load_spec(ROOT / "specs" / f"{spec}.toml")
    params = {k: v for k, v in kw.items() if k in p.param_values}
    allowed = 0
    for r0 in range(0, N, rows):
        m = _reference.pair_mask(p, q_rows=min(rows, N - r0), k_rows=N, q_offset=r0, n_q=N, n_k=N, params=params,
                                 device=DEV)
        allowed += int(m.sum())
    return allowed / N / N


def doc_causal_density(doc: torch.Tensor) -> float:
    """Allowed fraction of a causal-within-documents mask for document ids ``doc [B, N]``."""
    B, N = doc.shape
    tot = 0
    for row in doc.cpu():
        _, counts = torch.unique_consecutive(row, return_counts=True)
        tot += int((counts * (counts + 1) // 2).sum())
    return tot / B / N / N


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------


def rel(a, b) -> float:
    """Relative Frobenius error of ``a`` against ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def documents(B, N, seed=0, mean=1024, device=None):
    """Packed documents with random lengths (exponential, mean ``mean``), as int32 ids [B, N]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        ids, pos, d = [], 0, 0
        while pos < N:
            n = max(1, int(-mean * math.log(1 - float(torch.rand(1, generator=g)))))
            ids += [d] * n
            pos += n
            d += 1
        rows.append(ids[:N])
    return torch.tensor(rows, dtype=torch.int32, device=device or DEV)


def qkv(B, Hq, N, D, Hkv=None, seed=0, dtype=None):
    torch.manual_seed(seed)
    shapes = [(B, Hq, N, D), (B, Hkv or Hq, N, D), (B, Hkv or Hq, N, D)]
    return tuple(torch.randn(*s, device=DEV, dtype=dtype or DTYPE) for s in shapes)


def rotary_tables(N, D, theta=10000.0, device=None):
    """cos and sin [N, D] of NeoX-style rotary embedding (pair m with m + D/2), float32."""
    inv = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2 / D)
    ang = torch.arange(N, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float().to(device or DEV), ang.sin().float().to(device or DEV)


def apply_rotary(x, cos, sin):
    """NeoX rotary of ``x [B, H, N, D]`` in plain torch (what a model does before SDPA)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# FlexAttention and SDPA
# ---------------------------------------------------------------------------------------------


def flex_setup():
    """(flex_attention, create_block_mask) after a dynamo reset: compiled on the GPU, eager on the CPU.

    A fresh compile per case: otherwise FlexAttention hits dynamo's recompile limit after a few
    shapes (and requires_grad variants) and silently falls back to its slow eager path.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()
    if SMOKE:
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_pattern(spec: str, H: int, kw: dict, n: int = 0):
    """(score_mod, mask_mod, mask_per_batch) of FlexAttention for a shipped spec: the same
    pattern written as Flex's callables (None where the spec has no such part); ``n``: the
    sequence length (BigBird's random blocks depend on it)."""
    doc, win = kw.get("doc"), kw.get("window")

    def causal(b, h, qi, ki):
        return qi >= ki

    def sliding_window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < win)

    def document(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)

    def softcap(s, b, h, qi, ki):
        return 30.0 * torch.tanh(s / 30.0)

    def alibi(s, b, h, qi, ki):
        return s + slopes[h] * (ki - qi)

    # the families of issue 16 (static masks: closed forms or exact block lists in attncc)
    p_ = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}

    def sink_window(b, h, qi, ki):
        return (ki < p_["sinks"]) | ((qi >= ki) & (qi - ki < p_["window"]))

    def chunked_local(b, h, qi, ki):
        return (qi >= ki) & (qi // p_["chunk"] == ki // p_["chunk"])

    def block_diagonal(b, h, qi, ki):
        return qi // p_["chunk"] == ki // p_["chunk"]

    def neighborhood_2d(b, h, qi, ki):
        w, r = p_["width"], p_["radius"]
        return ((qi // w - ki // w).abs() <= r) & ((qi % w - ki % w).abs() <= r)

    def prefix_lm(b, h, qi, ki):
        return (ki < p_["prefix"]) | (qi >= ki)

    def longformer(b, h, qi, ki):
        return (qi < p_["g"]) | (ki < p_["g"]) | ((qi - ki).abs() <= p_["w"])

    def strided(b, h, qi, ki):
        s = p_["stride"]
        return (qi >= ki) & (((qi - ki) < s) | (ki % s == s - 1))

    def dilated(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < p_["window"]) & ((qi - ki) % p_["dilation"] == 0)

    def bigbird(b, h, qi, ki):  # specs/bigbird.toml: 64-blocks, window 1, global 64, 3 random blocks, seed 0
        return ((qi // 64 - ki // 64).abs() <= 1) | (qi < 64) | (ki < 64) | chosen[qi // 64, ki // 64]

    masks = {"dense": None, "sliding_window": sliding_window, "document": document,
             **{name: causal for name in CAUSAL_SPECS}}
    for fn in (sink_window, chunked_local, block_diagonal, neighborhood_2d, prefix_lm, longformer, strided, dilated,
               bigbird):
        masks[fn.__name__] = fn
    if spec == "bigbird":
        from attncc.core.semantics import random_block_set

        if n <= 0:
            raise ValueError("flex_pattern('bigbird', ...) needs the sequence length n")
        rows = -(-n // 64)
        chosen = torch.zeros(rows, rows, dtype=torch.bool)
        for qr in range(rows):
            picked = list(random_block_set(qr, rows, 3, 0))
            if picked:
                chosen[qr, picked] = True
        chosen = chosen.to(DEV)
    if spec not in masks:
        raise KeyError(f"no FlexAttention form of spec {spec!r}")
    if spec == "alibi":
        from attncc.core.semantics import alibi_slope

        slopes = torch.tensor([alibi_slope(h, H) for h in range(H)], device=DEV)
    score_mod = {"alibi": alibi, "softcap": softcap}.get(spec)
    return score_mod, masks[spec], spec == "document"


def flex_grad_output(row: dict, do):
    """The output gradient to time FlexAttention's forward + backward with: none on the CPU, which
    has no Flex backward (noted in ``row``)."""
    if SMOKE and do is not None:
        note(row, "flex f+b: no Flex backward on CPU")
        return None
    return do


def sdpa_backends():
    """[(label, SDPBackend)] of the fused SDPA kernels to compare with; none on the CPU."""
    if SMOKE:
        return []
    from torch.nn.attention import SDPBackend

    return [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]


def sdpa_call(backend, fn):
    """``fn()`` with SDPA restricted to ``backend`` (None: torch's own choice)."""
    if backend is None:
        return fn()
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return fn()


# ---------------------------------------------------------------------------------------------
# generated modules
# ---------------------------------------------------------------------------------------------


def generated(name: str):
    """The shipped module ``generated/<name>.py``."""
    return importlib.import_module(f"generated.{name}")


def build_inline(specs: dict, out_dir=None) -> dict:
    """Build spec texts ``{name: toml}`` with attncc's build API into ``out_dir`` (a fresh temporary
    directory by default) and import them: ``{name: (pattern, module)}``. A spec that fails to build
    maps to its exception instead."""
    from attncc.codegen import build
    from attncc.spec import load_spec

    out = Path(out_dir or tempfile.mkdtemp(prefix="attncc_bench_"))
    result = {}
    for name, text in specs.items():
        try:
            path = out / f"{name}.toml"
            path.write_text(text)
            (written,) = build([path], out / "gen")
            spec = importlib.util.spec_from_file_location(f"_attncc_bench_{name}", written)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            result[name] = (load_spec(path), mod)
        except Exception as e:  # reported in the table, the other specs still run
            result[name] = e
    return result


# ---------------------------------------------------------------------------------------------
# error-tolerant cases and tables
# ---------------------------------------------------------------------------------------------


def short_error(e: BaseException, n=100) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def attempt(row: dict, key: str, fn):
    """``row[key] = fn()``; on an exception, note it in ``row['note']`` and leave ``key`` out."""
    try:
        row[key] = fn()
        return row[key]
    except Exception as e:
        note(row, f"{key}: {short_error(e)}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        if not SMOKE and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def note(row: dict, text: str):
    row["note"] = (row["note"] + "; " if row.get("note") else "") + text


def release():
    """Free cached GPU memory between cases."""
    if not SMOKE and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def markdown(rows, columns) -> str:
    """A markdown table; ``columns`` are (header, key or callable(row), format spec). Missing: '-'."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" if f == "s" else "---:" for _, _, f in columns) + "|"]
    for r in rows:
        cells = []
        for _, key, spec in columns:
            v = key(r) if callable(key) else r.get(key)
            cells.append(fmt(v, spec).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(a: str, b: str):
    """A column function: row[a] / row[b] when both are there."""
    return lambda r: r[a] / r[b] if r.get(a) and r.get(b) else None


def add_tflops(row: dict, flops: float, skip=()):
    """For every ``<x>_ms`` (forward) and ``<x>_fb_ms`` (forward + backward) timing in ``row`` but
    those in ``skip``, add ``<x>_tflops`` / ``<x>_fb_tflops``."""
    for key in list(row):
        if key in skip or not key.endswith("_ms"):
            continue
        scale = FWD_BWD_FLOPS if key.endswith("_fb_ms") else 1.0
        row[key[:-3] + "_tflops"] = tflops(scale * flops, row[key])


def measure(row: dict, label: str, fn, q, k, v, do=None):
    """Time ``fn(q, k, v) -> o`` into ``row[label + '_ms']`` and, with ``do`` (the output gradient),
    its forward + backward into ``row[label + '_fb_ms']``. Returns (o, (dq, dk, dv)) from one
    untimed call for comparisons; None for what failed (the error goes to the row's note)."""
    o = None
    with torch.no_grad():
        if attempt(row, label + "_ms", lambda: bench(lambda: fn(q, k, v))) is not None:
            o = fn(q, k, v)
    grads = None
    if do is not None:
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def fwd_bwd():
            fn(qg, kg, vg).backward(do)

        if attempt(row, label + "_fb_ms", lambda: bench_grad(fwd_bwd, [qg, kg, vg], rep=300)) is not None:
            grads = torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), do)
        del qg, kg, vg
    return o, grads


def compare(row: dict, key: str, a, b):
    """``row[key]``: the largest absolute difference of ``a`` and ``b`` (tensors or tuples of them)."""
    if a is None or b is None:
        return
    pairs = list(zip(a, b)) if isinstance(a, (tuple, list)) else [(a, b)]
    attempt(row, key, lambda: max(max_abs(x, y) for x, y in pairs))


def write_out(out_dir, filename: str, text: str):
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / filename).write_text(text)
