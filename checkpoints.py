"""A training run's files and where a run starts from: its training checkpoint (<out>/ckpt.pt), --resume and --init,
a --centroids file, the log CSV (<out>/log.csv), and the output folder it holds the lock of.

Every file is written through files.py (a temporary file renamed into place), so a crash, a full disk or a signal
never leaves half of one. Checkpoints written by earlier versions of train.py load: what they lack is derived.
"""
import csv
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from files import FolderLock, appending, atomic_write
from model import CHECKPOINT_FORMAT, export_weights, load_checkpoint, model_config

INIT_WARMUP = 50  # lr warm-up steps of a run started with --init from weights whose optimiser state is not in the file
SCHEDULE = ("steps", "epochs", "minutes", "batch_size")  # what --resume may not change: the run's length
# --resume takes these from the command line: they belong to the machine, not to the run
MACHINE_LOCAL = ("data", "out", "device", "workers", "resume", "log_every", "ckpt_every", "in_memory", "precision")


def checkpoint(model, optimizer, step: int, cfg, centroids, world: int = 1, total_steps: int = None) -> dict:
    """A training checkpoint: everything --resume needs to continue the run as if it had not stopped."""
    # samples_seen counts those of the runs this one continues: a run started from this file with --init goes on
    # from there (with its own data and draws), instead of replaying the same stream
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "total_steps": total_steps, "samples_seen": cfg.sample_offset + step * cfg.batch_size * world,
            "train_config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model),
            "centroids": centroids.cpu(), "rng": rng_states()}


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(states: dict):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


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


def resumed_config(cfg, saved: dict, ckpt_path: Path, master: bool = True):
    """--resume: the saved run's settings (a config of cfg's class), with this machine's MACHINE_LOCAL ones from `cfg`.

    A setting counts as given on the command line when it differs from both the saved value and the default. Given
    settings are ignored, and listed in one line, except the schedule's (SCHEDULE): a run's length cannot change
    halfway (the lr milestones and p(gt) are spread over it), so a longer run is refused with what to do instead."""
    config = type(cfg)
    try:
        saved = dict(saved)
        saved["model"] = model_config(saved["model"])
        saved["lr_halve_at"] = tuple(saved["lr_halve_at"])
        saved = config(**saved)
    except (TypeError, KeyError, AttributeError):  # settings of another version of train.py
        raise ValueError(f"{ckpt_path}: its saved settings do not match this train.py") from None
    default = config()
    given = {}  # flag -> value
    for name in [f.name for f in dataclasses.fields(config) if f.name not in MACHINE_LOCAL + ("model",)]:
        mine = getattr(cfg, name)
        if mine != getattr(saved, name) and mine != getattr(default, name):
            given[name] = mine
    for name in [f.name for f in dataclasses.fields(type(cfg.model))]:
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


def resume(cfg, master: bool = True) -> tuple:
    """--resume: (the training checkpoint of <out>, the saved run's settings); (None, cfg) without one."""
    path = Path(cfg.out) / "ckpt.pt"
    if not cfg.resume:
        return None, cfg
    if not path.is_file():
        if master:
            print(f"no checkpoint at {path}: starting a new run")
        return None, cfg
    state = load_training_state(path)
    return state, resumed_config(cfg, state["train_config"], path, master)


def finished(state: dict, cfg, master: bool = True) -> bool:
    """Whether a resumed run has no step left (its length saved, or fixed by --steps): then its weights are
    exported (again) and it ends at once, before reading any video."""
    total = state.get("total_steps") or cfg.steps
    if not total or state["step"] < total:
        return False
    if master:
        path = Path(cfg.out) / "ckpt.pt"
        with output_folder(path.parent):
            print(f"resuming {path} at step {state['step']}/{total}")
            export_weights(path, path.parent / "corrflow.pt")
        print(f"done: {state['step']} steps; checkpoint {path}, weights for propagate.py {path.parent / 'corrflow.pt'}")
    return True


def restore(model, optimizer, state, init, cfg, total: int, master: bool = True) -> int:
    """Load a resumed run's model, optimiser and random states (-> its step), or --init's weights and optimiser
    state where it has one (-> step 0)."""
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        if master:
            print(f"resuming {Path(cfg.out) / 'ckpt.pt'} at step {state['step']}/{total}")
        return state["step"]
    if init is not None:
        model.load_state_dict(init[0].state_dict())
        if "optimizer" in init[2]:
            try:
                optimizer.load_state_dict(init[2]["optimizer"])
            except (ValueError, KeyError) as e:
                raise ValueError(f"{cfg.init}: its optimiser state does not fit this model ({e})") from None
    return 0


def read_init(cfg):
    """--init: (its model, its centroids, its dict) and cfg set to continue its stream of samples, warmed up over
    INIT_WARMUP steps unless its optimiser state comes along; (None, cfg) without --init."""
    if not cfg.init:
        return None, cfg
    init = load_checkpoint(cfg.init)
    fresh_adam = "optimizer" not in init[2]
    return init, dataclasses.replace(cfg, sample_offset=samples_seen(init[2]),
                                     warmup_steps=cfg.warmup_steps or (INIT_WARMUP if fresh_adam else 0))


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


def trim_log(path: Path, step: int):
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


def append_log(path: Path, row: dict):
    new = not path.exists() or path.stat().st_size == 0
    with appending(path, newline="") as f:  # a failed write leaves no half row
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def output_folder(out: Path) -> FolderLock:
    """The run's folder, created, and its lock (files.FolderLock) to hold while the run writes into it."""
    out.mkdir(parents=True, exist_ok=True)
    return FolderLock(out)
