"""Scores video object segmentation on DAVIS (J, F, J&F) and keypoint tracking (PCK).

Masks, as the official DAVIS-2017 semi-supervised evaluator scores them:
- Objects are the ids 1..N of the first frame's annotation (N = its largest id; 255 = void, read as background).
  Each object is scored as the binary masks `pred == o` and `gt == o` on every frame but the first and the last.
- J = intersection / union; an empty union scores 1.
- F = boundary F-measure. The boundary of a mask is the pixels that differ from their east, south or south-east
  neighbour (last row: east only; last column: south only; corner: never). Boundaries match within a disk of radius
  ceil(0.008 x image diagonal) pixels (8 px at 854x480): precision = share of predicted boundary pixels within that
  disk of a true one, recall = the converse, F = 2PR / (P + R) (0 when P + R = 0). An empty predicted boundary has
  P = 1, R = 0; an empty true one P = 0, R = 1; both empty P = R = 1.
- Per object: mean over frames. J-Mean and F-Mean: mean over all objects of all sequences. J&F: their mean.

Keypoints (PCK@a): see `pck`. Predicted keypoint JSON, one file `<sequence>.json` per sequence:
    {"sequence": "dog", "frame_size": [W, H],
     "frames": [0, 1, ..., T-1],       # every frame of the video, ascending
     "xy": [[[x, y] or null, ...], ...]}  # T x J, the ground truth's J joints, pixels in the W x H frame;
                                          # null for joints not visible in the first labelled frame
The ground-truth JSON has the same keys with "frames" = the labelled frames only and a "visible" T x J list.

Usage:
    python evaluate.py davis ROOT --predictions DIR [--csv FILE]   # score DIR/<seq>/%05d.png
    python evaluate.py davis ROOT --out DIR [propagation options]   # propagate each sequence, then score
    python evaluate.py points DIR --gt KEYPOINT_DIR                 # score DIR/<seq>.json
    python evaluate.py grid ROOT --configs GRID.json --out CSV [--keypoints DIR]   # many propagation settings (grid.py)
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

import cli as cmdline  # the module; `cli` below is this file's entry point
from files import atomic_write
from media import read_json, read_label_png, read_mask, save_png


# ----------------------------------------------------------------------------------------------------------------
# Per-frame metrics


def db_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index of two boolean (H, W) masks; 1 when both are empty."""
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels that differ from their east, south or south-east neighbour (the official seg2bmap)."""
    b, m = np.zeros_like(mask), mask[:-1, :-1]
    b[:-1, :-1] = (m != mask[:-1, 1:]) | (m != mask[1:, :-1]) | (m != mask[1:, 1:])
    b[-1, :-1] = mask[-1, :-1] != mask[-1, 1:]  # last row: east neighbour only
    b[:-1, -1] = mask[:-1, -1] != mask[1:, -1]  # last column: south neighbour only; the corner stays 0
    return b


def disk_half_widths(radius: int) -> list[int]:
    """Half-width of each row dy = 0..radius of the disk x^2 + y^2 <= radius^2 (skimage's `disk`)."""
    return [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a boolean (H, W) mask by a disk; pixels outside the image count as empty (like cv2).

    The disk is a union of horizontal segments, so: dilate horizontally once per half-width (growing one pixel at
    a time), then OR each row offset dy of the disk shifted vertically. About 4 x radius whole-array boolean ops.
    """
    h, w = mask.shape
    pad = np.zeros((h + 2 * radius, w + 2 * radius), dtype=bool)
    pad[radius:radius + h, radius:radius + w] = mask
    widths = disk_half_widths(radius)
    rows = {0: pad.copy()}  # half-width -> horizontally dilated (padded) mask
    grown = pad.copy()
    for k in range(1, widths[0] + 1):
        grown[:, k:] |= pad[:, :-k]
        grown[:, :-k] |= pad[:, k:]
        if k in widths:
            rows[k] = grown.copy()
    out = np.zeros((h, w), dtype=bool)
    for dy in range(-radius, radius + 1):
        out |= rows[widths[abs(dy)]][radius + dy:radius + dy + h, radius:radius + w]
    return out


def bound_pixels(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """Match tolerance in pixels: bound_th itself when >= 1, else ceil(bound_th x image diagonal)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape))


def db_boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary F-measure of two boolean (H, W) masks (see the module docstring for the rule)."""
    radius = bound_pixels(pred.shape, bound_th)
    pred_b, gt_b = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = np.count_nonzero(pred_b), np.count_nonzero(gt_b)
    if n_pred == 0 or n_gt == 0:
        return 1.0 if n_pred == n_gt else 0.0  # P, R = (1, 0) or (0, 1) give F = 0; both empty give F = 1
    # Only the bounding box of both boundaries (plus the radius) can change the counts: dilate there.
    ys, xs = np.nonzero(pred_b | gt_b)
    y0, y1 = max(ys.min() - radius, 0), ys.max() + radius + 1
    x0, x1 = max(xs.min() - radius, 0), xs.max() + radius + 1
    pred_b, gt_b = pred_b[y0:y1, x0:x1], gt_b[y0:y1, x0:x1]
    precision = np.count_nonzero(pred_b & dilate_disk(gt_b, radius)) / n_pred
    recall = np.count_nonzero(gt_b & dilate_disk(pred_b, radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# DAVIS


def read_annotation(path: Path) -> np.ndarray:
    labels = read_label_png(path)
    labels[labels == 255] = 0  # void: the official semi-supervised evaluation reads it as background
    return labels


def score_sequence(pred_dir: Path, gt_dir: Path) -> dict[int, dict[str, list[float]]]:
    """{object id: {"J": [...], "F": [...]}}, one value per frame but the first and the last."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt_paths = sorted(gt_dir.glob("*.png"))
    if not gt_paths:
        raise ValueError(f"no annotations in {gt_dir}")

    def predictions():
        for i, gt_path in enumerate(gt_paths):
            pred_path = pred_dir / gt_path.name
            if i == 0 or i == len(gt_paths) - 1:
                yield pred_path, None  # not scored: need not exist
            elif not pred_path.is_file():
                raise ValueError(f"missing prediction {pred_path}")
            else:
                yield pred_path, read_label_png(pred_path)

    return score_masks(predictions(), [read_annotation(p) for p in gt_paths])


def score_masks(predictions, gts: list[np.ndarray]) -> dict[int, dict[str, list[float]]]:
    """score_sequence's rule on (name, (H, W) ids) predictions, one per annotation in `gts` (the first and the last
    are not scored)."""
    n_objects = int(gts[0].max())
    scores = {o: {"J": [], "F": []} for o in range(1, n_objects + 1)}
    for i, (gt, (name, pred)) in enumerate(zip(gts, predictions)):
        if i == 0 or i == len(gts) - 1:
            continue
        if pred.shape != gt.shape:
            raise ValueError(f"{name}: size {pred.shape[1]}x{pred.shape[0]}, annotation is {gt.shape[1]}x{gt.shape[0]}")
        if pred.max() > n_objects:
            raise ValueError(f"{name}: object id {pred.max()}, annotation has {n_objects} object(s)")
        for o, s in scores.items():
            p, g = pred == o, gt == o
            s["J"].append(db_iou(p, g))
            s["F"].append(db_boundary_f(p, g))
    return scores


def read_sequences(root: Path) -> list[str]:
    path = Path(root) / "ImageSets" / "2017" / "val.txt"
    if not path.is_file():
        raise ValueError(f"{root}: not a DAVIS folder (no {path.relative_to(root)}); or give --sequences")
    return path.read_text().split()


def score_davis(root: Path, pred_dir: Path, sequences: list[str]) -> dict[str, dict[int, dict[str, list[float]]]]:
    """{sequence: score_sequence(...)} for predictions in pred_dir/<sequence>/%05d.png."""
    gt_root = Path(root) / "Annotations" / "480p"
    return {seq: score_sequence(Path(pred_dir) / seq, gt_root / seq) for seq in sequences}


def summarise(results: dict) -> dict[str, float]:
    """J-Mean and F-Mean over all objects of all sequences, and J&F."""
    per_object = [s for objects in results.values() for s in objects.values()]
    j = float(np.mean([np.mean(s["J"]) for s in per_object]))
    f = float(np.mean([np.mean(s["F"]) for s in per_object]))
    return {"J&F": (j + f) / 2, "J-Mean": j, "F-Mean": f}


def write_csv_atomic(path: Path, rows: list[list]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def report_davis(results: dict, csv_path: Path) -> dict[str, float]:
    """Print the per-sequence table and the final line; write per-object rows and a mean row to csv_path."""
    print(f"{'sequence':<20} {'objects':>7} {'J':>6} {'F':>6}")
    rows = [["sequence", "object", "J", "F", "J&F"]]
    for seq, objects in results.items():
        j = [float(np.mean(s["J"])) for s in objects.values()]
        f = [float(np.mean(s["F"])) for s in objects.values()]
        print(f"{seq:<20} {len(objects):>7} {np.mean(j):6.3f} {np.mean(f):6.3f}")
        rows += [[seq, o, f"{jo:.6f}", f"{fo:.6f}", f"{(jo + fo) / 2:.6f}"] for o, jo, fo in zip(objects, j, f)]
    summary = summarise(results)
    rows.append(["mean", "all", f"{summary['J-Mean']:.6f}", f"{summary['F-Mean']:.6f}", f"{summary['J&F']:.6f}"])
    write_csv_atomic(csv_path, rows)
    print(f"J&F {summary['J&F']:.3f}  J-Mean {summary['J-Mean']:.3f}  F-Mean {summary['F-Mean']:.3f}")
    return summary


def sequence_frames(root: Path, seq: str) -> list[Path]:
    """The JPEG frames of a DAVIS sequence, in order; ValueError naming the folder when there are none."""
    folder = Path(root) / "JPEGImages" / "480p" / seq
    frame_paths = sorted(folder.glob("*.jpg"))
    if not frame_paths:
        raise ValueError(f"no frames in {folder}")
    return frame_paths


def propagate_davis(root: Path, out_dir: Path, sequences: list[str], args: argparse.Namespace) -> None:
    """Propagate each sequence's first annotation with propagate.py and write out_dir/<seq>/%05d.png."""
    import imageio.v3 as iio
    import torch

    import propagate

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device in (None, "auto") else args.device)
    cfg = propagate.config_from_args(args)
    encoder = propagate.load_encoder(args.checkpoint, cfg.features, device, cfg.precision)
    done = [seq for seq in sequences if any((Path(out_dir) / seq).glob("*.png"))]
    if done and not getattr(args, "overwrite", False):
        raise ValueError(f"{out_dir} already holds predictions ({', '.join(done)}); pass --overwrite to replace them, "
                         "or --predictions to score them")
    for seq in sequences:
        frame_paths = sequence_frames(root, seq)
        frames = (iio.imread(p) for p in frame_paths)  # (H, W, 3) uint8 RGB each, read as propagation streams
        first_path = Path(root) / "Annotations" / "480p" / seq / f"{frame_paths[0].stem}.png"
        palette = read_mask(first_path)[1]  # predictions get the annotations' colours
        first_mask = read_annotation(first_path)
        seq_dir = Path(out_dir) / seq
        seq_dir.mkdir(parents=True, exist_ok=True)
        n = 0
        for path, labels in zip(frame_paths, propagate.propagate_masks(frames, first_mask, cfg, encoder, device)):
            save_png(labels.astype(np.uint8), palette, seq_dir / f"{path.stem}.png")  # grey ids without a palette
            n += 1
        if n != len(frame_paths):
            raise ValueError(f"{seq}: propagation gave {n} masks for {len(frame_paths)} frames")
        print(f"{seq}: {n} masks -> {seq_dir}")


# ----------------------------------------------------------------------------------------------------------------
# Keypoints


def pck_counts(pred: dict, gt: dict, alpha: float) -> tuple[int, int]:
    """(correct, scored) points of one sequence for PCK@alpha.

    Rule: the joints tracked are those visible in the first labelled frame. Every later labelled frame scores the
    tracked joints visible in it; a prediction is correct when its Euclidean distance to the true point is at most
    alpha x max(w, h), with (w, h) the bounding box of all of that frame's visible true points. A missing (null)
    prediction of a scored joint counts as wrong.
    """
    pred_rows = dict(zip(pred["frames"], pred["xy"]))
    tracked = np.asarray(gt["visible"][0], dtype=bool)
    correct = total = 0
    for frame, xy, visible in zip(gt["frames"][1:], gt["xy"][1:], gt["visible"][1:]):
        if frame not in pred_rows:
            raise ValueError(f"{gt['sequence']}: no prediction for frame {frame}")
        xy, visible = np.asarray(xy, dtype=float), np.asarray(visible, dtype=bool)
        scored = np.flatnonzero(tracked & visible)
        if len(scored) == 0:
            continue
        box = xy[visible].max(0) - xy[visible].min(0)  # (w, h) of all the frame's visible true points
        for j in scored:
            p = pred_rows[frame][j]
            total += 1
            correct += p is not None and math.dist(p, xy[j]) <= alpha * box.max()
    return int(correct), total


def pck(pred: dict, gt: dict, alpha: float) -> float:
    """PCK@alpha of one sequence (see `pck_counts` for the rule); nan when no point is scored."""
    correct, total = pck_counts(pred, gt, alpha)
    return correct / total if total else float("nan")


def score_points(pred_dir: Path, gt_dir: Path, alphas: tuple[float, ...] = (0.1, 0.2)) -> dict[str, dict]:
    """{sequence: {alpha: (correct, scored)}} for every ground-truth JSON in gt_dir; each needs pred_dir/<seq>.json
    or pred_dir/<seq>/points.json (what `propagate.py VIDEO POINTS.json --out pred_dir/<seq>` writes)."""
    gt_paths = sorted(Path(gt_dir).glob("*.json"))
    if not gt_paths:
        raise ValueError(f"no keypoint JSONs in {gt_dir}")
    results = {}
    for gt_path in gt_paths:
        pred_path = Path(pred_dir) / gt_path.name
        if not pred_path.is_file():
            pred_path = Path(pred_dir) / gt_path.stem / "points.json"
        if not pred_path.is_file():
            raise ValueError(f"missing prediction {Path(pred_dir) / gt_path.name} (or {pred_path})")
        gt, pred = read_json(gt_path), read_json(pred_path)
        try:
            results[gt_path.stem] = {a: pck_counts(pred, gt, a) for a in alphas}
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:  # a JSON of another layout
            raise ValueError(f"{pred_path} against {gt_path}: cannot score ({type(e).__name__}: {e})") from None
    return results


def report_points(results: dict) -> dict[float, float]:
    """Print per-sequence PCK and the pooled mean (every scored point of every sequence counts once)."""
    alphas = list(next(iter(results.values())))
    print(f"{'sequence':<20} {'points':>6} " + " ".join(f"PCK@{a:<4}" for a in alphas))
    for seq, counts in results.items():
        print(f"{seq:<20} {counts[alphas[0]][1]:>6} " + " ".join(f"{c / max(t, 1):8.3f}" for c, t in counts.values()))
    mean = {a: sum(r[a][0] for r in results.values()) / max(sum(r[a][1] for r in results.values()), 1) for a in alphas}
    print("  ".join(f"PCK@{a} {v:.3f}" for a, v in mean.items()))
    return mean


# ----------------------------------------------------------------------------------------------------------------
# CLI


def main_davis(root: Path, predictions: Path | None, out: Path | None, csv_path: Path | None,
               sequences: list[str] | None, args: argparse.Namespace) -> dict[str, float]:
    sequences = sequences or read_sequences(root)
    if predictions is None:
        if out is None:
            raise ValueError("give --predictions DIR to score, or --out DIR to propagate and score")
        propagate_davis(root, out, sequences, args)
        predictions = out
    results = score_davis(root, predictions, sequences)
    return report_davis(results, csv_path or Path(predictions) / "scores.csv")


def main_points(pred_dir: Path, gt_dir: Path) -> dict[float, float]:
    return report_points(score_points(pred_dir, gt_dir))


def build_parser(propagation: bool = True) -> argparse.ArgumentParser:
    """The CLI; `propagation=False` leaves out propagate.py's options (and its torch import) when only scoring."""
    parser = cmdline.Parser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)  # subparsers are cmdline.Parser too: one-line errors
    davis = sub.add_parser("davis", help="J, F, J&F on a DAVIS-layout folder")
    add = davis.add_argument
    add("root", type=cmdline.existing_folder, help="JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt")
    add("--predictions", type=cmdline.existing_folder, help="score DIR/<seq>/%%05d.png instead of propagating")
    add("--out", type=cmdline.output_folder, help="where propagation writes DIR/<seq>/%%05d.png")
    add("--overwrite", action="store_true", help="replace predictions already in --out")
    add("--csv", type=cmdline.output_file, help="per-object scores (default: <predictions>/scores.csv)")
    add("--sequences", nargs="+", help="default: every sequence of ImageSets/2017/val.txt")
    add("--checkpoint", type=cmdline.existing_file, help="encoder weights for propagation (default: the shipped ones)")
    add("--device", type=cmdline.device, default="auto",
        help="auto | cpu | cuda (default: cuda when available, else cpu)")
    if propagation:  # --protocol, --features, --radius, ...
        import propagate
        propagate.add_propagation_args(davis)
    grid = sub.add_parser("grid", help="J&F (and PCK) of many propagation settings, each frame encoded once")
    add = grid.add_argument
    add("root", type=cmdline.existing_folder, help="a DAVIS-layout folder, as for davis")
    add("--configs", type=cmdline.existing_file, required=True,
        help="JSON {name: {setting: value}} of PropagationConfig fields")
    add("--out", type=cmdline.output_file, required=True,
        help="the CSV, one row per setting (rewritten after each sequence)")
    add("--sequences", nargs="+", help="default: every sequence of ImageSets/2017/val.txt")
    add("--keypoints", type=cmdline.existing_folder,
        help="keypoint JSONs: sequences that have one are tracked and scored (PCK) too")
    add("--checkpoint", type=cmdline.existing_file, help="encoder weights (default: the shipped ones)")
    add("--device", type=cmdline.device, default="auto", help="auto | cpu | cuda")
    points = sub.add_parser("points", help="PCK@0.1 and PCK@0.2 of keypoint JSONs")
    points.add_argument("predictions", type=cmdline.existing_folder, help="folder of <sequence>.json")
    points.add_argument("--gt", type=cmdline.existing_folder, required=True, help="ground-truth keypoint JSONs")
    return parser


def cli(argv=None) -> dict:
    """The command line: parse, score; an expected failure (bad input, unreadable file) is one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    only_scoring = argv[:1] != ["davis"] or any(a.startswith("--predictions") for a in argv)
    args = build_parser(propagation=not only_scoring).parse_args(argv)
    try:
        if args.task == "davis":
            return main_davis(args.root, args.predictions, args.out, args.csv, args.sequences, args)
        if args.task == "grid":
            import grid  # torch and propagation: only here
            return grid.run_grid(args.root, grid.read_grid(args.configs), args.sequences or read_sequences(args.root),
                                 args.checkpoint, args.device, args.out, args.keypoints)
        return main_points(args.predictions, args.gt)
    except (ValueError, OSError) as e:
        cmdline.fail(e)


if __name__ == "__main__":
    cli()
