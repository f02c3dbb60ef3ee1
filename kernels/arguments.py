"""Argument checks of the restricted-attention op, shared by its implementations: one line per bad input."""
import math
import re


def radii(radius, R: int) -> list[int]:
    """The window radius of each of R references: `radius` is one int for all of them, or a sequence of R ints."""
    try:
        rs = [radius] * R if isinstance(radius, int) and not isinstance(radius, bool) else list(radius)
    except TypeError:  # neither an int nor a sequence
        rs = [radius]
    if len(rs) != R or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rs):
        raise ValueError(f"radius must be an integer >= 0 or a sequence of {R} of them (one per reference), "
                         f"got {radius!r}")
    return rs


def check_arguments(query, refs, values, radius, temperature, topk=0):
    """Raise ValueError, in one line, for inputs the op does not define (see kernels/local_attention.py)."""
    if query.dim() != 4:
        raise ValueError(f"query must be (B, C, H, W), got shape {tuple(query.shape)}")
    if refs.dim() != 5:
        raise ValueError(f"refs must be (B, R, C, H, W), got shape {tuple(refs.shape)}")
    if values.dim() != 5:
        raise ValueError(f"values must be (B, R, K, H, W), got shape {tuple(values.shape)}")
    B, C, H, W = query.shape
    if refs.shape[0] != B or refs.shape[2] != C or refs.shape[3:] != (H, W):
        raise ValueError(f"refs {tuple(refs.shape)} do not match query {tuple(query.shape)} in B, C, H, W")
    if values.shape[:2] != refs.shape[:2] or values.shape[3:] != (H, W):
        raise ValueError(f"values {tuple(values.shape)} do not match refs {tuple(refs.shape)} in B, R, H, W")
    if min(B, C, H, W, refs.shape[1], values.shape[2]) < 1:
        raise ValueError(f"empty input: query {tuple(query.shape)}, refs {tuple(refs.shape)}, "
                         f"values {tuple(values.shape)}")
    for name, t in (("query", query), ("refs", refs), ("values", values)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (query.dtype == refs.dtype == values.dtype):
        raise ValueError(f"dtypes differ: query {query.dtype}, refs {refs.dtype}, values {values.dtype}")
    if not (query.device == refs.device == values.device):
        raise ValueError(f"devices differ: query {query.device}, refs {refs.device}, values {values.device}")
    radii(radius, refs.shape[1])
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be an integer >= 0 (0: every candidate), got {topk!r}")


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis: B for the forward, B * R for d(refs)


def check_launch_limits(query, refs, values):
    """The fused kernels index with 32-bit offsets and put the batch (times R for d(refs)) on the grid's second axis:
    refuse, in one line, inputs past either limit instead of reading wrapped addresses or failing to launch. The
    outputs and gradients are contiguous and no larger than the inputs, so checking the inputs covers them."""
    B, R = refs.shape[:2]
    for name, t in (("query", query), ("refs", refs), ("values", values)):
        span = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1  # elements an offset can reach
        if max(span, t.numel()) >= 2**31:
            raise ValueError(f"the fused op indexes with 32-bit offsets: {name} {tuple(t.shape)} spans {span:,} "
                             "elements (at most 2^31 - 1); split the batch or the references into several calls")
    if B * R > MAX_GRID_Y:
        raise ValueError(f"the fused op launches B x R = {B} x {R} = {B * R} programs on the grid's second axis "
                         f"(at most {MAX_GRID_Y}); split the batch into several calls")


def check_interpreter(query):
    """Triton 3.6's CPU interpreter passes a launch's integer arguments as one-element arrays and converts them with
    int(), which NumPy 2.4 refuses for arrays of one dimension (Triton 3.7 squeezes them first): every launch would
    fail inside the kernel, so say what to install instead, in one line."""
    import numpy as np
    import triton

    def version(v):
        return tuple(int(n) for n in re.findall(r"\d+", v)[:2])

    if query.device.type == "cpu" and version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {np.__version__}: "
                           "install numpy<2.4 or triton>=3.7")
