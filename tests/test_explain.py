"""From rollouts to maps, end to end, against a brute-force computation written here (docs/method.md section 3).

The brute force shares nothing with the package: eager attention with ``output_attentions=True`` over
each rollout alone (no padding), values from hooks on ``v_proj``, each image token's contribution at
each layer and head pushed through its ``o_proj`` block, the final norm frozen at the scale it had
(from a hook on its input), and the unembedding rows of the answer tokens. Spans are known by
construction (the test builds the completions token by token), not found by ``saliency_r1.spans``.

The tiny model runs in float64 but its RMSNorms compute in float32, so the SDPA run (package) and the
eager run (brute force) can round a hidden state differently by one float32 ulp: the tolerance is a
few float32 ulps of the map's scale, far below any error of a wrong position, head or term.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from saliency_r1.explain import Explanation, explain
from saliency_r1.saliency import (PATHS, _RowTaker, generate_with_saliency, saliency_for_completions,
                                  saliency_for_completions_by_path)
from saliency_r1.tiny import build_tiny_model, build_tiny_processor
from test_adapters import family_model, family_processor

RTOL = 1e-5


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def model64(processor):
    return build_tiny_model(processor, dtype=torch.float64, seed=1)


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _prompts(processor, specs):
    """Left-padded processor inputs; ``specs`` is a list of (number of images, question)."""
    texts, images, seed = [], [], 0
    for count, question in specs:
        content = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        for _ in range(count):
            images.append(_image(56 + 28 * (seed % 3), 84 + 28 * (seed % 2), seed))
            seed += 1
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def _completion(processor, think_words: list[str], answer_words: list[str], tagged: bool):
    """Completion ids built token by token, with the completion indices of its think and answer tokens."""
    tok = processor.tokenizer

    def one(text):
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{text!r} is not one token of the tiny vocabulary"
        return ids[0]

    ids = [one("<think>")]
    think = []
    for word in think_words:
        think.append(len(ids))
        ids.append(one(word))
    ids.append(one("</think>"))
    if tagged:
        ids.append(one("<answer>"))
    answer = []
    for word in answer_words:
        answer.append(len(ids))
        ids.append(one(word))
    if tagged:
        ids.append(one("</answer>"))
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return ids, think, answer


LONG_THINK = ["the", " circle", " is", " on", " the", " left", " so", " it", " is", " red", ",", " then", " look",
              " at", " the", " top", " right", " corner", " and", " the", " square", " is", " blue", "."]


def _rollouts(processor):
    """Three prompts (the first with two images) and completions with an empty, a one-token and a long think."""
    inputs = _prompts(processor, [(2, "what colour is the circle?"), (1, "what?"), (1, "which shape is red?")])
    completions = [_completion(processor, [], [" red"], tagged=True),
                   _completion(processor, [" circle"], [" blue", " square"], tagged=False),
                   _completion(processor, LONG_THINK, [" the", " red", " circle"], tagged=True)]
    return inputs, completions


@torch.no_grad()
def _brute_force(model, processor, inputs, row, completion, think, answer):
    """S(a, i) (cot and direct parts), alpha(t -> i) and alpha(a -> t) summed over l, h, and the direct map
    of each think row for its predicted token, of rollout ``row``, by materialising everything."""
    keep = inputs["attention_mask"][row].bool()
    prompt = inputs["input_ids"][row][keep]
    P = prompt.numel()
    # This row's images are the ones after those of the rows above it, in image_grid_thw's order.
    grid = inputs["image_grid_thw"]
    merge = model.config.vision_config.spatial_merge_size
    tokens_per_image = [int(g.prod()) // merge ** 2 for g in grid]
    before = int((inputs["input_ids"][:row] == model.config.image_token_id).sum())
    first = 0
    while before > 0:
        before -= tokens_per_image[first]
        first += 1
    last, have = first, 0
    while have < int((prompt == model.config.image_token_id).sum()):
        have += tokens_per_image[last]
        last += 1
    pixel_start, pixel_stop = int(grid[:first].prod(-1).sum()), int(grid[:last].prod(-1).sum())
    sequence = torch.cat([prompt, torch.tensor(completion)])[None]
    text = model.model.language_model
    values, residual = {}, {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda m, a, out, l=l: values.__setitem__(l, out.detach())) for l, layer in enumerate(text.layers)]
    hooks.append(text.norm.register_forward_hook(lambda m, a, out: residual.__setitem__("x", a[0].detach())))
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    extra = {}
    if "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][row][keep],
                                                torch.zeros(len(completion), dtype=torch.long)])[None]
    try:
        out = model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                    pixel_values=inputs["pixel_values"][pixel_start:pixel_stop], image_grid_thw=grid[first:last],
                    output_attentions=True, **extra)
    finally:
        model.set_attn_implementation({"text_config": previous})
        for hook in hooks:
            hook.remove()
    cfg = model.config.text_config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = text.layers[0].self_attn.head_dim
    image_pos = (prompt == model.config.image_token_id).nonzero().flatten()
    think_pos = [P + k for k in think]
    x = residual["x"][0]
    rms = torch.sqrt(x.pow(2).mean(-1) + text.norm.variance_epsilon)
    gamma, W_U = text.norm.weight.detach(), model.lm_head.weight.detach()

    def g(position, token):
        return gamma * W_U[token] / rms[position]

    n = image_pos.numel()
    cot = torch.zeros(len(answer), n, dtype=torch.float64)
    direct = torch.zeros(len(answer), n, dtype=torch.float64)
    think_image = torch.zeros(len(think), n, dtype=torch.float64)
    think_logit = torch.zeros(len(think), n, dtype=torch.float64)
    answer_think = torch.zeros(len(answer), len(think), dtype=torch.float64)
    answer_image = torch.zeros(len(answer), n, dtype=torch.float64)
    for l, layer in enumerate(text.layers):
        attn = out.attentions[l][0]  # [H, S, S]
        v = values[l][0].view(-1, Hkv, d)  # [S, Hkv, d]
        W_O = layer.self_attn.o_proj.weight.detach()
        for h in range(H):
            # contribution vector of image token i through head h: W_O[:, h] v_i   -> [n, D]
            contrib = v[image_pos, h // (H // Hkv)] @ W_O[:, h * d:(h + 1) * d].T
            for j, k in enumerate(answer):
                a = P + k - 1
                logit = contrib @ g(a, completion[k])
                rho = sum(attn[h, a, t] * attn[h, t, image_pos] for t in think_pos) if think_pos else 0.0
                cot[j] += rho * logit
                direct[j] += attn[h, a, image_pos] * logit
                answer_image[j] += attn[h, a, image_pos]
                for m, t in enumerate(think_pos):
                    answer_think[j, m] += attn[h, a, t]
            for m, t in enumerate(think_pos):
                think_image[m] += attn[h, t, image_pos]
                think_logit[m] += attn[h, t, image_pos] * (contrib @ g(t, completion[think[m] + 1]))
    sizes = [(int(grid[i][1]) // merge, int(grid[i][2]) // merge) for i in range(first, last)]
    raw_attention = answer_image.sum(0) / (len(answer) * len(text.layers) * H)
    return dict(cot=cot, direct=direct, think_image=think_image, think_logit=think_logit,
                answer_think=answer_think, raw_attention=raw_attention, sizes=sizes)


def _split(values, sizes):
    out, start = [], 0
    for h, w in sizes:
        out.append(values[..., start:start + h * w].reshape(*values.shape[:-1], h, w))
        start += h * w
    return out


def _close(actual, expected, scale):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("family,path", [("qwen2_5_vl", "cot"), ("qwen2_5_vl", "both"), ("qwen2_vl", "both"),
                                         ("qwen3_vl", "both")])
def test_maps_equal_brute_force(family, path):
    processor = family_processor(family)
    model64 = family_model(processor, family, dtype=torch.float64, seed=1)
    inputs, completions = _rollouts(processor)
    result = saliency_for_completions(model64, processor, inputs, [c[0] for c in completions], path=path,
                                      details=True, attention=True)
    assert result.valid.tolist() == [1.0, 1.0, 1.0]
    assert result.valid.device == result.sequences.device  # the loop adds it to rewards on the maps' device
    for row, (ids, think, answer) in enumerate(completions):
        assert result.spans[row].think == think and result.spans[row].answer == answer
        expected = _brute_force(model64, processor, inputs, row, ids, think, answer)
        per_token = expected["cot"] + (expected["direct"] if path == "both" else 0)
        scale = float(per_token.abs().max()) if think or path == "both" else 1.0
        assert result.image_grids[row] == expected["sizes"]
        for got, want in zip(result.answer_token_maps[row], _split(per_token, expected["sizes"])):
            _close(got, want, scale)
        for got, want in zip(result.maps[row], _split(per_token.sum(0), expected["sizes"])):
            _close(got, want, scale)
        for got, want in zip(result.think_token_maps[row], _split(expected["think_image"], expected["sizes"])):
            _close(got, want, 1.0)
        logit_scale = float(expected["think_logit"].abs().max()) if think else 1.0
        for got, want in zip(result.think_token_logit_maps[row], _split(expected["think_logit"], expected["sizes"])):
            _close(got, want, logit_scale)
        _close(result.answer_to_think[row], expected["answer_think"], 1.0)
        for got, want in zip(result.answer_attention_maps[row], _split(expected["raw_attention"], expected["sizes"])):
            _close(got, want, 1.0)
    # the empty think span has no chain-of-thought path: its cot map is exactly zero
    if path == "cot":
        assert all(bool((m == 0).all()) for m in result.maps[0])
    assert len(result.maps[0]) == 2 and len(result.maps[1]) == 1  # one map per image


class _Script(LogitsProcessor):
    """Forces each row to emit its scripted tokens, then padding: generation along given completions."""

    def __init__(self, scripts, prompt_length, pad_id):
        self.scripts, self.prompt_length, self.pad_id = scripts, prompt_length, pad_id

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for b, script in enumerate(self.scripts):
            forced[b, script[step] if step < len(script) else self.pad_id] = 0.0
        return forced


def test_generation_path_equals_teacher_forced(processor, model64):
    inputs, completions = _rollouts(processor)
    scripts = [c[0] for c in completions]
    P = inputs["input_ids"].shape[1]
    tok = processor.tokenizer
    generated = generate_with_saliency(
        model64, processor, inputs, details=True, path="both", do_sample=False,
        max_new_tokens=max(len(s) for s in scripts),
        logits_processor=LogitsProcessorList([_Script(scripts, P, tok.pad_token_id)]))
    forced = saliency_for_completions(model64, processor, inputs, scripts, path="both", details=True)
    assert [c.tolist() for c in generated.completion_ids] == scripts
    assert generated.valid.tolist() == forced.valid.tolist() == [1.0, 1.0, 1.0]
    scale = max(float(m.abs().max()) for per in forced.maps for m in per)
    for name in ("maps", "answer_token_maps", "think_token_maps", "think_token_logit_maps"):
        for got_row, want_row in zip(getattr(generated, name), getattr(forced, name)):
            for got, want in zip(got_row, want_row):
                _close(got, want, scale)
    for got, want in zip(generated.answer_to_think, forced.answer_to_think):
        _close(got, want, 1.0)
    assert set(generated.timings) == {"generate", "saliency"} and set(forced.timings) == {"forward", "saliency"}


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["full-fine-tune", "bf16-lora-base"])
def test_generation_inside_bf16_autocast(processor, weights, monkeypatch):
    """The loop's rollouts on a GPU: generation inside bf16 autocast, every decode row's log-sum-exp
    from the capture's own reduction (the CUDA path), fp32 weights (the rotary embedding then
    promotes q and k to fp32 while v stays bf16) or bf16 ones. The maps must come out, float32,
    and agree with the same completions scored without autocast to bf16 accuracy."""
    import saliency_r1.capture as capture_module

    monkeypatch.setattr(capture_module, "_FLASH_CPU", None)
    model = build_tiny_model(processor, dtype=weights, seed=1)
    inputs, completions = _rollouts(processor)
    scripts = [c[0] for c in completions]
    steer = _Script(scripts, inputs["input_ids"].shape[1], processor.tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generated = generate_with_saliency(model, processor, inputs, do_sample=False,
                                           max_new_tokens=max(len(s) for s in scripts),
                                           logits_processor=LogitsProcessorList([steer]))
    plain = saliency_for_completions(model.float(), processor, inputs, scripts)
    assert generated.valid.tolist() == [1.0, 1.0, 1.0]
    for got_row, want_row in zip(generated.maps, plain.maps):
        for got, want in zip(got_row, want_row):
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            scale = float(want.abs().max())
            assert float((got - want).abs().max()) <= 0.05 * scale


def test_invalid_completion_gives_zero_map_and_validity(processor, model64):
    inputs = _prompts(processor, [(1, "what?"), (1, "what colour?")])
    tok = processor.tokenizer
    good, _, _ = _completion(processor, [" red"], [" red"], tagged=True)
    bad = tok("red circle", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    result = saliency_for_completions(model64, processor, inputs, [bad, good])
    assert result.valid.tolist() == [0.0, 1.0]
    assert result.reward([[0, 0, 1, 1]] * 2, [(60, 60)] * 2).tolist() == [0.0, 1.0]  # invalid: 0, whole image: 1
    assert not result.spans[0].valid and result.spans[0].answer == []
    assert all(bool((m == 0).all()) for m in result.maps[0])
    assert result.answer_token_maps[0][0].shape[0] == 0
    assert float(result.maps[1][0].abs().sum()) > 0


def test_empty_completion_is_an_invalid_rollout(processor, model64):
    inputs = _prompts(processor, [(1, "what?"), (1, "what colour?")])
    good, _, _ = _completion(processor, [" red"], [" red"], tagged=True)
    result = saliency_for_completions(model64, processor, inputs, [[], good])
    assert result.valid.tolist() == [0.0, 1.0]
    assert all(bool((m == 0).all()) for m in result.maps[0])
    assert float(result.maps[1][0].abs().sum()) > 0


def test_num_return_sequences_repeats_prompts(processor):
    model = build_tiny_model(processor, seed=3)
    inputs = _prompts(processor, [(1, "what?"), (2, "which shape?")])
    result = generate_with_saliency(model, processor, inputs, do_sample=True, num_return_sequences=2,
                                    max_new_tokens=5)
    assert result.sequences.shape[0] == 4 and len(result.maps) == 4
    assert [len(m) for m in result.maps] == [1, 1, 2, 2]
    assert result.image_grids[0] == result.image_grids[1] and result.image_grids[2] == result.image_grids[3]
    assert result.texts == processor.tokenizer.batch_decode([c.tolist() for c in result.completion_ids])


def test_bad_arguments_are_named(processor, model64):
    inputs = _prompts(processor, [(1, "what?")])
    with pytest.raises(ValueError, match="path"):
        saliency_for_completions(model64, processor, inputs, [[1, 2]], path="sideways")
    with pytest.raises(ValueError, match="completion_ids has 2 completions for 1 prompts"):
        saliency_for_completions(model64, processor, inputs, [[1], [2]])
    with pytest.raises(ValueError, match="num_beams"):
        generate_with_saliency(model64, processor, inputs, num_beams=2)


class _Steer(LogitsProcessor):
    """Forces every row along ``script``, one token per call (the prompt length need not be known)."""

    def __init__(self, script):
        self.script, self.step = script, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[min(self.step, len(self.script) - 1)]] = 0.0
        self.step += 1
        return forced


def test_explain_with_boxes_and_pictures(processor, tmp_path):
    from saliency_r1.rewards import saliency_in_box
    from saliency_r1.viz import plot_explanation, plot_rollout_maps, save_png, upsample_map

    model = build_tiny_model(processor, seed=0)
    script, think, answer = _completion(processor, LONG_THINK[:8], [" red", " circle"], tagged=True)
    image = _image(150, 210, 9)
    box = "[0.1,0.2,0.5,0.9]"
    result = explain(model, processor, image, "what colour is the circle?", boxes=box,
                     logits_processor=LogitsProcessorList([_Steer(script)]))
    assert result.valid and result.rollout.completion_ids[0].tolist() == script
    assert result.think_tokens == LONG_THINK[:8] and result.answer_tokens == [" red", " circle"]
    # the reward is measured on the original image, not the processor's resized one
    want = float(saliency_in_box([result.maps[0]], [box], [(150, 210)])[0])
    assert result.reward == pytest.approx(want) and 0.0 <= result.reward <= 1.0
    assert result.rollout.reward([box], [(150, 210)]).tolist() == pytest.approx([want])
    assert result.rollout.answer_to_think[0].shape == (2, 8)
    assert [m.shape[0] for m in result.rollout.think_token_maps[0]] == [8]

    heat = upsample_map(result.maps[0], 150, 210)
    h, w = result.maps[0].shape
    row, col = divmod(int(result.maps[0].argmax()), w)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert (int(y * h / 150), int(x * w / 210)) == (row, col)  # the brightest pixel lies in the brightest cell

    for name, figure in (("explanation.png", plot_explanation(result, boxes=box)),
                         ("rollout.png", plot_rollout_maps(result.rollout, 0, [image], boxes=box))):
        path = tmp_path / name
        save_png(figure, path)
        picture = np.asarray(Image.open(path))
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 200
        assert picture[..., :3].std() > 10  # something was drawn


def test_explain_returns_completion_spans_and_maps(processor):
    model = build_tiny_model(processor, seed=0)
    image = _image(120, 90, 7)
    result = explain(model, processor, image, "what colour is the circle?", max_new_tokens=6)
    assert isinstance(result, Explanation)
    assert result.image_sizes == [(120, 90)]
    assert result.text == processor.tokenizer.decode(result.rollout.completion_ids[0])
    assert len(result.maps) == 1 and result.maps[0].shape == result.rollout.image_grids[0][0]
    assert result.valid == bool(result.rollout.valid[0])
    assert bool((result.display_maps[0] >= 0).all())
    assert result.reward is None


@pytest.mark.parametrize("shape", [(3, 5, 42), (2, 6, 123, 7), (1, 1, 6, 1)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_row_taker_equals_gather(shape, contiguous):
    """``x[b, :, index[b, j]]`` through one flat index_select, for every layer's shape, equals ``gather``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if not contiguous:  # e.g. queries laid out [B, R, H, d] and transposed
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    index = torch.randint(0, shape[2], (shape[0], 9), generator=gen)
    take = _RowTaker(index)
    expand = index[:, None, :, None].expand(-1, shape[1], -1, *shape[3:]) if x.dim() == 4 else \
        index[:, None, :].expand(-1, shape[1], -1)
    for _ in range(2):  # the second call reuses the flat index built by the first
        assert torch.equal(take(x), x.gather(2, expand))


def test_every_path_from_one_forward_equals_each_path_alone(processor, model64):
    """The faithfulness evaluation's one teacher-forced capture gives each path's maps exactly as a forward of
    its own does, and one raw-attention map shared by all."""
    inputs, completions = _rollouts(processor)
    ids = [c[0] for c in completions]
    together = saliency_for_completions_by_path(model64, processor, inputs, ids, paths=PATHS, attention=True)
    assert list(together) == list(PATHS)
    alone_attention = saliency_for_completions(model64, processor, inputs, ids, attention=True).answer_attention_maps
    for path in PATHS:
        alone = saliency_for_completions(model64, processor, inputs, ids, path=path)
        assert alone.answer_attention_maps is None
        for got_maps, want_maps in zip(together[path].maps, alone.maps):
            for got, want in zip(got_maps, want_maps):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        for got_maps, want_maps in zip(together[path].answer_attention_maps, alone_attention):
            for got, want in zip(got_maps, want_maps):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one saliency path"):
        saliency_for_completions_by_path(model64, processor, inputs, ids, paths=())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_fused_forward_equals_the_other_paths(family):
    """One teacher-forced forward without a cache, each layer's part computed inside its attention call, gives
    the maps the cached forward and the generation path give, for every path, with the details and the raw
    attention; and the completion's log-probs of the trainer's own pass. Float64, padded batch, two images."""
    from saliency_r1.logps import completion_logps, pad_completions
    from saliency_r1.saliency import saliency_fused_forward

    processor = family_processor(family)
    model64 = family_model(processor, family, dtype=torch.float64, seed=1)
    inputs, completions = _rollouts(processor)
    ids = [c[0] for c in completions]
    for path in PATHS:
        cached = saliency_for_completions(model64, processor, inputs, ids, path=path, details=True, attention=True)
        fused = saliency_fused_forward(model64, processor, inputs, ids, path=path, details=True, attention=True)
        assert fused.valid.tolist() == cached.valid.tolist() == [1.0, 1.0, 1.0]
        assert fused.texts == cached.texts and fused.image_grids == cached.image_grids
        for name in ("maps", "answer_token_maps", "think_token_maps", "think_token_logit_maps", "answer_attention_maps"):
            for got_maps, want_maps in zip(getattr(fused, name), getattr(cached, name)):
                for got, want in zip(got_maps, want_maps):
                    _close(got, want, max(float(want.abs().max()), 1e-12) if want.numel() else 1.0)
        for got, want in zip(fused.answer_to_think, cached.answer_to_think):
            _close(got, want, 1.0)
    body, mask = pad_completions([torch.as_tensor(c) for c in ids], processor.tokenizer.pad_token_id, "cpu")
    expected = completion_logps(model64, dict(inputs), body, mask, temperature=0.7)
    fused = saliency_fused_forward(model64, processor, inputs, ids, temperature=0.7)
    torch.testing.assert_close(fused.completion_logps * mask, expected * mask)


def test_fused_forward_keeps_nothing_and_refuses_what_it_cannot_place(processor, model64, monkeypatch):
    from saliency_r1.capture import SaliencyCapture
    from saliency_r1.saliency import saliency_fused_forward

    inputs, completions = _rollouts(processor)
    ids = [c[0] for c in completions]
    kept = []
    real = SaliencyCapture.record_attention

    def spying(self, *args, **kwargs):
        real(self, *args, **kwargs)
        kept.append(sum(len(chunks) for chunks in self._queries) + sum(len(parts) for parts in self._lse))

    monkeypatch.setattr(SaliencyCapture, "record_attention", spying)
    result = saliency_fused_forward(model64, processor, inputs, ids)
    assert kept and set(kept) == {0}  # each layer's rows are consumed inside the call, none outlive it
    assert result.valid.tolist() == [1.0, 1.0, 1.0]
    # A sampler that went on past the end of turn: trim=False scores every token, the maps stop at the end.
    tail = processor.tokenizer.encode(" red dark", add_special_tokens=False)
    sampled = [torch.as_tensor(c).tolist() + tail for c in ids]
    whole = saliency_fused_forward(model64, processor, inputs, sampled, trim=False)
    assert whole.valid.tolist() == [1.0, 1.0, 1.0]
    assert whole.completion_logps.shape[1] == max(len(c) for c in sampled)
    assert result.completion_logps.shape[1] == max(len(torch.as_tensor(c)) for c in ids)
    for b, c in enumerate(ids):
        n = len(torch.as_tensor(c))
        torch.testing.assert_close(whole.completion_logps[b, :n], result.completion_logps[b, :n])
        assert torch.isfinite(whole.completion_logps[b, n:n + len(tail)]).all()
        for got, want in zip(whole.maps[b], result.maps[b]):
            torch.testing.assert_close(got, want)
    right_padded = {**inputs, "attention_mask": inputs["attention_mask"].flip(-1)}
    with pytest.raises(ValueError, match="left-padded"):
        saliency_fused_forward(model64, processor, right_padded, ids)
    with pytest.raises(ValueError, match="2 completions for 3 prompts"):
        saliency_fused_forward(model64, processor, inputs, ids[:2])
    with pytest.raises(ValueError, match="path must be one of"):
        saliency_fused_forward(model64, processor, inputs, ids, path="sideways")
