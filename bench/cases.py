"""The benchmark cases, declared once: ``python -m bench CASE...`` runs them, the tools
(``python -m bench configs ...``) take their cases from here too.

A case is a spec (a shipped ``specs/<spec>.toml``, or a score transform of :data:`TRANSFORMS`
written inline), its shapes and params, what is called (``attention``, or ``decode`` of one new
token over a contiguous or paged cache), the baselines that compute the same thing or serve as a
reference point (bench/impls.py), the groups it belongs to, and what changes under ``--smoke``
(CPU, interpreter, tiny sizes). Its inputs ([inputs] of the spec), FLOPs (the exact density of the
mask), bytes (decode) and the baselines' forms of the pattern are derived from the spec, not
written here. :data:`SWEEPS` are named lists of environment settings under which attncc is timed
side by side (``--sweep NAME``: tile configs, split counts).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch


def P(**kw) -> Tuple[Tuple[str, object], ...]:
    """Params (or smoke overrides) as a hashable tuple of pairs."""
    return tuple(sorted(kw.items()))


# ---------------------------------------------------------------------------------------------
# score transforms written inline ([score] mod), with the same transform as a Flex score_mod
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    label: str
    score: str  # the [score] table's lines
    flex: Callable  # (heads, inputs) -> FlexAttention score_mod
    tables: str = ""  # other tables of the spec; {H}: the number of heads
    causal: bool = False  # the transform masks causally (-inf): Flex gets a causal block mask

    def spec_text(self, name: str, H: int, D: int) -> str:
        return f'name = "{name}"\nhead_dim = {D}\n' + self.tables.replace("{H}", str(H)) + f"[score]\n{self.score}\n"


TRANSFORMS: Dict[str, Transform] = {
    "identity": Transform("identity", 'mod = "s"', lambda H, kw: lambda s, b, h, i, j: s),
    "times_two": Transform("s * 2", 'mod = "s * 2"', lambda H, kw: lambda s, b, h, i, j: s * 2),
    "squared": Transform("s * s", 'mod = "s * s"', lambda H, kw: lambda s, b, h, i, j: s * s),
    "head_scale": Transform("s * head_scale[h]", 'mod = "s * head_scale[h]"',
                            lambda H, kw: lambda s, b, h, i, j: s * kw["head_scale"][h],
                            '[inputs]\nhead_scale = { dims = ["h"], dtype = "float32" }\n'),
    "sin_cos_tan_b": Transform("sin(cos(s)) + tan(b)", 'mod = "sin(cos(s)) + tan(b)"',
                               lambda H, kw: lambda s, b, h, i, j: torch.sin(torch.cos(s)) + torch.tan(
                                   b.to(torch.float32))),
    "relative": Transform("s + (i - j)", 'mod = "s + (i - j)"', lambda H, kw: lambda s, b, h, i, j: s + (i - j)),
    "relative_causal": Transform("where(i >= j, s + (i - j), -inf)", 'mod = "where(i >= j, s + (i - j), -inf)"',
                                 lambda H, kw: lambda s, b, h, i, j: s + (i - j), causal=True),
    "alibi_mod": Transform("ALiBi as mod", 'mod = "s + (j - i) * exp2(-(h + 1) * 8 / heads)"',
                           lambda H, kw: lambda s, b, h, i, j: s + (j - i) * torch.exp2(-(h + 1) * 8.0 / H),
                           "[params]\nheads = {H}\n"),
    "softcap_mod": Transform("softcap 30 (mod)", 'mod = "30 * tanh(s / 30)"',
                             lambda H, kw: lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)),
    "softcap_builtin": Transform("softcap 30 (built-in)", "softcap = 30.0",
                                 lambda H, kw: lambda s, b, h, i, j: 30.0 * torch.tanh(s / 30.0)),
}


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str  # what the command line calls it
    label: str  # what the tables call it
    spec: str  # specs/<spec>.toml (generated/<spec>.py), or a key of TRANSFORMS when transform is set
    B: int
    N: int
    Hq: int = 16
    Hkv: int = 0  # 0: Hq
    D: int = 128
    params: Tuple[Tuple[str, object], ...] = ()
    baselines: Tuple[str, ...] = ("flex",)  # names of bench/impls.py BASELINES
    groups: Tuple[str, ...] = ()
    transform: bool = False
    doc_mean: int = 1024  # mean document length of a [b, n] document-id input
    decode: str = ""  # "": attention over N tokens; "contiguous" / "paged": decode of 1 token over an N-token cache
    page: int = 64  # tokens per page of a paged cache
    smoke: Tuple[Tuple[str, object], ...] = ()  # fields replaced under --smoke, after the default shrink
    # attncc is also timed under each of these environment settings (beside --sweep / --env): rows
    # side by side with attncc at its defaults, as a sweep's
    settings: Tuple[Tuple[Tuple[str, str], ...], ...] = ()

    @property
    def kv_heads(self) -> int:
        return self.Hkv or self.Hq

    @property
    def param_dict(self) -> dict:
        return dict(self.params)

    @property
    def mask(self) -> str:
        """The shipped spec whose mask (density, Flex mask_mod, SDPA form) this case has."""
        if self.transform:
            return "causal" if TRANSFORMS[self.spec].causal else "dense"
        return self.spec

    def spec_text(self) -> str:
        """The inline spec of a transform case."""
        return TRANSFORMS[self.spec].spec_text(self.spec, self.Hq, self.D)

    def at_smoke(self) -> "Case":
        """This case at interpreter sizes: B = 1, 2 heads, N <= 128, D = 32 (or a quarter of an
        unusual head dim), documents of mean length 32; then the case's own ``smoke`` overrides."""
        small = dict(B=1, Hq=2, Hkv=0, N=min(128, max(32, self.N // 32)), D=32 if self.D == 128 else self.D // 4,
                     doc_mean=32, page=16)
        small.update(self.smoke)
        return dataclasses.replace(self, **small)


def _dev_and_families() -> List[Case]:
    plain = ("flex", "sdpa_flash", "sdpa_cudnn")
    dev = [
        Case("dense-4k", "dense 4K", "dense", 8, 4096, baselines=plain),
        Case("causal-8k", "causal 8K", "causal", 4, 8192, baselines=plain),
        Case("sliding-window-16k", "sliding window 1024, 16K", "sliding_window", 2, 16384, params=P(window=1024),
             smoke=P(params=P(window=32))),
        # the Flex block mask of a data-dependent mask is built per call by its users: timed both ways
        Case("document-16k", "document mask, 16K", "document", 2, 16384, baselines=("flex", "flex_mask_per_call")),
        Case("alibi-4k", "ALiBi causal, 4K", "alibi", 8, 4096),
        Case("softcap-8k", "softcap 30 causal, 8K", "softcap", 4, 8192),
    ]
    dev = [dataclasses.replace(c, groups=("dev",)) for c in dev]
    # the families of issue 16 at N = 16K (static masks: closed forms or exact block lists)
    families = [
        Case("sink-window-16k", "sink 4 + window 1024, 16K", "sink_window", 2, 16384, params=P(sinks=4, window=1024),
             smoke=P(params=P(sinks=4, window=24))),
        Case("chunked-local-16k", "chunked local 2048, 16K", "chunked_local", 2, 16384, params=P(chunk=2048),
             smoke=P(params=P(chunk=40))),
        Case("block-diagonal-16k", "block diagonal 1024, 16K", "block_diagonal", 2, 16384, params=P(chunk=1024),
             smoke=P(params=P(chunk=40))),
        Case("neighborhood-2d-16k", "2D neighborhood 128x128 r3", "neighborhood_2d", 2, 16384,
             params=P(width=128, radius=3), smoke=P(params=P(width=16, radius=2))),
        Case("prefix-lm-16k", "prefix-LM 2048, 16K", "prefix_lm", 2, 16384, params=P(prefix=2048),
             smoke=P(params=P(prefix=40))),
        Case("prefix-lm-8k", "prefix-LM 2048, 8K", "prefix_lm", 4, 8192, params=P(prefix=2048),
             smoke=P(params=P(prefix=40))),
        Case("longformer-16k", "Longformer w256 g64, 16K", "longformer", 2, 16384, params=P(w=256, g=64),
             smoke=P(params=P(w=16, g=8))),
        Case("bigbird-16k", "BigBird 64-blocks, 16K", "bigbird", 2, 16384),
        Case("strided-16k", "strided 128, 16K", "strided", 2, 16384, params=P(stride=128), smoke=P(params=P(stride=16))),
        Case("dilated-16k", "dilated 2048/4, 16K", "dilated", 2, 16384, params=P(window=2048, dilation=4),
             smoke=P(params=P(window=64, dilation=4))),
        Case("causal-16k", "causal 16K (reference)", "causal", 2, 16384),
    ]
    families = [dataclasses.replace(c, groups=("families",)) for c in families]
    return dev + families


def _shapes() -> List[Case]:
    plain = ("flex", "sdpa_flash", "sdpa_cudnn")
    out = [
        Case("causal-8k-d64", "causal 8K, D=64", "causal", 4, 8192, D=64, baselines=plain, groups=("hd",)),
        Case("causal-8k-d256", "causal 8K, D=256", "causal", 4, 8192, D=256, baselines=plain, groups=("hd",)),
        # specs/gqa.toml declares its heads: they stay at smoke sizes
        Case("gqa-8k", "GQA 32/8 causal, 8K", "gqa", 2, 8192, Hq=32, Hkv=8, baselines=plain, groups=("gqa",),
             smoke=P(Hq=32, Hkv=8, N=64)),
    ]
    # causal at B * N = 64K tokens
    for n in (1024, 2048, 4096, 8192, 16384, 32768):
        out.append(Case(f"sweep-{n // 1024}k", f"causal B={65536 // n} N={n // 1024}K", "causal", 65536 // n, n,
                        baselines=plain, groups=("sweep",)))
    # timed by bench/configs.py when named
    out += [Case("dense-16k", "dense 16K", "dense", 2, 16384, baselines=plain, groups=("extra",)),
            Case("dense-1k", "dense 1K", "dense", 64, 1024, baselines=plain, groups=("extra",))]
    return out


# the forward's backends (attncc.runtime.backend): the Gluon sm90 forward of the specs that have one
# the tl kernels and the Gluon ones beside attncc's default (auto: the Gluon forward on sm90 where the
# Plan picks it, attncc.runtime.gluon.AUTO_SELECTS_GLUON)
BACKENDS = ((("ATTNCC_BACKEND", "triton"),), (("ATTNCC_BACKEND", "gluon"),))
# the Gluon backward's three methods (ATTNCC_GLUON_BWD, attncc.runtime.backend), all on the Gluon forward:
# split (bwd.py, 7 GEMMs per tile pair, deterministic), fused (bwd_fused.py, 5 GEMMs, dQ by TMA reduce-add)
# and ws (bwd_ws.py, the fused kernel warp-specialized: producer and dQ writer warps, two consumer warpgroups)
GLUON_BWD = ((("ATTNCC_BACKEND", "triton"),),) + tuple((("ATTNCC_BACKEND", "gluon"), ("ATTNCC_GLUON_BWD", method))
                                                      for method in ("split", "fused", "ws"))


def _comparisons() -> List[Case]:
    out = [Case(f"mod-{key.removesuffix('_mod').replace('_', '-')}", t.label, key, 4, 4096, transform=True, groups=("score-mods",))
           for key, t in TRANSFORMS.items()]
    out += [
        # the baselines apply the rotary embedding in plain torch inside the timed call
        Case("rope-causal-8k", "RoPE causal (neox), 8K", "rope_causal", 4, 8192,
             baselines=("sdpa_flash", "sdpa_cudnn", "flex"), groups=("rope",)),
        # the documents of document-16k packed into one row of sequences (cu_seqlens); B = 2: rows are packed too
        Case("varlen-16k", "document mask vs packed varlen, 16K", "document", 2, 16384,
             baselines=("attncc_varlen", "torch_varlen"), groups=("varlen",), smoke=P(B=2)),
        Case("linear-elu-16k", "linear attention elu+1 causal, 16K", "linear_elu", 2, 16384,
             baselines=("fla", "fla_mapped"), groups=("linear",)),
    ]
    # where linear attention overtakes softmax causal attention (a reference point, not the same function)
    out += [Case(f"linear-crossover-{n // 1024}k", f"linear elu+1 vs softmax causal, {n // 1024}K", "linear_elu", 2,
                 n, baselines=("softmax_causal", "softmax_causal_cudnn"), groups=("crossover",))
            for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536)]
    # decode: one new token per row over a cache of N tokens, bandwidth-bound (issue 8); SDPA and Flex
    # read the contiguous cache (neither takes a page table)
    for B, n in ((8, 32768), (1, 131072)):
        for layout in ("contiguous", "paged"):
            out.append(Case(f"decode-{B}x{n // 1024}k" + ("-paged" if layout == "paged" else ""),
                            f"decode B={B} L={n // 1024}K, {layout} cache", "causal", B, n, Hq=32, Hkv=8,
                            decode=layout, baselines=("sdpa_flash", "flex"), groups=("decode",),
                            smoke=P(Hq=8, Hkv=2)))
    # the Gluon sm90 kernels (attncc/runtime/gluon, docs/gluon.md): forward only, D = 128
    gluon = ("gluon_ws", "gluon_ws_nopp", "gluon_pipelined", "sdpa_cudnn", "flex")
    out += [Case("gluon-dense-4k", "Gluon: dense 4K", "dense", 4, 4096, baselines=gluon, groups=("gluon",)),
            Case("gluon-causal-8k", "Gluon: causal 8K", "causal", 2, 8192, baselines=gluon, groups=("gluon",)),
            Case("gluon-gqa-8k", "Gluon: GQA 32/8 causal 8K", "gqa", 2, 8192, Hq=32, Hkv=8, baselines=gluon,
                 groups=("gluon",), smoke=P(Hq=32, Hkv=8, N=64))]
    # the generated modules with their forward and backward on the Gluon kernels (ATTNCC_BACKEND=gluon,
    # attncc.runtime.backend) beside their tl kernels, forward and forward + backward (the Gluon backward
    # at D = 64 and 128, the tl one at 256), and the forward kernel called directly (gluon_ws_nopp: what
    # the wiring adds on the host)
    # (group gluon-wired: every wired case; gluon-wired-dense: the dense / causal / GQA ones, a device call
    # of their own; gluon-families: the mask families, another)
    dense_groups = ("gluon-wired", "gluon-wired-dense")
    wired = dict(baselines=("gluon_ws_nopp", "sdpa_cudnn"), groups=dense_groups, settings=BACKENDS)
    out += [Case("wired-dense-4k", "dense 4K (Gluon wired)", "dense", 4, 4096, **wired),
            Case("wired-causal-8k", "causal 8K (Gluon wired)", "causal", 2, 8192, **wired),
            Case("wired-causal-8k-d64", "causal 8K, D=64 (Gluon wired)", "causal", 4, 8192, D=64, **wired),
            Case("wired-causal-8k-d256", "causal 8K, D=256 (Gluon forward wired, tl backward)", "causal", 2, 8192,
                 D=256, **wired),
            Case("wired-gqa-8k", "GQA 32/8 causal 8K (Gluon wired)", "gqa", 2, 8192, Hq=32, Hkv=8,
                 smoke=P(Hq=32, Hkv=8, N=64), **wired)]
    # issue 20's forward + backward target (>= 1.35x FlexAttention's Triton backend, D = 128): the same
    # modules under ATTNCC_BACKEND=gluon against Flex and cuDNN in one run (`python -m bench gluon-wired --bwd`)
    fb = dict(baselines=("flex", "sdpa_cudnn"), groups=dense_groups, settings=BACKENDS)
    out += [Case("wired-fb-dense-4k", "dense 4K, f+b vs Flex (Gluon wired)", "dense", 4, 4096, **fb),
            Case("wired-fb-causal-8k", "causal 8K, f+b vs Flex (Gluon wired)", "causal", 2, 8192, **fb),
            Case("wired-fb-gqa-8k", "GQA 32/8 causal 8K, f+b vs Flex (Gluon wired)", "gqa", 2, 8192, Hq=32, Hkv=8,
                 smoke=P(Hq=32, Hkv=8, N=64), **fb)]
    # the Gluon backward, split against fused and ws (docs/gluon.md "bwd_fused.py", "bwd_ws.py"): the generated modules' f+b at
    # their defaults (tl), then under each method, beside FlexAttention and cuDNN (`python -m bench gluon-bwd
    # --bwd`; issue 20's f+b target is >= 1.35x Flex, D = 128)
    gbwd = dict(baselines=("flex", "sdpa_cudnn"), groups=("gluon-bwd",), settings=GLUON_BWD)
    out += [Case("gbwd-dense-4k", "dense 4K, Gluon backward split / fused / ws", "dense", 4, 4096, **gbwd),
            Case("gbwd-causal-8k", "causal 8K, Gluon backward split / fused / ws", "causal", 2, 8192, **gbwd),
            Case("gbwd-gqa-8k", "GQA 32/8 causal 8K, Gluon backward split / fused / ws", "gqa", 2, 8192, Hq=32, Hkv=8,
                 smoke=P(Hq=32, Hkv=8, N=64), **gbwd),
            Case("gbwd-causal-8k-d64", "causal 8K, D=64, Gluon backward split / fused / ws", "causal", 4, 8192, D=64,
                 **gbwd)]
    # the families of issue 16 with their forward on the Gluon kernels through fragments rendered
    # from the Plan (generated/<spec>_gluon.py), beside FlexAttention (issue 16's 1.2x forward target):
    # every mask family of the group families at its shape and params there (prefix-LM at 8K only)
    rendered = dict(baselines=("flex",), groups=("gluon-wired", "gluon-families"), settings=BACKENDS)
    out += [Case("wired-sink-window-16k", "sink 4 + window 1024, 16K (Gluon forward rendered)", "sink_window", 2,
                 16384, params=P(sinks=4, window=1024), smoke=P(params=P(sinks=4, window=24)), **rendered),
            Case("wired-chunked-local-16k", "chunked local 2048, 16K (Gluon forward rendered)", "chunked_local", 2,
                 16384, params=P(chunk=2048), smoke=P(params=P(chunk=40)), **rendered),
            Case("wired-prefix-lm-8k", "prefix-LM 2048, 8K (Gluon forward rendered)", "prefix_lm", 4, 8192,
                 params=P(prefix=2048), smoke=P(params=P(prefix=40)), **rendered),
            Case("wired-sliding-window-16k", "sliding window 1024, 16K (Gluon forward rendered)", "sliding_window", 2,
                 16384, params=P(window=1024), smoke=P(params=P(window=32)), **rendered),
            Case("wired-softcap-8k", "softcap 30 causal, 8K (Gluon forward rendered)", "softcap", 4, 8192, **rendered),
            Case("wired-alibi-4k", "ALiBi causal, 4K (Gluon forward rendered)", "alibi", 8, 4096, **rendered),
            # block-list walks and [inputs] (docs/gluon.md "Block lists and [inputs]")
            Case("wired-document-16k", "document mask, 16K (Gluon forward over block lists)", "document", 2, 16384,
                 **rendered),
            Case("wired-strided-16k", "strided 128, 16K (Gluon forward over block lists)", "strided", 2, 16384,
                 params=P(stride=128), smoke=P(params=P(stride=16)), **rendered),
            Case("wired-dilated-16k", "dilated window 2048 / 4, 16K (Gluon forward, 64-key blocks)", "dilated", 2,
                 16384, params=P(window=2048, dilation=4), smoke=P(params=P(window=40, dilation=3)), **rendered),
            Case("wired-block-diagonal-16k", "block diagonal 1024, 16K (Gluon forward rendered)", "block_diagonal", 2,
                 16384, params=P(chunk=1024), smoke=P(params=P(chunk=40)), **rendered),
            Case("wired-longformer-16k", "Longformer w256 g64, 16K (Gluon forward rendered)", "longformer", 2, 16384,
                 params=P(w=256, g=64), smoke=P(params=P(w=16, g=8)), **rendered),
            Case("wired-neighborhood-2d-16k", "2D neighborhood 128x128 r3 (Gluon forward over block lists)",
                 "neighborhood_2d", 2, 16384, params=P(width=128, radius=3), smoke=P(params=P(width=16, radius=2)),
                 **rendered),
            Case("wired-bigbird-16k", "BigBird 64-blocks, 16K (Gluon forward over block lists)", "bigbird", 2, 16384,
                 **rendered)]
    return out


CASES: Dict[str, Case] = {c.name: c for c in _dev_and_families() + _shapes() + _comparisons()}
GROUPS: Dict[str, Tuple[str, ...]] = {}
for _c in CASES.values():
    for _g in _c.groups:
        GROUPS.setdefault(_g, ())
        GROUPS[_g] += (_c.name,)
GROUPS["quick"] = ("dense-4k", "causal-8k", "document-16k", "gqa-8k", "sweep-2k", "sweep-8k", "sweep-32k")
GROUPS["all"] = tuple(CASES)


# ---------------------------------------------------------------------------------------------
# sweeps: attncc timed under each setting in turn (``--sweep NAME``; ``--env`` for one of your own)
# ---------------------------------------------------------------------------------------------

# the forward's tile configs: BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize
_TILES = [(128, 128, 8, 2, 0), (128, 128, 8, 3, 0), (128, 128, 8, 4, 0), (128, 64, 4, 3, 0), (128, 64, 8, 3, 0),
          (128, 64, 4, 4, 0), (64, 128, 4, 3, 0), (64, 64, 4, 3, 0), (128, 128, 8, 3, 1), (128, 64, 4, 3, 1)]


def _tile(fields) -> str:
    return ",".join(f"{n}={v}" for n, v in zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "warp_specialize"),
                                               fields))


Setting = Tuple[Tuple[str, str], ...]  # (variable, value) pairs set together

SWEEPS: Dict[str, Tuple[Setting, ...]] = {
    "tile-configs": tuple((("ATTNCC_CONFIG", _tile(t)),) for t in _TILES),
    # attncc.runtime.linear.LinearConfig fields
    "linear-configs": tuple((("ATTNCC_LINEAR_CONFIG", v),) for v in (
        "scan_dv=64", "scan_dv=16,scan_warps=4", "chunk=128,out_dv=64", "out_dv=64", "num_warps=4",
        "bwd_chunk=32,bwd_warps=8", "bwd_chunk=64,bwd_warps=8")),
    "linear-bwd-chunks": tuple((("ATTNCC_LINEAR_CONFIG", f"bwd_chunk={c},bwd_warps={w}"),)
                               for c in (32, 64) for w in (8, 4)),
    # attncc.runtime.decode: a paged cache's loads need 2 x in-flight + 1 stages
    "decode-configs": tuple((("ATTNCC_DECODE_CONFIG", f"BLOCK_N={n},num_warps={w},num_stages={s}"),) for n, w, s in (
        (64, 4, 4), (64, 4, 3), (64, 4, 5), (32, 4, 4), (32, 4, 7), (128, 4, 3), (128, 8, 3), (64, 8, 4))),
    "decode-paged-configs": tuple((("ATTNCC_DECODE_CONFIG", f"BLOCK_N={n},num_warps={w},num_stages={s}"),)
                                  for n, w, s in ((64, 4, 7), (64, 4, 5), (64, 4, 9), (32, 4, 7), (32, 4, 13),
                                                  (128, 4, 5), (128, 8, 5), (64, 8, 7))),
    "decode-splits": tuple((("ATTNCC_DECODE_SPLITS", str(n)),) for n in (2, 4, 8, 16, 32, 64)),
    "backends": BACKENDS,
    "gluon-bwd": GLUON_BWD,
    # the Gluon split backward's tiles (ATTNCC_GLUON_BWD_TILES: launch.GluonBwdConfig fields): the default (one
    # warpgroup per program, two programs per SM: session 24), the two-warpgroup tiles before it, and neighbours
    # that still fit two per SM (32-row dK/dV steps, 32-key dQ steps, 3 stages) or one (3 stages at 64)
    "gluon-bwd-tiles": tuple((("ATTNCC_BACKEND", "gluon"), ("ATTNCC_GLUON_BWD_TILES", t)) for t in (
        "", "kv_block_n=128,kv_stages=3,q_block_m=128,q_stages=3", "kv_block_m=32,kv_stages=3",
        "q_block_n=32,q_stages=3", "kv_stages=3,q_stages=3")),
}


def parse_setting(text: str) -> Setting:
    """``NAME=VALUE[;NAME=VALUE...]`` (a value may contain ``=`` and ``,``); ValueError naming the text."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip().isidentifier():
            raise ValueError(f"--env {text!r}: expected NAME=VALUE[;NAME=VALUE...], e.g. ATTNCC_FUSED_DQ=0")
        out.append((name.strip(), value.strip()))
    if not out:
        raise ValueError(f"--env {text!r}: expected NAME=VALUE[;NAME=VALUE...]")
    return tuple(out)


def setting_label(setting: Setting) -> str:
    return ";".join(f"{k}={v}" for k, v in setting)


def select(names) -> List[Case]:
    """The cases named (case or group names, in order, each case once); ValueError naming the
    unknown ones and what there is."""
    unknown = [n for n in names if n not in CASES and n not in GROUPS]
    if unknown:
        raise ValueError(f"unknown case or group {', '.join(map(repr, unknown))}; groups: {', '.join(GROUPS)}; "
                         f"cases: {', '.join(CASES)}")
    out: Dict[str, Case] = {}
    for n in names:
        for name in GROUPS.get(n, (n,)):
            out.setdefault(name, CASES[name])
    return list(out.values())
