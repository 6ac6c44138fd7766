"""What every benchmark shares: the device and dtype (or the CPU smoke mode), inputs, mask densities
and FLOPs, FlexAttention and SDPA forms of the shipped specs, inline spec builds, error-tolerant
rows and markdown tables.

Import this module (or anything of bench/) before triton: with ``--smoke`` on the command line
(or ``BENCH_SMOKE=1``) it turns on Triton's interpreter, and every benchmark then runs on the CPU at
tiny sizes: a check that the code runs, not a measurement. Timing is bench/timer.py's.
"""
from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv[1:] or os.environ.get("BENCH_SMOKE") == "1"
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `generated.<name>` and attncc from the checkout

DEV = "cpu" if SMOKE else "cuda"
# bfloat16 on the GPU; float32 under the interpreter, which computes in numpy
DTYPE = torch.float32 if SMOKE else torch.bfloat16
# FLOPs of forward + backward as a multiple of the forward's (backward: 5 matmuls against 2)
FWD_BWD_FLOPS = 3.5


def require_device(what: str) -> None:
    """Exit with a clear message when there is no GPU and no --smoke (instead of failing later)."""
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit(f"{what}: needs a CUDA GPU; --smoke runs it on the CPU under the Triton interpreter "
                         f"(tiny sizes: a check that it runs, not a measurement)")


def banner(title: str) -> str:
    dev = "CPU (TRITON_INTERPRET=1, smoke sizes)" if SMOKE else torch.cuda.get_device_name()
    return (f"{title}: torch {torch.__version__}, triton {__import__('triton').__version__}, {dev}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def environment(values: dict):
    """``os.environ`` with ``values`` set (None: unset) inside the block, restored afterwards
    (attncc reads its config variables at every call)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_environment(values: dict, fn):
    """``fn`` that runs with ``values`` in the environment."""
    def run():
        with environment(values):
            return fn()
    return run


# ---------------------------------------------------------------------------------------------
# FLOPs and densities
# ---------------------------------------------------------------------------------------------


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def attention_flops(B, H, Nq, Nk, D, density=1.0):
    """Forward FLOPs of softmax attention (two matmuls) over the allowed fraction of the pairs."""
    return 4 * B * H * Nq * Nk * D * density


def causal_density(N: int) -> float:
    return (N + 1) / (2 * N)


CAUSAL_SPECS = ("causal", "alibi", "softcap", "gqa", "rope_causal")
# the shipped specs whose mask flex_pattern writes as a Flex mask_mod, and whose score it writes
FLEX_MASKS = ("dense", "sliding_window", "document", "padding", *CAUSAL_SPECS, "sink_window", "chunked_local",
              "block_diagonal", "neighborhood_2d", "prefix_lm", "longformer", "strided", "dilated", "bigbird")
FLEX_SCORES = ("alibi", "softcap")


def spec_params(spec: str, kw: dict) -> dict:
    """The params a call of shipped spec ``spec`` computes with: the spec's own values, overridden by
    the params among ``kw`` (params and input tensors, as the call takes them). What the bench writes
    in another form (Flex's mask_mod, densities) reads these, never ``kw`` alone: a case may leave a
    param at the spec's value. ValueError naming a param the spec does not have."""
    declared = spec_pattern(spec).param_values
    given = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"spec {spec}: no param {', '.join(unknown)} (it has {', '.join(declared) or 'none'})")
    return {**declared, **given}


def density(spec: str, N: int, kw: dict) -> float:
    """Allowed fraction of the N x N pairs of a shipped self-attention spec (``kw``: its params, those
    left out at the spec's values, and inputs)."""
    if spec == "dense":
        return 1.0
    if spec in CAUSAL_SPECS:
        return causal_density(N)
    if spec == "sliding_window":
        w = spec_params(spec, kw)["window"]
        return sum(min(i + 1, w) for i in range(N)) / N / N
    if spec == "document":
        return doc_causal_density(kw["doc"])
    if spec == "padding":  # row b sees kv_len[b] keys
        return float(kw["kv_len"].clamp(max=N).sum()) / kw["kv_len"].numel() / N
    return pair_density(spec, N, kw)


def pair_density(spec: str, N: int, kw: dict, rows: int = 1024) -> float:
    """Allowed fraction of the N x N pairs of a static shipped spec, counted pair by pair with the
    reference's mask (``kw``: its params), ``rows`` query rows at a time on DEV."""
    from attncc import _reference

    p = spec_pattern(spec)
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


def paged_cache(k, v, page: int, generator: torch.Generator):
    """A contiguous cache [B, Hkv, L, D] as decode's paged one: pages [B * L / page, page, Hkv, D] in an
    order drawn from ``generator`` (CPU), and the block table [B, L / page] (int32), on k's device."""
    B, H, L, D = k.shape
    if L % page:
        raise ValueError(f"a paged cache needs the length ({L}) a multiple of the page ({page})")
    n = L // page
    table = torch.randperm(B * n, generator=generator).to(torch.int32).view(B, n).to(k.device)
    out = []
    for t in (k, v):
        pages = torch.empty(B * n, page, H, D, dtype=t.dtype, device=t.device)
        pages[table.flatten().long()] = t.view(B, H, n, page, D).permute(0, 2, 3, 1, 4).reshape(B * n, page, H, D)
        out.append(pages)
    return out[0], out[1], table


def qkv(B, Hq, N, D, Hkv=None, seed=0, dtype=None, device=None, Nk=None, grad=False):
    """q [B, Hq, N, D], k and v [B, Hkv, Nk, D], standard normal from ``seed``."""
    torch.manual_seed(seed)
    Nk = N if Nk is None else Nk
    shapes = [(B, Hq, N, D), (B, Hkv or Hq, Nk, D), (B, Hkv or Hq, Nk, D)]
    return tuple(torch.randn(*s, device=device or DEV, dtype=dtype or DTYPE).requires_grad_(grad) for s in shapes)


def spec_inputs(pattern, B, H, N, seed=0, doc_mean=1024, device=None) -> dict:
    """Tensors for a spec's ``[inputs]``: packed documents for [b, n] ids, key lengths in [N/2, N]
    for a [b] length, standard normal tables of the declared float dtype."""
    device = device or DEV
    g = torch.Generator().manual_seed(seed)
    out = {}
    for d in pattern.inputs:
        shape = [{"b": B, "h": H, "n": N}.get(x, x) for x in d.dims]
        if d.dims == ("b", "n") and "int" in d.dtype:
            out[d.name] = documents(B, N, seed=seed, mean=doc_mean, device=device)
        elif d.dims == ("b",) and "int" in d.dtype:
            out[d.name] = torch.randint(N // 2, N + 1, (B,), generator=g, dtype=torch.int32).to(device)
        elif d.dtype.startswith(("float", "bfloat")):
            out[d.name] = torch.randn(*shape, generator=g).to(device=device, dtype=getattr(torch, d.dtype))
        else:
            raise ValueError(f"spec {pattern.name}: no benchmark input for {d.name}{list(d.dims)} of {d.dtype}")
    return out


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
    if SMOKE:  # eager on the CPU (a smoke run checks the code path, not Flex's speed)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def flex_pattern(spec: str, H: int, kw: dict, n: int = 0):
    """(score_mod, mask_mod, mask_per_batch) of FlexAttention for a shipped spec: the same
    pattern written as Flex's callables (None where the spec has no such part); ``kw``: the call's
    params (those left out at the spec's values) and inputs; ``n``: the sequence length (BigBird's
    random blocks depend on it)."""
    if spec not in FLEX_MASKS:
        raise KeyError(f"no FlexAttention form of spec {spec!r}")
    p_ = spec_params(spec, kw)
    doc, win, kv_len = kw.get("doc"), p_.get("window"), kw.get("kv_len")

    def causal(b, h, qi, ki):
        return qi >= ki

    def sliding_window(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < win)

    def document(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)

    def padding(b, h, qi, ki):
        return ki < kv_len[b]

    def softcap(s, b, h, qi, ki):
        return 30.0 * torch.tanh(s / 30.0)

    def alibi(s, b, h, qi, ki):
        return s + slopes[h] * (ki - qi)

    # the families of issue 16 (static masks: closed forms or exact block lists in attncc)
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

    masks = {"dense": None, "sliding_window": sliding_window, "document": document, "padding": padding,
             **{name: causal for name in CAUSAL_SPECS}}
    for fn in (sink_window, chunked_local, block_diagonal, neighborhood_2d, prefix_lm, longformer, strided, dilated,
               bigbird):
        masks[fn.__name__] = fn
    assert set(masks) == set(FLEX_MASKS)
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
    if spec == "alibi":
        from attncc.core.semantics import alibi_slope

        slopes = torch.tensor([alibi_slope(h, H) for h in range(H)], device=DEV)
    score_mod = dict(zip(FLEX_SCORES, (alibi, softcap))).get(spec)
    return score_mod, masks[spec], spec in ("document", "padding")


def sdpa_backend(name: str):
    """The SDPBackend of ``sdpa_flash`` / ``sdpa_cudnn``; the math backend in smoke mode (the CPU has
    neither fused kernel: the code path runs, the numbers mean nothing)."""
    from torch.nn.attention import SDPBackend

    if SMOKE:
        return SDPBackend.MATH
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]


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


@functools.lru_cache(maxsize=None)
def spec_pattern(name: str):
    """The Pattern of ``specs/<name>.toml`` (loaded once: a Pattern is immutable)."""
    from attncc.spec import load_spec

    return load_spec(ROOT / "specs" / f"{name}.toml")


_INLINE: dict = {}


def build_inline(name: str, text: str):
    """(pattern, module) of spec text ``text`` built with attncc's build API into a temporary
    folder and imported; built once per process."""
    if (name, text) not in _INLINE:
        from attncc.codegen import build
        from attncc.spec import load_spec

        out = Path(tempfile.mkdtemp(prefix="attncc_bench_"))
        path = out / f"{name}.toml"
        path.write_text(text)
        (written,) = build([path], out / "gen")
        spec = importlib.util.spec_from_file_location(f"_attncc_bench_{name}", written)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _INLINE[(name, text)] = (load_spec(path), mod)
    return _INLINE[(name, text)]


# ---------------------------------------------------------------------------------------------
# error-tolerant rows and tables
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
        release()
        return None


def note(row: dict, text: str):
    row["note"] = (row["note"] + "; " if row.get("note") else "") + text


def release():
    """Free cached GPU memory between cases."""
    if DEV == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) or spec == "s":
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):  # a value of another kind than its column's (a table never fails on it)
        return str(value)


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


def write_out(out_dir, filename: str, text: str):
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / filename).write_text(text)


def write_json(out_dir, filename: str, data) -> None:
    write_out(out_dir, filename, json.dumps(data, indent=1, default=str))
