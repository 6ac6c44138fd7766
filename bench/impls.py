"""A case's tensors and the implementations that compute it: attncc's generated module first (once
per setting of a sweep), then the baselines the case names (:data:`BASELINES`).

- ``flex``: ``torch.compile(flex_attention)`` with its block mask built once, outside the timed
  region (its cost is the extra ``flex create_block_mask``); ``flex_mask_per_call``: the block mask
  built inside every call, as a data-dependent mask needs;
- ``sdpa_flash`` / ``sdpa_cudnn``: SDPA restricted to one fused kernel, for the specs SDPA has
  (dense, causal, GQA/MQA; RoPE through a torch rotary pass inside the timed call, as for Flex);
- ``fla`` / ``fla_mapped``: flash-linear-attention's ``chunk_linear_attn`` on inputs already
  mapped by elu+1, or with the map in PyTorch inside the call;
- ``attncc_varlen``: a document case's documents packed as cu_seqlens sequences through
  generated/causal.py; ``torch_varlen``: torch's ``varlen_attn`` on the same packing;
- ``gluon_ws`` / ``gluon_ws_nopp`` / ``gluon_pipelined``: the Gluon sm90 kernels (attncc/runtime/gluon,
  forward only) with ping-pong, without, and the single-stream pipelined kernel;
- ``softmax_causal`` / ``softmax_causal_cudnn``: softmax causal attention (generated/causal.py,
  SDPA on cuDNN) on a linear-attention case's tensors: a reference point, not the same function
  (no difference columns).

Decode cases (``Case.decode``) call the module's ``decode`` with one query token per row over the
cache (contiguous, or paged in a random page order); SDPA and Flex read the contiguous cache.

A baseline that cannot run here (a package or a kernel missing) raises :class:`Unavailable`: a
missing column with its reason, not a failure. A baseline named for a case it has no form of is a
registry error (``applies`` says why; tests/test_bench.py checks every case).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from bench import timer
from bench.cases import TRANSFORMS, Case, Setting, setting_label
from bench.common import (DEV, FLEX_MASKS, FLEX_SCORES, SMOKE, apply_rotary, attention_flops, build_inline,
                          paged_cache,
                          density, flex_pattern, flex_setup, generated, qkv, rotary_tables, sdpa_backend, sdpa_call,
                          short_error, spec_inputs, spec_pattern)


class Unavailable(Exception):
    """A baseline that cannot run on this machine (missing package or kernel)."""


@dataclass
class Prepared:
    """A case's tensors at the sizes in use (``case`` is already shrunk under --smoke)."""
    case: Case
    pattern: object
    module: object
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: Optional[torch.Tensor]  # dO; None for decode (no backward)
    kw: dict  # params and inputs of attncc's call
    flops: Optional[float]  # forward FLOPs; None where not counted (linear attention, decode)
    bytes: Optional[float] = None  # decode: bytes of the valid K and V, read once per call
    pages: Optional[tuple] = None  # a paged decode case: (k pages, v pages, block table)
    _flex: Optional[tuple] = None

    def flex(self):
        """(flex_attention, create_block_mask), compiled once per case."""
        if self._flex is None:
            self._flex = flex_setup()
        return self._flex


def prepare(case: Case) -> Prepared:
    c = case.at_smoke() if SMOKE else case
    if c.transform:
        pattern, module = build_inline(c.spec, c.spec_text())
    else:
        pattern, module = spec_pattern(c.spec), generated(c.spec)
    if c.decode:
        return _prepare_decode(c, pattern, module)
    q, k, v = qkv(c.B, c.Hq, c.N, c.D, Hkv=c.kv_heads)
    do = torch.randn_like(q)
    kw = dict(c.param_dict, **spec_inputs(pattern, c.B, c.Hq, c.N, doc_mean=c.doc_mean))
    flops = None
    if pattern.kind == "softmax":
        flops = attention_flops(c.B, c.Hq, c.N, c.N, c.D, density(c.mask, c.N, kw))
    return Prepared(c, pattern, module, q, k, v, do, kw, flops)


def _prepare_decode(c: Case, pattern, module) -> Prepared:
    """One query token per row at the end of an N-token cache, every row full (kv_len = N)."""
    q, k, v = qkv(c.B, c.Hq, c.N, c.D, Hkv=c.kv_heads)
    q = q[:, :, -1:].contiguous()
    kw = {"kv_len": torch.full((c.B,), c.N, dtype=torch.int32, device=DEV)}
    pages = paged_cache(k, v, c.page, torch.Generator().manual_seed(0)) if c.decode == "paged" else None
    nbytes = 2 * c.B * c.kv_heads * c.N * c.D * k.element_size()
    return Prepared(c, pattern, module, q, k, v, None, kw, None, bytes=nbytes, pages=pages)


@dataclass(frozen=True)
class Extra:
    """An extra cost timed beside a case's implementations, a row of its own (ms in ``fwd_ms``):
    ``fn() -> ms``, or ``(ms, note)`` where what was measured is known only after the call."""
    fn: Callable[[], object]
    note: str = ""


@dataclass
class Impl:
    """One implementation of a case: ``fn(*args) -> o``, in its own layout."""
    name: str
    fn: Callable
    args: Tuple[torch.Tensor, ...]
    grad_out: Optional[torch.Tensor]  # dO in this layout; None: no forward + backward here (see note)
    to_case: Callable = field(default=lambda t: t)  # an output or gradient in the case's [B, H, N, D]
    same_grads: bool = True  # its gradients are d/d(q, k, v) of the case (compared with attncc's)
    same_output: bool = True  # it computes the case's function (False: a reference point, not compared)
    note: str = ""
    env: Setting = ()  # environment variables set around every call (forward and backward)


def attncc_impl(p: Prepared, setting: Setting = ()) -> Impl:
    name = f"attncc {setting_label(setting)}" if setting else "attncc"
    if p.case.decode == "paged":
        kp, vp, table = p.pages
        return Impl(name, lambda q, k, v: p.module.decode(q, k, v, block_table=table, **p.kw), (p.q, kp, vp), None,
                    note=_decode_choice(p, kp, vp, table), env=setting)
    if p.case.decode:
        return Impl(name, lambda q, k, v: p.module.decode(q, k, v, **p.kw), (p.q, p.k, p.v), None,
                    note=_decode_choice(p, p.k, p.v, None), env=setting)
    return Impl(name, lambda q, k, v: p.module.attention(q, k, v, **p.kw), (p.q, p.k, p.v), p.do, env=setting)


def _decode_choice(p: Prepared, k, v, table) -> str:
    """The tile config and split count ``decode`` picks on its own here (attncc.runtime.decode)."""
    try:
        from attncc.runtime import decode as rd

        call = rd.bind_decode(p.module.SPEC, p.q, k, v, kv_len=p.kw["kv_len"], block_table=table)
        cfg = rd.decode_config(call)
        programs = call.B * call.Hkv * -(-call.group // rd.heads_per_program(call, cfg))
        return (f"default: BLOCK_N={cfg.BLOCK_N},num_warps={cfg.num_warps},num_stages={cfg.num_stages}, "
                f"{rd.num_splits(call, cfg, programs)} splits")
    except Exception as e:  # noqa: BLE001 - the note says it could not tell; the timing stands
        return f"default config unknown ({short_error(e, 60)})"


# ---------------------------------------------------------------------------------------------
# which baselines a case can have
# ---------------------------------------------------------------------------------------------

SDPA_CAUSAL = {"dense": False, "causal": True, "gqa": True, "mqa": True, "rope_causal": True}


def applies(baseline: str, case: Case) -> Optional[str]:
    """Why ``baseline`` has no form of ``case`` (None: it has one)."""
    if baseline not in BASELINES:
        return f"no baseline {baseline!r} (there are {', '.join(BASELINES)})"
    if case.decode and baseline not in ("sdpa_flash", "flex"):
        return "decode is compared with SDPA flash and FlexAttention on the contiguous cache"
    if case.decode and case.mask != "causal":
        return "decode cases are causal (one token at the end of the cache sees all of it)"
    if baseline in ("flex", "flex_mask_per_call"):
        if case.mask not in FLEX_MASKS:
            return f"no FlexAttention mask_mod of spec {case.mask!r} (bench/common.py flex_pattern)"
        if not case.transform:
            p = spec_pattern(case.spec)
            plain = p.bias is None and p.mod is None and p.softcap is None and p.scale is None and not p.dropout
            if p.kind != "softmax" or not (plain or case.spec in FLEX_SCORES):
                return f"no FlexAttention score_mod of spec {case.spec!r} (bench/common.py flex_pattern)"
    if baseline in ("sdpa_flash", "sdpa_cudnn") and (case.transform or case.spec not in SDPA_CAUSAL):
        return f"SDPA has no form of spec {case.spec!r} (it has {', '.join(SDPA_CAUSAL)})"
    if baseline in ("fla", "fla_mapped") and case.spec != "linear_elu":
        return "fla's chunk_linear_attn is compared on elu+1 linear attention (linear_elu) only"
    if baseline in ("attncc_varlen", "torch_varlen") and case.spec != "document":
        return "varlen packs the documents of a document-mask case"
    if baseline in GLUON and (case.transform or case.spec not in ("dense", "causal", "gqa")):
        return "the Gluon kernels have the dense and causal patterns (attncc/runtime/gluon/walks.py)"
    if baseline in ("softmax_causal", "softmax_causal_cudnn") and (
            case.transform or spec_pattern(case.spec).kind != "linear"):
        return "softmax causal attention is the reference point of a linear-attention case"
    return None


def _rotate(p: Prepared):
    """(q, k) -> (q, k) rotated in plain torch where the spec has RoPE (what a model does before
    SDPA or Flex), else unchanged; the rotary pass alone is timed as an extra."""
    rope = p.pattern.rope
    if rope is None:
        return lambda q, k: (q, k)
    if rope.style != "neox" or (rope.rotary_dim or p.case.D) != p.case.D:
        raise ValueError(f"spec {p.pattern.name}: the torch rotary of bench/common.py is neox over the whole head")
    cos, sin = rotary_tables(p.case.N, p.case.D, theta=rope.theta)
    return lambda q, k: (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))


# ---------------------------------------------------------------------------------------------
# baselines: (prepared case, extras to fill) -> Impl
# ---------------------------------------------------------------------------------------------


def _flex(per_call: bool):
    def build(p: Prepared, extras: Dict[str, Extra]) -> Impl:
        c = p.case
        flex_attention, create_block_mask = p.flex()
        if c.decode:  # the last token sees the whole cache: no mask
            return Impl("flex", lambda q, k, v: flex_attention(q, k, v, enable_gqa=c.kv_heads != c.Hq),
                        (p.q, p.k, p.v), None, note="contiguous cache" if c.decode == "paged" else "")
        if c.transform:
            score_mod = TRANSFORMS[c.spec].flex(c.Hq, p.kw)
            _, mask_mod, per_batch = flex_pattern(c.mask, c.Hq, p.kw, n=c.N)
        else:
            score_mod, mask_mod, per_batch = flex_pattern(c.spec, c.Hq, p.kw, n=c.N)
        rotate = _rotate(p)
        gqa = {"enable_gqa": True} if c.kv_heads != c.Hq else {}

        def make_mask():
            if mask_mod is None:
                return None
            return create_block_mask(mask_mod, c.B if per_batch else None, None, c.N, c.N, device=DEV)

        if per_call:
            def fn(q, k, v):
                return flex_attention(*rotate(q, k), v, score_mod=score_mod, block_mask=make_mask(), **gqa)
        else:
            block_mask = make_mask()
            if mask_mod is not None:
                extras["flex create_block_mask"] = Extra(lambda: timer.time_ms(make_mask))

            def fn(q, k, v):
                return flex_attention(*rotate(q, k), v, score_mod=score_mod, block_mask=block_mask, **gqa)
        name = "flex_mask_per_call" if per_call else "flex"
        if SMOKE:  # eager Flex on the CPU has no backward
            return Impl(name, fn, (p.q, p.k, p.v), None, note="no Flex backward on the CPU")
        return Impl(name, fn, (p.q, p.k, p.v), p.do)
    return build


def _sdpa(name: str):
    def build(p: Prepared, extras) -> Impl:
        c = p.case
        backend, is_causal, rotate = sdpa_backend(name), SDPA_CAUSAL[c.spec], _rotate(p)
        gqa = {"enable_gqa": True} if c.kv_heads != c.Hq else {}
        if c.decode:  # the last token sees the whole cache: not is_causal (which aligns to the top left)
            return Impl(name, lambda q, k, v: sdpa_call(backend, lambda: F.scaled_dot_product_attention(q, k, v, **gqa)),
                        (p.q, p.k, p.v), None, note="contiguous cache" if c.decode == "paged" else "")
        if p.pattern.rope is not None:
            extras["torch rotary of q and k"] = Extra(lambda: timer.time_ms(lambda: rotate(p.q, p.k)))

        def fn(q, k, v):
            return sdpa_call(backend, lambda: F.scaled_dot_product_attention(*rotate(q, k), v, is_causal=is_causal,
                                                                              **gqa))
        return Impl(name, fn, (p.q, p.k, p.v), p.do, note="smoke: the math backend" if SMOKE else "")
    return build


def _fla(mapped: bool):
    def build(p: Prepared, extras) -> Impl:
        try:
            from fla.ops.linear_attn import chunk_linear_attn
        except Exception as e:  # noqa: BLE001 - any import failure: the column is missing
            raise Unavailable(f"flash-linear-attention not importable ({short_error(e, 80)})")
        kw = dict(scale=1.0, normalize=True)
        if "head_first" in inspect.signature(chunk_linear_attn).parameters:
            kw["head_first"] = False

        def run(q, k, v):  # [B, T, H, D]
            o = chunk_linear_attn(q, k, v, **kw)
            return o[0] if isinstance(o, tuple) else o

        bthd = [t.transpose(1, 2).contiguous() for t in (p.q, p.k, p.v, p.do)]
        back = lambda t: t.transpose(1, 2)  # noqa: E731
        if mapped:
            return Impl("fla_mapped", lambda q, k, v: run(F.elu(q) + 1, F.elu(k) + 1, v), tuple(bthd[:3]), bthd[3],
                        to_case=back, note="elu+1 in PyTorch; fla normalizes with its own eps")
        args = (F.elu(bthd[0]) + 1, F.elu(bthd[1]) + 1, bthd[2])
        return Impl("fla", run, args, bthd[3], to_case=back, same_grads=False,
                    note="inputs mapped by elu+1 before the call; fla normalizes with its own eps")
    return build


def _packing(p: Prepared):
    """(cu_seqlens, max length, [B, H, N, D] -> [1, H, B*N, D], its inverse) of a document case."""
    lens = []
    for row in p.kw["doc"].cpu():
        lens += torch.unique_consecutive(row, return_counts=True)[1].tolist()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    B, N = p.case.B, p.case.N

    def flat(t):
        return t.transpose(0, 1).reshape(1, t.shape[1], B * N, t.shape[-1]).contiguous()

    def unflat(t):
        return t.reshape(t.shape[1], B, N, t.shape[-1]).transpose(0, 1)
    return cu, max(lens), flat, unflat


def _attncc_varlen(p: Prepared, extras) -> Impl:
    cu, longest, flat, unflat = _packing(p)
    causal = generated("causal")

    def fn(q, k, v):
        return causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest)
    return Impl("attncc_varlen", fn, tuple(flat(t) for t in (p.q, p.k, p.v)), flat(p.do), to_case=unflat,
                note="generated/causal.py on the documents packed as cu_seqlens sequences [1, H, B*N, D]")


def _torch_varlen(p: Prepared, extras) -> Impl:
    if SMOKE:
        raise Unavailable("torch's varlen_attn runs FlashAttention kernels only (no CPU)")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise Unavailable(f"this torch has no torch.nn.attention.varlen ({e})")
    cu, longest, flat, unflat = _packing(p)
    causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters else {
        "is_causal": True}
    thd = lambda t: flat(t)[0].transpose(0, 1).contiguous()  # noqa: E731  [B, H, N, D] -> [T, H, D]
    back = lambda t: unflat(t.transpose(0, 1)[None])  # noqa: E731
    return Impl("torch_varlen", lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, **causal),
                tuple(thd(t) for t in (p.q, p.k, p.v)), thd(p.do), to_case=back, note="[T, H, D] layout")


def _gluon(kernel: str, pingpong: bool):
    name = {"pipelined": "gluon_pipelined"}.get(kernel, "gluon_ws" if pingpong else "gluon_ws_nopp")

    def build(p: Prepared, extras) -> Impl:
        if SMOKE or not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
            raise Unavailable("the Gluon kernels need an sm90 GPU (wgmma, TMA)")
        import dataclasses

        from attncc.runtime.gluon import launch as gluon

        cfg = gluon.default_config(p.case.D, kernel)
        if kernel == "ws":
            cfg = dataclasses.replace(cfg, pingpong=pingpong)
        pattern = "dense" if p.case.mask == "dense" else "causal"
        return Impl(name, lambda q, k, v: gluon.attention(q, k, v, pattern=pattern, config=cfg), (p.q, p.k, p.v),
                    None, note="forward only")
    return build


def _softmax_causal(p: Prepared, extras) -> Impl:
    causal = generated("causal")
    return Impl("softmax_causal", lambda q, k, v: causal.attention(q, k, v), (p.q, p.k, p.v), p.do,
                same_output=False, note="generated/causal.py on the same tensors: a reference point")


def _softmax_causal_cudnn(p: Prepared, extras) -> Impl:
    backend = sdpa_backend("sdpa_cudnn")

    def fn(q, k, v):
        return sdpa_call(backend, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return Impl("softmax_causal_cudnn", fn, (p.q, p.k, p.v), p.do, same_output=False,
                note="SDPA causal" + (" (smoke: the math backend)" if SMOKE else " on cuDNN") + ": a reference point")


GLUON = ("gluon_ws", "gluon_ws_nopp", "gluon_pipelined")

BASELINES: Dict[str, Callable[[Prepared, dict], Impl]] = {
    "flex": _flex(per_call=False),
    "flex_mask_per_call": _flex(per_call=True),
    "sdpa_flash": _sdpa("sdpa_flash"),
    "sdpa_cudnn": _sdpa("sdpa_cudnn"),
    "fla": _fla(mapped=False),
    "fla_mapped": _fla(mapped=True),
    "attncc_varlen": _attncc_varlen,
    "torch_varlen": _torch_varlen,
    "gluon_ws": _gluon("ws", pingpong=True),
    "gluon_ws_nopp": _gluon("ws", pingpong=False),
    "gluon_pipelined": _gluon("pipelined", pingpong=False),
    "softmax_causal": _softmax_causal,
    "softmax_causal_cudnn": _softmax_causal_cudnn,
}


def attncc_extras(p: Prepared, extras: Dict[str, Extra]) -> None:
    """attncc's own per-call and one-time costs besides the kernels: the block lists of a
    data-dependent mask (per call) and the exact block lists of a static one where the call makes
    them (:func:`exact_list_extras`), at the tile sizes of the tl forward."""
    mod = p.module
    if p.case.decode or not (hasattr(mod, "_block_lists") or hasattr(mod, "_exact_lists")):
        return
    from attncc.runtime import bind, pick_config

    call = bind(mod.SPEC, p.q, p.k, p.v, kwargs=dict(p.kw))
    cfg = pick_config(call)
    if hasattr(mod, "_block_lists"):
        extras["attncc block lists (per call)"] = Extra(lambda: timer.time_ms(
            lambda: mod._block_lists(call, cfg.BLOCK_M, cfg.BLOCK_N)))
    if hasattr(mod, "_exact_lists"):
        extras.update(exact_list_extras(mod, call, cfg.BLOCK_M, cfg.BLOCK_N))


EXACT_ONCE = "attncc exact block lists (once per shape)"
EXACT_FIRST = "attncc exact block lists, first call in the process"


def exact_list_extras(mod, call, block_m: int, block_n: int) -> Dict[str, Extra]:
    """The exact block lists of a static mask (``mod._exact_lists``: a tile-classification kernel,
    then the lists, cached per shape and params), where ``call`` makes them: none where it keeps
    the closed forms of both walks (``mod._closed_form``); noted as the fallback where a walk takes
    them because the call breaks its closed form's precondition.

    Two rows, to be timed in this order before the case's first call: :data:`EXACT_FIRST`, the
    first call in this process (Triton's compile of the classification kernel included, where this
    process had not compiled it yet: the note says which), then :data:`EXACT_ONCE`, what every new
    shape costs once the kernel is compiled (the cache cleared after a warm call, one call timed)."""
    closed = getattr(mod, "_closed_form", None)
    walks = closed(call) if closed is not None else (False, False)
    if all(walks):
        return {}
    note = "" if closed is None else (
        "the fallback of the " + " and ".join(w for w, ok in zip(("forward / dQ", "dK/dV"), walks) if not ok)
        + " walk: this call breaks its closed form's precondition")
    kernel = getattr(mod, "_exact_tiles_kernel", None)

    def make():
        return mod._exact_lists(call, block_m, block_n)

    def first():
        before = compiled_count(kernel)
        _exact_cache().clear()
        ms = timer.steps_ms([make])[0]
        after = compiled_count(kernel)
        if before is None or after is None:
            return ms, "Triton does not say whether it compiled here (the interpreter compiles nothing)"
        if after > before:
            return ms, "Triton's compile (or load from its disk cache) of the tile-classification kernel included"
        return ms, "no compile in it: this process had compiled the tile-classification kernel already"

    def once():
        make()  # compiled and warm: what is timed is the per-shape work alone
        _exact_cache().clear()
        return timer.steps_ms([make])[0]

    return {EXACT_FIRST: Extra(first, note), EXACT_ONCE: Extra(once, note)}


def _exact_cache():
    """attncc's cache of exact block lists (attncc.runtime.blocks), cleared to time a new shape."""
    from attncc.runtime import blocks as rb

    return rb._exact_cache


def compiled_count(kernel) -> Optional[int]:
    """How many binaries Triton holds for the ``@triton.jit`` ``kernel`` in this process (compiled,
    or loaded from its disk cache); None where it does not say (the interpreter)."""
    try:
        return sum(len(entry[0]) for entry in kernel.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return None


def implementations(p: Prepared, settings: Sequence[Setting] = (), baselines: bool = True
                    ) -> Tuple[List[Impl], Dict[str, Extra], Dict[str, str]]:
    """(implementations: attncc at its defaults first, then under each of ``settings``, then the
    baselines (none when ``baselines`` is false); extra timings {label: Extra}; {baseline: why
    unavailable})."""
    impls, extras, unavailable = [attncc_impl(p)] + [attncc_impl(p, s) for s in settings], {}, {}
    attncc_extras(p, extras)
    for name in p.case.baselines if baselines else ():
        why = applies(name, p.case)
        if why:
            raise ValueError(f"case {p.case.name}: baseline {name}: {why}")
        try:
            impls.append(BASELINES[name](p, extras))
        except Unavailable as e:
            unavailable[name] = str(e)
    return impls, extras, unavailable
