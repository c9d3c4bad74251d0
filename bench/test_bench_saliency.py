"""The fused chain-of-thought saliency (projection helper + saliency::layer_saliency per layer) against the
public code's way, for the same rollouts, measured in the same test.

Both start from what generation leaves behind, built outside the timed region:
- the public code's way (``output_attentions=True`` with eager attention): the attention rows of every
  step and layer, ``[B, H, 1, P + k + 1]`` for step ``k``, held until the reward; then, per rollout and
  layer, the two-hop product of the answer-to-think and think-to-image rows, every image token's
  contribution through ``o_proj`` (``[A, N, D]``, summed over layers), and the whole vocabulary head on
  every image token (``[A, N, V]``) before the answer tokens' rows are picked;
- ours: per layer, the think and answer queries with their log-sum-exp (a flash kernel returns the lse
  for free; here it is computed from the cache) and the key/value cache.
Timing covers the saliency computation from those (conservative for ours: the baseline's softmax rows
are not timed). Peak memory covers building them too, since holding them is the extra cost of each way.
Both compute the same frozen-norm attribution (docs/method.md section 3; think position t on both hops), and
the test checks that they agree before reporting.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from common import NO_CUDA, measure_peak_memory, report, time_median
from saliency_r1 import layer_saliency
from saliency_r1.projection import answer_logit_directions, project_answer_vectors


@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden: int
    vocab: int
    image: int  # image tokens N
    completion: int  # completion tokens C
    think: int  # think tokens of rollout 0; rollout b has think - 5 b (mixed lengths)
    answers: int  # answer tokens A
    rollouts: int  # B
    dtype: torch.dtype
    text_before: int = 20  # prompt tokens before and after the image
    text_after: int = 20


CPU = Config("cpu-small", layers=4, heads=8, kv_heads=2, head_size=64, hidden=512, vocab=32_000, image=300,
             completion=128, think=60, answers=5, rollouts=2, dtype=torch.float32)
# Qwen2.5-VL-3B's text model; think/answer split of a 512-token completion.
GPU = Config("qwen2.5-vl-3b", layers=36, heads=16, kv_heads=2, head_size=128, hidden=2048, vocab=151_936,
             image=1000, completion=512, think=440, answers=10, rollouts=8, dtype=torch.bfloat16)


class Rollouts:
    """Random generation state of one batch: per layer the completion queries and the K/V cache; the weights."""

    def __init__(self, cfg: Config, device: str):
        gen = torch.Generator(device=device).manual_seed(0)
        self.cfg, self.device = cfg, device
        self.prompt = cfg.text_before + cfg.image + cfg.text_after
        self.seq = self.prompt + cfg.completion
        self.scale = cfg.head_size ** -0.5

        def randn(*shape, spread=1.0):
            return (torch.randn(*shape, generator=gen, device=device) * spread).to(cfg.dtype)

        b, h, hkv, d = cfg.rollouts, cfg.heads, cfg.kv_heads, cfg.head_size
        self.q = [randn(b, h, cfg.completion, d, spread=2.0) for _ in range(cfg.layers)]  # completion queries
        self.k = [randn(b, hkv, self.seq, d) for _ in range(cfg.layers)]
        self.v = [randn(b, hkv, self.seq, d) for _ in range(cfg.layers)]
        self.o_proj = [randn(cfg.hidden, h * d, spread=h ** -0.5 * d ** -0.5) for _ in range(cfg.layers)]
        self.gamma = randn(cfg.hidden, spread=0.1) + 1
        self.unembedding = randn(cfg.vocab, cfg.hidden, spread=cfg.hidden ** -0.5)
        self.answer_ids = torch.randint(0, cfg.vocab, (b, cfg.answers), generator=gen, device=device)
        self.rms = torch.rand(b, cfg.answers, generator=gen, device=device) + 0.5
        # Completion layout: <think>, think tokens, </think>, <answer>, answer tokens, </answer>, filler.
        self.think_lengths = [cfg.think - 5 * r for r in range(b)]
        self.think_steps = [list(range(1, 1 + t)) for t in self.think_lengths]
        # The answer *positions* are the rows that predicted the answer tokens (docs/method.md section 2).
        self.answer_steps = [[t + 3 + j - 1 for j in range(cfg.answers)] for t in self.think_lengths]
        self.image_start = cfg.text_before

    def step_rows(self):
        """What ``generate(output_attentions=True)`` holds: per step, per layer, ``[B, H, 1, P + k + 1]``."""
        cfg, groups = self.cfg, self.cfg.heads // self.cfg.kv_heads
        steps: list[list[torch.Tensor]] = [[] for _ in range(cfg.completion)]
        for layer in range(cfg.layers):
            keys = self.k[layer].repeat_interleave(groups, dim=1)
            scores = self.scale * self.q[layer].float() @ keys.float().transpose(-1, -2)  # [B, H, C, S]
            query_pos = self.prompt + torch.arange(cfg.completion, device=self.device)
            causal = torch.arange(self.seq, device=self.device)[None, :] > query_pos[:, None]
            probs = scores.masked_fill_(causal, float("-inf")).softmax(-1).to(cfg.dtype)  # eager: fp32 softmax
            del scores
            for step in range(cfg.completion):
                steps[step].append(probs[:, :, step:step + 1, :self.prompt + step + 1].clone())
            del probs
        return steps

    def captures(self):
        """What our capture holds: per layer, think/answer queries and their lse (padded), cache views."""
        cfg, groups = self.cfg, self.cfg.heads // self.cfg.kv_heads
        t_max = max(self.think_lengths)
        think_idx = torch.tensor([s + [s[-1]] * (t_max - len(s)) for s in self.think_steps], device=self.device)
        answer_idx = torch.tensor(self.answer_steps, device=self.device)
        lengths = torch.tensor([[cfg.image, t, cfg.answers] for t in self.think_lengths], device=self.device)
        layers = []
        for layer in range(cfg.layers):
            q, k, v = self.q[layer], self.k[layer], self.v[layer]
            entry = {"k_image": k[:, :, self.image_start:self.image_start + cfg.image],
                     "v_image": v[:, :, self.image_start:self.image_start + cfg.image], "lengths": lengths}
            for kind, idx in (("think", think_idx), ("answer", answer_idx)):
                rows = q.gather(2, idx[:, None, :, None].expand(-1, cfg.heads, -1, cfg.head_size))
                grouped = rows.view(cfg.rollouts, cfg.kv_heads, -1, cfg.head_size).float()
                scores = self.scale * grouped @ k.float().transpose(-1, -2)  # [B, H_kv, g * rows, S]
                scores = scores.view(cfg.rollouts, cfg.heads, -1, self.seq)
                causal = torch.arange(self.seq, device=self.device) > (self.prompt + idx)[:, None, :, None]
                entry[f"q_{kind}"] = rows
                entry[f"lse_{kind}"] = scores.masked_fill_(causal, float("-inf")).logsumexp(-1)
                del scores
            entry["k_think"] = k.gather(2, (self.prompt + think_idx)[:, None, :, None].expand(
                -1, cfg.kv_heads, -1, cfg.head_size))
            layers.append(entry)
        return layers


def ours(state: Rollouts, captures) -> torch.Tensor:
    """S(a, i) summed over layers: the answer vectors from the answer rows of W_U, then one op per layer."""
    cfg = state.cfg
    g = answer_logit_directions(state.gamma, state.unembedding, state.answer_ids, state.rms)
    total = None
    for layer, c in enumerate(captures):
        u = project_answer_vectors(g, state.o_proj[layer], cfg.heads).to(cfg.dtype)
        s = layer_saliency(c["q_think"], c["lse_think"], c["q_answer"], c["lse_answer"], c["k_think"],
                           c["k_image"], c["v_image"], u, c["lengths"], state.scale, "cot")
        total = s if total is None else total + s
    return total


def baseline(state: Rollouts, steps) -> torch.Tensor:
    """The public code's way from the held attention rows: per rollout and layer, the two-hop product,
    per-image-token contributions through o_proj, then the full vocabulary head on every image token."""
    cfg, groups = state.cfg, state.cfg.heads // state.cfg.kv_heads
    img = slice(state.image_start, state.image_start + cfg.image)
    out = []
    for b in range(cfg.rollouts):
        think_pos = [state.prompt + s for s in state.think_steps[b]]
        contributions = torch.zeros(cfg.answers, cfg.image, cfg.hidden, device=state.device)  # [A, N, D]
        for layer in range(cfg.layers):
            answer_to_think = torch.stack([steps[s][layer][b, :, 0, think_pos] for s in state.answer_steps[b]], 1)
            think_to_image = torch.stack([steps[s][layer][b, :, 0, img] for s in state.think_steps[b]], 1)
            rho = (answer_to_think.float() @ think_to_image.float())  # [H, A, N]
            values = state.v[layer][b, :, img].repeat_interleave(groups, dim=0).float()  # [H, N, d]
            blocks = state.o_proj[layer].float().view(cfg.hidden, cfg.heads, cfg.head_size)
            through_o_proj = torch.einsum("hnk,dhk->hnd", values, blocks)  # [H, N, D]: W_O,h v_i
            contributions += torch.einsum("han,hnd->and", rho, through_o_proj)
        normed = (contributions * state.gamma.float() / state.rms[b, :, None, None]).to(cfg.dtype)
        logits = normed @ state.unembedding.T  # [A, N, V]: the whole vocabulary on every image token
        out.append(logits.gather(-1, state.answer_ids[b, :, None, None].expand(-1, cfg.image, 1))[..., 0].float())
        del logits
    return torch.stack(out)


def _baseline_layers_that_fit(cfg: Config, device: str) -> int:
    """Layers whose attention rows fit in half the free GPU memory (all of them on CPU)."""
    if device != "cuda":
        return cfg.layers
    seq = cfg.text_before + cfg.image + cfg.text_after + cfg.completion
    rows_per_layer = cfg.rollouts * cfg.heads * cfg.completion * seq * torch.finfo(cfg.dtype).bits // 8
    logits = cfg.answers * cfg.image * cfg.vocab * 2 * torch.finfo(cfg.dtype).bits // 8
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(cfg.layers, int((free // 2 - logits) // (2 * rows_per_layer))))


DEVICES_AND_SHAPES = [pytest.param("cpu", CPU, id="cpu"), pytest.param("cuda", GPU, id="cuda", marks=NO_CUDA)]


@pytest.mark.parametrize("device,cfg", DEVICES_AND_SHAPES)
def test_bench_layer_saliency_vs_public_way(benchmark, device, cfg):
    cuda = device == "cuda"
    full = Rollouts(cfg, device)
    captures = full.captures()

    def run_ours():
        result = ours(full, captures)
        if cuda:
            torch.cuda.synchronize()
        return result

    ours_result = benchmark.pedantic(run_ours, warmup_rounds=2, rounds=10)
    ours_s = benchmark.stats.stats.median

    # The op alone (answer vectors precomputed): the figure for the "< 5 ms per rollout" goal on GPU.
    g = answer_logit_directions(full.gamma, full.unembedding, full.answer_ids, full.rms)
    us = [project_answer_vectors(g, w, cfg.heads).to(cfg.dtype) for w in full.o_proj]
    op_s = time_median(lambda: [layer_saliency(c["q_think"], c["lse_think"], c["q_answer"], c["lse_answer"],
                                               c["k_think"], c["k_image"], c["v_image"], u, c["lengths"],
                                               full.scale, "cot") for c, u in zip(captures, us)],
                       rounds=5, warmup=1, cuda=cuda)

    # The baseline, on every layer when its rows fit in memory; else on a prefix of the layers, with
    # time and the rows' memory extrapolated linearly to all layers (said in extra_info).
    layers_run = _baseline_layers_that_fit(cfg, device)
    state = full if layers_run == cfg.layers else Rollouts(
        Config(**{**cfg.__dict__, "layers": layers_run}), device)
    steps = state.step_rows()
    rows_bytes = sum(t.numel() * t.element_size() for step in steps for t in step)
    # One round: the full-vocabulary head makes each call seconds long on 2 CPU cores.
    baseline_s = time_median(lambda: baseline(state, steps), rounds=1, warmup=1 if cuda else 0, cuda=cuda)
    del steps
    baseline_result, baseline_peak = measure_peak_memory(lambda: baseline(state, state.step_rows()), cuda=cuda)
    _, ours_peak = measure_peak_memory(lambda: ours(full, full.captures()), cuda=cuda)

    if layers_run == cfg.layers:
        # Same rollouts, same attribution: the two ways agree (fp32 on CPU; bf16 rows and logits on GPU).
        tolerance = 1e-3 if cfg.dtype == torch.float32 else 5e-2
        err = (ours_result - baseline_result).abs().max().item()
        assert err <= tolerance * baseline_result.abs().max().item(), f"ours and the baseline differ by {err}"
    else:
        scale_up = cfg.layers / layers_run
        baseline_s *= scale_up
        baseline_peak += int(rows_bytes * (scale_up - 1))  # the rows grow with the layers; the logits do not

    report(benchmark, f"layer_saliency cot, {cfg.name} ({cfg.rollouts} rollouts, {cfg.layers} layers)",
           ours_s=ours_s, baseline_s=baseline_s, ours_peak=ours_peak, baseline_peak=baseline_peak,
           op_only_ms_per_rollout=round(op_s / cfg.rollouts * 1e3, 3),
           baseline_layers_measured=f"{layers_run}/{cfg.layers}" + (
               "" if layers_run == cfg.layers else " (time and rows' memory extrapolated linearly)"),
           shapes=f"H={cfg.heads}/{cfg.kv_heads} d={cfg.head_size} D={cfg.hidden} V={cfg.vocab} N={cfg.image} "
                  f"C={cfg.completion} T={cfg.think}..{min(full.think_lengths)} A={cfg.answers} {cfg.dtype}")
