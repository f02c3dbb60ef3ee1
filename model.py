"""The CorrFlow encoder and the copy step it is trained and used through.

The encoder is a ResNet-18 variant with output stride 4: conv1 7x7 stride 2, no max-pool, layer2 stride 2,
layers 3 and 4 at stride 1, then a 3x3 conv down to 64 feature channels. Features are not normalised.
The copy step is restricted attention: every target position attends to a (2M+1)^2 window of each reference's
features and takes the softmax-weighted sum of the references' labels (see `kernels/local_attention.py`).
"""
import contextlib
import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import atomic_write
from kernels import local_attention

STRIDE = 4  # feature map stride of the encoder; labels are averaged down to this stride


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
    come back in fp32: what follows them there (the reference copy, the loss) stays fp32."""
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

