"""Shared test setup: Triton's CPU interpreter, the `gpu` marker, and the path of the real data."""
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. This must happen before triton is imported:
# the @triton.jit decorator picks the interpreter when the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA with compiled kernels; `interpreter` tests run Triton on CPU tensors."""
    gpu_ok = torch.cuda.is_available() and not INTERPRET
    for item in items:
        if "gpu" in item.keywords and not gpu_ok:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and TRITON_INTERPRET unset"))
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1"))


@pytest.fixture
def shared_data():
    """`../shared/data` beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
