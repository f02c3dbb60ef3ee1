"""The plumbing of a training run, beside train.py's method: the command line built from TrainConfig, the process
(one device, DDP under torchrun, the encoder's precision), and the bookkeeping of the loop (`Run`): when to stop
(the step count, --minutes, a signal), the log CSV and the progress line, validation and checkpoints, the end.
"""
import argparse
import copy
import dataclasses
import functools
import inspect
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli as cmdline
from checkpoints import append_log, checkpoint, trim_log
from data import SAMPLINGS
from model import ModelConfig, encoder_in_bf16, export_weights, save_atomic
from stopping import Budget

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
NOT_FLAGS = ("model", "sample_offset")  # set from the checkpoints, not on the command line


def default_workers() -> int:
    """Data loader processes: one per core beside the training's own, at most 4; none on a 1- or 2-core machine,
    where a worker only takes turns with the training for the same cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores - 1) if cores > 2 else 0


@functools.cache  # inspect.getsource parses the whole file: once per process is enough
def _field_comments(config: type) -> dict:
    """Each field's comment, with the lines `#   ...` that continue it."""
    comments, name = {}, None
    for line in inspect.getsource(config).splitlines():
        field_line, more = re.match(r"^    (\w+): .*?  # (.*)$", line), re.match(r"^    #   (.*)$", line)
        if field_line:
            name, comments[field_line[1]] = field_line[1], field_line[2]
        elif more and name:
            comments[name] += " " + more[1]
        else:
            name = None
    return comments


def parse_config(config: type, argv=None, description: str = ""):
    """The CLI built from a dataclass (TrainConfig): every field is a flag with its default, checked by CHECKS, its
    help the comment on its field, then what it accepts; --radius sets ModelConfig's."""
    p = cmdline.Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = _field_comments(config)
    for f in dataclasses.fields(config):
        if f.name in NOT_FLAGS:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        doc = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        check = CHECKS.get(f.name)
        accepts = f"{check.want}; " if getattr(check, "want", "") else ""
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=doc)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=check, nargs="+", default=list(default),
                           help=f"{doc} ({accepts}default: {' '.join(map(str, default))})")
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
    return config(model=model, **args)


@dataclass
class Process:
    """This process of the run: one device decided here; under torchrun its rank among `world` (DDP)."""
    device: torch.device
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:  # the first process: it alone prints, scores, writes files
        return self.rank == 0


def start_process(device: str) -> Process:
    """DDP when started by torchrun (gloo on CPUs, NCCL on GPUs), else one process; cuda when there is a GPU."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, local_rank = 0, 1, 0
    if ddp:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
    proc = Process(torch.device(f"cuda:{local_rank}" if name == "cuda" else "cpu"), ddp, rank, world, local_rank)
    if name == "cuda":
        torch.cuda.set_device(proc.device)
        torch.backends.cudnn.benchmark = True
    return proc


def end_process(proc: Process):
    """Under torchrun, the others wait for the first one's files (torchrun ends them all once one exits non-zero)."""
    if proc.ddp:
        dist.barrier()
        dist.destroy_process_group()


def broadcast(tensor, shape: tuple, proc: Process) -> torch.Tensor:
    """The first process's fp32 `tensor` (e.g. the centroids it fitted), on every process's device; the others
    give None and get it (under torchrun)."""
    tensor = torch.empty(shape) if tensor is None else tensor
    tensor = tensor.float().to(proc.device)
    if proc.ddp:
        dist.broadcast(tensor, 0)
    return tensor


def train_in_bf16(precision: str, proc: Process) -> bool:
    """model.encoder_in_bf16 for training (forward and backward); under torchrun the first process decides. Said in
    one line with --precision auto."""
    bf16 = encoder_in_bf16(precision, proc.device, backward=True, report=print if proc.master else None)
    if proc.ddp and precision == "auto":  # every process trains in the precision the first one measured
        choice = torch.tensor(int(bf16), device=proc.device)
        dist.broadcast(choice, 0)
        bf16 = bool(choice)
    if precision == "auto" and proc.master:
        print(f"training in {'bf16' if bf16 else 'fp32'} (--precision to choose)")
    return bf16


def validation_batches(clips, cfg, proc: Process) -> list:
    """The fixed validation triplets: clean samples of another seed (no jitter, at --size's scale whatever the
    zoom), `val_clips` of them in batches of batch_size, on the device."""
    val = copy.copy(clips)
    val.seed, val.jitter_p, val.min_scale = cfg.seed + 1, 0.0, 1.0
    items = [val[i]["clean"] for i in range(cfg.val_clips)]
    return [torch.stack(items[i:i + cfg.batch_size]).to(proc.device) for i in range(0, len(items), cfg.batch_size)]


def wrap_for_ddp(model: torch.nn.Module, proc: Process) -> torch.nn.Module:
    if not proc.ddp:
        return model
    if proc.device.type == "cuda":  # batch statistics over the global batch (SyncBatchNorm needs GPUs)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [proc.local_rank] if proc.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


class Run:
    """The loop's bookkeeping, a context (it holds the progress bar): `keep_going` before each step, `check` on its
    loss, `after_step` (log, validate, save) after it, `finish` at the end. Its `cfg` is what checkpoints save: a
    --minutes run saves the step count it fixed, so that --resume continues the same schedule."""

    def __init__(self, cfg, proc: Process, step: int, total: int, model, optimizer, centroids, validate, stop,
                 started: float):
        self.cfg, self.proc, self.step, self.total = cfg, proc, step, total
        self.model, self.optimizer, self.centroids = model, optimizer, centroids
        self.validate, self.stop = validate, stop
        self.budget = Budget(cfg.minutes, started) if cfg.minutes else None  # wall time from `started` on
        self.out = Path(cfg.out)
        self.ckpt = self.out / "ckpt.pt"
        self.log = self.out / "log.csv"
        self.val_ce, self.val_seconds = None, 0.0  # the latest validation score, and how long it took
        self.t_last, self.step_last, self.waited, self.t_ready = time.time(), step, 0.0, time.time()
        self.bar = tqdm(total=None if self.budget else total, initial=step, disable=not proc.master, desc="train",
                        unit="step")
        if proc.master:
            trim_log(self.log, step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # the progress bar closed however the run ends: an error is printed on its own line
        self.bar.close()

    def keep_going(self, step: int) -> bool:
        """Before a step: whether to take it. Fixes a --minutes run's length once its speed is known."""
        self.waited += time.time() - self.t_ready  # time the step waited for the loader
        budget, proc = self.budget, self.proc
        if budget and self.cfg.minutes:
            total = budget.fix_length(step, proc.ddp, proc.device, reserve=self.val_seconds)  # the last score's too
            if total is not None:
                self._set_length(total)
                self.bar.total = total
                self.bar.refresh()
                if proc.master:
                    self.bar.write(f"steps took {budget.speed:.2f} s each: with {budget.left():.0f} s of the "
                                   f"{budget.minutes:g} min left the run will take {total} steps")
        if step >= self.total:
            return False
        if budget and step > budget.first and budget.spent(proc.ddp, proc.device):
            if self.cfg.minutes and proc.master:  # it ran out before the length was fixed: the run ends here
                self.bar.write(f"--minutes {budget.minutes:g} ran out before the run's speed was measured (at step "
                               f"{step}, after start-up): it ends here, with the lr and p(gt) of its start")
            if self.cfg.minutes:
                self._set_length(step)
            return False
        return not self.stop.requested(proc.ddp, proc.device)  # a signal: every step done is saved at the end

    def _set_length(self, total: int):
        self.total = total
        self.cfg = dataclasses.replace(self.cfg, steps=total, minutes=0)  # saved: --resume keeps this schedule

    def check(self, loss: torch.Tensor, step: int):
        """Never step on a NaN: one line naming the last good checkpoint. Under torchrun every process stops
        together, none waits forever in the backward's all-reduce."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.proc.ddp:
            dist.all_reduce(bad)
        if bad.item():  # a CPU-GPU sync point, worth it
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}; the last good checkpoint "
                                     f"is {self.ckpt if self.ckpt.exists() else 'not written yet'}")

    def after_step(self, step: int, batch_size: int, lr: float, p_gt: float, loss, short, cycle):
        """After step `step` (counted from 1): the log row, the validation score, the checkpoint, when due."""
        cfg, master = self.cfg, self.proc.master
        self.step = step
        self.bar.update(1)
        last = step == self.total or (self.budget is not None and self.budget.left() < 0)
        scored = master and cfg.val_every and (step % cfg.val_every == 0 or last or step == 1)
        if scored:
            t = time.time()
            self.val_ce = self.validate()
            self.val_seconds = time.time() - t
        if master and (step % cfg.log_every == 0 or last or scored):
            now = time.time()
            clips_per_s = (step - self.step_last) * batch_size * self.proc.world / max(now - self.t_last, 1e-9)
            # data_wait: share of the time spent waiting for the loader; near 0 when it keeps up
            row = {"step": step, "loss": loss.item(), "short": short.item(), "cycle": cycle.item(),
                   "p_gt": round(p_gt, 4), "lr": lr, "clips_per_s": round(clips_per_s, 2),
                   "data_wait": round(self.waited / max(now - self.t_last, 1e-9), 3),
                   "val_ce": "" if not scored else round(self.val_ce, 4)}
            self.t_last, self.step_last, self.waited = now, step, 0.0
            append_log(self.log, row)
            val = "-" if self.val_ce is None else f"{self.val_ce:.3f}"
            left = f", {max(self.budget.left(), 0):.0f} s left" if self.budget else ""  # before the total is known
            self.bar.set_postfix_str(f"loss {row['loss']:.3f}, val_ce {val}, lr {lr:.2g}, p_gt {p_gt:.2f}, "
                                     f"{clips_per_s:.1f} clips/s, data wait {row['data_wait']:.0%}{left}")
        if master and (step % cfg.ckpt_every == 0 or step == self.total):
            self.save()
        self.t_ready = time.time()

    def save(self):
        total = None if self.cfg.minutes else self.total  # a --minutes run's length is not known until it is fixed
        save_atomic(checkpoint(self.model, self.optimizer, self.step, self.cfg, self.centroids, self.proc.world,
                               total), self.ckpt)

    def finish(self) -> Path:
        """Save and export (<out>/corrflow.pt), say how the run ended; SystemExit(128 + signal) after a signal."""
        self.bar.close()
        weights, step, stop = self.out / "corrflow.pt", self.step, self.stop
        if self.proc.master:
            if step < self.total and not stop.signum:  # the time budget ran out before the planned steps
                print(f"time budget of {self.budget.minutes:g} min spent at step {step} of {self.total}")
            self.save()
            export_weights(self.ckpt, weights)
            if stop.signum:
                print(f"stopped by {stop.name} at step {step}: saved {self.ckpt} and {weights}; continue with the "
                      f"same command and --resume")
            else:
                print(f"done: {step} steps; checkpoint {self.ckpt}, weights for propagate.py {weights}")
        end_process(self.proc)
        if stop.signum:
            raise SystemExit(stop.exit_code)
        return weights
