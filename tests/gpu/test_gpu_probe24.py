"""Session 23's kernel changes on the GPU (they ran only in the interpreter before).

- ``int ** int-param`` in mask code: ``_ipow64`` (templates/helpers.j2) rounds a whole power to its
  integer in the float64 mask code (it was ``exp2(w * log2(c))``, 9.000000000000002 for ``3 ** 2``).
- a closed form's bound with such a power (``i <= 4 ** w``): an int64 loop bound (was a float32 one
  that did not run).
- ``//`` by a ``where`` (``j // where(h == 0, 49, 7)``): integer division by either branch (was
  ``floor(j * Piecewise(1/d ...))`` in float).

Each spec is built in this process and called at odd lengths, at the spec's params and at params
passed per call, forward and backward in bf16 and fp16, against the float64 reference; through
auto (the ``tl`` kernels at these sizes) and through the Gluon forward where its fragments take
the spec (``ATTNCC_BACKEND=gluon``; a refusal naming why is a skip).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe24.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gpu_env import DEV, GRAD_TOL, LOW, MARKS, ON_GPU, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attncc  # noqa: E402
from fuzz_specs import build_spec  # noqa: E402

pytestmark = MARKS

SPECS = {
    "power_classes": ('[params]\nc = 3\nw = 2\n[mask]\nwhere = "i % c ** w == j % c ** w or (i - j) // c ** w == 1"\n',
                      [{}, {"c": 5, "w": 2}, {"c": 3, "w": 3}, {"c": 7, "w": 1}]),
    "power_row_bound": ('[params]\nw = 5\n[mask]\nwhere = "j <= i and i - j <= 3 ** w"\n',
                        [{}, {"w": 4}, {"w": 6}, {"w": 0}]),
    "power_column_bound": ('[params]\nw = 9\n[mask]\nwhere = "j <= 2 ** w or (j <= i and i <= 4 ** (w - 4))"\n',
                           [{}, {"w": 8}, {"w": 10}]),
    "divide_by_where": ('[mask]\nwhere = "j // where(h == 0, 49, 7) == i // where(h == 0, 49, 7) and j <= i"\n',
                        [{}]),
}


def _text(body: str, dtype) -> str:
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    return f'head_dim = {size(128, 16)}\ndtypes = ["{name}"]\n' + body


@pytest.mark.parametrize("backend", ["auto", "gluon"])
@pytest.mark.parametrize("dtype", [LOW, torch.float16] if ON_GPU else [LOW], ids=str)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_session23_kernels_against_the_reference(monkeypatch, name, dtype, backend):
    monkeypatch.setenv("ATTNCC_BACKEND", backend)
    body, calls = SPECS[name]
    built = build_spec(_text(body, dtype))
    if isinstance(built, Exception):
        raise built
    pattern, module = built
    B, H, N, D = 2, 4, size(1999, 70), size(128, 16)
    gen = torch.Generator(device=DEV).manual_seed(24)
    q, k, v, do = (torch.randn(B, H, N, D, device=DEV, generator=gen).to(dtype) for _ in range(4))
    for params in calls:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        try:
            o = module.attention(*leaves, **params)
        except ValueError as e:
            if backend == "gluon" and "Gluon" in str(e):
                pytest.skip(f"the Gluon forward refuses {name}: {e}")
            raise
        o.backward(do)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(pattern, *ref_leaves, **params)
        ref.backward(do.double())
        assert rel(o, ref) < TOL, (name, params, "o")
        for what, got, want in zip("qkv", leaves, ref_leaves):
            assert rel(got.grad, want.grad) < GRAD_TOL, (name, params, f"d{what}")
        del leaves, ref_leaves, o, ref
        release()
