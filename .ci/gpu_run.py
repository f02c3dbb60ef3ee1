"""All the GPU work in one command: gpu tests, benchmarks, a training run, propagation with the new weights.

    python3 .ci/gpu_run.py --prepare ../shared/data   # once, here: fill gpu_data/ with what fits the carry limit
    python3 .ci/gpu_run.py OUT --minutes 8            # on a CUDA machine: at most about --minutes of wall time
    python3 .ci/gpu_run.py OUT --rehearse             # the same path on the CPU at tiny sizes (tests/test_gpu_run.py)

Inputs, beside the checkout (git-ignored, carried to the GPU machine with it; `--prepare` fills them and checks
that checkout plus carried folders stay under CARRY_LIMIT): `gpu_data/train_videos_256/` (the training clips that fit),
`gpu_data/davis/` (DAVIS-layout sequences, scored with the new weights), `gpu_data/keypoints/` (keypoint JSONs of
those sequences) and `.whl/av-*.whl` where PyAV is not installed (installed into a temporary folder; if that fails,
the summary says so and the steps that read no video still run). Every step is a subprocess with its own time
limit: at the limit it gets SIGINT (training then saves and exports), GRACE seconds later SIGKILL; a step that fails
or runs out of time is reported and the next one still runs. The steps that need no video (the gpu tests and the
kernel benchmark) run with PyAV hidden, so that they cannot come to depend on it.

At most MAX_FILES files land in OUT, no subfolders (full logs, the training folder and predictions stay in a
temporary folder):

    summary.md     one line per step (status, seconds, the key numbers), printed last, after the tables
    tests.log      pytest -m gpu (the interpreter tests when rehearsing)
    bench.md       bench.py kernel, then bench.py train (each part's table; a part without one: its log's tail)
    train.log      python train.py --minutes M --in-memory (paper settings at 256x256, lr halving at 1/2 and 3/4)
    log.csv        its loss log
    corrflow.pt    the exported fp16 weights (exported from the last ckpt.pt if the run was cut short)
    propagate.md   bench.py propagate: 480p propagation with the new weights (frames/s, peak memory)
    scores.log     J&F of gpu_data/davis and PCK of its keypoints with the new weights
"""
import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20  # what comes back from the GPU machine
CARRY_LIMIT = 64 * 2**20  # what travels to it: the checkout and the carried git-ignored folders together
CARRIED = (".whl", "gpu_data")
GRACE = 20.0  # seconds between a step's SIGINT and its SIGKILL
OUT_FILES = ("summary.md", "tests.log", "bench.md", "train.log", "log.csv", "corrflow.pt", "propagate.md",
             "scores.log")
NO_AV = "raise ImportError('PyAV is hidden from this step: it must not read video')\n"


def run_step(name, cmd, log: Path, limit: float, env: dict) -> dict:
    """Run `cmd` in the checkout, its stdout and stderr in `log`, for at most `limit` seconds -> a summary row.

    At limit - GRACE the step gets SIGINT (train.py saves and exports, pytest reports, bench.py prints its table),
    and SIGKILL if it is still running at the limit."""
    t = time.time()
    print(f"== {name}: {' '.join(str(c) for c in cmd)} (limit {limit:.0f} s)", flush=True)
    if limit < 5:
        log.write_text("not run: no time left\n")
        return {"step": name, "status": "skipped (no time left)", "seconds": 0.0, "result": ""}
    grace = min(GRACE, limit / 4)
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=limit - grace)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=grace)
                status = f"stopped at its limit by SIGINT (exit {rc})"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status = f"killed at its limit ({limit:.0f} s)"
    return {"step": name, "status": status, "seconds": round(time.time() - t, 1), "result": ""}


def tail(path: Path, pattern: str) -> str:
    """The last line of a log that matches `pattern`, stripped of progress-bar noise; '' when none does."""
    if not path.is_file():
        return ""
    hits = [line.strip() for line in clean_log(path).splitlines() if re.search(pattern, line)]
    return hits[-1] if hits else ""


def clean_log(path: Path, last: int = 0) -> str:
    """A log's text without progress-bar redraws (each line's last carriage-return segment), or its last lines."""
    if not path.is_file():
        return f"({path.name}: no log)\n"
    lines = [line.split("\r")[-1].rstrip() for line in path.read_text(errors="replace").splitlines()]
    return "\n".join(lines[-last:] if last else lines) + "\n"


def python_envs(work: Path) -> tuple[dict, dict, str]:
    """(environment with PyAV, environment with PyAV hidden, a note when PyAV is missing). PyAV comes from .whl/
    when it is not installed; a failed install is a note, not an error. No Triton interpreter on a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    note = ""
    try:
        import av  # noqa: F401
    except ImportError:
        wheels = glob.glob(str(ROOT / ".whl" / "av-*.whl"))
        if not wheels:
            note = "PyAV is not installed and .whl/ holds no av wheel: the steps that read video will fail"
        else:
            site = work / "site"
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                "--target", str(site), *wheels], capture_output=True, text=True)
            if r.returncode == 0:
                env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            else:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                note = f"installing {Path(wheels[0]).name} failed ({last}): the steps that read video will fail"
    hidden = work / "no_av"
    (hidden / "av").mkdir(parents=True, exist_ok=True)
    (hidden / "av" / "__init__.py").write_text(NO_AV)
    no_av = dict(env, PYTHONPATH=os.pathsep.join([str(hidden), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env, no_av, note


def carried_bytes(root: Path = ROOT) -> dict:
    """Bytes that travel to the GPU machine: the checkout (tracked and untracked, not ignored) and each carried
    folder."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    sizes = {"checkout": sum((root / n).stat().st_size for n in names if n and (root / n).is_file())}
    for name in CARRIED:
        sizes[name] = sum(p.stat().st_size for p in (root / name).rglob("*") if p.is_file())
    return sizes


def prepare(shared: Path, root: Path = ROOT) -> dict:
    """Fill root/gpu_data from shared as long as checkout + .whl + gpu_data stay under CARRY_LIMIT: the keypoints,
    the smallest DAVIS sequence that has keypoints (something to score), the training clips smallest first (all of
    them where they fit), then more whole DAVIS sequences, those with keypoints first, smallest first -> sizes."""
    dest = root / "gpu_data"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(shared / "keypoints", dest / "keypoints")
    (dest / "train_videos_256").mkdir()
    davis = shared / "davis"
    with_points = {p.stem for p in (shared / "keypoints").glob("*.json")}

    def size(seq):
        return sum(p.stat().st_size for kind in ("JPEGImages", "Annotations")
                   for p in (davis / kind / "480p" / seq).iterdir())

    def fits(n_bytes):
        return sum(carried_bytes(root).values()) + n_bytes <= CARRY_LIMIT

    sequences = sorted((d.name for d in (davis / "JPEGImages" / "480p").iterdir()),
                       key=lambda s: (s not in with_points, size(s)))
    clips = sorted((p for p in (shared / "train_videos_256").iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
    for item in [sequences[0]] + clips + sequences[1:]:
        if isinstance(item, Path):  # a training clip
            if fits(item.stat().st_size):
                shutil.copy2(item, dest / "train_videos_256" / item.name)
        elif fits(size(item)) and not (dest / "davis" / "JPEGImages" / "480p" / item).exists():
            for kind in ("JPEGImages", "Annotations"):
                shutil.copytree(davis / kind / "480p" / item, dest / "davis" / kind / "480p" / item)
    kept = {p.stem for p in (dest / "davis" / "Annotations" / "480p").glob("*")} if (dest / "davis").is_dir() else set()
    for p in (dest / "keypoints").glob("*.json"):
        if p.stem not in kept:
            p.unlink()
    return carried_bytes(root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", help="output folder (created; must be empty or absent)")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole run (default: 8)")
    p.add_argument("--data", type=Path, default=ROOT / "gpu_data" / "train_videos_256", help="training clips")
    p.add_argument("--davis", type=Path, default=ROOT / "gpu_data" / "davis", help="DAVIS-layout sequences to score")
    p.add_argument("--keypoints", type=Path, default=ROOT / "gpu_data" / "keypoints", help="keypoint JSONs")
    p.add_argument("--rehearse", action="store_true",
                   help="CPU rehearsal: tiny sizes, a few training steps, interpreter tests instead of gpu tests")
    p.add_argument("--prepare", type=Path, metavar="SHARED_DATA",
                   help="fill gpu_data/ from this data folder (clips, keypoints, DAVIS sequences that fit) and exit")
    args = p.parse_args(argv)
    if args.prepare:
        sizes = prepare(args.prepare)
        total = sum(sizes.values())
        print(", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
              + f": {total / 2**20:.1f} of {CARRY_LIMIT / 2**20:.0f} MiB; DAVIS sequences: "
              + " ".join(sorted(d.name for d in (ROOT / "gpu_data" / "davis" / "JPEGImages" / "480p").glob("*")))
              + f"; {len(list((ROOT / 'gpu_data' / 'train_videos_256').iterdir()))} training clips")
        return 0 if total <= CARRY_LIMIT else 1
    if args.out is None:
        p.error("give the output folder OUT (or --prepare)")
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"{args.out} exists and is not an empty folder")
    if not args.rehearse:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --rehearse on a CPU")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="corrflow-gpu-run-"))  # not under OUT: only results go there
    start = time.time()
    deadline = start + 60 * args.minutes
    env, env_no_av, av_note = python_envs(work)
    py = sys.executable
    rows = []
    if av_note:
        rows.append({"step": "PyAV", "status": "missing", "seconds": 0.0, "result": av_note})

    def left(reserve: float = 0.0) -> float:
        return deadline - time.time() - reserve

    def capped(cap: float, budget: float) -> float:
        """A step's limit: its share of the budget, at most `cap` seconds on a GPU. A rehearsal has no caps: a slow or
        busy CPU takes what it takes, and only the budget (--minutes) bounds it."""
        return budget if args.rehearse else min(cap, budget)

    # 1. correctness on this device, with PyAV hidden
    if args.rehearse:  # the Triton kernels through the interpreter, on small shapes
        env_tests = {**env_no_av, "TRITON_INTERPRET": "1"}
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "-m", "interpreter",
               "-k", "non_contiguous"]
    else:
        env_tests = env_no_av
        cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    # tests and benchmarks never eat into the 45% of the budget kept for training
    rows.append(run_step("gpu tests", cmd, out / "tests.log", capped(100, left(0.7 * 60 * args.minutes)), env_tests))
    rows[-1]["result"] = tail(out / "tests.log", r"(passed|failed|skipped|error)")

    # 2. benchmarks, one part per step (the propagate part comes below, with the trained weights)
    quick = ["--device", "cpu", "--quick", "--dtype", "fp32"] if args.rehearse else []  # CPU bf16 may be emulated
    bench_md = []
    for part, limit, reserve, part_env in (("kernel", 90, 0.5, env_no_av), ("train", 60, 0.45, env)):
        log = work / f"bench_{part}.log"
        cmd = [py, "bench.py", part, "--data", args.data, *quick]
        rows.append(run_step(f"bench {part}", cmd, log, capped(limit, left(reserve * 60 * args.minutes)), part_env))
        bench_md.append(_table(log))
        rows[-1]["result"] = f"{_count_rows(bench_md[-1])} rows in bench.md"
    (out / "bench.md").write_text("\n\n".join(bench_md))

    # 3. training from scratch for most of what is left; 75 s kept for export, propagation and scoring. train.py's
    # --minutes counts its start-up (decoding into memory, the bf16 probe) too: it ends by itself on time
    train_minutes = 0.5 if args.rehearse else max(0.1, left(75) / 60)
    size, batch = (64, 2) if args.rehearse else (256, 6)
    train_out = work / "train"
    cmd = [py, "train.py", "--data", args.data, "--out", train_out, "--minutes", f"{train_minutes:.2f}",
           "--size", size, "--batch-size", batch, "--lr-halve-at", "0.5", "0.75", "--in-memory",
           "--workers", 0 if args.rehearse else 8, "--log-every", 5 if args.rehearse else 50, "--ckpt-every", 100]
    rows.append(run_step("train", cmd, out / "train.log", max(0.0, left(45 if not args.rehearse else 20)), env))
    train_row = rows[-1]
    weights = out / "corrflow.pt"
    if (train_out / "log.csv").is_file():
        shutil.copy(train_out / "log.csv", out / "log.csv")
    if (train_out / "corrflow.pt").is_file():
        shutil.copy(train_out / "corrflow.pt", weights)
    elif (train_out / "ckpt.pt").is_file():  # cut short before its export: the last checkpoint's weights
        cmd = [py, "-c", "import sys; from model import export_weights; export_weights(sys.argv[1], sys.argv[2])",
               train_out / "ckpt.pt", weights]
        rows.append(run_step("export from ckpt.pt", cmd, work / "export.log", max(0.0, min(60, left(30))), env))
    if weights.is_file():
        train_row["result"] = _loss_summary(out / "log.csv")

    # 4. propagation with the new weights: speed at 480p, then scores where the data came along
    cmd = [py, "bench.py", "propagate", "--davis", args.davis, *quick]
    if weights.is_file():
        cmd += ["--checkpoint", weights]
    log = work / "propagate.log"
    rows.append(run_step("propagate 480p", cmd, log, max(0.0, left(25)), env))
    (out / "propagate.md").write_text(_table(log))
    rows[-1]["result"] = "; ".join(re.findall(r"= ([\d.]+ frames/s)", (out / "propagate.md").read_text()))
    scores = []  # (title, log) of each scoring step, gathered into scores.log
    if weights.is_file() and (args.davis / "Annotations" / "480p").is_dir():
        sequences = sorted(d.name for d in (args.davis / "Annotations" / "480p").iterdir() if d.is_dir())
        cmd = [py, "evaluate.py", "davis", args.davis, "--out", work / "davis", "--sequences", *sequences,
               "--checkpoint", weights]
        scores.append(("davis J&F", work / "davis.log"))
        rows.append(run_step("davis J&F", cmd, scores[-1][1], max(0.0, left(10)), env))
        rows[-1]["result"] = f"{', '.join(sequences)}: " + tail(scores[-1][1], r"^J&F")
        points = [s for s in sequences if (args.keypoints / f"{s}.json").is_file()]
        for s in points:
            cmd = [py, "propagate.py", args.davis / "JPEGImages" / "480p" / s, args.keypoints / f"{s}.json",
                   "--out", work / "points" / s, "--checkpoint", weights]
            scores.append((f"points {s}", work / f"points_{s}.log"))
            rows.append(run_step(f"points {s}", cmd, scores[-1][1], max(0.0, left(5)), env))
        if points:
            cmd = [py, "evaluate.py", "points", work / "points", "--gt", args.keypoints]
            scores.append(("PCK", work / "points.log"))
            rows.append(run_step("PCK", cmd, scores[-1][1], max(0.0, left()), env))
            rows[-1]["result"] = tail(scores[-1][1], r"PCK")
    (out / "scores.log").write_text("".join(f"== {title}\n{clean_log(log)}\n" for title, log in scores)
                                    or "not scored: no weights or no DAVIS sequences\n")

    # 5. the tables, then the summary, printed last: the end of the output holds them even if files are lost
    lines = [f"# GPU run ({'CPU rehearsal' if args.rehearse else _device_name()}), {time.time() - start:.0f} s "
             f"of a {args.minutes:g} min budget", "", "| step | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['result']} |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + (out / "bench.md").read_text() + "\n\n" + (out / "propagate.md").read_text(), flush=True)
    print("\n".join(tail(log, r"^(J&F|PCK)") for _, log in scores if tail(log, r"^(J&F|PCK)")), flush=True)
    print("\n" + "\n".join(lines), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _table(log: Path) -> str:
    """bench.py prints its summary table last: from its '### device' heading on; without one, the log's tail."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    if "### " in text:
        return text[text.rfind("### "):].strip() + "\n"
    return f"no table from {log.stem}; the last lines of its log:\n\n```\n{clean_log(log, last=30)}```\n"


def _count_rows(md: str) -> int:
    return sum(1 for line in md.splitlines() if line.startswith("| ") and not line.startswith("| part"))


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
