"""Numbers of linear attention's feature maps, shared by the kernels and the reference.

Torch only (no sympy, no Triton): generated modules import this at run time, as
``attncc.runtime.feature_maps``.
"""
from __future__ import annotations

import functools

import torch

# Linear attention divides by phi(q_i) . z_i; adding this keeps an all-zero denominator
# (relu features of a row that meets no positive key, say) from giving NaN.
LINEAR_DENOMINATOR_EPS = 1e-6


@functools.lru_cache(maxsize=64)
def _performer_projection_cpu(features: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    blocks = []
    remaining = features
    while remaining > 0:
        # One block of `dim` orthonormal directions: QR of a gaussian matrix, with the
        # signs fixed by diag(R) so that the result does not depend on the LAPACK build.
        gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        sign = torch.sign(torch.diagonal(r))
        q = q * torch.where(sign == 0, torch.ones_like(sign), sign)
        blocks.append(q.T[: min(remaining, dim)])
        remaining -= dim
    directions = torch.cat(blocks)
    # Orthogonal rows keep the gaussian's directions but not its lengths: scale each row by
    # the norm of a fresh gaussian vector (chi-distributed with `dim` degrees of freedom),
    # so that every row is marginally N(0, I) as FAVOR+ (Choromanski et al., 2021) requires.
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return norms[:, None] * directions


def performer_projection(features: int, dim: int, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """The FAVOR+ random projection ``W`` of shape ``[features, dim]``.

    Deterministic in ``(features, dim, seed)`` on every device: drawn in float64 from a
    CPU ``torch.Generator`` seeded with ``seed``, in blocks of ``dim`` QR-orthogonalized
    gaussian rows (the last block truncated), each row scaled by a chi-distributed norm.
    The feature map is ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(features)`` with
    ``x' = x / dim ** 0.25``. ``seed`` must be in ``[0, 2**63)``. Returns a new tensor (callers may modify it).
    """
    if features < 1 or dim < 1:
        raise ValueError(f"performer_projection needs features >= 1 and dim >= 1, got features={features}, dim={dim}")
    if not 0 <= seed < 2**63:  # torch.Generator keeps 63 bits (2**63 + s draws as s; a negative seed wraps)
        raise ValueError(f"performer_projection needs 0 <= seed < 2**63, got seed={seed}")
    w = _performer_projection_cpu(int(features), int(dim), int(seed))
    return w.to(dtype=dtype, device=device, copy=True)
