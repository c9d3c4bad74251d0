"""The GRPO loop on the tiny model: steps run and learn something, resume is exact, two processes agree."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from saliency_r1.grpo.checkpoint import latest_checkpoint
from saliency_r1.grpo.config import TrainConfig
from saliency_r1.data.synthetic import SyntheticConfig, SyntheticGroundedVQA
from saliency_r1.grpo.cold_start import (NAMING_TOKEN, box_coverage, cold_start, cold_start_set, grounding_loss,
                                         named_coverage, recorded_attention)
from saliency_r1.grpo.loop import PromptOrder, _flush, train
from saliency_r1.logps import pad_completions
from saliency_r1.grpo.plots import read_log

# Small enough for seconds per run on 2 cores.
SMALL = dict(prompts_per_step=2, num_generations=2, max_completion_length=12, train_size=16, eval_size=2,
             eval_limit=2, micro_batch_size=3, progress=False)


def _weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "model.safetensors")


def test_prompt_order_is_a_function_of_position():
    order = PromptOrder(5, seed=3)
    first = [order[p] for p in range(12)]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert [PromptOrder(5, seed=3)[p] for p in range(12)] == first  # no state beyond the seed


def test_flush_reduces_maxima_by_max_and_the_rest_by_mean():
    from accelerate import Accelerator

    pending = [(0, {"completion_length/max": torch.tensor(24.0), "reward/total": torch.tensor(1.0)}),
               (1, {"completion_length/max": torch.tensor(6.0), "reward/total": torch.tensor(0.0)})]
    assert _flush(pending, Accelerator(cpu=True)) == {"step": 2, "completion_length/max": 24.0, "reward/total": 0.5}
    assert pending == []


def test_pad_completions():
    ids, mask = pad_completions([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cold_start_set_names_one_object_per_image_once():
    data = SyntheticGroundedVQA(40, 0, SyntheticConfig(num_objects=3))
    examples, texts, named = cold_start_set(data, 30)
    assert len(examples) == len(texts) == len(named) == 30
    assert cold_start_set(data, 30)[1] == texts  # a fixed set: the same reasoning at every visit
    colours = [text.removeprefix("<think>").split()[0] for text in texts]
    assert colours == [example["objects"][index][0] for example, index in zip(examples, named)]
    on_target = sum(index == example["target_index"] for index, example in zip(named, examples))
    assert 0 < on_target < len(named)  # some name the evidence, most another object: GRPO picks
    assert len(cold_start_set(data, 1000)[0]) == len(data)
    with pytest.raises(ValueError, match="synthetic set"):
        cold_start_set([data[0]], 1)


def test_box_coverage_is_each_cells_share_inside_the_box():
    assert box_coverage((0, 0, 27, 27), (112, 112), (4, 4)).tolist() == [1.0] + [0.0] * 15
    half = box_coverage((14, 0, 41, 27), (112, 112), (4, 4))
    assert half[:2].tolist() == [0.5, 0.5] and half[2:].sum() == 0
    for box in [(3, 5, 60, 31), (0, 0, 111, 111), (50, 70, 50, 70), (10, 20, 99, 40)]:
        cells = box_coverage(box, (112, 140), (4, 5))
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        assert cells.sum().item() * (112 / 4) * (140 / 5) == pytest.approx(area)  # coverage adds up to the box
        assert ((cells >= 0) & (cells <= 1)).all()


def test_grounding_loss_is_minus_log_of_the_naming_rows_share_in_the_box():
    torch.manual_seed(0)
    attention = [torch.rand(2, 3, 9, 9).softmax(-1) for _ in range(2)]
    positions = [torch.tensor([2, 3, 4, 5]), torch.tensor([4, 5, 6, 7])]
    coverage = [torch.tensor([1.0, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.25, 1.0])]
    expected = []
    for b in range(2):
        for layer in attention:
            for h in range(3):
                row = layer[b, h, 7, positions[b]]
                expected.append(-math.log(float((row * coverage[b]).sum() / row.sum())))
    assert grounding_loss(attention, positions, 7, coverage).item() == pytest.approx(sum(expected) / len(expected))


def _naming_share(model, processor, data, count: int = 32) -> float:
    """Geometric mean share of the naming row's image attention inside the named object's box (every layer and
    head; exp of minus the grounding loss)."""
    from saliency_r1.adapters import get_adapter
    from saliency_r1.logps import completion_logps
    from saliency_r1.prompts import prompt_inputs, system_prompt_or_default

    adapter = get_adapter(model)
    examples, texts, named = cold_start_set(data, count)
    prompts = prompt_inputs(processor, adapter, examples, system_prompt_or_default(None))
    ids, mask = pad_completions([torch.tensor(processor.tokenizer(t, add_special_tokens=False)["input_ids"])
                                 for t in texts], processor.tokenizer.pad_token_id, "cpu")
    coverage = named_coverage(examples, named, adapter.image_grids(prompts["image_grid_thw"]))
    with torch.no_grad(), recorded_attention(model) as attention:
        completion_logps(model, prompts, ids, mask, 1.0)
        loss = grounding_loss(attention, adapter.image_positions(prompts["input_ids"]),
                              prompts["input_ids"].shape[1] + NAMING_TOKEN, coverage)
    return math.exp(-loss.item())


@pytest.mark.slow
def test_cold_start_grounding_draws_the_naming_row_to_the_named_object():
    from saliency_r1.data.sets import load_data
    from saliency_r1.models import load_policy

    shares = {}
    for grounding in (0.0, 1.0):
        cfg = TrainConfig(cold_start_steps=60, cold_start_lr=3e-3, cold_start_batch=8, cold_start_size=64,
                          cold_start_grounding=grounding, train_size=64, progress=False)
        model, processor = load_policy(cfg)
        data, _ = load_data(cfg)
        before = _naming_share(model, processor, data)
        losses = cold_start(model, processor, data, cfg, torch.device("cpu"))
        shares[grounding] = before, _naming_share(model, processor, data)
        assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored after the cold start
        assert losses[-1] < losses[0]
    (start, plain), (same_start, grounded) = shares[0.0], shares[1.0]
    assert start == same_start  # one initialisation (the seed)
    assert grounded > max(plain, start) + 0.15, shares  # the grounded row reads the object it names; the plain
    # cold start's does not have to (it reads the image as a bag of features in many seeds: bench/RESULTS.md)


def test_fsdp_and_deepspeed_are_refused_before_loading():
    from accelerate.utils import DistributedType

    from saliency_r1.grpo.loop import check_distribution

    for refused in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match="one device or under DDP"):
            check_distribution(refused)
    for supported in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distribution(supported)


@pytest.mark.slow
def test_steps_logs_plot_and_exact_resume(tmp_path, cold_model):
    # On the CPU even where a GPU is present: CUDA's attention backward is not bit-reproducible.
    full = TrainConfig(**SMALL, model=cold_model, steps=4, save_every=2, output_dir=str(tmp_path / "full"), inner_iterations=2,
                       beta=0.05, use_cpu=True)
    result = train(full)
    records = read_log(result.log_path)
    steps = [r for r in records if r.get("split", "train") == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for key in ("reward/format", "reward/accuracy", "reward/saliency", "saliency_in_box", "pointing_game",
                    "kl", "clip_fraction", "completion_length/mean", "tokens_per_second", "time/generation",
                    "time/saliency", "time/reward", "time/update"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert 0 <= r["saliency_in_box"] <= 1 and r["kl"] >= 0
    assert any(r["reward/format"] > 0 for r in steps)  # the cold start made well-formed completions
    # The logged rate is the one each step's last optimizer step used: warm-up s -> min(1, (s + 1) / (w + 1)).
    w, inner = full.warmup_steps, full.inner_iterations
    expected = [full.learning_rate * min(1.0, (k * inner) / (w + 1)) for k in range(1, 5)]
    assert [r["learning_rate"] for r in steps] == pytest.approx(expected)
    assert all(r["completion_length/max"] == int(r["completion_length/max"]) for r in steps)  # a max, not a mean
    assert {r["step"] for r in records if r.get("split") == "eval"} == {0, 4}
    assert result.plot_path.stat().st_size > 10_000
    saved = TrainConfig.load(result.checkpoint / "config.yaml")
    assert saved == full
    assert json.loads((result.checkpoint / "state.json").read_text())["data_position"] == 8

    # Interrupted after step 2 (the process ends at a checkpoint), then resumed to step 4.
    part = TrainConfig(**{**full.to_dict(), "steps": 2, "output_dir": str(tmp_path / "part")})
    train(part)
    resumed = TrainConfig(**{**full.to_dict(), "output_dir": str(tmp_path / "part"), "resume": "auto"})
    assert latest_checkpoint(tmp_path / "part").name == "checkpoint-2"
    with (tmp_path / "part" / "train.jsonl").open("a") as log:  # a step logged after the checkpoint, then a crash
        log.write(json.dumps({"step": 3, "reward/total": 0.0}) + "\n")
    train(resumed)
    resumed_steps = [r["step"] for r in read_log(tmp_path / "part" / "train.jsonl") if r.get("split", "train") == "train"]
    assert resumed_steps == [1, 2, 3, 4]  # step 3 once: the stale record was dropped
    a, b = _weights(result.checkpoint), _weights(tmp_path / "part" / "checkpoint-4")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and training moved the weights
    c = _weights(tmp_path / "full" / "checkpoint-2")
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.slow
def test_lora_run_saves_an_adapter(tmp_path, cold_model):
    cfg = TrainConfig(**SMALL, model=cold_model, steps=1, lora=True, output_dir=str(tmp_path), learning_rate=1e-2)
    result = train(cfg)
    files = sorted(p.name for p in (result.checkpoint / "model").iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapter = load_file(result.checkpoint / "model" / "adapter_model.safetensors")
    assert adapter and all("q_proj" in k or "v_proj" in k for k in adapter)


@pytest.mark.slow
def test_two_processes_agree(tmp_path, cold_model):
    script = tmp_path / "run.py"
    # The loop returns no model: each process dumps the parameters it trained when it checkpoints.
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist
        import saliency_r1.grpo.checkpoint as checkpoint
        from saliency_r1.grpo.config import TrainConfig
        from saliency_r1.grpo.loop import train

        save = checkpoint.save_checkpoint
        def save_and_dump(directory, *, model, **kwargs):
            state = {{n: p.detach().clone() for n, p in model.named_parameters()}}
            torch.save(state, {str(tmp_path)!r} + f"/params-{{kwargs['rank']}}.pt")
            return save(directory, model=model, **kwargs)
        import saliency_r1.grpo.loop as loop
        loop.save_checkpoint = save_and_dump
        cfg = TrainConfig(**{SMALL!r}, model={cold_model!r}, steps=2, save_every=0, use_cpu=True,
                          output_dir={str(tmp_path / "out")!r})
        train(cfg)
        assert dist.get_world_size() == 2
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    p0, p1 = torch.load(tmp_path / "params-0.pt"), torch.load(tmp_path / "params-1.pt")
    assert p0.keys() == p1.keys() and p0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    records = read_log(tmp_path / "out" / "train.jsonl")
    assert [r["step"] for r in records if r.get("split", "train") == "train"] == [1, 2]
    # Each process evaluates one of the two held-out examples; the logged rates cover both.
    evaluations = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in evaluations] == [0, 2] and all(r["eval/samples"] == 2 for r in evaluations)


def test_generation_never_emits_vision_tokens(cold_model, tmp_path):
    """A policy that prefers <|image_pad|> must not sample it: the update's teacher-forced forward
    would try to place image features on it (a crash seen in a 300-step run)."""
    from saliency_r1.adapters import get_adapter
    from saliency_r1.models import load_policy
    from saliency_r1.prompts import SYSTEM_PROMPT, prompt_inputs

    model, processor = load_policy(TrainConfig(model=cold_model))
    pad = model.config.image_token_id
    adapter = get_adapter(model)
    assert pad in adapter.vision_token_ids and len(adapter.vision_token_ids) == 4
    data = SyntheticGroundedVQA(SMALL["train_size"], seed=TrainConfig().data_seed)
    inputs = prompt_inputs(processor, adapter, [data[0], data[1]], SYSTEM_PROMPT)
    with torch.no_grad():  # point the <|image_pad|> row of the head along the last hidden state
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1]
        hidden = model.model.language_model.norm(hidden).mean(0)
        model.lm_head.weight[pad] = 50 * hidden / hidden.square().sum()
        assert model(**inputs).logits[:, -1].argmax(-1).tolist() == [pad, pad]
    model.save_pretrained(tmp_path / "policy")
    processor.save_pretrained(tmp_path / "policy")
    result = train(TrainConfig(**SMALL, model=str(tmp_path / "policy"), steps=1, output_dir=str(tmp_path / "run")))
    assert [r["step"] for r in read_log(result.log_path) if r.get("split", "train") == "train"] == [1]


def test_full_model_weights_stream_into_place(cold_model, monkeypatch):
    """Resuming a full fine-tune copies the saved tensors into the live parameters one by one: no
    second model is built (from_pretrained is not called), and the weights match bit for bit."""
    from saliency_r1.grpo.checkpoint import load_weights
    from saliency_r1.models import load_policy

    trained, _ = load_policy(TrainConfig(model=cold_model))
    fresh, _ = load_policy(TrainConfig(seed=5))  # same architecture, other random weights

    def no_second_copy(*args, **kwargs):
        raise AssertionError("load_weights built a second model")

    monkeypatch.setattr(type(fresh), "from_pretrained", no_second_copy)
    load_weights(fresh, cold_model)
    expected = trained.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_lora_with_bf16_keeps_the_frozen_base_in_bf16(tmp_path, cold_model, monkeypatch):
    import saliency_r1.grpo.loop as loop

    seen = {}
    wrap = loop.with_lora

    def record(model, cfg):
        wrapped = wrap(model, cfg)
        seen.update({name: p.dtype for name, p in wrapped.named_parameters()})
        seen["trainable"] = {name for name, p in wrapped.named_parameters() if p.requires_grad}
        return wrapped

    monkeypatch.setattr(loop, "with_lora", record)
    cfg = TrainConfig(**SMALL, model=cold_model, steps=1, lora=True, bf16="true", output_dir=str(tmp_path),
                      learning_rate=1e-2)
    result = train(cfg)
    trainable = seen.pop("trainable")
    assert trainable and all("lora_" in name for name in trainable)
    assert all(seen[name] == torch.float32 for name in trainable)  # adapters and their AdamW states in fp32
    assert all(dtype == torch.bfloat16 for name, dtype in seen.items() if name not in trainable)
    adapter = load_file(result.checkpoint / "model" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # the step moved B off zero
    from saliency_r1.grpo.checkpoint import load_trained

    monkeypatch.undo()
    loaded, _, _ = load_trained(result.checkpoint)  # evaluation rebuilds the base the adapter trained on
    assert {name: p.dtype for name, p in loaded.named_parameters()} == seen


@pytest.mark.slow
def test_tiny_lora_run_keeps_its_cold_started_base_once(tmp_path, monkeypatch):
    """Resuming and evaluation load the base the adapter trained on instead of running the cold start again."""
    import saliency_r1.grpo.cold_start as cold_start_module
    from saliency_r1.grpo.checkpoint import load_trained

    cfg = TrainConfig(**SMALL, steps=1, lora=True, cold_start_steps=3, output_dir=str(tmp_path), learning_rate=1e-2)
    result = train(cfg)
    from saliency_r1.models import load_policy

    base, processor = load_policy(TrainConfig(model=str(tmp_path / "base-model")))

    def no_cold_start(*args, **kwargs):
        raise AssertionError("the cold start ran again")

    monkeypatch.setattr(cold_start_module, "cold_start", no_cold_start)
    model, _, _ = load_trained(result.checkpoint)
    ids = torch.tensor([[processor.tokenizer.eos_token_id, 5, 6, 7]])
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    adapter = load_file(result.checkpoint / "model" / "adapter_model.safetensors")
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(adapter) and all(torch.equal(lora[k.replace(".weight", ".default.weight")], v)
                                             for k, v in adapter.items())
    resumed = train(TrainConfig(**{**cfg.to_dict(), "steps": 2, "resume": "auto"}))
    assert resumed.checkpoint.name == "checkpoint-2"


@pytest.mark.slow
def test_a_diverging_run_skips_non_finite_steps_and_stops_with_a_clear_message(tmp_path, cold_model):
    """At a learning rate of 1e30 the first step destroys the weights; later steps' losses are NaN. Generation
    must not crash on the NaN logits, those steps are skipped and logged, the run stops saying why, and no
    checkpoint ever holds NaN or inf."""
    cfg = TrainConfig(**SMALL, model=cold_model, steps=8, save_every=1, learning_rate=1e30, warmup_steps=0,
                      output_dir=str(tmp_path), max_non_finite_steps=3)
    with pytest.raises(RuntimeError, match=r"training diverged: 3 steps in a row .* Lower --learning-rate \(1e\+30\)"):
        train(cfg)
    records = [r for r in read_log(tmp_path / "train.jsonl") if r.get("split", "train") == "train"]
    assert [r["skipped_steps"] for r in records][-3:] == [1.0, 1.0, 1.0]
    assert all("loss" in r and "grad_norm" in r for r in records)
    assert records[0]["skipped_steps"] == 0.0 and math.isfinite(records[0]["grad_norm"])
    for path in tmp_path.glob("checkpoint-*"):
        weights = load_file(path / "model" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), path


@pytest.mark.slow
def test_a_collapse_of_the_format_reward_is_a_warning_in_the_log(tmp_path, cold_model, caplog):
    cfg = TrainConfig(**{**SMALL, "num_generations": 4}, model=cold_model, steps=4, learning_rate=1e3,
                      warmup_steps=0, output_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        train(cfg)
    records = [r for r in read_log(tmp_path / "train.jsonl") if r.get("split", "train") == "train"]
    assert records[0]["reward/format"] > 0
    warned = [r for r in records if "warning" in r]
    assert warned and all(r["reward/format"] == 0 for r in warned)
    assert "format reward collapsed to 0" in warned[0]["warning"] and "format reward collapsed" in caplog.text
