"""The CorrFlow encoder and the copy step it is trained and used through.

The encoder is a ResNet-18 variant with output stride 4: conv1 7x7 stride 2, no max-pool, layer2 stride 2,
layers 3 and 4 at stride 1, then a 3x3 conv down to 64 feature channels. Features are not normalised.
The copy step is restricted attention: every target position attends to a (2M+1)^2 window of each reference's
features and takes the softmax-weighted sum of the references' labels (see `kernels/local_attention.py`).
"""
import copy
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


def bf16_faster(model: CorrFlow, size: int, backward: bool) -> tuple[bool, float, float]:
    """Whether this CPU runs the encoder at least 10% faster in bf16 autocast (channels-last) than in fp32: both
    timed on 2 frames of size x size (forward, and backward when `backward`), the better of 2 runs after a warm-up
    -> (faster, fp32 seconds, bf16 seconds). CPUs with bf16 units (AVX512-BF16, AMX) run it about twice as fast,
    on others it is emulated and slower. A few seconds."""
    model = copy.deepcopy(model).cpu()  # the probe must not move the real model's BatchNorm statistics or layout
    x = torch.rand(2, 3, size, size)
    times = []
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
        times.append(min(laps[1:]))
    return times[1] < 0.9 * times[0], times[0], times[1]


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

