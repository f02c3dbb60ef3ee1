"""The CorrFlow encoder, the copy step it is trained and used through, and the features propagation compares.

The encoder is a ResNet-18 variant with output stride 4: conv1 7x7 stride 2, no max-pool, layer2 stride 2,
layers 3 and 4 at stride 1, then a 3x3 conv down to 64 feature channels. Features are not normalised.
The copy step is restricted attention: every target position attends to a (2M+1)^2 window of each reference's
features and takes the softmax-weighted sum of the references' labels (see `kernels/local_attention.py`).
Propagation (propagate.py) puts frames on the encoder's stride-4 grid (`to_tensor`) and compares them through
`Encoder`s: the trained encoder's features, raw Lab colour, or both.
"""
import contextlib
import copy
import functools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import rgb_to_lab
from files import atomic_write
from kernels import local_attention

STRIDE = 4  # feature map stride of the encoder; labels are averaged down to this stride
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "corrflow.pt"  # the shipped weights
FEATURES = ("model", "lab", "model+lab")  # what propagation compares frames by (`load_encoder`)
LAB_LIGHTNESS_WEIGHT = 1.0  # lightness against colour in `lab_features`: the best of a grid on DAVIS (README)
POINT_SIGMA = 1.0  # std of a keypoint's Gaussian heat map, in stride-4 cells (= 4 pixels of the frame)
POINT_TOPK = 5  # a point's location: probability-weighted mean of its 5 most probable stride-4 cells


@dataclass
class ModelConfig:
    feat_dim: int = 64  # output feature channels (CorrFlow: 64)
    widths: tuple = (64, 128, 256, 256)  # channels of ResNet layers 1-4 (CorrFlow: layer4 kept at 256)
    radius: int = 6  # training window radius M: a (2M+1)^2 = 13x13 window (CorrFlow: 6)
    temperature: float = 1.0  # softmax temperature of the copy (CorrFlow: raw dot products, i.e. 1)


def model_config(saved: dict) -> ModelConfig:
    """A ModelConfig from its dict as checkpoints store it (tuples come back from torch.load as lists)."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class CorrFlow(nn.Module):
    """RGB in [0, 1], (B, 3, H, W) with H, W multiples of 4 -> features (B, feat_dim, H/4, W/4)."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        w1, w2, w3, w4 = config.widths
        self.stem = nn.Sequential(nn.Conv2d(3, w1, 7, 2, 3, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(w1, w1, 1), BasicBlock(w1, w1, 1))
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, 2), BasicBlock(w2, w2, 1))  # stride 4 from here on
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, 1), BasicBlock(w3, w3, 1))
        self.layer4 = nn.Sequential(BasicBlock(w3, w4, 1), BasicBlock(w4, w4, 1))
        self.head = nn.Conv2d(w4, config.feat_dim, 3, 1, 1, bias=True)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.stem(rgb)  # (B, 64, H/2, W/2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 256, H/4, W/4)
        return self.head(x)  # (B, feat_dim, H/4, W/4)


def encode(model: CorrFlow, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Frames (N, 3, H, W) -> features (N, feat_dim, H/4, W/4); with `bf16` the encoder runs in bf16 autocast,
    channels-last (convert the model with `.to(memory_format=torch.channels_last)` once). On the CPU the features
    come back in fp32: what follows them there (the PyTorch CPU path's copy, the loss) stays fp32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        feats = model(x.contiguous(memory_format=torch.channels_last if bf16 else torch.contiguous_format))
    return feats.float() if x.device.type == "cpu" else feats


# the bf16 probe's frame size, for training's forward+backward and for propagation's forward: about a second each,
# with the answer the probe gives at 256 on the CPUs measured (at 32 a forward alone is too short to time)
PROBE_SIZE = {True: 32, False: 64}


def bf16_faster(model: CorrFlow, size: int, backward: bool) -> tuple[bool, float, float]:
    """Whether this CPU runs the encoder at least 10% faster in bf16 autocast (channels-last) than in fp32: both
    timed on 2 frames of size x size (forward, and backward when `backward`), the better of 2 runs after a warm-up
    -> (faster, fp32 seconds, bf16 seconds). CPUs with bf16 units (AVX512-BF16, AMX) run it about twice as fast;
    on others bf16 is emulated and slower, which its first timed run shows: the probe stops there."""
    model = copy.deepcopy(model).cpu()  # the probe must not move the real model's BatchNorm statistics or layout
    x = torch.rand(2, 3, size, size)
    best = {}
    for bf16 in (False, True):
        net = model.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
        laps = []
        for _ in range(3):
            t = time.perf_counter()
            with torch.set_grad_enabled(backward):
                feats = encode(net, x, bf16)
                if backward:
                    feats.sum().backward()
            laps.append(time.perf_counter() - t)
            if bf16 and len(laps) == 2 and laps[1] >= 0.9 * best[False]:  # already not faster: no third run
                break
        best[bf16] = min(laps[1:])
    return best[True] < 0.9 * best[False], best[False], best[True]


def _probe_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "corrflow" / "bf16_probe.json"


def _cpu_key(backward: bool) -> str:
    """What the probe's answer depends on: the CPU model, the instructions torch uses on it, torch's version."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__} | " + (
        "forward+backward" if backward else "forward")


def probe_bf16(backward: bool) -> tuple[bool, float, float, bool]:
    """`bf16_faster` of the encoder at PROBE_SIZE[backward], measured once per CPU model and torch version and kept in
    ~/.cache/corrflow/bf16_probe.json ($XDG_CACHE_HOME): (faster, fp32 s, bf16 s, from the cache). An unreadable
    cache is measured over; one that cannot be written is only not kept."""
    path, key = _probe_cache(), _cpu_key(backward)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    cached = cached if isinstance(cached, dict) else {}
    with contextlib.suppress(KeyError, TypeError, ValueError):
        hit = cached[key]
        return bool(hit["bf16_faster"]), float(hit["fp32_s"]), float(hit["bf16_s"]), True
    with torch.random.fork_rng(devices=[]):  # the probe's weights and frames leave the run's random stream as it was
        faster, t32, t16 = bf16_faster(CorrFlow(), PROBE_SIZE[backward], backward)
    cached[key] = {"bf16_faster": faster, "fp32_s": t32, "bf16_s": t16}
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(cached, f, indent=1)
    return faster, t32, t16, False


def encoder_in_bf16(precision: str, device: torch.device, backward: bool = False, report=None) -> bool:
    """The one precision rule of training and propagation: whether the encoder runs in bf16 autocast.
    "fp32": no; "bf16" or "fp16" (propagate.py's name for it): yes; "auto": yes on a GPU, and on a CPU where the
    (cached) probe finds bf16 at least 10% faster for this work (`backward`: training's forward and backward).
    `report`, when given, gets one line on the probe's numbers."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"unknown precision '{precision}' (choose auto, bf16, fp16 or fp32)")
    if precision != "auto" or torch.device(device).type != "cpu":
        return precision != "fp32"
    faster, t32, t16, cached = probe_bf16(backward)
    if report is not None:
        work = "forward+backward" if backward else "forward"
        size = PROBE_SIZE[backward]
        report(f"bf16 probe ({'cached' if cached else 'measured'}): encoder {work} of 2 frames at "
               f"{size}x{size}: fp32 {t32 * 1e3:.0f} ms, bf16 {t16 * 1e3:.0f} ms: bf16 is "
               f"{'' if faster else 'not '}faster")
    return faster


def downsample_labels(labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel label channels (B, K, H, W) -> (B, K, H/4, W/4) by averaging each 4x4 cell (soft one-hots)."""
    return F.avg_pool2d(labels, STRIDE)


def copy_labels(query_feats, ref_feats, ref_labels, radius, temperature=1.0):
    """The copy step: labels of the query frame predicted from R reference frames, all at stride 4.

    query_feats (B, C, h, w), ref_feats (B, R, C, h, w), ref_labels (B, R, K, h, w) -> (B, K, h, w).
    One softmax runs jointly over the R x (2*radius+1)^2 candidates of each query position.
    """
    return local_attention(query_feats, ref_feats, ref_labels, radius, temperature)


CHECKPOINT_FORMAT = "corrflow-checkpoint-v1"


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by train.py (training or exported) -> (model in eval mode, centroids, dict).

    Raises ValueError with a one-line message when the file is missing, unreadable or not a CorrFlow checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a CorrFlow checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    try:  # a file with the right format tag can still lack a part, or hold something else in it
        config = model_config(ckpt["model_config"])
        model = CorrFlow(config)
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
        centroids = ckpt.get("centroids")
        centroids = None if centroids is None else centroids.float()
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError):
        raise ValueError(f"{path}: weights do not match the CorrFlow encoder") from None
    return model.eval(), centroids, ckpt


def export_weights(src, dst):
    """Write a small inference checkpoint (fp16 weights, config, centroids) from a training checkpoint."""
    _, _, ckpt = load_checkpoint(src)
    small = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["model"].items()},
        "model_config": ckpt["model_config"],
        "centroids": ckpt["centroids"],
        "step": ckpt.get("step"),
        "samples_seen": ckpt.get("samples_seen"),
        "train_config": ckpt.get("train_config"),
    }
    save_atomic(small, Path(dst))


def save_atomic(obj, path: Path):
    """torch.save through a temporary file renamed into place (files.atomic_write): a crash, a full disk or a signal
    never leaves half a checkpoint; a failed write is one OSError naming `path`, and the last good file stays."""
    with atomic_write(path) as f:
        try:
            torch.save(obj, f)  # into an open file: a failed write is Python's OSError, with its cause
        except RuntimeError as e:
            # torch's zip writer finishes the archive even after a failed write, and its own error then hides the
            # OSError (disk full, ...) that says what happened
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


# ----------------------------------------------------------------------------------------------------------------
# Propagation's frames, labels and features: frames and labels onto the encoder's stride-4 grid and back to the
# frame's size, and what frames are compared by


def scaled_size(H: int, W: int, scale: float) -> tuple[int, int]:
    """The size a H x W frame is encoded at (before padding to multiples of 4)."""
    return (H, W) if scale == 1 else (max(STRIDE, round(H * scale)), max(STRIDE, round(W * scale)))


def to_grid(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-pixel maps (1, C, H, W) -> the encoded frame's (1, C, H', W'): resized by `scale` (antialiased bilinear,
    whose weights are positive and sum to 1, so labels stay averages), right/bottom edge replicated up to
    multiples of 4."""
    size = scaled_size(*x.shape[-2:], scale)
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.pad(x, (0, -size[1] % STRIDE, 0, -size[0] % STRIDE), mode="replicate")


def to_tensor(frame: np.ndarray, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H', W') float in [0, 1]: scaled by `scale`, padded to multiples of 4."""
    rgb = torch.from_numpy(np.ascontiguousarray(frame)).to(device).permute(2, 0, 1)[None].float() / 255
    return to_grid(rgb, scale)


def to_frame(probs: torch.Tensor, H: int, W: int, scale: float) -> torch.Tensor:
    """Stride-4 probabilities (1, K, h, w) of a frame encoded at `scale` -> (1, K, H, W) at the frame's own size:
    upsampled to the encoded frame, its padding cut off, then (when scale != 1) resized to H x W."""
    h, w = scaled_size(H, W, scale)
    full = F.interpolate(probs, scale_factor=STRIDE, mode="bilinear", align_corners=False)[..., :h, :w]
    return full if (h, w) == (H, W) else F.interpolate(full, size=(H, W), mode="bilinear", align_corners=False)


def label_argmax(probs: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) -> (..., H, W): the argmax over the labels, the first on ties. Taken over the last axis: torch's
    argmax over an outer one is about 10x slower on a CPU (36 against 4 ms for 3 labels at 480p, one thread)."""
    return probs.movedim(-3, -1).contiguous().argmax(-1)


def hard_labels(probs: torch.Tensor) -> torch.Tensor:
    """What the paper's protocol feeds back: the soft output (1, K, h, w) upsampled to the encoded frame's full
    resolution (the frame's own at --scale 1), its argmax there, and that hard map's one-hot averaged back down to
    stride 4 (soft only at the object borders, like the first frame's labels) -> (1, K, h, w)."""
    full = F.interpolate(probs, scale_factor=STRIDE, mode="bilinear", align_corners=False)  # (1, K, H', W')
    one_hot = F.one_hot(label_argmax(full), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    return downsample_labels(one_hot)


def gaussian_heatmaps(points: np.ndarray, h: int, w: int, device: torch.device) -> torch.Tensor:
    """Points (J, 2) as pixel (x, y) -> (1, J, h, w) Gaussians of std POINT_SIGMA cells at stride 4, peak 1."""
    centres = (torch.as_tensor(points, dtype=torch.float32, device=device) - (STRIDE - 1) / 2) / STRIDE  # cells
    ys = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w)
    d2 = (xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2  # (J, h, w)
    return torch.exp(-d2 / (2 * POINT_SIGMA ** 2))[None]


def locate_points(heatmaps: torch.Tensor) -> np.ndarray:
    """(1, J, h, w) heat maps at stride 4 -> (J, 2) pixel (x, y): weighted mean of each map's top POINT_TOPK cells."""
    _, J, h, w = heatmaps.shape
    values, index = heatmaps[0].reshape(J, h * w).topk(POINT_TOPK, dim=1)  # (J, k) each
    weights = values.clamp_min(0) + 1e-12
    weights = weights / weights.sum(1, keepdim=True)
    x = (weights * (index % w)).sum(1) * STRIDE + (STRIDE - 1) / 2  # cell centre -> pixel
    y = (weights * (index // w)).sum(1) * STRIDE + (STRIDE - 1) / 2
    return torch.stack([x, y], 1).cpu().numpy()


class Encoder:
    """One kind of features: RGB (B, 3, H, W) in [0, 1], H and W multiples of 4 -> (query, key), each
    (B, C, H/4, W/4), whose dot product is the attention logit before the temperature.

    Dot-product features (the model) give <q, k>, optionally L2-normalised (a cosine). For squared-distance features
    (Lab) the pair is augmented so that the dot product gives -|q - k|^2 up to a per-query constant, which the
    softmax ignores: -|q - k|^2 = 2 q.k - |k|^2 - |q|^2, so query' = [2q, 1] and key' = [k, -|k|^2].
    """

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], squared_distance: bool):
        self.embed = embed
        self.squared_distance = squared_distance

    @torch.inference_mode()
    def __call__(self, rgb: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.embed(rgb).float()  # (B, C, H/4, W/4)
        if not self.squared_distance:
            feats = F.normalize(feats, dim=1) if normalize else feats
            return feats, feats
        sq = (feats * feats).sum(1, keepdim=True)  # (B, 1, H/4, W/4)
        return torch.cat([2 * feats, torch.ones_like(sq)], 1), torch.cat([feats, -sq], 1)  # (B, C+1, H/4, W/4)


def lab_features(rgb: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) -> Lab averaged over 4x4 cells as (w (L/100 - 1/2), a/128, b/128), w = LAB_LIGHTNESS_WEIGHT:
    one unit of L weighs as much as one unit of a or b when w = 128/100. Centred on mid-grey, which leaves every
    distance as it is and keeps the terms of -|q - k|^2 small, so that fp16 references round them less."""
    lab = rgb_to_lab(rgb)  # (B, 3, H, W): L in [0, 100], a and b in about [-128, 127]
    scale = torch.tensor([LAB_LIGHTNESS_WEIGHT / 100, 1 / 128, 1 / 128], device=rgb.device).view(1, 3, 1, 1)
    grey = torch.tensor([LAB_LIGHTNESS_WEIGHT / 2, 0, 0], device=rgb.device).view(1, 3, 1, 1)
    return F.avg_pool2d(lab * scale, STRIDE) - grey  # (B, 3, H/4, W/4)


def load_encoder(checkpoint: Optional[str | Path], features: Optional[str], device: torch.device,
                 precision: str = "auto") -> list[Encoder]:
    """The feature extractors: "model" (CorrFlow weights from `checkpoint`, None for the shipped one), "lab", or
    "model+lab" (both: their logits are summed). `precision` is the model's (`net_encoder`)."""
    features = features or "model"
    if features not in FEATURES:
        raise ValueError(f"unknown features '{features}' (choose {', '.join(FEATURES)})")
    lab = [Encoder(lab_features, squared_distance=True)] if "lab" in features.split("+") else []
    if "model" not in features.split("+"):
        return lab
    if checkpoint is None or Path(checkpoint) == DEFAULT_CHECKPOINT:
        if not DEFAULT_CHECKPOINT.is_file():
            raise ValueError(f"{DEFAULT_CHECKPOINT.relative_to(DEFAULT_CHECKPOINT.parents[1])} not found: the trained "
                             "weights are not shipped yet; pass --checkpoint PATH or use --features lab")
        checkpoint = DEFAULT_CHECKPOINT
    model, _, _ = load_checkpoint(checkpoint, map_location=device)
    return [net_encoder(model, device, precision)] + lab


def net_encoder(model: CorrFlow, device: torch.device, precision: str = "auto") -> Encoder:
    """A CorrFlow encoder (eval mode) on `device`, in bf16 autocast (channels-last) or fp32 as `encoder_in_bf16`
    says for its forward; with "auto" on a CPU the probe's numbers and the choice are said on stderr."""
    say = functools.partial(print, file=sys.stderr)
    bf16 = encoder_in_bf16(precision, device, backward=False, report=say)
    if precision == "auto" and torch.device(device).type == "cpu":
        say(f"encoding in {'bf16' if bf16 else 'fp32'} (--precision to choose)")
    model = model.to(device, memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    return Encoder(functools.partial(encode, model, bf16=bf16), squared_distance=False)
