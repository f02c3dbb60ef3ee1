"""Shared test setup: Triton's CPU interpreter, the `gpu` marker, the path of the real data, a full disk, a cache
folder of the session's own."""
import errno
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


@pytest.fixture(autouse=True, scope="session")
def _probe_cache(tmp_path_factory):
    """The bf16 probe's answers (model.probe_bf16) are kept in a folder of this session, not the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))

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


class _FullFile:
    """A file being written that takes `room` more bytes, writes what fits and then fails as on a full disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(data[:self.room])  # the part that fitted stays on disk, as it would
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(room, when): from then on every file that files.py opens for writing, whose path `when` accepts,
    fails with ENOSPC (no space left on device) after `room` bytes."""
    import files

    real_open = open

    def start(room: int = 1000, when=lambda path: True):
        def open_on_full_disk(path, mode="r", **kwargs):
            f = real_open(path, mode, **kwargs)
            return _FullFile(f, room) if ("w" in mode or "a" in mode) and when(Path(path)) else f

        monkeypatch.setattr(files, "open", open_on_full_disk, raising=False)

    return start
