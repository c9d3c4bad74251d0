"""The saliency-r1 command: train, evaluate and explain on the tiny model."""

import json

import pytest

from saliency_r1.cli import build_parser, main
from saliency_r1.data import SyntheticGroundedVQA
from saliency_r1.grpo.config import TrainConfig, config_from_args


def test_train_flags_and_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("steps: 7\nlearning_rate: 0.01\nlora_targets: [q_proj]\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "3",
                                      "--report-to", "tensorboard", "--model", "none"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.learning_rate, cfg.lora_targets, cfg.report_to, cfg.model) == \
        (3, 0.01, ["q_proj"], ["tensorboard"], None)
    assert config_from_args(build_parser().parse_args(["train"])) == TrainConfig()  # no arguments: the demo
    with pytest.raises(ValueError, match="normalisation"):
        config_from_args(build_parser().parse_args(["train", "--normalisation", "tokens"]))
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.load(tmp_path / "bad.yaml")


@pytest.mark.slow
def test_train_evaluate_explain(tmp_path, cold_model, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", cold_model, "--steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
                 "--max-completion-length", "12", "--eval-size", "2", "--eval-limit", "2", "--output-dir", str(out),
                 "--progress", "false", "--report-to", "tensorboard"]) == 0
    printed = capsys.readouterr().out
    for line in ("logs (JSONL):", "TensorBoard:", "reward curves:", "final checkpoint:", "held-out @ step 1:"):
        assert line in printed
    assert (out / "train.jsonl").is_file() and (out / "reward_curves.png").is_file()
    assert list((out / "saliency-r1").rglob("events.out.tfevents.*"))

    checkpoint = out / "checkpoint-1"
    assert main(["evaluate", str(checkpoint), "--limit", "2", "--out", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["samples"] == 2 and 0 <= metrics["saliency_in_box"] <= 1

    example = SyntheticGroundedVQA(1, seed=99)[0]
    example["image"].save(tmp_path / "image.png")
    assert main(["explain", str(checkpoint), "--image", str(tmp_path / "image.png"), "--question",
                 example["problem"], "--box", example["bbox"], "--out", str(tmp_path / "explain.png")]) == 0
    printed = capsys.readouterr().out
    assert "valid:" in printed and (tmp_path / "explain.png").stat().st_size > 5_000
