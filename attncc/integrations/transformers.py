"""Hugging Face ``transformers``: attncc's generated kernels as an attention implementation.

    from attncc.integrations import transformers as attncc_hf

    attncc_hf.register()                                        # the implementation "attncc"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attncc")

    attncc_hf.register("prefix_lm", spec="specs/prefix_lm.toml")  # your own pattern (see below)

``register`` adds a function to transformers' ``AttentionInterface`` and one to its
``AttentionMaskInterface`` under the same name. Where transformers builds a dense
[B, 1, Nq, Nk] mask for sdpa or eager, the mask function returns a small :class:`KeyMask`
instead: which mask the model asked for (recognized from transformers' own mask functions:
causal, bidirectional, sliding windows), the positions of the call in the sequence (the KV
cache's offsets) and, only when some key is padding, the 2D padding mask [B, positions]. No
dense mask is ever made; the padding reaches the kernels as an input ``key_ok[b, j]`` of the
spec, so they skip padded key blocks from block statistics like any data-dependent mask. A static
cache's slots that hold no token yet, past the 2D padding mask (transformers pads it with False
there) or past the last query under a mask built on a causal one, are cut off the keys the kernels see:
a user's pattern never attends them, and its ``n_k`` counts the tokens. (A model whose own mask is
bidirectional, on a static cache and without a padding mask, attends them as eager does: such a call
cannot be told from cross-attention's, whose keys past the queries are the encoder's.)

The attention function then picks the generated module per call, from what the model passes,
and compiles each one once (``attncc.compile``; cached on disk):

* the mask: causal or bidirectional, Mistral-style sliding windows (``i - j < window``),
  left or right padding (any 2D ``attention_mask``);
* the score: ``scaling`` (e.g. Gemma 2's ``query_pre_attn_scalar``), Gemma-2-style logit
  ``softcap``, and ``dropout`` while training;
* GQA: k/v with fewer heads than q run as they are (nothing is repeated per query head);
* GPT-OSS's attention sinks (``s_aux``, a logit per head with a value of zero): the output scaled by
  ``sigmoid(lse - s_aux)`` from the kernels' log-sum-exp (whose gradient they take);
* packed sequences: FlashAttention's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (``max_length_q`` /
  ``max_length_k``) where the model passes them, else the sequences transformers finds from
  ``position_ids`` (no cache, no padding mask), run as the kernels' ``cu_seqlens`` over the rows taken one
  after another;
* the head dim and dtype of the call (the spec's ``head_dim`` and ``dtypes``).

A call without gradients whose queries (at most 16) are the last positions held by the KV cache
(every key before them, or later keys a causal mask leaves out; not cross-attention, whose encoder
keys all count) runs the module's ``decode`` (generation's steps, and short prompts); it sees the cache with
positions counted from its first entry, which the built-in patterns (all translation-invariant)
allow even for a sliding-window cache that has dropped old keys. Every other call (training,
long prompts) runs ``attention`` with ``q_offset``/``k_offset`` at the cache's positions.
``register(..., decode=False)`` always uses ``attention``.

Your own pattern: ``register(name, spec=...)`` with TOML text, a dict, a path or a compiled
module. The spec replaces the model's mask (write causality into it); a model that passes
``softcap`` or ``dropout`` needs the spec's ``[score]`` to say the same. The model's ``scaling`` is the
call's softmax scale, unless the spec writes ``[score].scale`` or has a param or input named ``scale``
(which takes the call's ``scale=``): then it must equal the spec's softmax scale (else an error). The spec's params and
inputs are taken from the keyword arguments the model forwards to attention (``model(ids,
doc=doc_ids)`` reaches an input ``doc``) or from their defaults; an input named ``key_ok``
(dims ``["b", "n"]``, dtype ``"bool"``) receives the padding mask (all true without padding), and
without one a padded batch is an error. Decoding uses ``decode`` only when the cache holds
every position from 0.

Not supported (errors, never a silent difference): dense masks passed by the caller (4-D
``attention_mask``), masks transformers builds from other functions (chunked or block-wise
overlays, ``or_mask_function``/``and_mask_function``) with the built-in implementation (where a layer
uses one: a model may make masks for layer types it does not have), packed
sequences with a user's spec, ``position_bias``, per-token attention sinks (``sinks``), sparse
indexers' ``indices`` / ``block_indices``, models whose attention layers compute attention in their own code
instead of calling transformers' attention interface (Bloom, MPT, Falcon with ``alibi=True``, MPNet, RoFormer: the mask they
read as a tensor says so); ``output_attentions`` returns no weights (as sdpa). The mask function reads the
padding mask once per forward (one host synchronization), so a model under ``torch.compile``
breaks its graph there; ``torch.compile(model, fullgraph=True)`` is not supported (the mask
function recognizes transformers' mask functions by their closures, on the host, and compiles a
module the first time a mask needs it; both break the graph).
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch

try:
    from transformers import AttentionInterface
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("attncc.integrations.transformers needs transformers with masking_utils.AttentionMaskInterface "
                      "(pip install 'attncc[hf]')") from e

import attncc

_REGISTERED: Dict[str, "_Implementation"] = {}  # name -> what register() made of it
MAX_DECODE_QUERIES = 16  # attncc.runtime.decode.MAX_QUERIES, without importing Triton here
# keyword arguments of models' attention calls that change what attention computes and that the kernels do not
# take: refused when given (the other keyword arguments are either honoured or do not change the result)
_UNSUPPORTED = {"position_bias": "an additive bias on the scores",
                "sinks": "per-token attention sinks",
                "indices": "the keys a sparse indexer selected for each query",
                "block_indices": "the key blocks a sparse indexer selected for each query"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class MaskKind:
    """A mask of transformers' mask functions, over query positions ``i`` and key positions ``j``.

    causal: ``j <= i``. window: with causal, ``i - j < window`` (``sliding_window_overlay``);
    without, ``|i - j| <= window`` (``sliding_window_bidirectional_overlay``)."""

    causal: bool
    window: Optional[int] = None

    def clauses(self) -> Tuple[str, ...]:
        out = ("j <= i",) if self.causal else ()
        if self.window is not None:
            out += ("i - j < window",) if self.causal else ("abs(i - j) <= window",)
        return out


@dataclass(frozen=True, eq=False)
class KeyMask:
    """What the mask function hands to the attention function in place of a dense mask.

    kind: None when the mask function was not recognized (an error where a built-in call uses it); with
    cu_seqlens, the mask within each packed sequence.
    q_offset / kv_offset: the positions of the first query and the first key (cache) row.
    keys_end: the position past the last key that holds a token, where the call's key rows go further
    (a static cache's empty slots: past the 2D padding mask, or past the last query under a mask built on
    transformers' causal one); None when every key row holds one. The attention function never hands the
    kernels those rows.
    key_ok: bool [B, >= kv_offset + (the rows that hold tokens)], True where the key at that position is
    a real token; None when none is padding."""

    kind: Optional[MaskKind]
    q_offset: int
    kv_offset: int
    q_length: int
    kv_length: int
    key_ok: Optional[torch.Tensor]
    mask_function: str = ""  # its name, for messages
    # packed sequences (transformers found them from position_ids): int32 [S + 1], cumulative over the
    # batch's rows taken one after another (FlashAttention's varlen layout of the flattened [B * N] tokens)
    cu_seqlens: Optional[torch.Tensor] = None
    # generate() with a compileable (static) cache builds the masks once and hands them to the model
    # as its attention_mask, whose mask code asks for .ndim before it asks the mask function again:
    # a KeyMask stands where transformers keeps a 4-D mask (never one of 2 dims, the padding mask)
    ndim: ClassVar[int] = 4
    keys_end: Optional[int] = None

    def __getattr__(self, name: str):
        # only for attributes a KeyMask lacks: a model that computes attention itself reads the mask as a tensor
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_used_as_tensor(f"its attribute {name!r}"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(_used_as_tensor(f"torch's {_name(func)}"))

    def held(self, rows: int) -> int:
        """How many of the call's ``rows`` key rows hold tokens (the first ones)."""
        return rows if self.keys_end is None else max(0, min(rows, self.keys_end - self.kv_offset))


def _used_as_tensor(what: str) -> str:
    """The error of a model that uses attncc's :class:`KeyMask` as a dense mask (Bloom, MPT, Falcon with
    ``alibi=True`` add ALiBi to the mask in their own attention code, MPNet and RoFormer their relative
    positions: "'KeyMask' object has no attribute 'dtype'", or "unsupported operand type(s) for +")."""
    return (f"attncc: the model asks the mask for {what}, as a dense mask tensor: its attention layers compute "
            f"attention themselves (ALiBi models such as Bloom, MPT, Falcon with alibi=True, and MPNet, RoFormer do) "
            f"instead of calling "
            f"transformers' attention interface, which attncc plugs into; use attn_implementation=\"eager\" or "
            f"\"sdpa\" for this model")


# -- recognizing transformers' mask functions ---------------------------------------------------

def _code(factory: Optional[Callable], *args):
    return factory(*args).__code__ if factory is not None else None


_AND_CODE = _code(_mu.and_masks, _mu.causal_mask_function)
_SLIDING_CODE = _code(getattr(_mu, "sliding_window_overlay", None), 1)
_SLIDING_BIDIRECTIONAL_CODE = _code(getattr(_mu, "sliding_window_bidirectional_overlay", None), 1)
_BIDIRECTIONAL = getattr(_mu, "bidirectional_mask_function", None)
_REMAP_CODE = _code(getattr(_mu, "remap_positions_for_packed_sequence", None), _mu.causal_mask_function, None)
_PACKED_CODE = _code(getattr(_mu, "packed_sequence_mask_function", None), None)


def _closure(fn) -> dict:
    cells = fn.__closure__ or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def recognize(mask_function) -> Optional[MaskKind]:
    """The MaskKind of one of transformers' mask functions, or None for any other function."""
    if mask_function is _mu.causal_mask_function:
        return MaskKind(causal=True)
    if _BIDIRECTIONAL is not None and mask_function is _BIDIRECTIONAL:
        return MaskKind(causal=False)
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = list(_closure(mask_function).get("mask_functions", ()))
    bases = [recognize(p) for p in parts if p is _mu.causal_mask_function or p is _BIDIRECTIONAL]
    overlays = [p for p in parts if p is not _mu.causal_mask_function and p is not _BIDIRECTIONAL]
    if len(bases) != 1 or len(overlays) != 1 or not hasattr(overlays[0], "__code__"):
        return None
    base, overlay = bases[0], overlays[0]
    window = _closure(overlay).get("sliding_window")
    if type(window) is not int or window < 1:
        return None
    if base.causal and overlay.__code__ is _SLIDING_CODE:
        return MaskKind(causal=True, window=window)
    if not base.causal and overlay.__code__ is _SLIDING_BIDIRECTIONAL_CODE:
        return MaskKind(causal=False, window=window)
    return None


def recognize_packed(mask_function) -> Optional[Tuple[MaskKind, torch.Tensor]]:
    """(the mask within each sequence, the packed-sequence ids [B, N]) of the mask transformers builds
    for sequences packed in a row (found from ``position_ids``: ``and_masks(remap_positions_for_packed_
    sequence(base, position_ids), packed_sequence_mask_function(ids))``), or None for any other function.
    Within a sequence the position ids go up by one from token to token (where they do not, transformers
    starts a new sequence), so the base mask over them is the base mask over the tokens' indices."""
    if _REMAP_CODE is None or getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = list(_closure(mask_function).get("mask_functions", ()))
    if len(parts) != 2 or not all(hasattr(p, "__code__") for p in parts):
        return None
    remap, packed = parts
    if remap.__code__ is not _REMAP_CODE or packed.__code__ is not _PACKED_CODE:
        return None
    kind = recognize(_closure(remap).get("mask_function"))
    ids = _closure(packed).get("packed_sequence_mask")
    if kind is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    return kind, ids


def built_on_causal(mask_function, depth: int = 0) -> bool:
    """Whether transformers built the mask function from ``causal_mask_function`` (create_causal_mask,
    its sliding / chunked kinds, with overlays: ``and_masks`` / ``or_masks`` / position remaps around it):
    a decoder's self-attention on its own sequence, whose cache holds no token past the last query.
    Cross-attention's masks are bidirectional."""
    if mask_function is _mu.causal_mask_function:
        return True
    if depth > 16 or not hasattr(mask_function, "__code__"):
        return False
    cells = _closure(mask_function)
    parts = [*cells.get("mask_functions", ()), cells.get("mask_function")]
    return any(built_on_causal(p, depth + 1) for p in parts if callable(p))


def packed_cu_seqlens(sequence_ids: torch.Tensor) -> torch.Tensor:
    """int32 [S + 1]: the sequences of packed-sequence ids [B, N] (equal ids: one sequence), the rows taken
    one after another (a sequence never spans two rows)."""
    B, N = sequence_ids.shape
    starts = torch.ones(B, N, dtype=torch.bool, device=sequence_ids.device)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    first = starts.reshape(-1).nonzero().reshape(-1)  # one host sync
    end = torch.tensor([B * N], dtype=first.dtype, device=first.device)
    return torch.cat([first, end]).to(torch.int32)


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# -- the implementation --------------------------------------------------------------------------

class _Implementation:
    """One registered name: the built-in patterns (``spec`` None) or the user's module."""

    def __init__(self, name: str, spec, decode: bool):
        self.name, self.use_decode = name, decode
        self.module: Optional[ModuleType] = None if spec is None else _user_module(spec)
        self._modules: Dict[tuple, ModuleType] = {}
        self._lock = threading.Lock()
        self.calls: Counter = Counter()  # "attention" / "decode": which entry point ran (tests, curiosity)

    # The mask function (AttentionMaskInterface): transformers calls it where it would build a mask.
    def mask(self, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
             mask_function: Callable = _mu.causal_mask_function, attention_mask: Optional[torch.Tensor] = None,
             **kwargs) -> KeyMask:
        kind, cu_seqlens = recognize(mask_function), None
        packed = recognize_packed(mask_function) if kind is None else None
        if packed is not None:
            kind, cu_seqlens = packed[0], packed_cu_seqlens(packed[1])
        if isinstance(attention_mask, KeyMask):
            # a mask the model made earlier and hands on as its attention_mask (PaliGemma's prefix to its
            # language model), which would otherwise become the plain mask_function's here, silently
            self._refuse_unmapped(attention_mask)
        q_offset, kv_offset = int(q_offset), int(kv_offset)
        keys_end, key_ok = self._key_rows(built_on_causal(mask_function), attention_mask, q_offset + q_length,
                                          kv_offset + kv_length)
        if cu_seqlens is not None and self.module is not None:
            raise NotImplementedError(
                f"attncc ({self.name}): the batch packs sequences in a row (transformers found them from "
                f"position_ids); a registered spec replaces the model's mask and would attend across them. Pass "
                f"one sequence a row with a 2D attention_mask, or write the documents into the spec")
        return KeyMask(kind, q_offset, kv_offset, q_length, kv_length, key_ok, _name(mask_function), cu_seqlens,
                       keys_end)

    def _key_rows(self, causal: bool, attention_mask, queries_end: int,
                  positions: int) -> Tuple[Optional[int], Optional[torch.Tensor]]:
        """(keys_end, key_ok) of a KeyMask over key positions [0, positions): a static cache's rows past
        the 2D padding mask (transformers pads it with False there) hold no token, nor, under a mask
        built on a causal one (``causal``: the call's own sequence), those past the last query
        ``queries_end``; a user's spec replaces that mask and would attend them (zeros), so the call ends
        its keys there instead."""
        ends = [positions, queries_end] if causal else [positions]
        if isinstance(attention_mask, KeyMask):  # made earlier for this forward (generate, static cache)
            if attention_mask.keys_end is not None:
                ends.append(attention_mask.keys_end)
            attention_mask = attention_mask.key_ok
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attncc ({self.name}): expected a 2D padding mask [B, positions], got shape "
                                 f"{tuple(attention_mask.shape)}")
            ends.append(attention_mask.shape[1])
        end = min(ends)
        keys_end = end if end < positions else None
        if attention_mask is None:
            return keys_end, None
        ok = attention_mask[:, :end].to(torch.bool).contiguous()
        return keys_end, (None if bool(ok.all()) else ok)  # one host sync per forward; no kernel needs one

    # The attention function (AttentionInterface).
    def forward(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                softcap=None, **kwargs):
        who = f"attncc ({self.name})"
        for unsupported, what in _UNSUPPORTED.items():
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"{who}: {unsupported} ({what}) is not supported")
        if kwargs.get("output_attentions"):
            warnings.warn(f"{who}: output_attentions=True returns no attention weights (as sdpa)", stacklevel=2)
        B, _, Nq, _ = query.shape
        Nk = key.shape[2]
        mask = attention_mask
        if mask is None:  # a model that builds no mask through transformers' masking utilities
            causal = kwargs.get("is_causal")
            causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
            window = int(sliding_window) if causal and sliding_window else None
            # the queries are the last Nq positions of the keys (a cache); with more queries than keys,
            # top-left as sdpa's is_causal (q_offset = Nk - Nq < 0 was refused as a negative offset)
            mask = KeyMask(MaskKind(causal, window), max(Nk - Nq, 0) if causal else 0, 0, Nq, Nk, None)
        elif not isinstance(mask, KeyMask):
            raise TypeError(f"{who}: attention_mask must come from attncc's mask function (no dense masks), got "
                            f"{type(mask).__name__}{tuple(mask.shape) if hasattr(mask, 'shape') else ''}; pass the "
                            f"2D padding mask to the model and let it build the mask")
        # raised where a call uses the mask, not where it was made: a model makes the masks of every kind of
        # layer it has (Qwen2-MoE's unused sliding one, of window 0, on full-attention layers only)
        self._refuse_unmapped(mask)
        if (mask.q_length, mask.kv_length) != (Nq, Nk):
            raise ValueError(f"{who}: the mask was made for {mask.q_length} queries and {mask.kv_length} keys, "
                             f"the call has {Nq} and {Nk}")
        packed = _packed(who, mask, kwargs, B, Nq, Nk)
        held = mask.held(Nk)
        in_place = held < Nk or _static_storage(key, value)
        if held < Nk:  # a static cache's empty slots: the kernels see the keys before them only
            key, value, Nk = key[:, :, :held], value[:, :, :held], held
        if in_place and torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
            # the cache's next call writes into it in place: the backward keeps its own copy (as eager's
            # repeat_kv does with GQA)
            key, value = key.clone(), value.clone()
        dropout = float(dropout or 0.0)
        if self.module is not None:
            # the layer's window and softcap come as named arguments: a spec's params of those names take them
            layer = {n: x for n, x in (("sliding_window", sliding_window), ("softcap", softcap)) if x is not None}
            run, kw, translation_invariant = self._user_call(who, mask, B, Nk, dropout, softcap, {**layer, **kwargs},
                                                             query.device)
            _user_scale(who, self.module.SPEC, scaling, query.shape[-1], kw)
        else:
            run = self._builtin_module(mask.kind, mask.key_ok is not None, softcap, dropout, query, value)
            kw, translation_invariant = {}, True
            if mask.kind.window is not None:
                kw["window"] = mask.kind.window
            if dropout:
                kw["dropout_p"] = dropout
            if scaling is not None:
                kw["scale"] = float(scaling)
        sink = kwargs.get("s_aux")  # GPT-OSS: one logit per query head, with a value of zero
        if sink is not None:
            if sink.shape != (query.shape[1],):
                raise ValueError(f"{who}: s_aux (attention sinks) must have one logit per query head, shape "
                                 f"[{query.shape[1]}], got {tuple(sink.shape)}")
            kw["return_lse"] = True
        if packed is not None:
            o = self._run_packed(run, packed, query, key, value, kw)
        else:
            o = self._run(run, mask, query, key, value, kw, dropout, translation_invariant)
        if sink is not None:
            # softmax over the scores and the sink = the scores' softmax times exp(lse) / (exp(lse) + exp(sink))
            o, lse = o
            o = o * torch.sigmoid(lse - sink.float()[None, :, None]).unsqueeze(-1).to(o.dtype)
        return o.transpose(1, 2).contiguous(), None

    def _refuse_unmapped(self, mask: KeyMask):
        """A mask this integration does not map (``kind`` None) runs only with a user's spec."""
        if mask.kind is not None or self.module is not None:
            return
        raise NotImplementedError(
            f"attncc ({self.name}): the model asks for a mask transformers builds from {mask.mask_function}, which is "
            f"not one of the masks this integration maps to generated kernels (causal, bidirectional, sliding "
            f"windows of at least 1, with padding, and those of sequences packed in a row); custom mask overlays "
            f"(or_mask_function / and_mask_function, chunked or block-wise attention) are among them. Write the "
            f"pattern as a spec and register it: register(name, spec=...)")

    def _run_packed(self, run: ModuleType, packed: "Packed", q, k, v, kw: dict):
        """The rows of the batch one after another: [1, H, B * N, D], FlashAttention's varlen layout."""
        B, Nq = q.shape[0], q.shape[2]
        flat = [x.transpose(0, 1).reshape(1, x.shape[1], B * x.shape[2], x.shape[3]) for x in (q, k, v)]
        if "key_ok" in kw:
            raise ValueError(f"attncc ({self.name}): a spec with an input key_ok cannot run packed sequences (its "
                             f"kernels refuse cu_seqlens with [inputs]); pass one sequence a row with a 2D "
                             f"attention_mask")
        self.calls["attention"] += 1
        out = run.attention(*flat, cu_seqlens_q=packed.cu_q, cu_seqlens_k=packed.cu_k, max_seqlen_q=packed.max_q,
                            max_seqlen_k=packed.max_k, **kw)
        o, lse = out if kw.get("return_lse") else (out, None)
        o = o.reshape(o.shape[1], B, Nq, o.shape[3]).transpose(0, 1)
        return o if lse is None else (o, lse.reshape(lse.shape[1], B, Nq).transpose(0, 1))

    def _run(self, run: ModuleType, mask: KeyMask, q, k, v, kw: dict, dropout: float, translation_invariant: bool):
        Nq, Nk = q.shape[2], k.shape[2]
        queries_end = mask.q_offset - mask.kv_offset + Nq  # the rows of the cache that the queries fill
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        # decode sees the keys [0, queries_end): not where keys follow the queries (cross-attention's encoder
        # states; a static cache's empty slots past the queries were cut off already). A spec with [rope]
        # rotates q only in decode, its cache holding keys attention rotated: the model's cache holds them as
        # the model wrote them, which attention rotates in the kernels (decode's logits were off, silently).
        # A spec with random_blocks() has no decode (every call of 16 tokens or fewer raised).
        if (self.use_decode and not needs_grad and not dropout and Nq <= MAX_DECODE_QUERIES and run.SPEC.decode
                and not run.SPEC.rope and Nq <= queries_end == Nk and (translation_invariant or mask.kv_offset == 0)):
            # positions from the cache's first row: i - j and the padding are what they are globally
            if mask.key_ok is not None and "key_ok" not in kw:
                kw["key_ok"] = mask.key_ok[:, mask.kv_offset:mask.kv_offset + Nk]
            kv_len = torch.full((q.shape[0],), queries_end, dtype=torch.int32, device=q.device)
            self.calls["decode"] += 1
            return run.decode(q, k, v, kv_len=kv_len, **kw)
        if mask.key_ok is not None and "key_ok" not in kw:
            kw["key_ok"] = mask.key_ok
        self.calls["attention"] += 1
        return run.attention(q, k, v, q_offset=mask.q_offset, k_offset=mask.kv_offset, **kw)

    def _builtin_module(self, kind: MaskKind, padded: bool, softcap, dropout: float, query, value) -> ModuleType:
        key = (kind, padded, softcap, dropout, query.shape[-1], value.shape[-1], query.dtype)
        module = self._modules.get(key)
        if module is None:
            text = builtin_spec(kind, padded=padded, softcap=softcap, dropout=dropout, head_dim=query.shape[-1],
                                value_dim=value.shape[-1], dtype=query.dtype)
            with self._lock:
                module = self._modules[key] = attncc.compile(text)
        return module

    def _user_call(self, who, mask: KeyMask, B: int, Nk: int, dropout: float, softcap, kwargs: dict, device):
        spec = self.module.SPEC
        if (softcap or None) != spec.softcap:
            raise ValueError(f"{who}: the model asks for softcap = {softcap}, the spec has "
                             f"{spec.softcap if spec.softcap is not None else 'none'} ([score].softcap)")
        names = {p.name for p in spec.params} | {d.name for d in spec.inputs}
        kw = {n: kwargs[n] for n in names if n in kwargs}
        if "key_ok" in {d.name for d in spec.inputs}:
            if "key_ok" not in kw:
                kw["key_ok"] = (mask.key_ok if mask.key_ok is not None
                                else torch.ones(B, mask.kv_offset + Nk, dtype=torch.bool, device=device))
        elif mask.key_ok is not None:
            raise ValueError(f"{who}: the batch has padding, and the spec {spec.name} has no input key_ok "
                             f"(dims = [\"b\", \"n\"], dtype = \"bool\") to receive it; add one and use it in the mask")
        if dropout:
            if not spec.dropout:
                raise ValueError(f"{who}: the model asks for dropout {dropout}; the spec {spec.name} has no "
                                 f"[score].dropout")
            kw["dropout_p"] = dropout
        elif spec.dropout:
            kw["dropout_p"] = 0.0
        return self.module, kw, False


def _static_storage(*tensors: torch.Tensor) -> bool:
    """Whether one of ``tensors`` is a static cache's own storage, which the cache's later calls write into
    in place (transformers' static layers mark it with ``torch._dynamo.mark_static_address``)."""
    return any(getattr(t, "_dynamo_static_input_type", None) is not None for t in tensors)


def _user_scale(who: str, spec, scaling, head_dim: int, kw: dict) -> None:
    """The model's ``scaling`` as the softmax scale of a user's spec, into the call's keywords ``kw``.

    A spec whose ``[score].scale`` is written runs at that scale, and a spec with a param or input named
    ``scale`` takes the call's ``scale=`` as that param (its softmax scale stays the spec's): either way
    the model's scaling cannot be passed, so it must be the spec's (else an error, as for ``softcap``)."""
    if scaling is None:
        return
    scaling = float(scaling)
    named = any(x.name == "scale" for x in (*spec.params, *spec.inputs))
    if spec.scale is None and not named:
        kw["scale"] = scaling
        return
    own = spec.scale if spec.scale is not None else 1.0 / math.sqrt(head_dim)
    if not math.isclose(scaling, own, rel_tol=1e-6):
        where = (f"[score].scale = {spec.scale!r}" if spec.scale is not None else
                 f"no [score].scale (1/sqrt({head_dim}) = {own!r})")
        raise ValueError(
            f"{who}: the model asks for scaling = {scaling!r}, the spec {spec.name} has {where}"
            + (f"; its param scale takes the call's scale= keyword, so the softmax scale stays {own!r}: rename "
               f"the param or write [score].scale" if named else "; write the model's scaling as [score].scale"))
    if not named:
        kw["scale"] = scaling  # the spec's, to float rounding


@dataclass(frozen=True, eq=False)
class Packed:
    """Sequences packed in the batch's rows: cumulative lengths over the rows taken one after another."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: Optional[int]
    max_k: Optional[int]


def _packed(who: str, mask: KeyMask, kwargs: dict, B: int, Nq: int, Nk: int) -> Optional[Packed]:
    """The packed sequences of a call: FlashAttention's ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and
    ``max_length_q`` / ``max_length_k``) where the model passes them (``DataCollatorWithFlattening``),
    else those transformers found from ``position_ids`` (the mask's), else None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        if mask.cu_seqlens is None:
            return None
        return Packed(mask.cu_seqlens, mask.cu_seqlens, None, None)
    if cu_q is None or cu_k is None:
        raise ValueError(f"{who}: packed sequences need both cu_seq_lens_q and cu_seq_lens_k, got only "
                         f"{'cu_seq_lens_q' if cu_q is not None else 'cu_seq_lens_k'}")
    if mask.key_ok is not None:
        raise ValueError(f"{who}: cu_seq_lens_q / cu_seq_lens_k (packed sequences) with a padding mask; pass "
                         f"either the packed sequences without attention_mask or a padded batch")
    if mask.q_offset != 0 or mask.kv_offset != 0 or Nq != Nk:
        raise ValueError(f"{who}: cu_seq_lens_q / cu_seq_lens_k (packed sequences) on a call at cache positions "
                         f"{mask.q_offset} (queries) and {mask.kv_offset} (keys), {Nq} queries and {Nk} keys: packed "
                         f"sequences run without a filled cache, queries and keys the same tokens")
    lengths = [kwargs.get("max_length_q"), kwargs.get("max_length_k")]
    max_q, max_k = (None if m is None else int(m) for m in lengths)
    return Packed(cu_q, cu_k, max_q, max_k)


def builtin_spec(kind: MaskKind, *, padded: bool, softcap: Optional[float], dropout: float, head_dim: int,
                 value_dim: int, dtype: torch.dtype) -> str:
    """The spec text of one built-in pattern (what ``register()`` compiles per kind of call)."""
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"attncc: attention runs in float32, float16 or bfloat16, got {dtype}")
    parts = ["causal" if kind.causal else "bidirectional"] + ["window"] * (kind.window is not None)
    parts += ["padded"] * padded + ["softcap"] * bool(softcap) + ["dropout"] * bool(dropout)
    lines = [f'name = "hf_{"_".join(parts)}"', f"head_dim = {head_dim}", f'dtypes = ["{_DTYPE_NAMES[dtype]}"]']
    if value_dim != head_dim:
        lines.append(f"value_dim = {value_dim}")
    if kind.window is not None:
        lines += ["[params]", f"window = {kind.window}"]
    clauses = kind.clauses()
    if padded:
        lines += ["[inputs]", 'key_ok = { dims = ["b", "n"], dtype = "bool" }']
        clauses += ("key_ok[b, j]",)
    if clauses:
        lines += ["[mask]", f'where = "{" and ".join(clauses)}"']
    score = ([f"softcap = {float(softcap)!r}"] if softcap else []) + ([f"dropout = {dropout!r}"] if dropout else [])
    if score:
        lines += ["[score]"] + score
    return "\n".join(lines) + "\n"


def _user_module(spec) -> ModuleType:
    """The module of a user's spec: a generated module as it is, else ``attncc.compile(spec)``. Its
    ``SPEC.softcap`` is checked against the model's (a module's softcap was taken as unknown, so a Gemma 2
    model's softcap was dropped without a word where the same spec as text or a path was refused)."""
    if isinstance(spec, ModuleType):
        if not hasattr(spec, "attention") or not hasattr(spec, "SPEC"):
            raise TypeError(f"attncc: spec must be a generated module (with attention and SPEC), got {spec.__name__}")
        return _softmax(spec)
    return _softmax(attncc.compile(spec))


def _softmax(module: ModuleType) -> ModuleType:
    """``module``, a softmax attention module: models call softmax attention (a linear module, passed as a
    module, was taken and failed in the model's forward with "attention() got an unexpected keyword
    argument 'scale'")."""
    if module.SPEC.kind != "softmax":
        raise ValueError(f"attncc: {module.SPEC.name} is a {module.SPEC.kind} attention spec; models call softmax "
                         f"attention")
    return module


def register(name: str = "attncc", spec=None, *, decode: bool = True) -> str:
    """Register attncc as transformers attention implementation ``name``; returns ``name``.

    ``spec``: None for the built-in patterns (what the model asks for), else the pattern to run
    for every call: TOML text, a dict, a path (``attncc.compile``) or a generated module.
    ``decode``: run decoding steps through the module's ``decode`` (else ``attention``)."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or name.startswith(
            ("flash_attention", "paged")):
        raise ValueError(f"attncc: name must be a new attention implementation name, got {name!r}")
    impl = _REGISTERED[name] = _Implementation(name, spec, decode)

    def attncc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                         softcap=None, **kwargs):
        return impl.forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                            sliding_window=sliding_window, softcap=softcap, **kwargs)

    def attncc_mask(*args, **kwargs):
        return impl.mask(*args, **kwargs)

    AttentionInterface.register(name, attncc_attention)
    AttentionMaskInterface.register(name, attncc_mask)
    return name


def registered(name: str = "attncc") -> "_Implementation":
    """What ``register(name, ...)`` registered (its ``calls`` count the decode and attention calls)."""
    return _REGISTERED[name]
