"""A short demo: build-time generated sliding-window attention, run and checked against the
float64 reference. On a machine without a GPU it runs under Triton's CPU interpreter."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
ROOT = Path(__file__).resolve().parent.parent  # the repository: specs/ and generated/, from any directory
sys.path.insert(0, str(ROOT))

import attncc  # noqa: E402
from attncc.spec import load_spec  # noqa: E402
from generated.sliding_window import attention  # noqa: E402

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
B, Hq, Hkv, N, D = (2, 16, 4, 4096, 128) if device == "cuda" else (1, 4, 2, 100, 64)
torch.manual_seed(0)
q = torch.randn(B, Hq, N, D, device=device, dtype=dtype)
k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype)
window = 1024 if device == "cuda" else 24

o, lse = attention(q, k, v, window=window, return_lse=True)
ref = attncc.reference(load_spec(ROOT / "specs" / "sliding_window.toml"), q.double(), k.double(), v.double(), window=window)
err = ((o.double() - ref).norm() / ref.norm()).item()
print(f"sliding_window (window={window}) on {device}, q {tuple(q.shape)} {dtype}, GQA {Hq}/{Hkv}: "
      f"||o - ref|| / ||ref|| = {err:.2e}")
assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4)
print("ok")
