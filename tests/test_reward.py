"""The reward op (docs/method.md section 4): C++ CPU kernel and Triton kernel against the materialising reference.

Tolerances. The C++ kernel and the reference both work in float64 and round to float32 at the end, so
they agree to one float32 ulp (rtol 2**-23), plus 1e-12 absolute for the summation by parts, which
cancels prefix masses as large as the total (1 after normalising) in float64. The Triton kernel works
in float32: the same cancellation costs a few float32 ulps of the total, so it is held to 2e-6
absolute (16 ulps of 1) on rewards in [0, 1].
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saliency_r1
import saliency_r1.ops  # noqa: F401  (loads the library: registers torch.ops.saliency.*)
from saliency_r1.rewards import saliency_in_box
from saliency_r1.kernels.reference.reward import reward_public_way, reward_reference
from saliency_r1.kernels.reward import reward_triton
from conftest import TRITON_DEVICE

CPU_TOL = dict(rtol=2.0 ** -23, atol=1e-12)
TRITON_TOL = dict(rtol=0.0, atol=2e-6)

# Box families, each a function (H, W, rng) -> list of inclusive pixel boxes (x_lo, y_lo, x_hi, y_hi).
BOX_KINDS = {
    "none": lambda H, W, rng: [],
    "whole image": lambda H, W, rng: [(0, 0, W - 1, H - 1)],
    "inside": lambda H, W, rng: [_random_box(H, W, rng)],
    "single pixel": lambda H, W, rng: [(rng.randrange(W), rng.randrange(H)) * 2],
    "one row and one column": lambda H, W, rng: [(0, rng.randrange(H), W - 1, None), (rng.randrange(W), 0, None, H - 1)],
    "overlapping": lambda H, W, rng: [_random_box(H, W, rng) for _ in range(3)],
    "nested": lambda H, W, rng: _nested(H, W, rng),
    "duplicated edges": lambda H, W, rng: _duplicated(H, W, rng),
    "partly off": lambda H, W, rng: [(-rng.randrange(1, 50), -rng.randrange(1, 50), rng.randrange(W), W + 5),
                                     (rng.randrange(W), rng.randrange(H), W + 100, H + 3)],
    "wholly off": lambda H, W, rng: [(W, 0, W + 10, H - 1), (0, -20, W - 1, -1), (-9, -9, -1, H + 9)],
    "eight, some off": lambda H, W, rng: [_random_box(H, W, rng, slack=20) for _ in range(8)],
}


def _random_box(H, W, rng, slack=0):
    x_lo, x_hi = sorted(rng.randrange(-slack, W + slack) for _ in range(2))
    y_lo, y_hi = sorted(rng.randrange(-slack, H + slack) for _ in range(2))
    return x_lo, y_lo, x_hi, y_hi


def _nested(H, W, rng):
    outer = _random_box(H, W, rng)
    x_lo, y_lo, x_hi, y_hi = outer
    inner = (rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi))
    return [outer, (inner[0], inner[1], rng.randint(inner[0], x_hi), rng.randint(inner[1], y_hi)), outer]


def _duplicated(H, W, rng):
    """Boxes sharing edges (and touching), so the corner sum must count each distinct edge once."""
    a = _random_box(H, W, rng)
    return [a, (a[2] + 1, a[1], max(a[2] + 1, W - 1), a[3]), (a[0], a[3] + 1, a[2], max(a[3] + 1, H - 1)),
            (a[0], a[1], a[2], a[1])]


def _fill(box, H, W):
    """Boxes given with None mean 'the same as the low edge' (a single row or column)."""
    x_lo, y_lo, x_hi, y_hi = box
    return x_lo, y_lo, x_lo if x_hi is None else x_hi, y_lo if y_hi is None else y_hi


def make_batch(rollouts, *, dtype=torch.float32, index_dtype=torch.int64, seed=0, pad=2):
    """Pack rollouts ``(h', w', H, W, boxes)`` into the op's padded tensors.

    Padding is NaN: the kernels must never read it. ``valid`` is random in (0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    B = len(rollouts)
    h_max = max(r[0] for r in rollouts) + pad
    w_max = max(r[1] for r in rollouts) + pad
    k_max = max(len(r[4]) for r in rollouts) + 1
    maps = torch.full((B, h_max, w_max), float("nan"), dtype=torch.float64)
    boxes = torch.full((B, k_max, 4), -7, dtype=torch.int64)  # unused rows hold junk on purpose
    for b, (h, w, H, W, bx) in enumerate(rollouts):
        maps[b, :h, :w] = torch.randn(h, w, generator=gen, dtype=torch.float64)
        if bx:
            boxes[b, : len(bx)] = torch.tensor([_fill(box, H, W) for box in bx])
    return (maps.to(dtype), torch.tensor([r[:2] for r in rollouts], dtype=index_dtype),
            torch.tensor([r[2:4] for r in rollouts], dtype=index_dtype), boxes.to(index_dtype),
            torch.tensor([len(r[4]) for r in rollouts], dtype=index_dtype),
            torch.rand(B, generator=gen, dtype=torch.float64).add(0.01).clamp(max=1).to(torch.float32))


def rollouts_for(h, w, H, W, seed, kinds=BOX_KINDS):
    rng = random.Random(seed)
    return [(h, w, H, W, make(H, W, rng)) for make in kinds.values()]


def to(batch, device):
    return tuple(t.to(device) for t in batch)


MAP_SIZES = [(1, 1), (1, 9), (6, 1), (3, 4), (16, 16), (37, 20), (64, 64)]
IMAGE_SIZES = [(1, 1), (1, 1500), (2048, 3), (5, 7), (97, 61), (448, 448), (1036, 560)]


# ---------------------------------------------------------------- C++ kernel against the reference

@pytest.mark.parametrize("image", IMAGE_SIZES, ids=lambda s: f"img{s[0]}x{s[1]}")
@pytest.mark.parametrize("grid", MAP_SIZES, ids=lambda s: f"map{s[0]}x{s[1]}")
def test_cpu_kernel_matches_reference(grid, image):
    batch = make_batch(rollouts_for(*grid, *image, seed=hash((grid, image)) % 1000))
    torch.testing.assert_close(torch.ops.saliency.reward(*batch), reward_reference(*batch), **CPU_TOL)


def test_cpu_kernel_matches_reference_on_a_2048_square_image():
    batch = make_batch(rollouts_for(64, 64, 2048, 2048, seed=1, kinds={k: BOX_KINDS[k] for k in (
        "whole image", "overlapping", "single pixel", "eight, some off")}))
    torch.testing.assert_close(torch.ops.saliency.reward(*batch), reward_reference(*batch), **CPU_TOL)


def mixed_rollouts(n, seed, max_grid=64, max_side=2048):
    """Mixed sizes and aspect ratios, every box family, in one padded batch."""
    rng = random.Random(seed)
    kinds = list(BOX_KINDS.values())
    out = []
    for i in range(n):
        h, w = rng.randint(1, max_grid), rng.randint(1, max_grid)
        H = rng.choice([1, 2, rng.randint(1, 64), rng.randint(64, max_side)])
        W = rng.choice([1, 3, rng.randint(1, 64), rng.randint(64, max_side)])
        out.append((h, w, H, W, kinds[i % len(kinds)](H, W, rng)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_kernel_padded_mixed_batch(dtype, index_dtype):
    batch = make_batch(mixed_rollouts(40, seed=3, max_side=700), dtype=dtype, index_dtype=index_dtype)
    # The reference reads the same (already rounded) map values, so the dtype changes nothing else.
    torch.testing.assert_close(torch.ops.saliency.reward(*batch), reward_reference(*batch), **CPU_TOL)


def test_cpu_kernel_reads_strided_maps():
    maps, *rest = make_batch(mixed_rollouts(6, seed=4, max_grid=12, max_side=200), pad=0)
    strided = maps.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    torch.testing.assert_close(torch.ops.saliency.reward(strided, *rest), reward_reference(maps, *rest), **CPU_TOL)


def test_zero_mass_and_zero_valid_give_zero():
    maps, ms, isz, bx, bc, valid = make_batch(rollouts_for(4, 5, 30, 40, seed=5))
    negative = -maps.nan_to_num(0).abs() - 1  # relu makes every cell 0
    assert torch.ops.saliency.reward(negative, ms, isz, bx, bc, valid).eq(0).all()
    assert torch.ops.saliency.reward(maps, ms, isz, bx, bc, torch.zeros_like(valid)).eq(0).all()


# ---------------------------------------------------------------- Triton kernel against the reference

TRITON_CASES = [((1, 1), (1, 1)), ((1, 9), (1, 1500)), ((6, 1), (2048, 3)), ((3, 4), (5, 7)),
                ((16, 16), (448, 448)), ((37, 20), (1036, 560)), ((64, 64), (97, 61)), ((5, 64), (2048, 2048))]


@pytest.mark.parametrize("grid,image", TRITON_CASES, ids=[f"map{g[0]}x{g[1]}-img{i[0]}x{i[1]}" for g, i in TRITON_CASES])
def test_triton_kernel_matches_reference(triton_device, grid, image):
    # Every box family is covered by the mixed batches below; here the ones that stress the corner sum.
    kinds = {k: BOX_KINDS[k] for k in ("none", "whole image", "nested", "duplicated edges", "partly off",
                                       "eight, some off")}
    batch = make_batch(rollouts_for(*grid, *image, seed=7, kinds=kinds))
    got = reward_triton(*to(batch, triton_device))
    assert got.device.type == torch.device(triton_device).type and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), reward_reference(*batch), **TRITON_TOL)


@pytest.mark.parametrize("seed,dtype,index_dtype", [(8, torch.float32, torch.int64), (9, torch.bfloat16, torch.int32),
                                                    (10, torch.float16, torch.int64), (11, torch.float64, torch.int32)])
def test_triton_kernel_padded_mixed_batch(triton_device, seed, dtype, index_dtype):
    batch = make_batch(mixed_rollouts(6, seed=seed), dtype=dtype, index_dtype=index_dtype)
    torch.testing.assert_close(reward_triton(*to(batch, triton_device)).cpu(), reward_reference(*batch), **TRITON_TOL)


def test_triton_kernel_reads_large_maps_in_row_chunks(triton_device):
    # 100 x 90 cells exceed one 4096-cell tile: the kernel loops over chunks of rows.
    batch = make_batch([(100, 90, 300, 250, BOX_KINDS["overlapping"](300, 250, random.Random(9))),
                        (70, 90, 70, 90, [(3, 5, 60, 40)])])
    torch.testing.assert_close(reward_triton(*to(batch, triton_device)).cpu(), reward_reference(*batch), **TRITON_TOL)


def test_triton_whole_image_box_scores_exactly_one(triton_device):
    batch = make_batch([(h, w, H, W, [(0, 0, W - 1, H - 1)]) for h, w, H, W in [(3, 4, 50, 60), (1, 1, 1, 1), (9, 2, 7, 300)]])
    maps = batch[0].nan_to_num(0).abs() + 0.1
    valid = torch.ones(3)
    got = reward_triton(*to((maps, *batch[1:5], valid), triton_device))
    assert got.cpu().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op dispatches to Triton on CUDA tensors only")
def test_op_on_cuda_matches_cpu_kernel():
    batch = make_batch(mixed_rollouts(64, seed=10))
    torch.testing.assert_close(saliency_r1.reward(*to(batch, "cuda")).cpu(), saliency_r1.reward(*batch), **TRITON_TOL)


# ---------------------------------------------------------------- properties (hypothesis, C++ kernel)

@st.composite
def rollout(draw, max_boxes=6):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    H, W = draw(st.integers(1, 400)), draw(st.integers(1, 400))
    boxes = []
    for _ in range(draw(st.integers(0, max_boxes))):
        x_lo, x_hi = sorted(draw(st.lists(st.integers(-20, W + 20), min_size=2, max_size=2)))
        y_lo, y_hi = sorted(draw(st.lists(st.integers(-20, H + 20), min_size=2, max_size=2)))
        boxes.append((x_lo, y_lo, x_hi, y_hi))
    return h, w, H, W, boxes


def _scores(rollouts, seed, valid=1.0):
    maps, ms, isz, bx, bc, _ = make_batch(rollouts, seed=seed)
    return torch.ops.saliency.reward(maps, ms, isz, bx, bc, torch.full((len(rollouts),), valid))


@settings(max_examples=25, deadline=None)
@given(st.lists(rollout(), min_size=1, max_size=5), st.integers(0, 2 ** 16),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_property_triton_kernel_matches_reference(rollouts, seed, dtype):
    batch = make_batch(rollouts, seed=seed, dtype=dtype)
    torch.testing.assert_close(reward_triton(*to(batch, TRITON_DEVICE)).cpu(), reward_reference(*batch), **TRITON_TOL)


@settings(max_examples=60, deadline=None)
@given(st.lists(rollout(), min_size=1, max_size=6), st.integers(0, 2 ** 16))
def test_property_score_lies_in_unit_interval(rollouts, seed):
    scores = _scores(rollouts, seed)
    assert ((scores >= 0) & (scores <= 1)).all()


@settings(max_examples=40, deadline=None)
@given(rollout(), st.integers(0, 2 ** 16), st.floats(1e-3, 1e3))
def test_property_invariant_to_scaling_the_map(r, seed, factor):
    maps, *rest = make_batch([r], seed=seed)
    torch.testing.assert_close(torch.ops.saliency.reward(maps * factor, *rest), torch.ops.saliency.reward(maps, *rest),
                               **CPU_TOL)


@settings(max_examples=40, deadline=None)
@given(rollout(max_boxes=5).filter(lambda r: len(r[4]) >= 1), st.integers(0, 2 ** 16))
def test_property_union_scores_at_least_each_box(r, seed):
    maps, ms, isz, bx, bc, _ = make_batch([r], seed=seed)
    one = torch.ones(1)
    union = torch.ops.saliency.reward(maps, ms, isz, bx, bc, one)
    each = torch.cat([torch.ops.saliency.reward(maps, ms, isz, bx[:, k: k + 1], torch.ones_like(bc), one)
                      for k in range(int(bc[0]))])
    assert (union + 1e-12 >= each).all(), (union, each)


@settings(max_examples=40, deadline=None)
@given(rollout(max_boxes=0), st.integers(0, 2 ** 16), st.integers(0, 30))
def test_property_whole_image_box_scores_one(r, seed, overhang):
    h, w, H, W, _ = r
    maps, ms, isz, bx, bc, _ = make_batch([(h, w, H, W, [(-overhang, -overhang, W - 1 + overhang, H - 1 + overhang)])],
                                          seed=seed)
    # Positive mass after upsampling: a shrinking resize samples only some cells, so make every cell positive.
    maps = maps.abs() + 0.1
    assert torch.ops.saliency.reward(maps, ms, isz, bx, bc, torch.ones(1)).item() == 1.0


# ---------------------------------------------------------------- the public code's formula

@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_the_public_way_on_string_boxes(seed):
    rng = random.Random(seed)
    maps, sizes, boxes = [], [], []
    for _ in range(8):
        # Qwen2.5-VL maps: one cell per 28 px of the resized image, stretched back over the original.
        H, W = rng.randint(28, 1100), rng.randint(28, 1100)
        maps.append(torch.randn(max(1, round(H / 28)), max(1, round(W / 28)), dtype=torch.float64))
        x1, x2 = sorted(rng.sample(range(101), 2))  # distinct: a box is never empty
        y1, y2 = sorted(rng.sample(range(101), 2))
        x1, x2, y1, y2 = x1 / 100, x2 / 100, y1 / 100, y2 / 100
        sizes.append((H, W))
        boxes.append(f"[{x1},{y1},{x2},{y2}]")
    ours = saliency_in_box(maps, boxes, sizes)
    public = torch.tensor([reward_public_way(m, s, b) for m, s, b in zip(maps, sizes, boxes)], dtype=torch.float32)
    torch.testing.assert_close(ours, public, **CPU_TOL)


def test_public_way_fix_scales_the_lower_y_bound_by_the_height():
    # A wide image: the public code's floor(W * y1) would start the box far below floor(H * y1).
    grid = torch.arange(12.0).reshape(3, 4)
    got = reward_public_way(grid, (30, 400), "[0.0,0.5,1.0,1.0]")
    image = torch.nn.functional.interpolate(grid[None, None], size=(30, 400), mode="bilinear", align_corners=False)[0, 0]
    assert got == pytest.approx(float(image[15:].sum() / image.sum()), rel=1e-6)


# ---------------------------------------------------------------- bad input: clear errors naming the argument

def _good():
    return make_batch([(3, 4, 30, 40, [(1, 2, 10, 20)]), (2, 2, 8, 9, [(0, 0, 3, 3), (2, 2, 5, 5)])], pad=1)


def _with(index, value):
    def mutate(batch):
        batch = list(batch)
        batch[index] = value(batch[index])
        return batch
    return mutate


def _set(index, where, value):
    def change(t):
        t = t.clone()
        t[where] = value
        return t
    return _with(index, change)


BAD_INPUTS = [
    ("maps int", _with(0, lambda t: t.nan_to_num(0).int()), TypeError, r"maps must be a float32/float64/bfloat16/float16"),
    ("maps rank", _with(0, lambda t: t[0]), ValueError, r"maps must have shape \[B, h_max, w_max\]"),
    ("map_sizes float", _with(1, lambda t: t.float()), TypeError, r"map_sizes must be an int32/int64 tensor"),
    ("image_sizes rank", _with(2, lambda t: t[:, 0]), ValueError, r"image_sizes must have shape \[B, 2\]"),
    ("boxes batch", _with(3, lambda t: t[:1]), ValueError, r"boxes must have shape \[B, K_max, 4\].*B = 2"),
    ("boxes last dim", _with(3, lambda t: t[..., :3]), ValueError, r"boxes must have shape \[B, K_max, 4\]"),
    ("box_counts batch", _with(4, lambda t: t[:1]), ValueError, r"box_counts must have shape \[B\] with B = 2"),
    ("valid int", _with(5, lambda t: t.long()), TypeError, r"valid must be a floating-point tensor"),
    ("valid batch", _with(5, lambda t: torch.ones(3)), ValueError, r"valid must have shape \[B\] with B = 2"),
    ("map size zero", _set(1, (1, 0), 0), ValueError, r"map_sizes\[1\] = \(0, 2\) must be positive"),
    ("map size negative", _set(1, (0, 1), -3), ValueError, r"map_sizes\[0\] = \(3, -3\) must be positive"),
    ("map size too large", _set(1, (1, 1), 6), ValueError, r"map_sizes\[1\] = \(2, 6\) is larger than the padded maps"),
    ("image size zero", _set(2, (0, 0), 0), ValueError, r"image_sizes\[0\] = \(0, 40\) must be positive"),
    ("box count negative", _set(4, 1, -1), ValueError, r"box_counts\[1\] = -1 must lie in \[0, K_max = 3\]"),
    ("box count too large", _set(4, 0, 4), ValueError, r"box_counts\[0\] = 4 must lie in \[0, K_max = 3\]"),
    ("x_hi < x_lo", _set(3, (1, 1, 2), 1), ValueError, r"boxes\[1, 1\] = \(2, 2, 1, 5\) has x_hi < x_lo"),
    ("y_hi < y_lo", _set(3, (0, 0, 3), 1), ValueError, r"boxes\[0, 0\] = \(1, 2, 10, 1\) has y_hi < y_lo"),
    ("nan in map", _set(0, (1, 1, 0), float("nan")), ValueError, r"maps\[1\] holds NaN or inf inside its map_sizes\[1\]"),
    ("inf in map", _set(0, (0, 2, 3), float("-inf")), ValueError, r"maps\[0\] holds NaN or inf"),
    ("valid inf", _set(5, 0, float("inf")), ValueError, r"valid\[0\] = inf is not finite"),
]


@pytest.mark.parametrize("mutate,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(mutate, error, message):
    with pytest.raises(error, match=message):
        saliency_r1.reward(*mutate(_good()))


@pytest.mark.parametrize("mutate,error,message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_triton_bad_input_names_the_argument(triton_device, mutate, error, message):
    with pytest.raises(error, match=message):
        reward_triton(*to(mutate(_good()), triton_device))


def test_triton_without_check_returns_nan_for_the_bad_rollout_only(triton_device):
    maps, *rest = _good()
    maps[1, 0, 0] = float("nan")
    got = reward_triton(maps.to(triton_device), *to(rest, triton_device), check=False).cpu()
    assert got[1].isnan()
    torch.testing.assert_close(got[:1], reward_reference(maps.nan_to_num(0), *rest)[:1], **TRITON_TOL)


def test_triton_rejects_arguments_on_another_device(triton_device):
    batch = list(to(_good(), triton_device))
    batch[4] = batch[4].to("meta")
    with pytest.raises(ValueError, match=r"box_counts must be on the device of maps"):
        reward_triton(*batch)


def test_nan_in_the_padding_is_ignored():
    batch = _good()  # NaN fills the padding of every map
    assert batch[0].isnan().any()
    torch.testing.assert_close(saliency_r1.reward(*batch), reward_reference(*batch), **CPU_TOL)


# ---------------------------------------------------------------- registration, compile, the C++ path

def test_opcheck():
    for batch in (_good(), make_batch(mixed_rollouts(5, seed=11, max_side=300), dtype=torch.float64,
                                      index_dtype=torch.int32)):
        torch.library.opcheck(torch.ops.saliency.reward.default, tuple(t.nan_to_num(0) for t in batch))


def test_torch_compile_matches_eager():
    def scaled_reward(maps, map_sizes, image_sizes, boxes, box_counts, valid):
        return 2.0 * saliency_r1.reward(maps.abs(), map_sizes, image_sizes, boxes, box_counts, valid) - 1.0

    batch = tuple(t.nan_to_num(0) for t in make_batch(mixed_rollouts(8, seed=12, max_side=300)))
    compiled = torch.compile(scaled_reward, fullgraph=True)
    torch.testing.assert_close(compiled(*batch), scaled_reward(*batch), **CPU_TOL)


def test_cpu_calls_run_the_compiled_kernel_without_python():
    batch = _good()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("saliency::reward", "CPU")
    # Record every Python function entered while the op runs: a Python kernel (ours, or one registered
    # through torch.library) would show up; the compiled kernel runs below the dispatcher, in C++.
    package_dirs = (Path(saliency_r1.__file__).parent.resolve(), Path(next(iter(saliency_r1.kernels.__path__))).resolve())
    entered = []
    sys.setprofile(lambda frame, event, arg: entered.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        torch.ops.saliency.reward(*batch)
    finally:
        sys.setprofile(None)
    ours = [f for f in entered if any(Path(f).resolve().is_relative_to(d) for d in package_dirs)]
    assert not ours, ours
    assert not [f for f in entered if "torch/library.py" in f or "torch/_library" in f]
    # And the kernel's own error text uses c10's dtype names ("Int"), which no Python check writes.
    with pytest.raises(TypeError, match=r"got Int tensor of shape \[2, 4, 5\]"):
        torch.ops.saliency.reward(batch[0].nan_to_num(0).int(), *batch[1:])


# ---------------------------------------------------------------- hardening: devices, extreme values, check=False

@pytest.mark.parametrize("index", range(6))
def test_an_argument_on_another_device_is_named(index):
    """One argument on the meta device, the rest on the CPU: an error naming it, not uninitialised memory."""
    batch = [t.nan_to_num(0) for t in _good()]
    batch[index] = batch[index].to("meta")
    names = ("maps", "map_sizes", "image_sizes", "boxes", "box_counts", "valid")
    message = (r"must be on the device of maps \(meta\)" if index == 0 else
               rf"{names[index]} must be on the device of maps \(cpu\).*on meta")
    with pytest.raises(ValueError, match=message):
        saliency_r1.reward(*batch)


def _scaled_grid(scale: float, dtype=torch.float64):
    """The map [[0, 1], [0, 1]] times ``scale`` on a 4 x 4 image, scored on the right half: 0.875."""
    maps = (torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64) * scale).to(dtype)
    return (maps, torch.tensor([[2, 2]]), torch.tensor([[4, 4]]), torch.tensor([[[2, 0, 3, 3]]]), torch.tensor([1]),
            torch.ones(1))


@pytest.mark.parametrize("scale", [1e308, 1e-310, 1.0])
def test_maps_at_the_ends_of_float64_are_scored_right(scale, triton_device):
    assert saliency_r1.reward(*_scaled_grid(scale)).tolist() == pytest.approx([0.875], abs=1e-6)
    assert reward_triton(*to(_scaled_grid(scale), triton_device)).tolist() == pytest.approx([0.875], abs=1e-6)


@pytest.mark.parametrize("scale", [3e38, 1e-40])
def test_float32_maps_near_overflow_are_scored_right(scale, triton_device):
    batch = _scaled_grid(scale, torch.float32)
    assert saliency_r1.reward(*batch).tolist() == pytest.approx([0.875], abs=1e-6)
    assert reward_triton(*to(batch, triton_device)).tolist() == pytest.approx([0.875], abs=1e-6)


@pytest.mark.parametrize("side", [2 ** 24 + 1, 2 ** 31, 2 ** 63 - 1])
def test_image_sides_the_kernels_cannot_count_are_refused(side, triton_device):
    maps, map_sizes, _, boxes, counts, valid = _scaled_grid(1.0)
    sizes = torch.tensor([[side, 4]])
    with pytest.raises(ValueError, match=r"image_sizes\[0\] = .* must be positive and at most 16777216"):
        saliency_r1.reward(maps, map_sizes, sizes, boxes, counts, valid)
    with pytest.raises(ValueError, match=r"image_sizes\[0\] = .* must be positive and at most 16777216"):
        reward_triton(*to((maps, map_sizes, sizes, boxes, counts, valid), triton_device))


def test_the_largest_image_side_is_scored_exactly():
    # A uniform map on a 2**24 x 3 image, its top half boxed: exactly half the mass.
    half = 2 ** 23
    batch = (torch.ones(1, 1, 1), torch.tensor([[1, 1]]), torch.tensor([[2 ** 24, 3]]),
             torch.tensor([[[0, 0, 2, half - 1]]]), torch.tensor([1]), torch.ones(1))
    assert saliency_r1.reward(*batch).tolist() == [0.5]


@pytest.mark.parametrize("case", ["map size zero", "box count too large", "y_hi < y_lo", "nan in map", "valid inf"])
def test_without_check_a_bad_rollout_is_nan_and_the_rest_are_scored(case, triton_device):
    mutate = next(c[1] for c in BAD_INPUTS if c[0] == case)
    batch = mutate(_good())
    bad = next(b for b in range(2) if saliency_r1.reward(*[t[b:b + 1] for t in batch], check=False).isnan().all())
    got = saliency_r1.reward(*batch, check=False)
    assert got[bad].isnan() and not got[1 - bad].isnan()
    good = [t[1 - bad:2 - bad] for t in batch]
    torch.testing.assert_close(got[1 - bad:2 - bad], reward_reference(*good), **CPU_TOL)
    triton = reward_triton(*to(batch, triton_device), check=False).cpu()
    assert triton[bad].isnan()
    torch.testing.assert_close(triton[1 - bad:2 - bad], reward_reference(*good), **TRITON_TOL)


@pytest.mark.parametrize("mutate,error,message", [c[1:] for c in BAD_INPUTS[:9]], ids=[c[0] for c in BAD_INPUTS[:9]])
def test_the_fake_rejects_what_the_kernel_rejects(mutate, error, message):
    """Types, ranks, shapes and devices (no values: a fake has none), so torch.compile refuses what eager does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    bad = mutate(_good())
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in bad]
        with pytest.raises(error, match=message):
            torch.ops.saliency.reward(*fake)


def test_torch_compile_rejects_what_eager_rejects():
    batch = [t.nan_to_num(0) for t in _good()]
    batch[3] = batch[3][..., :3]
    compiled = torch.compile(lambda *args: saliency_r1.reward(*args), fullgraph=True)
    with pytest.raises(Exception, match=r"boxes must have shape \[B, K_max, 4\]"):
        compiled(*batch)


def test_opcheck_of_the_triton_kernel():
    """The Triton kernel (interpreted, or on CUDA) under torch.library's checks, registered as a test op
    with the package's fake, as ops.py registers it for CUDA."""
    from saliency_r1.ops import _reward_fake

    @torch.library.custom_op("saliency_test::reward_triton", mutates_args=())
    def triton_reward(maps: torch.Tensor, map_sizes: torch.Tensor, image_sizes: torch.Tensor, boxes: torch.Tensor,
                      box_counts: torch.Tensor, valid: torch.Tensor, check: bool = True) -> torch.Tensor:
        return reward_triton(maps, map_sizes, image_sizes, boxes, box_counts, valid, check=check)

    triton_reward.register_fake(_reward_fake)
    for batch in (_good(), make_batch(mixed_rollouts(5, seed=11, max_side=300), dtype=torch.float64,
                                      index_dtype=torch.int32)):
        torch.library.opcheck(triton_reward, tuple(t.nan_to_num(0).to(TRITON_DEVICE) for t in batch))
