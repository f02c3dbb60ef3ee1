"""evaluate.py: J and F on hand-made masks, the official figures on real DAVIS, bad inputs, PCK."""
import csv
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]


def rect(shape, y0, y1, x0, x1):
    """Boolean mask, True on rows y0..y1 and columns x0..x1 inclusive."""
    m = np.zeros(shape, dtype=bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


# ---------------------------------------------------------------------------------------------------------------
# J


def test_iou_overlapping_rectangles():
    a, b = rect((10, 10), 0, 3, 0, 3), rect((10, 10), 2, 5, 2, 5)  # 16 px each, 2x2 overlap
    assert ev.db_iou(a, b) == pytest.approx(4 / 28)


def test_iou_empty_cases():
    empty, square = np.zeros((8, 8), bool), rect((8, 8), 2, 4, 2, 4)
    assert ev.db_iou(empty, empty) == 1.0
    assert ev.db_iou(square, empty) == 0.0
    assert ev.db_iou(empty, square) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Boundaries and dilation, against the literal rules


def seg2bmap_literal(seg):
    """Neighbour arrays east, south, south-east (zero past the edge), then the last row / column overrides."""
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def dilate_literal(mask, radius):
    """OR of the mask shifted by every offset of the disk x^2 + y^2 <= r^2, zero outside the image."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                src = mask[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
                out[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)] |= src
    return out


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (13, 7), (31, 40)])
def test_boundary_map_matches_rule(shape):
    rng = np.random.default_rng(0)
    for density in (0.1, 0.5, 0.9):
        seg = rng.random(shape) < density
        np.testing.assert_array_equal(ev.boundary_map(seg), seg2bmap_literal(seg))


def test_boundary_of_square_is_outer_ring():
    """A filled square's boundary is the perimeter of the square grown by one pixel up and left."""
    b = ev.boundary_map(rect((20, 20), 5, 9, 5, 9))
    ring = rect((20, 20), 4, 9, 4, 9) & ~rect((20, 20), 5, 8, 5, 8)
    np.testing.assert_array_equal(b, ring)
    assert b.sum() == 20


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 8])
def test_dilate_disk_matches_shifts(radius):
    rng = np.random.default_rng(radius)
    mask = rng.random((23, 37)) < 0.02
    mask[0, 0] = mask[-1, -1] = True  # borders
    np.testing.assert_array_equal(ev.dilate_disk(mask, radius), dilate_literal(mask, radius))


def test_disk_is_skimage_shape():
    assert ev.disk_half_widths(8) == [8, 7, 7, 7, 6, 6, 5, 3, 0]
    assert ev.bound_pixels((480, 854)) == 8


# ---------------------------------------------------------------------------------------------------------------
# F


def test_f_identical_empty_and_one_sided():
    square, empty = rect((30, 30), 5, 14, 8, 20), np.zeros((30, 30), bool)
    assert ev.db_boundary_f(square, square) == 1.0
    assert ev.db_boundary_f(empty, empty) == 1.0
    assert ev.db_boundary_f(square, empty) == 0.0  # P = 0, R = 1
    assert ev.db_boundary_f(empty, square) == 0.0  # P = 1, R = 0


def test_f_shift_within_tolerance_is_one():
    gt = rect((20, 20), 5, 9, 5, 9)
    assert ev.db_boundary_f(np.roll(gt, 1, axis=1), gt, bound_th=1) == 1.0
    assert ev.db_boundary_f(np.roll(gt, 3, axis=0), gt, bound_th=3) == 1.0


def test_f_shift_beyond_tolerance_by_hand():
    """5x5 square shifted 2 px right, tolerance 1 px. Both boundaries are 6x6 rings of 20 px (rows 4..9).
    Predicted ring: columns 6..11, true ring: columns 4..9. Predicted top and bottom rows match at columns 6..10
    (10 px; column 10 is 1 px from the true corner at column 9). Of the left column, rows 5 and 8 lie 1 px below /
    above the true top / bottom row (2 px); rows 6, 7 are 2 px from column 4. The right column (11) is 2 px from
    everything. P = 12/20, and R = 12/20 by symmetry, so F = 0.6."""
    gt = rect((20, 20), 5, 9, 5, 9)
    assert ev.db_boundary_f(np.roll(gt, 2, axis=1), gt, bound_th=1) == pytest.approx(0.6)


def test_f_default_tolerance_on_davis_size():
    """At 854x480 the tolerance is 8 px: a shift of 8 px still scores 1, a shift of 9 px does not."""
    gt = rect((480, 854), 100, 299, 200, 499)
    assert ev.db_boundary_f(np.roll(gt, 8, axis=1), gt) == 1.0
    assert ev.db_boundary_f(np.roll(gt, 9, axis=1), gt) < 1.0


# ---------------------------------------------------------------------------------------------------------------
# DAVIS folders


def first_frame_copies(ann_root: Path, out: Path, sequences):
    for seq in sequences:
        pngs = sorted((ann_root / seq).glob("*.png"))
        (out / seq).mkdir(parents=True)
        for p in pngs:
            shutil.copy(pngs[0], out / seq / p.name)


def test_first_frame_copy_matches_official_figures(shared_data, tmp_path):
    root = shared_data / "davis"
    if not root.is_dir():
        pytest.skip(f"no DAVIS folder at {root}")
    sequences = ev.read_sequences(root)
    first_frame_copies(root / "Annotations" / "480p", tmp_path, sequences)
    summary = ev.main_davis(root, tmp_path, None, None, None, None)
    assert summary["J&F"] == pytest.approx(0.251, abs=1e-3)
    assert summary["J-Mean"] == pytest.approx(0.272, abs=1e-3)
    assert summary["F-Mean"] == pytest.approx(0.230, abs=1e-3)
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + len(sequences) + 1 and rows[-1].startswith("mean,all,0.272")


def write_label_png(path: Path, labels: np.ndarray):
    im = Image.fromarray(labels.astype(np.uint8))
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def tiny_davis(tmp_path):
    """One sequence, 4 frames of 12x16, two objects; predictions equal to the annotations."""
    root, pred = tmp_path / "davis", tmp_path / "pred"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("toy\n")
    for t in range(4):
        labels = np.zeros((12, 16), np.uint8)
        labels[2:6, 1 + t:5 + t] = 1
        labels[7:11, 8:14] = 2
        write_label_png(root / "Annotations" / "480p" / "toy" / f"{t:05d}.png", labels)
        write_label_png(pred / "toy" / f"{t:05d}.png", labels)
    return root, pred


def test_score_sequence_objects_and_frames(tiny_davis):
    root, pred = tiny_davis
    scores = ev.score_sequence(pred / "toy", root / "Annotations" / "480p" / "toy")
    assert scores == {1: {"J": [1.0, 1.0], "F": [1.0, 1.0]}, 2: {"J": [1.0, 1.0], "F": [1.0, 1.0]}}


def test_missing_frame_is_named(tiny_davis):
    root, pred = tiny_davis
    (pred / "toy" / "00002.png").unlink()
    with pytest.raises(ValueError, match=r"missing prediction .*toy/00002\.png") as e:
        ev.score_davis(root, pred, ["toy"])
    assert "\n" not in str(e.value)


def test_size_mismatch_is_one_line(tiny_davis):
    root, pred = tiny_davis
    write_label_png(pred / "toy" / "00001.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"00001\.png: size 8x6, annotation is 16x12") as e:
        ev.score_davis(root, pred, ["toy"])
    assert "\n" not in str(e.value)


def test_cli_scores_and_fails_in_one_line(tiny_davis):
    root, pred = tiny_davis
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "davis", str(root), "--predictions", str(pred)]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "J&F 1.000  J-Mean 1.000  F-Mean 1.000"
    assert (pred / "scores.csv").is_file()
    (pred / "toy" / "00001.png").unlink()
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: missing prediction")


def test_propagate_then_score_uses_propagate_interface(tiny_davis, tmp_path, monkeypatch):
    """The propagation path with a stand-in propagate module that repeats the first mask."""
    root, _ = tiny_davis
    for t in range(4):
        frame = root / "JPEGImages" / "480p" / "toy" / f"{t:05d}.jpg"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(frame)
    calls = {}

    def propagate_masks(frames, first_mask, cfg, encoder, device):
        frames = list(frames)
        calls.update(n_frames=len(frames), frame_shape=frames[0].shape, encoder=encoder)
        for _ in frames:
            yield first_mask

    cfg = types.SimpleNamespace(features="lab", precision="auto")
    fake = types.SimpleNamespace(config_from_args=lambda args: cfg, propagate_masks=propagate_masks,
                                 load_encoder=lambda checkpoint, features, device, precision: f"{features} encoder")
    monkeypatch.setitem(sys.modules, "propagate", fake)
    args = types.SimpleNamespace(device="cpu", checkpoint=None)
    out = tmp_path / "out"
    summary = ev.main_davis(root, None, out, None, None, args)
    assert calls == {"n_frames": 4, "frame_shape": (12, 16, 3), "encoder": "lab encoder"}
    assert sorted(p.name for p in (out / "toy").glob("*.png")) == [f"{t:05d}.png" for t in range(4)]
    with Image.open(out / "toy" / "00003.png") as im:
        assert im.mode == "P"
    assert 0 < summary["J-Mean"] < 1
    # predictions already there are kept unless asked: --overwrite replaces them
    before = (out / "toy" / "00000.png").stat().st_mtime_ns
    with pytest.raises(ValueError, match="already holds predictions \\(toy\\).*--overwrite"):
        ev.main_davis(root, None, out, None, None, args)
    assert (out / "toy" / "00000.png").stat().st_mtime_ns == before
    ev.main_davis(root, None, out, None, None, types.SimpleNamespace(**vars(args), overwrite=True))


# ---------------------------------------------------------------------------------------------------------------
# PCK


@pytest.fixture
def keypoints():
    """3 joints; joint 2 is hidden in the first labelled frame, so only joints 0 and 1 are tracked.
    Frame 5: all visible, bounding box 100 x 50 -> threshold 10 px at PCK@0.1, 20 px at PCK@0.2.
    Frame 10: joint 1 hidden; joints 0 and 2 visible with a bounding box 40 x 30 -> 4 px / 8 px."""
    gt = {"sequence": "toy", "frame_size": [200, 100], "frames": [0, 5, 10],
          "xy": [[[10, 10], [20, 20], [30, 30]], [[0, 0], [100, 50], [50, 25]], [[10, 10], [0, 0], [50, 40]]],
          "visible": [[True, True, False], [True, True, True], [True, False, True]]}
    xy = [[[10, 10], [20, 20], None] for _ in range(11)]
    xy[5] = [[0, 0], [100, 50], None]
    xy[10] = [[10, 10], None, None]
    pred = {"sequence": "toy", "frame_size": [200, 100], "frames": list(range(11)), "xy": xy}
    return pred, gt


def test_pck_perfect(keypoints):
    pred, gt = keypoints
    assert ev.pck_counts(pred, gt, 0.1) == (3, 3)  # frame 5: joints 0, 1; frame 10: joint 0
    assert ev.pck(pred, gt, 0.2) == 1.0


def test_pck_known_displacement(keypoints):
    pred, gt = keypoints
    pred["xy"][5][0] = [9, 12]   # 15 px off: wrong at 0.1 (10 px), right at 0.2 (20 px)
    pred["xy"][10][0] = [15, 10]  # 5 px off: wrong at 0.1 (4 px), right at 0.2 (8 px)
    assert ev.pck(pred, gt, 0.1) == pytest.approx(1 / 3)
    assert ev.pck(pred, gt, 0.2) == 1.0
    pred["xy"][5][1] = None  # a tracked joint left out counts as wrong
    assert ev.pck_counts(pred, gt, 0.2) == (2, 3)


def test_score_points_files(keypoints, tmp_path, capsys):
    pred, gt = keypoints
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt" / "toy.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="missing prediction"):
        ev.score_points(tmp_path / "pred", tmp_path / "gt")
    (tmp_path / "pred" / "toy.json").write_text(json.dumps(pred))
    assert ev.main_points(tmp_path / "pred", tmp_path / "gt") == {0.1: 1.0, 0.2: 1.0}
    assert capsys.readouterr().out.splitlines()[-1] == "PCK@0.1 1.000  PCK@0.2 1.000"


def test_grid_scores_what_davis_scores(shared_data, tmp_path):
    """`evaluate.py grid` (frames encoded once, scored in memory) gives the J&F that `evaluate.py davis` gives from the
    written PNGs, per setting; a bad grid file is one line."""
    root = tmp_path / "davis"
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        (root / kind / "480p" / "blackswan").mkdir(parents=True)
        for t in range(5):
            shutil.copy(shared_data / "davis" / kind / "480p" / "blackswan" / f"{t:05d}.{ext}",
                        root / kind / "480p" / "blackswan" / f"{t:05d}.{ext}")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("blackswan\n")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"lab": {"features": "lab", "num_recent": 1},
                                "lab top-5": {"features": "lab", "topk": 5, "first_radius": 9}}))
    summary = ev.cli(["grid", str(root), "--configs", str(grid), "--out", str(tmp_path / "grid.csv")])
    assert summary["lab"]["J&F"] != summary["lab top-5"]["J&F"]
    for name, flags in (("lab", ["--num-recent", "1"]), ("lab top-5", ["--topk", "5", "--first-radius", "9"])):
        davis = ev.cli(["davis", str(root), "--out", str(tmp_path / name), "--features", "lab", *flags])
        assert davis["J&F"] == pytest.approx(summary[name]["J&F"], abs=1e-12)
    rows = list(csv.reader(open(tmp_path / "grid.csv")))
    assert [r[0] for r in rows] == ["setting", "lab", "lab top-5"]
    grid.write_text(json.dumps({"bad": {"features": "lab", "top_k": 5}}))
    with pytest.raises(SystemExit):
        ev.cli(["grid", str(root), "--configs", str(grid), "--out", str(tmp_path / "bad.csv")])
