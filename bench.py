"""Benchmarks: the restricted-attention op alone, one training iteration, and 480p mask propagation.

    python bench.py                                  # every part: kernel, train, propagate
    python bench.py kernel --dtype both              # the op alone; on a CPU only the fp32 reference
    python bench.py train --data gpu_data/train_videos_256 --workers 8
    python bench.py --device cpu --quick             # smaller everything, for a smoke test

Each part compares the plain PyTorch reference (`local_attention_cpu`) with the fused Triton op; the fused op needs
CUDA, so a CPU run measures the reference only. The run ends with one markdown table for BENCHMARKS.md.
Timing: on GPU the op alone is timed with `triton.testing.do_bench` (median after warm-up); training steps and
propagation are timed with time.perf_counter around CUDA-synchronised sections, after warm-up. On CPU every time is
the median of a few perf_counter repetitions after one warm-up run.
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
from kernels import local_attention_cpu
from model import CorrFlow, encode, load_checkpoint
from propagate import PropagationConfig, load_encoder, net_encoder, propagate_masks, read_mask
from train import TrainConfig, colour_dropout, colour_targets, colourise, nll

PARTS = ("kernel", "train", "propagate")
MiB = 2**20


@dataclass
class Row:
    """One line of the summary table: the same case measured with the reference and with the fused op."""
    part: str
    case: str
    dtype: str
    reference: str = "-"
    fused: str = "-"
    speedup: str = "-"
    memory: str = "-"  # peak memory above the level at entry, reference / fused
    details: str = ""


def error_row(part: str, case: str, dtype: str, e: Exception) -> Row:
    """A case that raised, as a row of the table: its error in one line."""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Row(part, case, dtype, "error", "error", details=f"{type(e).__name__}: {first}")


def guarded(part: str, case: str, dtype: str, make_rows) -> list:
    """make_rows() -> its rows, each printed as it comes; a case that raises becomes one row saying so, and the cases
    after it still run."""
    try:
        rows = make_rows()
    except Exception as e:  # noqa: BLE001 - whatever failed, the table records it and the benchmark goes on
        rows = [error_row(part, case, dtype, e)]
    for row in rows:
        log(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms. GPU: do_bench (it warms up and synchronises itself); CPU: perf_counter."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'extra' is, on exit, the peak memory in bytes above the level at entry (so the inputs and
    the model are not counted), or None where it cannot be measured.

    GPU: torch.cuda.max_memory_allocated (tensors, not the allocator's cache). CPU (Linux): the kernel's high-water
    mark of this process's resident memory (VmHWM), reset on entry through /proc/self/clear_refs, after glibc's
    malloc_trim has handed freed heap back to the OS (else reusing it would not show).
    """
    mem = {"extra": None}
    if device.type == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield mem
        torch.cuda.synchronize()
        mem["extra"] = torch.cuda.max_memory_allocated() - held
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        held = _status_kib("VmRSS")
    except OSError:
        yield mem
        return
    yield mem
    mem["extra"] = (_status_kib("VmHWM") - held) * 1024


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of y.copy_(x) (one read and one write of each byte): 1 GiB on GPU, 256 MiB on CPU."""
    n = 2**30 if device.type == "cuda" else 256 * MiB
    x = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, reps=5)
    return 2 * n / (ms * 1e-3)


@contextmanager
def attention_op(fused: bool):
    """The copy of model.py and propagate.py through the fused op (their own dispatch) or forced to the reference."""
    if fused:
        yield
        return
    saved = model_module.local_attention, propagate_module.local_attention
    model_module.local_attention = propagate_module.local_attention = local_attention_cpu
    try:
        yield
    finally:
        model_module.local_attention, propagate_module.local_attention = saved


def fmt_ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms"


def fmt_mem(mems: list) -> str:
    return " / ".join(f"+{m['extra'] / MiB:,.0f}" if m and m["extra"] is not None else "n/a" for m in mems) + " MiB"


def log(row: Row):
    print(f"{row.part} | {row.case} | {row.dtype} | ref {row.reference} | fused {row.fused}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Part 1: the op alone


KERNEL_CASES = (  # fwd+bwd: training, grads for all three inputs; fwd: propagation, under no_grad
    dict(name="train: 6 clips x 8 copies", B=48, C=64, H=64, W=64, R=1, K=16, radius=6, backward=True),
    dict(name="propagate 480p", B=1, C=64, H=120, W=216, R=4, K=8, radius=6, backward=False),
    dict(name="propagate 480p", B=1, C=64, H=120, W=216, R=4, K=8, radius=12, backward=False),
)


def measure_kernel(op, case: dict, B: int, dtype, device, reps: int):
    """(median ms or None if out of GPU memory, peak memory, input bytes, floor bytes) of op on random inputs."""
    g = torch.Generator(device=device).manual_seed(0)
    C, H, W, R, K, grad = case["C"], case["H"], case["W"], case["R"], case["K"], case["backward"]
    q, k, v = (torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)
               for shape in ((B, C, H, W), (B, R, C, H, W), (B, R, K, H, W)))
    grad_out = torch.randn(B, K, H, W, generator=g, device=device, dtype=dtype)  # the same for both ops
    n_in, n_out = q.numel() + k.numel() + v.numel(), grad_out.numel()
    floor = (3 * (n_in + n_out) if grad else n_in + n_out) * q.element_size()

    def run():
        with torch.set_grad_enabled(grad):
            out = op(q, k, v, case["radius"])
            return torch.autograd.grad(out, (q, k, v), grad_out) if grad else out

    try:
        if device.type == "cuda":
            ms = median_ms(run, device, reps)
            with peak_memory(device) as mem:
                run()
        else:
            with peak_memory(device) as mem:  # on CPU the memory run is also the warm-up
                run()
            ms = median_ms(run, device, reps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, n_in * q.element_size(), floor
    return ms, mem, n_in * q.element_size(), floor


def kernel_row(case: dict, dtype_name: str, device, reps: int, quick: bool, bandwidth: float) -> Row:
    """One kernel case: the reference, and on CUDA the fused op, timed on the same random inputs."""
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    B, note = case["B"], ""
    if not cuda and case["backward"]:  # seconds per run at B=48 on a CPU: keep the case under a minute
        probe_ms = measure_kernel(local_attention_cpu, case, 6, dtype, device, reps=1)[0]
        while B > 6 and (quick or probe_ms * B / 6 * (reps + 1) > 60e3):
            B //= 2
        if B != case["B"]:
            note = f"B={B}, not {case['B']}, on CPU ({probe_ms * case['B'] / 6e3:.0f} s per run at {case['B']}); "
    ref_ms, ref_mem, in_bytes, floor = measure_kernel(local_attention_cpu, case, B, dtype, device, reps)
    fused_ms, fused_mem = None, None
    if cuda:
        fused_ms, fused_mem, _, _ = measure_kernel(model_module.local_attention, case, B, dtype, device, reps)
    floor_ms = floor / bandwidth * 1e3
    details = (f"{note}inputs {in_bytes / MiB:,.0f} MiB; floor {floor / 1e6:,.1f} MB at {bandwidth / 1e9:,.0f} "
               f"GB/s copy = {fmt_ms(floor_ms)}; fraction of floor: " + ", ".join(
                   f"{name} {floor_ms / ms:.1%}" for name, ms in (("ref", ref_ms), ("fused", fused_ms)) if ms))
    sizes = (f"B={B} C={case['C']} {case['H']}x{case['W']} R={case['R']} K={case['K']} radius {case['radius']}, "
             + ("fwd+bwd" if case["backward"] else "fwd"))
    return Row("kernel", f"{case['name']}: {sizes}", dtype_name, fmt_ms(ref_ms) if ref_ms else "OOM",
               (fmt_ms(fused_ms) if fused_ms else "OOM") if cuda else "n/a (needs CUDA)",
               f"{ref_ms / fused_ms:.1f}x" if ref_ms and fused_ms else "-", fmt_mem([ref_mem, fused_mem]), details)


def bench_kernel(device, dtypes, quick):
    """The op alone on each of KERNEL_CASES: yields a row per case and dtype, as it is measured.

    Floor bytes: forward, every input read once and the output written once; fwd+bwd adds the backward's reads of
    the inputs, the output and the upstream gradient and its writes of the three gradients: 3 x (inputs + output).
    The (B, H, W) fp32 log-sum-exp and softmax correction are not counted. Floor time = bytes / copy bandwidth."""
    cuda = device.type == "cuda"
    bandwidth = copy_bandwidth(device)
    reps = 1 if quick else 3
    for case, dtype_name in itertools.product(KERNEL_CASES, dtypes if cuda else ["fp32"]):  # CPU: the fp32 ref
        yield from guarded("kernel", case["name"], dtype_name,
                           lambda: [kernel_row(case, dtype_name, device, reps, quick, bandwidth)])


# ----------------------------------------------------------------------------------------------------------------
# Part 2: one training iteration, as train.main runs it


def load_batches(data, batch_size, size, workers, pin, n_batches):
    """(first batch, DataLoader ms per batch or None, note). train.py's loader; synthetic frames without data.

    The time per batch is measured over n_batches batches, worker start-up included."""
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
    it = iter(loader)
    first = next(it)
    for _ in it:
        pass
    return first, (time.perf_counter() - t) * 1e3 / n_batches, f"{len(clips)} videos in {data}"


def train_step(model, optimizer, batch, centroids, cfg: TrainConfig, device, bf16: bool, step: int) -> dict:
    """One iteration of train.main (scheduled sampling fixed to true labels: 6 copies); ms per section."""
    times, t = {}, [time.perf_counter()]

    def lap(name):  # a CPU-GPU sync point, so that every section's time is its own
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times[name], t[0] = (now - t[0]) * 1e3, now

    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    frames = batch["frames"].to(device, non_blocking=True)  # (B, 3 frames, 3, H, W)
    clean = batch["clean"].to(device, non_blocking=True)
    B = frames.shape[0]
    target, labels = colour_targets(clean, centroids)  # (B, 3, H, W), (B, 3, 16, H/4, W/4)
    x, _ = colour_dropout(frames, cfg.dropout_none_p, gen)
    lap("prep")
    f0, f1, f2 = encode(model, x.flatten(0, 1), bf16).view(B, 3, -1, *labels.shape[-2:]).unbind(1)  # (B, 64, h, w)
    lap("encoder")
    p1, p2, p0_short, p0_long = colourise(f0, f1, f2, labels, True, cfg.model.radius, cfg.model.temperature)
    lap("copy")
    short = nll(p1, target[:, 1]) + nll(p2, target[:, 2])
    cycle = nll(p0_short, target[:, 0]) + nll(p0_long, target[:, 0])
    loss = short + cfg.cycle_weight * cycle
    if not torch.isfinite(loss):
        raise FloatingPointError("non-finite loss")
    lap("loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    lap("bwd+opt")
    return times


def encoder_ms(model, n_frames, size, device, bf16) -> float:
    """Encoder forward + backward on n_frames frames (its share of an iteration), median ms. On CPU one run: the
    model is warm from the training steps."""
    x = torch.rand(n_frames, 3, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last if bf16 else torch.contiguous_format)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        y.float().sum().backward()

    ms = median_ms(run, device, reps=1)
    model.zero_grad(set_to_none=True)
    return ms


def train_rows(B, size, dtype, batch, loader_ms, source, centroids, cfg, device, workers, reps, warmup,
               compare_encoding: bool) -> list:
    """One training-step case, the reference op and (on CUDA) the fused op; with compare_encoding also the cost of
    re-encoding frames at every copy, as the original code does."""
    cuda = device.type == "cuda"
    ops = ("ref", "fused") if cuda else ("ref",)
    bf16 = dtype == "bf16"
    torch.manual_seed(0)
    net = CorrFlow(cfg.model).to(device).train()
    net = net.to(memory_format=torch.channels_last) if bf16 else net  # as train.py does on GPU
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    result = {}  # op -> (median ms per section over `reps` steps after `warmup`, memory of the first timed)
    for op in ops:
        with attention_op(op == "fused"):
            for i in range(warmup):
                train_step(net, optimizer, batch, centroids, cfg, device, bf16, i)
            with peak_memory(device) as mem:
                steps = [train_step(net, optimizer, batch, centroids, cfg, device, bf16, warmup)]
            steps += [train_step(net, optimizer, batch, centroids, cfg, device, bf16, warmup + i)
                      for i in range(1, reps)]
        result[op] = {name: statistics.median(s[name] for s in steps) for name in steps[0]}, mem
    total = {op: sum(times.values()) for op, (times, _) in result.items()}
    keeps_up = loader_ms is not None and loader_ms <= min(total.values())
    details = (f"data: loader {loader_ms:.0f} ms/batch, num_workers={workers} (overlaps the step), keeps up: "
               f"{'yes' if keeps_up else 'no'}" if loader_ms else f"data: {source}")
    details += "; ms prep/encoder/copy/loss/bwd+opt: " + ", ".join(
        f"{op} " + "/".join(f"{t:.0f}" if t >= 10 else f"{t:.1f}" for t in times.values())
        for op, (times, _) in result.items())
    cell = {op: f"{fmt_ms(t)} = {B / t * 1e3:.1f} clips/s" for op, t in total.items()}
    rows = [Row("train", f"step, batch {B}, {size}x{size}", "bf16 autocast + channels_last" if bf16 else "fp32",
                cell["ref"], cell.get("fused", "n/a (needs CUDA)"),
                f"{total['ref'] / total['fused']:.2f}x" if cuda else "-",
                fmt_mem([result[op][1] for op in ops] + [None] * (not cuda)), details)]
    if compare_encoding:
        # the original CorrFlow code re-encodes frames at every copy: 16 encoder passes per clip, not 3
        once, again = (encoder_ms(net, n * B, size, device, bf16) for n in (3, 16))
        step = total[ops[-1]]
        rows.append(Row("train", f"encode each frame once vs at every copy, batch {B}, {size}x{size}", rows[0].dtype,
                        details=(f"{ops[-1]} op; encoder fwd+bwd {fmt_ms(once)} on 3 frames/clip, "
                                 f"{fmt_ms(again)} on 16: iteration {fmt_ms(step)} vs "
                                 f"{fmt_ms(step - once + again)}, {(step - once + again) / step:.2f}x the cost")))
    return rows


def bench_train(device, dtypes, quick, data, workers):
    """One training iteration per batch shape and dtype, train.py's loader timed beside it: yields rows."""
    cuda = device.type == "cuda"
    if cuda:  # (clips per step, frame size); (warm-up steps, timed steps, loader batches)
        shapes, (warmup, reps, n_batches) = [(6, 256), (48, 256)][:2 - quick], (2, 3, 4) if quick else (3, 10, 12)
    else:  # one to two minutes on 2 cores
        shapes = [(4, 128), (6, 128)][:2 - quick]
        warmup, reps, n_batches = (1, 1, 2) if quick else (1, 2, 3)
    cfg = TrainConfig()
    grid = torch.linspace(-60, 60, 4)  # 16 colour classes on a grid in (a, b): their number costs time, not their place
    centroids = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).view(16, 2).to(device)
    for B, size in shapes:
        case = f"step, batch {B}, {size}x{size}"
        try:
            batch, loader_ms, source = load_batches(data, B, size, workers, cuda, n_batches)
        except Exception as e:  # noqa: BLE001 - the loader's failure is this case's row
            row = error_row("train", f"{case}: loading {data}", "-", e)
            log(row)
            yield row
            continue
        if loader_ms is None:
            print(f"train: no DataLoader timing, {source}", flush=True)
        for dtype in dtypes:
            yield from guarded("train", case, dtype, lambda: train_rows(
                B, size, dtype, batch, loader_ms, source, centroids, cfg, device, workers, reps, warmup,
                compare_encoding=(B, size, dtype) == (*shapes[0], dtypes[0])))


# ----------------------------------------------------------------------------------------------------------------
# Part 3: 480p propagation


def propagate_row(features, name, encoder, frames, mask, source, device, dtype: str) -> Row:
    """propagate.py's default settings with these features, timed over the frames with the reference op and (on
    CUDA) the fused one; `dtype` names what propagate.py keeps its references in on this device, and the
    encoder's arithmetic."""
    cuda = device.type == "cuda"
    ops = ("ref", "fused") if cuda else ("ref",)
    n = len(frames)
    cfg = PropagationConfig(features=features)  # the default settings

    def run(frames):  # ms; every frame's result ends in .cpu(), a sync point
        t = time.perf_counter()
        deque(propagate_masks(frames, mask, cfg, encoder, device), maxlen=0)
        return (time.perf_counter() - t) * 1e3

    per_frame, mems = {}, []
    for op in ops:
        with attention_op(op == "fused"):
            run(frames[:5 if cuda else 2])  # warm-up: cuDNN's algorithm search, Triton's compilation
            with peak_memory(device) as mem:
                times = [run(frames)]
            times += [run(frames) for _ in range(2 if cuda else 0)]
        per_frame[op] = statistics.median(times) / n
        mems.append(mem)
    cell = {op: f"{fmt_ms(ms)}/frame = {1e3 / ms:.1f} frames/s" for op, ms in per_frame.items()}
    return Row("propagate", f"{source}: {name} features, top {cfg.topk} of the first frame (radius "
               f"{cfg.first_radius}) + {cfg.num_recent} recent (radius {cfg.radius})", dtype,
               cell["ref"], cell.get("fused", "n/a (needs CUDA)"),
               f"{per_frame['ref'] / per_frame['fused']:.2f}x" if cuda else "-",
               fmt_mem(mems + [None] * (not cuda)), "each frame encoded once, then copied; decoding excluded")


def bench_propagate(device, quick, davis, checkpoint):
    """480p propagation of DAVIS blackswan (random frames without it), model, lab and model+lab: yields rows."""
    cuda = device.type == "cuda"
    n = (10 if quick else 30) if cuda else (3 if quick else 6)
    seq = Path(davis) / "JPEGImages" / "480p" / "blackswan"
    annotation = Path(davis) / "Annotations" / "480p" / "blackswan" / "00000.png"
    if seq.is_dir() and annotation.is_file():
        frames = list(itertools.islice(read_frames(seq), n))  # decoded beforehand: not part of the timing
        mask, source = read_mask(annotation)[0], f"DAVIS blackswan, first {n} frames"
    else:
        print(f"propagate: {seq} not found: random 854x480 frames instead", flush=True)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (480, 854, 3), dtype=np.uint8) for _ in range(n)]
        mask, source = np.zeros((480, 854), np.uint8), f"{n} random 854x480 frames"
        mask[160:320, 280:560] = 1
    torch.manual_seed(0)
    net, model = ((load_checkpoint(checkpoint, map_location=device)[0], f"model ({Path(checkpoint).name})")
                  if checkpoint else (CorrFlow().eval(), "model (random init)"))
    stored = {torch.float16: "fp16", torch.float32: "fp32"}[propagate_module.storage_dtype(PropagationConfig(), device)]
    lab = load_encoder(None, "lab", device)
    # the encoder in fp32 and in bf16 autocast (what --precision auto runs on a GPU and on CPUs with bf16 units)
    encoders = {precision: [net_encoder(copy.deepcopy(net), device, precision)] for precision in ("fp32", "fp16")}
    cases = [("model", f"{model}, {enc} encoder", encoders[p], f"{stored} refs, {enc} encoder")
             for p, enc in (("fp32", "fp32"), ("fp16", "bf16"))]
    cases.append(("lab", "lab", lab, stored))
    cases += [("model+lab", f"{model} + lab, {enc} encoder", encoders[p] + lab, f"{stored} refs, {enc} encoder")
              for p, enc in (("fp32", "fp32"), ("fp16", "bf16"))]  # the default: one softmax over both
    for features, name, encoder, dtype in cases:
        yield from guarded("propagate", f"{source}: {name} features", dtype, lambda: [
            propagate_row(features, name, encoder, frames, mask, source, device, dtype)])


# ----------------------------------------------------------------------------------------------------------------
# Summary and command line


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model_name}, {torch.get_num_threads()} threads (load average {os.getloadavg()[0]:.1f} at the end)"


def summary(rows, device, walls) -> str:
    cuda = device.type == "cuda"
    memory = ("torch.cuda.max_memory_allocated above the tensors held at entry (inputs, model, optimiser)" if cuda
              else "peak resident memory (VmHWM, reset on entry) above the resident memory at entry")
    lines = [f"### {device_name(device)}: torch {torch.__version__}, triton {triton.__version__}", "",
             ("Times: `triton.testing.do_bench` medians (kernel), perf_counter medians of synchronised sections "
              "(train, propagate)." if cuda else "Times: perf_counter medians of 1 to 3 runs after a warm-up run.")
             + f" Peak memory: {memory}. Kernel: random inputs; floor time = (inputs read once + output written once, "
             "x 3 for fwd+bwd: the backward reads inputs, output and upstream gradient and writes three gradients; "
             "the fp32 log-sum-exp not counted) / measured copy bandwidth; fraction of floor = floor time / time. "
             "Train: one iteration of train.py with scheduled sampling on true labels (6 copies), 16 colour classes; "
             "data = DataLoader time per batch, worker start-up included. Propagate: propagate.py's default config, "
             "frames/s over the whole sequence.", "",
             "| part | case | dtype | reference | fused | speed-up | peak memory (ref / fused) | details |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(v) for v in vars(r).values()) + " |" for r in rows]
    lines += ["", "Wall time per part: " + ", ".join(f"{part} {s:.0f} s" for part, s in walls.items()) + "."]
    return "\n".join(lines)


def main(parts, device="auto", dtype=None, quick=False, data="../shared/data/train_videos_256", workers=None,
         davis="../shared/data/davis", checkpoint=None) -> list:
    """Run the parts (all when empty), print the summary table; returns its rows."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as train.py
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
            rows.append(error_row(part, "the whole part", "-", e))
            log(rows[-1])
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: the table of what was measured, then stop
            rows.append(Row(part, "interrupted (SIGINT): the cases after the last row were not run", "-"))
            walls[part] = time.perf_counter() - t
            break
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
