"""The argument checks that need no values (types, dtypes, ranks, shapes, devices), shared by the Triton
launchers and the fake implementations, so that ``torch.compile`` rejects what eager rejects. The
messages are the C++ kernels' (``kernels/cpu``), word for word; value checks (sizes, box order, NaN)
stay in the kernels."""

from __future__ import annotations

import torch

PATHS = ("cot", "direct", "both")
# Every kernel takes these; the C++ kernels also float64.
LAYER_SALIENCY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"


# (name, accepted dtypes, layout, rank, size of the last dim or None); every one has B rows.
_REWARD_ARGUMENTS = (("map_sizes", INDEX_DTYPES, "[B, 2] = (h', w')", 2, 2),
                     ("image_sizes", INDEX_DTYPES, "[B, 2] = (H, W)", 2, 2),
                     ("boxes", INDEX_DTYPES, "[B, K_max, 4] = (x_lo, y_lo, x_hi, y_hi)", 3, 4),
                     ("box_counts", INDEX_DTYPES, "[B]", 1, None),
                     ("valid", (torch.float32, torch.float64, torch.bfloat16, torch.float16), "[B]", 1, None))


def check_reward_metadata(maps, *others) -> None:
    """``maps, map_sizes, image_sizes, boxes, box_counts, valid`` of ``saliency::reward``. Kept lean: it
    runs on every call, inside the GPU path's 50 us budget."""
    if not isinstance(maps, torch.Tensor) or maps.dtype not in MAP_DTYPES:
        raise TypeError(f"reward: maps must be a float32/float64/bfloat16/float16 tensor of shape "
                        f"[B, h_max, w_max], got {describe(maps)}")
    if maps.dim() != 3:
        raise ValueError(f"reward: maps must have shape [B, h_max, w_max], got {describe(maps)}")
    batch, device = maps.shape[0], maps.device
    for t, (name, dtypes, layout, rank, last) in zip(others, _REWARD_ARGUMENTS):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            kind = "a floating-point" if name == "valid" else "an int32/int64"
            raise TypeError(f"reward: {name} must be {kind} tensor of shape {layout}, got {describe(t)}")
        if t.dim() != rank or t.shape[0] != batch or (last is not None and t.shape[-1] != last):
            raise ValueError(f"reward: {name} must have shape {layout} with B = {batch} (the batch size of "
                             f"maps), got {describe(t)}")
        if t.device != device:
            raise ValueError(f"reward: {name} must be on the device of maps ({device}), got {describe(t)}")


def _check_rank(name: str, tensor, dims: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(tensor.shape)}")


def check_layer_saliency_metadata(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                                  lengths, path) -> None:
    """The arguments of ``saliency::layer_saliency``: what the C++ kernel checks before reading a value,
    and, for CUDA tensors, the Triton kernel's dtypes (no float64)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of 'cot', 'direct', 'both', got {path!r}")
    for name, tensor, dims, layout in (
            ("q_think", q_think, 4, "[B, H, T, d]"), ("lse_think", lse_think, 3, "[B, H, T]"),
            ("q_answer", q_answer, 4, "[B, H, A, d]"), ("lse_answer", lse_answer, 3, "[B, H, A]"),
            ("k_think", k_think, 4, "[B, H_kv, T, d]"), ("k_image", k_image, 4, "[B, H_kv, N, d]"),
            ("v_image", v_image, 4, "[B, H_kv, N, d]"), ("u_answer", u_answer, 4, "[B, H, A, d]"),
            ("lengths", lengths, 2, "[B, 3] (N_b, T_b, A_b)")):
        _check_rank(name, tensor, dims, layout)
    if lengths.shape[1] != 3:
        raise ValueError(f"lengths must be [B, 3] (N_b, T_b, A_b), got shape {tuple(lengths.shape)}")
    batch = q_answer.shape[0]
    named = {"q_think": q_think, "lse_think": lse_think, "lse_answer": lse_answer, "k_think": k_think,
             "k_image": k_image, "v_image": v_image, "u_answer": u_answer, "lengths": lengths}
    for name, tensor in named.items():
        if tensor.shape[0] != batch:
            raise ValueError(f"batch size mismatch: {name} has B={tensor.shape[0]} but q_answer has B={batch}")
        if tensor.device != q_answer.device:
            raise ValueError(f"{name} is on {tensor.device} but q_answer is on {q_answer.device}")
    heads, kv_heads, head_size = q_answer.shape[1], k_image.shape[1], q_answer.shape[3]
    for name in ("q_think", "lse_think", "lse_answer", "u_answer"):
        if named[name].shape[1] != heads:
            raise ValueError(f"head count mismatch: {name} has H={named[name].shape[1]} but q_answer has H={heads}")
    for name in ("k_think", "v_image"):
        if named[name].shape[1] != kv_heads:
            raise ValueError(f"kv head count mismatch: {name} has H_kv={named[name].shape[1]} "
                             f"but k_image has H_kv={kv_heads}")
    if heads == 0 or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q_answer's H={heads} must be a positive multiple of k_image's H_kv={kv_heads}")
    for name in ("q_think", "k_think", "k_image", "v_image", "u_answer"):
        if named[name].shape[3] != head_size:
            raise ValueError(f"head size mismatch: {name} has d={named[name].shape[3]} "
                             f"but q_answer has d={head_size}")
    think, answers, image = q_think.shape[2], q_answer.shape[2], k_image.shape[2]
    for name, size, letter, like, limit in (
            ("lse_think", lse_think.shape[2], "T", "q_think", think), ("k_think", k_think.shape[2], "T", "q_think", think),
            ("lse_answer", lse_answer.shape[2], "A", "q_answer", answers),
            ("u_answer", u_answer.shape[2], "A", "q_answer", answers),
            ("v_image", v_image.shape[2], "N", "k_image", image)):
        if size != limit:
            raise ValueError(f"{name} has {letter}={size} but {like} has {letter}={limit}")
    on_cpu = q_answer.device.type == "cpu"
    if q_answer.dtype not in LAYER_SALIENCY_DTYPES and not (on_cpu and q_answer.dtype == torch.float64):
        if q_answer.dtype == torch.float64:
            raise TypeError(f"q_answer must be float32, bfloat16 or float16 for the Triton kernel, got "
                            f"{q_answer.dtype} (float64 runs on the CPU kernel)")
        raise TypeError(f"q_answer must be float32, float64, bfloat16 or float16, got {q_answer.dtype}")
    for name in ("q_think", "k_think", "k_image", "v_image", "u_answer"):
        if named[name].dtype != q_answer.dtype:
            raise TypeError(f"{name} must have q_answer's dtype {q_answer.dtype}, got {named[name].dtype}")
    for name in ("lse_think", "lse_answer"):
        lse_dtype = named[name].dtype
        if not (lse_dtype == torch.float32 or (q_answer.dtype == torch.float64 and lse_dtype == torch.float64)):
            raise TypeError(f"{name} must be float32 (or float64 with float64 inputs), got {lse_dtype}")
    if lengths.dtype != torch.int64:
        raise TypeError(f"lengths must be int64, got {lengths.dtype}")
