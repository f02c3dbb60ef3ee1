"""The fused kernels compiled for sm_80 and sm_90 on a machine without a GPU (`python .ci/compile_check.py`): every
launch the project's call sites make (recorded on meta tensors) compiles, spills no register and fits each target's
shared memory."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="this triton build has no NVIDIA backend")
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    # the check compiles for GPU targets: it must run without the CPU interpreter, which replaces the kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "compile_check.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2400)
    print(proc.stdout)  # the table, shown with -s or on failure
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
