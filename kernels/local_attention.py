"""Restricted (local) attention: the copy step of CorrFlow, as one fused op.

For every position p = (y, x) of the query map and every reference frame r, the candidates are the reference
positions q = (y + dy, x + dx) with |dy|, |dx| <= radius that lie inside the image. One softmax runs jointly over
all R x (2*radius+1)^2 candidates:

    a(p, r, q) = softmax_{r, q} ( <query[:, p], refs[r, :, q]> / temperature )
    out[:, p]  = sum_{r, q} a(p, r, q) * values[r, :, q]

Shapes: query (B, C, H, W), refs (B, R, C, H, W), values (B, R, K, H, W) -> out (B, K, H, W).
Out-of-image window slots are excluded by an explicit validity mask computed from coordinates; the position
itself is always a candidate, so every softmax has at least one term.

Two implementations with the same signature:
- `local_attention_ref`: plain PyTorch, the specification. Loops over window offsets on shifted views of the
  zero-padded references, so it never builds an unfolded (window x H x W x C) buffer; its memory is the score
  tensor (B, R*(2*radius+1)^2, rows, W), bounded by processing rows in chunks.
- `local_attention_triton`: fused Triton kernels (forward and backward), see the header of the Triton part below.
`local_attention` dispatches: the Triton path for CUDA tensors, the reference otherwise.
"""
import math

import torch
import torch.nn.functional as F

SCORE_BUDGET_BYTES = 256 * 2**20  # the reference keeps at most about this much of scores per row chunk


def _check(query, refs, values, radius, temperature):
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
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def local_attention_ref(query, refs, values, radius, temperature=1.0):
    """Plain PyTorch restricted attention (the specification). See the module docstring for the math."""
    _check(query, refs, values, radius, temperature)
    B, C, H, W = query.shape
    R, K = refs.shape[1], values.shape[2]
    D = 2 * radius + 1
    pad = (radius, radius, radius, radius)
    refs_p = F.pad(refs.reshape(B, R * C, H, W), pad).view(B, R, C, H + 2 * radius, W + 2 * radius)
    values_p = F.pad(values.reshape(B, R * K, H, W), pad).view(B, R, K, H + 2 * radius, W + 2 * radius)
    ys = torch.arange(H, device=query.device)
    xs = torch.arange(W, device=query.device)
    bytes_per_row = B * R * D * D * W * 4
    rows = max(1, min(H, SCORE_BUDGET_BYTES // bytes_per_row))
    out = []
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        q = query[:, None, :, y0:y1]  # (B, 1, C, h, W)
        scores, valid = [], []
        for dy in range(-radius, radius + 1):
            row_ok = ((ys[y0:y1] + dy >= 0) & (ys[y0:y1] + dy < H))[:, None]  # (h, 1)
            for dx in range(-radius, radius + 1):
                col_ok = ((xs + dx >= 0) & (xs + dx < W))[None, :]  # (1, W)
                k = refs_p[:, :, :, y0 + dy + radius:y1 + dy + radius, dx + radius:dx + radius + W]
                scores.append((q * k).sum(2))  # (B, R, h, W)
                valid.append(row_ok & col_ok)  # (h, W)
        scores = torch.stack(scores, 2) / temperature  # (B, R, D*D, h, W)
        valid = torch.stack(valid, 0)  # (D*D, h, W)
        scores = scores.masked_fill(~valid, float("-inf"))
        acc_dtype = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        attn = torch.softmax(scores.flatten(1, 2), dim=1, dtype=acc_dtype).to(query.dtype).view_as(scores)
        acc = 0
        i = 0
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                v = values_p[:, :, :, y0 + dy + radius:y1 + dy + radius, dx + radius:dx + radius + W]
                acc = acc + (attn[:, :, i, None] * v).sum(1)  # (B, K, h, W)
                i += 1
        out.append(acc)
    return torch.cat(out, 2)


def local_attention(query, refs, values, radius, temperature=1.0):
    """Restricted attention: fused Triton kernels for CUDA tensors, the plain PyTorch reference otherwise."""
    if query.is_cuda:
        return local_attention_triton(query, refs, values, radius, temperature)
    return local_attention_ref(query, refs, values, radius, temperature)


def local_attention_triton(query, refs, values, radius, temperature=1.0):
    raise NotImplementedError  # being written
