"""saliency::layer_saliency: the C++ CPU kernel and the Triton kernel against the plain-torch reference.

Tolerance (flash-attention's rule): a kernel's max error against the float64 reference, on the same
inputs, is at most twice the error of the reference computed in the inputs' own dtype, plus a floor of
32 fp32 ulps of the output's magnitude (4e-6 relative). The floor matters for fp32 only. There the
reference's error can be near 0 by luck: with d = 64 the scale 1/8 is a power of two, so
``scale * q.k - lse`` is nearly exact once MKL has summed q.k pairwise. A kernel summing q.k in
another order (tensor-core tiles on a GPU; numpy's sequential loop in Triton's interpreter) rounds
that score, of magnitude ~50, by a few ulps, and exp turns this into a ~1e-6 relative error of the
probability. Any real defect (a wrong mask, head or term) shows as 1e-3 or more; at bf16/fp16 the
reference's own error is orders larger than the floor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import saliency_r1
import saliency_r1.ops  # noqa: F401  (loads the library: registers torch.ops.saliency.*)
from saliency_r1.kernels.reference.layer_saliency import layer_saliency_reference
from conftest import TRITON_DEVICE

PATHS = ("cot", "direct", "both")
FLOOR_ULPS = 32 * torch.finfo(torch.float32).eps
ARG_NAMES = ("q_think", "lse_think", "q_answer", "lse_answer", "k_think", "k_image", "v_image", "u_answer", "lengths")


def make_inputs(groups: int, kv_heads: int, head_size: int, think: int, answers: int, image: int,
                lengths: list[tuple[int, int, int]], dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """Padded inputs of one layer with a consistent log-sum-exp, as attention during generation leaves them.

    Each row's lse covers its rollout's valid image and think keys plus 16 other keys (the rest of the
    prompt and completion), so every alpha lies in (0, 1) and each row's alphas sum below 1. The lse is
    computed in float64 from the inputs after their cast to ``dtype``, then stored as float32.
    Padding entries hold large garbage, which the kernels must ignore.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, heads = len(lengths), groups * kv_heads

    def randn(*shape, spread=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * spread).to(dtype)

    # Queries twice as wide as the keys: attention peaks on a few keys, as it does in trained models.
    q_think, q_answer = randn(batch, heads, think, head_size, spread=2.0), randn(batch, heads, answers, head_size, spread=2.0)
    k_think, k_image = randn(batch, kv_heads, think, head_size), randn(batch, kv_heads, image, head_size)
    v_image, u_answer = randn(batch, kv_heads, image, head_size), randn(batch, heads, answers, head_size)
    k_other = randn(batch, kv_heads, 16, head_size).double()
    scale = head_size ** -0.5
    lse_think = torch.full((batch, heads, think), 1e4, dtype=torch.float32)
    lse_answer = torch.full((batch, heads, answers), 1e4, dtype=torch.float32)
    for b, (n, t, a) in enumerate(lengths):
        keys = torch.cat([k_image[b, :, :n].double(), k_think[b, :, :t].double(), k_other[b]], dim=1)
        keys = keys.repeat_interleave(groups, dim=0)  # [H, n + t + 16, d]
        for q, lse, rows in ((q_think, lse_think, t), (q_answer, lse_answer, a)):
            scores = scale * q[b, :, :rows].double() @ keys.transpose(1, 2)
            lse[b, :, :rows] = torch.logsumexp(scores, dim=-1).float()
        # Garbage in the padding: a kernel that reads it gives inf or huge values.
        for tensor, valid in ((q_think, t), (k_think, t), (q_answer, a), (u_answer, a), (k_image, n), (v_image, n)):
            tensor[b, :, valid:] = 1e3
    args = (q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
            torch.tensor(lengths, dtype=torch.int64))
    return tuple(x.to(device) for x in args), scale


def to_float64(args):
    return tuple(x.double() if x.is_floating_point() else x for x in args)


def mixed_lengths(think: int, answers: int, image: int) -> list[tuple[int, int, int]]:
    """A full rollout, a shorter one, and one with fewer image tokens and no (or one) think token."""
    return [(image, think, answers), (max(1, 2 * image // 3), think // 2, max(1, answers - 2)),
            (image // 3, min(think, 1), answers)]


def assert_within_rule(kernel_out, args, scale, path):
    exact = layer_saliency_reference(*to_float64(args), scale, path)
    same_dtype = layer_saliency_reference(*args, scale, path).double()
    kernel_err = (kernel_out.double().cpu() - exact.cpu()).abs().max().item()
    reference_err = (same_dtype.cpu() - exact.cpu()).abs().max().item()
    floor = FLOOR_ULPS * (exact.abs().max().item() + 1.0)
    assert kernel_err <= 2 * reference_err + floor, (
        f"{path}: kernel error {kernel_err:.3g} > 2 x reference error {reference_err:.3g} + {floor:.3g}")
    lengths = args[-1].cpu().tolist()
    for b, (n, _, a) in enumerate(lengths):  # padding is exactly 0
        assert not kernel_out[b, a:].any() and not kernel_out[b, :, n:].any()
    assert torch.isfinite(kernel_out).all()


# ---------------------------------------------------------------- C++ kernel: the full grid

@pytest.mark.parametrize("groups", [1, 2, 7])
@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize("think", [0, 1, 17, 300])
@pytest.mark.parametrize("answers", [1, 5])
@pytest.mark.parametrize("image", [1, 64, 1000])
def test_cpu_kernel_matches_reference_fp32(groups, head_size, think, answers, image):
    args, scale = make_inputs(groups, 2, head_size, think, answers, image,
                              mixed_lengths(think, answers, image), torch.float32)
    for path in PATHS:
        assert_within_rule(saliency_r1.layer_saliency(*args, scale, path), args, scale, path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("groups,head_size,think,answers,image", [
    (1, 64, 17, 5, 64), (2, 80, 300, 1, 1000), (7, 128, 1, 5, 1), (2, 128, 0, 5, 64)])
def test_cpu_kernel_matches_reference_other_dtypes(dtype, groups, head_size, think, answers, image):
    args, scale = make_inputs(groups, 2, head_size, think, answers, image,
                              mixed_lengths(think, answers, image), dtype)
    for path in PATHS:
        out = saliency_r1.layer_saliency(*args, scale, path)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_within_rule(out, args, scale, path)


def test_cpu_kernel_takes_float64_lse_with_float64_inputs():
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, mixed_lengths(17, 5, 64), torch.float64)
    for path in PATHS:
        torch.testing.assert_close(saliency_r1.layer_saliency(*to_float64(args), scale, path),
                                   saliency_r1.layer_saliency(*args, scale, path), rtol=0, atol=0)


def test_cpu_kernel_chunks_image_tokens():
    # 14 heads x 300 think rows leave ~1000 image tokens per chunk (kChunkElements = 2^22): 2500 takes three.
    lengths = [(2500, 300, 5), (1700, 120, 3)]
    args, scale = make_inputs(7, 2, 64, 300, 5, 2500, lengths, torch.float32)
    assert_within_rule(saliency_r1.layer_saliency(*args, scale, "both"), args, scale, "both")


# ---------------------------------------------------------------- Triton kernel (interpreter on CPU)

TRITON_CASES = [
    # groups, head size, T, A, N, dtype: every head size, group, path and dtype; T across zero, one and
    # several 32-row tiles; N across one and several 64-column tiles; A up to two 64-row answer tiles.
    (1, 64, 17, 5, 64, torch.float32),
    (2, 80, 40, 1, 100, torch.float32),
    (7, 128, 1, 5, 1, torch.float32),
    (2, 128, 0, 5, 64, torch.float32),
    (1, 80, 70, 5, 130, torch.bfloat16),
    (2, 64, 17, 20, 64, torch.float16),
    (1, 64, 3, 70, 8, torch.float32),
]


@pytest.mark.parametrize("groups,head_size,think,answers,image,dtype", TRITON_CASES)
def test_triton_kernel_matches_reference(triton_device, groups, head_size, think, answers, image, dtype):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(groups, 1, head_size, think, answers, image,
                              mixed_lengths(think, answers, image), dtype, device=triton_device)
    for path in PATHS:
        out = layer_saliency_triton(*args, scale, path)
        assert out.dtype == torch.float32 and out.shape == (3, answers, image)
        assert_within_rule(out, args, scale, path)


@pytest.mark.parametrize("groups", [1, 2, 7])
@pytest.mark.parametrize("head_size", [64, 80, 128])
def test_triton_kernel_maps_query_heads_to_their_key_value_head(triton_device, groups, head_size):
    """Several key/value heads, each shared by ``groups`` query heads: query head h must read kv head h // g
    (a kernel that read head 0 for all, or h % H_kv, fails here)."""
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(groups, 3, head_size, 5, 3, 70, mixed_lengths(5, 3, 70), torch.float32,
                              device=triton_device, seed=groups * head_size)
    for path in PATHS:
        assert_within_rule(layer_saliency_triton(*args, scale, path), args, scale, path)


@settings(max_examples=12, deadline=None)
@given(groups=st.integers(1, 4), kv_heads=st.integers(1, 3), head_size=st.sampled_from([16, 24, 64, 80]),
       think=st.integers(0, 40), answers=st.integers(1, 20), image=st.integers(1, 90), rollouts=st.integers(1, 3),
       path=st.sampled_from(PATHS), seed=st.integers(0, 2 ** 16))
def test_property_triton_kernel_matches_reference(groups, kv_heads, head_size, think, answers, image, rollouts,
                                                  path, seed):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    rng = torch.Generator().manual_seed(seed)
    lengths = [(int(torch.randint(0, image + 1, (), generator=rng)), int(torch.randint(0, think + 1, (), generator=rng)),
                int(torch.randint(0, answers + 1, (), generator=rng))) for _ in range(rollouts - 1)]
    lengths.append((image, think, answers))
    args, scale = make_inputs(groups, kv_heads, head_size, think, answers, image, lengths, torch.float32,
                              device=TRITON_DEVICE, seed=seed)
    assert_within_rule(layer_saliency_triton(*args, scale, path), args, scale, path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op dispatches to Triton on CUDA tensors only")
def test_op_on_cuda_matches_cpu_kernel():
    args, scale = make_inputs(2, 2, 128, 300, 5, 1000, mixed_lengths(300, 5, 1000), torch.bfloat16)
    cuda_args = tuple(x.cuda() for x in args)
    for path in PATHS:
        assert_within_rule(saliency_r1.layer_saliency(*cuda_args, scale, path), args, scale, path)


# ---------------------------------------------------------------- semantics

def test_no_think_tokens_gives_zero_cot_and_direct_equals_both():
    args, scale = make_inputs(2, 2, 64, 0, 5, 64, [(64, 0, 5), (10, 0, 2)], torch.float32)
    cot = saliency_r1.layer_saliency(*args, scale, "cot")
    assert torch.equal(cot, torch.zeros_like(cot))
    torch.testing.assert_close(saliency_r1.layer_saliency(*args, scale, "both"),
                               saliency_r1.layer_saliency(*args, scale, "direct"))


def test_triton_no_think_tokens_gives_zero_cot(triton_device):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(2, 1, 64, 4, 5, 64, [(64, 0, 5), (10, 0, 2)], torch.float32, device=triton_device)
    cot = layer_saliency_triton(*args, scale, "cot")
    assert torch.equal(cot, torch.zeros_like(cot))


def test_paths_add_up():
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, mixed_lengths(17, 5, 64), torch.float64)
    cot, direct, both = (saliency_r1.layer_saliency(*args, scale, path) for path in PATHS)
    torch.testing.assert_close(cot + direct, both)


def test_saliency_is_the_logit_change_of_the_answer_through_the_chain():
    # docs/method.md section 3 from first principles, one rollout, one head: the think rows' attention outputs
    # restricted to image values, read by the answer row, projected on u, equal S summed over i.
    args, scale = make_inputs(1, 1, 64, 9, 1, 12, [(12, 9, 1)], torch.float64)
    q_t, lse_t, q_a, lse_a, k_t, k_i, v_i, u_a, _ = args
    alpha_ti = torch.exp(scale * q_t[0, 0] @ k_i[0, 0].T - lse_t[0, 0, :, None])  # [T, N]
    think_from_image = alpha_ti @ v_i[0, 0]  # [T, d]: what each think row read from the image
    alpha_at = torch.exp(scale * q_a[0, 0] @ k_t[0, 0].T - lse_a[0, 0, :, None])  # [1, T]
    expected = (alpha_at @ think_from_image) @ u_a[0, 0, 0]
    assert torch.allclose(saliency_r1.layer_saliency(*args, scale, "cot").sum(), expected)


# ---------------------------------------------------------------- bad input

def _bad_inputs():
    """(id, mutate(args) -> args, path, exception, message fragment naming the argument)."""

    def replace(index, fn):
        return lambda args: tuple(fn(x) if i == index else x for i, x in enumerate(args))

    def set_length(b, j, value):
        def mutate(args):
            lengths = args[8].clone()
            lengths[b, j] = value
            return args[:8] + (lengths,)
        return mutate

    return [
        ("kv heads differ", replace(6, lambda v: v[:, :1]), "cot", ValueError, "v_image has H_kv=1"),
        ("query heads differ", replace(7, lambda u: u[:, :3]), "cot", ValueError, "u_answer has H=3"),
        ("H not a multiple of H_kv", lambda a: tuple(x[:, :3] if i in (0, 1, 2, 3, 7) else x for i, x in enumerate(a)),
         "cot", ValueError, "H=3 must be a positive multiple of k_image's H_kv=2"),
        ("head size differs", replace(5, lambda k: k[..., :32]), "cot", ValueError, "k_image has d=32"),
        ("think lengths differ", replace(4, lambda k: k[:, :, :5]), "cot", ValueError, "k_think has T=5"),
        ("image lengths differ", replace(6, lambda v: v[:, :, :5]), "cot", ValueError, "v_image has N=5"),
        ("batch differs", replace(3, lambda lse: lse[:1]), "cot", ValueError, "lse_answer has B=1"),
        ("lengths batch differs", replace(8, lambda n: n[:1]), "cot", ValueError, "lengths has B=1"),
        ("image length too long", set_length(1, 0, 65), "cot", ValueError, "lengths[1, 0] = 65 is out of range"),
        ("think length negative", set_length(0, 1, -1), "cot", ValueError, "lengths[0, 1] = -1 is out of range"),
        ("answer length too long", set_length(1, 2, 6), "cot", ValueError, "lengths[1, 2] = 6 is out of range"),
        ("lengths not [B, 3]", replace(8, lambda n: n[:, :2]), "cot", ValueError, "lengths must be [B, 3]"),
        ("q_think 3-D", replace(0, lambda q: q[0]), "cot", ValueError, "q_think must be [B, H, T, d]"),
        ("mixed dtypes", replace(5, lambda k: k.double()), "cot", TypeError, "k_image must have q_answer's dtype"),
        ("lse not float32", replace(1, lambda lse: lse.half()), "cot", TypeError, "lse_think must be float32"),
        ("integer queries", lambda a: tuple(x.long() if i in (0, 2, 4, 5, 6, 7) else x for i, x in enumerate(a)),
         "cot", TypeError, "q_answer must be float32"),
        ("lengths not int64", replace(8, lambda n: n.int()), "cot", TypeError, "lengths must be int64"),
        ("unknown path", lambda a: a, "paper", ValueError, "path must be one of 'cot', 'direct', 'both'"),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("mutate,path,error,message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_the_argument(mutate, path, error, message):
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        saliency_r1.layer_saliency(*mutate(args), scale, path)


# Lengths out of range: the CUDA kernel gives that rollout NaN instead of raising (the check would
# cost a host synchronisation per call).
LENGTH_VALUES = {"image length too long": 1, "think length negative": 0, "answer length too long": 1}


@pytest.mark.parametrize("mutate,path,error,message", [case[1:] for case in BAD_INPUTS if case[0] not in LENGTH_VALUES],
                         ids=[case[0] for case in BAD_INPUTS if case[0] not in LENGTH_VALUES])
def test_triton_bad_input_names_the_argument(triton_device, mutate, path, error, message):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32, device=triton_device)
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        layer_saliency_triton(*mutate(args), scale, path)


@pytest.mark.parametrize("case", list(LENGTH_VALUES))
def test_triton_lengths_out_of_range_give_that_rollout_nan(triton_device, case):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    mutate = next(c[1] for c in BAD_INPUTS if c[0] == case)
    bad = LENGTH_VALUES[case]
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32, device=triton_device)
    got = layer_saliency_triton(*mutate(args), scale, "cot").cpu()
    assert got[bad].isnan().all()
    good = 1 - bad
    want = layer_saliency_reference(*(x.cpu() for x in args), scale, "cot")
    torch.testing.assert_close(got[good], want[good], rtol=1e-4, atol=1e-5)


def test_triton_rejects_float64_naming_the_cpu_kernel(triton_device):
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(1, 1, 64, 3, 1, 8, [(8, 3, 1)], torch.float64, device=triton_device)
    with pytest.raises(TypeError, match="float64 runs on the CPU kernel"):
        layer_saliency_triton(*args, scale, "cot")


# ---------------------------------------------------------------- torch.library integration

@pytest.mark.parametrize("path", PATHS)
def test_opcheck(path):
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, mixed_lengths(17, 5, 64), torch.float32)
    torch.library.opcheck(torch.ops.saliency.layer_saliency.default, (*args, scale, path))
    if torch.cuda.is_available():
        cuda_args = tuple(x.cuda() for x in args)
        torch.library.opcheck(torch.ops.saliency.layer_saliency.default, (*cuda_args, scale, path))


def test_torch_compile_matches_eager():
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, mixed_lengths(17, 5, 64), torch.float32)

    def summed_over_layers(*layer_args):
        # Two layers, as the caller sums them: the op stays one node of the graph.
        return (saliency_r1.layer_saliency(*layer_args, scale, "cot")
                + saliency_r1.layer_saliency(*layer_args, scale, "direct")).relu()

    compiled = torch.compile(summed_over_layers, fullgraph=True)
    torch.testing.assert_close(compiled(*args), summed_over_layers(*args))



# ---------------------------------------------------------------- hardening

@pytest.mark.parametrize("index", range(9))
def test_an_argument_on_another_device_is_named(index):
    """One argument on the meta device, the rest on the CPU: an error naming it, not uninitialised memory."""
    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32)
    args = tuple(x.to("meta") if i == index else x for i, x in enumerate(args))
    message = ("is on cpu but q_answer is on meta" if ARG_NAMES[index] == "q_answer"
               else f"{ARG_NAMES[index]} is on meta but q_answer is on cpu")
    with pytest.raises(ValueError, match=message):
        saliency_r1.layer_saliency(*args, scale, "cot")


def test_zero_query_heads_is_an_error_not_a_crash():
    args, scale = make_inputs(1, 2, 64, 17, 5, 64, [(64, 17, 5)], torch.float32)
    no_heads = tuple(x[:, :0] if i in (0, 1, 2, 3, 7) else x for i, x in enumerate(args))
    with pytest.raises(ValueError, match="H=0 must be a positive multiple of k_image's H_kv=2"):
        saliency_r1.layer_saliency(*no_heads, scale, "cot")
    with pytest.raises(ValueError, match="H=0 must be a positive multiple"):
        from saliency_r1.kernels.layer_saliency import layer_saliency_triton

        layer_saliency_triton(*(x.to(TRITON_DEVICE) for x in no_heads), scale, "cot")


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5, 6, 7])
def test_a_non_finite_input_poisons_only_its_rollout(index, triton_device):
    """NaN in one rollout's inputs: that rollout's output is not finite (never a finite wrong number), the
    other rollout's is unchanged, in both kernels."""
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton

    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32)
    poisoned = list(args)
    poisoned[index] = poisoned[index].clone()
    poisoned[index][0, 0, 0] = float("nan")
    want = layer_saliency_reference(*args, scale, "both")
    for out in (saliency_r1.layer_saliency(*poisoned, scale, "both"),
                layer_saliency_triton(*(x.to(triton_device) for x in poisoned), scale, "both").cpu()):
        assert not torch.isfinite(out[0]).all()
        torch.testing.assert_close(out[1], want[1], rtol=1e-4, atol=1e-5)


METADATA_CASES = [case for case in BAD_INPUTS if "length" not in case[0] or "batch" in case[0] or "[B, 3]" in case[4]]


@pytest.mark.parametrize("mutate,path,error,message", [case[1:] for case in METADATA_CASES],
                         ids=[case[0] for case in METADATA_CASES])
def test_the_fake_rejects_what_the_kernel_rejects(mutate, path, error, message):
    """Types, ranks, shapes, head counts and devices (no values: a fake has none), so that torch.compile
    refuses what eager refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, scale = make_inputs(2, 2, 64, 17, 5, 64, [(64, 17, 5), (30, 3, 2)], torch.float32)
    bad = mutate(args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in bad]
        with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
            torch.ops.saliency.layer_saliency(*fake, scale, path)


def test_opcheck_of_the_triton_kernel():
    """The Triton kernel (interpreted, or on CUDA) under torch.library's checks, registered as a test op
    with the package's fake, as ops.py registers it for CUDA."""
    from saliency_r1.kernels.layer_saliency import layer_saliency_triton
    from saliency_r1.ops import _layer_saliency_fake

    @torch.library.custom_op("saliency_test::layer_saliency_triton", mutates_args=())
    def triton_op(q_think: torch.Tensor, lse_think: torch.Tensor, q_answer: torch.Tensor, lse_answer: torch.Tensor,
                  k_think: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor, u_answer: torch.Tensor,
                  lengths: torch.Tensor, scale: float, path: str = "cot") -> torch.Tensor:
        return layer_saliency_triton(q_think, lse_think, q_answer, lse_answer, k_think, k_image, v_image, u_answer,
                                     lengths, scale, path)

    triton_op.register_fake(_layer_saliency_fake)
    args, scale = make_inputs(2, 2, 64, 9, 3, 40, mixed_lengths(9, 3, 40), torch.float32, device=TRITON_DEVICE)
    for path in PATHS:
        torch.library.opcheck(triton_op, (*args, scale, path))
