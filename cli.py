"""Command-line checks shared by train.py, propagate.py and evaluate.py.

A value a user types is checked once, where it enters: every number against its range, every path for its kind (file
or folder) and, for outputs, whether it can be written. The checkers are argparse `type=` functions, so a refusal
names its flag ("error: argument --batch-size: must be an integer >= 1, got 0") before any work starts, and `Parser`
prints it as one line.
"""
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional


def one_line(text: str) -> str:
    """Messages may quote user input or file names: keep a refusal on one line whatever they hold."""
    return " ".join(str(text).split())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, without the usage block, exit status 2.
    Subparsers are of the same class (add_subparsers uses type(self))."""

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)}\n")

    def _get_values(self, action, arg_strings):
        # argparse (Python 3.11) drops a "--" given as a flag's value (--radius=--) and then skips the flag's type
        # check, so the run got radius [] and failed deep inside: refuse it as the missing value it is
        if action.option_strings and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        return super()._get_values(action, arg_strings)


def fail(error: Exception):
    """End a CLI on an expected error (bad input, unreadable file): one line on stderr, exit status 1."""
    print(f"error: {one_line(error)}", file=sys.stderr)  # printed here, not by sys.exit: also when called in-process
    sys.exit(1)


def _shown(text: str) -> str:
    # a number is shown as typed; anything else quoted, so that '' or ' ' is visible
    try:
        float(text)
        return text.strip() if text.strip() == text else repr(text)
    except ValueError:
        return repr(text)


def _range(low, high, above=None, ints=False) -> str:
    if above is not None:
        return f"> {above}"
    if low is not None and high is not None:
        return f"in {low}..{high}" if ints else f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else ""


def integer(low: Optional[int] = None, high: Optional[int] = None, multiple_of: Optional[int] = None) -> Callable:
    """argparse type: an integer in low..high (inclusive, either bound optional), a multiple of `multiple_of`."""
    bounds = _range(low, high, ints=True)
    want = f"a multiple of {multiple_of} and {bounds}" if multiple_of else f"an integer {bounds}".strip()

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high) or (
                multiple_of and value % multiple_of):
            raise argparse.ArgumentTypeError(f"must be {want}, got {_shown(text)}")
        return value

    check.want = want  # for --help
    return check


def real(low: Optional[float] = None, high: Optional[float] = None, above: Optional[float] = None) -> Callable:
    """argparse type: a finite number in [low, high] (either bound optional), or > `above`. nan, inf and 1e999
    (which Python reads as inf) are refused: no setting of these programs means anything at infinity."""
    want = f"a finite number {_range(low, high, above)}".strip()

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high) or (
                above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be {want}, got {_shown(text)}")
        return value

    check.want = want
    return check


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a path, got {text!r}")  # Path('') would be the current folder
    return Path(text)


def existing_file(text: str) -> Path:
    """argparse type: a file that exists."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    return path


existing_file.want = "a file"


def existing_folder(text: str) -> Path:
    """argparse type: a folder that exists."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {path}")
    return path


existing_folder.want = "a folder"


def existing_path(text: str) -> Path:
    """argparse type: a file or a folder that exists (a video, or a folder of its frames)."""
    path = _path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"not found: {path}")
    return path


def _check_writable(path: Path, kind: str) -> Path:
    if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
        raise argparse.ArgumentTypeError(f"{path} is a {'folder' if kind == 'file' else 'file'}, not a {kind}")
    parent = path if path.exists() and kind == "folder" else path.parent
    while not parent.exists():  # the nearest existing folder above it: that is where it gets created
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable")
    return path


def output_folder(text: str) -> Path:
    """argparse type: a folder to write into: existing, or creatable (not a file, nearest existing parent writable)."""
    return _check_writable(_path(text), "folder")


output_folder.want = "a folder, created if needed"


def output_file(text: str) -> Path:
    """argparse type: a file to write: not a folder, its nearest existing parent writable."""
    return _check_writable(_path(text), "file")


def optional(check: Callable) -> Callable:
    """argparse type: the empty string (the setting left off, e.g. TrainConfig's centroids="") or what `check` takes."""

    def check_or_empty(text: str):
        return "" if text == "" else check(text)

    check_or_empty.want = getattr(check, "want", "")
    return check_or_empty


def choice(*options: str) -> Callable:
    """argparse type: one of `options`."""
    want = "one of " + ", ".join(options)

    def check(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be {want}, got {_shown(text)}")
        return text

    check.want = want
    return check


def device(text: str) -> str:
    """argparse type: auto | cpu | cuda, cuda only where torch sees a GPU (else it fails deep inside the run)."""
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be auto, cpu or cuda, got {text!r}")
    if text == "cuda":
        import torch  # only here: evaluate.py scores without importing torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("cuda: no CUDA device is available; use cpu")
    return text
