"""Restricted (local) attention: the copy step of CorrFlow, as one op.

For every position p = (y, x) of the query map and every reference frame r, the candidates are the reference
positions q = (y + dy, x + dx) with |dy|, |dx| <= radius_r that lie inside the image (`radius`: one int for every
reference, or one per reference). One softmax runs jointly over the candidates of all R references:

    s(p, r, q) = <query[:, p], refs[r, :, q]> / temperature
    a(p, r, q) = softmax_{r, q} ( s(p, r, q) ), over the candidates with s >= the topk-th largest s of p (all: topk=0)
    out[:, p]  = sum_{r, q} a(p, r, q) * values[r, :, q]

Shapes: query (B, C, H, W), refs (B, R, C, H, W), values (B, R, K, H, W) -> out (B, K, H, W).
The position itself is always a candidate, so every softmax has at least one term. Top-k keeps ties with the k-th
score (so possibly more than k terms), and all candidates of a position that has fewer than k.

Supported: any B, C, K, R, H, W >= 1, any radius >= 0 per reference, temperature > 0, top-k; gradients for query,
refs and values. This file, in order:
- `local_attention_dense`: the specification, on the full (HW x R*HW) affinity: every other path is tested against
  it (outputs and gradients). Quadratic in H*W: for small maps.
- `local_attention_cpu` (kernels/local_attention_cpu.py): plain PyTorch by strips and tiles, memory-bounded, any
  device and floating dtype: the path for CPU tensors.
- The fused Triton kernels, forward and backward, and `local_attention_triton`: the path for CUDA tensors. fp32,
  fp16 and bf16 inputs (all three the same dtype), any strides (no copies); scores, softmax statistics and sums in
  fp32. fp32 products use 3xTF32 on a GPU (`_precision`), exact fp32 in Triton's CPU interpreter. Top-k up to
  MAX_TOPK. Offsets are 32-bit: inputs of 2^31 elements or more, or B x R above 65535, are refused in one line.
- `local_attention`, which picks: the fused kernels for CUDA tensors, except fp32 inputs of more than
  FUSED_FP32_MAX_CHANNELS channels (they would spill registers: the CPU path, with a warning); the CPU path otherwise.

The kernels. A program owns a TILE_H x TILE_W tile of query positions of one batch element. The union of its
queries' windows is the tile grown by `radius`, clipped to the image (the "halo"). The program walks the halo of
every reference in chunks of BLOCK_N positions: scores for the whole tile with one `tl.dot`, a mask from integer
coordinates, and an online softmax (running max and sum, as in flash attention) shared by all references: one
joint softmax without concatenation; nothing window-sized is written to memory. With top-k, a first pass
(`_kth_kernel`) finds each query's k-th score and the other kernels mask below it. The forward saves its inputs,
its output and the per-position log-sum-exp (B, H, W) in fp32. Backward: one kernel recomputes the scores per
query tile for d(query); another owns a tile of reference positions and walks the halo of the queries that see it
(the window relation is symmetric), so d(refs) and d(values) need no atomics: deterministic.
Tile shapes (`CONFIGS`) are chosen so that no kernel spills registers on sm_80 or sm_90 (`python
.ci/compile_check.py` compiles every launch the project makes and fails on a spill): 16-bit inputs 8x8 tiles (a
warpgroup's 64 rows) and chunks of 32; fp32 4x8 tiles and chunks of 16 (the 3xTF32 dot keeps each operand with its
TF32 head and tail in registers; above 64 channels every shape tried spills). BENCHMARKS.md gives the fraction of
computed scores that fall inside a window.
"""
import warnings

import torch
import triton
import triton.language as tl

from .arguments import check_arguments, check_interpreter, check_launch_limits, radii
from .local_attention_cpu import local_attention_cpu


def local_attention_dense(query, refs, values, radius, temperature=1.0, topk=0):
    """The definition above, written out on the full (H*W x R*H*W) affinity; any device and floating dtype."""
    check_arguments(query, refs, values, radius, temperature, topk)
    B, C, H, W = query.shape
    R, dev = refs.shape[1], query.device
    yy, xx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    dist = torch.maximum((yy[:, None] - yy).abs(), (xx[:, None] - xx).abs())  # (HW, HW): the larger of |dy|, |dx|
    near = dist[:, None, :] <= torch.tensor(radii(radius, R), device=dev)[:, None]  # (HW, R, HW): in the window
    scores = torch.einsum("bcp,brcq->bprq", query.flatten(2), refs.flatten(3)) / temperature
    scores = scores.masked_fill(~near, float("-inf")).flatten(2)  # (B, HW, R*HW): one softmax over all references
    if topk:  # keep the scores >= the topk-th largest (ties kept; all candidates when fewer)
        kth = scores.topk(min(topk, scores.shape[-1]), -1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    attn = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    return torch.einsum("bprq,brkq->bkp", attn.view(B, H * W, R, H * W), values.flatten(3)).view(B, -1, H, W)


# --------------------------------------------------------------------------------------------------------------
# The fused Triton path

# tile and chunk shape per input dtype: (TILE_H, TILE_W) query positions per program, BLOCK_N halo positions per chunk
CONFIGS = {
    torch.float32: dict(TILE_H=4, TILE_W=8, BLOCK_N=16),
    torch.float16: dict(TILE_H=8, TILE_W=8, BLOCK_N=32),
    torch.bfloat16: dict(TILE_H=8, TILE_W=8, BLOCK_N=32),
}
# fp32 inputs of more channels than this (padded to 128: model+lab's 64 + 4) spill registers on sm_90 at every tile
# shape tried (2x8 and 4x8 tiles, 4 or 8 warps: 12-64 bytes): `local_attention` runs the CPU path for them on CUDA
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
        q_t = tl.load(q_ptr + b * stride_qb + c[:, None] * stride_qc + qy[None, :] * stride_qh
                      + qx[None, :] * stride_qw, mask=(c[:, None] < C) & q_in[None, :], other=0.0)  # (C_PAD, N)
        do = tl.load(do_ptr + b * stride_ob + kk[None, :] * stride_ok + qy[:, None] * stride_oh
                     + qx[:, None] * stride_ow, mask=q_in[:, None] & (kk[None, :] < K), other=0.0)  # (N, K_PAD)
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



def _precision(query):
    """`tl.dot`'s input precision. fp32 on a GPU (meta tensors, which the compile check launches on, stand for CUDA
    ones): "tf32x3", three TF32 tensor-core products per dot (the operands split into a TF32 head and tail), about
    fp32-accurate; exact fp32 ("ieee") compiles to an FMA loop that spills heavily at these tile sizes. The CPU
    interpreter computes exact fp32 ("ieee"). 16-bit inputs use their own tensor-core dot and ignore the setting."""
    return "tf32x3" if query.device.type != "cpu" and query.dtype == torch.float32 else "ieee"


def _launch_args(query, refs, values, out, radius, temperature):
    """What every launch shares: strides, sizes, compile-time parameters, grid and the radii (int32 tensor)."""
    B, C, H, W = query.shape
    R, K = refs.shape[1], values.shape[2]
    strides = (*query.stride(), *refs.stride(), *values.stride(), *out.stride())
    meta = dict(CONFIGS.get(query.dtype, CONFIGS[torch.float32]), C_PAD=max(16, triton.next_power_of_2(C)),
                K_PAD=max(16, triton.next_power_of_2(K)), PRECISION=_precision(query), maxnreg=MAXNREG)
    grid = (triton.cdiv(H, meta["TILE_H"]) * triton.cdiv(W, meta["TILE_W"]), B)
    radii_t = torch.tensor(radius, dtype=torch.int32, device=query.device)  # each reference's radius
    return strides, (R, C, K, H, W, LOG2E / temperature), meta, grid, radii_t


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, refs, values, radius, temperature, topk):
        B, C, H, W = query.shape
        out = torch.empty(B, values.shape[2], H, W, device=query.device, dtype=query.dtype)
        lse = torch.empty(B, H, W, device=query.device, dtype=torch.float32)
        strides, sizes, meta, grid, radii_t = _launch_args(query, refs, values, out, radius, temperature)
        thr = None  # with top-k: (B, H, W) fp32, each query's topk-th score, which the other kernels mask below
        if topk:
            thr = torch.empty(B, H, W, device=query.device, dtype=torch.float32)
            kth_meta = {k: v for k, v in meta.items() if k != "K_PAD"}
            kth_meta["BLOCK_N"] = max(meta["BLOCK_N"], triton.next_power_of_2(topk))  # holds the topk best
            R, C, K, H, W, scale_log2 = sizes
            _kth_kernel[grid](query, refs, thr, radii_t, *strides[:9], R, C, H, W, topk, scale_log2, **kth_meta)
        _fwd_kernel[grid](query, refs, values, out, lse, lse if thr is None else thr, radii_t, *strides, *sizes,
                          **meta, TOPK=bool(topk))
        ctx.save_for_backward(query, refs, values, out, lse, thr)
        ctx.radius, ctx.temperature = radius, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, refs, values, out, lse, thr = ctx.saved_tensors
        B, R = refs.shape[:2]
        delta = (grad_out.float() * out.float()).sum(1)  # (B, H, W): sum_k dO * O, the softmax correction
        strides, sizes, meta, grid, radii_t = _launch_args(query, refs, values, grad_out, ctx.radius,
                                                           ctx.temperature)
        sizes, meta = (*sizes, 1.0 / ctx.temperature), dict(meta, TOPK=thr is not None)
        thr = lse if thr is None else thr  # unread without top-k
        d_query = d_refs = d_values = None
        if ctx.needs_input_grad[0]:
            d_query = torch.empty(query.shape, device=query.device, dtype=query.dtype)
            _bwd_query_kernel[grid](query, refs, values, grad_out, lse, delta, thr, radii_t, d_query, *strides,
                                    *sizes, **meta)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_refs = torch.empty(refs.shape, device=refs.device, dtype=refs.dtype)
            d_values = torch.empty(values.shape, device=values.device, dtype=values.dtype)
            _bwd_ref_kernel[grid[0], B * R](query, refs, values, grad_out, lse, delta, thr, radii_t, d_refs,
                                            d_values, *strides, *sizes, **meta)
        return d_query, d_refs, d_values, None, None, None


def local_attention_triton(query, refs, values, radius, temperature=1.0, topk=0):
    """The fused Triton kernels, forward and backward; same signature and result as the specification.

    Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, fp32/fp16 only; with
    Triton 3.6 it needs NumPy < 2.4, and says so in a RuntimeError). Saved for the backward: query, refs, values, the
    output and a (B, H, W) fp32 log-sum-exp."""
    check_arguments(query, refs, values, radius, temperature, topk)
    check_launch_limits(query, refs, values)
    check_interpreter(query)
    rs = radii(radius, refs.shape[1])
    topk = 0 if topk >= sum((2 * r + 1) ** 2 for r in rs) else topk  # at least every candidate: the plain softmax
    if topk > MAX_TOPK:
        raise ValueError(f"the fused op keeps at most the top {MAX_TOPK} candidates (topk={topk}); use fewer, or "
                         "topk=0 for all of them")
    return _LocalAttention.apply(query, refs, values, tuple(rs), float(temperature), topk)


def fused_on_cuda(query) -> bool:
    """Whether `local_attention` runs the fused kernels for CUDA inputs like `query`: all but fp32 features of more
    than FUSED_FP32_MAX_CHANNELS channels."""
    return not (query.dtype == torch.float32 and query.shape[1] > FUSED_FP32_MAX_CHANNELS)


def local_attention(query, refs, values, radius, temperature=1.0, topk=0):
    """Restricted attention: the fused Triton kernels for CUDA tensors, the plain PyTorch CPU path otherwise (and for
    fp32 CUDA inputs of more than FUSED_FP32_MAX_CHANNELS channels, with a warning the first time)."""
    if query.is_cuda and fused_on_cuda(query):
        return local_attention_triton(query, refs, values, radius, temperature, topk)
    if query.is_cuda:
        warnings.warn(f"fp32 features of {query.shape[1]} channels: the fused kernels hold at most "
                      f"{FUSED_FP32_MAX_CHANNELS} without spilling registers; running the PyTorch CPU path")
    return local_attention_cpu(query, refs, values, radius, temperature, topk)
