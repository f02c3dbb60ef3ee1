"""Restricted attention in plain PyTorch, memory-bounded: the path for CPU tensors (it runs on any device).

Same signature and result as the dense specification in kernels/local_attention.py, arranged so that the work is
a few large batched matrix products:

- Strips. The map is cut into vertical strips TILE_W queries wide. Each strip of a reference, with `radius` columns
  of its neighbours on each side, is copied channel-first into a buffer in which the strips (and the batch) are
  stacked vertically, `radius` zero rows apart. In that buffer the candidates of a TILE_H x TILE_W tile of queries
  (its halo: the tile grown by the radius) are consecutive whole rows: a strided view, not a copy (no im2col).
- Scores. One product per tile, (TILE_H * TILE_W, C + 1) x (C + 1, halo positions of every reference), computed
  for all tiles of a chunk by one `baddbmm` that starts from the window mask (0 inside |dy|, |dx| <= radius, -inf
  outside), then divided by the temperature. The extra channel is 1 for every query on the image (0 for the
  padding's, whose outputs are dropped) and, for the keys, 0 on the image and a finite value near the dtype's lowest
  off it (padding, the rows between strips): the product itself excludes those positions, with weight exactly 0,
  and no row of the softmax is all -inf (no NaN, even in padding).
- Softmax over the last axis, then out^T = values^T (K, halo) x probabilities^T: with K a handful of labels this
  order keeps the product's long axis inside the BLAS kernel. With top-k and no autograd, only the k best
  candidates of each query are found (`_best`), and their labels gathered and weighted (`_topk_copy`).
References that share a radius share a buffer; several radii give one buffer each, their products written side by
side into one score buffer.

Without autograd the strips are taken a few at a time and the tiles in chunks, so that the scores held stay under
SCORE_BUDGET_BYTES whatever the map and the number of references. With autograd (training) everything is one chunk,
differentiated by torch (the graph holds the probabilities, as any softmax's does).
"""
import torch

from .arguments import check_arguments, radii

TILE_H, TILE_W = 4, 8  # queries per tile: one matrix product of TILE_H * TILE_W rows per tile
SCORE_BUDGET_BYTES = 8 * 2**20  # scores held at a time without autograd (also keeps them in the CPU's cache)
BLOCKS = 16  # top-k without autograd: each row's scores in this many blocks, searched in two steps (_best)


def _strip_buffer(x, r, strips, P, extra=None):
    """(B, n, ch, H, W) -> (ch (+1), n_blocks * P + 2r, n * (TILE_W + 2r)), channel-first: for each strip s0 <= s < s1
    and each batch element (a block of P rows), r zero rows, then the H rows of the strip's columns grown by r on
    both sides (zero off the image), then zero rows to P, reference after reference; 2r zero rows at the end.
    `extra` = (on, off): one more channel, `on` on the image and `off` elsewhere."""
    B, n, ch, H, W = x.shape
    s0, s1 = strips
    width, rows, ce = TILE_W + 2 * r, (s1 - s0) * B * P, ch + (extra is not None)
    buf = x.new_empty(ce, rows + 2 * r, n, width)
    blocks = buf[:, :rows].view(ce, s1 - s0, B, P, n, width)
    image = blocks[:, :, :, r:r + H]  # (ce, strips, B, H, n, width)
    # the strips whose columns all lie on the image in one copy, each of the others (at the edges) in its own
    first, stop = max(s0, -(-r // TILE_W)), min(s1, (W - r) // TILE_W)
    pieces = [(first, stop)] if first < stop else []
    pieces += [(s, s + 1) for s in range(s0, s1) if not first <= s < stop]
    columns = []  # (piece, its image column of buffer column 0, its buffer columns on the image)
    for a, b in pieces:
        x0 = a * TILE_W - r
        columns.append(((a, b), x0, max(0, -x0), min(width, W - x0 - (b - a - 1) * TILE_W)))
    # zeros off the image only (the rows between blocks, the columns beyond the image's edges): the rest is copied
    blocks[:, :, :, :r].zero_(), blocks[:, :, :, r + H:].zero_(), buf[:, rows:].zero_()
    for (a, b), _, c0, c1 in columns:
        image[:, a - s0:b - s0, ..., :c0].zero_(), image[:, a - s0:b - s0, ..., c1:].zero_()
    if extra is not None:
        buf[ch] = extra[1]
    for (a, b), x0, c0, c1 in columns:
        if extra is not None:
            image[ch, a - s0:b - s0, ..., c0:c1] = extra[0]
        cols = x[..., x0 + c0:x0 + (b - a - 1) * TILE_W + c1].unfold(-1, c1 - c0, TILE_W)  # (B, n, ch, H, s, c)
        for j in range(n):  # one reference at a time: a copy the CPU runs several times faster than all at once
            image[:ch, a - s0:b - s0, :, :, j, c0:c1] = cols[:, j].permute(1, 3, 0, 2, 4)
    return buf.flatten(2)


def _halos(buf, r):
    """(ch, rows, L) buffer -> (tiles, ch, (TILE_H + 2r) * L): each tile's halo, a view (tile t: rows t * TILE_H on)."""
    return buf.unfold(1, TILE_H + 2 * r, TILE_H).permute(1, 0, 3, 2).flatten(2)


def _window_mask(r, n, dtype, device):
    """(TILE_H * TILE_W, (TILE_H + 2r) * n * (TILE_W + 2r)): 0 where a halo position (row hy, reference, column hx)
    is in the window of a tile position (iy, ix), -inf elsewhere."""
    def near(tile, halo):  # (tile, halo): 0 <= h - i <= 2r
        d = torch.arange(halo, device=device)[None, :] - torch.arange(tile, device=device)[:, None]
        return (d >= 0) & (d <= 2 * r)

    inside = (near(TILE_H, TILE_H + 2 * r)[:, None, :, None, None]
              & near(TILE_W, TILE_W + 2 * r)[None, :, None, None, :]).expand(-1, -1, -1, n, -1)
    mask = torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill_(~inside, float("-inf"))
    return mask.reshape(TILE_H * TILE_W, -1)


def _best(scores, k):
    """The k best scores of each row and their columns, sorted (n, M, N) -> (n, M, k) twice: exact, in two steps
    when the rows are long. Each row's columns are dealt into BLOCKS blocks (block g: columns g, g + G, g + 2G, ...),
    one pass finds each block's maximum, and the k best values (ties included) all lie in the k blocks with the
    highest maxima or in the few columns beyond BLOCKS * G: a top-k over about BLOCKS * k scores instead of N."""
    n, M, N = scores.shape
    G = N // BLOCKS
    if G < 4 * k:
        return scores.topk(k, dim=-1)
    blocks = scores[..., :BLOCKS * G].unflatten(-1, (BLOCKS, G))  # (n, M, BLOCKS, G), a view
    best = blocks.amax(-2).topk(k, dim=-1, sorted=False).indices[..., None, :]  # (n, M, 1, k): the k best blocks
    columns = (torch.arange(BLOCKS, device=scores.device)[:, None] * G + best).flatten(-2)  # (n, M, BLOCKS * k)
    candidates = blocks.gather(-1, best.expand(n, M, BLOCKS, k)).flatten(-2)
    if BLOCKS * G < N:
        rest = torch.arange(BLOCKS * G, N, device=scores.device).expand(n, M, -1)
        candidates, columns = torch.cat([candidates, scores[..., BLOCKS * G:]], -1), torch.cat([columns, rest], -1)
    top, pos = candidates.topk(k, dim=-1)
    return top, columns.gather(-1, pos)


def _topk_copy(scores, values, on_image, k, acc_dtype):
    """Top-k without autograd: the softmax over each query's k best scores, and the labels of those k candidates
    gathered and summed, instead of a softmax and a product over every candidate. scores (n, M, N), values
    (n, K, N), on_image (n, M) -> (n, K, M). A query with more than k scores at or above its k-th (ties, as in Lab's
    flat colours: its k+1-th equals its k-th) keeps all of them, as the definition does: such rows take the full
    softmax."""
    top, index = _best(scores, k + 1)  # (n, M, k + 1)
    kth, tied = top[..., k - 1:k], (top[..., k] == top[..., k - 1]) & on_image
    top, index = top[..., :k], index[..., :k]
    n, M, K = scores.shape[0], scores.shape[1], values.shape[1]
    probs = torch.softmax(top, -1, dtype=acc_dtype)
    picked = values.gather(2, index.reshape(n, 1, M * k).expand(n, K, M * k)).view(n, K, M, k)
    out = (picked.to(acc_dtype) * probs[:, None]).sum(-1).to(scores.dtype)  # summed in fp32 for 16-bit inputs
    tile, row = tied.nonzero(as_tuple=True)
    if len(tile):
        rows = scores[tile, row]  # (rows, N)
        rows = torch.softmax(rows.masked_fill_(rows < kth[tile, row], float("-inf")), -1, dtype=acc_dtype)
        out[tile, :, row] = torch.bmm(values[tile], rows.to(scores.dtype)[:, :, None])[..., 0]
    return out


def local_attention_cpu(query, refs, values, radius, temperature=1.0, topk=0):
    """Restricted attention by strips and tiles (see the module docstring); any device, any floating dtype (the
    softmax in fp32 for 16-bit inputs), differentiable."""
    check_arguments(query, refs, values, radius, temperature, topk)
    B, C, H, W = query.shape
    R, K = refs.shape[1], values.shape[2]
    by_radius = {}  # radius -> the references that have it
    for i, r in enumerate(radii(radius, R)):
        by_radius.setdefault(r, []).append(i)
    groups = sorted(by_radius.items())
    n_strips = -(-W // TILE_W)
    P = -(-(H + max(by_radius)) // TILE_H) * TILE_H  # rows per (strip, batch element) block, whole tiles
    M = TILE_H * TILE_W
    widths = [(TILE_H + 2 * r) * len(index) * (TILE_W + 2 * r) for r, index in groups]  # halo positions per group
    N = sum(widths)
    masks = [_window_mask(r, len(index), query.dtype, query.device) for r, index in groups]
    acc_dtype = torch.promote_types(query.dtype, torch.float32)  # softmax in fp32 (fp64 stays fp64)
    # the keys' extra channel off the image: low enough for exp() to give 0, finite once divided by the temperature
    lowest = torch.finfo(query.dtype).min / 2 * min(1.0, temperature)

    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, refs, values))
    tile_bytes = M * N * 4 * (2 if topk else 1)
    tiles_per_strip = B * P // TILE_H
    chunk = 2**62 if grad else max(1, SCORE_BUDGET_BYTES // tile_bytes)  # tiles per product
    strips_per_group = max(1, min(n_strips, chunk // tiles_per_strip))
    # each group's references: a view when they are consecutive (the usual case), else one copy
    picked = [[t[:, i[0]:i[-1] + 1] if i == list(range(i[0], i[-1] + 1)) else t[:, i] for t in (refs, values)]
              for _, i in groups]
    out = []
    for s0 in range(0, n_strips, strips_per_group):
        s1 = min(n_strips, s0 + strips_per_group)
        keys = [_halos(_strip_buffer(k, r, (s0, s1), P, (0, lowest)), r) for (r, _), (k, _) in zip(groups, picked)]
        vals = [_halos(_strip_buffer(v, r, (s0, s1), P), r) for (r, _), (_, v) in zip(groups, picked)]
        q_tiles = _halos(_strip_buffer(query[:, None], 0, (s0, s1), P, (1, 0)), 0).transpose(1, 2)  # (tiles, M, C+1)
        for t0 in range(0, q_tiles.shape[0], chunk):
            t1 = min(q_tiles.shape[0], t0 + chunk)
            if len(keys) == 1:
                scores = torch.baddbmm(masks[0], q_tiles[t0:t1], keys[0][t0:t1])
            else:  # each group's product written in place into its columns of one buffer (no concatenation)
                scores, n0 = q_tiles.new_empty(t1 - t0, M, N), 0
                for mask, k, n in zip(masks, keys, widths):
                    scores[..., n0:n0 + n].copy_(mask).baddbmm_(q_tiles[t0:t1], k[t0:t1])
                    n0 += n
            if temperature != 1:  # after the product, as the definition: equal products stay equal (top-k's ties)
                scores = scores.div_(temperature)
            if 0 < topk < N and not grad:
                labels = torch.cat([v[t0:t1] for v in vals], -1)  # (n, K, N)
                out.append(_topk_copy(scores, labels, q_tiles[t0:t1, :, C] > 0, topk, acc_dtype))
                continue
            if 0 < topk < N:  # keep the scores >= the k-th largest (ties kept; all when fewer are in the window)
                kth = scores.topk(topk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, -1, dtype=acc_dtype).to(query.dtype).transpose(1, 2)  # (n, N, M)
            o, n0 = None, 0
            for v, n in zip(vals, widths):  # out^T = values^T probs^T: (n, K, M)
                o = torch.bmm(v[t0:t1], probs[:, n0:n0 + n]) if o is None else o.baddbmm(v[t0:t1], probs[:, n0:n0 + n])
                n0 += n
            out.append(o)
    # (tiles, K, TILE_H, TILE_W) in the queries' order (strip, batch element, row) -> (B, K, H, W)
    o = torch.cat(out).view(-1, K, TILE_H, TILE_W).permute(1, 0, 2, 3).reshape(K, n_strips, B, P, TILE_W)
    return o[:, :, :, :H].permute(2, 0, 3, 1, 4).reshape(B, K, H, n_strips * TILE_W)[..., :W]
