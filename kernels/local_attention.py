"""Restricted (local) attention: the copy step of CorrFlow, as one fused op.

For every position p = (y, x) of the query map and every reference frame r, the candidates are the reference
positions q = (y + dy, x + dx) with |dy|, |dx| <= radius_r that lie inside the image (`radius`: one int for every
reference, or one per reference). One softmax runs jointly over the candidates of all R references:

    s(p, r, q) = <query[:, p], refs[r, :, q]> / temperature
    a(p, r, q) = softmax_{r, q} ( s(p, r, q) ), over the candidates with s >= the topk-th largest s of p (all: topk=0)
    out[:, p]  = sum_{r, q} a(p, r, q) * values[r, :, q]

Shapes: query (B, C, H, W), refs (B, R, C, H, W), values (B, R, K, H, W) -> out (B, K, H, W).
Out-of-image window slots are excluded by an explicit validity mask computed from coordinates; the position
itself is always a candidate, so every softmax has at least one term. Top-k keeps ties with the k-th score (so
possibly more than k terms), and all candidates of a position that has fewer than k.

Two implementations with the same signature:
- `local_attention_ref`: plain PyTorch, the specification: dense scores of each 8x8 tile of queries against the
  references' positions around it, masked to each query's window; memory bounded by processing tile rows in
  chunks (about 0.8 GB peak for 480p, 4 references, radius 12).
- `local_attention_triton`: fused Triton kernels (forward and backward), see the header of the Triton part below.
`local_attention` dispatches: the Triton path for CUDA tensors (except fp32 inputs of more than 64 channels, which
spill registers: the reference, with a warning), the reference otherwise.
"""
import math
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F

TILE = 8  # the reference takes queries in TILE x TILE tiles
SCORE_BUDGET_BYTES = 64 * 2**20  # ... and keeps at most about this much of scores at a time


def _check(query, refs, values, radius, temperature, topk=0):
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


def local_attention_ref(query, refs, values, radius, temperature=1.0, topk=0):
    """Plain PyTorch restricted attention (the specification). See the module docstring for the math.

    Queries are taken in TILE x TILE tiles; each tile's candidates in a reference are the positions of its halo (the
    tile grown by that reference's radius on every side), gathered with `unfold`. Scores of a tile against its halos
    are matrix products; the window relation (|dy|, |dx| <= radius, inside the image) is an explicit boolean mask.
    References that share a radius are gathered together. Tile rows are processed in chunks so that the scores stay
    under SCORE_BUDGET_BYTES.
    """
    _check(query, refs, values, radius, temperature, topk)
    B, C, H, W = query.shape
    R, K = refs.shape[1], values.shape[2]
    S = TILE
    tiles_y, tiles_x = -(-H // S), -(-W // S)
    Hp, Wp = tiles_y * S, tiles_x * S  # query map padded to whole tiles
    query_p = F.pad(query, (0, Wp - W, 0, Hp - H))
    query_pad = F.pad(query.new_zeros(1, 1, H, W), (0, Wp - W, 0, Hp - H), value=1.0)  # 1 on the tiles' padding
    by_radius = {}  # radius -> the references that have it
    for i, r in enumerate(radii(radius, R)):
        by_radius.setdefault(r, []).append(i)

    def candidates(r, index):
        """The references `index`, all of radius r -> halos(t0, t1): for tile rows t0..t1, their keys and values
        (B, n, len(index) * halo^2, C or K) and which of them each tile position may see (n, S^2, len(index) * halo^2)."""
        halo, n_refs = S + 2 * r, len(index)
        pad = (r, r + Wp - W, r, r + Hp - H)  # references padded by the radius (and the tiles' padding)
        refs_p = F.pad(refs[:, index].reshape(B * n_refs, C, H, W), pad)
        values_p = F.pad(values[:, index].reshape(B * n_refs, K, H, W), pad)
        inside_p = F.pad(query.new_ones(1, 1, H, W), pad)  # 1 where a padded position is a real pixel
        # near[i, j]: halo position j lies in the window of tile position i (offsets are the same for every tile)
        offsets = torch.arange(halo, device=query.device) - r
        near_1d = (torch.arange(S, device=query.device)[:, None] - offsets[None, :]).abs() <= r  # (S, halo)
        near = (near_1d[:, None, :, None] & near_1d[None, :, None, :]).reshape(S * S, halo * halo)

        def unfold(x, channels, t0, t1):  # padded (B*n_refs, ch, ., .) -> (B, tiles, n_refs*halo^2, ch)
            x = F.unfold(x[:, :, t0 * S:t1 * S + 2 * r], halo, stride=S).view(B, n_refs, channels, halo * halo, -1)
            return x.permute(0, 4, 1, 3, 2).reshape(B, -1, n_refs * halo * halo, channels)

        def halos(t0, t1):
            inside = F.unfold(inside_p[:, :, t0 * S:t1 * S + 2 * r], halo, stride=S)[0].T > 0  # (n, halo^2)
            padding = F.unfold(query_pad[:, :, t0 * S:t1 * S], S, stride=S)[0].T > 0  # (n, S^2) queries off the map
            # a query off the map (tile padding, cropped at the end) may see anything: no all -inf row, no NaN
            valid = (near[None] & (inside[:, None, :] | padding[:, :, None])).repeat(1, 1, n_refs)
            return unfold(refs_p, C, t0, t1), unfold(values_p, K, t0, t1), valid

        return halos

    groups = [candidates(r, index) for r, index in by_radius.items()]
    n_candidates = sum(len(index) * (S + 2 * r) ** 2 for r, index in by_radius.items())
    bytes_per_tile_row = B * tiles_x * S * S * n_candidates * 4
    rows = max(1, min(tiles_y, SCORE_BUDGET_BYTES // bytes_per_tile_row))
    out = []
    for t0 in range(0, tiles_y, rows):
        t1 = min(tiles_y, t0 + rows)
        keys, vals, valid = (torch.cat(parts, -2 if i < 2 else -1)
                             for i, parts in enumerate(zip(*(halos(t0, t1) for halos in groups))))
        q = F.unfold(query_p[:, :, t0 * S:t1 * S], S, stride=S).view(B, C, S * S, -1).permute(0, 3, 2, 1)
        scores = (q @ keys.transpose(-1, -2)) / temperature  # (B, n, S^2, candidates)
        scores = scores.masked_fill(~valid, float("-inf"))  # a real query always sees itself
        if 0 < topk < scores.shape[-1]:  # keep the scores >= the k-th largest (ties kept; -inf when fewer valid)
            kth = scores.topk(topk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        acc_dtype = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
        attn = torch.softmax(scores, dim=-1, dtype=acc_dtype).to(query.dtype)  # one softmax over all R refs
        o = attn @ vals  # (B, n, S^2, K)
        o = o.permute(0, 3, 2, 1).reshape(B, K * S * S, -1)
        out.append(F.fold(o, ((t1 - t0) * S, Wp), S, stride=S))  # (B, K, rows, Wp)
    return torch.cat(out, 2)[:, :, :H, :W]


# --------------------------------------------------------------------------------------------------------------
# Fused Triton path.
#
# Supported: any B, C, K, R, H, W >= 1, one radius >= 0 per reference, top-k up to MAX_TOPK (a first pass,
# `_kth_kernel`, finds each query's k-th score; the other kernels mask below it); fp32, fp16 and bf16 inputs (all three the same dtype),
# arbitrary strides (no copies are made). Scores, softmax statistics and sums accumulate in fp32. fp32 inputs use
# 3xTF32 products on a GPU (input_precision="tf32x3": each operand split into a TF32 head and tail, three
# tensor-core products; close to fp32, see `_precision`) and exact fp32 in the CPU interpreter. Gradients for query,
# refs and values.
#
# Tiling. A program owns a TILE_H x TILE_W tile of query positions of one batch element. The union of the windows
# of its queries is the tile grown by `radius` on each side, clipped to the image (the "halo"). The program walks
# the halo of every reference in chunks of BLOCK_N positions: scores for the whole tile with one `tl.dot`, a mask
# from integer coordinates (|dy|, |dx| <= radius), and an online softmax (running max and sum, as in flash
# attention) shared by all references, so the R references form one joint softmax without any concatenation.
# Nothing of size window x H x W is written to global memory.
#
# Backward. The forward saves its inputs, its output and the per-position log-sum-exp (B, H, W) in fp32; nothing
# else. One kernel recomputes the scores per query tile and accumulates d(query); a second kernel owns a tile of
# reference positions and walks the halo of *queries* that can see it (the window relation is symmetric), so
# d(refs) and d(values) are accumulated without atomics: deterministic.
#
# Tile shapes (`CONFIGS`), chosen so that no kernel spills registers on sm_80 or sm_90 (`python
# .ci/compile_check.py` compiles every launch the project makes for both and fails on a spill):
# - 16-bit inputs: 8x8 query tiles (64 rows: a whole warpgroup MMA on sm_90), halo chunks of 32 positions.
# - fp32 inputs: 4x8 tiles, chunks of 16. The 3xTF32 dot keeps each operand and its TF32 head and tail in registers,
#   and with all C = 64 channels of the queries and of a chunk of keys live at once, wider chunks or taller tiles
#   spill on one target or the other. Above 64 channels (model+lab's 68, padded to 128) every shape tried spills. (Exact fp32, "ieee", compiles to an FMA loop that spills 11-19 KB per thread
#   at 8x8 tiles with chunks of 64.)
# Short chunks waste less in the last chunk of each halo, and smaller tiles see more of their halo: BENCHMARKS.md
# gives the fraction of computed scores that fall inside a window.
# --------------------------------------------------------------------------------------------------------------
import triton
import triton.language as tl

# tile and chunk shape per input dtype: (TILE_H, TILE_W) query positions per program, BLOCK_N halo positions per chunk
CONFIGS = {
    torch.float32: dict(TILE_H=4, TILE_W=8, BLOCK_N=16),
    torch.float16: dict(TILE_H=8, TILE_W=8, BLOCK_N=32),
    torch.bfloat16: dict(TILE_H=8, TILE_W=8, BLOCK_N=32),
}
# fp32 inputs of more channels than this (padded to 128: model+lab's 64 + 4) spill registers on sm_90 at every tile
# shape tried (2x8 and 4x8 tiles, 4 or 8 warps: 12-64 bytes): `local_attention` runs the reference for them on CUDA
FUSED_FP32_MAX_CHANNELS = 64
# ptxas' register limit per thread (.maxnreg). Without it ptxas may aim at a higher occupancy and spill a few bytes
# at 168 registers rather than use the ~230 these kernels need; the limit lets it use all 255 before spilling.
MAXNREG = 255
MAX_TOPK = 64  # top-k's first pass keeps the best next_power_of_2(topk) scores of each query in registers
LOG2E = 1.4426950408889634


@triton.jit
def _positions(H, W, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """This program's tile: its positions' coordinates (M,) and which of them are inside the image."""
    n_tiles_w = tl.cdiv(W, TILE_W)
    y0 = (tl.program_id(0) // n_tiles_w) * TILE_H
    x0 = (tl.program_id(0) % n_tiles_w) * TILE_W
    m = tl.arange(0, TILE_H * TILE_W)
    ys = y0 + m // TILE_W
    xs = x0 + m % TILE_W
    return ys, xs, (ys < H) & (xs < W)


@triton.jit
def _halo(H, W, radius, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """The positions within `radius` of this program's tile, clipped to the image: origin, row length and size."""
    n_tiles_w = tl.cdiv(W, TILE_W)
    y0 = (tl.program_id(0) // n_tiles_w) * TILE_H
    x0 = (tl.program_id(0) % n_tiles_w) * TILE_W
    hy0 = tl.maximum(y0 - radius, 0)
    hx0 = tl.maximum(x0 - radius, 0)
    halo_w = tl.minimum(x0 + TILE_W + radius, W) - hx0
    halo = (tl.minimum(y0 + TILE_H + radius, H) - hy0) * halo_w
    return hy0, hx0, halo_w, halo


@triton.jit
def _chunk_scores(q, k_base, stride_kc, stride_kh, stride_kw, c, C, qy, qx, radius, hy0, hx0, halo_w, halo, start,
                  scale_log2, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """BLOCK_N halo positions of one reference from `start`, against the tile's queries q (M, C_PAD): their
    coordinates (N,) (inside the image where k_in), their keys (C_PAD, N), the scores (M, N) in log2 units and
    which of those lie in each query's window. Top-k's first pass and the forward compute their scores here, so
    identically (`_bwd_query_kernel` spells it out, to order its loads)."""
    n = start + tl.arange(0, BLOCK_N)
    ky = hy0 + n // halo_w
    kx = hx0 + n % halo_w
    k_in = n < halo
    k_t = tl.load(k_base + c[:, None] * stride_kc + ky[None, :] * stride_kh + kx[None, :] * stride_kw,
                  mask=(c[:, None] < C) & k_in[None, :], other=0.0)  # (C_PAD, N)
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2  # (M, N)
    valid = (k_in[None, :] & (tl.abs(ky[None, :] - qy[:, None]) <= radius)
             & (tl.abs(kx[None, :] - qx[:, None]) <= radius))
    return ky, kx, k_in, k_t, s, valid


@triton.jit
def _kth_kernel(
    q_ptr, k_ptr, thr_ptr, radii_ptr,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kw,
    R, C, H, W, topk, scale_log2,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    C_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """Top-k's first pass: the topk-th largest score (log2 units) of every query of a tile, over the windows of all
    references; -inf when a query has fewer candidates. The best BLOCK_N scores so far stay sorted, descending; a
    chunk sorted ascending against them, element by element, keeps the BLOCK_N largest of both (the first step of
    a bitonic merge), which are sorted again. BLOCK_N >= topk."""
    b = tl.program_id(1)
    qy, qx, q_in = _positions(H, W, TILE_H, TILE_W)
    c = tl.arange(0, C_PAD)
    q = tl.load(q_ptr + b * stride_qb + c[None, :] * stride_qc + qy[:, None] * stride_qh + qx[:, None] * stride_qw,
                mask=q_in[:, None] & (c[None, :] < C), other=0.0)  # (M, C_PAD)
    best = tl.full([TILE_H * TILE_W, BLOCK_N], float("-inf"), tl.float32)  # (M, N), descending along N
    for r in range(R):
        radius = tl.load(radii_ptr + r)
        hy0, hx0, halo_w, halo = _halo(H, W, radius, TILE_H, TILE_W)
        k_base = k_ptr + b * stride_kb + r * stride_kr
        for start in range(0, halo, BLOCK_N):
            ky, kx, k_in, k_t, s, valid = _chunk_scores(q, k_base, stride_kc, stride_kh, stride_kw, c, C, qy, qx,
                                                        radius, hy0, hx0, halo_w, halo, start, scale_log2, BLOCK_N,
                                                        PRECISION)
            s = tl.where(valid, s, float("-inf"))
            best = tl.sort(tl.maximum(best, tl.sort(s, 1)), 1, descending=True)
    col = tl.arange(0, BLOCK_N)
    kth = tl.sum(tl.where(col[None, :] == topk - 1, best, 0.0), 1)  # (M,)
    tl.store(thr_ptr + b * H * W + qy * W + qx, kth, mask=q_in)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, thr_ptr, radii_ptr,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vr, stride_vk, stride_vh, stride_vw,
    stride_ob, stride_ok, stride_oh, stride_ow,
    R, C, K, H, W, scale_log2,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    C_PAD: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr, TOPK: tl.constexpr,
):
    b = tl.program_id(1)
    qy, qx, q_in = _positions(H, W, TILE_H, TILE_W)  # (M,) query coordinates
    c = tl.arange(0, C_PAD)
    kk = tl.arange(0, K_PAD)
    q = tl.load(q_ptr + b * stride_qb + c[None, :] * stride_qc + qy[:, None] * stride_qh + qx[:, None] * stride_qw,
                mask=q_in[:, None] & (c[None, :] < C), other=0.0)  # (M, C_PAD)
    if TOPK:  # only scores >= each query's topk-th largest (from _kth_kernel) take part
        thr = tl.load(thr_ptr + b * H * W + qy * W + qx, mask=q_in, other=float("-inf"))

    m_i = tl.full([TILE_H * TILE_W], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([TILE_H * TILE_W], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([TILE_H * TILE_W, K_PAD], tl.float32)  # running weighted sum of values
    for r in range(R):
        # the halo holds every position of reference r that some query of the tile can see
        radius = tl.load(radii_ptr + r)
        hy0, hx0, halo_w, halo = _halo(H, W, radius, TILE_H, TILE_W)
        k_base = k_ptr + b * stride_kb + r * stride_kr
        v_base = v_ptr + b * stride_vb + r * stride_vr
        for start in range(0, halo, BLOCK_N):
            ky, kx, k_in, k_t, s, valid = _chunk_scores(q, k_base, stride_kc, stride_kh, stride_kw, c, C, qy, qx,
                                                        radius, hy0, hx0, halo_w, halo, start, scale_log2, BLOCK_N,
                                                        PRECISION)
            if TOPK:
                valid = valid & (s >= thr[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no candidate yet: avoid inf - inf
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(v_base + ky[:, None] * stride_vh + kx[:, None] * stride_vw + kk[None, :] * stride_vk,
                        mask=k_in[:, None] & (kk[None, :] < K), other=0.0)  # (N, K_PAD)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows of the tile have no candidate
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * stride_ob + kk[None, :] * stride_ok + qy[:, None] * stride_oh + qx[:, None] * stride_ow,
             out.to(out_ptr.dtype.element_ty), mask=q_in[:, None] & (kk[None, :] < K))
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_safe)
    tl.store(lse_ptr + b * H * W + qy * W + qx, lse, mask=q_in)


@triton.jit
def _bwd_query_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, thr_ptr, radii_ptr, dq_ptr,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vr, stride_vk, stride_vh, stride_vw,
    stride_ob, stride_ok, stride_oh, stride_ow,
    R, C, K, H, W, scale_log2, inv_temperature,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    C_PAD: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr, TOPK: tl.constexpr,
):
    """d(query) for one tile of queries: recompute p, then dq = sum_n p * (dO.v_n - delta) * k_n / T."""
    b = tl.program_id(1)
    qy, qx, q_in = _positions(H, W, TILE_H, TILE_W)
    c = tl.arange(0, C_PAD)
    kk = tl.arange(0, K_PAD)
    q = tl.load(q_ptr + b * stride_qb + c[None, :] * stride_qc + qy[:, None] * stride_qh + qx[:, None] * stride_qw,
                mask=q_in[:, None] & (c[None, :] < C), other=0.0)  # (M, C_PAD)
    do = tl.load(do_ptr + b * stride_ob + kk[None, :] * stride_ok + qy[:, None] * stride_oh + qx[:, None] * stride_ow,
                 mask=q_in[:, None] & (kk[None, :] < K), other=0.0)  # (M, K_PAD)
    lse = tl.load(lse_ptr + b * H * W + qy * W + qx, mask=q_in, other=0.0)
    delta = tl.load(delta_ptr + b * H * W + qy * W + qx, mask=q_in, other=0.0)
    if TOPK:
        thr = tl.load(thr_ptr + b * H * W + qy * W + qx, mask=q_in, other=float("-inf"))

    dq = tl.zeros([TILE_H * TILE_W, C_PAD], tl.float32)
    for r in range(R):
        radius = tl.load(radii_ptr + r)
        hy0, hx0, halo_w, halo = _halo(H, W, radius, TILE_H, TILE_W)
        k_base = k_ptr + b * stride_kb + r * stride_kr
        v_base = v_ptr + b * stride_vb + r * stride_vr
        for start in range(0, halo, BLOCK_N):
            # as _chunk_scores, with the values' load before the dot: in that order no fp32 launch spills
            n = start + tl.arange(0, BLOCK_N)
            ky = hy0 + n // halo_w
            kx = hx0 + n % halo_w
            k_in = n < halo
            k_t = tl.load(k_base + c[:, None] * stride_kc + ky[None, :] * stride_kh + kx[None, :] * stride_kw,
                          mask=(c[:, None] < C) & k_in[None, :], other=0.0)  # (C_PAD, N)
            v_t = tl.load(v_base + kk[:, None] * stride_vk + ky[None, :] * stride_vh + kx[None, :] * stride_vw,
                          mask=(kk[:, None] < K) & k_in[None, :], other=0.0)  # (K_PAD, N)
            s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
            valid = (q_in[:, None] & k_in[None, :] & (tl.abs(ky[None, :] - qy[:, None]) <= radius)
                     & (tl.abs(kx[None, :] - qx[:, None]) <= radius))
            if TOPK:
                valid = valid & (s >= thr[:, None])
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)  # (M, N) attention weights
            dp = tl.dot(do, v_t, input_precision=PRECISION)  # (M, N) dL/dp
            ds = p * (dp - delta[:, None])  # (M, N) dL/d(score)
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    dq = dq * inv_temperature
    tl.store(dq_ptr + b * C * H * W + c[None, :] * H * W + qy[:, None] * W + qx[:, None],
             dq.to(dq_ptr.dtype.element_ty), mask=q_in[:, None] & (c[None, :] < C))


@triton.jit
def _bwd_ref_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, thr_ptr, radii_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kr, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vr, stride_vk, stride_vh, stride_vw,
    stride_ob, stride_ok, stride_oh, stride_ow,
    R, C, K, H, W, scale_log2, inv_temperature,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    C_PAD: tl.constexpr, K_PAD: tl.constexpr, PRECISION: tl.constexpr, TOPK: tl.constexpr,
):
    """d(refs) and d(values) for one tile of positions of reference r: walk the queries whose windows hold it."""
    b = tl.program_id(1) // R
    r = tl.program_id(1) % R
    radius = tl.load(radii_ptr + r)
    # (M,) reference coordinates owned by this program; the halo holds every query that can see one of them
    ky, kx, k_in = _positions(H, W, TILE_H, TILE_W)
    hy0, hx0, halo_w, halo = _halo(H, W, radius, TILE_H, TILE_W)
    c = tl.arange(0, C_PAD)
    kk = tl.arange(0, K_PAD)
    k_base = k_ptr + b * stride_kb + r * stride_kr
    v_base = v_ptr + b * stride_vb + r * stride_vr
    k = tl.load(k_base + c[None, :] * stride_kc + ky[:, None] * stride_kh + kx[:, None] * stride_kw,
                mask=k_in[:, None] & (c[None, :] < C), other=0.0)  # (M, C_PAD)
    v = tl.load(v_base + kk[None, :] * stride_vk + ky[:, None] * stride_vh + kx[:, None] * stride_vw,
                mask=k_in[:, None] & (kk[None, :] < K), other=0.0)  # (M, K_PAD)

    dk = tl.zeros([TILE_H * TILE_W, C_PAD], tl.float32)
    dv = tl.zeros([TILE_H * TILE_W, K_PAD], tl.float32)
    for start in range(0, halo, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        qy = hy0 + n // halo_w  # (N,) query coordinates
        qx = hx0 + n % halo_w
        q_in = n < halo
        q_t = tl.load(q_ptr + b * stride_qb + c[:, None] * stride_qc + qy[None, :] * stride_qh + qx[None, :] * stride_qw,
                      mask=(c[:, None] < C) & q_in[None, :], other=0.0)  # (C_PAD, N)
        do = tl.load(do_ptr + b * stride_ob + kk[None, :] * stride_ok + qy[:, None] * stride_oh + qx[:, None] * stride_ow,
                     mask=q_in[:, None] & (kk[None, :] < K), other=0.0)  # (N, K_PAD)
        lse = tl.load(lse_ptr + b * H * W + qy * W + qx, mask=q_in, other=0.0)
        delta = tl.load(delta_ptr + b * H * W + qy * W + qx, mask=q_in, other=0.0)
        s_t = tl.dot(k, q_t, input_precision=PRECISION) * scale_log2  # (M, N) scores, transposed
        valid = (k_in[:, None] & q_in[None, :] & (tl.abs(ky[:, None] - qy[None, :]) <= radius)
                 & (tl.abs(kx[:, None] - qx[None, :]) <= radius))
        if TOPK:
            thr = tl.load(thr_ptr + b * H * W + qy * W + qx, mask=q_in, other=float("-inf"))
            valid = valid & (s_t >= thr[None, :])
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    dk = dk * inv_temperature
    plane = ky[:, None] * W + kx[:, None]
    tl.store(dk_ptr + (b * R + r) * C * H * W + c[None, :] * H * W + plane,
             dk.to(dk_ptr.dtype.element_ty), mask=k_in[:, None] & (c[None, :] < C))
    tl.store(dv_ptr + (b * R + r) * K * H * W + kk[None, :] * H * W + plane,
             dv.to(dv_ptr.dtype.element_ty), mask=k_in[:, None] & (kk[None, :] < K))


def _precision(dtype, gpu):
    """`tl.dot`'s input precision. fp32 on a GPU: "tf32x3", three TF32 tensor-core products per dot (the operands
    split into a TF32 head and tail), about fp32-accurate; exact fp32 ("ieee") compiles to an FMA loop that spills
    heavily at these tile sizes. The CPU interpreter computes exact fp32 ("ieee"). 16-bit inputs use their own
    tensor-core dot and ignore the setting."""
    return "tf32x3" if gpu and dtype == torch.float32 else "ieee"


def _launch_args(query, refs, values, out, radius, temperature, gpu):
    B, C, H, W = query.shape
    R, K = refs.shape[1], values.shape[2]
    strides = (*query.stride(), *refs.stride(), *values.stride(), *out.stride())
    gpu = query.device.type != "cpu" if gpu is None else gpu
    meta = dict(CONFIGS.get(query.dtype, CONFIGS[torch.float32]), C_PAD=max(16, triton.next_power_of_2(C)),
                K_PAD=max(16, triton.next_power_of_2(K)), PRECISION=_precision(query.dtype, gpu), maxnreg=MAXNREG)
    grid = (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]), B)
    radii_t = torch.tensor(radii(radius, R), dtype=torch.int32, device=query.device)  # each reference's radius
    return strides, (R, C, K, H, W, LOG2E / temperature), meta, grid, radii_t


# The launches as (kernel, grid, args, meta) tuples: the op runs them, and `.ci/compile_check.py` compiles
# exactly what they would compile (the argument specialisation comes from the same arguments). `gpu`: compile for a
# GPU (True) or the interpreter (False); None: where the tensors are (meta tensors, which the compile check records
# launches on, stand for CUDA ones). `thr` (B, H, W) fp32: with top-k, the
# threshold the first launch writes and the others read; None without top-k.
def _fwd_launches(query, refs, values, out, lse, radius, temperature, topk=0, thr=None, gpu=None):
    strides, sizes, meta, grid, radii_t = _launch_args(query, refs, values, out, radius, temperature, gpu)
    launches = []
    if topk:
        R, C, K, H, W, scale_log2 = sizes
        kth_meta = {k: v for k, v in meta.items() if k != "K_PAD"}
        kth_meta["BLOCK_N"] = max(meta["BLOCK_N"], triton.next_power_of_2(topk))  # holds the topk best
        launches.append((_kth_kernel, grid, (query, refs, thr, radii_t, *strides[:9], R, C, H, W, topk, scale_log2),
                         kth_meta))
    launches.append((_fwd_kernel, grid, (query, refs, values, out, lse, lse if thr is None else thr, radii_t,
                                         *strides, *sizes), dict(meta, TOPK=bool(topk))))
    return launches


def _bwd_launches(query, refs, values, grad_out, lse, delta, d_query, d_refs, d_values, radius, temperature,
                  thr=None, gpu=None):
    """d(query) when d_query is given; d(refs) and d(values) when d_refs and d_values are given."""
    B, R = refs.shape[:2]
    strides, sizes, meta, grid, radii_t = _launch_args(query, refs, values, grad_out, radius, temperature, gpu)
    sizes, meta = (*sizes, 1.0 / temperature), dict(meta, TOPK=thr is not None)
    thr = lse if thr is None else thr  # unread without top-k
    launches = []
    if d_query is not None:
        launches.append((_bwd_query_kernel, grid, (query, refs, values, grad_out, lse, delta, thr, radii_t, d_query,
                                                   *strides, *sizes), meta))
    if d_refs is not None:
        launches.append((_bwd_ref_kernel, (grid[0], B * R), (query, refs, values, grad_out, lse, delta, thr, radii_t,
                                                             d_refs, d_values, *strides, *sizes), meta))
    return launches


def _launch(kernel, grid, args, meta):
    """Every launch of the op goes through here (the compile check replaces it to collect the launches that the
    project's call sites make, on meta tensors, instead of running them)."""
    kernel[grid](*args, **meta)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, refs, values, radius, temperature, topk):
        B, C, H, W = query.shape
        out = torch.empty(B, values.shape[2], H, W, device=query.device, dtype=query.dtype)
        lse = torch.empty(B, H, W, device=query.device, dtype=torch.float32)
        thr = torch.empty(B, H, W, device=query.device, dtype=torch.float32) if topk else None
        for launch in _fwd_launches(query, refs, values, out, lse, radius, temperature, topk, thr):
            _launch(*launch)
        ctx.save_for_backward(query, refs, values, out, lse, thr)
        ctx.radius, ctx.temperature = radius, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, refs, values, out, lse, thr = ctx.saved_tensors
        delta = (grad_out.float() * out.float()).sum(1)  # (B, H, W): sum_k dO * O, the softmax correction
        d_query = d_refs = d_values = None
        if ctx.needs_input_grad[0]:
            d_query = torch.empty(query.shape, device=query.device, dtype=query.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_refs = torch.empty(refs.shape, device=refs.device, dtype=refs.dtype)
            d_values = torch.empty(values.shape, device=values.device, dtype=values.dtype)
        for launch in _bwd_launches(query, refs, values, grad_out, lse, delta, d_query, d_refs, d_values, ctx.radius,
                                    ctx.temperature, thr):
            _launch(*launch)
        return d_query, d_refs, d_values, None, None, None


MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis: B for the forward, B * R for d(refs)


def _check_launch_limits(query, refs, values):
    """The kernels index with 32-bit offsets and put the batch (times R for d(refs)) on the grid's second axis:
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


def _check_interpreter(query):
    """Triton 3.6's CPU interpreter passes a launch's integer arguments as one-element arrays and converts them with
    int(), which NumPy 2.4 refuses for arrays of one dimension (Triton 3.7 squeezes them first): every launch would
    fail inside the kernel, so say what to install instead, in one line."""
    def version(v):
        return tuple(int(n) for n in re.findall(r"\d+", v)[:2])

    if query.device.type == "cpu" and version(triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
        raise RuntimeError(f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {np.__version__}: "
                           "install numpy<2.4 or triton>=3.7")


def local_attention_triton(query, refs, values, radius, temperature=1.0, topk=0):
    """Fused Triton restricted attention, forward and backward; same signature and result as the reference.

    Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, fp32/fp16 only; with
    Triton 3.6 it needs NumPy < 2.4, and says so in a RuntimeError).
    Saved for the backward: query, refs, values, the output and a (B, H, W) fp32 log-sum-exp. Offsets are 32-bit and
    the batch (times R) is a grid axis: inputs of 2^31 elements or more, or B x R above 65535, raise ValueError.
    """
    _check(query, refs, values, radius, temperature, topk)
    _check_launch_limits(query, refs, values)
    _check_interpreter(query)
    R = refs.shape[1]
    n_candidates = sum((2 * r + 1) ** 2 for r in radii(radius, R))
    topk = 0 if topk >= n_candidates else topk  # at least every candidate: the plain softmax
    if topk > MAX_TOPK:
        raise ValueError(f"the fused op keeps at most the top {MAX_TOPK} candidates (topk={topk}); use fewer, or "
                         "topk=0 for all of them")
    return _LocalAttention.apply(query, refs, values, tuple(radii(radius, R)), float(temperature), topk)


def fused_on_cuda(query) -> bool:
    """Whether `local_attention` runs the fused op for CUDA inputs like `query`: all but fp32 features of more
    than FUSED_FP32_MAX_CHANNELS channels."""
    return not (query.dtype == torch.float32 and query.shape[1] > FUSED_FP32_MAX_CHANNELS)


def local_attention(query, refs, values, radius, temperature=1.0, topk=0):
    """Restricted attention: fused Triton kernels for CUDA tensors, the plain PyTorch reference otherwise (and for
    fp32 inputs of more than FUSED_FP32_MAX_CHANNELS channels, with a warning the first time)."""
    if query.is_cuda and not fused_on_cuda(query):
        warnings.warn(f"fp32 features of {query.shape[1]} channels: the fused op holds at most "
                      f"{FUSED_FP32_MAX_CHANNELS} without spilling registers; running the PyTorch reference")
        return local_attention_ref(query, refs, values, radius, temperature, topk)
    if query.is_cuda:
        return local_attention_triton(query, refs, values, radius, temperature, topk)
    return local_attention_ref(query, refs, values, radius, temperature, topk)
