"""Completion log-probs with the vocabulary projection in checkpointed chunks: the same values and
gradients as the full logits, without keeping ``rows x vocabulary`` floats for backward."""

import pytest
import torch

from saliency_r1.logps import completion_logps, token_logps


def _full_logps(hidden, head, ids, temperature):
    logits = head(hidden).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 512])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logps_match_the_full_logits(chunk_rows, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    ids = torch.randint(50, (2, 7))
    weights = torch.randn(2, 7)

    expected = _full_logps(hidden, head, ids, 0.7)
    (expected * weights).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad, head.weight.grad = None, None

    got = token_logps(hidden, head, ids, 0.7, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, expected)
    (got * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, grads[0])
    torch.testing.assert_close(head.weight.grad, grads[1])


def test_token_logps_keep_no_logits_for_backward():
    head = torch.nn.Linear(32, 4096, bias=False)
    hidden = torch.randn(4, 64, 32, requires_grad=True)
    ids = torch.randint(4096, (4, 64))
    storages = {}  # what backward keeps alive: distinct storages (every chunk shares the weight's)

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logps(hidden, head, ids, 1.0, chunk_rows=64)
    full_logits_bytes = 4 * 64 * 4096 * 4
    assert storages and sum(storages.values()) < full_logits_bytes / 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _full_logps(hidden, head, ids, 1.0)
    assert sum(storages.values()) > full_logits_bytes  # the check above can fail


def test_token_logps_of_no_rows():
    head = torch.nn.Linear(8, 10)
    assert token_logps(torch.zeros(2, 0, 8), head, torch.zeros(2, 0, dtype=torch.long), 1.0).shape == (2, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_completion_logps_match_the_model_logits_and_restore_the_head(tie):
    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.synthetic import SyntheticGroundedVQA
    from saliency_r1.logps import pad_completions
    from saliency_r1.prompts import prompt_inputs
    from saliency_r1.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=1, tie_word_embeddings=tie)
    head = model.get_output_embeddings()
    examples = [SyntheticGroundedVQA(2, seed=4)[i] for i in range(2)]
    prompt = dict(prompt_inputs(processor, get_adapter(model), examples, "Answer."))
    completion_ids, mask = pad_completions([torch.tensor([11, 12, 13, 2]), torch.tensor([14, 15])], 0, "cpu")

    got = completion_logps(model, prompt, completion_ids, mask, temperature=0.9)
    assert model.get_output_embeddings() is head
    batch = {**prompt, "input_ids": torch.cat([prompt["input_ids"], completion_ids], 1),
             "attention_mask": torch.cat([prompt["attention_mask"], mask.long()], 1)}
    if "mm_token_type_ids" in prompt:
        batch["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    logits = model(**batch, logits_to_keep=completion_ids.shape[1] + 1).logits[:, :-1].float() / 0.9
    expected = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_completion_logps_restore_the_head_after_an_error():
    from saliency_r1.tiny import build_tiny_model, build_tiny_processor

    model = build_tiny_model(build_tiny_processor(), seed=1)
    head = model.get_output_embeddings()
    with pytest.raises(Exception):
        completion_logps(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long),
                                 "attention_mask": torch.ones(1, 3, dtype=torch.long)},
                         torch.full((1, 2), 10_000_000), torch.ones(1, 2), 1.0)
    assert model.get_output_embeddings() is head
