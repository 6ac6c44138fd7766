"""Document masking, RoPE and packed variable-length batches against FlexAttention and SDPA
(issue #5 item 5). Three parts, each a markdown table:

  doc     document mask (causal within documents, exponential lengths of mean 1024), B=2, N=16384:
          attncc vs FlexAttention with its block mask built once (excluded) and built in every
          call (included), forward and forward + backward.
  rope    RoPE causal (specs/rope_causal.toml), B=4, N=8192: attncc (rotary inside the kernel) vs
          SDPA flash / cuDNN and FlexAttention with the rotary applied to q and k in plain torch in
          every call (timed with it), forward and forward + backward.
  varlen  cu_seqlens: packed sequences (bf16) against the float64 reference and against the
          document-mask form on a small size (output and gradients), then the timing of varlen
          causal against the document mask on the documents of part doc (and torch's varlen_attn
          where this torch has it).

    PYTHONPATH=. python bench/rope_doc.py [--parts doc rope varlen] [--fwd-only] [--out DIR]
    PYTHONPATH=. python bench/rope_doc.py --smoke      # CPU, interpreter, tiny sizes
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEV, DTYPE, SMOKE, add_tflops, apply_rotary, attention_flops, attempt, banner, bench,  # noqa: E402
                    causal_density, compare, doc_causal_density, documents, flex_grad_output, flex_setup, generated, markdown,
                    measure, qkv, rel, release, rotary_tables, sdpa_backends, sdpa_call, short_error,
                    write_out)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TIMING_COLUMNS = [
    ("implementation", "impl", "s"),
    ("fwd ms", "ms", ".3f"),
    ("fwd TFLOP/s", "tflops", ".1f"),
    ("f+b ms", "fb_ms", ".3f"),
    ("f+b TFLOP/s", "fb_tflops", ".1f"),
    ("f+b time / attncc's", "speedup_fb", ".2f"),
    ("max abs diff o vs attncc", "diff_o", ".1e"),
    ("max abs diff grad vs attncc", "diff_grad", ".1e"),
    ("note", "note", "s"),
]


def impl_row(impl, fn, q, k, v, do, flops, base=None):
    """One implementation's timing row (ms and TFLOP/s under plain names), compared with ``base``:
    (row, o, grads) of attncc."""
    row = dict(impl=impl)
    if impl.startswith("flex"):
        do = flex_grad_output(row, do)
    o, grads = measure(row, "x", fn, q, k, v, do)
    add_tflops(row, flops)
    out = {key[2:]: val for key, val in row.items() if key.startswith("x_")}
    out.update(impl=impl, **({"note": row["note"].replace("x_", "")} if "note" in row else {}))
    if base is not None:
        base_row, base_o, base_grads = base
        compare(out, "diff_o", o, base_o)
        compare(out, "diff_grad", grads, base_grads)
        if out.get("fb_ms") and base_row.get("fb_ms"):
            out["speedup_fb"] = out["fb_ms"] / base_row["fb_ms"]
    print(json.dumps(out), flush=True)
    return out, o, grads


def part_doc(B, H, N, D, fwd_only, mean):
    """Document mask: attncc vs Flex with the block mask excluded and included."""
    doc = documents(B, N, mean=mean)
    dens = doc_causal_density(doc)
    flops = attention_flops(B, H, N, N, D, dens)
    q, k, v = qkv(B, H, N, D)
    do = None if fwd_only else torch.randn_like(q)
    mod = generated("document")
    rows = []
    base = impl_row("attncc document", lambda q, k, v: mod.attention(q, k, v, doc=doc), q, k, v, do, flops)
    rows.append(base[0])

    flex, create_block_mask = flex_setup()

    def doc_mask(b, h, i, j):
        return (doc[b, i] == doc[b, j]) & (i >= j)

    def make_mask(**extra):
        return create_block_mask(doc_mask, B, None, N, N, device=DEV, **extra)

    mask_row = dict(impl="create_block_mask alone")
    block_mask = attempt(mask_row, "bm", make_mask)
    attempt(mask_row, "ms", lambda: bench(make_mask))
    if block_mask is not None:
        rows.append(impl_row("flex, block mask built once (excluded)",
                             lambda q, k, v: flex(q, k, v, block_mask=block_mask), q, k, v, do, flops, base)[0])
    rows.append(impl_row("flex + create_block_mask per call (included)",
                         lambda q, k, v: flex(q, k, v, block_mask=make_mask()), q, k, v, do, flops, base)[0])
    mask_row.pop("bm", None)
    rows.append(mask_row)
    if "_compile" in inspect.signature(create_block_mask).parameters and not SMOKE:
        compiled_row = dict(impl="create_block_mask(_compile=True) alone")
        attempt(compiled_row, "ms", lambda: bench(lambda: make_mask(_compile=True)))
        rows.append(compiled_row)
        rows.append(impl_row("flex + create_block_mask(_compile=True) per call",
                             lambda q, k, v: flex(q, k, v, block_mask=make_mask(_compile=True)),
                             q, k, v, do, flops, base)[0])
    title = (f"document mask (causal within documents, mean length {mean}): B={B} H={H} N={N} D={D} "
             f"{str(DTYPE)[6:]}, density {dens:.4f}")
    return title, rows


def part_rope(B, H, N, D, fwd_only):
    """RoPE causal: attncc's in-kernel rotary vs a separate torch rotary pass before SDPA / Flex."""
    flops = attention_flops(B, H, N, N, D, causal_density(N))
    q, k, v = qkv(B, H, N, D)
    do = None if fwd_only else torch.randn_like(q)
    cos, sin = rotary_tables(N, D)
    mod = generated("rope_causal")
    rows = []
    base = impl_row("attncc rope_causal", lambda q, k, v: mod.attention(q, k, v), q, k, v, do, flops)
    rows.append(base[0])

    def sdpa_rotary(backend):
        return lambda q, k, v: sdpa_call(backend, lambda: F.scaled_dot_product_attention(
            apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=True))

    for label, backend in sdpa_backends() or [("sdpa (math, CPU)", None)]:
        rows.append(impl_row(f"{label} + torch rotary", sdpa_rotary(backend), q, k, v, do, flops, base)[0])
    flex, create_block_mask = flex_setup()
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, N, N, device=DEV)
    rows.append(impl_row("flex + torch rotary",
                         lambda q, k, v: flex(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v,
                                              block_mask=block_mask), q, k, v, do, flops, base)[0])
    # for scale: the rotary pass alone, and the fastest causal attention without it
    rot_row = dict(impl="torch rotary of q and k alone")
    attempt(rot_row, "ms", lambda: bench(lambda: (apply_rotary(q, cos, sin),
                                                                        apply_rotary(k, cos, sin))))
    rows.append(rot_row)
    for label, backend in sdpa_backends()[:1]:
        rows.append(impl_row(f"{label}, causal without rotary",
                             lambda q, k, v: sdpa_call(backend, lambda: F.scaled_dot_product_attention(
                                 q, k, v, is_causal=True)), q, k, v, do, flops)[0])
    title = f"RoPE causal (neox, theta 10000): B={B} H={H} N={N} D={D} {str(DTYPE)[6:]}"
    return title, rows


def _cu(lens, device=None):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device or DEV)


def varlen_correctness(H, D):
    """Packed causal (cu_seqlens) and the document mask on the same packed rows, each against the
    float64 reference of the document mask, outputs and gradients."""
    import attncc
    from attncc.spec import load_spec

    lens = [40, 1, 0, 70, 17] if SMOKE else [300, 1, 0, 77, 640, 129, 1000, 5]
    T = sum(lens)
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, H, T, D, device=DEV, dtype=DTYPE) for _ in range(3))
    g = torch.randn(1, H, T, D, device=DEV, dtype=DTYPE)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(torch.int32)[None].to(DEV)
    cu = _cu(lens)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(load_spec(Path(__file__).resolve().parent.parent / "specs" / "document.toml"),
                           *ref_in, doc=doc)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    forms = {"varlen causal (cu_seqlens)": lambda q, k, v: generated("causal").attention(
                 q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens)),
             "document mask": lambda q, k, v: generated("document").attention(q, k, v, doc=doc)}
    rows, outs = [], {}
    tol = 1e-4 if SMOKE else 2e-2
    for label, fn in forms.items():
        row = dict(form=label, lens=" ".join(map(str, lens)), H=H, D=D)
        try:
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            o = fn(qg, kg, vg)
            grads = torch.autograd.grad(o, (qg, kg, vg), g)
            outs[label] = (o.detach(), grads)
            row["rel_o"] = rel(o, ref)
            for name, x, r in zip(("dq", "dk", "dv"), grads, ref_grads):
                row["rel_" + name] = rel(x, r)
            finite = all(torch.isfinite(t).all() for t in (o, *grads))
            row["ok"] = "ok" if finite and max(row[c] for c in ("rel_o", "rel_dq", "rel_dk", "rel_dv")) < tol \
                else "FAIL"
        except Exception as e:
            row.update(ok="FAIL", note=short_error(e))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(outs) == 2:
        (o1, g1), (o2, g2) = outs.values()
        row = dict(form="varlen vs document mask (max abs diff)")
        compare(row, "rel_o", o1, o2)
        for name, x, y in zip(("dq", "dk", "dv"), g1, g2):
            compare(row, "rel_" + name, x, y)
        rows.append(row)
    return rows


VARLEN_CHECK_COLUMNS = [
    ("form", "form", "s"), ("rel err o", "rel_o", ".1e"), ("rel err dq", "rel_dq", ".1e"),
    ("rel err dk", "rel_dk", ".1e"), ("rel err dv", "rel_dv", ".1e"), ("", "ok", "s"), ("note", "note", "s"),
]


def torch_varlen(cu, max_len):
    """torch.nn.attention.varlen.varlen_attn as fn(q, k, v) on [T, H, D] tensors, causal; None when absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal)


def part_varlen(B, H, N, D, fwd_only, mean, small_H, small_D):
    check = varlen_correctness(small_H, small_D)
    doc = documents(B, N, mean=mean)
    dens = doc_causal_density(doc)
    flops = attention_flops(B, H, N, N, D, dens)
    # the same documents packed: row b's documents after row (b - 1)'s, none across a row boundary
    lens = []
    for row in doc.cpu():
        lens += torch.unique_consecutive(row, return_counts=True)[1].tolist()
    cu, max_len = _cu(lens), max(lens)
    q, k, v = qkv(B, H, N, D)
    do = None if fwd_only else torch.randn_like(q)
    flat = lambda t: t.transpose(0, 1).reshape(1, H, B * N, D).contiguous()  # noqa: E731  [B,H,N,D] -> [1,H,BN,D]
    qp, kp, vp = (flat(t) for t in (q, k, v))
    dop = None if do is None else flat(do)
    rows = []
    base = impl_row("attncc document mask [B, N]", lambda q, k, v: generated("document").attention(q, k, v, doc=doc),
                    q, k, v, do, flops)
    rows.append(base[0])
    causal = generated("causal")
    # compared after packing attncc's document-mask outputs the same way
    base_packed = (base[0], None if base[1] is None else flat(base[1]),
                   None if base[2] is None else tuple(flat(x) for x in base[2]))
    rows.append(impl_row("attncc varlen causal [1, B*N]",
                         lambda q, k, v: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                          max_seqlen_q=max_len, max_seqlen_k=max_len),
                         qp, kp, vp, dop, flops, base_packed)[0])
    fn = None if SMOKE else torch_varlen(cu, max_len)
    if fn is not None:
        thd = lambda t: t[0].transpose(0, 1).contiguous()  # noqa: E731  [1,H,T,D] -> [T,H,D]
        base_thd = (base[0], None if base[1] is None else thd(base_packed[1]),
                    None if base[2] is None else tuple(thd(x) for x in base_packed[2]))
        rows.append(impl_row("torch varlen_attn (flash) [T, H, D]", fn, thd(qp), thd(kp), thd(vp),
                             None if dop is None else thd(dop), flops, base_thd)[0])
    title = (f"varlen causal vs document mask: B={B} H={H} N={N} D={D} {str(DTYPE)[6:]}, {len(lens)} documents, "
             f"density {dens:.4f}")
    return check, title, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, B=1 H=2 N=128 D=32")
    ap.add_argument("--parts", nargs="+", choices=["doc", "rope", "varlen"], default=["doc", "rope", "varlen"])
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="write rope_doc.md here")
    args = ap.parse_args()
    print(banner("rope_doc"), flush=True)
    small = (1, 2, 128, 32) if SMOKE else None
    mean = 32 if SMOKE else 1024  # document lengths
    sections = []

    def emit(text):
        sections.append(text)
        write_out(args.out, "rope_doc.md", "\n\n".join(sections) + "\n")

    for part in args.parts:
        try:
            if part == "doc":
                title, rows = part_doc(*(small or (2, 16, 16384, 128)), args.fwd_only, mean)
                emit(f"{title}\n\n{markdown(rows, TIMING_COLUMNS)}")
            elif part == "rope":
                title, rows = part_rope(*(small or (4, 16, 8192, 128)), args.fwd_only)
                emit(f"{title}\n\n{markdown(rows, TIMING_COLUMNS)}")
            else:
                sizes = (2, 2, 128, 32) if SMOKE else (2, 16, 16384, 128)  # B = 2: packing across rows
                check, title, rows = part_varlen(*sizes, args.fwd_only, mean,
                                                 small_H=2 if SMOKE else 4, small_D=32 if SMOKE else 128)
                emit(f"varlen correctness (packed vs float64 reference of the document mask, {str(DTYPE)[6:]})"
                     f"\n\n{markdown(check, VARLEN_CHECK_COLUMNS)}")
                emit(f"{title}\n\n{markdown(rows, TIMING_COLUMNS)}")
        except Exception as e:  # one part failing leaves the others to run
            emit(f"{part}: FAILED {short_error(e, 300)}")
        release()
    print("\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
