"""Compile every launch of the fused kernels for GPU targets on a machine without a GPU; report what ptxas made.

    python -m kernels.compile_check              # one table: registers, spills, stack, shared memory per compile
    python -m kernels.compile_check --jobs 1     # compile in one process (default: one per CPU core)

Triton carries its own `ptxas`, so a kernel can be compiled all the way to a cubin for sm_80 (A100) and sm_90
(H100) without a driver. The launches compiled here are the ones the project makes (built with the same helpers the
op uses, `_fwd_launches` / `_bwd_launches`, on CPU tensors with the layouts the callers really pass):
- train: `train.py` on CUDA, bf16 autocast: channels-last encoder output split into frames, labels from
  `colour_targets` or a previous copy's prediction, converted to the features' dtype; forward and both backwards.
- propagate: `propagate.py` on CUDA: fp32 contiguous features (the model's 64 channels or Lab's 3 + 1), the
  first + recent references stacked (R = 1..21), K = 8 and 16 label channels, radius 6, 12 or 12 for the first
  frame only, all candidates or the top 10; forward only (top-k adds its first pass, `_kth_kernel`).
- gpu test: the fp32 shapes of the `gpu` tests in `tests/test_kernels.py`; forward and both backwards.
The argument specialisation (an integer equal to 1 becomes a constant, pointers and integers that are multiples of
16 get alignment hints) comes from Triton's own launch binder applied to those arguments, so the check compiles
what a launch would. Launches with the same specialisation compile to the same cubin: each is compiled once per
target and its row lists every case it serves. Nothing is cached across runs (every compile runs ptxas).

Exit status 1 when a compile fails, when ptxas reports any spill, or when the shared memory of a block exceeds the
target's limit. Run with TRITON_INTERPRET unset: the interpreter replaces the kernels by CPU functions.
"""
import argparse
import contextlib
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
KiB = 1024
# target name -> (compute capability, shared memory a block may use)
TARGETS = {"sm_80": (80, 163 * KiB), "sm_90": (90, 227 * KiB)}


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
# The launches the project makes


def _train_launches():
    """train.py's copies on CUDA under bf16 autocast: (case, params, launches) for each distinct argument layout."""
    import torch

    from model import ModelConfig
    from train import TrainConfig, colour_targets
    from .local_attention import _bwd_launches, _fwd_launches

    cfg, mcfg = TrainConfig(), ModelConfig()
    B, C, h, w = cfg.batch_size, mcfg.feat_dim, cfg.size // 4, cfg.size // 4
    dt = torch.bfloat16
    # the encoder's output for the 3 frames of each clip, channels-last (the model is converted on CUDA), bf16
    feats = torch.empty(B * 3, C, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    f0, f1, f2 = feats.view(B, 3, C, h, w).unbind(1)
    # true labels as colour_targets makes them (the centroids do not matter, only the layout)
    clean = torch.rand(B, 3, 3, cfg.size, cfg.size)
    centroids = torch.randn(cfg.num_clusters, 2)
    _, labels = colour_targets(clean, centroids)  # (B, 3, K, h, w)
    K = labels.shape[2]
    predicted = torch.empty(B, K, h, w, dtype=torch.float32)  # a previous copy's output, `.float()`
    out = []
    for name, values in (("labels", labels[:, 0]), ("prediction", predicted)):
        # train.copy(): copy_labels(query, ref[:, None], labels[:, None].to(ref.dtype), radius, temperature)
        query, refs, vals = f1, f0[:, None], values[:, None].to(dt)
        o = torch.empty(B, K, h, w, dtype=dt)
        lse = torch.empty(B, h, w)
        grad_out = torch.empty(B, K, h, w, dtype=dt)  # the gradient of `.float()`: a bf16 copy, contiguous
        d_query, d_refs, d_vals = (torch.empty(t.shape, dtype=dt) for t in (query, refs, vals))
        radius, temp = mcfg.radius, mcfg.temperature
        launches = _fwd_launches(query, refs, vals, o, lse, radius, temp, gpu=True)
        launches += _bwd_launches(query, refs, vals, grad_out, lse, lse, d_query, d_refs, d_vals, radius, temp,
                                  gpu=True)
        out.append(("train", dict(B=B, C=C, size=f"{h}x{w}", K=K, r=radius, values=name), launches))
    return out


def _propagate_launches():
    """propagate.py on CUDA: fp32, contiguous, forward only (it runs under inference mode)."""
    import torch

    from .local_attention import _fwd_launches

    h, w = 120, 214  # DAVIS 480p: 480x854 frames, padded to 480x856, at stride 4
    out = []
    # Lab: 3 channels + 1 for the squared distance (model+lab's 68 channels run the reference: FUSED_FP32_MAX_CHANNELS)
    for features, C in (("model", 64), ("lab", 4)):
        for R in (1, 2, 4, 21):  # the first frame and up to 20 recent ones
            for K in (8, 16):
                for radius in (6, 12, "12 first, 6"):
                    radii = [12] + [6] * (R - 1) if radius == "12 first, 6" else radius
                    for topk in (0, 10):
                        # torch.stack of R (1, C, h, w) / (1, K, h, w) tensors: contiguous
                        query = torch.empty(1, C, h, w)
                        refs, vals = torch.empty(1, R, C, h, w), torch.empty(1, R, K, h, w)
                        o, lse, thr = torch.empty(1, K, h, w), torch.empty(1, h, w), torch.empty(1, h, w)
                        out.append((f"propagate {features}", dict(C=C, size=f"{h}x{w}", R=R, K=K, r=radius, topk=topk),
                                    _fwd_launches(query, refs, vals, o, lse, radii, 1.0, topk, thr if topk else None,
                                                  gpu=True)))
    return out


def _gpu_test_launches():
    """The fp32 shapes of the `gpu` tests (tests/test_kernels.py, GPU_SHAPES), contiguous, forward and backward."""
    import torch

    from .local_attention import _bwd_launches, _fwd_launches

    spec = importlib.util.spec_from_file_location("_test_kernels", ROOT / "tests" / "test_kernels.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    out = []
    for i, (B, R, C, K, H, W, radius, temp) in enumerate(tests.GPU_SHAPES):
        query, refs, vals = torch.empty(B, C, H, W), torch.empty(B, R, C, H, W), torch.empty(B, R, K, H, W)
        o, lse, grad_out = torch.empty(B, K, H, W), torch.empty(B, H, W), torch.empty(B, K, H, W)
        d_query, d_refs, d_vals = (torch.empty(t.shape) for t in (query, refs, vals))
        launches = _fwd_launches(query, refs, vals, o, lse, radius, temp, gpu=True)
        launches += _bwd_launches(query, refs, vals, grad_out, lse, lse, d_query, d_refs, d_vals, radius, temp,
                                  gpu=True)
        out.append(("gpu test", dict(shape=i), launches))
    return out


def _dtype_name(dtype) -> str:  # torch.bfloat16 -> "bf16"
    return str(dtype).replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")


def _specialise(kernel, args, meta, target):
    """What a launch of `kernel` with these arguments compiles for `target`: (signature, constexprs, attrs, options),
    from Triton's own binder, as `JITFunction.run` computes them before compiling."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(meta, debug=kernel.debug or knobs.runtime.debug)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def collect(targets=tuple(TARGETS)):
    """Every distinct compile of every launch the project makes, for each target, cases merged."""
    compiles = {}
    for case, params, launches in _train_launches() + _propagate_launches() + _gpu_test_launches():
        for kernel, _grid, args, meta in launches:
            dtype = _dtype_name(args[0].dtype)
            for target in targets:
                signature, constexprs, attrs, options = _specialise(kernel, args, meta, target)
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

    local_attention = importlib.import_module(__package__ + ".local_attention")  # (the package's name is the op)
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

    from .local_attention import CONFIGS

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
