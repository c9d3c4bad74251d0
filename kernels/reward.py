"""Triton kernel of ``saliency::reward`` (docs/method.md section 4), one launch for the whole batch.

The algorithm is the C++ kernel's (``kernels/cpu/reward.cpp`` states it in full): the prefix weight
sums ``Fx(Q)[c]`` of the bilinear upsampling (align_corners=False) in closed form, the mass of the
upsampled map in ``[0, P) x [0, Q)`` as ``Fy(P)^T G Fx(Q)`` with ``G = relu(map)``, and the mass of
the union of boxes by two-dimensional summation by parts over the grid of the boxes' edges,

    mass = sum over edges P (rows), Q (columns) of D(P, Q) * Fy(P)^T G Fx(Q),
    D(P, Q) = cov(P-1, Q-1) - cov(P-1, Q) - cov(P, Q-1) + cov(P, Q),

so each rollout costs one ``G Fx(Q)`` product per distinct column edge (``O(K h' w')``) and the
``H x W`` image never exists. One program per rollout; its map is read once, in row chunks.

Bad argument values (sizes, box order, box counts, NaN/inf in the map) are found inside the kernel,
which writes a status code per rollout and NaN as that rollout's result. ``reward_triton`` then
reads the ``B`` status codes back and raises: on CUDA that read is one device-to-host copy, a
synchronisation. ``check=False`` (the op's ``check`` argument) skips the read and keeps the call
asynchronous: bad rollouts then come back as NaN, never as a plausible number, as the C++ kernel's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from saliency_r1.kernels.checks import check_reward_metadata
# Map cells a program holds in registers at once: a 64 x 64 tile, which covers Qwen2.5-VL maps of
# images up to 1792 px a side in one chunk; larger maps are read in chunks of rows.
_TILE_CELLS = 4096

# Pixel counts are float32 inside the kernel: exact up to 2**24, so image sides are limited to that.
_MAX_SIDE = tl.constexpr(2 ** 24)

# Status codes written by the kernel, checked in the order the C++ kernel checks them.
_OK, _MAP_SIZE_NONPOSITIVE, _MAP_SIZE_TOO_LARGE, _IMAGE_SIZE_NONPOSITIVE, _COUNT_OUT_OF_RANGE, \
    _VALID_NOT_FINITE, _X_ORDER, _Y_ORDER, _MAP_NOT_FINITE = range(9)


@triton.jit
def _sum_t_minus(p, q, off, k_lo, k_hi, top, scale):
    """Sum over pixels x in [p, q) of (t_x - off): t is 0 below k_lo, ``top`` from k_hi, linear between."""
    n_low = tl.maximum(tl.minimum(q, k_lo) - p, 0.0)
    n_high = tl.maximum(q - tl.maximum(p, k_hi), 0.0)
    a = tl.maximum(p, k_lo)
    b = tl.minimum(q, k_hi)
    middle = tl.where(b > a, (b - a) * (0.5 * (a + b) * scale - 0.5 - off), 0.0)
    return n_low * (0.0 - off) + n_high * (top - off) + middle


@triton.jit
def _prefix(q, cells, n_cells, n_pix):
    """Fx(q)[c] for each c in ``cells``: sum over pixels x < q of cell c's weight (0 past n_cells).

    Pixel x samples u_x = (x + 0.5) * n_cells / n_pix - 0.5, clamped to t_x in [0, n_cells - 1], and
    gives cell c the weight max(0, 1 - |t_x - c|): PyTorch's bilinear (1 - lambda, lambda) pair. The
    number of pixels with u_x < v is ceil((v + 0.5) * n_pix / n_cells - 0.5); the weight is continuous
    in t, so rounding an exact breakpoint to either side leaves the sums unchanged.
    """
    ratio = n_pix / n_cells
    scale = n_cells / n_pix
    top = n_cells - 1.0
    k_lo = tl.minimum(tl.maximum(tl.ceil(0.5 * ratio - 0.5), 0.0), n_pix)
    k_hi = tl.minimum(tl.maximum(tl.ceil((top + 0.5) * ratio - 0.5), 0.0), n_pix)
    c = cells.to(tl.float32)
    # Pixels with t < c - 1, t < c, t < c + 1: the first range raises cell c's weight, the second lowers it.
    e0 = tl.minimum(tl.maximum(tl.ceil((c - 0.5) * ratio - 0.5), 0.0), n_pix)
    e1 = tl.minimum(tl.maximum(tl.ceil((c + 0.5) * ratio - 0.5), 0.0), n_pix)
    e2 = tl.minimum(tl.maximum(tl.ceil((c + 1.5) * ratio - 0.5), 0.0), n_pix)
    e0 = tl.where(c - 1.0 <= 0.0, 0.0, tl.where(c - 1.0 > top, n_pix, e0))
    e1 = tl.where(c <= 0.0, 0.0, tl.where(c > top, n_pix, e1))
    e2 = tl.where(c + 1.0 > top, n_pix, e2)
    rising = _sum_t_minus(e0, tl.minimum(e1, q), c - 1.0, k_lo, k_hi, top, scale)
    falling = _sum_t_minus(e1, tl.minimum(e2, q), c + 1.0, k_lo, k_hi, top, scale)
    return tl.where(c < n_cells, rising - falling, 0.0)


@triton.jit
def _gather(values, select):
    """values[k] for each edge: ``select`` is the [2 BLOCK_K, BLOCK_K] mask edge -> box."""
    return tl.sum(tl.where(select, values[None, :], 0), axis=1)


@triton.jit
def _corners(p, q, x_lo, y_lo, x_hi, y_hi, used):
    """D(P, Q) for each row edge P of the vector ``p`` and the column edge ``q``:
    cov(P-1, Q-1) - cov(P-1, Q) - cov(P, Q-1) + cov(P, Q), cov(y, x) = 1 if pixel (y, x) is in a used box."""
    in_row_above = (y_lo[None, :] <= p[:, None] - 1) & (p[:, None] - 1 <= y_hi[None, :])
    in_row = (y_lo[None, :] <= p[:, None]) & (p[:, None] <= y_hi[None, :])
    in_col_left = (used & (x_lo <= q - 1) & (q - 1 <= x_hi))[None, :]
    in_col = (used & (x_lo <= q) & (q <= x_hi))[None, :]
    return (tl.max((in_row_above & in_col_left).to(tl.int32), axis=1) - tl.max((in_row_above & in_col).to(tl.int32), axis=1)
            - tl.max((in_row & in_col_left).to(tl.int32), axis=1) + tl.max((in_row & in_col).to(tl.int32), axis=1))


@triton.jit
def _first_edges(edge, used, order):
    """Edges that are used, positive (F(0) = 0) and the first of their value, so each distinct edge counts once."""
    earlier = order[None, :] < order[:, None]
    seen = tl.max((earlier & used[None, :] & (edge[None, :] == edge[:, None])).to(tl.int32), axis=1)
    return used & (seen == 0) & (edge > 0)


@triton.jit
def _reward_kernel(
        maps_ptr, map_sizes_ptr, image_sizes_ptr, boxes_ptr, box_counts_ptr, valid_ptr, out_ptr, status_ptr,
        h_max, w_max, k_max,
        stride_m_b, stride_m_h, stride_m_w,
        stride_ms_b, stride_ms_j,
        stride_is_b, stride_is_j,
        stride_bx_b, stride_bx_k, stride_bx_j,
        stride_bc_b, stride_v_b,
        ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, MAP_F64: tl.constexpr):
    b = tl.program_id(0)
    # Values are checked in their own dtype (an int64 size must not wrap into range by a cast).
    h = tl.load(map_sizes_ptr + b * stride_ms_b)
    w = tl.load(map_sizes_ptr + b * stride_ms_b + stride_ms_j)
    img_h = tl.load(image_sizes_ptr + b * stride_is_b)
    img_w = tl.load(image_sizes_ptr + b * stride_is_b + stride_is_j)
    count = tl.load(box_counts_ptr + b * stride_bc_b)
    valid = tl.load(valid_ptr + b * stride_v_b).to(tl.float32)

    # Bad values are reported through the status; the work below stays in bounds regardless.
    h_ok = tl.minimum(tl.maximum(h, 1), h_max).to(tl.int32)
    w_ok = tl.minimum(tl.maximum(w, 1), w_max).to(tl.int32)
    img_h_ok = tl.minimum(tl.maximum(img_h, 1), _MAX_SIDE).to(tl.int32)
    img_w_ok = tl.minimum(tl.maximum(img_w, 1), _MAX_SIDE).to(tl.int32)
    n = tl.minimum(tl.maximum(count, 0), k_max).to(tl.int32)

    lanes = tl.arange(0, BLOCK_K)
    in_list = lanes < n
    box_row = boxes_ptr + b * stride_bx_b + lanes * stride_bx_k
    x_lo_raw = tl.load(box_row, mask=in_list, other=0)
    y_lo_raw = tl.load(box_row + stride_bx_j, mask=in_list, other=0)
    x_hi_raw = tl.load(box_row + 2 * stride_bx_j, mask=in_list, other=0)
    y_hi_raw = tl.load(box_row + 3 * stride_bx_j, mask=in_list, other=0)
    x_disorder = tl.max((in_list & (x_hi_raw < x_lo_raw)).to(tl.int32), axis=0)
    y_disorder = tl.max((in_list & (y_hi_raw < y_lo_raw)).to(tl.int32), axis=0)
    # Clamped to the image (a box wholly off it ends up empty and unused), then narrowed to int32.
    x_lo = tl.minimum(tl.maximum(x_lo_raw, 0), img_w_ok).to(tl.int32)
    y_lo = tl.minimum(tl.maximum(y_lo_raw, 0), img_h_ok).to(tl.int32)
    x_hi = tl.maximum(tl.minimum(x_hi_raw, img_w_ok - 1), -1).to(tl.int32)
    y_hi = tl.maximum(tl.minimum(y_hi_raw, img_h_ok - 1), -1).to(tl.int32)
    used = in_list & (x_lo <= x_hi) & (y_lo <= y_hi)
    any_box = tl.max(used.to(tl.int32), axis=0) > 0

    # The boxes' edges as [2 BLOCK_K] vectors: lower edges first (box k at k), then upper edges + 1.
    order = tl.arange(0, 2 * BLOCK_K)
    edge_is_lo = order < BLOCK_K
    select = (order % BLOCK_K)[:, None] == lanes[None, :]
    edge_used = _gather(used.to(tl.int32), select) > 0
    y_edge = tl.where(edge_is_lo, _gather(y_lo, select), _gather(y_hi, select) + 1)
    x_edge = tl.where(edge_is_lo, _gather(x_lo, select), _gather(x_hi, select) + 1)
    y_first = _first_edges(y_edge, edge_used, order)
    x_first = _first_edges(x_edge, edge_used, order)

    cols = tl.arange(0, BLOCK_W)
    col_mask = cols < w_ok
    # At least 1: with an empty padded tensor (h_max or w_max 0, reported through the status) nothing
    # is loaded, and the weights must not divide by zero.
    n_cols = tl.maximum(w_ok, 1).to(tl.float32)
    n_rows = tl.maximum(h_ok, 1).to(tl.float32)
    width = img_w_ok.to(tl.float32)
    height = img_h_ok.to(tl.float32)
    fx_full = _prefix(width, cols, n_cols, width)
    # First pass: the finiteness check and the peak, in float64 for float64 maps (float32 holds every
    # 16-bit value exactly). The score is invariant to the map's scale, and dividing by the peak keeps
    # the float32 sums from overflowing (a float32 map near 1e38, a float64 map beyond float32's range).
    bad_cells = 0
    peak = tl.zeros((), dtype=tl.float64 if MAP_F64 else tl.float32)
    for r0 in range(0, h_ok, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        cells = tl.load(maps_ptr + b * stride_m_b + rows[:, None] * stride_m_h + cols[None, :] * stride_m_w,
                        mask=(rows < h_ok)[:, None] & col_mask[None, :], other=0.0).to(peak.dtype)
        # NaN fails both comparisons; inf fails the second.
        finite = (cells == cells) & (tl.abs(cells) < float("inf"))
        bad_cells += tl.sum((~finite).to(tl.int32))
        peak = tl.maximum(peak, tl.max(tl.where(finite & (cells > 0.0), cells, 0.0)))
    peak = tl.where(peak > 0.0, peak, 1.0)
    total = 0.0
    mass = 0.0
    for r0 in range(0, h_ok, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_mask = rows < h_ok
        cells = tl.load(maps_ptr + b * stride_m_b + rows[:, None] * stride_m_h + cols[None, :] * stride_m_w,
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(peak.dtype)
        # Divided before narrowing: a float64 map may exceed float32's range.
        grid = tl.where(cells > 0.0, cells / peak, 0.0).to(tl.float32)
        fy_full = _prefix(height, rows, n_rows, height)
        total += tl.sum(fy_full * tl.sum(grid * fx_full[None, :], axis=1))
        # Fy(P) of every row edge P: [2 BLOCK_K, ROWS].
        fy_edges = _prefix(y_edge.to(tl.float32)[:, None], rows[None, :], n_rows, height)
        # One column product G Fx(Q) per distinct column edge Q; the row edges P are summed as a vector.
        for j in range(0, 2 * n):
            e = tl.where(j < n, j, BLOCK_K + j - n)
            q = tl.sum(tl.where(order == e, x_edge, 0), axis=0)
            q_first = tl.sum(tl.where(order == e, x_first.to(tl.int32), 0), axis=0) > 0
            if q_first:
                fx = _prefix(q.to(tl.float32), cols, n_cols, width)
                col = tl.sum(grid * fx[None, :], axis=1)
                d = _corners(y_edge, q, x_lo, y_lo, x_hi, y_hi, used)
                d = tl.where(y_first, d, 0).to(tl.float32)
                mass += tl.sum(tl.sum(d[:, None] * fy_edges, axis=0) * col)

    # The corner sum cancels large prefix masses; clamp its float32 rounding into [0, 1].
    ratio = mass / tl.where(total > 0.0, total, 1.0)
    score = tl.where(any_box & (total > 0.0), tl.minimum(tl.maximum(ratio, 0.0), 1.0), 0.0)
    # The codes _MAP_SIZE_NONPOSITIVE (1) .. _MAP_NOT_FINITE (8), the first failing check winning.
    status = tl.where(
        (h <= 0) | (w <= 0), 1, tl.where(
            (h > h_max) | (w > w_max), 2, tl.where(
                (img_h <= 0) | (img_w <= 0) | (img_h > _MAX_SIDE) | (img_w > _MAX_SIDE), 3, tl.where(
                    (count < 0) | (count > k_max), 4, tl.where(
                        ~(tl.abs(valid) < float("inf")), 5, tl.where(
                            x_disorder > 0, 6, tl.where(
                                y_disorder > 0, 7, tl.where(bad_cells > 0, 8, 0))))))))
    tl.store(out_ptr + b, tl.where(status == 0, valid * score, float("nan")))
    tl.store(status_ptr + b, status)


def _raise_for_status(codes: list[int], maps, map_sizes, image_sizes, boxes, box_counts, valid) -> None:
    """Turn the first non-zero status into the error the C++ kernel raises for the same input."""
    b = next(i for i, code in enumerate(codes) if code != _OK)
    code = codes[b]
    h, w = map_sizes[b].tolist()
    if code == _MAP_SIZE_NONPOSITIVE:
        raise ValueError(f"reward: map_sizes[{b}] = ({h}, {w}) must be positive")
    if code == _MAP_SIZE_TOO_LARGE:
        raise ValueError(f"reward: map_sizes[{b}] = ({h}, {w}) is larger than the padded maps tensor of "
                         f"shape {list(maps.shape)}")
    if code == _IMAGE_SIZE_NONPOSITIVE:
        height, width = image_sizes[b].tolist()
        raise ValueError(f"reward: image_sizes[{b}] = ({height}, {width}) must be positive and at most "
                         f"{_MAX_SIDE.value} (the float32 kernel counts pixels exactly up to there)")
    if code == _COUNT_OUT_OF_RANGE:
        raise ValueError(f"reward: box_counts[{b}] = {int(box_counts[b])} must lie in [0, K_max = "
                         f"{boxes.shape[1]}] (boxes has shape {list(boxes.shape)})")
    if code == _VALID_NOT_FINITE:
        raise ValueError(f"reward: valid[{b}] = {float(valid[b])} is not finite")
    if code in (_X_ORDER, _Y_ORDER):
        axis, lo, hi = ("x", 0, 2) if code == _X_ORDER else ("y", 1, 3)
        for k, box in enumerate(boxes[b, : int(box_counts[b])].tolist()):
            if box[hi] < box[lo]:
                raise ValueError(f"reward: boxes[{b}, {k}] = {tuple(box)} has {axis}_hi < {axis}_lo")
    raise ValueError(f"reward: maps[{b}] holds NaN or inf inside its map_sizes[{b}] = ({h}, {w}) region")


def reward_triton(maps: torch.Tensor, map_sizes: torch.Tensor, image_sizes: torch.Tensor, boxes: torch.Tensor,
                  box_counts: torch.Tensor, valid: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """The reward op on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``): one kernel launch.

    Args:
        maps: float32/float64/bfloat16/float16 ``[B, h_max, w_max]``; rollout ``b``'s raw map fills the
            top-left ``map_sizes[b]`` corner, the rest is ignored; relu is applied inside. Summed in float32.
        map_sizes: int32/int64 ``[B, 2]``, ``(h', w')``.
        image_sizes: int32/int64 ``[B, 2]``, ``(H, W)`` in pixels.
        boxes: int32/int64 ``[B, K_max, 4]``, inclusive pixel ranges ``(x_lo, y_lo, x_hi, y_hi)``; clamped
            to the image, a box wholly off it is empty.
        box_counts: int32/int64 ``[B]``, how many of the ``K_max`` boxes each rollout uses.
        valid: float ``[B]``, multiplier.
        check: read the per-rollout status back and raise ``ValueError`` naming the argument for bad
            values (one device-to-host copy: a synchronisation on CUDA). ``False`` keeps the call
            asynchronous; rollouts with bad values then return NaN.

    Returns:
        float32 ``[B]``: ``valid * mass in the union of the boxes / total mass``, 0 where either is empty.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: a wrong rank, shape, batch size or device, or (with ``check``) a bad value.
    """
    check_reward_metadata(maps, map_sizes, image_sizes, boxes, box_counts, valid)
    batch, h_max, w_max = maps.shape
    k_max = boxes.shape[1]
    if batch == 0:
        return torch.empty(0, dtype=torch.float32, device=maps.device)
    # One allocation for the results and the status codes (each allocation is microseconds of the
    # GPU path's budget); the status half is what ``check`` copies back.
    buffer = torch.empty(2 * batch, dtype=torch.int32, device=maps.device)
    out, status = buffer[:batch].view(torch.float32), buffer[batch:]
    block_w = triton.next_power_of_2(max(w_max, 1))
    rows = min(triton.next_power_of_2(max(h_max, 1)), max(1, _TILE_CELLS // block_w))
    _reward_kernel[(batch,)](
        maps, map_sizes, image_sizes, boxes, box_counts, valid, out, status,
        h_max, w_max, k_max,
        *maps.stride(), *map_sizes.stride(), *image_sizes.stride(), *boxes.stride(),
        box_counts.stride(0), valid.stride(0),
        ROWS=rows, BLOCK_W=block_w, BLOCK_K=triton.next_power_of_2(max(k_max, 1)),
        MAP_F64=maps.dtype == torch.float64)
    if check:
        codes = status.tolist()
        if any(codes):
            _raise_for_status(codes, maps, map_sizes, image_sizes, boxes, box_counts, valid)
    return out
