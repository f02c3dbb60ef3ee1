"""The GPU run's CPU rehearsal: every step of .ci/gpu_run.py on tiny inputs, so a GPU never meets an untried path."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_run", ROOT / ".ci" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)


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

    # a budget no CPU misses: the rehearsal checks what the run writes and how its steps end, not its speed (a slow,
    # busy CPU propagates 480p frames at seconds each); train.py's own --minutes stays short, and ends it
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_run.py"), str(out), "--rehearse",
                             "--minutes", "120", "--data", str(clips), "--davis", str(davis),
                             "--keypoints", str(keypoints)], cwd=ROOT, capture_output=True, text=True)
    summary = (out / "summary.md").read_text()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    steps = [line.split(" | ")[0].lstrip("| ") for line in summary.splitlines()[4:]]
    assert steps == ["gpu tests", "bench kernel", "bench train", "train", "propagate 480p", "davis J&F",
                     "points blackswan", "PCK"]
    assert all(" | ok | " in line for line in summary.splitlines()[4:]), summary  # none stopped at a limit
    # the training step ended by its own --minutes: its length fixed from its speed, or its budget spent by start-up
    train_log = (out / "train.log").read_text()
    assert ("the run will take" in train_log or "ran out before the run's speed was measured" in train_log)
    assert "done:" in train_log and (out / "log.csv").read_text().startswith("step,loss")
    # what comes back from the GPU machine: at most 8 plain files of at most 16 MB, all of them the results
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == sorted(gpu_run.OUT_FILES) and len(files) <= gpu_run.MAX_FILES
    assert all((out / f).stat().st_size <= gpu_run.MAX_FILE_BYTES for f in files)
    # the tests and the kernel benchmark ran with PyAV hidden, and still passed
    assert "passed" in (out / "tests.log").read_text()
    bench_md = (out / "bench.md").read_text()
    assert "| kernel |" in bench_md and "| train |" in bench_md and "| error |" not in bench_md
    propagated = (out / "propagate.md").read_text()
    assert "frames/s" in propagated and "model (corrflow.pt)" in propagated
    scores = (out / "scores.log").read_text()
    assert "J&F" in scores and "PCK" in scores
    for table in (bench_md, propagated):  # printed before the summary, so that the output's tail holds them
        assert table.strip().splitlines()[-1] in result.stdout


def test_a_spent_budget_skips_the_steps_left_and_still_writes_the_summary(tmp_path):
    """The run's own stop path, with a budget too short for any step: every step is reported as skipped, the summary
    comes last, only result files land in OUT, and the exit status says that not everything ran."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_run.py"), str(out), "--rehearse",
                             "--minutes", "0.01", "--data", str(tmp_path / "no_clips"), "--davis",
                             str(tmp_path / "no_davis")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    rows = summary.splitlines()[4:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["gpu tests", "bench kernel", "bench train", "train",
                                                               "propagate 480p"]
    assert all(" | skipped (no time left) | " in r for r in rows), summary
    assert result.stdout.rstrip().endswith(rows[-1])
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert set(files) <= set(gpu_run.OUT_FILES) and "summary.md" in files
    assert all((out / f).is_file() and (out / f).stat().st_size <= gpu_run.MAX_FILE_BYTES for f in files)


@pytest.mark.slow
def test_a_step_past_its_limit_gets_sigint_then_is_killed(tmp_path):
    catches = "import signal, time; signal.signal(signal.SIGINT, lambda *a: (print('saved', flush=True), exit(130)))"
    row = gpu_run.run_step("polite", [sys.executable, "-c", catches + "; time.sleep(60)"], tmp_path / "a.log",
                           limit=6, env=dict(os.environ))
    assert row["status"] == "stopped at its limit by SIGINT (exit 130)" and "saved" in (tmp_path / "a.log").read_text()
    ignores = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    row = gpu_run.run_step("stubborn", [sys.executable, "-c", ignores], tmp_path / "b.log", limit=6,
                           env=dict(os.environ))
    assert row["status"] == "killed at its limit (6 s)" and row["seconds"] < 10


def test_the_checkout_and_the_carried_data_fit_the_carry_limit(shared_data, tmp_path):
    # --prepare in a stand-in checkout: this one's files, a PyAV wheel of today's size (35 MB, a sparse file)
    root = tmp_path / "checkout"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", "gpu_data", ".whl", "runs", "__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    (root / ".whl").mkdir()
    with open(root / ".whl" / "av-19.0.2-cp312-abi3-manylinux_2_28_x86_64.whl", "wb") as f:
        f.truncate(34_990_159)
    sizes = gpu_run.prepare(shared_data, root)
    assert sum(sizes.values()) <= gpu_run.CARRY_LIMIT, sizes
    data = root / "gpu_data"
    clips = {p.name for p in (data / "train_videos_256").iterdir()}
    assert len(clips) >= 10 and clips <= {p.name for p in (shared_data / "train_videos_256").iterdir()}
    sequences = [p.name for p in (data / "davis" / "JPEGImages" / "480p").iterdir()]
    assert sequences and [p.stem for p in (data / "keypoints").glob("*.json")]  # one scored sequence at least
    assert {p.stem for p in (data / "keypoints").glob("*.json")} <= set(sequences)


def test_gpu_run_refuses_a_used_output_folder(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_run.py"), str(tmp_path), "--rehearse"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "not an empty folder" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "old.txt").read_text() == "keep me"
