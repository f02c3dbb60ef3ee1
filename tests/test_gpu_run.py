"""The GPU run's CPU rehearsal: every step of .ci/gpu_run.py on tiny inputs, so a GPU never meets an untried path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_run_rehearsal(shared_data, tmp_path):
    # a one-sequence DAVIS folder (4 frames of blackswan) with two keypoints, and two short training clips
    davis = tmp_path / "davis"
    src = shared_data / "davis"
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        (davis / kind / "480p" / "blackswan").mkdir(parents=True)
        for i in range(4):
            name = f"{i:05d}.{ext}"
            (davis / kind / "480p" / "blackswan" / name).write_bytes(
                (src / kind / "480p" / "blackswan" / name).read_bytes())
    keypoints = tmp_path / "keypoints"
    keypoints.mkdir()
    (keypoints / "blackswan.json").write_text(json.dumps({
        "sequence": "blackswan", "frame_size": [854, 480], "frames": [0, 3],
        "xy": [[[400, 200], [500, 250]], [[405, 202], [505, 251]]], "visible": [[True, True], [True, True]]}))
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("davis16-rollerblade.mp4", "imageio_realshort.mp4"):
        (clips / name).symlink_to(shared_data / "train_videos_256" / name)

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_run.py"), str(out), "--rehearse",
                             "--minutes", "6", "--data", str(clips), "--davis", str(davis),
                             "--keypoints", str(keypoints)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = (out / "summary.md").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    steps = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines()[4:]]
    assert steps == ["gpu tests", "bench", "train", "propagate 480p", "davis J&F", "points blackswan", "PCK"]
    assert "passed" in (out / "tests.log").read_text()
    assert "| train |" in (out / "bench.md").read_text()
    assert (out / "corrflow.pt").is_file() and (out / "log.csv").is_file()
    assert not (out / "train" / "ckpt.pt").exists()  # only the small exported weights are kept
    propagated = (out / "propagate.md").read_text()
    assert "frames/s" in propagated and "model (corrflow.pt)" in propagated
    assert "J&F" in (out / "davis.log").read_text() and "PCK" in (out / "points.log").read_text()


def test_gpu_run_refuses_a_used_output_folder(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_run.py"), str(tmp_path), "--rehearse"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "not an empty folder" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "old.txt").read_text() == "keep me"
