"""The saliency-r1 command: train, evaluate and explain on the tiny model."""

import json
import re

import pytest

from saliency_r1.cli import build_parser, main
from saliency_r1.data.synthetic import SyntheticGroundedVQA
from saliency_r1.grpo.config import TrainConfig, config_from_args
from saliency_r1.grpo.plots import read_log

TINY_RUN = ["--steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "8",
            "--train-size", "8", "--eval-size", "2", "--eval-limit", "2", "--cold-start-steps", "2",
            "--progress", "false"]


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
    for line in ("logs (JSONL):", f"TensorBoard:       {out / 'saliency-r1'}", "reward curves:", "final checkpoint:",
                 "held-out @ step 1:"):
        assert line in printed
    assert (out / "train.jsonl").is_file() and (out / "reward_curves.png").is_file()
    # The events file holds what the JSONL log holds.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "saliency-r1"))
    events.Reload()
    logged = [r for r in read_log(out / "train.jsonl") if r.get("split", "train") == "train"]
    assert [(e.step, e.value) for e in events.Scalars("reward/total")] == [
        (1, pytest.approx(logged[0]["reward/total"], rel=1e-6))]

    checkpoint = out / "checkpoint-1"
    assert main(["evaluate", str(checkpoint), "--limit", "2", "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    metrics = summary["models"][str(checkpoint)]
    assert metrics["samples"] == 2 and 0 <= metrics["rates"]["saliency_in_box"]["mean"] <= 1
    assert summary["data"].startswith("synthetic held-out set: seed 10000") and summary["samples_requested"] == 2

    example = SyntheticGroundedVQA(1, seed=99)[0]
    example["image"].save(tmp_path / "image.png")
    assert main(["explain", str(checkpoint), "--image", str(tmp_path / "image.png"), "--question",
                 example["problem"], "--box", example["bbox"], "--out", str(tmp_path / "explained")]) == 0
    printed = capsys.readouterr().out
    assert "valid:" in printed and (tmp_path / "explained" / "overlay.png").stat().st_size > 5_000
    with pytest.raises(SystemExit):  # --out names the folder of the three files
        main(["explain", str(checkpoint), "--image", str(tmp_path / "image.png"), "--question", "q",
              "--out", str(tmp_path / "explain.png")])
    assert "not a file name" in capsys.readouterr().err


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_loads(tracker, tmp_path, monkeypatch, capsys):
    import importlib.util

    import saliency_r1.grpo.loop as loop

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_policy_processor", no_loading)
    monkeypatch.setattr(loop, "load_policy_model", no_loading)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *TINY_RUN, "--output-dir", str(tmp_path / "run"), "--report-to", tracker])
    assert stopped.value.code == 2
    assert f"pip install 'saliency-r1[{tracker}]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_scalars(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--output-dir", str(out), "--report-to", "wandb"]) == 0
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert f"W&B run:           {run_dir}" in capsys.readouterr().out
    (log,) = run_dir.glob("run-*.wandb")
    logged = [r for r in read_log(out / "train.jsonl") if r.get("split", "train") == "train"]
    history = [row for row in _wandb_history(log) if "reward/total" in row]
    assert [row["reward/total"] for row in history] == [pytest.approx(logged[0]["reward/total"], rel=1e-6)]


def _wandb_history(path):
    """The history rows of a W&B offline run log: a LevelDB-style log (a 7-byte file header, then
    32 KiB blocks of records, each chunk ``crc32 | length | kind`` and its bytes) of protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full / first; middle / last append
        if kind in (1, 4):
            records.append(pending)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "0"], r"learning_rate \(--learning-rate\) must be a positive finite number"),
    (["--learning-rate", "nan"], r"learning_rate \(--learning-rate\) must be a positive finite number"),
    (["--num-generations", "1"], r"num_generations \(--num-generations\) must be >= 2"),
    (["--resume", "no/such/checkpoint-3"], "--resume no/such/checkpoint-3: no such checkpoint directory"),
    (["--model", "./no-such-model"], "--model ./no-such-model: no such folder"),
    (["--model", "/abs/no/such"], "--model /abs/no/such: no such folder"),
    (["--data", "missing.jsonl", "--cold-start-steps", "0"], "--data missing.jsonl: no such file or directory"),
    (["--data", "train.jsonl"], r"cold_start_steps \(--cold-start-steps\): the tiny model's cold start"),
    (["--extra-rewards", "no_such_module:f"], "--extra-rewards 'no_such_module:f'"),
    (["--top-p", "1.5"], r"top_p \(--top-p\) must lie in \(0, 1\]"),
    (["--eps-low", "1"], r"eps_low \(--eps-low\) must be < 1"),
    (["--temperature", "-1"], r"temperature \(--temperature\) must be a positive finite number"),
    (["--max-pixels", "100", "--min-pixels", "200"], "max_pixels"),
    (["--eval-limit", "0"], r"eval_limit \(--eval-limit\) must be >= 1"),
])
def test_bad_configuration_stops_before_anything_loads(flags, message, tmp_path, monkeypatch, capsys):
    import saliency_r1.grpo.loop as loop

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loop, "load_policy_processor", no_loading)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_a_hub_id_is_not_mistaken_for_a_missing_folder():
    assert TrainConfig(model="Qwen/Qwen2.5-VL-3B-Instruct").model == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_evaluate_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "some/checkpoint", "--out", "eval", "--limit", "-1"])
    assert stopped.value.code == 2 and "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("box, message", [("[0.1,0.1,5,5]", "outside the image"), ("[0.1,0.2]", "four numbers"),
                                          ("[0.5,0.5,0.5,0.9]", "empty")])
def test_explain_box_is_checked_as_the_loader_checks_it(box, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["explain", str(tmp_path), "--image", "x.png", "--question", "q", "--box", box])
    assert stopped.value.code == 2 and "--box" in (err := capsys.readouterr().err) and message in err


def test_explain_names_an_image_that_cannot_be_read(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    for image in (tmp_path / "missing.png", tmp_path / "notes.txt"):
        with pytest.raises(SystemExit) as stopped:
            main(["explain", str(tmp_path), "--image", str(image), "--question", "q"])
        assert stopped.value.code == 2 and f"--image {image}" in capsys.readouterr().err


def test_commands_on_something_that_is_not_a_checkpoint_say_so(tmp_path, capsys):
    """A run's folder instead of its checkpoint, a missing configuration, a folder that is no model: a
    message naming it, no traceback."""
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    for argv, message in (
            (["evaluate", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")], "no such folder"),
            (["explain", str(run / "checkpoint-3"), "--image", str(_image(tmp_path)), "--question", "q"],
             "not a complete checkpoint written by train (no state.json)"),
            (["explain", str(run), "--image", str(_image(tmp_path)), "--question", "q"], "a checkpoint written by train"),
            (["evaluate", str(run / "checkpoint-3"), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "e")],
             "not a complete checkpoint written by train (no state.json)"),
            (["train", "--config", str(tmp_path / "missing.yaml")], "cannot read the configuration"),
            (["train", "--model", str(run)], "not a model folder (no config.json)")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and message in err and "Traceback" not in err, err
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert "not valid YAML" in capsys.readouterr().err


def _image(folder):
    from PIL import Image

    path = folder / "image.png"
    Image.new("RGB", (64, 64), "white").save(path)
    return path


def test_a_checkpoints_configuration_loads_where_its_paths_do_not_exist(tmp_path):
    """evaluate and explain read a run's config.yaml back on another machine or after its data moved."""
    (tmp_path / "config.yaml").write_text("data: /gone/train.jsonl\nmodel: /gone/model\ncold_start_steps: 0\n"
                                          "resume: /gone/checkpoint-3\n")
    cfg = TrainConfig.load(tmp_path / "config.yaml")
    assert cfg.data == "/gone/train.jsonl"
    with pytest.raises(ValueError, match="--resume /gone/checkpoint-3: no such checkpoint"):
        cfg.check_paths()
