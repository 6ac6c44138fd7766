"""``attncc tune``: fill the tile-config cache of this GPU ahead of time, list it, clear it.

    attncc tune SPEC... --n 4096,16384 [--nk N,...] [--dtype bf16] [--head-dim 128] [--batch 2]
                [--heads 16] [--forward-only] [--force] [--exhaustive]
    attncc tune --show
    attncc tune --clear

For each spec, dtype (default: the spec's ``dtypes``), head dim (default: the spec's
``head_dims``) and length, times the candidate configs (pruned: see tuning.candidates; all of
them with ``--exhaustive``) of the forward, dK/dV and dQ kernels on
random q, k, v (and representative [inputs]: see attncc.report.synthesize_inputs) and
stores the fastest in the cache (runtime/tuning.py; ``ATTNCC_CACHE_DIR``). Generated modules
of the same spec (same spec hash) then use them on this GPU and Triton version.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from attncc.core.files import spec_file

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32"}


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4096,16384, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    """--batch, --heads: an int >= 1 (a batch of 0 timed kernels that run nothing and stored the
    winner as this shape's config)."""
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _head_dims(text: str) -> List[int]:
    """--head-dim: head dims the kernels take, 1 to MAX_HEAD_DIM (``--head-dim 512`` went on to
    bind's ValueError, a traceback, on a GPU only)."""
    from attncc.core.semantics import MAX_HEAD_DIM

    values = _ints(text)
    if max(values) > MAX_HEAD_DIM:
        raise argparse.ArgumentTypeError(f"expected head dims from 1 to {MAX_HEAD_DIM} (the kernels' limit), got {text!r}")
    return values


def _dtypes(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected dtypes among {', '.join(DTYPES)}, got {text!r}")
    return list(dict.fromkeys(DTYPES[v] for v in names))  # each once (bf16,bfloat16 is one dtype)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attncc tune", description="Tune tile configs for this GPU and cache them.")
    p.add_argument("specs", nargs="*", help="spec files (TOML), or names of specs/<name>.toml")
    p.add_argument("--n", type=_ints, default=[4096], help="query lengths, comma-separated (default 4096)")
    p.add_argument("--nk", type=_ints, default=None, help="key lengths, one per --n (default: --n)")
    p.add_argument("--dtype", type=_dtypes, default=None, help="bf16, fp16, fp32, comma-separated (default: the spec's dtypes)")
    p.add_argument("--head-dim", type=_head_dims, default=None, help="head dims, comma-separated (default: the spec's head_dims)")
    p.add_argument("--batch", type=_positive, default=2, help="batch size (default 2)")
    p.add_argument("--heads", type=_positive, default=16, help="query heads where the spec fixes none (default 16)")
    p.add_argument("--forward-only", action="store_true", help="tune the forward kernel only")
    p.add_argument("--force", action="store_true", help="tune again what the cache already holds")
    p.add_argument("--exhaustive", action="store_true",
                   help="time the whole search space (about 85 configs per shape) instead of the pruned few")
    p.add_argument("--show", action="store_true", help="list the cache and exit")
    p.add_argument("--clear", action="store_true", help="delete the cache and exit")
    p.add_argument("--verbose", action="store_true", help="log each tuning run and failed config")
    return p


def show() -> str:
    """The cache as text: one block per (GPU, Triton version), one line per tuned kernel, and
    what was ignored (unreadable files, malformed entries)."""
    from attncc.core.text import printable
    from attncc.runtime import tuning

    files = tuning.cache_files()
    lines = []
    count = 0
    for path in files:
        data = tuning.read_file(path)
        if data.error is not None:
            lines.append(f"{printable(path.name)}: ignored, {data.error}")
            continue
        lines.append(f"{printable(data.gpu)}, Triton {printable(data.triton)} ({printable(path.name)}):")
        for entry, record in sorted(data.entries.items(), key=_order):
            key, cfg = record["key"], record["config"]
            lines.append(
                f"  {key['spec']:<20} {tuning.KERNEL_NAMES[key['kernel']]:<8} "
                f"{key['dtype']:<9} d{key['head_dim']}x{key['value_dim']:<4} "
                f"N {key['n_q']}x{key['n_k']:<7} "
                f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} warps={cfg['num_warps']} "
                f"stages={cfg['num_stages']}" + timing(record))
            count += 1
        for entry, problem in sorted(data.ignored.items()):
            lines.append(f"  ignored malformed entry {tuning.short_repr(entry, 60)}: {problem}")
    head = f"attncc tune cache: {printable(tuning.cache_dir())} ({count} entr{'y' if count == 1 else 'ies'} in {len(files)} file(s))"
    return "\n".join([head] + lines)


def timing(record: dict) -> str:
    """``"  0.326 ms (default 0.336 ms, +3.1% over the built-in config)"``, what is known of it."""
    ms, default = record.get("ms"), record.get("default_ms")
    if ms is None:
        return ""
    if default is None:
        return f"  {ms:.3f} ms"
    from attncc.runtime import tuning

    faster = tuning.gain(record)  # None at 0 ms (a record may hold it: a time >= 0), which no ratio has
    return f"  {ms:.3f} ms (default {default:.3f} ms" + (")" if faster is None else
                                                         f", {faster:+.1%} over the built-in config)")


def _order(item):
    """Cache entries (checked: tuning.record_problem) by spec, dtype, dims, lengths, then forward, dK/dV, dQ."""
    from attncc.runtime.tuning import KERNEL_NAMES

    entry, record = item
    key = record["key"]
    return (key["spec"], key["dtype"], key["head_dim"], key["value_dim"], key["n_q"], key["n_k"],
            list(KERNEL_NAMES).index(key["kernel"]), entry)


class Progress:
    """A one-line progress bar on stderr."""

    WIDTH = 24

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr

    def __call__(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // max(total, 1)
        self.stream.write(f"\r  {self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _module(pattern, folder: Path):
    """The generated module of ``pattern``, rendered into ``folder`` and imported from there."""
    from attncc.codegen import render

    path = folder / f"{pattern.name}.py"
    path.write_text(render(pattern))
    spec = importlib.util.spec_from_file_location(f"_attncc_tune_{pattern.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tune_spec(module, pattern, *, n_q: int, n_k: int, dtype: str, head_dim: int, batch: int, heads: int,
              forward_only: bool = False, force: bool = False, exhaustive: bool = False, out=None,
              device: str = "cuda") -> List[str]:
    """Tune the kernels of one generated module for one shape on the current GPU; returns result lines."""
    import torch

    from attncc.analysis import analyze
    from attncc.report import synthesize_inputs
    from attncc.runtime import bind, tuning

    spec = module.SPEC
    hq = spec.heads_q or heads
    hkv = spec.heads_kv or hq
    dv = spec.value_dim or head_dim
    kw = dict(device=device, dtype=getattr(torch, dtype))
    q = torch.randn(batch, hq, n_q, head_dim, **kw)
    k = torch.randn(batch, hkv, n_k, head_dim, **kw)
    v = torch.randn(batch, hkv, n_k, dv, **kw)
    inputs = {}
    if spec.inputs:
        inputs = {name: t.to(device) for name, t in
                  synthesize_inputs(analyze(pattern), batch=batch, heads=hq, positions=max(n_q, n_k)).items()}
    call = bind(spec, q, k, v, kwargs=inputs)
    runs = [("", module._forward)]
    if not forward_only:
        o, lse = module._forward(dataclasses.replace(call, return_lse=True))
        do = torch.randn_like(o)
        backward = lambda c: module._backward(c, o, lse, do)[:3]  # noqa: E731  (dq, dk, dv; not the grads of inputs)
        runs += [("dkdv", backward), ("dq", backward)]
    lines = []
    for kernel, run in runs:
        label = f"{spec.name} {tuning.KERNEL_NAMES[kernel]} {dtype} d{head_dim} N {n_q}x{n_k}"
        kw = {"exhaustive": True} if exhaustive else {}
        cfg = tuning.tune(call, kernel, run, progress=Progress(label, out), force=force, **kw)
        record = tuning.lookup(tuning.key_for(call, kernel)) or {}
        lines.append(f"{label}: {tuning.describe(cfg)}" + timing(record))
    return lines


def main_tune(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from attncc.runtime import tuning
    from attncc.runtime.call import interpreting

    try:
        tuning.cache_dir()
    except ValueError as e:  # ATTNCC_CACHE_DIR="~nosuchuser/x", or no home folder
        print(f"attncc tune: {e}", file=sys.stderr)
        return 2

    if args.show or args.clear:  # `--show --clear` cleared without showing, `SPEC --clear` without tuning
        extra = ["--show"] * (args.show and args.clear) + [repr(s) for s in args.specs]
        if extra:
            print(f"attncc tune: {'--clear' if args.clear else '--show'} takes no other work, got {' '.join(extra)} "
                  f"(run them one after the other)", file=sys.stderr)
            return 2
    if args.clear:
        removed, failed = tuning.clear()
        print(f"attncc tune --clear: removed {removed} cache file(s) from {tuning.cache_dir()}")
        for problem in failed:
            print(f"attncc tune --clear: could not remove {problem}", file=sys.stderr)
        return 1 if failed else 0
    if args.show:
        print(show())
        return 0
    if not args.specs:
        print("attncc tune: give spec files to tune (or --show, --clear)", file=sys.stderr)
        return 2
    if args.nk is not None and len(args.nk) != len(args.n):
        print(f"attncc tune: --nk needs one length per --n ({len(args.n)}), got {len(args.nk)}", file=sys.stderr)
        return 2
    if interpreting():
        print("attncc tune: TRITON_INTERPRET is set; the interpreter always uses its small config, "
              "there is nothing to tune (unset TRITON_INTERPRET on a machine with a CUDA GPU)", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("attncc tune: no CUDA GPU here (torch.cuda.is_available() is False); configs are timed on the GPU "
              "they are for. `attncc tune --show` and `--clear` work without one.", file=sys.stderr)
        return 2
    from attncc.spec import SpecError, load_spec

    if not args.verbose:
        logging.getLogger("attncc").setLevel(logging.ERROR)  # the progress bar says what tune() would log
    with tempfile.TemporaryDirectory(prefix="attncc-tune-") as folder:
        for text in args.specs:
            try:
                pattern = load_spec(spec_file(text))
            except (SpecError, OSError) as e:
                print(f"attncc tune: {e}", file=sys.stderr)
                return 2
            if pattern.kind != "softmax":
                print(f"attncc tune: {pattern.name}: kind {pattern.kind!r} has no tile configs to tune; skipped")
                continue
            module = _module(pattern, Path(folder))
            for dtype in args.dtype or list(module.SPEC.dtypes):
                for head_dim in args.head_dim or list(module.SPEC.head_dims):
                    for n_q, n_k in zip(args.n, args.nk or args.n):
                        try:
                            lines = tune_spec(module, pattern, n_q=n_q, n_k=n_k, dtype=dtype, head_dim=head_dim,
                                              batch=args.batch, heads=args.heads, forward_only=args.forward_only,
                                              force=args.force, exhaustive=args.exhaustive)
                        except OSError as e:  # the cache folder (ATTNCC_CACHE_DIR) cannot be written
                            print(f"attncc tune: cannot write the tune cache {e.filename or tuning.cache_dir()}: "
                                  f"{e.strerror or e} (set ATTNCC_CACHE_DIR to a writable folder)", file=sys.stderr)
                            return 2
                        for line in lines:
                            print(line, flush=True)
    print(f"cache: {tuning.cache_dir()}")
    return 0
