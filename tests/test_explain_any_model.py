"""saliency-r1 explain on any supported Hugging Face model: a folder in the hub's layout (loaded without
torchvision), a LoRA adapter, a checkpoint of train; a given completion; two models compared; the
three files it writes, their maps exactly the engine's; bad input named before a model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from saliency_r1.cli import main
from saliency_r1.data.synthetic import SyntheticGroundedVQA

COMPLETION = "<think>red dark</think><answer>dark</answer>"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    record = SyntheticGroundedVQA(1, seed=11)[0]
    record["image"].save(folder / "image.png")
    return folder / "image.png", record


def test_a_hub_folder_loads_its_processor_without_torchvision(hub_folder):
    from transformers import AutoProcessor

    from saliency_r1.models import load_processor
    from saliency_r1.tiny import build_tiny_processor

    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        with pytest.raises(ImportError, match="[Tt]orchvision"):  # what a new user meets here
            AutoProcessor.from_pretrained(hub_folder)
    processor = load_processor(hub_folder)
    image = SyntheticGroundedVQA(1, seed=3)[0]["image"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    ours, tiny = processor, build_tiny_processor()
    got, want = (p(text=[p.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)],
                   images=[image], return_tensors="pt") for p in (ours, tiny))
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["pixel_values"], want["pixel_values"])


def test_explain_writes_its_three_files_and_the_engines_maps_exactly(hub_folder, example, tmp_path, capsys):
    """float64, a given completion: the maps in explanation.json are the engine's for the same prompt and
    completion (teacher-forced), bit for bit."""
    from saliency_r1.adapters import get_adapter
    from saliency_r1.explain import completion_token_ids
    from saliency_r1.models import resolve_model
    from saliency_r1.saliency import saliency_for_completions

    image, record = example
    out = tmp_path / "out"
    assert main(["explain", hub_folder, "--image", str(image), "--question", record["problem"], "--box", record["bbox"],
                 "--completion", COMPLETION, "--dtype", "float64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("overlay.png", "flow.html", "explanation.json"):
        assert str(out / name) in printed and (out / name).stat().st_size > 1000
    saved = json.loads((out / "explanation.json").read_text())
    assert saved["valid"] and saved["model"] == hub_folder and saved["question"] == record["problem"]
    assert 0 <= saved["reward"] <= 1 and saved["pointing_game_hit"] in (True, False)

    source = resolve_model(hub_folder)
    processor, model = source.processor(), source.load("cpu", torch.float64)
    inputs = processor(text=[saved["prompt_text"]], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == saved["prompt_ids"]  # anyone can recompute from what is saved
    ids = completion_token_ids(processor.tokenizer, COMPLETION)
    assert saved["completion_ids"] == ids
    rollout = saliency_for_completions(model, processor, inputs, [ids], adapter=get_adapter(model), details=True)
    assert torch.equal(torch.tensor(saved["maps"]["answer"][0], dtype=torch.float64), rollout.maps[0][0])
    assert torch.equal(torch.tensor(saved["maps"]["answer_tokens"][0], dtype=torch.float64),
                       rollout.answer_token_maps[0][0])
    assert torch.equal(torch.tensor(saved["maps"]["think_tokens"][0], dtype=torch.float64),
                       rollout.think_token_maps[0][0])
    assert torch.equal(torch.tensor(saved["maps"]["answer_to_think"], dtype=torch.float64), rollout.answer_to_think[0])


def test_explain_a_lora_adapter_beside_its_base(hub_folder, example, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    adapter = get_peft_model(AutoModelForImageTextToText.from_pretrained(hub_folder),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.nn.init.normal_(adapter.base_model.model.model.language_model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    adapter.save_pretrained(tmp_path / "adapter")
    image, record = example
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "adapter"), "--compare", hub_folder, "--image", str(image), "--question",
                 record["problem"], "--completion", COMPLETION, "--out", str(out)]) == 0
    both = json.loads((out / "explanation.json").read_text())["explanations"]
    assert [e["model"] for e in both] == [str(tmp_path / "adapter"), hub_folder]
    assert both[0]["maps"]["answer"] != both[1]["maps"]["answer"]  # the adapter changed the model
    page = (out / "flow.html").read_text()
    assert page.count('"completion":') == 2


def test_explain_a_checkpoint_of_train_generates(cold_model, example, tmp_path, capsys):
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.grpo.loop import train

    run = train(TrainConfig(model=cold_model, steps=1, prompts_per_step=2, num_generations=2, max_completion_length=12,
                            train_size=4, eval_size=2, eval_limit=2, progress=False, output_dir=str(tmp_path / "run")))
    image, record = example
    started = time.perf_counter()
    assert main(["explain", str(run.checkpoint), "--image", str(image), "--question", record["problem"],
                 "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert saved["completion"].startswith("<think>") and "generate" in saved["timings"]
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("case", ["missing image", "not an image", "box outside", "box of three", "another family",
                                  "no model", "completion too long"])
def test_bad_input_is_named_before_a_model_loads(case, hub_folder, example, tmp_path, monkeypatch, capsys):
    from saliency_r1.models import ModelSource

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ModelSource, "load", no_loading)
    image, record = example
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    model, argv, expected = hub_folder, [], ""
    if case == "missing image":
        argv, expected = ["--image", str(tmp_path / "none.png")], "--image"
    elif case == "not an image":
        argv, expected = ["--image", str(tmp_path / "notes.txt")], "not an image that can be read"
    elif case == "box outside":
        argv, expected = ["--image", str(image), "--box", "[0.1,0.1,5,5]"], "outside the image"
    elif case == "box of three":
        argv, expected = ["--image", str(image), "--box", "[0.1,0.1,0.5]"], "four numbers"
    elif case == "another family":
        model, argv, expected = str(tmp_path / "llava"), ["--image", str(image)], "'llava' model; saliency-r1 explains"
    elif case == "no model":
        model, argv, expected = str(tmp_path / "nothing"), ["--image", str(image)], "no such folder"
    else:
        argv, expected = ["--image", str(image), "--completion", "red " * 5000], "--completion: 5002 tokens, more than"
    with pytest.raises(SystemExit) as stopped:
        main(["explain", model, "--question", "q", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and expected in err and "Traceback" not in err, err


def test_the_command_from_start_to_files_in_under_ten_seconds_of_cpu(hub_folder, example, tmp_path):
    """A fresh process, as a user runs it: the import of torch and transformers, the model, the page. Its CPU
    time is what is held to 10 s (on a quiet machine the wall time is the same; under load it is not)."""
    import resource

    image, record = example
    timings = {}
    for mode, extra in (("generated", []), ("given", ["--completion", COMPLETION])):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run([sys.executable, "-m", "saliency_r1.cli", "explain", hub_folder, "--image", str(image),
                              "--question", record["problem"], "--max-new-tokens", "24", "--out", str(tmp_path / mode),
                              *extra], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # no threads spinning under load
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        timings[mode] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert run.returncode == 0, run.stderr[-2000:]
        assert (tmp_path / mode / "flow.html").is_file()
    assert timings["generated"] < 10 and timings["given"] < 10, timings


def test_a_given_completion_is_explained_faster_than_a_generated_one(hub_folder, example):
    """One teacher-forced forward against a decode loop over the same completion (warm, fastest of five)."""
    import statistics

    from saliency_r1.explain import explain
    from saliency_r1.models import resolve_model

    source = resolve_model(hub_folder)
    model, processor = source.load("cpu", torch.float32), source.processor()
    image, record = example
    image = Image.open(image).convert("RGB")
    generated = explain(model, processor, image, record["problem"], max_new_tokens=24)
    times = {"generated": [], "given": []}
    for _ in range(5):
        for mode, completion in (("generated", None), ("given", generated.text)):
            started = time.perf_counter()
            again = explain(model, processor, image, record["problem"], max_new_tokens=24, completion=completion)
            times[mode].append(time.perf_counter() - started)
            assert again.text == generated.text
    assert min(times["given"]) < min(times["generated"]), {k: statistics.median(v) for k, v in times.items()}


def test_the_explanation_object_saves_renders_and_shows_in_a_notebook(hub_folder, example, tmp_path):
    from saliency_r1.explain import explain
    from saliency_r1.models import resolve_model

    source = resolve_model(hub_folder)
    image, record = example
    explanation = explain(source.load("cpu", torch.float32), source.processor(), Image.open(image).convert("RGB"),
                          record["problem"], boxes=record["bbox"], completion="no structure at all", model_name="tiny")
    assert not explanation.valid and explanation.reward == 0.0 and explanation.token_maps is not None
    page = explanation.to_html()
    assert page.startswith("<!doctype html>") and '"valid":false' in page
    assert "://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch (the SVG namespace is a name)
    assert explanation._repr_html_().startswith("<iframe srcdoc=")
    paths = explanation.save(tmp_path / "saved")
    assert sorted(p.name for p in paths.values()) == ["explanation.json", "flow.html", "overlay.png"]
    saved = json.loads(paths["explanation"].read_text())
    assert saved["reward"] == 0.0 and saved["direct_token_maps"]["tokens"]


def test_the_page_of_a_1280_token_image_stays_small(hub_folder, tmp_path):
    """Maps are quantised and the image re-encoded: a 1,296-token image and a 120-token reasoning fit in a
    few hundred KB."""
    from saliency_r1.explain import explain
    from saliency_r1.models import resolve_model
    from saliency_r1.tiny import build_tiny_processor

    source = resolve_model(hub_folder)
    processor = build_tiny_processor(max_pixels=1008 * 1008)
    image = SyntheticGroundedVQA(1, seed=4)[0]["image"].resize((1008, 1008))
    explanation = explain(source.load("cpu", torch.float32), processor, image, "q",
                          completion="<think>" + "red " * 120 + "</think><answer>dark</answer>")
    assert sum(h * w for h, w in explanation.rollout.image_grids[0]) == 1296 and len(explanation.think_tokens) >= 120
    size = len(explanation.to_html().encode())
    assert size < 400_000, size
    # The worst case for the image, noise (JPEG cannot compress it), still stays within half a megabyte.
    noisy = explain(source.load("cpu", torch.float32), processor, Image.effect_noise((1008, 1008), 60).convert("RGB"),
                    "q", completion="<think>" + "red " * 120 + "</think><answer>dark</answer>")
    assert len(noisy.to_html().encode()) < 500_000
