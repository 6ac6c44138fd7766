"""What a new user meets first: the demo from any folder, interpreter runs without warnings."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

import attncc

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_from_another_folder_without_runtime_warnings(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
    assert "RuntimeWarning" not in done.stderr, done.stderr


def test_rows_without_keys_evaluate_no_log2_of_zero(monkeypatch, tmp_path):
    """A padded query row sees no key (l = 0): its lse is -inf without computing log2(0), which
    numpy (Triton's CPU interpreter) reports as a RuntimeWarning."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    module = attncc.compile('name = "no_key_rows"\nhead_dim = 16\ndtypes = ["float32"]\n'
                            '[inputs]\nkey_ok = { dims = ["b", "n"], dtype = "bool" }\n'
                            '[mask]\nwhere = "j <= i and key_ok[b, j]"\n')
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    key_ok = torch.ones(1, 20, dtype=torch.bool)
    key_ok[0, :5] = False  # query rows 0..4 see no key
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        o, lse = module.attention(q, k, v, key_ok=key_ok, return_lse=True)
        o.sum().backward()
        module.decode(q[:, :, -1:].detach(), k.detach(), v.detach(), kv_len=[20], key_ok=key_ok)
    assert torch.isneginf(lse[0, :, :5]).all() and torch.isfinite(lse[0, :, 5:]).all()
    assert (o[0, :, :5] == 0).all()
