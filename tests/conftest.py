"""Kernels run on the CPU under Triton's interpreter; set it before Triton is imported."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import generated.<name>` as a user would from the repo root
