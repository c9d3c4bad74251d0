"""The policy's completion log-probs (forward and backward of the vocabulary head) against the
straightforward way, measured in the same test.

- The straightforward way (the public code's TRL 0.21, and ours before): fp32 logits of every
  completion position over the whole vocabulary, ``log_softmax``, gather; autograd keeps the
  ``rows x vocabulary`` logits and their softmax for backward.
- Ours: ``saliency_r1.grpo.loop.token_logps``: the same projection in checkpointed chunks of rows,
  so backward keeps the hidden states and recomputes one chunk's logits at a time.

Shapes: Qwen2.5-VL-3B's head (vocabulary 151,936, hidden 2,048) on CUDA, with a micro-batch of
8 rollouts x 512 completion tokens in bf16; on the 2-core CPU the same vocabulary with hidden 256
and 2 x 256 tokens (fp32), to keep the suite in minutes.
"""

from __future__ import annotations

import pytest
import torch

from common import DEVICES, measure_peak_memory, report, time_median
from saliency_r1.logps import token_logps

VOCAB = 151_936


def full_logits_logps(hidden, head, ids, temperature):
    logits = head(hidden).float() / temperature
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_completion_logps_vs_full_logits(benchmark, device):
    cuda = device == "cuda"
    rollouts, tokens, hidden_size, dtype, chunk = (8, 512, 2048, torch.bfloat16, 512) if cuda else \
        (2, 256, 256, torch.float32, 128)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, VOCAB, bias=False).to(device, dtype)
    hidden = (torch.randn(rollouts, tokens, hidden_size, generator=generator) / hidden_size ** 0.5).to(device, dtype)
    hidden.requires_grad_(True)
    ids = torch.randint(VOCAB, (rollouts, tokens), generator=generator).to(device)
    advantages = torch.randn(rollouts, 1, generator=generator).to(device)

    def step(logps_fn):
        def run():
            hidden.grad, head.weight.grad = None, None
            logps = logps_fn()
            (logps * advantages).mean().backward()
            if cuda:
                torch.cuda.synchronize()
            return logps.detach(), hidden.grad.detach().clone()
        return run

    ours = step(lambda: token_logps(hidden, head, ids, 1.0, chunk_rows=chunk))
    baseline = step(lambda: full_logits_logps(hidden, head, ids, 1.0))
    ours_result = benchmark.pedantic(ours, warmup_rounds=1, rounds=10 if cuda else 3)
    ours_s = benchmark.stats.stats.median
    baseline_s = time_median(baseline, rounds=10 if cuda else 3, warmup=1, cuda=cuda)
    baseline_result, baseline_peak = measure_peak_memory(baseline, cuda=cuda)
    _, ours_peak = measure_peak_memory(ours, cuda=cuda)

    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_result[0], baseline_result[0], **tolerance)
    torch.testing.assert_close(ours_result[1].float(), baseline_result[1].float(), **tolerance)
    assert ours_peak < baseline_peak / 2, f"chunked head peak {ours_peak} vs full logits {baseline_peak}"
    report(benchmark, f"completion log-probs fwd+bwd, {rollouts} x {tokens} tokens, vocabulary {VOCAB}, "
           f"hidden {hidden_size}, {str(dtype).removeprefix('torch.')}, chunks of {chunk} rows",
           ours_s=ours_s, baseline_s=baseline_s, ours_peak=ours_peak, baseline_peak=baseline_peak,
           goal="peak memory below half the full logits'")
