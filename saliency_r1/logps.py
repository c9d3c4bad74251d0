"""Log-probabilities of completion tokens under a model: one teacher-forced forward, with the
vocabulary projection done afterwards in checkpointed chunks, so that no ``rows x vocabulary``
block of logits is held for backward."""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

from saliency_r1.adapters import get_adapter

# Rows of ``[B * C]`` completion positions whose fp32 logits exist at once: 512 x Qwen's 151,936
# vocabulary is 311 MB, where one micro-batch of 8 x 512 tokens would hold 2.5 GB for backward.
LOGIT_CHUNK_ROWS = 512


class _FinalHidden(torch.nn.Module):
    """Stands in for the output head during a forward, so ``.logits`` carries the final-norm hidden
    states and the vocabulary projection can be done chunk by chunk."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def _hidden_instead_of_logits(owner):
    head = owner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"expected a linear output head, got {type(head).__name__}")
    owner.set_output_embeddings(_FinalHidden())
    try:
        yield head
    finally:
        owner.set_output_embeddings(head)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def token_logps(hidden: torch.Tensor, head: torch.nn.Linear, ids: torch.Tensor, temperature: float,
                chunk_rows: int = LOGIT_CHUNK_ROWS) -> torch.Tensor:
    """``log softmax(head(hidden) / temperature)[ids]`` for ``hidden [..., D]`` and ``ids [...]``.

    The fp32 logits of ``chunk_rows`` rows exist at a time: under autograd each chunk is
    checkpointed (its logits are recomputed in backward instead of kept), so the memory held for
    backward is the hidden states, not ``rows x vocabulary``.
    """
    flat_hidden, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    checkpointed = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    chunks = []
    for start in range(0, flat_ids.numel(), chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (flat_hidden[rows], head.weight, head.bias, flat_ids[rows], temperature)
        chunks.append(torch.utils.checkpoint.checkpoint(_chunk_logps, *args, use_reentrant=False)
                      if checkpointed else _chunk_logps(*args))
    return torch.cat(chunks).view(ids.shape) if chunks else flat_hidden.new_zeros(ids.shape, dtype=torch.float32)


def completion_logps(model, prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Log-probs ``[B, C]`` of the completion tokens under ``model`` (teacher-forced, one forward).

    Logits are divided by the sampling temperature, so a ratio compares the distributions that
    were sampled from (as TRL does). The vocabulary projection runs after the forward, in
    checkpointed chunks (:func:`token_logps`). ``model`` may be wrapped (DDP, peft).
    """
    adapter = get_adapter(getattr(model, "module", model))  # inside DDP and peft wrappers
    batch = adapter.teacher_forced_inputs(prompt, completion_ids, completion_mask)
    length = completion_ids.shape[1]
    with _hidden_instead_of_logits(adapter.model) as head:
        hidden = model(**batch, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
    return token_logps(hidden, head, completion_ids, temperature)


def pad_completions(completions: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads per-rollout completion ids: ``(ids [B, C], mask [B, C])`` (float32 mask, ``C >= 1``)."""
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(completions), length), dtype=torch.float32, device=device)
    for row, tokens in enumerate(completions):
        ids[row, :len(tokens)] = tokens.to(device)
        mask[row, :len(tokens)] = 1.0
    return ids, mask
