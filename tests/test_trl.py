"""SaliencyGRPOTrainer: TRL 1.16's GRPOTrainer with saliency maps handed to the reward functions."""

import pytest
import torch

from saliency_r1.adapters import get_adapter
from saliency_r1.data.synthetic import SyntheticGroundedVQA
from saliency_r1.grpo.config import TrainConfig
from saliency_r1.models import load_policy
from saliency_r1.prompts import SYSTEM_PROMPT
from saliency_r1.rewards import accuracy_reward, format_reward, saliency_reward


@pytest.mark.slow
def test_trl_trainer_steps_with_saliency_rewards(tmp_path, cold_model):
    from trl import GRPOConfig

    from saliency_r1.trl import SaliencyGRPOTrainer

    model, processor = load_policy(TrainConfig(model=cold_model))
    data = SyntheticGroundedVQA(16, seed=5)

    dataset = data.to_hf().map(lambda row: {"prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                                       {"role": "user", "content": row["problem"]}]})
    seen = []

    def spy(completions, saliency_maps, saliency_valid, bbox, image, **kwargs):
        seen.append((completions, saliency_maps, saliency_valid, bbox, image))
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-3,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                      logging_steps=1, report_to=[], save_strategy="no", seed=0, temperature=1.0)
    trainer = SaliencyGRPOTrainer(model=model, processing_class=processor, args=args, train_dataset=dataset,
                                  reward_funcs=[format_reward, accuracy_reward, saliency_reward, spy])
    assert set(get_adapter(model).vision_token_ids) <= set(trainer.generation_config.suppress_tokens)  # never sampled
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(seen) == 2
    for _, maps, valid, bbox, image in seen:
        assert len(maps) == len(valid) == len(bbox) == len(image) == 4
        for per_image, ok in zip(maps, valid):
            assert len(per_image) == 1 and per_image[0].shape == (4, 4)  # 112 px image: 4 x 4 cells
            assert ok in (0.0, 1.0)
    scores = [saliency_reward(c, saliency_maps=m, bbox=b, image=i, saliency_valid=v) for c, m, v, b, i in seen]
    flat = [s for batch in scores for s in batch]
    assert all(0.0 <= s <= 1.0 for s in flat)
    assert any(0.0 < s < 1.0 for s in flat), flat  # non-trivial: valid completions with spread-out saliency
    logged = [entry for entry in trainer.state.log_history if "rewards/saliency_reward/mean" in entry]
    assert logged and all(0.0 <= e["rewards/saliency_reward/mean"] <= 1.0 for e in logged)
    # TRL decodes with skip_special_tokens=True: the think/answer tags must survive it.
    assert any(e["rewards/format_reward/mean"] > 0 for e in logged)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


class _StandInVLLM:
    """TRL's ``VLLMGeneration`` without vLLM (``../shared/ECOSYSTEM.md``): ``generate`` answers every prompt with
    the next of some fixed completions and zero log-probs, ``sync_weights`` does nothing."""

    completions: list[list[int]] = []

    def __init__(self, **kwargs):
        self.generation_kwargs = dict(kwargs.get("generation_kwargs") or {})
        self.synced = 0
        self.served = 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        completions = [self.completions[(self.served + i) % len(self.completions)] for i in range(len(prompts))]
        self.served += len(prompts)
        return prompts, completions, [[[0.0] for _ in c] for c in completions], [[[t] for t in c] for c in completions]


@pytest.mark.slow
def test_under_vllm_the_maps_come_from_trls_old_logp_pass_with_no_extra_forward(tmp_path, cold_model, monkeypatch):
    """TRL's real vLLM branch (a stand-in generator): the old-log-prob pass is our fused forward, one model call
    per chunk of ``per_device_train_batch_size`` and no other forward without gradient; its log-probs equal TRL's
    own pass's, its maps those of ``saliency_for_completions``; vision tokens are banned in vLLM's sampling."""
    import trl.trainer.grpo_trainer
    from trl import GRPOConfig, GRPOTrainer

    from saliency_r1.saliency import saliency_for_completions
    from saliency_r1.grpo.vllm_engine import BANNED_TOKEN_BIAS
    from saliency_r1.trl import SaliencyGRPOTrainer

    model, processor = load_policy(TrainConfig(model=cold_model))
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # the test's reference batch; TRL pads its own
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>red dark</think><answer>dark</answer>", "<think>blue light</think><answer>light</answer>",
             "<think>red</think><answer>dark light</answer>", "no structure at all"]
    _StandInVLLM.completions = [tokenizer.encode(t, add_special_tokens=False) + [end] for t in texts]
    _StandInVLLM.completions[1] += tokenizer.encode("after the end", add_special_tokens=False)  # scored, not mapped
    monkeypatch.setattr(trl.trainer.grpo_trainer, "VLLMGeneration", _StandInVLLM)
    dataset = SyntheticGroundedVQA(8, seed=5).to_hf().map(
        lambda row: {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["problem"]}]})

    no_grad_forwards = []
    counting = [True]
    model.register_forward_pre_hook(lambda *_: no_grad_forwards.append(1)
                                    if counting[0] and not torch.is_grad_enabled() else None)
    compared = []

    def spy(prompts, completion_ids, saliency_maps, saliency_valid, **kwargs):
        counting[0] = False  # the reference below is the test's, not the trainer's
        try:
            with torch.no_grad():
                inputs = processor.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, padding=True, return_tensors="pt")
                reference = saliency_for_completions(model.eval(), processor, inputs, completion_ids)
            model.train()
            compared.append((saliency_maps, saliency_valid, reference))
        finally:
            counting[0] = True
        return [0.0] * len(completion_ids)

    logps_pairs = []
    ours = SaliencyGRPOTrainer._get_per_token_logps_and_entropies

    def compare_with_trls_own(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        armed = self._armed_completions is not None
        before = len(no_grad_forwards)
        out = ours(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if armed:
            counting[0] = False
            try:
                own = GRPOTrainer._get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                                                     logits_to_keep, *args, **kwargs)[0]
            finally:
                counting[0] = True
            logps_pairs.append((out[0], own, attention_mask[:, -logits_to_keep:], len(no_grad_forwards) - before))
        return out

    monkeypatch.setattr(SaliencyGRPOTrainer, "_get_per_token_logps_and_entropies", compare_with_trls_own)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, learning_rate=1e-3,
                      use_vllm=True, vllm_mode="colocate", per_device_train_batch_size=2, steps_per_generation=2,
                      num_generations=4, max_completion_length=24, logging_steps=1, report_to=[],
                      save_strategy="no", seed=0, generation_kwargs={"logit_bias": {7: 1.5}})
    trainer = SaliencyGRPOTrainer(model=model, processing_class=processor, args=args, train_dataset=dataset,
                                  reward_funcs=[format_reward, saliency_reward, spy])
    bias = trainer.vllm_generation.generation_kwargs["logit_bias"]
    assert bias[7] == 1.5  # the user's own bias kept
    assert all(bias[t] == BANNED_TOKEN_BIAS for t in get_adapter(model).vision_token_ids)
    trainer.train()

    assert len(compared) == len(logps_pairs) == 1  # one generation batch of 4 for the two steps
    (ours_logps, own_logps, mask, forwards), = logps_pairs
    assert forwards == 2  # two chunks of per_device_train_batch_size = 2, each one fused forward
    assert len(no_grad_forwards) == 2  # and no other forward without gradient: no extra pass for the maps
    torch.testing.assert_close(ours_logps * mask, own_logps * mask, rtol=1e-4, atol=1e-4)
    assert mask[1].sum() > len(tokenizer.encode(texts[1])) + 1  # the tokens after <|im_end|> were scored too
    maps, valid, reference = compared[0]
    assert valid == reference.valid.tolist() and sum(valid) == 3
    for got, want in zip(maps, reference.maps):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert any(float(m[0].abs().sum()) > 0 for m in maps)
