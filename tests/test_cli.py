"""Generated bad inputs for the three command lines, run in-process: every one is refused with one line on stderr that
names the flag or the file, no traceback, a non-zero exit, and nothing already on disk changed.

Each CLI starts from a valid command line on small real inputs; one flag at a time gets a bad value drawn by a
seeded generator (below, at or above its range, not finite, not a number, empty), or one file is replaced by a
malformed one (missing, empty, random bytes, a folder for a file and the reverse, wrong size, wrong structure).
The refusals happen before any heavy work, so the whole module runs in well under a minute on a CPU.
"""
import dataclasses
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import evaluate
import model
import propagate
import run
import stopping
import train
from data import read_frames

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261128
ODD_TEXT = ["", " ", "abc", "nan", "inf", "-inf", "1e999", "-1e999", "0x10", "1,5", "--", "½", "1 2"]


# ----------------------------------------------------------------------------------------------------------------
# The generator and the checks


@dataclasses.dataclass
class Range:
    """What a numeric flag accepts: integers or finite reals in [low, high] (or > above), multiples of `multiple`."""
    integer: bool
    low: float = None
    high: float = None
    above: float = None
    multiple: int = None


def bad_values(rng: random.Random, r: Range, n: int = 6) -> list[str]:
    """n values outside `r`: its edges first (just below, just above, the open bound itself), then random ones."""
    edges, step = [], 1 if r.integer else 1e-6
    if r.low is not None:
        edges += [r.low - step, r.low - rng.randint(2, 10**9)]
    if r.high is not None:
        edges += [r.high + step, r.high + rng.randint(2, 10**9)]
    if r.above is not None:
        edges += [r.above, r.above - rng.random() * 10**rng.randint(0, 12)]
    if r.multiple:
        k = rng.randint(r.low // r.multiple, 512)
        edges += [k * r.multiple + rng.randint(1, r.multiple - 1), (r.low // r.multiple - 1) * r.multiple]
    if r.integer:
        edges += [f"{rng.randint(1, 99)}.5", f"{rng.randint(1, 9)}e{rng.randint(1, 5)}"]
    values = [repr(v) if isinstance(v, float) else str(v) for v in edges]
    return values + rng.sample(ODD_TEXT, min(n, len(ODD_TEXT)))


def snapshot(root: Path) -> dict:
    """Every path under root: kind, size, mtime and (small files) a content hash. Symlinks are not followed."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            digest = None
            if path.is_file() and not path.is_symlink() and st.st_size < 2**20:
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def refusal(entry, argv: list, tmp_path: Path, capsys) -> tuple[str, str]:
    """Run entry(argv) -> (what went wrong, '' when it was refused properly; the line it printed)."""
    argv = [str(a) for a in argv]
    before = snapshot(tmp_path)
    capsys.readouterr()
    code, crash = None, None
    with warnings.catch_warnings(record=True) as warned:  # a warning is a line on stderr outside pytest
        warnings.simplefilter("always")
        try:
            entry(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # noqa: BLE001 - what the test is looking for
            crash = f"{type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    lines = err.splitlines() + [f"warning: {w.message}" for w in warned]
    changed = sorted({c[0] for c in set(before.items()) ^ set(snapshot(tmp_path).items())})
    line = lines[0] if lines else ""
    if crash is not None:
        return f"raised {crash}", line
    if code in (0, None):
        return f"exit status {code!r}, not a refusal", line
    if len(lines) != 1 or not lines[0].strip():
        return f"stderr is not one line: {lines}", line
    if "Traceback" in out + err:
        return "a traceback was printed", line
    if changed:
        return f"changed on disk: {changed}", line
    return "", line


def check_all(entry, cases: list, tmp_path: Path, capsys):
    """cases: (argv, a text the one line must name: the flag or the file). Every failure is reported at once."""
    failures = []
    for argv, name in cases:
        problem, line = refusal(entry, argv, tmp_path, capsys)
        if not problem and name not in line:
            problem = f"{line!r} does not name {name!r}"
        if problem:
            failures.append(f"{' '.join(map(str, argv))}\n    -> {problem}")
    assert not failures, f"{len(failures)} of {len(cases)} inputs were not refused properly:\n" + "\n".join(failures)


def with_value(argv: list, flag: str, value: str, rng: random.Random) -> list:
    """argv with `flag` set to value, as --flag=value (so that '-inf' reaches the flag's check) or, for values that
    argparse cannot mistake for a flag, sometimes as two words."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    two_words = rng.random() < 0.5 and not value.startswith("-") and value
    return argv + ([flag, value] if two_words else [f"{flag}={value}"])


def random_bytes(rng: random.Random, path: Path, n: int = 2000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
    return path


def flag_cases(base: list, ranges: dict, rng: random.Random) -> list:
    return [(with_value(base, flag, value, rng), flag) for flag, r in ranges.items() for value in bad_values(rng, r)]


# ----------------------------------------------------------------------------------------------------------------
# propagate.py


PROPAGATE_RANGES = {"--radius": Range(True, 0, 64), "--num-recent": Range(True, 0, 100),
                    "--temperature": Range(False, above=0), "--first-radius": Range(True, 0, 64),
                    "--topk": Range(True, 0, 4096), "--lab-temperature": Range(False, above=0)}


@pytest.fixture
def propagate_inputs(tmp_path):
    """The example video and mask, an output folder holding a previous result, and malformed files beside them."""
    rng = random.Random(SEED)
    video = Path(shutil.copy(ROOT / "examples" / "blackswan.mp4", tmp_path / "blackswan.mp4"))
    mask = Path(shutil.copy(ROOT / "examples" / "blackswan_00000.png", tmp_path / "blackswan_00000.png"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.png").write_bytes(mask.read_bytes())  # a previous run's result: --overwrite must not remove it
    (out / "points.json").write_text("{}")
    base = [video, mask, "--out", out, "--overwrite", "--features", "lab", "--no-overlay", "--device", "cpu"]
    return tmp_path, rng, video, mask, base


def test_propagate_base_command_line_is_valid(propagate_inputs, monkeypatch):
    """The base reaches the work: the refusals below come from the one bad input each."""
    tmp_path, _, _, _, base = propagate_inputs

    def reached(out, overwrite):
        raise RuntimeError("reached the work")

    monkeypatch.setattr(propagate, "prepare_out_dir", reached)
    with pytest.raises(RuntimeError, match="reached the work"):
        propagate.cli([str(a) for a in base])


def points_json(path: Path, xy, visible=None, frames=(0,)) -> Path:
    visible = [[True] * len(xy)] if visible is None else visible
    path.write_text(json.dumps({"sequence": "blackswan", "frames": list(frames), "xy": [xy], "visible": visible}))
    return path


def propagate_file_cases(tmp_path: Path, rng: random.Random, video: Path, mask: Path, base: list) -> list:
    """(argv, the file it names) with one malformed file each."""
    first = next(read_frames(video))
    H, W = first.shape[:2]
    bad = tmp_path / "malformed"
    bad.mkdir()
    one = bad / "one_frame"
    one.mkdir()
    Image.fromarray(first).save(one / "00000.jpg")
    (bad / "no_frames").mkdir()
    frames_junk = bad / "junk_frames"
    random_bytes(rng, frames_junk / "00000.jpg")
    random_bytes(rng, frames_junk / "00001.jpg")
    (bad / "empty.mp4").write_bytes(b"")
    small = bad / "small.png"
    Image.open(mask).resize((W // 2, H // 2), Image.NEAREST).save(small)
    background = bad / "background.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(background)
    colour = bad / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(colour)
    (bad / "empty.png").write_bytes(b"")
    (bad / "empty.json").write_text("")
    (bad / "list.json").write_text("[]")
    (bad / "no_xy.json").write_text('{"frames": [0]}')
    (bad / "strings.json").write_text('{"frames": [0], "xy": [[["a", "b"]]], "visible": [[true]]}')
    outside = [[W + rng.randint(0, 500), H / 2], [rng.uniform(-500, -0.01), 3.0], [W / 2, H], [None, None],
               [1e308 * 10, 1.0]]  # right, left, bottom edge (H is outside), null (nan), inf
    point_files = []
    for k, p in enumerate(outside):
        xy = [[10.0, 10.0], p] if rng.random() < 0.5 else [p]
        point_files.append(points_json(bad / f"outside_{k}.json", xy))
    late = points_json(bad / "late.json", [[10.0, 10.0]], frames=(10**6,))
    hidden = points_json(bad / "hidden.json", [[10.0, 10.0]], visible=[[False]])
    wrong_ckpt = bad / "wrong.pt"
    torch.save({"format": model.CHECKPOINT_FORMAT}, wrong_ckpt)  # the right tag, nothing else
    tensor_ckpt = bad / "tensor.pt"
    torch.save(torch.zeros(3), tensor_ckpt)
    a_file = bad / "a_file"
    a_file.write_text("x")
    rest = base[2:]
    model_rest = [a for a in rest if a not in ("--features", "lab")]
    cases = [([tmp_path / "missing.mp4", mask, *rest], "missing.mp4"),
             ([bad / "empty.mp4", mask, *rest], "empty.mp4"),
             ([random_bytes(rng, bad / "random.mp4"), mask, *rest], "random.mp4"),
             ([bad / "no_frames", mask, *rest], "no_frames"),
             ([frames_junk, mask, *rest], "junk_frames"),
             ([one, mask, *rest], "one_frame"),
             ([video, tmp_path / "missing.png", *rest], "missing.png"),
             ([video, bad, *rest], "malformed"),
             ([video, bad / "empty.png", *rest], "empty.png"),
             ([video, random_bytes(rng, bad / "random.png"), *rest], "random.png"),
             ([video, random_bytes(rng, bad / "random.txt"), *rest], "random.txt"),
             ([video, small, *rest], "small.png"),
             ([video, background, *rest], "background.png"),
             ([video, colour, *rest], "colour.png"),
             ([video, random_bytes(rng, bad / "random.json"), *rest], "random.json"),
             ([video, late, *rest], "late.json"),
             ([video, hidden, *rest], "hidden.json"),
             ([video, mask, *model_rest, "--checkpoint", tmp_path / "missing.pt"], "missing.pt"),
             ([video, mask, *model_rest, "--checkpoint", bad / "empty.png"], "empty.png"),
             ([video, mask, *model_rest, "--checkpoint", random_bytes(rng, bad / "random.pt")], "random.pt"),
             ([video, mask, *model_rest, "--checkpoint", wrong_ckpt], "wrong.pt"),
             ([video, mask, *model_rest, "--checkpoint", tensor_ckpt], "tensor.pt"),
             ([video, mask, *model_rest, "--checkpoint", bad], "--checkpoint"),
             ([video, mask, "--out", a_file, *rest[2:]], "a_file"),
             ([video, mask, "--out", a_file / "sub", *rest[2:]], "a_file"),
             ([video, mask, "--out", "", *rest[2:]], "--out"),
             ([video, mask, *rest, "--num-recent", "0", "--no-first"], "--num-recent"),
             ([video, mask, *rest, "--num-recent", "0", "--protocol", "corrflow"], "--num-recent"),
             ([video, mask, *rest, "--device", "tpu"], "--device"),
             ([video, mask, *rest, "--protocol", "best"], "--protocol")]
    cases += [([video, bad / name, *rest], name) for name in ("empty.json", "list.json", "no_xy.json", "strings.json")]
    cases += [([video, p, *rest], p.name) for p in point_files]
    return cases


def test_propagate_refuses_generated_bad_input(propagate_inputs, capsys):
    tmp_path, rng, video, mask, base = propagate_inputs
    cases = flag_cases(base, PROPAGATE_RANGES, rng) + propagate_file_cases(tmp_path, rng, video, mask, base)
    check_all(propagate.cli, cases, tmp_path, capsys)


def test_point_outside_the_frame_names_index_and_position(propagate_inputs, capsys):
    tmp_path, _, video, _, base = propagate_inputs
    points = points_json(tmp_path / "points.json", [[10.0, 10.0], [20.0, 30.0], [900.0, 12.5]])
    with pytest.raises(SystemExit):
        propagate.cli([str(a) for a in [video, points, *base[2:]]])
    assert capsys.readouterr().err == f"error: {points}: point 2 at (900, 12.5) lies outside the 428x240 frame\n"


# ----------------------------------------------------------------------------------------------------------------
# train.py


TRAIN_RANGES = {
    "--steps": Range(True, 0), "--epochs": Range(True, 1), "--minutes": Range(False, 0),
    "--batch-size": Range(True, 1), "--lr": Range(False, above=0), "--lr-halve-at": Range(False, above=0),
    "--size": Range(True, 16, multiple=4), "--frame-gap": Range(True, 1), "--jitter-p": Range(False, 0, 1),
    "--dropout-none-p": Range(False, 0, 1), "--p-gt-start": Range(False, 0, 1), "--p-gt-end": Range(False, 0, 1),
    "--cycle-weight": Range(False, 0), "--num-clusters": Range(True, 2, 256), "--workers": Range(True, 0),
    "--seed": Range(True, 0, 2**32 - 1), "--log-every": Range(True, 1), "--ckpt-every": Range(True, 1),
    "--radius": Range(True, 0, 64),
}


@pytest.fixture
def train_inputs(shared_data, tmp_path):
    """One real clip (a symlink), fixed centroids, and an output folder holding a previous run's files."""
    rng = random.Random(SEED + 1)
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").symlink_to(sorted((shared_data / "train_videos_256").glob("davis16-*.mp4"))[0])
    centroids = tmp_path / "centroids.pt"
    torch.save(torch.randn(16, 2) * 30, centroids)
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.csv").write_text("step,loss\n1,2.5\n")
    (out / "corrflow.pt").write_bytes(b"previous weights")
    base = ["--data", videos, "--out", out, "--centroids", centroids, "--size", "32", "--steps", "1",
            "--batch-size", "1", "--workers", "0", "--device", "cpu"]
    return tmp_path, rng, base


def test_train_base_command_line_is_valid(train_inputs, monkeypatch):
    tmp_path, _, base = train_inputs

    def reached(*args, **kwargs):
        raise RuntimeError("reached the work")

    monkeypatch.setattr(train, "CorrFlow", reached)  # built once the data and the centroids are ready
    with pytest.raises(RuntimeError, match="reached the work"):
        train.cli([str(a) for a in base])


def test_train_help_gives_values_not_names(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"without Adam state: {checkpoints.INIT_WARMUP})" in text and "INIT_WARMUP" not in text
    assert f"(up to {stopping.Budget.TIMED}, after {stopping.Budget.SKIP} of warm-up)" in text
    assert f"0 on 1-2 cores (an integer >= 0; default: {run.default_workers()})" in text
    assert "10% faster" in text and "`" not in text  # field names in backquotes are not flags


def train_file_cases(tmp_path: Path, rng: random.Random, base: list) -> list:
    bad = tmp_path / "malformed"
    bad.mkdir()
    (bad / "no_videos").mkdir()
    random_bytes(rng, bad / "junk_videos" / "clip.mp4")
    (bad / "empty.pt").write_bytes(b"")
    for name, value in [("vector.pt", torch.zeros(16)), ("three.pt", torch.zeros(16, 3)), ("one.pt", torch.zeros(1, 2)),
                        ("nan.pt", torch.full((16, 2), float("nan"))), ("dict.pt", {"centroids": torch.zeros(16, 2)}),
                        ("tagged.pt", {"format": model.CHECKPOINT_FORMAT})]:
        torch.save(value, bad / name)
    random_bytes(rng, bad / "random.pt")
    a_file = bad / "a_file"
    a_file.write_text("x")
    # a run folder whose checkpoint is unreadable: --resume must say so before touching it
    broken_run = tmp_path / "broken_run"
    random_bytes(rng, broken_run / "ckpt.pt")
    (broken_run / "log.csv").write_text("step,loss\n1,2.5\n")

    def set_(flag, value):
        return with_value(base, flag, str(value), rng)

    cases = [(set_("--data", tmp_path / "missing"), "missing"), (set_("--data", a_file), "a_file"),
             (set_("--data", bad / "no_videos"), "no_videos"), (set_("--data", bad / "junk_videos"), "clip.mp4"),
             (set_("--data", ""), "--data"), (set_("--out", a_file), "a_file"), (set_("--out", a_file / "x"), "a_file"),
             (set_("--out", ""), "--out"), (set_("--device", "tpu"), "--device"),
             (base + ["--minutes", "1"], "--minutes"), (base + ["--unknown-flag"], "--unknown-flag"),
             (set_("--out", broken_run) + ["--resume"], "ckpt.pt")]
    for flag in ("--centroids", "--init"):
        cases += [(set_(flag, tmp_path / "missing.pt"), "missing.pt"), (set_(flag, bad), flag)]
        cases += [(set_(flag, bad / name), name) for name in ("empty.pt", "random.pt", "tagged.pt", "dict.pt")]
    cases += [(set_("--centroids", bad / name), name) for name in ("vector.pt", "three.pt", "one.pt", "nan.pt")]
    return cases


def test_train_refuses_generated_bad_input(train_inputs, capsys):
    tmp_path, rng, base = train_inputs
    cases = flag_cases(base, TRAIN_RANGES, rng) + train_file_cases(tmp_path, rng, base)
    check_all(train.cli, cases, tmp_path, capsys)


def test_resume_keeps_the_schedule_and_says_what_it_ignores(train_inputs, capsys, monkeypatch):
    """--resume refuses a longer schedule (with what to do instead) and lists the flags it ignores; the way it
    points to (--init from the training checkpoint, a new folder) starts a new run of the new length."""
    tmp_path, _, base = train_inputs
    out = tmp_path / "finished"
    argv = [str(a) for a in with_value(base, "--out", str(out), random.Random(0))]
    cfg = train.parse_args(argv)  # a finished 1-step run, written by train.py's own checkpoint function
    net = model.CorrFlow(cfg.model)
    out.mkdir()
    ckpt = out / "ckpt.pt"
    model.save_atomic(checkpoints.checkpoint(net, torch.optim.Adam(net.parameters()), 1, cfg, torch.randn(16, 2) * 30),
                      ckpt)

    problem, line = refusal(train.cli, argv + ["--resume", "--steps=3"], tmp_path, capsys)
    assert not problem and "--steps 3" in line and f"--init {ckpt} --out" in line, (problem, line)

    train.cli(argv + ["--resume", "--lr", "0.01", "--radius", "3", "--workers", "0"])
    printed = capsys.readouterr().out
    assert "ignored: --lr 0.01, --radius 3" in printed, printed
    saved = torch.load(ckpt, weights_only=False)["train_config"]
    assert saved["lr"] == train.TrainConfig.lr and saved["model"]["radius"] == 6  # the run's own settings kept
    # a run's step count is fixed once it is saved: repeating a --minutes command continues it, --minutes ignored
    i = argv.index("--steps")
    timed = argv[:i] + argv[i + 2:] + ["--minutes", "5"]
    train.cli(timed + ["--resume", "--workers", "0"])
    assert "ignored: --minutes 5" in capsys.readouterr().out

    started = {}

    def new_run(batch_size, start, total, rank=0, world=1, offset=0):
        started.update(start=start, total=total)
        raise RuntimeError("the new run starts")

    monkeypatch.setattr(train, "RunBatches", new_run)
    longer = [str(a) for a in with_value(argv, "--out", str(tmp_path / "longer"), random.Random(0))]
    with pytest.raises(RuntimeError, match="the new run starts"):
        train.cli(longer + ["--init", str(ckpt), "--steps", "3"])
    assert started == {"start": 0, "total": 3}


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py


def write_png(path: Path, labels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(labels.astype(np.uint8), mode="L").convert("P")
    img.putpalette(propagate.davis_palette())
    img.save(path)


@pytest.fixture
def davis_inputs(tmp_path):
    """A DAVIS-layout folder with one 4-frame sequence, predictions equal to it with a previous scores.csv, and
    keypoint JSONs with their predictions."""
    rng = random.Random(SEED + 2)
    root = tmp_path / "davis"
    labels = np.zeros((12, 16), np.uint8)
    labels[3:9, 4:12] = 1
    for t in range(4):
        frame = root / "JPEGImages" / "480p" / "toy" / f"{t:05d}.jpg"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 16, 3), 60 * t, np.uint8)).save(frame)
        write_png(root / "Annotations" / "480p" / "toy" / f"{t:05d}.png", labels)
        write_png(tmp_path / "pred" / "toy" / f"{t:05d}.png", labels)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("toy\n")
    (tmp_path / "pred" / "scores.csv").write_text("previous scores\n")
    gt = {"sequence": "toy", "frame_size": [16, 12], "frames": [0, 2], "xy": [[[3, 4], [10, 8]], [[4, 4], [11, 9]]],
          "visible": [[True, True], [True, True]]}
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "toy.json").write_text(json.dumps(gt))
    (tmp_path / "points").mkdir()
    pred = {"sequence": "toy", "frame_size": [16, 12], "frames": [0, 1, 2], "xy": [[[3, 4], [10, 8]]] * 3}
    (tmp_path / "points" / "toy.json").write_text(json.dumps(pred))
    return tmp_path, rng, root


def test_evaluate_base_command_lines_are_valid(davis_inputs, capsys):
    tmp_path, _, root = davis_inputs
    assert evaluate.cli(["davis", str(root), "--predictions", str(tmp_path / "pred")])["J&F"] == 1.0
    assert evaluate.cli(["points", str(tmp_path / "points"), "--gt", str(tmp_path / "gt")])[0.2] == 0.5


def test_evaluate_refuses_generated_bad_input(davis_inputs, capsys):
    tmp_path, rng, root = davis_inputs
    pred, points, gt = tmp_path / "pred", tmp_path / "points", tmp_path / "gt"
    davis = ["davis", root, "--predictions", pred]
    propagating = ["davis", root, "--out", pred, "--features", "lab", "--device", "cpu"]
    cases = flag_cases(propagating, PROPAGATE_RANGES, rng)
    bad = tmp_path / "malformed"
    bad.mkdir()
    a_file = bad / "a_file"
    a_file.write_text("x")
    (bad / "no_sets").mkdir()
    (bad / "empty_gt").mkdir()
    junk_pred = bad / "junk_pred"
    shutil.copytree(pred / "toy", junk_pred / "toy")
    random_bytes(rng, junk_pred / "toy" / "00001.png")
    small_pred = bad / "small_pred"
    shutil.copytree(pred / "toy", small_pred / "toy")
    write_png(small_pred / "toy" / "00002.png", np.zeros((6, 8), np.uint8))
    truncated = bad / "truncated_pred"
    shutil.copytree(pred / "toy", truncated / "toy")
    png = (pred / "toy" / "00001.png").read_bytes()
    (truncated / "toy" / "00001.png").write_bytes(png[:len(png) // 2])
    json_cases = {"random": None, "empty": "", "list": "[]", "numbers": '{"frames": 5, "xy": 3}',
                  "short": '{"frames": [0, 1, 2], "xy": [[[3, 4]]]}', "strings": '{"frames": [0, 1, 2], "xy": "abc"}'}
    for name, text in json_cases.items():
        folder = bad / f"points_{name}"
        if text is None:
            random_bytes(rng, folder / "toy.json")
        else:
            folder.mkdir()
            (folder / "toy.json").write_text(text)
    cases += [(["davis", tmp_path / "missing", "--predictions", pred], "missing"),
              (["davis", a_file, "--predictions", pred], "a_file"),
              (["davis", bad / "no_sets", "--predictions", pred], "val.txt"),
              (["davis", root, "--predictions", tmp_path / "missing"], "missing"),
              (["davis", root, "--predictions", a_file], "a_file"),
              (["davis", root, "--predictions", junk_pred], "00001.png"),
              (["davis", root, "--predictions", truncated], "00001.png"),
              (["davis", root, "--predictions", small_pred], "00002.png"),
              (davis + ["--sequences", "nope"], "nope"),
              (davis + ["--csv", bad], "--csv"),
              (davis + ["--csv", a_file / "scores.csv"], "a_file"),
              (davis + ["--radius", "3"], "--radius"),  # propagation options do not apply to scoring
              (["davis", root], "--predictions"),
              (["davis", root, "--out", a_file], "a_file"),
              (propagating + ["--num-recent", "0", "--no-first"], "--num-recent"),
              (propagating[:-2] + ["--device", "gpu"], "--device"),
              (propagating + ["--checkpoint", tmp_path / "missing.pt"], "missing.pt"),
              (["points", points], "--gt"),
              (["points", points, "--gt", tmp_path / "missing"], "missing"),
              (["points", points, "--gt", a_file], "a_file"),
              (["points", points, "--gt", bad / "empty_gt"], "empty_gt"),
              (["points", tmp_path / "missing", "--gt", gt], "missing"),
              (["points", bad / "empty_gt", "--gt", gt], "toy.json"),
              (["points", points, "--gt", bad / "points_random"], "toy.json"),
              (["nonsense"], "nonsense"), ([], "task")]
    cases += [(["points", bad / f"points_{name}", "--gt", gt], "toy.json") for name in json_cases]
    check_all(evaluate.cli, cases, tmp_path, capsys)
