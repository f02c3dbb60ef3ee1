"""Train the CorrFlow encoder by colourisation through restricted attention, on a folder of unlabelled videos.

    python train.py --data kinetics/ --out runs/corrflow              # one GPU, or the CPU
    torchrun --nproc_per_node 4 train.py --data kinetics/ --out ...    # several GPUs (DDP), nothing else to change

Each iteration takes triplets of frames (0, 4, 8 of a clip), encodes every frame once, and predicts the quantised
colours (16 k-means clusters of Lab a/b) of frames 1 and 2 by copying labels from the previous frame through the
softmax over local feature similarities. The paper's four mechanisms are the functions below, in the loop's order:
colour jitter and colour dropout (an information bottleneck), scheduled sampling, the 16-cluster cross-entropy and
cycle consistency. The run's plumbing is beside it: run.py (command line, DDP, precision, log and progress),
checkpoints.py (checkpoints, --resume, --init) and stopping.py (signals, the --minutes budget).

SIGTERM, SIGINT (Ctrl-C) or SIGHUP stops a run after the step under way: it saves every step done, exports the
weights and exits with 143, 130 or 129; --resume continues it. One run at a time writes into an --out folder.
"""
import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import cli as cmdline  # the module; `cli` below is this file's entry point
import run
from data import ClipDataset, RunBatches, fit_centroids, quantise
from files import FolderLock
from model import CorrFlow, ModelConfig, copy_labels, downsample_labels, encode
from stopping import StopSignals, ignore_in_worker, process_start


@dataclass
class TrainConfig:
    # -- the method: CorrFlow's settings
    size: int = 256  # frames resized to size x size (CorrFlow: 256); with --crop, to this on their short side
    frame_gap: int = 4  # frames 0, gap, 2*gap of a clip (CorrFlow: 4)
    jitter_p: float = 0.1  # colour jitter probability per clip (CorrFlow: 0.1)
    dropout_none_p: float = 0.3  # colour dropout: probability of dropping no channel (CorrFlow: 0.3)
    p_gt_start: float = 0.9  # scheduled sampling: probability of feeding true labels at the start (CorrFlow: 0.9)
    p_gt_end: float = 0.6  # ... falling linearly to this at the end of the run (CorrFlow: 0.6)
    num_clusters: int = 16  # colour classes (CorrFlow: 16)
    cycle_weight: float = 0.1  # weight of the cycle-consistency loss (CorrFlow: 0.1)
    batch_size: int = 6  # clips per step (per process under torchrun); CorrFlow: 6
    lr: float = 2e-4  # Adam, betas (0.9, 0.999) (CorrFlow)
    lr_halve_at: tuple = (400_000, 600_000, 800_000, 1_000_000)  # samples seen at which lr halves (CorrFlow);
    #   values <= 1 are fractions of the run, e.g. 0.5 0.75 for a short one, 1 for a constant lr
    epochs: int = 10  # an epoch: about one clip per 12 frames of every video, as CorrFlow counts (10 of Kinetics)
    model: ModelConfig = field(default_factory=ModelConfig)
    # -- the run
    data: str = "kinetics/"  # folder of videos, searched recursively (video files or folders of frames)
    out: str = "runs/corrflow"  # checkpoints, the log CSV and the exported weights; one run at a time (<out>/.lock)
    steps: int = 0  # optimiser steps; 0: derived from --epochs or --minutes
    minutes: float = 0.0  # wall time instead of steps, from the process's start (start-up included): the first steps
    #   are timed (up to 20, after 5 of warm-up), then the length is fixed to what fits; saves and exports at the end
    warmup_steps: int = 0  # lr rises linearly over these first steps (--init from weights without Adam state: 50)
    crop: int = 0  # > 0: train on random crop x crop windows of frames scaled to --size on their short side, aspect
    #   kept (objects and motion at the scale of --size, at the cost of crop^2); 0: the whole squashed frame (CorrFlow)
    min_scale: float = 1.0  # with --crop: each sample is zoomed out by a factor s drawn uniformly from [--min-scale,
    #   1] (a window of crop / s pixels shrunk to crop), so objects appear at s times the scale of --size; 1: no zoom
    sampling: str = "clips"  # clips: every clip start equally likely (CorrFlow); videos: every video, then a start
    centroids: str = ""  # a .pt file of (--num-clusters, 2) centroids; empty: fit them on the training videos
    init: str = ""  # start from these weights (a checkpoint train.py wrote) and their centroids, continuing its sample
    #   stream (and its optimiser state, from a training checkpoint)
    in_memory: bool = False  # decode every video once into memory at the training size (uint8): small sets, fast GPUs
    device: str = "auto"  # auto: cuda where there is a GPU, else cpu
    precision: str = "auto"  # the encoder's: bf16 (autocast, channels-last) | fp32 | auto: bf16 on CUDA, and on a CPU
    #   where a probe (a second, once: ~/.cache/corrflow) finds it 10% faster; the copies and loss stay fp32 there
    workers: int = run.default_workers()  # loader processes: a core each beside training's, at most 4; 0 on 1-2 cores
    seed: int = 0  # of the sample stream, the draws of each step, k-means and the weights
    log_every: int = 10  # steps between rows of <out>/log.csv
    ckpt_every: int = 500  # steps between checkpoints (<out>/ckpt.pt)
    val_every: int = 250  # steps between scores of the fixed validation triplets (log.csv's val_ce); 0: never
    val_clips: int = 32  # validation triplets: true labels, no jitter or dropout, the same at every score
    sample_offset: int = 0  # samples seen by the runs this one continues: its stream starts after them (from --init)
    resume: bool = False  # continue <out>/ckpt.pt with its run's settings and length (other flags ignored, and
    #   listed); to train longer, start a new run from its weights: --init <out>/ckpt.pt --out NEW --steps M


# ------------------------------------------------------------------------------------------- the method's parts
def get_lr(step: int, total_steps: int, cfg: TrainConfig, world: int = 1) -> float:
    """CorrFlow's schedule: lr halves each time the number of samples seen passes a milestone. A milestone <= 1 is
    a fraction of the run's samples, so that a short run decays too. An optional linear warm-up comes first."""
    seen, run_samples = step * cfg.batch_size * world, total_steps * cfg.batch_size * world
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * cfg.lr * 0.5 ** sum(seen >= (m * run_samples if m <= 1 else m) for m in cfg.lr_halve_at)


def p_ground_truth(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Scheduled sampling: probability of feeding true labels, linear from p_gt_start to p_gt_end over the run."""
    t = step / max(1, total_steps - 1)
    return cfg.p_gt_start + (cfg.p_gt_end - cfg.p_gt_start) * t


def scheduled_sampling(step: int, total_steps: int, cfg: TrainConfig, gen: torch.Generator) -> tuple:
    """Whether this step copies frame 2 from frame 1's true labels (else from the model's own prediction of frame 1),
    drawn with probability p(gt) -> (use_gt, p_gt)."""
    p_gt = p_ground_truth(step, total_steps, cfg)
    return bool(torch.rand((), generator=gen) < p_gt), p_gt


# The 16-cluster cross-entropy, whole: the targets are the frames' Lab (a, b) snapped to the nearest of 16 centroids
# (data.quantise; the centroids are k-means of training pixels, data.fit_centroids); what is copied is each class's
# one-hot averaged over 4x4 cells (stride 4, the features'); a copy's class probabilities are upsampled back to the
# frame and scored against the class map by cross-entropy (`nll`): frames 1 and 2, and frame 0 after the cycles
# (`colour_loss`).
@torch.no_grad()
def colour_targets(clean: torch.Tensor, centroids: torch.Tensor) -> tuple:
    """Un-jittered frames (B, T, 3, H, W) -> the class map (B, T, H, W) that the loss scores, and the labels that
    are copied, (B, T, 16, H/4, W/4)."""
    B, T = clean.shape[:2]
    target = quantise(clean.flatten(0, 1), centroids)  # (B*T, H, W)
    onehot = F.one_hot(target, len(centroids)).permute(0, 3, 1, 2).float()  # (B*T, 16, H, W)
    labels = downsample_labels(onehot)  # (B*T, 16, H/4, W/4)
    return target.view(B, T, *target.shape[1:]), labels.view(B, T, *labels.shape[1:])


def nll(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of stride-4 class probabilities (B, K, h, w), upsampled to the class map (B, H, W)."""
    probs = F.interpolate(probs.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.nll_loss(torch.log(probs + 1e-8), target)


def colour_loss(p1, p2, p0_short, p0_long, target, cycle_weight: float) -> tuple:
    """The 16-cluster cross-entropy of frames 1 and 2, plus the cycle term: frame 0 reconstructed both ways, weighted
    by cycle_weight -> (loss, short, cycle)."""
    short = nll(p1, target[:, 1]) + nll(p2, target[:, 2])
    cycle = nll(p0_short, target[:, 0]) + nll(p0_long, target[:, 0])
    return short + cycle_weight * cycle, short, cycle


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


def jitter_and_dropout(batch: dict, none_p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """The encoder's input, (B, 3, 3, H, W): colour jitter, then colour dropout. The jitter (brightness, contrast,
    saturation, hue by up to +-0.1, on a clip with probability jitter_p) is drawn per sample by the loader's processes
    (ClipDataset, data.colour_jitter): batch["frames"] holds the jittered frames, batch["clean"] the frames without."""
    jittered = batch["frames"].to(device, non_blocking=True)
    return colour_dropout(jittered, none_p, gen)[0]


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


# ------------------------------------------------------------------------------------------- training
def main(cfg: TrainConfig, started: float = None) -> Path:
    """Train -> the exported weights (<out>/corrflow.pt); a signal ends it after the step under way, saved and exported,
    with SystemExit(128 + signal). --minutes counts from `started` (the command line's process's start; default now)."""
    started = time.time() if started is None else started
    with contextlib.ExitStack() as held:  # the output folder's lock and the signal handlers, however the run ends
        return _train(cfg, held, started)


def _train(cfg: TrainConfig, held: contextlib.ExitStack, started: float) -> Path:
    # -- setup: the quick refusals first (flags, a folder in use, unreadable files), then the data, the model
    if cfg.minutes > 0 and cfg.steps:
        raise ValueError("give --steps or --minutes, not both")
    proc = run.start_process(cfg.device)
    cfg = dataclasses.replace(cfg, device=proc.device.type)
    if proc.master:
        FolderLock(cfg.out).check()  # a folder in use by another run: refused before any work
    state, cfg = checkpoints.resume(cfg, proc.master)
    if state is not None and checkpoints.finished(state, cfg, proc.master):  # nothing left: no data read, no probe
        run.end_process(proc)
        return Path(cfg.out) / "corrflow.pt"
    init, cfg = checkpoints.read_init(cfg) if state is None else (None, cfg)  # every file read before any work
    given = checkpoints.load_centroids(cfg.centroids) if state is None and init is None and cfg.centroids else None
    torch.manual_seed(cfg.seed)
    clips = ClipDataset(cfg.data, num_frames=3, frame_gap=cfg.frame_gap, size=cfg.size, jitter_p=cfg.jitter_p,
                        seed=cfg.seed, in_memory=cfg.in_memory, crop=cfg.crop, sampling=cfg.sampling,
                        min_scale=cfg.min_scale)
    centroids = state["centroids"] if state is not None else init[1] if init is not None else given
    if centroids is None:  # (16, 2) of Lab (a, b), fitted by the first process, sent to the others
        fitted = fit_centroids(clips, cfg.num_clusters, seed=cfg.seed) if proc.master else None
        centroids = run.broadcast(fitted, (cfg.num_clusters, 2), proc)
    centroids = centroids.float().to(proc.device)
    stop = held.enter_context(StopSignals())  # a signal from here on: finish the step, save, export, exit
    if proc.master:  # only now: a run refused above leaves no trace
        held.enter_context(checkpoints.output_folder(Path(cfg.out)))  # one run per folder
    batches = max(1, cfg.epochs * len(clips) // (cfg.batch_size * proc.world))
    total_steps = cfg.steps or (state or {}).get("total_steps") or (10**9 if cfg.minutes else batches)  # kept by resume

    model = CorrFlow(cfg.model).to(proc.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    step = checkpoints.restore(model, optimizer, state, init, cfg, total_steps, proc.master)
    bf16 = run.train_in_bf16(cfg.precision, proc)
    raw_model = model = model.to(memory_format=torch.channels_last if bf16 else torch.contiguous_format)
    model = run.wrap_for_ddp(model, proc)
    sampler = RunBatches(cfg.batch_size, step, total_steps, proc.rank, proc.world, offset=cfg.sample_offset)
    loader = torch.utils.data.DataLoader(clips, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=proc.device.type == "cuda", worker_init_fn=ignore_in_worker)
    val = run.validation_batches(clips, cfg, proc) if proc.master and cfg.val_every else []
    validate = functools.partial(validation_ce, raw_model, val, centroids, cfg, bf16)
    runner = held.enter_context(run.Run(cfg, proc, step, total_steps, raw_model, optimizer, centroids, validate, stop,
                                        started))

    # -- the loop
    model.train()
    for batch in loader:
        if not runner.keep_going(step):  # the step count, --minutes, or a signal
            break
        total_steps = runner.total  # fixed once a --minutes run knows its speed
        lr = get_lr(step, total_steps, cfg, proc.world)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the same draws on every process; a run continued with --init goes on past its source's draws
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + cfg.sample_offset + step)
        clean = batch["clean"].to(proc.device, non_blocking=True)  # (B, 3 frames, 3, H, W): targets come from these
        B = clean.shape[0]
        target, labels = colour_targets(clean, centroids)  # (B, 3, H, W), (B, 3, 16, H/4, W/4)

        # 1. colour jitter (the loader's) and dropout: the same 1 or 2 channels zeroed for the whole batch
        x = jitter_and_dropout(batch, cfg.dropout_none_p, gen, proc.device)
        # each frame encoded once per iteration and every copy below reuses these features (the original
        # re-encodes per copy; one difference: BatchNorm's batch statistics here pool all three frames)
        f0, f1, f2 = encode(model, x.flatten(0, 1), bf16).view(B, 3, -1, *labels.shape[-2:]).unbind(1)

        # 2. scheduled sampling: frame 2 is copied from frame 1's true labels with probability p_gt, else from the
        #    model's own soft prediction (with gradient); the cycles 0 -> 1 -> 0 and 0 -> 1 -> 2 -> 1 -> 0 too
        use_gt, p_gt = scheduled_sampling(step, total_steps, cfg, gen)
        p1, p2, p0_short, p0_long = colourise(f0, f1, f2, labels, use_gt, cfg.model.radius, cfg.model.temperature)

        # 3. the 16-cluster cross-entropy of frames 1 and 2, and 4. the cycle term on frame 0
        loss, short, cycle = colour_loss(p1, p2, p0_short, p0_long, target, cfg.cycle_weight)
        runner.check(loss, step)  # never step on a NaN
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        runner.after_step(step, B, lr, p_gt, loss, short, cycle)  # log, validate and save when due
    return runner.finish()


def parse_args(argv=None) -> TrainConfig:
    """The CLI is built from TrainConfig: every field is a flag with the dataclass default (run.parse_config)."""
    return run.parse_config(TrainConfig, argv, __doc__)


def cli(argv=None) -> Path:
    """The command line: parse, train; an expected failure (bad input, unreadable file, a NaN loss) is one line."""
    config = parse_args(argv)
    try:
        return main(config, started=process_start())
    except (ValueError, OSError, FloatingPointError) as e:
        cmdline.fail(e)


if __name__ == "__main__":
    cli()
