"""The built-in tile configs' hint per pattern family (attncc/codegen/softmax.py ``_tile_hint``)
and what each hint picks (attncc/runtime/configs.py), measured on the GPU (docs/performance.md)."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from attncc.runtime.configs import KernelConfig, _measured_config

ROOT = Path(__file__).resolve().parent.parent

HINTS = {
    # a window's edges move with the rows, global rows and columns beside it or not
    "sliding_window": "narrow", "local_bidirectional": "narrow", "chunked_local": "narrow",
    "block_diagonal": "narrow", "sink_window": "narrow", "longformer": "narrow",
    # data-dependent tiles
    "document": "narrow", "padding": "narrow",
    # static exact block lists, sparse partial tiles
    "neighborhood_2d": "thin",
    # residue classes: window-dense tiles (measured at the default ones)
    "dilated": "default", "strided": "default",
    # long dense walks; random blocks (block-aligned, mostly full tiles)
    "causal": "default", "prefix_lm": "default", "dense": "default", "bigbird": "default", "alibi": "default",
}


@pytest.mark.parametrize("name", sorted(HINTS))
def test_shipped_specs_carry_their_hint(name):
    text = (ROOT / "generated" / f"{name}.py").read_text()
    assert re.findall(r'tile_hint="(\w+)"', text) == [HINTS[name]]


def _call(hint, n, d=128):
    return SimpleNamespace(D=d, Dv=d, Nk=n, Nq=n, spec=SimpleNamespace(tile_hint=hint))


@pytest.mark.parametrize("hint,kernel,want", [
    ("thin", "", KernelConfig(64, 32, 4, 3)), ("thin", "dkdv", KernelConfig(32, 64, 4, 2)),
    ("thin", "dq", KernelConfig(64, 32, 4, 3)),
    ("narrow", "", KernelConfig(64, 64, 4, 3)), ("default", "", KernelConfig(128, 128, 8, 3)),
    ("narrow", "dkdv", KernelConfig(64, 64, 4, 2)), ("narrow", "dq", KernelConfig(128, 64, 8, 3)),
])
def test_hints_pick_their_configs(hint, kernel, want):
    assert _measured_config(_call(hint, 16384), kernel) == want


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
def test_short_keys_and_wide_heads_ignore_the_thin_hint(kernel):
    for n, d in ((1024, 128), (16384, 256)):
        assert _measured_config(_call("thin", n, d), kernel) == _measured_config(_call("default", n, d), kernel)
