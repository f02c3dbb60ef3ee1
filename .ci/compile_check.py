"""Compile every launch of the fused kernels for GPU targets on a machine without a GPU; report what ptxas made.

    python .ci/compile_check.py              # one table: registers, spills, stack, shared memory per compile
    python .ci/compile_check.py --jobs 1     # compile in one process (default: one per CPU core)

Triton carries its own `ptxas`, so a kernel can be compiled all the way to a cubin for sm_80 (A100) and sm_90
(H100) without a driver. The launches are collected from the project's own call sites, run on meta tensors (shapes,
strides and dtypes without memory or arithmetic) with each kernel's launch replaced by a recorder:
- bench: `bench.py`'s KERNEL_CASES, fp32 and bf16, as `measure_kernel` makes their inputs, through the dispatch.
- train: `train.colourise` and `train.nll`, forward and backward, on the encoder's output as `model.encode` gives it
  on CUDA (bf16 under autocast, channels-last, split into frames by `view`/`unbind`; autocast cannot run on meta
  tensors, so that one layout is built here) and labels from `train.colour_targets`; the default size and the CPU
  recipe's 128-pixel crops, scheduled sampling on and off.
- propagate: `propagate._propagate` itself at real frame sizes (DAVIS 480p, the 428x240 demo, 1080p, an odd width,
  each at scale 1 and 0.5), the presets and the options that change a launch (20 recent frames, the first frame's
  radius 12, top-k off), model, Lab and model+Lab features, fp16 references (the default on a GPU) and fp32 ones,
  1 and 15 objects; what the dispatch sends to the PyTorch path (fp32 features of more than 64 channels) is not
  launched and not compiled.
- gpu test: the `gpu` tests' fp32 shapes (tests/test_kernels.py, GPU_SHAPES), forward and backward.
The argument specialisation (an integer equal to 1 becomes a constant, pointers and integers that are multiples of
16 get alignment hints) comes from Triton's own launch binder applied to the recorded arguments, so the check
compiles what a launch would (a meta tensor's data pointer is its byte offset, aligned as a CUDA allocation is).
Launches with the same specialisation compile to the same cubin: each is compiled once per target and its row lists
every case it serves. Nothing is cached across runs (every compile runs ptxas).

Exit status 1 when a compile fails, when ptxas reports any spill, or when the shared memory of a block exceeds the
target's limit. Run with TRITON_INTERPRET unset: the interpreter replaces the kernels by CPU functions.
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import os
import re
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KiB = 1024
# target name -> (compute capability, shared memory a block may use)
TARGETS = {"sm_80": (80, 163 * KiB), "sm_90": (90, 227 * KiB)}
META = "meta"


@dataclass
class Compile:
    """One distinct compile: a kernel with one argument specialisation for one target, and the cases it serves."""
    kernel: str
    target: str
    dtype: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: dict = field(default_factory=dict)  # case name -> {parameter: set of values}
    # filled in by the compile
    error: str = ""
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# The launches the project makes, recorded at its call sites


@contextlib.contextmanager
def recording(*modules):
    """Within: the op's kernel launches (`kernel[grid](*args, **meta)`) are appended to the yielded list instead of
    running, and the `local_attention` of each module (a call site) dispatches as it would for CUDA tensors: the
    fused op, or for what it leaves to the PyTorch path an empty result (nothing is launched)."""
    import torch
    from triton.runtime.jit import JITFunction

    op = importlib.import_module("kernels.local_attention")  # the module (`kernels.local_attention` is the function)
    launches = []

    def dispatch(query, refs, values, radius, temperature=1.0, topk=0):
        if op.fused_on_cuda(query):
            return op.local_attention_triton(query, refs, values, radius, temperature, topk)
        return torch.zeros(query.shape[0], values.shape[2], *query.shape[2:], device=query.device,
                           dtype=query.dtype, requires_grad=query.requires_grad or values.requires_grad)

    def recorder(kernel):  # `kernel[grid](...)` calls kernel.run(*args, grid=grid, warmup=False, **meta)
        return lambda *args, grid, warmup, **meta: launches.append((kernel, grid, args, meta))

    kernels = [k for k in vars(op).values() if isinstance(k, JITFunction)]
    saved = [m.local_attention for m in modules]
    for kernel in kernels:
        kernel.run = recorder(kernel)  # an instance attribute, in front of the class's method
    for m in modules:
        m.local_attention = dispatch
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run
        for m, f in zip(modules, saved):
            m.local_attention = f


def _bench_launches():
    """bench.py's kernel cases, fp32 and bf16, forward (and backward where the case has one), through the dispatch."""
    import torch

    import bench
    import model

    out = []
    for case in bench.KERNEL_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            B, C, H, W, R, K, grad = (case[k] for k in ("B", "C", "H", "W", "R", "K", "backward"))
            q, k, v = (torch.empty(*shape, device=META, dtype=dtype).requires_grad_(grad)
                       for shape in ((B, C, H, W), (B, R, C, H, W), (B, R, K, H, W)))
            with recording(model) as launches:
                o = model.local_attention(q, k, v, case["radius"], 1.0, case.get("topk", 0))
                if grad:
                    torch.autograd.grad(o, (q, k, v), torch.empty(B, K, H, W, device=META, dtype=dtype))
            out.append(("bench", dict(case=case["name"], r=case["radius"]), launches))
    return out


def _train_launches():
    """train.py's copies on CUDA under bf16 autocast, forward and backward, at the default size and the CPU recipe's
    crops, scheduled sampling on and off."""
    import torch

    import model
    import train

    cfg, mcfg = train.TrainConfig(), model.ModelConfig()
    out = []
    for size, B in ((cfg.size, cfg.batch_size), (128, 4)):
        h = w = size // 4
        for use_gt in (True, False):
            # what model.encode returns on CUDA: the encoder's bf16 output, channels-last (the model is converted)
            feats = torch.empty(B * 3, mcfg.feat_dim, h, w, device=META, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            f0, f1, f2 = feats.view(B, 3, -1, h, w).unbind(1)
            clean = torch.empty(B, 3, 3, size, size, device=META)
            target, labels = train.colour_targets(clean, torch.empty(cfg.num_clusters, 2, device=META))
            with recording(model) as launches:
                p1, p2, p0_short, p0_long = train.colourise(f0, f1, f2, labels, use_gt, mcfg.radius, mcfg.temperature)
                loss = (train.nll(p1, target[:, 1]) + train.nll(p2, target[:, 2])
                        + cfg.cycle_weight * (train.nll(p0_short, target[:, 0]) + train.nll(p0_long, target[:, 0])))
                loss.backward()
            out.append(("train", dict(B=B, size=f"{h}x{w}", gt=use_gt), launches))
    return out


def _propagate_launches():
    """propagate.py's loop on CUDA (fp16 references, and fp32 with --precision fp32; inference mode) at real frame
    sizes, its presets and the options that change a launch, every feature type, 1 and 15 objects."""
    import numpy as np
    import torch

    import propagate
    from model import FEATURES, CorrFlow, Encoder, downsample_labels, lab_features, to_tensor

    def once_per_shape(embed):  # meta outputs carry no values: one per input shape serves every frame
        outputs = {}

        def cached(rgb):
            if tuple(rgb.shape) not in outputs:
                outputs[tuple(rgb.shape)] = embed(rgb)
            return outputs[tuple(rgb.shape)]
        return cached

    encoders = {"model": Encoder(once_per_shape(CorrFlow().to(META).eval()), squared_distance=False),
                "lab": Encoder(once_per_shape(lab_features), squared_distance=True)}
    variants = {"": {}, "20 recent": dict(num_recent=20), "first radius 12": dict(first_radius=12),
                "all candidates": dict(topk=0)}
    out = []
    for (H, W), scale in [((480, 854), 1), ((480, 854), 0.5), ((240, 428), 1), ((1080, 1920), 1),
                          ((1080, 1920), 0.5), ((480, 853), 1)]:
        for preset, variant, features, precision in [(p, v, f, d) for p in propagate.PROTOCOLS for v in variants
                                                     for f in FEATURES for d in ("fp16", "fp32")]:
            settings = dict(propagate.PROTOCOLS[preset], **variants[variant], features=features, scale=scale,
                            precision=precision)
            cfg = dataclasses.replace(propagate.PropagationConfig(), **settings)
            for objects in (1, 15):
                n_frames = cfg.num_recent + 2  # every reference slot filled
                frames = (np.zeros((H, W, 3), np.uint8) for _ in range(n_frames))
                first = next(frames)
                h, w = to_tensor(first, torch.device(META), scale).shape[-2:]
                first_labels = downsample_labels(torch.empty(1, objects + 1, h, w, device=META))
                with recording(propagate) as launches:
                    for _ in propagate._propagate(first, frames, first_labels, cfg,
                                                  [encoders[f] for f in features.split("+")], torch.device(META)):
                        pass
                out.append((f"propagate {features}", dict(size=f"{W}x{H}", scale=scale, preset=preset,
                                                          variant=variant or "-", K=objects + 1,
                                                          precision=precision), launches))
    return out


def _gpu_test_launches():
    """The fp32 shapes of the `gpu` tests (tests/test_kernels.py, GPU_SHAPES), contiguous, forward and backward."""
    import torch

    from kernels import local_attention_triton

    spec = importlib.util.spec_from_file_location("_test_kernels", ROOT / "tests" / "test_kernels.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    out = []
    for i, (B, R, C, K, H, W, radius, temp) in enumerate(tests.GPU_SHAPES):
        q, k, v = (torch.empty(*shape, device=META).requires_grad_()
                   for shape in ((B, C, H, W), (B, R, C, H, W), (B, R, K, H, W)))
        with recording() as launches:
            o = local_attention_triton(q, k, v, radius, temp)
            torch.autograd.grad(o, (q, k, v), torch.empty(B, K, H, W, device=META))
        out.append(("gpu test", dict(shape=i), launches))
    return out


def _dtype_name(dtype) -> str:  # torch.bfloat16 -> "bf16"
    return str(dtype).replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")


@functools.lru_cache(maxsize=None)
def _binder(kernel, target):
    """(backend, launch binder) of `kernel` for `target`: built once (building them takes most of a specialisation)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def _specialise(kernel, args, meta, target):
    """What a launch of `kernel` with these arguments compiles for `target`: (signature, constexprs, attrs, options),
    from Triton's own binder, as `JITFunction.run` computes them before compiling."""
    from triton import knobs

    backend, binder = _binder(kernel, target)
    kwargs = dict(meta, debug=kernel.debug or knobs.runtime.debug)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def collect(targets=tuple(TARGETS)):
    """Every distinct compile of every launch the project makes, for each target, cases merged."""
    import torch

    compiles = {}
    specialised = {}  # launches with the same arguments (dtypes, data pointers, integers) specialise alike
    for case, params, launches in (_bench_launches() + _train_launches() + _propagate_launches()
                                   + _gpu_test_launches()):
        for kernel, _grid, args, meta in launches:
            dtype = _dtype_name(args[0].dtype)
            same = (kernel.__name__, repr(sorted(meta.items())),
                    tuple((str(a.dtype), a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args))
            for target in targets:
                if (same, target) not in specialised:
                    specialised[same, target] = _specialise(kernel, args, meta, target)
                signature, constexprs, attrs, options = specialised[same, target]
                key = (kernel.__name__, target, repr(signature), repr(constexprs), repr(attrs), repr(options))
                c = compiles.setdefault(key, Compile(kernel.__name__, target, dtype, signature, constexprs, attrs,
                                                     options))
                for k, v in params.items():
                    c.cases.setdefault(case, {}).setdefault(k, set()).add(v)
    return list(compiles.values())


# ----------------------------------------------------------------------------------------------------------------
# Compiling and reading ptxas' report

_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(c: Compile) -> Compile:
    """Compile to a cubin (ptxas runs, verbose; no cache hit can skip it) and fill in c's numbers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton import knobs

    local_attention = importlib.import_module("kernels.local_attention")
    _quiet()

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed to stdout
    knobs.compilation.always_compile = True
    kernel = getattr(local_attention, c.kernel)
    src = ASTSource(kernel, c.signature, c.constexprs, c.attrs)
    log = io.StringIO()
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[c.target][0], 32), options=c.options)
    except Exception as e:  # a compile error is a result: reported in the table
        c.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:200]
        return c
    c.seconds = time.perf_counter() - t
    c.shared = compiled.metadata.shared
    registers, frame = _REGISTERS.search(log.getvalue()), _FRAME.search(log.getvalue())
    if registers is None or frame is None:
        c.error = "no ptxas report in the compile's output"
        return c
    c.registers = int(registers.group(1))
    c.stack, c.spill_stores, c.spill_loads = (int(x) for x in frame.groups())
    return c


def _quiet():
    # triton 3.9 warns once per process that its FP fusion default will change; launches compile with the same
    # default, so the warning says nothing about this check
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def problems(c: Compile) -> list:
    """Why this compile fails the check (empty: it passes)."""
    if c.error:
        return [f"compile error: {c.error}"]
    out = []
    if c.spill_stores or c.spill_loads:
        out.append(f"spills {c.spill_stores}/{c.spill_loads} bytes (stores/loads)")
    if c.shared > TARGETS[c.target][1]:
        out.append(f"shared memory {c.shared} bytes > {TARGETS[c.target][1]}")
    return out


def _case_text(cases: dict) -> str:
    """{'propagate model': {'R': {2, 3}, 'K': {8}}} -> 'propagate model R=2,3 K=8'."""
    parts = []
    for case, params in cases.items():
        values = " ".join(f"{k}={','.join(str(v) for v in sorted(vs, key=lambda v: (str(type(v)), v)))}"
                          for k, vs in params.items())
        parts.append(f"{case} {values}")
    return "; ".join(parts)


def table(compiles) -> str:
    lines = ["| kernel | target | dtype | case | registers | spill stores / loads (bytes) | stack frame (bytes) "
             "| shared memory (bytes) | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in compiles:
        if c.error:
            numbers = f"compile error: {c.error} | | | | |"
        else:
            numbers = (f"{c.registers} | {c.spill_stores} / {c.spill_loads} | {c.stack} | {c.shared} "
                       f"| {c.seconds:.1f} |")
        lines.append(f"| {c.kernel.strip('_')} | {c.target} | {c.dtype} | {_case_text(c.cases)} | {numbers}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Useful work: how many of the scores a kernel computes fall inside a window


def useful_fraction(H, W, radius, TILE_H, TILE_W, BLOCK_N):
    """Exact fraction of the computed scores that are window candidates, for the kernels' walk over an H x W map.

    A program computes scores of its TILE_H x TILE_W tile (padding rows off the map included) against its halo in
    whole chunks of BLOCK_N positions: TILE_H * TILE_W * ceil(halo / BLOCK_N) * BLOCK_N scores per reference. The
    useful ones are the (query on the map, position in its window on the map) pairs. The same for the forward, the
    d(query) kernel and, by symmetry of the window relation, the d(refs, values) kernel (tiles of reference
    positions against the halo of queries that see them); the same for every number of references.
    """
    def window(p, n):  # (2 radius + 1) clipped to the map, for a position p of a side of length n
        return min(p + radius, n - 1) - max(p - radius, 0) + 1

    computed = useful = 0
    for y0 in range(0, H, TILE_H):
        for x0 in range(0, W, TILE_W):
            halo = ((min(y0 + TILE_H + radius, H) - max(y0 - radius, 0))
                    * (min(x0 + TILE_W + radius, W) - max(x0 - radius, 0)))
            computed += TILE_H * TILE_W * -(-halo // BLOCK_N) * BLOCK_N
            useful += (sum(window(y, H) for y in range(y0, min(y0 + TILE_H, H)))
                       * sum(window(x, W) for x in range(x0, min(x0 + TILE_W, W))))
    return useful / computed


def work_table(sizes=((64, 64), (120, 214), (120, 216)), radii=(6, 12)) -> str:
    """Useful fraction per kernel geometry (each dtype's CONFIGS entry) and map size: training (64x64), DAVIS 480p
    (120x214) and bench.py's propagation case (120x216)."""
    import torch

    from kernels.local_attention import CONFIGS

    columns = " | ".join(f"{h}x{w} r={r}" for h, w in sizes for r in radii)
    lines = [f"| kernels | dtype | tile, chunk | {columns} |",
             "|---|---|---|" + "---|" * (len(sizes) * len(radii))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cfg = CONFIGS[dtype]
        fractions = [useful_fraction(h, w, r, **cfg) for h, w in sizes for r in radii]
        lines.append(f"| fwd, bwd_query, bwd_ref | {_dtype_name(dtype)} "
                     f"| {cfg['TILE_H']}x{cfg['TILE_W']}, {cfg['BLOCK_N']} | "
                     + " | ".join(f"{f:.1%}" for f in fractions) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles run in this many processes")
    parser.add_argument("--target", choices=list(TARGETS), action="append", help="only this target (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: under the interpreter the kernels are CPU functions and cannot be compiled")
    import triton

    _quiet()
    t = time.perf_counter()
    compiles = collect(tuple(args.target or TARGETS))
    # the slowest compiles first, so that the processes finish together (fp32 and the backwards take longest)
    compiles.sort(key=lambda c: (c.dtype != "fp32", c.kernel == "_fwd_kernel"))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            compiles = list(pool.map(compile_one, compiles))
    else:
        compiles = [compile_one(c) for c in compiles]
    compiles.sort(key=lambda c: (c.kernel != "_fwd_kernel", c.kernel, c.dtype, c.target))
    print(f"triton {triton.__version__}: {len(compiles)} compiles in {time.perf_counter() - t:.0f} s "
          f"({args.jobs} processes)\n")
    print(table(compiles))
    print("\nFraction of the computed scores that fall inside a window (useful work):\n")
    print(work_table())
    failed = [(c, p) for c in compiles for p in problems(c)]
    for c, p in failed:
        print(f"FAIL {c.kernel.strip('_')} {c.target} {c.dtype} ({_case_text(c.cases)}): {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
