"""A drop-in for TRL users: ``SaliencyGRPOTrainer``, TRL's ``GRPOTrainer`` whose reward functions
also receive the saliency maps of the completions they score.

>>> from saliency_r1.rewards import accuracy_reward, format_reward, saliency_reward
>>> trainer = SaliencyGRPOTrainer(model=model, processing_class=processor, args=GRPOConfig(...),  # doctest: +SKIP
...                               reward_funcs=[format_reward, accuracy_reward, saliency_reward],
...                               train_dataset=dataset)   # columns: prompt, image, solution, bbox

Where the maps come from. TRL (1.16) runs, after generation and before the rewards, a teacher-forced
forward without gradient for the old-policy log-probs (``_get_per_token_logps_and_entropies``, always when
it samples with vLLM, whose importance-sampling correction needs them; ``../docs/method.md`` section 7).
This trainer makes that pass a fused forward (:func:`saliency_r1.saliency.saliency_fused_forward`: no
cache, each layer's part of the maps computed inside its attention call, the log-probs from the same
forward), so the maps cost no extra pass: ``_generate`` arms it with the completions, TRL's pass runs it
chunk by chunk with TRL's own slicing of the images, and ``_calculate_rewards`` hands the maps over. When
TRL runs no such pass (transformers generation with aligned steps), ``_calculate_rewards`` runs the
fused forwards itself, in chunks of ``per_device_train_batch_size`` as TRL chunks its own passes. Either
way the reward functions receive, per completion, ``saliency_maps`` (per image, the raw ``[h', w']``
map) and ``saliency_valid`` (1.0 for a well-formed think/answer structure).

The pass runs in eval mode (no dropout), so the old log-probs it returns are those of the deterministic
policy, like the sampler's; TRL's own pass would run in train mode. Vision placeholders are never sampled:
transformers generation suppresses them, vLLM gets a ``logit_bias`` of ``BANNED_TOKEN_BIAS`` on each (a
sampled ``<|image_pad|>`` would break every later forward). Nothing runs when no reward function names
a ``saliency_maps`` parameter (one that only takes ``**kwargs`` gets no maps).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from saliency_r1.adapters import get_adapter
from saliency_r1.grpo.vllm_engine import banned_token_bias
from saliency_r1.saliency import saliency_fused_forward


def _wants_saliency(func) -> bool:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "saliency_maps" in parameters


class SaliencyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that hands saliency maps to its reward functions.

    Args:
        saliency_path: ``"cot"`` (through the think tokens, the default and the paper's),
            ``"direct"`` or ``"both"``.
        *args, **kwargs: as ``trl.GRPOTrainer``. The dataset needs conversational prompts and an
            ``image`` (or ``images``) column, as TRL requires for vision-language models.

    Reward functions receive ``saliency_maps`` (list per completion of per-image ``[h', w']``
    tensors) and ``saliency_valid`` (list of floats) besides TRL's usual keywords.
    """

    def __init__(self, *args, saliency_path: str = "cot", **kwargs):
        super().__init__(*args, **kwargs)
        self.saliency_path = saliency_path
        self._needs_saliency = any(_wants_saliency(f) for f in self.reward_funcs)
        self._armed_completions = None  # the completions whose maps TRL's next old-log-prob pass computes
        self._maps_from_pass = None  # (maps, valid) that pass left for _calculate_rewards
        # A sampled <|image_pad|> breaks every later teacher-forced forward (image features are placed on it).
        vision = get_adapter(self.model).vision_token_ids
        if self.use_vllm:
            sampling = self.vllm_generation.generation_kwargs
            sampling["logit_bias"] = {**(sampling.get("logit_bias") or {}), **banned_token_bias(vision)}
        else:
            generation = self.generation_config
            generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(vision))

    def _runs_old_logp_pass(self) -> bool:
        """Whether ``_generate_and_score_completions`` runs its no-grad old-log-prob forward (TRL 1.16's
        condition there, repeated: steps that do not align with generation, or vLLM's correction)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return (self.args.gradient_accumulation_steps % generate_every != 0
                or (self.use_vllm and self.vllm_importance_sampling_correction))

    def _saliency(self, prompts: list, completion_ids_list: list) -> tuple[list, list[float]]:
        """Maps of the local completions: the prompts re-rendered exactly as TRL renders them for its forward
        passes, then fused teacher-forced forwards (no cache), in chunks of ``per_device_train_batch_size``
        as TRL chunks its own passes."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        chunk = max(1, self.args.per_device_train_batch_size)
        maps, valid = [], []
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gather_deepspeed3_params=self.args.ds3_gather_for_generation) as model:
            was_training = model.training
            model.eval()  # no dropout in the maps
            try:
                for start in range(0, len(prompts), chunk):
                    side, tokenizer.padding_side = tokenizer.padding_side, "left"
                    try:
                        inputs = self.processing_class.apply_chat_template(
                            conversation=prompts[start:start + chunk], tools=self.tools or None,
                            chat_template=self.chat_template, add_generation_prompt=True, tokenize=True,
                            return_dict=True, padding=True, return_tensors="pt", **self.chat_template_kwargs)
                    finally:
                        tokenizer.padding_side = side
                    inputs = {k: v.to(self.accelerator.device) for k, v in inputs.items()
                              if isinstance(v, torch.Tensor)}
                    rollout = saliency_fused_forward(
                        model, self.processing_class, inputs,
                        [torch.as_tensor(c) for c in completion_ids_list[start:start + chunk]],
                        adapter=get_adapter(model), path=self.saliency_path)
                    maps += rollout.maps
                    valid += rollout.valid.tolist()
            finally:
                model.train(was_training)
        return maps, valid

    def _generate(self, prompts: list):
        generated = super()._generate(prompts)
        self._maps_from_pass = None
        # Tool calls put images in completions and rollout functions bring their own layout: their maps come
        # from _calculate_rewards' own forwards.
        if self._needs_saliency and self._runs_old_logp_pass() and not self.tools and self.rollout_func is None:
            self._armed_completions = generated[1]  # completion_ids_list
        return generated

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        completions, self._armed_completions = self._armed_completions, None
        if (completions is None or model is not self.model or torch.is_grad_enabled()
                or compute_entropy or compute_aux_loss):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        # TRL's own chunking and per-family slicing of the images, with each chunk's forward fused.
        fused = _FusedSaliencyPass(self, model, completions, logits_to_keep)
        was_training = model.training
        model.eval()  # no dropout in the maps or the old log-probs
        try:
            logps, _, _ = super()._get_per_token_logps_and_entropies(
                fused, input_ids, attention_mask, logits_to_keep, batch_size, **multimodal)
        finally:
            model.train(was_training)
        if fused.done != len(completions):
            raise RuntimeError(f"TRL's old-log-prob pass covered {fused.done} rows for {len(completions)} completions")
        self._maps_from_pass = (fused.maps, fused.valid)
        return logps, None, None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._needs_saliency:
            from_pass, self._maps_from_pass = self._maps_from_pass, None
            maps, valid = from_pass or self._saliency(prompts, completion_ids_list)
            inputs = [{**example, "saliency_maps": m, "saliency_valid": v}
                      for example, m, v in zip(inputs, maps, valid, strict=True)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)


class _FusedSaliencyPass:
    """Stands in for the model in TRL's old-log-prob pass: each chunk's call (TRL's model inputs of prompt and
    completion, with ``labels`` and ``fused_lm_head``) runs :func:`saliency_fused_forward` on the completions as
    sampled and answers with their log-probs, keeping the chunk's maps."""

    def __init__(self, trainer: SaliencyGRPOTrainer, model, completions: list, width: int) -> None:
        self.trainer, self.model, self.completions, self.width = trainer, model, completions, width
        self.adapter = get_adapter(trainer.accelerator.unwrap_model(model))
        self.maps, self.valid, self.done = [], [], 0

    def __call__(self, *, input_ids, attention_mask, labels=None, fused_lm_head=None, **multimodal):
        batch, width = input_ids.shape[0], self.width
        prompt = {"input_ids": input_ids[:, :-width], "attention_mask": attention_mask[:, :-width]}
        for key, value in multimodal.items():  # per-token type ids cover the completion too: keep the prompt's
            prompt[key] = value[:, :-width] if key.endswith("token_type_ids") else value
        rows = self.completions[self.done:self.done + batch]
        self.done += batch
        trainer = self.trainer
        rollout = saliency_fused_forward(
            self.model, trainer.processing_class, prompt, [torch.as_tensor(c, dtype=torch.long) for c in rows],
            adapter=self.adapter, path=trainer.saliency_path, temperature=trainer.temperature, trim=False)
        self.maps += rollout.maps
        self.valid += rollout.valid.tolist()
        logps = rollout.completion_logps.new_zeros(batch, width)  # TRL's completions may be padded wider
        logps[:, :rollout.completion_logps.shape[1]] = rollout.completion_logps
        return SimpleNamespace(log_probs=logps)
