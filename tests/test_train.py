"""The training loop: its schedules, colour dropout, learning, resume and DDP equivalence (CPU)."""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import checkpoints
import run
import stopping
import train
from data import read_frames
from model import CorrFlow
from train import TrainConfig, colour_dropout, get_lr, p_ground_truth

ROOT = Path(__file__).resolve().parents[1]


def test_p_ground_truth_schedule():
    cfg = TrainConfig()
    assert p_ground_truth(0, 101, cfg) == pytest.approx(0.9)
    assert p_ground_truth(50, 101, cfg) == pytest.approx(0.75)
    assert p_ground_truth(100, 101, cfg) == pytest.approx(0.6)


def test_lr_halves_at_samples_seen():
    cfg, total = TrainConfig(batch_size=6), 10**6
    assert get_lr(0, total, cfg) == 2e-4
    assert get_lr(400_000 // 6 + 1, total, cfg) == 1e-4
    assert get_lr(1_000_000 // 6 + 1, total, cfg) == pytest.approx(2e-4 / 16)
    assert get_lr(400_000 // 12 + 1, total, cfg, world=2) == 1e-4  # samples counted over all processes
    assert get_lr(999, 1000, cfg) == 2e-4  # a short run never reaches the paper's milestones


def test_lr_milestones_as_fractions_of_the_run():
    cfg = TrainConfig(batch_size=6, lr_halve_at=(0.5, 0.75))
    assert [get_lr(s, 100, cfg) for s in (0, 49, 50, 74, 75, 99)] == [2e-4, 2e-4, 1e-4, 1e-4, 5e-5, 5e-5]
    assert get_lr(50, 100, cfg, world=2) == 1e-4  # the same fraction whatever the number of processes


def test_colour_dropout_statistics():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 4, 4) + 0.1  # (B, T, 3, H, W), no zeros
    untouched, n = 0, 2000
    for _ in range(n):
        y, k = colour_dropout(x, 0.3, gen)
        dropped = (y == 0).all(dim=(0, 1, 3, 4))  # (3,) channels zeroed for the whole batch
        assert int(dropped.sum()) == k and k in (0, 1, 2)  # never all 3
        kept = ~dropped
        torch.testing.assert_close(y[:, :, kept], x[:, :, kept] * 3 / (3 - k))
        untouched += k == 0
    assert abs(untouched / n - 0.3) < 0.04


@pytest.fixture
def clip_folder(shared_data, tmp_path):
    """A folder holding one real clip cut to 9 frames (exactly one triplet 0, 4, 8) and a fixed set of centroids."""
    src = next(iter(sorted((shared_data / "train_videos_256").glob("davis16-*.mp4"))))
    frames = [f for _, f in zip(range(9), read_frames(src))]
    folder = tmp_path / "videos"
    folder.mkdir()
    iio.imwrite(folder / "clip.mp4", np.stack(frames), plugin="pyav", codec="libx264", fps=24)
    centroids = tmp_path / "centroids.pt"
    torch.save(torch.tensor([[a, b] for a in (-40, -15, 5, 30) for b in (-40, -10, 10, 40)], dtype=torch.float32),
               centroids)
    return folder, centroids


def small_config(folder, centroids, out, **kw):
    settings = dict(data=str(folder), out=str(out), centroids=str(centroids), size=64, batch_size=2,
                    workers=0, device="cpu", log_every=1, ckpt_every=1000, val_every=0, precision="fp32")
    return TrainConfig(**{**settings, **kw})


def read_log(out):
    import csv

    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(clip_folder, tmp_path):
    folder, centroids = clip_folder
    cfg = small_config(folder, centroids, tmp_path / "run", steps=8, jitter_p=0.0, dropout_none_p=1.0,
                       p_gt_start=1.0, p_gt_end=1.0)
    train.main(cfg)
    losses = [float(r["loss"]) for r in read_log(cfg.out)]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(clip_folder, tmp_path, monkeypatch):
    folder, centroids = clip_folder
    whole = small_config(folder, centroids, tmp_path / "whole", steps=4)
    train.main(whole)

    # the same run, interrupted (Ctrl-C) during its second step, then resumed
    parts = small_config(folder, centroids, tmp_path / "parts", steps=4)
    real_get_lr = train.get_lr

    def interrupt_in_step_2(step, *args):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(step, *args)

    monkeypatch.setattr(train, "get_lr", interrupt_in_step_2)
    with pytest.raises(SystemExit) as stopped:
        train.main(parts)
    assert stopped.value.code == 130
    assert torch.load(Path(parts.out) / "ckpt.pt", weights_only=False)["step"] == 2  # the step under way finished
    monkeypatch.setattr(train, "get_lr", real_get_lr)
    train.main(dataclasses.replace(parts, resume=True))

    a = torch.load(Path(whole.out) / "ckpt.pt", weights_only=False)
    b = torch.load(Path(parts.out) / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], atol=0, rtol=0, msg=name)
    assert [r["loss"] for r in read_log(whole.out)] == [r["loss"] for r in read_log(parts.out)]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(clip_folder, tmp_path):
    """Two gloo processes with batch 1 each compute the same loss and gradients as one process with batch 2.

    The clip folder holds one 9-frame clip without jitter, so both halves of the batch are the same clip: on CPU each
    process keeps its own BatchNorm statistics (SyncBatchNorm needs GPUs), and identical halves make them equal to
    the combined batch's. The gradients are read from Adam's first moment after one step (exp_avg = 0.1 * grad):
    after the update itself, Adam turns rounding-level differences of near-zero gradients into +-lr steps.
    The two processes run --precision auto with probes that disagree (the second finds bf16 faster): both must
    train in the first one's fp32, or the second's bf16 rounding would show in the gradients."""
    folder, centroids = clip_folder
    common = ["--data", str(folder), "--centroids", str(centroids), "--size", "64", "--steps", "1",
              "--workers", "0", "--device", "cpu", "--jitter-p", "0", "--log-every", "1", "--val-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--precision", "fp32", "--batch-size", "2",
                    "--out", str(tmp_path / "one")], check=True, env=env, cwd=ROOT, capture_output=True)
    disagreeing = tmp_path / "train_second_prefers_bf16.py"
    disagreeing.write_text(f"import os, runpy, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport model\n"
                           "model.encoder_in_bf16 = lambda *a, **k: os.environ['RANK'] == '1'\n"
                           f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(disagreeing), *common, "--precision", "auto", "--batch-size", "1", "--out",
                          str(tmp_path / "two")], check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    assert "training in fp32" in two.stdout
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=False)["optimizer"]["state"]
    assert len(a) == len(b) == len(list(CorrFlow().parameters()))  # every parameter got a gradient
    for i in a:
        grad_a, grad_b = a[i]["exp_avg"], b[i]["exp_avg"]
        torch.testing.assert_close(grad_b, grad_a, atol=1e-4 * float(grad_a.abs().max()), rtol=0,
                                   msg=lambda m: f"parameter {i}: {m}")
    loss_a, loss_b = (float(read_log(tmp_path / d)[0]["loss"]) for d in ("one", "two"))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)


@pytest.mark.slow
def test_minutes_fixes_the_run_length_from_the_first_steps(clip_folder, tmp_path, monkeypatch, capsys):
    folder, centroids = clip_folder
    monkeypatch.setattr(stopping.Budget, "TIMED", 3)
    monkeypatch.setattr(stopping.Budget, "SKIP", 2)
    cfg = small_config(folder, centroids, tmp_path / "run", minutes=0.3, log_every=1)
    weights = train.main(cfg)
    ckpt = torch.load(Path(cfg.out) / "ckpt.pt", weights_only=False)
    planned, done = ckpt["train_config"]["steps"], ckpt["step"]
    assert ckpt["train_config"]["minutes"] == 0 and ckpt["total_steps"] == planned  # --resume continues this schedule
    printed = capsys.readouterr().out
    assert weights.is_file() and "the run will take" in printed
    # planned from the speed of the first steps; a machine that slows down later stops at the budget instead
    assert done == planned or (done < planned and "time budget" in printed)
    rows = read_log(cfg.out)
    assert [int(r["step"]) for r in rows] == list(range(1, done + 1))
    # p(gt) is spread over the planned steps (fixed after 2 + at most 3 steps): it falls towards p_gt_end
    for r in rows[2 + 3:]:
        assert float(r["p_gt"]) == pytest.approx(train.p_ground_truth(int(r["step"]) - 1, planned, cfg), abs=1e-4)
    assert all(0 <= float(r["data_wait"]) <= 1 for r in rows)


def test_a_budget_spent_by_start_up_still_trains_one_step_and_saves(clip_folder, tmp_path, capsys):
    """--minutes counts from the process's start: when start-up took it all, the run says so, takes one step at
    the schedule's start and saves, with that length, so that --resume has nothing left to do."""
    folder, centroids = clip_folder
    cfg = small_config(folder, centroids, tmp_path / "run", minutes=0.5)
    weights = train.main(cfg, started=time.time() - 60)  # as if start-up had taken a minute
    printed = capsys.readouterr().out
    assert "--minutes 0.5 ran out before the run's speed was measured" in printed
    ckpt = torch.load(Path(cfg.out) / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 1 and ckpt["train_config"]["steps"] == 1 and ckpt["train_config"]["minutes"] == 0
    assert weights.is_file() and [r["step"] for r in read_log(cfg.out)] == ["1"]
    assert float(read_log(cfg.out)[0]["p_gt"]) == cfg.p_gt_start


def test_budget_counts_from_the_process_start():
    code = "import time; t = time.time(); import stopping; print(stopping.process_start() <= t, time.time() - t)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split()[0] == "True"  # before the interpreter ran a line of this program
    assert stopping.Budget(1.0, start=time.time() - 61).left() < 0
    assert 59 < stopping.Budget(1.0, start=time.time()).left() <= 60


def test_budget_times_steps_until_a_tenth_of_it_is_spent(monkeypatch):
    """A fake clock: start-up took 20 s of a 1-minute budget, then every step takes 1 s. Steps 0-4 are left out,
    steps 5-10 timed (6 s: a tenth of the budget), so the length is fixed before step 11 with 29 s left: 11 + 28."""
    now = [1000.0]
    monkeypatch.setattr(stopping.time, "time", lambda: now[0])
    budget = stopping.Budget(1.0, start=now[0] - 20)
    cpu = torch.device("cpu")
    for step in range(30):
        total = budget.fix_length(step, False, cpu)  # called before each step until it gives the length
        if total is not None:
            break
        now[0] += 1.0
    assert (step, total, budget.speed) == (11, 11 + int(0.97 * 29), 1.0)
    assert not budget.spent(False, cpu) and budget.left() == 29
    now[0] += 30
    assert budget.spent(False, cpu)


def test_resuming_a_finished_run_reads_no_video(clip_folder, tmp_path, monkeypatch, capsys):
    folder, centroids = clip_folder
    cfg = small_config(folder, centroids, tmp_path / "run", steps=1)
    train.main(cfg)
    (Path(cfg.out) / "corrflow.pt").unlink()

    def no_video(*args, **kwargs):
        raise AssertionError("read the videos")

    monkeypatch.setattr(train, "ClipDataset", no_video)
    monkeypatch.setattr(run, "encoder_in_bf16", no_video)
    weights = train.main(dataclasses.replace(cfg, resume=True, precision="auto"))
    assert weights.is_file()  # exported again
    assert f"resuming {Path(cfg.out) / 'ckpt.pt'} at step 1/1" in capsys.readouterr().out


def test_steps_and_minutes_together_are_refused(clip_folder, tmp_path):
    folder, centroids = clip_folder
    with pytest.raises(ValueError, match="--steps or --minutes"):
        train.main(small_config(folder, centroids, tmp_path / "run", steps=3, minutes=1))


def test_init_starts_from_exported_weights_and_their_centroids(clip_folder, tmp_path):
    folder, centroids = clip_folder
    first = train.main(small_config(folder, centroids, tmp_path / "first", steps=2))
    cfg = small_config(folder, "", tmp_path / "second", steps=1, lr=0.0, init=str(first))
    train.main(cfg)
    a = torch.load(first, weights_only=False)
    b = torch.load(Path(cfg.out) / "ckpt.pt", weights_only=False)
    assert torch.equal(b["centroids"], a["centroids"])
    for name, value in a["model"].items():
        if "running" not in name and "num_batches" not in name:  # lr 0: weights stay; BN statistics move
            torch.testing.assert_close(b["model"][name], value.float(), atol=0, rtol=0, msg=name)


def test_init_continues_the_sample_stream_and_the_optimiser(clip_folder, tmp_path):
    folder, centroids = clip_folder
    first = small_config(folder, centroids, tmp_path / "first", steps=2)
    weights = train.main(first)
    # from a training checkpoint: its Adam state comes along, no warm-up, samples go on after its 2 x 2
    cont = small_config(folder, "", tmp_path / "cont", steps=1, init=str(Path(first.out) / "ckpt.pt"))
    train.main(cont)
    ckpt = torch.load(Path(cont.out) / "ckpt.pt", weights_only=False)
    assert ckpt["train_config"]["sample_offset"] == 4 and ckpt["samples_seen"] == 6
    assert ckpt["train_config"]["warmup_steps"] == 0
    assert all(int(s["step"]) == 3 for s in ckpt["optimizer"]["state"].values())  # 2 steps there, 1 here
    # from exported weights (no optimiser state): a fresh Adam, warmed up
    again = small_config(folder, "", tmp_path / "again", steps=1, init=str(weights))
    train.main(again)
    ckpt = torch.load(Path(again.out) / "ckpt.pt", weights_only=False)
    assert ckpt["train_config"]["sample_offset"] == 4
    assert ckpt["train_config"]["warmup_steps"] == checkpoints.INIT_WARMUP
    assert float(read_log(again.out)[0]["lr"]) == pytest.approx(2e-4 / checkpoints.INIT_WARMUP)


def test_validation_score_in_the_log_and_bf16_on_the_cpu(clip_folder, tmp_path):
    folder, centroids = clip_folder
    cfg = small_config(folder, centroids, tmp_path / "run", steps=3, val_every=2, val_clips=3, precision="bf16",
                       size=64, crop=32, log_every=10)
    train.main(cfg)
    rows = read_log(cfg.out)
    assert [r["step"] for r in rows] == ["1", "2", "3"]  # the first, every val_every-th and the last step scored
    scores = [float(r["val_ce"]) for r in rows]
    assert all(np.isfinite(scores)) and all(-0.5 < v < 5 for v in scores)
    assert scores[0] != scores[1]  # the weights moved


def test_non_finite_loss_stops_with_checkpoint_intact(clip_folder, tmp_path, monkeypatch):
    folder, centroids = clip_folder
    cfg = small_config(folder, centroids, tmp_path / "run", steps=3)
    cfg.ckpt_every = 1
    real_nll = train.nll
    calls = {"n": 0}

    def nan_after_first_step(probs, target):
        calls["n"] += 1
        return real_nll(probs, target) * (float("nan") if calls["n"] > 4 else 1.0)  # 4 nll terms per step

    monkeypatch.setattr(train, "nll", nan_after_first_step)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1"):
        train.main(cfg)
    assert torch.load(Path(cfg.out) / "ckpt.pt", weights_only=False)["step"] == 1


def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "out"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no usable video in")


# ---------------------------------------------------------------------------------------------- stopping safely


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_stop_signals_are_recorded_not_fatal(sig, code):
    before = signal.getsignal(sig)
    with stopping.StopSignals() as stop:
        assert not stop.requested(False, torch.device("cpu"))
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the first one decides
        assert stop.requested(False, torch.device("cpu"))
        assert (stop.name, stop.exit_code) == (signal.Signals(sig).name, code)
    assert signal.getsignal(sig) is before


def train_command(folder, centroids, out, *extra):
    """train.py on the 9-frame clip at 32x32, batch 1: a few steps per second on a CPU; no periodic checkpoint."""
    return [sys.executable, str(ROOT / "train.py"), "--data", str(folder), "--centroids", str(centroids),
            "--out", str(out), "--size", "32", "--batch-size", "1", "--workers", "0", "--device", "cpu",
            "--log-every", "1", "--ckpt-every", "100000", *extra]


def start(command):
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, process, timeout=60.0):
    t = time.time()
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def logged_steps(out) -> list:
    return [int(r["step"]) for r in read_log(out)] if (Path(out) / "log.csv").exists() else []


def leftovers(out) -> list:
    """What a run leaves in its folder besides its checkpoint, weights and log: should be nothing."""
    return sorted(p.name for p in Path(out).iterdir() if p.name not in ("ckpt.pt", "corrflow.pt", "log.csv"))


@pytest.mark.slow
def test_sigterm_saves_every_step_done_and_resume_continues(clip_folder, tmp_path):
    folder, centroids = clip_folder
    out = tmp_path / "run"
    command = train_command(folder, centroids, out, "--steps", "30")
    run = start(command)
    wait_for(lambda: len(logged_steps(out)) >= 3, run)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 143, stderr
    done = logged_steps(out)
    assert done == list(range(1, len(done) + 1)) and len(done) < 30
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == done[-1]  # no step done is lost
    assert torch.load(out / "corrflow.pt", weights_only=False)["step"] == done[-1]  # exported as at the end
    message = stdout.strip().splitlines()[-1]
    assert message.startswith(f"stopped by SIGTERM at step {done[-1]}: saved {out / 'ckpt.pt'}")
    assert "--resume" in message
    assert "Traceback" not in stderr and leftovers(out) == []

    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out / 'ckpt.pt'} at step {done[-1]}/30" in resumed.stdout
    assert logged_steps(out) == list(range(1, 31))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 30


# ---------------------------------------------------------------------------------------------- writing safely


def test_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(clip_folder, tmp_path, full_disk, capsys):
    folder, centroids = clip_folder
    out = tmp_path / "run"
    checkpoint_writes = []

    def second_checkpoint(path):  # ckpt.pt is written through .ckpt.<pid>.tmp.pt
        if path.name.startswith(".ckpt."):
            checkpoint_writes.append(path)
            return len(checkpoint_writes) == 2
        return False

    full_disk(room=4096, when=second_checkpoint)  # the second save fails after 4 kB
    argv = train_command(folder, centroids, out, "--steps", "3", "--ckpt-every", "1")[2:]
    with pytest.raises(SystemExit) as failed:
        train.cli(argv)
    assert failed.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: cannot write {out / 'ckpt.pt'}: No space left on device"
    assert "Traceback" not in err and sum(line.startswith("error") for line in err.splitlines()) == 1
    assert checkpoints.load_training_state(out / "ckpt.pt")["step"] == 1  # the last good checkpoint
    assert leftovers(out) == []  # no temporary file, and the lock released


# ---------------------------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused(clip_folder, tmp_path):
    folder, centroids = clip_folder
    out = tmp_path / "run"
    first = start(train_command(folder, centroids, out, "--steps", "100000"))
    try:
        wait_for(lambda: (out / ".lock").exists() and logged_steps(out), first)
        second = subprocess.run(train_command(folder, centroids, out, "--steps", "5"), cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: {out} is in use by another run (pid {first.pid} on {socket.gethostname()}); wait for it to end "
            f"or give another --out (if that run is gone, remove {out / '.lock'})"]
        assert (out / ".lock").read_text().split()[0] == str(first.pid)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143
    done = logged_steps(out)  # the first run's log and checkpoint are its own: every row once, in order
    assert done == list(range(1, len(done) + 1))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == done[-1]
    assert leftovers(out) == []


def test_the_lock_of_a_run_that_died_is_taken_over(clip_folder, tmp_path, capsys):
    folder, centroids = clip_folder
    out = tmp_path / "run"
    killed = subprocess.Popen([sys.executable, "-c", "pass"])  # a run that ended without releasing its lock
    killed.wait()
    out.mkdir()
    (out / ".lock").write_text(f"{killed.pid} {socket.gethostname()}\n")
    train.main(small_config(folder, centroids, out, steps=1))
    printed = capsys.readouterr().out
    assert f"taking over the lock of {out} from pid {killed.pid}, which is no longer running" in printed
    assert (out / "corrflow.pt").is_file() and leftovers(out) == []
