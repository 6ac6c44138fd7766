"""What a script of tests/ (a probe or generator: ``python tests/NAME.py``) needs before its other
imports: kernels on Triton's CPU interpreter unless the caller says otherwise (``TRITON_INTERPRET``,
read when Triton is imported) and this checkout first on the path (``import attncc`` and ``import
generated.<name>`` from it, not an installed copy). Python puts the script's folder on the path
first, so ``import script_env`` finds this module; under pytest, conftest.py does the same."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parent.parent
for _p in (str(Path(__file__).resolve().parent), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
