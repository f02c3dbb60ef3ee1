"""Propagate the first frame's object masks (or keypoints) through a video by copying labels with restricted attention.

    python propagate.py VIDEO MASK.png [--out DIR]      # VIDEO: a video file or a folder of frames
    python propagate.py VIDEO POINTS.json [--out DIR]   # keypoints, in the layout of data/keypoints/*.json
    python propagate.py VIDEO MASK.png --features lab   # no learning: raw Lab colour as the features
    python propagate.py VIDEO MASK.png --frames 30      # only the first 30 frames

Every frame is encoded once at stride 4. Its labels are copied from the references: the first frame with its true
labels and the N most recent frames with their predicted labels, through one softmax over all candidates of each
position: a (2 * radius + 1)^2 window of every reference (the first frame's may be wider), or only the top-k of them
by score (`kernels.local_attention`). Only the references are kept, so memory does not grow with the video's length.
The logits are <q, k> / T of the model's features (raw, or L2-normalised), -|q - k|^2 / T of Lab colour, or the sum
of the two (`model+lab`). `--protocol corrflow` is the paper's protocol; the default is the best setting measured on
DAVIS (PROTOCOLS). On a GPU the encoder runs in bf16 and the references are kept in fp16, which the fused kernels
multiply exactly and sum in fp32; on a CPU with bf16 units the encoder runs in bf16 (`--precision`).
Outputs (media.Results): one palette PNG per frame (00000.png ..., first frame included) or points.json, and an
overlay video. SIGTERM, SIGINT or SIGHUP stop it after the frame under way, every frame before it written.
"""
import argparse
import contextlib
import itertools
import signal
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli as cmdline  # the module; `cli` below is this file's entry point
from kernels import local_attention
from media import (Results, check_points_inside, count_frames, davis_palette, prepare_out_dir, read_frames,
                   read_mask, read_points, video_fps)
from model import (DEFAULT_CHECKPOINT, FEATURES, STRIDE, Encoder, downsample_labels, gaussian_heatmaps, hard_labels,
                   label_argmax, load_encoder, locate_points, scaled_size, to_frame, to_grid, to_tensor)
from stopping import StopSignals

NORMALIZED_TEMPERATURE = 0.05  # the model's temperature when its features are L2-normalised (README)
LAB_TEMPERATURE = 0.0007  # Lab colour's temperature (squared distances), chosen with model.LAB_LIGHTNESS_WEIGHT
PRECISIONS = ("auto", "fp16", "fp32")  # --precision (`storage_dtype`, model.encoder_in_bf16)


@dataclass
class PropagationConfig:
    features: str = "model+lab"  # "model": a checkpoint's CorrFlow encoder; "lab": raw Lab colour; "model+lab": both
    radius: int = 8  # window radius at stride 4: (2r+1)^2 = 17x17 candidates per reference (CorrFlow: 6)
    first_radius: Optional[int] = 12  # the first frame's window radius (25x25); None: `radius` (CorrFlow)
    topk: int = 10  # > 0: the softmax runs over the k best-scoring candidates of all references only; 0: all of them
    temperature: Optional[float] = None  # the model's; None: 1.0 (raw features), NORMALIZED_TEMPERATURE (normalised)
    normalize: bool = True  # L2-normalise the model's features, so that logits are cosines / temperature (CorrFlow: no)
    lab_temperature: Optional[float] = None  # Lab colour's temperature of the squared distances; None: LAB_TEMPERATURE
    use_first: bool = True  # the first frame and its true labels stay a reference throughout (CorrFlow: no)
    num_recent: int = 3  # N most recent frames, with their predicted labels, as references (CorrFlow: 1)
    soft_labels: bool = True  # feed back probabilities; False: the full-resolution argmax (CorrFlow)
    scale: float = 1.0  # encode at this fraction of the size (0.5: 1/4 of the FLOPs, windows span 2x the motion)
    precision: str = "auto"  # "fp32", "fp16" or "auto": the encoder's and the references' arithmetic


PROTOCOLS = {
    # PropagationConfig's own values, the best measured on DAVIS (README, chosen on half A): the model's normalised
    # features plus Lab colour, top 10 of the candidates of the first frame (radius 12) and 3 recent frames (radius 8),
    # soft labels; J&F A 0.665 / B 0.718 with the shipped checkpoint
    "default": dict(),
    # Lai & Xie 2019: the model's features, raw dot products (temperature 1), previous frame only, its hard argmax,
    # radius 6, all candidates
    "corrflow": dict(features="model", radius=6, first_radius=None, topk=0, use_first=False, num_recent=1,
                     soft_labels=False, normalize=False),
}


def storage_dtype(cfg: PropagationConfig, device: torch.device) -> torch.dtype:
    """The dtype references are kept and compared in: fp16 with "fp16", and with "auto" on a GPU (the fused kernels
    take model+lab's 68 channels only in 16 bits, fp32 above 64 spilling registers; fp16's 11 mantissa bits leave the
    measured J&F unchanged (README), bf16's 8 would not do for Lab's squared distances); fp32 otherwise."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{cfg.precision}' (choose {', '.join(PRECISIONS)})")
    return torch.float16 if cfg.precision == "fp16" or (cfg.precision == "auto" and device.type != "cpu") \
        else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Propagation


def temperatures(cfg: PropagationConfig, encoders: list[Encoder]) -> list[float]:
    """The softmax temperature of each encoder's logits: Lab's (squared distances) and the model's."""
    if cfg.temperature is not None and all(e.squared_distance for e in encoders):
        raise ValueError("the temperature is the model features'; Lab colour's is lab_temperature (--lab-temperature)")
    model_default = NORMALIZED_TEMPERATURE if cfg.normalize else 1.0  # CorrFlow: raw dot products
    model = cfg.temperature if cfg.temperature is not None else model_default
    lab = cfg.lab_temperature if cfg.lab_temperature is not None else LAB_TEMPERATURE
    return [lab if e.squared_distance else model for e in encoders]


def ahead(fn: Callable, items: Iterable) -> Iterator:
    """fn(item) for each item, each taken and computed in a worker thread while the caller works on the one before:
    the next frame is read and encoded while this one's labels are copied, so the encoder's work fills the cores the
    copy leaves idle (BENCHMARKS.md). An error is raised where its item's result would have come."""
    items, end = iter(items), object()

    @torch.inference_mode()
    def step():
        item = next(items, end)
        return end if item is end else fn(item)

    with ThreadPoolExecutor(1) as worker:
        job = worker.submit(step)
        while (result := job.result()) is not end:
            job = worker.submit(step)
            yield result


@torch.inference_mode()
def _propagate(first: np.ndarray, frames: Iterator[np.ndarray], first_labels: torch.Tensor, cfg: PropagationConfig,
               encoders: list[Encoder], device: torch.device) -> Iterator[torch.Tensor]:
    """The loop. Yields label probabilities (1, K, H'/4, W'/4) at stride 4 per frame, the first frame's own first."""
    if cfg.num_recent < (0 if cfg.use_first else 1):
        raise ValueError("no references: keep the first frame or use --num-recent of at least 1")
    temps = temperatures(cfg, encoders)
    dtype = storage_dtype(cfg, device)
    # the op's inputs: on a GPU the stored dtype itself (the fused kernels multiply 16-bit values exactly and sum in
    # fp32); on the CPU fp32, which computes the same from the rounded values
    op_dtype = dtype if device.type != "cpu" else torch.float32

    def encode(frame: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) whose dot product is the summed logits of every encoder: each query divided by its
        temperature, the parts concatenated along channels; both rounded to the stored dtype."""
        if frame.shape != first.shape:
            raise ValueError(f"frame size changed from {first.shape[1]}x{first.shape[0]} "
                             f"to {frame.shape[1]}x{frame.shape[0]}")
        rgb = to_tensor(frame, device, cfg.scale)
        pairs = [e(rgb, cfg.normalize) for e in encoders]
        query = torch.cat([q / t for (q, _), t in zip(pairs, temps)], 1).to(dtype)
        key = torch.cat([k for _, k in pairs], 1).to(dtype)
        # a value past fp16's range became inf (meta tensors, which the compile check runs, hold no values)
        if dtype == torch.float16 and not query.is_meta and (query.isinf().any() | key.isinf().any()):  # one sync
            raise ValueError("features divided by their temperature exceed fp16's range (65504): use a higher "
                             "temperature or --precision fp32")
        return query, key

    nxt = next(frames, None)  # look one frame ahead so that a one-frame video fails before any output
    if nxt is None:
        raise ValueError("the video has a single frame: nothing to propagate")
    _, first_key = encode(first)  # (1, C, h, w)
    first_labels = first_labels.to(dtype)
    recent = deque(maxlen=cfg.num_recent)  # (key (1, C, h, w), labels (1, K, h, w)) of the last N frames
    if not cfg.use_first:
        recent.append((first_key, first_labels))
    yield first_labels
    for query, key in ahead(encode, itertools.chain([nxt], frames)):  # (1, C, h, w) each
        refs = ([(first_key, first_labels)] if cfg.use_first else []) + list(recent)  # at most N + 1
        ref_keys = torch.stack([k for k, _ in refs], 1)  # (1, R, C, h, w)
        ref_labels = torch.stack([v for _, v in refs], 1)  # (1, R, K, h, w)
        first_radius = cfg.radius if cfg.first_radius is None else cfg.first_radius
        radii = [first_radius] * cfg.use_first + [cfg.radius] * len(recent)
        probs = local_attention(*(t.to(op_dtype) for t in (query, ref_keys, ref_labels)), radii, 1.0,
                                cfg.topk).float()  # (1, K, h, w)
        if cfg.num_recent > 0:
            recent.append((key, (probs if cfg.soft_labels else hard_labels(probs)).to(dtype)))
        yield probs


def object_ids(mask: np.ndarray) -> np.ndarray:
    """The object ids of a label map, background 0 excluded; ValueError when there is none."""
    ids = np.unique(mask[mask != 0])
    if len(ids) == 0:
        raise ValueError("the first-frame mask has no object (every pixel is background 0)")
    if ids.max() > 255:
        raise ValueError("object ids above 255 do not fit a palette PNG")
    return ids


def propagate_masks(frames: Iterable[np.ndarray], first_mask: np.ndarray, cfg: PropagationConfig,
                    encoders: list[Encoder], device: torch.device) -> Iterator[np.ndarray]:
    """Frames (H, W, 3) uint8 RGB and the first frame's object ids (H, W) -> one (H, W) uint8 id map per frame.

    Any ids: they become channels 1..N (background channel 0) and are mapped back on output. Streams: reads one frame
    ahead and keeps only the references.
    """
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("the video has no frames")
    H, W = first.shape[:2]
    if first_mask.shape != (H, W):
        raise ValueError(f"mask is {first_mask.shape[1]}x{first_mask.shape[0]} but the frames are {W}x{H}")
    ids = object_ids(first_mask)
    lut = np.concatenate([[0], ids]).astype(np.uint8)  # channel -> object id
    channels = np.searchsorted(lut, first_mask)  # (H, W) channel index; lut is sorted as ids are
    one_hot = F.one_hot(torch.from_numpy(channels).to(device), len(lut)).permute(2, 0, 1)[None].float()
    first_labels = downsample_labels(to_grid(one_hot, cfg.scale))  # (1, K, H'/4, W'/4), soft at object borders
    for i, probs in enumerate(_propagate(first, frames, first_labels, cfg, encoders, device)):  # argmax at full size
        yield lut[label_argmax(to_frame(probs, H, W, cfg.scale)[0]).cpu().numpy()] if i else first_mask.astype(np.uint8)


def propagate_points(frames: Iterable[np.ndarray], first_points: np.ndarray, cfg: PropagationConfig,
                     encoders: list[Encoder], device: torch.device) -> Iterator[np.ndarray]:
    """Frames and the first frame's points (J, 2) pixel (x, y) -> (J, 2) per frame, the first frame's included.

    Heat maps are always fed back soft: an argmax over the joints' channels would erase them.
    """
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("the video has no frames (or none from the first labelled frame on)")
    H, W = first.shape[:2]
    Hs, Ws = scaled_size(H, W, cfg.scale)
    to_scaled = np.array([Ws / W, Hs / H])  # pixel (x, y) of the frame -> of the encoded frame
    h, w = -(-Hs // STRIDE), -(-Ws // STRIDE)
    first_labels = gaussian_heatmaps(np.asarray(first_points) * to_scaled, h, w, device)  # (1, J, h, w)
    cfg = replace(cfg, soft_labels=True)
    for i, heatmaps in enumerate(_propagate(first, frames, first_labels, cfg, encoders, device)):
        yield np.asarray(first_points, dtype=np.float64) if i == 0 else locate_points(heatmaps) / to_scaled


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(video: Path, labels: Path, out: Optional[Path], cfg: PropagationConfig, checkpoint: Optional[Path],
         device: str = "auto", overlay: bool = True, overwrite: bool = False, frames: Optional[int] = None) -> Path:
    """Propagate a mask PNG or a keypoint JSON through a video (its first `frames` frames from the first labelled
    one, if given); returns the output folder. SIGTERM, SIGINT or SIGHUP stop it after the frame under way: the
    process exits with 128 + the signal's number (143, 130, 129); an error on the way says how many frames were
    written."""
    points_mode = labels.suffix.lower() == ".json"
    if points_mode:
        sequence, start, xy, visible = read_points(labels)
        palette = davis_palette()
    else:
        first_mask, palette = read_mask(labels)
        try:
            object_ids(first_mask)
        except ValueError as e:
            raise ValueError(f"{labels}: {e}") from None
        palette, start = palette or davis_palette(), 0
    stem = video.stem if video.suffix else video.name
    out = out or Path(f"{stem}_{'points' if points_mode else 'masks'}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    encoders = load_encoder(checkpoint, cfg.features, dev, cfg.precision)
    total = max(0, count_frames(video) - start)  # also fails early on a missing or unreadable video
    # the first frame's size checks the labels before anything is written
    first = next(read_frames(video, [start]), None) if total else None
    if first is None and start:
        raise ValueError(f"{labels}: its first labelled frame ({start}) is past the end of {video}")
    if first is None:
        raise ValueError(f"{video}: no frames")
    if total < 2:
        raise ValueError(f"{video}: a single frame, nothing to propagate")
    total = min(total, frames or total)
    H, W = first.shape[:2]
    if points_mode:
        check_points_inside(labels, xy, visible, W, H)
    elif first_mask.shape != (H, W):
        raise ValueError(f"{labels}: mask is {first_mask.shape[1]}x{first_mask.shape[0]} but the frames are {W}x{H}")
    prepare_out_dir(out, overwrite)

    shown = deque()  # the frames read (by propagation's worker thread too) and not yet written

    def inputs():
        for frame in itertools.islice(read_frames(video), start, start + total):
            shown.append(frame)
            yield frame

    results = (propagate_points(inputs(), xy[visible], cfg, encoders, dev) if points_mode
               else propagate_masks(inputs(), first_mask, cfg, encoders, dev))
    writer = Results(out, palette, video_fps(video) if overlay else None,
                     (sequence, start, visible) if points_mode else None)
    with StopSignals() as stop, writer:
        try:
            for result in tqdm(results, total=total, unit="frame", desc=stem):
                writer.add(shown.popleft(), result)  # written by a thread while the next frame is computed
                if stop.received:
                    break
            writer.wait()
        except (ValueError, OSError) as e:
            with contextlib.suppress(ValueError, OSError):
                writer.wait()  # the frame before the error is written all the same
            raise ValueError(f"{e} ({writer.count} of {total} frames written to {out})") from None
    done = f"{writer.count} of {total} frames written to {out}"
    if stop.received:  # one line, and the exit status a shell reports for a process ended by that signal
        print(f"stopped by {signal.Signals(stop.received).name}: {done}; to go on, run the command again with "
              "--overwrite (it starts again from the first frame; --frames N for part of the video)", file=sys.stderr)
        sys.exit(128 + stop.received)
    print(f"{stem}: {done}" + (" (and overlay.mp4)" if overlay else ""))
    return out


def add_propagation_args(parser: argparse.ArgumentParser) -> None:
    """Propagation options (PropagationConfig): --protocol picks a preset; the other flags, when given, override it."""
    add = parser.add_argument
    add("--protocol", choices=sorted(PROTOCOLS), default="default",
        help="default: model+lab features, top 10 of the candidates of the first frame (radius 12) and 3 recent "
             "frames (radius 8), soft labels; corrflow: the paper's (model features, previous frame, hard labels, "
             "radius 6)")
    add("--features", choices=FEATURES, help="model: the CorrFlow encoder; lab: raw Lab colour, no learning; "
        "model+lab: one softmax over the sum of both logits (preset: model+lab; corrflow: model)")
    add("--radius", type=cmdline.integer(0, 64), help="attention window radius at stride 4, 0..64 (preset: 8; "
        "corrflow: 6)")
    add("--first-radius", type=cmdline.integer(0, 64),
        help="the first frame's window radius, 0..64 (preset: 12; corrflow: --radius)")
    add("--topk", type=cmdline.integer(0, 4096), help="softmax over the k best-scoring candidates of all references "
        "only; 0: all (preset: 10; corrflow: 0)")
    add("--num-recent", type=cmdline.integer(0, 100), help="number of recent frames used as references, 0..100 "
        "(preset: 3)")
    add("--normalize", action=argparse.BooleanOptionalAction, default=None,
        help="L2-normalise the model's features (preset: yes; corrflow: no)")
    add("--temperature", type=cmdline.real(above=0),
        help=f"the model features' softmax temperature, > 0 (raw: 1.0, normalised: {NORMALIZED_TEMPERATURE})")
    add("--lab-temperature", type=cmdline.real(above=0),
        help=f"Lab colour's softmax temperature, > 0 (default: {LAB_TEMPERATURE})")
    add("--no-first", action="store_true", help="do not keep the first frame as a reference")
    add("--hard-labels", action="store_true", help="feed back the argmax (taken at full resolution), not probabilities")
    add("--precision", choices=PRECISIONS, help="fp16: the encoder in bf16, the references kept and compared in fp16 "
        "(fp32 sums of 16-bit values); fp32: both in fp32; auto: fp16 on a GPU, and on a CPU fp32 references with the "
        "encoder in bf16 where a probe finds it faster (default: auto)")
    add("--scale", type=cmdline.real(0.1, 1), help="encode frames at this fraction of their size, 0.1..1 (about "
        "scale^2 of the time); outputs stay at full size (default: 1)")


def config_from_args(args: argparse.Namespace) -> PropagationConfig:
    """The protocol's preset, then every explicitly given flag on top of it."""
    cfg = PropagationConfig(**PROTOCOLS[args.protocol])
    for field in ("features", "radius", "first_radius", "topk", "num_recent", "normalize", "temperature",
                  "lab_temperature", "scale", "precision"):  # the flags named as the fields
        if getattr(args, field) is not None:
            cfg = replace(cfg, **{field: getattr(args, field)})
    cfg = replace(cfg, use_first=False) if args.no_first else cfg
    if cfg.features == "lab":
        cfg = replace(cfg, normalize=False)  # the model's option: raw colour has nothing to normalise
    if cfg.features == "lab" and (cfg.temperature is not None or args.normalize):
        raise ValueError("--temperature and --normalize are the model features'; with --features lab use "
                         "--lab-temperature")
    if cfg.num_recent == 0 and not cfg.use_first:
        raise ValueError("--num-recent 0 without the first frame (--no-first, or --protocol corrflow) leaves no "
                         "reference: keep the first frame or use --num-recent of at least 1")
    return replace(cfg, soft_labels=False) if args.hard_labels else cfg


def build_parser() -> argparse.ArgumentParser:
    parser = cmdline.Parser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("video", type=cmdline.existing_path, help="a video file or a folder of JPEG/PNG frames")
    add("labels", type=cmdline.existing_file, help="first-frame mask PNG (palette, grey ids or binary) or points JSON")
    add("--out", type=cmdline.output_folder, help="output folder (default: ./<video stem>_masks or _points)")
    add("--checkpoint", type=cmdline.existing_file,
        help=f"encoder weights (default: {DEFAULT_CHECKPOINT.name} in checkpoints/)")
    add("--device", type=cmdline.device, default="auto", help="auto | cpu | cuda (default: auto)")
    add("--no-overlay", action="store_true", help="skip overlay.mp4")
    add("--overwrite", action="store_true", help="replace the results already in --out")
    add("--frames", type=cmdline.integer(2), help="propagate only the first N frames, N >= 2, from the first "
        "labelled one (default: all)")
    add_propagation_args(parser)
    return parser


def cli(argv=None) -> Optional[Path]:
    """The command line: parse, propagate; an expected failure (bad input, unreadable file) is one line."""
    args = build_parser().parse_args(argv)
    try:
        return main(args.video, args.labels, args.out, config_from_args(args), args.checkpoint, args.device,
                    overlay=not args.no_overlay, overwrite=args.overwrite, frames=args.frames)
    except (ValueError, OSError) as e:
        cmdline.fail(e)


if __name__ == "__main__":
    cli()
