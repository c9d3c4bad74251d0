"""A drop-in for TRL users: ``SaliencyGRPOTrainer``, TRL's ``GRPOTrainer`` whose reward functions
also receive the saliency maps of the completions they score.

>>> from saliency_r1.rewards import accuracy_reward, format_reward, saliency_reward
>>> trainer = SaliencyGRPOTrainer(model=model, processing_class=processor, args=GRPOConfig(...),  # doctest: +SKIP
...                               reward_funcs=[format_reward, accuracy_reward, saliency_reward],
...                               train_dataset=dataset)   # columns: prompt, image, solution, bbox

Where the maps come from. TRL (1.16) calls ``_calculate_rewards(inputs, prompts, completions,
completion_ids_list)`` after generation and before advantages; this override runs teacher-forced
forwards of the completions, in chunks of ``per_device_train_batch_size`` as TRL chunks its own
passes, each a fused forward (:func:`saliency_r1.saliency.saliency_fused_forward`: no gradient, no
cache, each layer's part of the maps computed inside its attention call), and adds, per completion,
``saliency_maps`` (per image, the raw ``[h', w']`` map) and ``saliency_valid`` (1.0 for a well-formed
think/answer structure) to the reward keywords. Doing it there rather than inside ``generate`` makes
it independent of the generation backend (transformers, continuous batching or vLLM, whose
completions arrive as ids); the cost is one forward pass without gradient over the batch, the size of
TRL's own old-log-prob pass (taking the maps from that pass itself, with no extra forward, is not done
yet). It is skipped when no reward function names a ``saliency_maps`` parameter (one that only takes
``**kwargs`` gets no maps).
"""

from __future__ import annotations

import inspect

import torch
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from saliency_r1.adapters import get_adapter
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
        # A sampled <|image_pad|> breaks every later teacher-forced forward (image features are placed
        # on it): never sample vision placeholders (transformers generation; vLLM is configured apart).
        generation = getattr(self, "generation_config", None)
        if generation is not None:
            generation.suppress_tokens = sorted(set(generation.suppress_tokens or [])
                                                | set(get_adapter(self.model).vision_token_ids))

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

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._needs_saliency:
            maps, valid = self._saliency(prompts, completion_ids_list)
            inputs = [{**example, "saliency_maps": m, "saliency_valid": v}
                      for example, m, v in zip(inputs, maps, valid)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
