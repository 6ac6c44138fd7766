"""Saved-tensor hooks (CPU offload, compression) may give the backward its saved tensors back in
another layout than the forward's: the same values, other strides. The gradients must not change.
Before, the LSE was read as if dense (a transposed one gave dq off by 8 at values of 1) and q, k, v
in another layout reused the launches bound to the forward's strides (crash or wrong reads)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402

SPECS = {
    "causal": '[mask]\nwhere = "j <= i"\n',
    # a row term (folded into the LSE, taken out again by the backward) and a learned table
    "row_terms": ('head_dim = 16\n[inputs]\nt = { dims = ["h", 8], dtype = "float32", grad = true }\n'
                  '[mask]\nwhere = "j <= i + 3"\n[score]\nbias = "t[h, j % 8] + 0.25 * i"\n'),
}


def _relayouts(seed):
    """Functions that return a tensor with the same values (shape, dtype) in another layout."""
    g = torch.Generator().manual_seed(seed)

    def transposed_last(t):  # last stride != 1
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t

    def permuted(t):  # dims in a random order in memory
        order = torch.randperm(t.dim(), generator=g).tolist()
        inverse = [order.index(d) for d in range(t.dim())]
        return t.permute(order).contiguous().permute(inverse)

    def padded(t):  # a view into a bigger buffer, odd row stride
        if t.dim() == 0:
            return t
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        buf[..., :t.shape[-1]] = t
        return buf[..., :t.shape[-1]]

    return [transposed_last, permuted, padded]


def _grads(mod, tensors, kw, use_lse, hooks=None):
    q, k, v = [t.detach().clone().requires_grad_() for t in tensors]
    extra = {n: t.detach().clone().requires_grad_() if t.is_floating_point() else t for n, t in kw.items()}
    g = torch.Generator().manual_seed(5)
    with (torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else _nothing()):
        o, lse = mod.attention(q, k, v, return_lse=True, **extra)
    loss = (o * torch.randn(o.shape, generator=g)).sum()
    if use_lse:
        loss = loss + (lse * torch.randn(lse.shape, generator=g)).sum()
    wrt = [q, k, v] + [t for t in extra.values() if t.requires_grad]
    return torch.autograd.grad(loss, wrt)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_do_not_depend_on_the_saved_layout(name, seed):
    mod = attncc.compile(SPECS[name])
    torch.manual_seed(seed)
    B, H, N, D = 1, 2, 19 + seed, 16
    tensors = [torch.randn(B, H, N, D) for _ in range(3)]
    kw = {"t": torch.randn(H, 8)} if name == "row_terms" else {}
    for use_lse in (False, True):
        want = _grads(mod, tensors, kw, use_lse)
        for change in _relayouts(seed):
            for which in ("all", "lse"):  # every saved tensor, or only the LSE ([B, H, N], float32)
                def unpack(t, change=change, which=which):
                    if which == "lse" and not (t.dim() == 3 and t.dtype == torch.float32 and t.shape[-1] == N):
                        return t
                    return change(t)

                got = _grads(mod, tensors, kw, use_lse, hooks=(lambda t: t, unpack))
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{name} {change.__name__} {which} lse={use_lse}: {m}")
