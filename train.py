"""Train the CorrFlow encoder by colourisation through restricted attention, on a folder of unlabelled videos.

    python train.py --data kinetics/ --out runs/corrflow              # one GPU, or the CPU
    torchrun --nproc_per_node 4 train.py --data kinetics/ --out ...    # several GPUs (DDP), nothing else to change

Each iteration takes triplets of frames (0, 4, 8 of a clip), encodes every frame once, and predicts the quantised
colours (16 k-means clusters of Lab a/b) of frames 1 and 2 by copying labels from the previous frame through the
softmax over local feature similarities. The four mechanisms of the paper are marked in the loop below:
colour dropout (information bottleneck), 16-cluster cross-entropy, scheduled sampling, cycle consistency.

SIGTERM, SIGINT (Ctrl-C) or SIGHUP stops a run after the step under way: it saves every step done, exports the
weights and exits with 143, 130 or 129; --resume continues it. One run at a time writes into an --out folder.
"""
import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import inspect
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cli as cmdline  # the module; `cli` below is this file's entry point
from data import SAMPLINGS, ClipDataset, RunBatches, fit_centroids, quantise
from files import FolderLock, appending, atomic_write
from model import (CHECKPOINT_FORMAT, CorrFlow, ModelConfig, bf16_faster, copy_labels, downsample_labels, encode,
                   export_weights, load_checkpoint, model_config, save_atomic)
from stopping import StopSignals, ignore_in_worker


@dataclass
class TrainConfig:
    data: str = "kinetics/"  # folder of videos, searched recursively (video files or folders of frames)
    out: str = "runs/corrflow"  # checkpoints, the log CSV and the exported weights; one run at a time (<out>/.lock)
    steps: int = 0  # optimiser steps; 0: derived from `epochs` or `minutes`
    epochs: int = 10  # an epoch = the non-overlapping clips of every video (CorrFlow: 10 epochs of Kinetics)
    minutes: float = 0.0  # wall-clock budget instead of steps: 20 steps after 5 of warm-up are timed, then the step count is fixed to what fits (p(gt) and fractional lr points spread over it); saves and exports when time is up
    batch_size: int = 6  # clips per step (per process under torchrun); CorrFlow: 6
    lr: float = 2e-4  # Adam, betas (0.9, 0.999) (CorrFlow)
    lr_halve_at: tuple = (400_000, 600_000, 800_000, 1_000_000)  # samples seen at which lr halves (CorrFlow); values <= 1 are fractions of the run, e.g. 0.5 0.75 for a short one, 1 for a constant lr
    warmup_steps: int = 0  # lr rises linearly over these first steps; a run started with --init from weights without optimiser state gets INIT_WARMUP
    size: int = 256  # frames resized to size x size (CorrFlow: 256); with --crop, to this on their short side
    crop: int = 0  # > 0: train on random crop x crop windows of frames scaled to `size` on their short side, aspect kept (objects and motion at the scale of `size`, at the cost of crop^2); 0: the whole squashed frame (CorrFlow)
    min_scale: float = 1.0  # with --crop: each sample is zoomed out by a factor drawn uniformly from [min_scale, 1] (a window of crop / s pixels shrunk to crop), so objects appear at s times the scale of `size`; 1: no zoom
    sampling: str = "clips"  # clips: every clip start of every video equally likely (CorrFlow); videos: every video equally likely, then a start in it
    frame_gap: int = 4  # frames 0, gap, 2*gap of a clip (CorrFlow: 4)
    jitter_p: float = 0.1  # colour jitter probability per clip (CorrFlow: 0.1)
    dropout_none_p: float = 0.3  # colour dropout: probability of dropping no channel (CorrFlow: 0.3)
    p_gt_start: float = 0.9  # scheduled sampling: probability of feeding true labels at the start (CorrFlow: 0.9)
    p_gt_end: float = 0.6  # ... falling linearly to this at the end of the run (CorrFlow: 0.6)
    cycle_weight: float = 0.1  # weight of the cycle-consistency loss (CorrFlow: 0.1)
    num_clusters: int = 16  # colour classes (CorrFlow: 16)
    centroids: str = ""  # a .pt file of (num_clusters, 2) centroids; empty: fit them on the training videos
    init: str = ""  # start from these weights (a checkpoint train.py wrote) and their centroids, continuing its sample stream (and its optimiser state, from a training checkpoint)
    in_memory: bool = False  # decode every video once into memory at the training size (uint8): small sets, fast GPUs
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # the encoder's: bf16 (autocast, channels-last) | fp32 | auto: bf16 on CUDA, and on a CPU where a quick probe finds it faster; copies and loss stay fp32 on the CPU
    workers: int = 4  # data loader processes
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 250  # steps between scores of the fixed validation triplets (log.csv's val_ce); 0: never
    val_clips: int = 32  # validation triplets: true labels, no jitter or dropout, the same at every score
    sample_offset: int = 0  # samples seen by the runs this one continues (--init): its stream starts after them (set from --init, not a flag)
    resume: bool = False  # continue from <out>/ckpt.pt with the saved run's settings and schedule (other flags are ignored, and listed); to train longer, start a new run from its weights: --init <out>/ckpt.pt --out NEW --steps M


# What the command line accepts for each setting: checked where it is parsed, so that a bad value is one line naming
# its flag instead of a failure deep inside the run. Sizes are multiples of 4: the encoder's stride.
CHECKS = {
    "data": cmdline.existing_folder, "out": cmdline.output_folder, "centroids": cmdline.optional(cmdline.existing_file),
    "init": cmdline.optional(cmdline.existing_file), "device": cmdline.device,
    "steps": cmdline.integer(0), "epochs": cmdline.integer(1), "minutes": cmdline.real(0),
    "batch_size": cmdline.integer(1), "lr": cmdline.real(above=0), "lr_halve_at": cmdline.real(above=0),
    "size": cmdline.integer(16, multiple_of=4), "crop": cmdline.integer(0, multiple_of=4),
    "min_scale": cmdline.real(0.05, 1),
    "sampling": cmdline.choice(*SAMPLINGS), "precision": cmdline.choice("auto", "bf16", "fp32"),
    "warmup_steps": cmdline.integer(0), "val_every": cmdline.integer(0), "val_clips": cmdline.integer(1),
    "frame_gap": cmdline.integer(1), "radius": cmdline.integer(0, 64),
    "jitter_p": cmdline.real(0, 1), "dropout_none_p": cmdline.real(0, 1), "p_gt_start": cmdline.real(0, 1),
    "p_gt_end": cmdline.real(0, 1), "cycle_weight": cmdline.real(0), "num_clusters": cmdline.integer(2, 256),
    "workers": cmdline.integer(0), "seed": cmdline.integer(0, 2**32 - 1),  # numpy's and k-means' seeds stop there
    "log_every": cmdline.integer(1), "ckpt_every": cmdline.integer(1),
}
SCHEDULE = ("steps", "epochs", "minutes", "batch_size")  # what --resume may not change: the run's length
# --resume takes these from the command line: they belong to the machine, not to the run
MACHINE_LOCAL = ("data", "out", "device", "workers", "resume", "log_every", "ckpt_every", "in_memory", "precision")
INIT_WARMUP = 50  # lr warm-up steps of a run started from weights whose optimiser state is not in the file


# ------------------------------------------------------------------------------------------- the method's parts


def get_lr(step: int, total_steps: int, cfg: TrainConfig, world: int = 1) -> float:
    """CorrFlow's schedule: lr halves each time the number of samples seen passes a milestone. A milestone <= 1 is
    a fraction of the run's samples, so that a short run decays too. An optional linear warm-up comes first."""
    seen, run = step * cfg.batch_size * world, total_steps * cfg.batch_size * world
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cfg.lr * 0.5 ** sum(seen >= (m * run if m <= 1 else m) for m in cfg.lr_halve_at)


def p_ground_truth(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Scheduled sampling: probability of feeding true labels, linear from p_gt_start to p_gt_end over the run."""
    t = step / max(1, total_steps - 1)
    return cfg.p_gt_start + (cfg.p_gt_end - cfg.p_gt_start) * t


def colour_dropout(frames: torch.Tensor, none_p: float, gen: torch.Generator) -> tuple:
    """Information bottleneck: with probability 1 - none_p, zero 1 or 2 of the RGB channels for the whole batch
    and rescale by 3 / (3 - k), so the encoder cannot solve the colouring from the input colours alone.
    frames (..., 3, H, W) -> (frames, k dropped)."""
    if torch.rand((), generator=gen) < none_p:
        return frames, 0
    k = int(torch.randint(1, 3, (), generator=gen))
    keep = torch.ones(3, device=frames.device)
    keep[torch.randperm(3, generator=gen)[:k].to(frames.device)] = 0
    return frames * (keep * 3 / (3 - k))[:, None, None], k


@torch.no_grad()
def colour_targets(clean: torch.Tensor, centroids: torch.Tensor) -> tuple:
    """Un-jittered frames (B, T, 3, H, W) -> the 16-cluster class map (B, T, H, W) that the loss scores, and the
    labels that are copied: class one-hots averaged down to stride 4, (B, T, 16, H/4, W/4)."""
    B, T = clean.shape[:2]
    target = quantise(clean.flatten(0, 1), centroids)  # (B*T, H, W)
    onehot = F.one_hot(target, len(centroids)).permute(0, 3, 1, 2).float()  # (B*T, 16, H, W)
    labels = downsample_labels(onehot)  # (B*T, 16, H/4, W/4)
    return target.view(B, T, *target.shape[1:]), labels.view(B, T, *labels.shape[1:])


def copy_one(query, ref, ref_labels, radius: int, temperature: float) -> torch.Tensor:
    """The copy from one reference frame: (B, C, h, w), (B, C, h, w), (B, K, h, w) -> (B, K, h, w), fp32."""
    return copy_labels(query, ref[:, None], ref_labels[:, None].to(ref.dtype), radius, temperature).float()


def colourise(f0, f1, f2, labels, use_gt: bool, radius: int, temperature: float) -> tuple:
    """The copies of one iteration, from features f0, f1, f2 (B, C, h, w) of a triplet and the stride-4 labels
    (B, 3, 16, h, w) of its frames -> (p1, p2, p0_short, p0_long) colour probabilities (B, 16, h, w), fp32.

    Short term: frame 1 from frame 0's true labels; frame 2 from frame 1's true labels if `use_gt` (scheduled
    sampling), else from the model's own soft prediction p1 (with gradient). Cycle, on own predictions only:
    0 -> 1 -> 0 gives p0_short, 0 -> 1 -> 2 -> 1 -> 0 gives p0_long; both should reconstruct frame 0."""

    copy = functools.partial(copy_one, radius=radius, temperature=temperature)
    p1 = copy(f1, f0, labels[:, 0])
    p2 = copy(f2, f1, labels[:, 1] if use_gt else p1)
    p0_short = copy(f0, f1, p1)
    p2_own = copy(f2, f1, p1) if use_gt else p2
    p0_long = copy(f0, f1, copy(f1, f2, p2_own))
    return p1, p2, p0_short, p0_long


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """16-cluster cross-entropy: stride-4 probabilities (B, K, h, w), upsampled to the target's (B, H, W)."""
    probs = F.interpolate(probs.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.nll_loss(torch.log(probs + 1e-8), target)


@torch.no_grad()
def validation_ce(model, batches, centroids, cfg: TrainConfig, bf16: bool) -> float:
    """A measure of learning that batch losses are too noisy to give: on fixed triplets (true labels, no jitter or
    dropout, BatchNorm in eval mode as at test time), the cross-entropy of frames 1 and 2 copied from the true
    labels of frames 0 and 1, minus its floor: the cross-entropy of each frame's own stride-4 labels upsampled
    (what a perfect copy would score). 0 is perfect; lower is better."""
    model.eval()
    total = 0.0
    for clean in batches:  # (B, 3, 3, H, W)
        B = clean.shape[0]
        target, labels = colour_targets(clean, centroids)
        f0, f1, f2 = encode(model, clean.flatten(0, 1), bf16).view(B, 3, -1, *labels.shape[-2:]).unbind(1)
        p1 = copy_one(f1, f0, labels[:, 0], cfg.model.radius, cfg.model.temperature)
        p2 = copy_one(f2, f1, labels[:, 1], cfg.model.radius, cfg.model.temperature)
        ce = nll(p1, target[:, 1]) + nll(p2, target[:, 2])
        floor = nll(labels[:, 1], target[:, 1]) + nll(labels[:, 2], target[:, 2])
        total += float(ce - floor) / 2 * B
    model.train()
    return total / sum(len(c) for c in batches)


# ------------------------------------------------------------------------------------------- data and checkpoints


def rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def checkpoint(model, optimizer, step, cfg, centroids, world=1):
    # samples_seen counts those of the runs this one continues: a run started from this file with --init goes on
    # from there (with its own data and draws), instead of replaying the same stream
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "samples_seen": cfg.sample_offset + step * cfg.batch_size * world,
            "train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model),
            "centroids": centroids.cpu(), "rng": rng_states()}


def samples_seen(ckpt: dict) -> int:
    """How many samples the runs behind a checkpoint saw (files written before this count: their own step count
    times batch size, which is right for single-process runs)."""
    if ckpt.get("samples_seen") is not None:
        return int(ckpt["samples_seen"])
    saved = ckpt.get("train_config") or {}
    return int(saved.get("sample_offset", 0)) + int(ckpt.get("step") or 0) * int(saved.get("batch_size", 1))


def load_training_state(path: Path) -> dict:
    """A training checkpoint (model, optimiser, step, settings, centroids, RNG states) -> its dict; ValueError naming
    the file when it is unreadable or something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    keys = ("model", "optimizer", "step", "train_config", "centroids", "rng")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not all(k in state for k in keys):
        raise ValueError(f"{path}: not a CorrFlow training checkpoint")
    return state


def resumed_config(cfg: TrainConfig, saved: dict, ckpt_path: Path, master: bool = True) -> TrainConfig:
    """--resume: the saved run's settings, with this machine's MACHINE_LOCAL ones from `cfg`.

    A setting counts as given on the command line when it differs from both the saved value and the default. Given
    settings are ignored, and listed in one line, except the schedule's (SCHEDULE): a run's length cannot change
    halfway (the lr milestones and p(gt) are spread over it), so a longer run is refused with what to do instead."""
    try:
        saved = dict(saved)
        saved["model"] = model_config(saved["model"])
        saved["lr_halve_at"] = tuple(saved["lr_halve_at"])
        saved = TrainConfig(**saved)
    except (TypeError, KeyError, AttributeError):  # settings of another version of this file
        raise ValueError(f"{ckpt_path}: its saved settings do not match this train.py") from None
    default = TrainConfig()
    given = {}  # flag -> value
    for name in [f.name for f in dataclasses.fields(TrainConfig) if f.name not in MACHINE_LOCAL + ("model",)]:
        mine = getattr(cfg, name)
        if mine != getattr(saved, name) and mine != getattr(default, name):
            given[name] = mine
    for name in [f.name for f in dataclasses.fields(ModelConfig)]:
        mine = getattr(cfg.model, name)
        if mine != getattr(saved.model, name) and mine != getattr(default.model, name):
            given[name] = mine

    def flag(name):
        value = given[name]
        value = " ".join(map(str, value)) if isinstance(value, tuple) else value
        return f"--{name.replace('_', '-')} {value}"

    # a --minutes run fixed its step count after its first steps: repeating the original command (with --minutes)
    # continues that count, so --minutes is only listed as ignored
    longer = [name for name in SCHEDULE if name in given and not (name == "minutes" and saved.steps)]
    if longer:
        raise ValueError(f"--resume continues the saved run's own schedule, which {', '.join(map(flag, longer))} "
                         f"would change; to train longer, start a new run from its weights: --init {ckpt_path} "
                         f"--out NEW_FOLDER {' '.join(map(flag, longer))}")
    if given and master:
        print(f"resuming with the saved run's settings; ignored: {', '.join(map(flag, given))}")
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in MACHINE_LOCAL})


def load_centroids(path) -> torch.Tensor:
    """--centroids: a .pt file holding a (K, 2) tensor of Lab (a, b) cluster centres."""
    try:
        centroids = torch.load(path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path}: not a readable centroids file ({type(e).__name__})") from None
    if not (torch.is_tensor(centroids) and centroids.ndim == 2 and centroids.shape[1] == 2 and len(centroids) >= 2
            and not centroids.is_complex() and torch.isfinite(centroids.float()).all()):
        raise ValueError(f"{path}: expected a (K, 2) tensor of finite Lab (a, b) centroids, K >= 2")
    return centroids.float()


# ------------------------------------------------------------------------------------------- training


def main(cfg: TrainConfig) -> Path:
    """Train; returns the path of the exported inference weights (<out>/corrflow.pt). SIGTERM, SIGINT or SIGHUP
    end the run after the step under way: it saves and exports as at the end, then raises SystemExit(128 + signal)."""
    with contextlib.ExitStack() as held:  # the signal handlers and the output folder's lock, however the run ends
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: contextlib.ExitStack) -> Path:
    # -- setup: DDP when started by torchrun, one device decided here
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local_rank = 0, 1, 0
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    master = rank == 0
    out = Path(cfg.out)
    ckpt_path = out / "ckpt.pt"
    if cfg.minutes > 0 and cfg.steps:
        raise ValueError("give --steps or --minutes, not both")
    resume = cfg.resume and ckpt_path.is_file()
    if cfg.resume and not resume and master:
        print(f"no checkpoint at {ckpt_path}: starting a new run")
    state = None
    if resume:
        state = load_training_state(ckpt_path)
        cfg = resumed_config(cfg, state["train_config"], ckpt_path, master)
    # every file given is read before any work, so that a bad one stops the run at once
    init = None if state is not None or not cfg.init else load_checkpoint(cfg.init)
    if init is not None:  # continue its stream of samples; warm up unless its optimiser state comes along
        fresh_adam = "optimizer" not in init[2]
        cfg = dataclasses.replace(cfg, sample_offset=samples_seen(init[2]),
                                  warmup_steps=cfg.warmup_steps or (INIT_WARMUP if fresh_adam else 0))
    given_centroids = load_centroids(cfg.centroids) if state is None and init is None and cfg.centroids else None
    torch.manual_seed(cfg.seed)

    # -- data: clips of 3 frames `frame_gap` apart; the colour classes' centroids
    clips = ClipDataset(cfg.data, num_frames=3, frame_gap=cfg.frame_gap, size=cfg.size, jitter_p=cfg.jitter_p,
                        seed=cfg.seed, in_memory=cfg.in_memory, crop=cfg.crop, sampling=cfg.sampling,
                        min_scale=cfg.min_scale)
    if state is not None:
        centroids = state["centroids"]
    elif init is not None:
        centroids = init[1]
    elif given_centroids is not None:
        centroids = given_centroids
    elif master:
        centroids = fit_centroids(clips, n_clusters=cfg.num_clusters, seed=cfg.seed)  # (16, 2) of Lab (a, b)
    else:
        centroids = torch.empty(cfg.num_clusters, 2)
    centroids = centroids.float().to(device)
    if ddp and state is None and not cfg.centroids and init is None:
        dist.broadcast(centroids, 0)  # every process quantises with the first one's centroids
    stop = held.enter_context(StopSignals())  # a signal from here on: finish the step, save, export, exit
    if master:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves no trace
        held.enter_context(FolderLock(out))  # one run per folder: a second one is refused before writing anything
    # with --minutes the step count is fixed after CALIBRATION_STEPS (below); until then the schedules stay at
    # their start (no lr milestone is reached, p(gt) stays at p_gt_start)
    timed = cfg.minutes > 0
    total_steps = cfg.steps or (10**9 if timed else max(1, cfg.epochs * len(clips) // (cfg.batch_size * world)))

    # -- model and optimiser, restored when resuming
    model = CorrFlow(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    step = 0
    if init is not None:
        model.load_state_dict(init[0].state_dict())
        if "optimizer" in init[2]:
            try:
                optimizer.load_state_dict(init[2]["optimizer"])
            except (ValueError, KeyError) as e:
                raise ValueError(f"{cfg.init}: its optimiser state does not fit this model ({e})") from None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if master:
            print(f"resuming {ckpt_path} at step {step}/{total_steps}")
    raw_model = model
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if cfg.precision == "auto" and device.type == "cpu":
        size = cfg.crop or cfg.size
        bf16, t32, t16 = bf16_faster(model, size, backward=True)
        if ddp:  # every process trains in the precision the first one measured
            choice = torch.tensor(int(bf16), device=device)
            dist.broadcast(choice, 0)
            bf16 = bool(choice)
        if master:
            print(f"encoder fwd+bwd of 2 frames at {size}x{size}: fp32 {t32 * 1e3:.0f} ms, bf16 {t16 * 1e3:.0f} ms: "
                  f"training in {'bf16' if bf16 else 'fp32'} (--precision to choose)")
    model = model.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    if device.type == "cuda":
        if ddp:  # batch statistics over the global batch (SyncBatchNorm needs GPUs)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
        raw_model = model.module
    sampler = RunBatches(cfg.batch_size, step, total_steps, rank, world, offset=cfg.sample_offset)
    loader = torch.utils.data.DataLoader(clips, batch_sampler=sampler,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False, worker_init_fn=ignore_in_worker)
    val_batches = []  # fixed validation triplets: clean samples of another seed, scored by the first process
    if master and cfg.val_every:
        val = copy.copy(clips)
        val.seed, val.jitter_p, val.min_scale = cfg.seed + 1, 0.0, 1.0  # at `size`'s scale, whatever the zoom
        items = [val[i]["clean"] for i in range(cfg.val_clips)]
        val_batches = [torch.stack(items[i:i + cfg.batch_size]).to(device)
                       for i in range(0, len(items), cfg.batch_size)]
    log_path = out / "log.csv"
    if master:
        _trim_log(log_path, step)

    # -- the loop
    model.train()
    bar = tqdm(total=None if timed else total_steps, initial=step, disable=not master, desc="train", unit="step")
    t_start = t_last = t_ready = time.time()
    step_first = step_last = step
    waited = 0.0
    deadline = t_start + 60 * cfg.minutes if timed else None
    with bar:  # closed however the loop ends, so that an error is printed on a line of its own
        for batch in loader:
            waited += time.time() - t_ready  # time the step waited for the loader
            if timed and step - step_first == CALIBRATION_SKIP:  # warm-up (allocator, loader start) left out
                t_calibrate = time.time()
            if timed and step - step_first == CALIBRATION_SKIP + CALIBRATION_STEPS:  # fix the run's length
                spent = time.time() - t_calibrate
                total_steps = _steps_that_fit(step, CALIBRATION_STEPS, spent, deadline - time.time(), ddp, device)
                cfg = dataclasses.replace(cfg, steps=total_steps, minutes=0)  # saved: --resume keeps this schedule
                bar.total = total_steps
                if master:
                    print(f"\nsteps {step - CALIBRATION_STEPS + 1}-{step} took {spent / CALIBRATION_STEPS:.2f} s "
                          f"each (the first {CALIBRATION_SKIP} left out as warm-up): with "
                          f"{(deadline - time.time()) / 60:.1f} min left the run will take {total_steps} steps")
            if step >= total_steps:
                break
            if deadline is not None and _past(deadline, ddp, device):
                if cfg.minutes:  # the budget ran out before the run's length was fixed: it ends here
                    total_steps = step
                    cfg = dataclasses.replace(cfg, steps=total_steps, minutes=0)
                break
            if stop.requested(ddp, device):  # a signal: every step done is saved below
                break
            lr = get_lr(step, total_steps, cfg, world)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # the same draws on every process; a run continued with --init goes on past its source's draws
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.sample_offset + step)
            frames = batch["frames"].to(device, non_blocking=True)  # (B, 3 frames, 3, H, W) jittered input
            clean = batch["clean"].to(device, non_blocking=True)  # (B, 3, 3, H, W) targets come from these
            B = frames.shape[0]
            target, labels = colour_targets(clean, centroids)  # (B, 3, H, W), (B, 3, 16, H/4, W/4)

            # 1. colour dropout: the same 1 or 2 channels zeroed for the whole batch (or none, p=0.3)
            x, _ = colour_dropout(frames, cfg.dropout_none_p, gen)
            # each frame encoded once per iteration and every copy below reuses these features (the original
            # re-encodes per copy; one difference: BatchNorm's batch statistics here pool all three frames)
            f0, f1, f2 = encode(model, x.flatten(0, 1), bf16).view(B, 3, -1, *labels.shape[-2:]).unbind(1)

            # 2. short-term colourisation, 0 -> 1 from true labels, 1 -> 2 with 3. scheduled sampling:
            #    true labels of frame 1 with probability p_gt, else the model's own soft prediction (with grad);
            # 4. cycle consistency on own predictions: 0 -> 1 -> 0 and 0 -> 1 -> 2 -> 1 -> 0 reconstruct frame 0
            p_gt = p_ground_truth(step, total_steps, cfg)
            use_gt = bool(torch.rand((), generator=gen) < p_gt)
            p1, p2, p0_short, p0_long = colourise(f0, f1, f2, labels, use_gt, cfg.model.radius,
                                                  cfg.model.temperature)  # each (B, 16, H/4, W/4)
            short = nll(p1, target[:, 1]) + nll(p2, target[:, 2])  # 16-cluster cross-entropy
            cycle = nll(p0_short, target[:, 0]) + nll(p0_long, target[:, 0])
            loss = short + cfg.cycle_weight * cycle

            bad = (~torch.isfinite(loss.detach())).float()
            if ddp:
                dist.all_reduce(bad)  # every process stops together, none waits forever in the backward's all-reduce
            if bad.item():  # a CPU-GPU sync point, worth it: never step on a NaN
                raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}; the last good checkpoint "
                                         f"is {ckpt_path if ckpt_path.exists() else 'not written yet'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)

            last = step == total_steps or (deadline is not None and time.time() > deadline)  # a timed run's too
            scored = master and cfg.val_every and (step % cfg.val_every == 0 or last or step == 1)
            val_ce = validation_ce(raw_model, val_batches, centroids, cfg, bf16) if scored else None
            if master and (step % cfg.log_every == 0 or last or scored):
                now = time.time()
                clips_per_s = (step - step_last) * B * world / max(now - t_last, 1e-9)
                # data_wait: share of the time spent waiting for the loader; near 0 when it keeps up
                row = {"step": step, "loss": loss.item(), "short": short.item(), "cycle": cycle.item(),
                       "p_gt": round(p_gt, 4), "lr": lr, "clips_per_s": round(clips_per_s, 2),
                       "data_wait": round(waited / max(now - t_last, 1e-9), 3),
                       "val_ce": "" if val_ce is None else round(val_ce, 4)}
                t_last, step_last, waited = now, step, 0.0
                _append_log(log_path, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", p_gt=f"{p_gt:.2f}", clips_s=f"{clips_per_s:.1f}",
                                wait=f"{row['data_wait']:.0%}")
            if master and (step % cfg.ckpt_every == 0 or step == total_steps):
                save_atomic(checkpoint(raw_model, optimizer, step, cfg, centroids, world), ckpt_path)
            t_ready = time.time()
    weights = out / "corrflow.pt"
    if master:
        if step < total_steps and not stop.signum:  # the time budget ran out before the planned steps
            print(f"time budget of {(deadline - t_start) / 60:.1f} min spent at step {step} of {total_steps}")
        save_atomic(checkpoint(raw_model, optimizer, step, cfg, centroids, world), ckpt_path)
        export_weights(ckpt_path, weights)
        if stop.signum:
            print(f"stopped by {stop.name} at step {step}: saved {ckpt_path} and {weights}; continue with the same "
                  f"command and --resume")
        else:
            print(f"done: {step} steps; checkpoint {ckpt_path}, weights for propagate.py {weights}")
    if ddp:
        dist.barrier()  # the others wait for the first one's files: torchrun ends them all once one exits non-zero
        dist.destroy_process_group()
    if stop.signum:
        raise SystemExit(stop.exit_code)
    return weights


CALIBRATION_SKIP = 5  # --minutes: steps left out of the timing (start-up: allocator, loader, cuDNN autotuning)
CALIBRATION_STEPS = 20  # ... then the steps timed before the run's length is fixed


def _steps_that_fit(step: int, done: int, spent: float, left: float, ddp: bool, device: torch.device) -> int:
    """--minutes: the total step count that fits in the budget at the speed of `done` steady-state steps (3% kept
    for saves and validation); under torchrun the first process decides for all."""
    total = torch.tensor(step + int(0.97 * max(left, 0.0) * done / max(spent, 1e-9)), device=device)
    if ddp:
        dist.broadcast(total, 0)
    return max(step + 1, int(total))


def _past(deadline: float, ddp: bool, device: torch.device) -> bool:
    """Whether the time budget is spent; under torchrun, for every process as soon as for one (they stop together)."""
    late = torch.tensor(float(time.time() > deadline), device=device)
    if ddp:
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
    return bool(late.item())


def _trim_log(path: Path, step: int):
    """On resume, drop log rows written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with atomic_write(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _append_log(path: Path, row: dict):
    new = not path.exists() or path.stat().st_size == 0
    with appending(path, newline="") as f:  # a failed write leaves no half row
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


@functools.cache  # inspect.getsource parses the whole file: once per process is enough
def _field_comments() -> dict:
    return dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(TrainConfig), re.MULTILINE))


def parse_args(argv=None) -> TrainConfig:
    """The CLI is built from TrainConfig: every field is a flag with the dataclass default, checked by CHECKS."""
    p = cmdline.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # each flag's help is the comment on its field in TrainConfig, then what it accepts
    comments = _field_comments()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "sample_offset"):  # set from the checkpoints, not on the command line
            continue
        flag, default, doc = "--" + f.name.replace("_", "-"), f.default, comments.get(f.name, "")
        check = CHECKS.get(f.name)
        accepts = f"{check.want}; " if getattr(check, "want", "") else ""
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=doc)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=check, nargs="+", default=list(default),
                           help=f"{doc} ({accepts}default: {default})")
        else:
            p.add_argument(flag, type=check or type(default), default=default,
                           help=f"{doc} ({accepts}default: {default!r})")
    check = CHECKS["radius"]
    p.add_argument("--radius", type=check, default=ModelConfig.radius, help="attention window radius M at stride 4 "
                   f"(CorrFlow: 6) ({check.want}; default: {ModelConfig.radius})")
    args = vars(p.parse_args(argv))
    model = ModelConfig(radius=args.pop("radius"))
    args["lr_halve_at"] = tuple(args["lr_halve_at"])
    args = {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}  # strings, as saved in checkpoints
    return TrainConfig(model=model, **args)


def cli(argv=None) -> Path:
    """The command line: parse, train; an expected failure (bad input, unreadable file, a NaN loss) is one line."""
    config = parse_args(argv)
    try:
        return main(config)
    except (ValueError, OSError, FloatingPointError) as e:
        cmdline.fail(e)


if __name__ == "__main__":
    cli()
