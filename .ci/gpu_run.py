"""All the GPU work in one command: gpu tests, benchmarks, a training run, propagation with the new weights.

    python .ci/gpu_run.py OUT                  # on a CUDA machine: at most about --minutes (default 9) of wall time
    python .ci/gpu_run.py OUT --rehearse       # the same path on the CPU at tiny sizes (tests/test_gpu_run.py)

Inputs, beside the checkout (git-ignored; copy them there before the run): `gpu_data/train_videos_256/` (the
training clips), optionally `gpu_data/davis/` (DAVIS-layout sequences: scored with the new weights) and
`gpu_data/keypoints/` (keypoint JSONs of those sequences), and `.whl/av-*.whl` where PyAV is not installed (it is
installed into a temporary folder, not OUT). Every step runs as a subprocess with its own time limit; a step that fails or runs out
of time is reported and the next one still runs. Everything worth keeping lands in OUT:

    tests.log      pytest -m gpu (the interpreter tests when rehearsing)
    bench.md       python bench.py: kernel, training step (batch 6 and 48), 480p propagation; fp32 and bf16
    train.log      python train.py --minutes M --in-memory (paper settings at 256x256, lr halving at 1/2 and 3/4)
    log.csv        its loss log;  corrflow.pt: the exported fp16 weights
    propagate.md   480p propagation with the new weights (frames/s, peak memory)
    davis.log      J&F of gpu_data/davis with the new weights, and points.log PCK, where the data came along
    summary.md     one line per step (status, seconds, the key numbers), also printed last
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step(name, cmd, out: Path, log_name: str, limit: float, env: dict) -> dict:
    """Run `cmd` in the checkout with a time limit, its stdout and stderr in OUT/log_name -> a summary row."""
    t = time.time()
    log = out / log_name
    print(f"== {name}: {' '.join(str(c) for c in cmd)} (limit {limit:.0f} s)", flush=True)
    if limit < 5:
        log.write_text("not run: no time left\n")
        return {"step": name, "status": "skipped (no time left)", "seconds": 0.0, "result": ""}
    with open(log, "w") as f:
        try:
            rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return {"step": name, "status": status, "seconds": round(time.time() - t, 1), "result": ""}


def tail(path: Path, pattern: str) -> str:
    """The last line of a log that matches `pattern`, stripped of progress-bar noise; '' when none does."""
    if not path.is_file():
        return ""
    lines = [line.split("\r")[-1].strip() for line in path.read_text(errors="replace").splitlines()]
    hits = [line for line in lines if re.search(pattern, line)]
    return hits[-1] if hits else ""


def python_env(out: Path) -> dict:
    """The environment of every step: PyAV from .whl/ when it is not installed; no Triton interpreter on a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        import av  # noqa: F401
    except ImportError:
        wheels = glob.glob(str(ROOT / ".whl" / "av-*.whl"))
        if wheels:
            site = Path(tempfile.mkdtemp(prefix="corrflow-site-"))  # not under OUT: only results go there
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                            str(site), *wheels], check=True)
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        else:
            print("PyAV is not installed and .whl/ holds no av wheel: reading videos will fail", flush=True)
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created; must be empty or absent)")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run (default: 9)")
    p.add_argument("--data", type=Path, default=ROOT / "gpu_data" / "train_videos_256", help="training clips")
    p.add_argument("--davis", type=Path, default=ROOT / "gpu_data" / "davis", help="DAVIS-layout sequences to score")
    p.add_argument("--keypoints", type=Path, default=ROOT / "gpu_data" / "keypoints", help="keypoint JSONs")
    p.add_argument("--rehearse", action="store_true",
                   help="CPU rehearsal: tiny sizes, a few training steps, interpreter tests instead of gpu tests")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"{args.out} exists and is not an empty folder")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + 60 * args.minutes
    env = python_env(out)
    py = sys.executable
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --rehearse on a CPU")
    rows = []

    def left(reserve: float = 0.0) -> float:
        return deadline - time.time() - reserve

    # 1. correctness on this device
    if args.rehearse:  # the Triton kernels through the interpreter, on small shapes
        env_tests = {**env, "TRITON_INTERPRET": "1"}
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-m", "interpreter",
               "-k", "non_contiguous"]
    else:
        env_tests = env
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    # tests and benchmarks get at most 100 s and 150 s, and never eat into the 45% of the budget kept for training
    rows.append(run_step("gpu tests", cmd, out, "tests.log", min(100, left(0.7 * 60 * args.minutes)), env_tests))
    rows[-1]["result"] = tail(out / "tests.log", r"(passed|failed|skipped|error)")

    # 2. benchmarks (the propagate part comes again below, with the trained weights)
    bench = [py, "bench.py", "--data", args.data] + (["--device", "cpu", "--quick", "train"] if args.rehearse else [])
    rows.append(run_step("bench", bench, out, "bench.log", min(150, left(0.45 * 60 * args.minutes)), env))
    _table(out / "bench.log", out / "bench.md")
    rows[-1]["result"] = f"{_count_rows(out / 'bench.md')} rows in bench.md"

    # 3. training from scratch for most of what is left; 75 s kept for export, propagation and scoring
    train_minutes = 0.2 if args.rehearse else max(0.1, (left(75) - 30) / 60)  # 30 s: start-up and decoding
    size, batch = (64, 2) if args.rehearse else (256, 6)
    train_out = out / "train"
    cmd = [py, "train.py", "--data", args.data, "--out", train_out, "--minutes", f"{train_minutes:.2f}",
           "--size", size, "--batch-size", batch, "--lr-halve-at", "0.5", "0.75", "--in-memory",
           "--workers", 0 if args.rehearse else 8, "--log-every", 5 if args.rehearse else 50, "--ckpt-every", 500]
    rows.append(run_step("train", cmd, out, "train.log", max(0.0, left(45 if not args.rehearse else 20)), env))
    weights = train_out / "corrflow.pt"
    if (train_out / "log.csv").is_file():
        shutil.copy(train_out / "log.csv", out / "log.csv")
    if weights.is_file():
        shutil.copy(weights, out / "corrflow.pt")
        rows[-1]["result"] = _loss_summary(out / "log.csv")
    (train_out / "ckpt.pt").unlink(missing_ok=True)  # 60 MB with the optimiser: the exported weights are kept

    # 4. propagation with the new weights: speed at 480p, then scores where the data came along
    cmd = [py, "bench.py", "propagate", "--davis", args.davis] + (["--device", "cpu", "--quick"] if args.rehearse
                                                                  else [])
    if weights.is_file():
        cmd += ["--checkpoint", weights]
    rows.append(run_step("propagate 480p", cmd, out, "propagate.log", max(0.0, left(25)), env))
    _table(out / "propagate.log", out / "propagate.md")
    rows[-1]["result"] = "; ".join(re.findall(r"= ([\d.]+ frames/s)", (out / "propagate.md").read_text()))
    if weights.is_file() and (args.davis / "Annotations" / "480p").is_dir():
        sequences = sorted(d.name for d in (args.davis / "Annotations" / "480p").iterdir() if d.is_dir())
        cmd = [py, "evaluate.py", "davis", args.davis, "--out", out / "davis", "--sequences", *sequences,
               "--checkpoint", weights]
        rows.append(run_step("davis J&F", cmd, out, "davis.log", max(0.0, left(10)), env))
        rows[-1]["result"] = f"{', '.join(sequences)}: " + tail(out / "davis.log", r"^J&F")
        points = [s for s in sequences if (args.keypoints / f"{s}.json").is_file()]
        for s in points:
            cmd = [py, "propagate.py", args.davis / "JPEGImages" / "480p" / s, args.keypoints / f"{s}.json",
                   "--out", out / "points" / s, "--checkpoint", weights]
            rows.append(run_step(f"points {s}", cmd, out, f"points_{s}.log", max(0.0, left(5)), env))
        if points:
            cmd = [py, "evaluate.py", "points", out / "points", "--gt", args.keypoints]
            rows.append(run_step("PCK", cmd, out, "points.log", max(0.0, left()), env))
            rows[-1]["result"] = tail(out / "points.log", r"PCK")
        shutil.rmtree(out / "points", ignore_errors=True)
        shutil.rmtree(out / "davis", ignore_errors=True)  # the masks are many files; scores stay in davis.log

    # 5. the summary, printed last
    lines = [f"# GPU run ({'CPU rehearsal' if args.rehearse else _device_name()}), {time.time() - start:.0f} s "
             f"of a {args.minutes:g} min budget", "", "| step | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['result']} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines), flush=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _table(log: Path, md: Path) -> None:
    """bench.py prints its summary table last: keep from its '### device' heading on."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    md.write_text(text[text.rfind("### "):] if "### " in text else "no table: see " + log.name + "\n")


def _count_rows(md: Path) -> int:
    return sum(1 for line in md.read_text().splitlines() if line.startswith("| ") and not line.startswith("| part"))


def _loss_summary(log_csv: Path) -> str:
    import csv

    if not log_csv.is_file():
        return "no log.csv"
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "no log rows"
    first, last = rows[0], rows[-1]
    return (f"{last['step']} steps, loss {float(first['loss']):.3f} -> {float(last['loss']):.3f}, "
            f"{last['clips_per_s']} clips/s, data wait {last['data_wait']}")


if __name__ == "__main__":
    sys.exit(main())
