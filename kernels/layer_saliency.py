"""Triton kernel of ``saliency::layer_saliency`` (docs/method.md section 3): one layer's ``S(a, i)``, summed over heads.

Nothing of size ``[T, N]``, ``[A, T]`` or ``[A, N, V]`` touches global memory: every probability is recomputed
in registers, tile by tile, from the queries, the keys and the row's log-sum-exp,

    alpha(j -> m) = exp(s * q_j . k_m - lse_j) = exp2(log2(e) * (s * q_j . k_m - lse_j)),

and only the ``[B, A, N]`` result is written. The exponent ``x`` is formed before the change of base (flash
attention folds log2(e) into the scale instead), so the rounding of ``log2(e) * x`` grows with ``|x|``,
small for the probabilities that matter, rather than with the magnitude of the score.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from saliency_r1.kernels.checks import check_layer_saliency_metadata


# One program per (tile of image tokens, tile of answer rows, rollout), looping over every head inside.
# Why not one program per head: the sum over heads then stays in registers, the output is written once
# (no atomics, deterministic, no [B, H, A, N] partials to reduce), and the grid is still wide enough at
# Qwen2.5-VL-3B's shapes: 8 rollouts x ceil(1000 / 64) tiles = 128 programs for 132 SMs, each running
# H * ceil(T / BLOCK_T) tensor-core steps. A is small (a few answer tokens): usually one answer tile,
# padded to 16 because tl.dot needs at least 16 on each side.
# Tile sizes and warps checked with ptxas -v on sm_90 builds: 4 warps (8 for fp32, whose exact "ieee"
# products run on the FMA units, and for 64 answer rows) stay within 255 registers without spills; fp32
# keeps 16 answer rows per tile (wider tiles spill) and takes more answer tiles instead.
_BLOCK_N = 64
_BLOCK_T = 32
_MIN_BLOCK_A = 16
_MAX_BLOCK_A = 64


# Triton's interpreter multiplies bf16 blocks as their raw uint16 bits in tl.dot; there the operands are
# widened to fp32 first. bf16 x bf16 products are exact in fp32, so this is the GPU's arithmetic.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _layer_saliency_kernel(
        q_think_ptr, lse_think_ptr, q_answer_ptr, lse_answer_ptr, k_think_ptr, k_image_ptr, v_image_ptr,
        u_answer_ptr, lengths_ptr, out_ptr,
        stride_qt_b, stride_qt_h, stride_qt_t, stride_qt_d,
        stride_lt_b, stride_lt_h, stride_lt_t,
        stride_qa_b, stride_qa_h, stride_qa_a, stride_qa_d,
        stride_la_b, stride_la_h, stride_la_a,
        stride_kt_b, stride_kt_h, stride_kt_t, stride_kt_d,
        stride_ki_b, stride_ki_h, stride_ki_n, stride_ki_d,
        stride_vi_b, stride_vi_h, stride_vi_n, stride_vi_d,
        stride_ua_b, stride_ua_h, stride_ua_a, stride_ua_d,
        stride_len_b, stride_len_j,
        stride_o_b, stride_o_a, stride_o_n,
        heads, groups, a_max, n_max, t_max, scale,
        COT: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDEN: tl.constexpr,
        HEAD_SIZE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_a = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_raw = tl.load(lengths_ptr + b * stride_len_b)
    t_raw = tl.load(lengths_ptr + b * stride_len_b + stride_len_j)
    a_raw = tl.load(lengths_ptr + b * stride_len_b + 2 * stride_len_j)
    # Lengths out of range make the rollout's whole output NaN (checking them on the host would cost a
    # synchronisation per layer); the work below stays in bounds regardless.
    bad = (n_raw < 0) | (n_raw > n_max) | (t_raw < 0) | (t_raw > t_max) | (a_raw < 0) | (a_raw > a_max)
    n_b = tl.minimum(tl.maximum(n_raw, 0), n_max)
    t_b = tl.minimum(tl.maximum(t_raw, 0), t_max)
    a_b = tl.minimum(tl.maximum(a_raw, 0), a_max)

    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_a = offs_a < a_b
    mask_n = offs_n < n_b
    # Head size 80 runs in a 128-wide tile; the zero columns add nothing to q . k. The bound is a compile-time
    # constant so that the compiler sees the mask constant over 16-column groups and keeps 16-byte loads.
    mask_d = offs_d < HEAD_SIZE
    log2e = 1.4426950408889634

    # Tiles are held transposed, image tokens as rows: the long-lived image keys are the 64-row left
    # operand of the dots, split across the warps like flash attention's queries (sm_90 build: wgmma),
    # rather than the right operand of 16- and 32-row dots.
    acc = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
    if (pid_a * BLOCK_A < a_b) & (pid_n * BLOCK_N < n_b):
        for h in range(0, heads):
            kv = h // groups
            ki_ptrs = (k_image_ptr + b * stride_ki_b + kv * stride_ki_h + offs_n[:, None] * stride_ki_n
                       + offs_d[None, :] * stride_ki_d)
            k_i = tl.load(ki_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            qa_ptrs = (q_answer_ptr + b * stride_qa_b + h * stride_qa_h + offs_d[:, None] * stride_qa_d
                       + offs_a[None, :] * stride_qa_a)
            q_a = tl.load(qa_ptrs, mask=mask_d[:, None] & mask_a[None, :], other=0.0)  # [BLOCK_D, BLOCK_A]
            lse_a = tl.load(lse_answer_ptr + b * stride_la_b + h * stride_la_h + offs_a * stride_la_a,
                            mask=mask_a, other=0.0).to(tl.float32)
            weight = tl.zeros((BLOCK_N, BLOCK_A), dtype=tl.float32)
            if COT:
                for t0 in range(0, t_b, BLOCK_T):
                    offs_t = t0 + tl.arange(0, BLOCK_T)
                    mask_t = offs_t < t_b
                    kt_ptrs = (k_think_ptr + b * stride_kt_b + kv * stride_kt_h + offs_t[:, None] * stride_kt_t
                               + offs_d[None, :] * stride_kt_d)
                    k_t = tl.load(kt_ptrs, mask=mask_t[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
                    qt_ptrs = (q_think_ptr + b * stride_qt_b + h * stride_qt_h + offs_d[:, None] * stride_qt_d
                               + offs_t[None, :] * stride_qt_t)
                    q_t = tl.load(qt_ptrs, mask=mask_d[:, None] & mask_t[None, :], other=0.0)  # [BLOCK_D, BLOCK_T]
                    lse_t = tl.load(lse_think_ptr + b * stride_lt_b + h * stride_lt_h + offs_t * stride_lt_t,
                                    mask=mask_t, other=0.0).to(tl.float32)
                    # alpha(a -> t) as [BLOCK_T, BLOCK_A]: the padded think rows must be exactly 0.
                    s_ta = _dot(k_t, q_a, None, DOT_PRECISION, WIDEN)
                    p_ta = tl.where(mask_t[:, None], tl.exp2((s_ta * scale - lse_a[None, :]) * log2e), 0.0)
                    # alpha(t -> i) as [BLOCK_N, BLOCK_T]; its padded columns meet the zero rows of p_ta.
                    s_it = _dot(k_i, q_t, None, DOT_PRECISION, WIDEN)
                    p_it = tl.exp2((s_it * scale - lse_t[None, :]) * log2e)
                    # Probabilities enter the tensor cores in the input dtype (as flash attention's P @ V
                    # does) and accumulate in fp32.
                    weight = _dot(p_it.to(k_t.dtype), p_ta.to(k_t.dtype), weight, DOT_PRECISION, WIDEN)
            if DIRECT:
                s_ia = _dot(k_i, q_a, None, DOT_PRECISION, WIDEN)
                weight += tl.exp2((s_ia * scale - lse_a[None, :]) * log2e)
            # <v_i, W_O^T g_a> as [BLOCK_N, BLOCK_A]: loaded after the think loop to keep registers free in it.
            vi_ptrs = (v_image_ptr + b * stride_vi_b + kv * stride_vi_h + offs_n[:, None] * stride_vi_n
                       + offs_d[None, :] * stride_vi_d)
            v_i = tl.load(vi_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            ua_ptrs = (u_answer_ptr + b * stride_ua_b + h * stride_ua_h + offs_d[:, None] * stride_ua_d
                       + offs_a[None, :] * stride_ua_a)
            u_a = tl.load(ua_ptrs, mask=mask_d[:, None] & mask_a[None, :], other=0.0)
            acc += weight * _dot(v_i, u_a, None, DOT_PRECISION, WIDEN)
    acc = tl.where(mask_n[:, None] & mask_a[None, :], acc, 0.0)  # padding outputs are 0
    acc = tl.where(bad, float("nan"), acc)
    out_ptrs = out_ptr + b * stride_o_b + offs_n[:, None] * stride_o_n + offs_a[None, :] * stride_o_a
    tl.store(out_ptrs, acc, mask=(offs_n[:, None] < n_max) & (offs_a[None, :] < a_max))


def layer_saliency_triton(q_think: torch.Tensor, lse_think: torch.Tensor, q_answer: torch.Tensor,
                          lse_answer: torch.Tensor, k_think: torch.Tensor, k_image: torch.Tensor,
                          v_image: torch.Tensor, u_answer: torch.Tensor, lengths: torch.Tensor, scale: float,
                          path: str = "cot") -> torch.Tensor:
    """One layer's ``S(a, i)`` summed over heads, in one Triton launch (the CUDA kernel of the op).

    Args:
        q_think: ``[B, H, T, d]`` queries (after rotary) of the think rows; float32, bfloat16 or float16.
        lse_think: float32 ``[B, H, T]`` softmax log-sum-exp of the think rows' scaled scores.
        q_answer: ``[B, H, A, d]`` queries of the answer rows.
        lse_answer: float32 ``[B, H, A]`` their log-sum-exp.
        k_think: ``[B, H_kv, T, d]`` keys at the think positions.
        k_image: ``[B, H_kv, N, d]`` keys at the image positions.
        v_image: ``[B, H_kv, N, d]`` values at the image positions.
        u_answer: ``[B, H, A, d]`` projected answer vectors ``W_O[l,h]^T g_a``.
        lengths: int64 ``[B, 3]``, valid ``(N_b, T_b, A_b)`` per rollout; padding is ignored. A rollout
            whose lengths are out of range gets NaN everywhere (the C++ kernel raises; here that would
            cost a host synchronisation per call).
        scale: softmax scale ``s``.
        path: ``"cot"``, ``"direct"`` or ``"both"``.

    Returns:
        float32 ``[B, A, N]``; padding entries are 0, and ``T_b = 0`` gives 0 on the ``cot`` path.
    """
    check_layer_saliency_metadata(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                                  lengths, path)
    if q_answer.dtype == torch.float64:  # the shared check lets it pass on CPU tensors, as the interpreter gets
        raise TypeError(f"q_answer must be float32, bfloat16 or float16 for the Triton kernel, got {q_answer.dtype} "
                        "(float64 runs on the CPU kernel)")
    batch, heads, answers, head_size = q_answer.shape
    kv_heads, image = k_image.shape[1], k_image.shape[2]
    out = torch.empty((batch, answers, image), dtype=torch.float32, device=q_answer.device)
    if out.numel() == 0:
        return out
    fp32 = q_answer.dtype == torch.float32
    block_a = min(_MIN_BLOCK_A if fp32 else _MAX_BLOCK_A, max(_MIN_BLOCK_A, triton.next_power_of_2(answers)))
    grid = (triton.cdiv(image, _BLOCK_N), triton.cdiv(answers, block_a), batch)
    _layer_saliency_kernel[grid](
        q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer, lengths, out,
        *q_think.stride(), *lse_think.stride(), *q_answer.stride(), *lse_answer.stride(), *k_think.stride(),
        *k_image.stride(), *v_image.stride(), *u_answer.stride(), *lengths.stride(), *out.stride(),
        heads, heads // kv_heads, answers, image, q_think.shape[2], float(scale),
        COT=path in ("cot", "both"), DIRECT=path in ("direct", "both"),
        # fp32 inputs: exact fp32 products (TF32 would cost ~1e-3 relative error); others: tensor-core default.
        DOT_PRECISION="ieee" if fp32 else "tf32",
        WIDEN=_INTERPRETED and q_answer.dtype == torch.bfloat16,
        HEAD_SIZE=head_size, BLOCK_A=block_a, BLOCK_N=_BLOCK_N, BLOCK_T=_BLOCK_T,
        BLOCK_D=max(16, triton.next_power_of_2(head_size)),
        num_warps=8 if fp32 or block_a > 32 else 4, num_stages=2)
    return out
