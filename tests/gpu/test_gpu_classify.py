"""Block lists of data-dependent masks from the generated one-kernel classifier (``_tile_lists``)
compiled for the GPU, against the torch path (``_rt.blocks.classified_lists``), forward and
transposed (formerly ``bench/classify_bench.py --check``): both shipped data-dependent specs, odd
sizes, offsets, documents of mean length 1 to 100, several tile shapes. tests/test_tile_kernel.py
checks the same kernel under the interpreter; ``python -m bench classify`` times it.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_classify.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, MARKS, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc.runtime as _rt  # noqa: E402
from bench.classify import make_call, same_both  # noqa: E402  (the comparison the benchmark prints)
from cases import module  # noqa: E402

pytestmark = MARKS
SHAPES = size(((77, 77, 0, 0), (45, 93, 13, 0), (61, 50, 30, 7), (1000, 1300, 300, 0), (4096, 4096, 0, 0),
               (1, 5, 0, 0)), ((61, 50, 30, 7), (1, 5, 0, 0)))
BLOCKS = size(((16, 16), (32, 16), (16, 64), (64, 64), (128, 128), (128, 64), (64, 128)), ((16, 32),))


@pytest.mark.parametrize("mean_len", size((1, 7, 100), (7,)))
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("name", ["document", "padding"])
def test_kernel_lists_equal_the_torch_path(name, shape, mean_len):
    mod = module(name)
    Nq, Nk, q_offset, k_offset = shape
    gen = torch.Generator().manual_seed(1)
    call = make_call(mod, B=3, H=2, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset, gen=gen, mean_len=mean_len,
                     device=DEV)
    for bm, bn in BLOCKS:
        want = _rt.blocks.classified_lists(mod._TK_PROGRAM, call, bm, bn, dynamic=True, transposed=True)
        assert same_both(mod._tile_lists(call, bm, bn, True), want, call.B, call.Hq), f"{bm}x{bn}"
