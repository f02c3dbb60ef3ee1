"""`evaluate.py grid`: J&F (and PCK) of many propagation settings on the same DAVIS sequences.

A grid file maps names to propagation settings (PropagationConfig's fields), e.g.
    {"lab": {"features": "lab"}, "model top-10": {"topk": 10, "normalize": true, "temperature": 0.05}}
Each sequence is read once and each frame encoded once per scale (`CachedEmbed`); every setting is then propagated
and scored in memory by evaluate.py's rules (nothing but the CSV is written). With --keypoints, the sequences that
have a keypoint JSON are also tracked and scored (PCK).
"""
import dataclasses
import json
import time
from pathlib import Path

import imageio.v3 as iio
import torch

from evaluate import pck_counts, read_annotation, score_masks, sequence_frames, summarise, write_csv_atomic
from media import all_joints, json_points, read_json, read_points
from model import load_encoder
from propagate import PropagationConfig, propagate_masks, propagate_points


class CachedEmbed:
    """An encoder's embed with a cache keyed by the input's bytes: a grid encodes each frame once per scale."""

    def __init__(self, embed):
        self.embed, self.cache = embed, {}

    def __call__(self, rgb):
        key = (tuple(rgb.shape), hash(rgb.cpu().numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = self.embed(rgb)
        return self.cache[key]


def read_grid(path: Path) -> dict:
    """A grid JSON -> {name: PropagationConfig}; a bad file or an unknown setting is one line naming it."""
    grid = read_json(path)
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, dict) for v in grid.values()):
        raise ValueError(f"{path}: expected {{name: {{setting: value}}}}")
    fields = {f.name for f in dataclasses.fields(PropagationConfig)}
    configs = {}
    for name, settings in grid.items():
        unknown = set(settings) - fields
        if unknown:
            raise ValueError(f"{path}: '{name}' has unknown settings {sorted(unknown)} (known: {sorted(fields)})")
        configs[name] = PropagationConfig(**settings)
    return configs


def run_grid(root: Path, configs: dict, sequences: list[str], checkpoint, device: str, out_csv: Path,
             keypoints: Path | None = None) -> dict[str, dict[str, float]]:
    """Propagate and score every setting of `configs` on every sequence; print a table, write one CSV row per
    setting (J&F, J, F, per-sequence J&F, PCK when --keypoints, seconds per frame with the features cached),
    rewritten after each sequence over the sequences done so far."""
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device)
    kinds = sorted({(part, cfg.precision) for cfg in configs.values() for part in cfg.features.split("+")})
    cached = {}  # ("model" / "lab", precision) -> its Encoder, embed cached
    for kind, precision in kinds:
        (encoder,) = load_encoder(checkpoint, kind, dev, precision)
        encoder.embed = CachedEmbed(encoder.embed)
        cached[kind, precision] = encoder
    results = {name: {} for name in configs}  # name -> {sequence: per-object scores}
    points = {name: {} for name in configs}  # name -> {sequence: {alpha: (correct, scored)}}
    seconds = {name: 0.0 for name in configs}
    n_frames = 0
    gt_root = Path(root) / "Annotations" / "480p"
    for seq in sequences:
        frame_paths = sequence_frames(root, seq)
        frames = [iio.imread(p) for p in frame_paths]
        gts = [read_annotation(gt_root / seq / f"{p.stem}.png") for p in frame_paths]
        gt_points = Path(keypoints) / f"{seq}.json" if keypoints else None
        n_frames += len(frames)
        for name, cfg in configs.items():
            encoders = [cached[kind, cfg.precision] for kind in cfg.features.split("+")]
            t0 = time.perf_counter()
            masks = list(propagate_masks(frames, gts[0], cfg, encoders, dev))
            seconds[name] += time.perf_counter() - t0
            results[name][seq] = score_masks(((f"{seq}/{p.stem}", m) for p, m in zip(frame_paths, masks)), gts)
            if gt_points is not None and gt_points.is_file():
                _, start, xy, visible = read_points(gt_points)
                tracks = propagate_points(frames[start:], xy[visible], cfg, encoders, dev)
                pred = {"frames": list(range(start, len(frames))),
                        "xy": [json_points(all_joints(t, visible)) for t in tracks]}
                points[name][seq] = {a: pck_counts(pred, read_json(gt_points), a) for a in (0.1, 0.2)}
        for encoder in cached.values():
            encoder.embed.cache.clear()
        print(f"{seq}: {len(configs)} settings", flush=True)
        done = sequences[:sequences.index(seq) + 1]
        rows, summary = _grid_table(configs, done, results, points, seconds, n_frames)
        write_csv_atomic(out_csv, rows)  # after every sequence: a run cut short keeps the sequences it finished
    print(f"{'setting':<32} {'J&F':>6} {'J':>6} {'F':>6}  " + " ".join(f"{q[:8]:>8}" for q in sequences)
          + "  PCK@0.1 PCK@0.2  s/frame")
    for name, row in zip(configs, rows[1:]):
        total, pck, per_frame = summary[name], [summary[name][f"PCK@{a}"] for a in (0.1, 0.2)], float(row[-2])
        print(f"{name:<32} {total['J&F']:6.3f} {total['J-Mean']:6.3f} {total['F-Mean']:6.3f}  "
              + " ".join(f"{float(v):8.3f}" for v in row[4:4 + len(sequences)])
              + f"  {pck[0]:7.3f} {pck[1]:7.3f}  {per_frame:7.2f}")
    return summary


def _grid_table(configs, sequences, results, points, seconds, n_frames):
    """The grid's CSV rows (header first) over `sequences`, and each setting's J&F, J, F and PCK."""
    header = ["setting", "J&F", "J", "F", *sequences, "PCK@0.1", "PCK@0.2", "s/frame (features cached)", "config"]
    rows, summary = [header], {}
    for name, cfg in configs.items():
        total = summarise({q: results[name][q] for q in sequences})
        per_seq = [summarise({q: results[name][q]})["J&F"] for q in sequences]
        pck_mean = {a: (sum(r[a][0] for r in points[name].values()) / sum(r[a][1] for r in points[name].values())
                        if points[name] else float("nan")) for a in (0.1, 0.2)}
        summary[name] = {**total, **{f"PCK@{a}": v for a, v in pck_mean.items()}}
        per_frame = seconds[name] / max(n_frames, 1)
        rows.append([name, *(f"{total[k]:.4f}" for k in ("J&F", "J-Mean", "F-Mean")), *(f"{v:.4f}" for v in per_seq),
                     f"{pck_mean[0.1]:.4f}", f"{pck_mean[0.2]:.4f}", f"{per_frame:.3f}",
                     json.dumps({k: v for k, v in vars(cfg).items()})])
    return rows, summary


