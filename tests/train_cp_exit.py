"""examples/train_cp.py's main under torchrun, then a check that the process group is gone: after
``destroy_process_group`` no gloo thread may be left (one that is still running when the interpreter
exits aborts the process now and then: "terminate called without an active exception", SIGABRT).
Exit status: main's, or 3 when gloo threads remain (Linux: the threads' names in /proc)."""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_cp  # noqa: E402


def gloo_threads() -> list:
    task = Path("/proc/self/task")
    if not task.is_dir():
        return []
    names = (Path(task, t, "comm").read_text().strip() for t in os.listdir(task))
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    code = train_cp.main(sys.argv[1:])
    gc.collect()
    left = gloo_threads()
    if left:
        print(f"process group not released: gloo threads {left} still run after destroy_process_group",
              flush=True)
        code = code or 3
    sys.exit(code)
