"""The saliency engine's contract with the device and with bad numbers: one read from the device for
the saliency and reward of a step, and a rollout whose saliency inputs are not finite is an invalid
rollout (zero map, reward 0, counted), never a NaN reward."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from saliency_r1.adapters import get_adapter
from saliency_r1.capture import capture_saliency
from saliency_r1.data.synthetic import SyntheticGroundedVQA
from saliency_r1.grpo.scores import score_rollouts
from saliency_r1.prompts import SYSTEM_PROMPT, prompt_inputs
from saliency_r1.saliency import saliency_for_completions, saliency_from_capture
from saliency_r1.tiny import build_tiny_model, build_tiny_processor

# Tensor methods and functions that make the host wait for the device when the tensor lives there.
READS = {"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__", "nonzero", "unique",
         "masked_select", "argwhere", "__array__"}


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on a GPU: results computed from it are on the device too, and every
    call that would read one back to the host is recorded (``.cpu()`` hands back a host tensor)."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in READS:
            cls.reads.append(name)
        if func is torch.ops.saliency.reward.default or func is torch.ops.saliency.reward:
            arguments = list(args) + list((kwargs or {}).values())
            if len(arguments) < 7 or arguments[6]:  # check=True: the CUDA kernel reads its status back
                cls.reads.append("reward(check=True)")
        result = super().__torch_function__(func, types, args, kwargs)
        if name in ("cpu", "numpy"):
            return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, cls) else t, result)
        return result


def _on_device(x):
    return x.as_subclass(OnDevice) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x


class ToDeviceMakesOnDevice(TorchFunctionMode):
    """Host data sent to the device (``.to(device)``, a factory with ``device=``) is on the device from then on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        to_device = func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in args[1:])
        if to_device or "device" in kwargs:
            return tree_map(_on_device, result)
        return result


@pytest.fixture(scope="module")
def tiny():
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=3)
    data = SyntheticGroundedVQA(4, seed=2)
    return model, processor, [data[i] for i in range(2)]


def _completions(processor, count: int) -> list[torch.Tensor]:
    tokenizer = processor.tokenizer
    texts = ["<think>red dark</think><answer>dark</answer>", "<think>blue</think><answer>light</answer>",
             "<think></think><answer>dark</answer>", "no structure at all"]
    return [torch.tensor(tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"]
                         + [tokenizer.eos_token_id]) for i in range(count)]


def test_the_saliency_and_reward_of_a_step_read_the_device_once(tiny):
    """On a GPU every read from the device stalls the stream: the step's saliency (the capture's result,
    spans, projections, every layer's op) and its rewards wait for the device once, for the token ids."""
    model, processor, examples = tiny
    adapter = get_adapter(model)
    repeated = [e for e in examples for _ in range(2)]
    inputs = prompt_inputs(processor, adapter, examples, SYSTEM_PROMPT, repeat=2)
    with torch.no_grad(), capture_saliency(model, first_row=inputs["input_ids"].shape[1] - 1, adapter=adapter) as capture:
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                                suppress_tokens=adapter.vision_token_ids)

    OnDevice.reads = []
    with ToDeviceMakesOnDevice():
        rollout, scores = _saliency_and_scores(model, processor, capture, output, inputs, adapter, repeated)
    assert OnDevice.reads == ["cpu"], OnDevice.reads
    assert isinstance(scores["saliency"], OnDevice) and isinstance(rollout.maps[0][0], OnDevice)
    assert torch.isfinite(scores["saliency"]).all()


def _saliency_and_scores(model, processor, capture, output, inputs, adapter, examples):
    P = inputs["input_ids"].shape[1]
    captured = capture.result()
    captured.queries, captured.lse = [_on_device(q) for q in captured.queries], [_on_device(x) for x in captured.lse]
    captured.rms = _on_device(captured.rms)
    cache = adapter.output_cache(output)
    for layer in cache.layers:
        layer.keys, layer.values = _on_device(layer.keys), _on_device(layer.values)
    rollout = saliency_from_capture(model, processor, captured, cache, _on_device(output.sequences), P,
                                    _on_device(inputs["input_ids"]), _on_device(inputs["image_grid_thw"]),
                                    adapter=adapter, path="both", details=True)
    return rollout, score_rollouts(rollout, examples, [])


@pytest.mark.parametrize("where", ["query", "lse", "rms", "keys", "values"])
def test_a_non_finite_saliency_input_makes_only_its_rollout_invalid(tiny, where, monkeypatch):
    model, processor, examples = tiny
    adapter = get_adapter(model)
    inputs = prompt_inputs(processor, adapter, examples, SYSTEM_PROMPT)
    completions = _completions(processor, 2)
    clean = saliency_for_completions(model, processor, inputs, completions)
    assert clean.valid.tolist() == [1.0, 1.0] and not clean.non_finite.any()

    import saliency_r1.saliency as engine

    original = engine.saliency_from_capture

    def poisoned(model, processor, captured, cache, *args, **kwargs):
        layer = adapter.num_layers - 1
        if where == "query":
            captured.queries[layer][0, 0, :] = float("nan")
        elif where == "lse":
            captured.lse[layer][0, :, :] = float("inf")
        elif where == "rms":
            captured.rms[0, :] = float("nan")
        else:
            keys, values = adapter.layer_kv(cache, layer)
            (keys if where == "keys" else values)[0] = float("nan")
        return original(model, processor, captured, cache, *args, **kwargs)

    monkeypatch.setattr(engine, "saliency_from_capture", poisoned)
    rollout = saliency_for_completions(model, processor, inputs, completions)
    assert rollout.valid.tolist() == [0.0, 1.0] and rollout.non_finite.tolist() == [True, False]
    assert not rollout.maps[0][0].any() and torch.isfinite(rollout.maps[0][0]).all()
    torch.testing.assert_close(rollout.maps[1][0], clean.maps[1][0])
    scores = score_rollouts(rollout, examples, [])
    assert scores["saliency"][0] == 0.0 and torch.isfinite(scores["saliency"]).all()
    assert scores["format"].tolist() == [1.0, 1.0]  # still well formed: its format is not the saliency's fault
