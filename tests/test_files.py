"""Every writer of the project on a full disk or a read-only file system: one OSError naming the file and the cause,
no temporary file left, the last good file unchanged. And the output folder's lock."""
import dataclasses
import errno
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import evaluate
import files
import media
import model
import train

SMALL = model.ModelConfig(feat_dim=8, widths=(8, 8, 8, 8))  # a small encoder: its checkpoints are kilobytes


def training_checkpoint(step: int) -> dict:
    net = model.CorrFlow(SMALL)
    cfg = train.TrainConfig(model=SMALL)
    return checkpoints.checkpoint(net, torch.optim.Adam(net.parameters()), step, cfg, torch.zeros(16, 2))


def write_checkpoint(path, version):
    model.save_atomic(training_checkpoint(version), path)


def export(path, version):
    src = path.with_name(f"src{version}.pt")
    torch.save(training_checkpoint(version), src)  # beside it: the folder's listing is checked without src*.pt
    model.export_weights(src, path)


def png(path, version):
    media.save_png(np.full((8, 8), version, np.uint8), media.davis_palette(), path)


def csv_file(path, version):
    evaluate.write_csv_atomic(path, [["sequence", "J"], ["toy", str(version)]] * 50)


def log_append(path, version):
    checkpoints.append_log(path, {"step": version, "loss": 1.0})


def log_trim(path, version):  # a resume from step 1 rewrites the log without the rows after it
    if version == 1:
        for step in (1, 2, 3):
            checkpoints.append_log(path, {"step": step, "loss": 1.0})
    checkpoints.trim_log(path, 3 if version == 1 else 1)


WRITERS = {"ckpt.pt": write_checkpoint, "corrflow.pt": export, "00000.png": png, "scores.csv": csv_file,
           "log.csv": log_append, "trimmed.csv": log_trim}


@pytest.mark.parametrize("name", WRITERS)
@pytest.mark.parametrize("failure", ["full disk", "read-only"])
def test_a_failed_write_is_one_line_and_keeps_the_last_good_file(name, failure, tmp_path, full_disk, monkeypatch):
    path = tmp_path / name
    WRITERS[name](path, 1)
    before = path.read_bytes()
    if failure == "full disk":
        full_disk(room=4096 if name.endswith(".pt") else 5)  # part of the file written, then the disk is full
        cause = "No space left on device"
    else:
        def read_only(p, mode="r", **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

        monkeypatch.setattr(files, "open", read_only, raising=False)
        cause = "Read-only file system"
    with pytest.raises(OSError) as info:
        WRITERS[name](path, 2)
    assert str(info.value) == f"cannot write {path}: {cause}"
    assert info.value.errno == (errno.ENOSPC if failure == "full disk" else errno.EROFS)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("src")) == [name]  # no temporary


def test_the_video_index_stays_tolerant_of_a_full_disk(shared_data, tmp_path, full_disk, monkeypatch):
    from data import ClipDataset

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "clip.mp4").symlink_to(sorted((shared_data / "train_videos_256").glob("*.mp4"))[0])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    full_disk(room=10)
    with pytest.warns(UserWarning, match="could not write the video index"):
        clips = ClipDataset(tmp_path / "videos", num_frames=3, frame_gap=4, size=32)
    assert len(clips) > 0
    assert [p.name for p in (tmp_path / "videos").iterdir()] == ["clip.mp4"]  # no index, no temporary file


# ---------------------------------------------------------------------------------------------- the folder's lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_owner_and_is_released(tmp_path):
    with files.FolderLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()} on {socket.gethostname()}"):
            files.FolderLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(RuntimeError):  # released however the block ends
        with files.FolderLock(tmp_path):
            raise RuntimeError
    assert not (tmp_path / ".lock").exists()


def test_lock_of_a_gone_run_is_taken_over_and_others_are_not(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
    with files.FolderLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert capsys.readouterr().out == f"taking over the lock of {tmp_path} from pid {pid}, which is no longer running\n"
    # another host's run cannot be checked from here; a lock that names no run is never guessed about
    cases = [(f"{pid} elsewhere\n", f"pid {pid} on elsewhere"), ("", "names no run"), ("0 x", "names no run")]
    for text, match in cases:
        (tmp_path / ".lock").write_text(text)
        with pytest.raises(ValueError, match=match):
            files.FolderLock(tmp_path).__enter__()
        assert (tmp_path / ".lock").read_text() == text


def test_save_through_an_open_file_matches_torch_save(tmp_path):
    """save_atomic writes through a file object (for Python's OSError on a full disk): a file torch.load reads."""
    state = training_checkpoint(3)
    model.save_atomic(state, tmp_path / "ckpt.pt")
    loaded = checkpoints.load_training_state(tmp_path / "ckpt.pt")
    assert loaded["step"] == 3 and dataclasses.asdict(SMALL) == loaded["model_config"]
