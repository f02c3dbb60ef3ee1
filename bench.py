"""Benchmarks: the restricted-attention op alone, one training iteration, and 480p mask propagation.

    python bench.py                                  # every part: kernel, train, propagate
    python bench.py kernel --dtype both              # the op alone; on a CPU only fp32
    python bench.py train --data gpu_data/train_videos_256 --workers 8
    python bench.py --device cpu --quick             # smaller everything, for a smoke test

Each row puts the op as `local_attention` runs it on this device (fused Triton kernels on CUDA, the PyTorch CPU path
on a CPU) beside a plain PyTorch baseline: on CUDA the PyTorch path on CUDA tensors; on a CPU, for the op alone, the
dense specification where it fits in memory. Kernel rows give the useful GFLOP/s (scores inside the windows and label
products) as a share of the fp32 matmul rate measured beside them. One markdown table at the end, for BENCHMARKS.md.
Times: medians after warm-up; GPU, `triton.testing.do_bench` (op alone) or synchronised perf_counter sections.
"""
import argparse
import copy
import ctypes
import itertools
import os
import statistics
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton
import triton.testing

import model as model_module
import propagate as propagate_module
from data import ClipDataset, RunBatches, read_frames
from kernels import local_attention_cpu, local_attention_dense
from model import CorrFlow, encode, load_checkpoint, load_encoder, net_encoder
from propagate import PropagationConfig, propagate_masks, read_mask
from train import TrainConfig, colour_dropout, colour_targets, colourise, nll

PARTS = ("kernel", "train", "propagate")
MiB = 2**20


@dataclass
class Row:
    """One line of the summary table: a case measured with a plain PyTorch baseline and with the op."""
    part: str
    case: str
    dtype: str
    plain: str = "-"
    op: str = "-"
    speedup: str = "-"
    memory: str = "-"  # peak memory above the level at entry, plain / op
    details: str = ""


def error_row(part: str, case: str, dtype: str, e: Exception) -> Row:
    """A case that raised, as a row of the table: its error in one line."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Row(part, case, dtype, "error", "error", details=f"{type(e).__name__}: {first}")


def guarded(part: str, case: str, dtype: str, make_rows) -> list:
    """make_rows(), each row printed; a case that raises becomes one row saying so, and the cases after it run."""
    try:
        rows = make_rows()
    except Exception as e:  # noqa: BLE001 - whatever failed, the table records it and the benchmark goes on
        rows = [error_row(part, case, dtype, e)]
    for row in rows:
        print(f"{row.part} | {row.case} | {row.dtype} | plain {row.plain} | op {row.op}", flush=True)
    return rows


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms. GPU: do_bench (it warms up and synchronises itself); CPU: perf_counter."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'extra' is, on exit, the peak memory in bytes above the level at entry, or None where it
    cannot be measured. GPU: max_memory_allocated. CPU (Linux): this process's resident high-water mark (VmHWM), reset
    on entry through /proc/self/clear_refs after glibc's malloc_trim has handed freed heap back to the OS."""
    mem, held = {"extra": None}, None
    if device.type == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            held = _status_kib("VmRSS")
        except OSError:
            pass
    yield mem
    if device.type == "cuda":
        torch.cuda.synchronize()
        mem["extra"] = torch.cuda.max_memory_allocated() - held
    elif held is not None:
        mem["extra"] = _status_kib("VmHWM") - held


def _status_kib(field: str) -> int:  # a field of /proc/self/status, in bytes
    return 1024 * next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(field + ":"))


@contextmanager
def attention_op(plain: bool):
    """The copy of model.py and propagate.py through their own dispatch, or forced to the PyTorch path."""
    saved = model_module.local_attention, propagate_module.local_attention
    if plain:
        model_module.local_attention = propagate_module.local_attention = local_attention_cpu
    try:
        yield
    finally:
        model_module.local_attention, propagate_module.local_attention = saved


def fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms"


def fmt_mem(mems: list) -> str:
    return " / ".join(f"+{m['extra'] / MiB:,.0f}" if m and m["extra"] is not None else "n/a" for m in mems) + " MiB"


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the op alone


KERNEL_CASES = (  # fwd+bwd: training, grads for all three inputs; fwd: propagation, under no_grad
    dict(name="train: 6 clips x 8 copies", B=48, C=64, H=64, W=64, R=1, K=16, radius=6, backward=True),
    *(dict(name="propagate 480p", B=1, C=64, H=120, W=216, R=4, K=8, radius=r, backward=False) for r in (6, 12)),
    dict(name="propagate 240p", B=1, C=64, H=60, W=108, R=4, K=8, radius=6, backward=False),
    # propagate.py's default copy at 480p: model+Lab features, 2 objects and the background, the first frame at
    # radius 12 and 3 recent ones at 8, the softmax over the 10 best candidates
    dict(name="propagate 480p, default copy", B=1, C=68, H=120, W=214, R=4, K=3, radius=(12, 8, 8, 8), topk=10,
         backward=False),
)
DENSE_MAX_BYTES = 2**30  # the dense specification is timed where its (B, HW, R*HW) affinity takes at most this


def useful_flop(case: dict, B: int) -> float:
    """2 x the multiply-adds of the scores inside the windows and of the label products (x3 with the backward); with
    top-k the label products are those of the k candidates kept."""
    H, W, topk = case["H"], case["W"], case.get("topk", 0)

    def window(r):  # (query, candidate) pairs of one reference
        return (sum(min(y + r, H - 1) - max(y - r, 0) + 1 for y in range(H))
                * sum(min(x + r, W - 1) - max(x - r, 0) + 1 for x in range(W)))

    radii = case["radius"] if isinstance(case["radius"], tuple) else (case["radius"],) * case["R"]
    pairs = sum(window(r) for r in radii)
    labelled = H * W * topk if topk else pairs
    return 2 * B * (pairs * case["C"] + labelled * case["K"]) * (3 if case["backward"] else 1)


def matmul_gflops(device: torch.device) -> float:
    """fp32 GFLOP/s of a 1024^3 matrix product (4096^3 on GPU, TF32 off) on this device, median of 5."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    return 2 * n**3 / (median_ms(lambda: a @ b, device, reps=5) * 1e-3) / 1e9


def measure_kernel(op, case: dict, B: int, dtype, device, reps: int):
    """(median ms, peak memory) of op on random inputs (an error, out of memory included, is the case's row)."""
    g = torch.Generator(device=device).manual_seed(0)  # the same inputs and upstream gradient for every op
    C, H, W, R, K, grad = case["C"], case["H"], case["W"], case["R"], case["K"], case["backward"]
    q, k, v, grad_out = (torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(grad and i < 3)
                         for i, shape in enumerate(((B, C, H, W), (B, R, C, H, W), (B, R, K, H, W), (B, K, H, W))))

    def run():
        with torch.set_grad_enabled(grad):
            out = op(q, k, v, case["radius"], 1.0, case.get("topk", 0))
            return torch.autograd.grad(out, (q, k, v), grad_out) if grad else out

    with peak_memory(device) as mem:  # also the warm-up
        run()
    return median_ms(run, device, reps), mem


def kernel_row(case: dict, dtype_name: str, device, reps: int, bandwidth: float) -> Row:
    """One case: the plain PyTorch baseline (CPU: dense specification, up to DENSE_MAX_BYTES; GPU: the PyTorch path)
    and this device's path, on the same random inputs."""
    cuda, dtype = device.type == "cuda", {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    B = min(6, case["B"]) if case["backward"] and not cuda else case["B"]  # 48 clips: seconds per run on a CPU
    affinity = B * (case["H"] * case["W"]) ** 2 * case["R"] * 4
    baseline = local_attention_cpu if cuda else (local_attention_dense if affinity <= DENSE_MAX_BYTES else None)
    base_ms, base_mem = measure_kernel(baseline, case, B, dtype, device, reps) if baseline else (None, None)
    ms, mem = measure_kernel(model_module.local_attention, case, B, dtype, device, reps)
    matmul = matmul_gflops(device)  # measured beside the op: a shared machine's load moves both alike
    flop = useful_flop(case, B)
    n_io = B * case["H"] * case["W"] * (case["C"] + case["K"]) * (1 + case["R"])  # inputs and output, elements
    floor_ms = n_io * (3 if case["backward"] else 1) * torch.finfo(dtype).bits / 8 / bandwidth * 1e3
    details = (f"useful {flop / 1e9:.2f} GFLOP: " + ", ".join(
        f"{name} {flop / t / 1e6:.1f} GFLOP/s = {flop / t / 1e6 / matmul:.0%}" for name, t in
        (("plain", base_ms), ("op", ms)) if t) + f" of fp32 matmul ({matmul:.0f} GFLOP/s); op at {floor_ms / ms:.1%} "
        f"of the floor (inputs read and output written once, x3 fwd+bwd, at {bandwidth / 1e9:.0f} GB/s)" + (
        "" if baseline else f"; dense specification not run: its affinity takes {affinity / 2**30:.1f} GiB"))
    radius = "/".join(map(str, case["radius"])) if isinstance(case["radius"], tuple) else case["radius"]
    sizes = (f"B={B} C={case['C']} {case['H']}x{case['W']} R={case['R']} K={case['K']} radius {radius}"
             + (f" top-{case['topk']}" if case.get("topk") else "") + (", fwd+bwd" if case["backward"] else ", fwd"))
    return Row("kernel", f"{case['name']}: {sizes}", dtype_name, fmt_ms(base_ms) if base_ms else "-", fmt_ms(ms),
               f"{base_ms / ms:.1f}x" if base_ms else "-", fmt_mem([base_mem, mem]), details)


def bench_kernel(device, dtypes, quick):
    """The op alone on each of KERNEL_CASES: yields a row per case and dtype, as it is measured."""
    x, y = (torch.ones(2**30 if device.type == "cuda" else 2**28, dtype=torch.uint8, device=device) for _ in "xy")
    bandwidth = 2 * x.numel() / (median_ms(lambda: y.copy_(x), device, reps=5) * 1e-3)  # bytes/s of a copy
    for case, dtype_name in itertools.product(KERNEL_CASES, dtypes if device.type == "cuda" else ["fp32"]):
        yield from guarded("kernel", case["name"], dtype_name,
                           lambda: [kernel_row(case, dtype_name, device, 3 if quick else 5, bandwidth)])


# ----------------------------------------------------------------------------------------------------------------
# Part 2: one training iteration, as train.main runs it


def load_batches(data, batch_size, size, workers, pin, n_batches):
    """(first batch, ms per batch over n_batches with worker start-up, or None; note): train.py's loader or noise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # videos too short for a clip are skipped with a warning each
            clips = ClipDataset(data, num_frames=3, frame_gap=4, size=size, jitter_p=0.1)
    except ValueError as e:
        frames = torch.rand(batch_size, 3, 3, size, size)
        return {"frames": frames, "clean": frames.clone()}, None, f"synthetic frames ({e})"
    loader = torch.utils.data.DataLoader(clips, num_workers=workers, pin_memory=pin,
                                         batch_sampler=RunBatches(batch_size, 0, n_batches))
    t = time.perf_counter()
    first = [batch for batch in loader][0]
    return first, (time.perf_counter() - t) * 1e3 / n_batches, f"{len(clips)} videos in {data}"


def train_step(model, optimizer, batch, centroids, cfg: TrainConfig, device, bf16: bool, step: int) -> dict:
    """One iteration of train.main (scheduled sampling fixed to true labels: 6 copies); ms per section."""
    times, t = {}, [time.perf_counter()]

    def lap(name):  # a CPU-GPU sync point, so that every section's time is its own
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name], t[0] = (now - t[0]) * 1e3, now

    frames, clean = (batch[k].to(device, non_blocking=True) for k in ("frames", "clean"))  # (B, 3 frames, 3, H, W)
    B = frames.shape[0]
    target, labels = colour_targets(clean, centroids)  # (B, 3, H, W), (B, 3, 16, H/4, W/4)
    x, _ = colour_dropout(frames, cfg.dropout_none_p, torch.Generator().manual_seed(cfg.seed * 7919 + step))
    lap("prep")
    f0, f1, f2 = encode(model, x.flatten(0, 1), bf16).view(B, 3, -1, *labels.shape[-2:]).unbind(1)  # (B, 64, h, w)
    lap("encoder")
    p1, p2, p0_short, p0_long = colourise(f0, f1, f2, labels, True, cfg.model.radius, cfg.model.temperature)
    lap("copy")
    loss = (nll(p1, target[:, 1]) + nll(p2, target[:, 2])
            + cfg.cycle_weight * (nll(p0_short, target[:, 0]) + nll(p0_long, target[:, 0])))
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss")
    lap("loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lap("bwd+opt")
    return times


def train_rows(B, size, dtype, batch, loader_ms, source, centroids, cfg, device, workers, reps, warmup) -> list:
    """One training-step case: the op (and on CUDA the PyTorch path beside it)."""
    cuda, bf16 = device.type == "cuda", dtype == "bf16"
    ops = ("plain", "op") if cuda else ("op",)
    torch.manual_seed(0)
    net = CorrFlow(cfg.model).to(device, memory_format=torch.channels_last if bf16 else torch.preserve_format).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    result = {}  # op -> (median ms per section over `reps` steps after `warmup`, memory of the first timed)
    for op in ops:
        with attention_op(op == "plain"):
            for i in range(warmup):
                train_step(net, optimizer, batch, centroids, cfg, device, bf16, i)
            with peak_memory(device) as mem:
                steps = [train_step(net, optimizer, batch, centroids, cfg, device, bf16, warmup)]
            steps += [train_step(net, optimizer, batch, centroids, cfg, device, bf16, warmup + i)
                      for i in range(1, reps)]
        result[op] = {name: statistics.median(s[name] for s in steps) for name in steps[0]}, mem
    total = {op: sum(times.values()) for op, (times, _) in result.items()}
    details = (f"data: loader {loader_ms:.0f} ms/batch, num_workers={workers} (overlaps the step), keeps up: "
               f"{'yes' if loader_ms <= min(total.values()) else 'no'}" if loader_ms else f"data: {source}")
    details += "; ms prep/encoder/copy/loss/bwd+opt: " + ", ".join(
        f"{op} " + "/".join(f"{t:.0f}" if t >= 10 else f"{t:.1f}" for t in times.values())
        for op, (times, _) in result.items())
    cell = {op: f"{fmt_ms(t)} = {B / t * 1e3:.1f} clips/s" for op, t in total.items()}
    return [Row("train", f"step, batch {B}, {size}x{size}", "bf16 autocast + channels_last" if bf16 else "fp32",
                cell.get("plain", "-"), cell["op"], f"{total['plain'] / total['op']:.2f}x" if cuda else "-",
                fmt_mem([None] * (not cuda) + [result[op][1] for op in ops]), details)]


def bench_train(device, dtypes, quick, data, workers):
    """One training iteration per batch shape and dtype, train.py's loader timed beside it: yields rows."""
    cuda = device.type == "cuda"
    # (clips per step, frame size); (warm-up steps, timed steps, loader batches). CPU: a minute or two on 2 cores
    shapes = ([(6, 256), (48, 256)] if cuda else [(4, 128), (6, 128)])[:2 - quick]
    warmup, reps, n_batches = ((2, 3, 4) if quick else (3, 10, 12)) if cuda else ((1, 1, 2) if quick else (1, 2, 3))
    cfg = TrainConfig()
    grid = torch.linspace(-60, 60, 4)  # 16 colour classes on a grid in (a, b): their number costs time, not their place
    centroids = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).view(16, 2).to(device)
    for B, size in shapes:
        case = f"step, batch {B}, {size}x{size}"
        try:
            batch, loader_ms, source = load_batches(data, B, size, workers, cuda, n_batches)
        except Exception as e:  # noqa: BLE001 - the loader's failure is this case's row
            yield from guarded("train", case, "-", lambda: [error_row("train", f"{case}: loading {data}", "-", e)])
            continue
        for dtype in dtypes:
            yield from guarded("train", case, dtype, lambda: train_rows(
                B, size, dtype, batch, loader_ms, source, centroids, cfg, device, workers, reps, warmup))


# ----------------------------------------------------------------------------------------------------------------
# Part 3: 480p propagation


def propagate_row(features, name, encoder, frames, mask, source, device, dtype: str) -> Row:
    """propagate.py's defaults with these features over the frames: the op (and on CUDA the PyTorch path beside it)."""
    cuda = device.type == "cuda"
    ops = ("plain", "op") if cuda else ("op",)
    cfg = PropagationConfig(features=features)  # the default settings

    def run(frames):  # ms; every frame's result ends in .cpu(), a sync point
        t = time.perf_counter()
        deque(propagate_masks(frames, mask, cfg, encoder, device), maxlen=0)
        return (time.perf_counter() - t) * 1e3

    per_frame, mems = {}, []
    for op in ops:
        with attention_op(op == "plain"):
            run(frames[:5 if cuda else 2])  # warm-up: cuDNN's algorithm search, Triton's compilation
            with peak_memory(device) as mem:
                times = [run(frames)]
            times += [run(frames) for _ in range(2 if cuda else 0)]
        per_frame[op] = statistics.median(times) / len(frames)
        mems.append(mem)
    cell = {op: f"{fmt_ms(ms)}/frame = {1e3 / ms:.1f} frames/s" for op, ms in per_frame.items()}
    return Row("propagate", f"{source}: {name} features, top {cfg.topk} of the first frame (radius "
               f"{cfg.first_radius}) + {cfg.num_recent} recent (radius {cfg.radius})", dtype,
               cell.get("plain", "-"), cell["op"], f"{per_frame['plain'] / per_frame['op']:.2f}x" if cuda else "-",
               fmt_mem([None] * (not cuda) + mems), "each frame encoded once, then copied; decoding excluded")


def bench_propagate(device, quick, davis, checkpoint):
    """480p propagation of DAVIS blackswan (random frames without it), model, lab and model+lab: yields rows."""
    cuda = device.type == "cuda"
    n = (10 if quick else 30) if cuda else (3 if quick else 6)
    seq = Path(davis) / "JPEGImages" / "480p" / "blackswan"
    annotation = Path(davis) / "Annotations" / "480p" / "blackswan" / "00000.png"
    if seq.is_dir() and annotation.is_file():
        frames = list(itertools.islice(read_frames(seq), n))  # decoded beforehand: not part of the timing
        mask, source = read_mask(annotation)[0], f"DAVIS blackswan, first {n} frames"
    else:  # random frames, a rectangle as the first mask
        frames = list(np.random.default_rng(0).integers(0, 256, (n, 480, 854, 3), dtype=np.uint8))
        mask, source = np.zeros((480, 854), np.uint8), f"{n} random 854x480 frames ({seq} not found)"
        mask[160:320, 280:560] = 1
    torch.manual_seed(0)
    net, model = ((load_checkpoint(checkpoint, map_location=device)[0], f"model ({Path(checkpoint).name})")
                  if checkpoint else (CorrFlow().eval(), "model (random init)"))
    stored = {torch.float16: "fp16", torch.float32: "fp32"}[propagate_module.storage_dtype(PropagationConfig(), device)]
    lab = load_encoder(None, "lab", device)
    cases = [("lab", "lab", lab, stored)]
    for p, enc in (("fp32", "fp32"), ("fp16", "bf16")):  # bf16 autocast: --precision auto on GPUs and bf16 CPUs
        encoder = [net_encoder(copy.deepcopy(net), device, p)]
        cases += [(f, f"{model}{' + lab' * (f != 'model')}, {enc} encoder", encoder + lab * (f != "model"),
                   f"{stored} refs, {enc} encoder") for f in ("model", "model+lab")]  # model+lab: the default
    for features, name, encoder, dtype in cases:
        yield from guarded("propagate", f"{source}: {name} features", dtype, lambda: [
            propagate_row(features, name, encoder, frames, mask, source, device, dtype)])


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model_name}, {torch.get_num_threads()} threads (load average {os.getloadavg()[0]:.1f} at the end)"


def summary(rows, device, walls) -> str:
    memory = "max_memory_allocated" if device.type == "cuda" else "resident high-water mark (VmHWM)"
    lines = [f"### {device_name(device)}: torch {torch.__version__}, triton {triton.__version__}", "",
             f"Times: medians after warm-up (see bench.py). Peak memory: {memory} above the level at entry. Kernel: "
             "random inputs; plain = dense specification (CPU) or PyTorch path (GPU). Train: one iteration of "
             "train.py, scheduled sampling on true labels (6 copies), 16 colour classes. Propagate: propagate.py's "
             "defaults.", "",
             "| part | case | dtype | plain PyTorch | op | speed-up | peak memory (plain / op) | details |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(v) for v in vars(r).values()) + " |" for r in rows]
    lines += ["", "Wall time per part: " + ", ".join(f"{part} {s:.0f} s" for part, s in walls.items()) + "."]
    return "\n".join(lines)


def main(parts, device="auto", dtype=None, quick=False, data="../shared/data/train_videos_256", workers=None,
         davis="../shared/data/davis", checkpoint=None) -> list:
    """Run the parts (all when empty), print the summary table; returns its rows."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch.backends.cudnn.benchmark = cuda = device.type == "cuda"  # as train.py
    dtypes = {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["bf16", "fp32"]}[dtype or "both"]
    workers = (4 if cuda else 1) if workers is None else workers
    rows, walls = [], {}
    for part in parts or PARTS:
        t = time.perf_counter()
        run = {"kernel": lambda: bench_kernel(device, dtypes, quick),
               "train": lambda: bench_train(device, dtypes, quick, data, workers),
               "propagate": lambda: bench_propagate(device, quick, davis, checkpoint)}[part]
        try:  # each case records its own error; this catches what fails around them (a bad checkpoint, ...)
            for row in run():  # rows as they are measured: an interruption keeps those done
                rows.append(row)
        except Exception as e:  # noqa: BLE001
            rows += guarded(part, "the whole part", "-", lambda: [error_row(part, "the whole part", "-", e)])
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: the table of what was measured, then stop
            rows.append(Row(part, "interrupted (SIGINT): the cases after the last row were not run", "-"))
            break
        finally:
            walls[part] = time.perf_counter() - t
    print("\n" + summary(rows, device, walls))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", help="kernel, train and/or propagate (default: all three)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], help="default: both")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller cases")
    parser.add_argument("--data", default="../shared/data/train_videos_256", help="training videos for the loader")
    parser.add_argument("--workers", type=int, help="DataLoader processes (default: 4 on GPU, 1 on CPU)")
    parser.add_argument("--davis", default="../shared/data/davis", help="DAVIS root holding JPEGImages/480p")
    parser.add_argument("--checkpoint", help="encoder weights for propagation (default: randomly initialised)")
    args = parser.parse_args()
    if set(args.parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(args.parts) - set(PARTS))}: choose from {', '.join(PARTS)}")
    main(args.parts, args.device, args.dtype, args.quick, args.data, args.workers, args.davis, args.checkpoint)
