"""The projected answer vectors against the public code's way: the full vocabulary head on the contributions."""

from __future__ import annotations

import pytest
import torch

from saliency_r1.projection import answer_logit_directions, project_answer_vectors

BATCH, ANSWERS, HIDDEN, VOCAB, HEADS, HEAD_SIZE = 2, 3, 48, 500, 4, 12


def _model(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=gen, dtype=torch.float64)).to(dtype)
    unembedding = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    o_proj = (torch.randn(HIDDEN, HEADS * HEAD_SIZE, generator=gen, dtype=torch.float64) / 8).to(dtype)
    ids = torch.randint(0, VOCAB, (BATCH, ANSWERS), generator=gen)
    residual = torch.randn(BATCH, ANSWERS, HIDDEN, generator=gen, dtype=torch.float64) * 3
    rms = residual.pow(2).mean(-1).add(1e-6).sqrt()
    head_outputs = torch.randn(BATCH, ANSWERS, HEADS, HEAD_SIZE, generator=gen, dtype=torch.float64)
    return gamma, unembedding, o_proj, ids, rms, head_outputs


def _answer_logit_change_full_vocab(gamma, unembedding, o_proj, ids, rms, head_outputs):
    """The public code's way: each head's contribution through o_proj, the frozen final norm, then the
    whole vocabulary head ``[B, A, H, V]``, and only then the answer token's logit."""
    gamma, unembedding, o_proj = gamma.double(), unembedding.double(), o_proj.double()
    blocks = o_proj.view(HIDDEN, HEADS, HEAD_SIZE)
    contributions = torch.einsum("dhk,bahk->bahd", blocks, head_outputs)  # [B, A, H, D] added to the residual
    logits = (contributions * gamma / rms[..., None, None]) @ unembedding.T  # [B, A, H, V]
    return logits.gather(-1, ids[:, :, None, None].expand(-1, -1, HEADS, 1)).squeeze(-1)  # [B, A, H]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_projected_vectors_give_each_heads_logit_change(dtype):
    gamma, unembedding, o_proj, ids, rms, head_outputs = _model(dtype)
    g = answer_logit_directions(gamma, unembedding, ids, rms.to(dtype))
    u = project_answer_vectors(g, o_proj, HEADS)
    assert g.shape == (BATCH, ANSWERS, HIDDEN) and u.shape == (BATCH, HEADS, ANSWERS, HEAD_SIZE)
    assert u.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ours = torch.einsum("bhak,bahk->bah", u.double(), head_outputs)
    # The expected value uses the same (bf16-rounded) weights and rms in float64, so every dtype is held
    # to fp32 accuracy: bf16 weights are widened, never multiplied in bf16.
    expected = _answer_logit_change_full_vocab(gamma, unembedding, o_proj, ids, rms.to(dtype).double(), head_outputs)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_only_the_answer_rows_of_the_unembedding_are_read():
    gamma, unembedding, o_proj, ids, rms, _ = _model()
    poisoned = torch.full_like(unembedding, float("nan"))
    poisoned[ids.flatten()] = unembedding[ids.flatten()]
    torch.testing.assert_close(answer_logit_directions(gamma, poisoned, ids, rms),
                               answer_logit_directions(gamma, unembedding, ids, rms), rtol=0, atol=0)


@pytest.mark.parametrize("call,error,message", [
    (lambda m: answer_logit_directions(m[0][None], m[1], m[3], m[4]), ValueError, r"norm_weight must be \[D\]"),
    (lambda m: answer_logit_directions(m[0], m[1][:, :5], m[3], m[4]), ValueError, r"unembedding must be \[V, D\]"),
    (lambda m: answer_logit_directions(m[0], m[1], m[3].flatten(), m[4]), ValueError,
     r"answer_token_ids must be \[B, A\]"),
    (lambda m: answer_logit_directions(m[0], m[1], m[3].double(), m[4]), TypeError,
     "answer_token_ids must be an integer tensor"),
    (lambda m: answer_logit_directions(m[0], m[1], m[3] + VOCAB, m[4]), ValueError,
     rf"answer_token_ids must lie in \[0, {VOCAB}\)"),
    (lambda m: answer_logit_directions(m[0], m[1], m[3], m[4][:, :1]), ValueError, r"rms must be \[B, A\]"),
    (lambda m: project_answer_vectors(torch.ones(BATCH, HIDDEN), m[2], HEADS), ValueError, r"g must be \[B, A, D\]"),
    (lambda m: project_answer_vectors(torch.ones(BATCH, ANSWERS, HIDDEN), m[2][:10], HEADS), ValueError,
     r"o_proj_weight must be \[D, H \* d\]"),
    (lambda m: project_answer_vectors(torch.ones(BATCH, ANSWERS, HIDDEN), m[2], 5), ValueError,
     "num_heads=5 must be positive and divide"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call(_model())


def test_no_answer_tokens_give_empty_vectors():
    norm, unembedding, o_proj = torch.randn(8), torch.randn(50, 8), torch.randn(8, 4 * 2)
    g = answer_logit_directions(norm, unembedding, torch.zeros(3, 0, dtype=torch.long), torch.ones(3, 0))
    assert g.shape == (3, 0, 8)
    assert project_answer_vectors(g, o_proj, num_heads=4).shape == (3, 4, 0, 2)
