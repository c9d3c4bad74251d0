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
