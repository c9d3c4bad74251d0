"""The capture attention: same output as SDPA, and what it records equals eager attention's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_r1.adapters import get_adapter
import saliency_r1.capture as capture_module
from saliency_r1.capture import (CAPTURE_ATTENTION, SaliencyCapture, _decode_attention_with_lse, _row_lse,
                                 capture_saliency, register_capture_attention, saliency_capture_attention,
                                 text_attention)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from saliency_r1.tiny import build_tiny_model, build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def _inputs(processor, sizes=((70, 100), (60, 60)), questions=("what colour is the circle?", "what?")):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in sizes]
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def _cache_kv(output, layer):
    cache = output.get("cache") or output.get("past_key_values")
    return cache.layers[layer].keys, cache.layers[layer].values


def test_greedy_tokens_identical_with_and_without_capture(processor):
    model = build_tiny_model(processor, seed=2)
    inputs = _inputs(processor)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch must exercise left padding"
    plain = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    P = inputs["input_ids"].shape[1]
    with capture_saliency(model, first_row=P - 1) as capture:
        captured = model.generate(**inputs, do_sample=False, max_new_tokens=24)
    assert torch.equal(plain, captured)
    rows = capture.result()
    assert rows.num_rows == captured.shape[1] - P  # the prefill's last row, then one per decode step


def test_recorded_rows_equal_eager_attention_rows(processor):
    """alpha = exp(s q . k - lse) from the recorded rows and the cache's keys equals eager attention's
    probabilities of the rows that predicted each completion token, padding included."""
    model = build_tiny_model(processor, seed=4, dtype=torch.float64)
    inputs = _inputs(processor)
    P = inputs["input_ids"].shape[1]
    with capture_saliency(model, first_row=P - 1) as capture:
        output = model.generate(**inputs, do_sample=False, max_new_tokens=7, return_dict_in_generate=True)
    rows = capture.result()
    sequences = output.sequences
    C = sequences.shape[1] - P
    assert rows.num_rows == C
    adapter = get_adapter(model)
    # Eager attention on each rollout alone (no padding): row P_b - 1 + r of rollout b.
    for b in range(sequences.shape[0]):
        keep = torch.cat([inputs["attention_mask"][b].bool(), torch.ones(C, dtype=torch.bool)])
        alone = sequences[b][keep][None]
        pad = int((~keep).sum())
        extra = {}
        if "mm_token_type_ids" in inputs:
            extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"][b], torch.zeros(C, dtype=torch.long)])[keep][None]
        grid = inputs["image_grid_thw"]
        start = int(grid[:b].prod(-1).sum())
        residual = {}
        hook = adapter.final_norm.register_forward_hook(lambda m, a, o: residual.__setitem__("x", a[0]))
        with text_attention(model, "eager"):
            eager = model(input_ids=alone, attention_mask=torch.ones_like(alone), output_attentions=True,
                          pixel_values=inputs["pixel_values"][start:start + int(grid[b].prod())],
                          image_grid_thw=grid[b:b + 1], **extra)
        hook.remove()
        x = residual["x"][0, P - pad - 1:P - pad - 1 + C]
        torch.testing.assert_close(rows.rms[b], torch.sqrt(x.pow(2).mean(-1) + adapter.norm_eps), rtol=1e-6, atol=0)
        for layer in range(adapter.num_layers):
            keys, _ = _cache_kv(output, layer)
            k = keys[b, :, pad:].repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=0)
            alpha = torch.exp(rows.queries[layer][b] @ k.transpose(-1, -2) * adapter.scale
                              - rows.lse[layer][b][..., None])  # [H, C, S - pad]
            causal = torch.arange(k.shape[1])[None, :] <= torch.arange(P - pad - 1, P - pad - 1 + C)[:, None]
            want = eager.attentions[layer][0, :, P - pad - 1:P - pad - 1 + C, :k.shape[1]]
            torch.testing.assert_close(alpha * causal, want, rtol=1e-6, atol=1e-9)


def test_teacher_forced_rows_equal_generation_rows(processor):
    model = build_tiny_model(processor, seed=5, dtype=torch.float64)
    inputs = _inputs(processor)
    P = inputs["input_ids"].shape[1]
    with capture_saliency(model, first_row=P - 1) as generated:
        sequences = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    C = sequences.shape[1] - P
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, C, dtype=torch.long)], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros(2, C, dtype=torch.long)], 1)
    with capture_saliency(model, first_row=P - 1, num_rows=C) as forced:
        model(input_ids=sequences, attention_mask=mask, use_cache=True, **extra)
    a, b = generated.result(), forced.result()
    assert a.num_rows == b.num_rows == C
    torch.testing.assert_close(a.rms, b.rms, rtol=1e-6, atol=0)
    for layer in range(len(a.queries)):
        torch.testing.assert_close(a.queries[layer], b.queries[layer], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(a.lse[layer], b.lse[layer], rtol=1e-6, atol=1e-9)


def test_memory_grows_with_completion_not_sequence(processor):
    """What is held is L x H x C x d queries (+ L x H x C LSEs, C RMS), whatever the prompt length."""
    model = build_tiny_model(processor, seed=2)
    adapter = get_adapter(model)
    held = []
    for sizes in (((56, 56), (56, 56)), ((224, 224), (196, 224))):
        inputs = _inputs(processor, sizes=sizes)
        P = inputs["input_ids"].shape[1]
        with capture_saliency(model, first_row=P - 1) as capture:
            model.generate(**inputs, do_sample=False, min_new_tokens=9, max_new_tokens=9)
        rows = capture.result()
        B, H, L, d = 2, adapter.num_heads, adapter.num_layers, adapter.head_dim
        assert [tuple(q.shape) for q in rows.queries] == [(B, H, 9, d)] * L
        assert rows.nbytes() == L * B * H * 9 * (d + 1) * 4 + B * 9 * 4
        held.append((P, rows.nbytes()))
    assert held[0][0] < held[1][0] and held[0][1] == held[1][1]


def test_attention_implementation_is_scoped_to_text_and_restored(processor):
    model = build_tiny_model(processor)
    text, vision = model.config.text_config, model.config.vision_config
    before = (text._attn_implementation, vision._attn_implementation)
    with capture_saliency(model, first_row=0):
        assert text._attn_implementation == CAPTURE_ATTENTION
        assert vision._attn_implementation == before[1]
    assert (text._attn_implementation, vision._attn_implementation) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture_saliency(model, first_row=0):
            raise RuntimeError("boom")
    assert (text._attn_implementation, vision._attn_implementation) == before


def test_selectable_at_load_and_identical_to_sdpa_without_capture(processor):
    register_capture_attention()
    inputs = _inputs(processor)
    sdpa = build_tiny_model(processor, seed=6)
    loaded = build_tiny_model(processor, seed=6,
                              attn_implementation={"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa"})
    assert loaded.config.text_config._attn_implementation == CAPTURE_ATTENTION
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, sdpa(**inputs).logits, rtol=0, atol=0)


def test_vision_attention_is_not_recorded(processor):
    """Even with the capture selected for the vision tower too, only language layers are recorded."""
    inputs = _inputs(processor)
    model = build_tiny_model(processor, seed=6)
    reference = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    register_capture_attention()
    model.set_attn_implementation(CAPTURE_ATTENTION)
    P = inputs["input_ids"].shape[1]
    with capture_saliency(model, first_row=P - 1) as capture:
        tokens = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert torch.equal(tokens, reference)
    assert len(capture.result().queries) == get_adapter(model).num_layers


def test_capture_rides_along_as_keyword():
    """The attention function records for a capture passed as the ``saliency_capture`` keyword."""
    processor = build_tiny_processor()
    model = build_tiny_model(processor)
    adapter = get_adapter(model)
    capture = SaliencyCapture(adapter, first_row=3)
    module = adapter.attention_modules[1]
    q = torch.randn(1, adapter.num_heads, 5, adapter.head_dim)
    k = torch.randn(1, adapter.num_kv_heads, 5, adapter.head_dim)
    out, _ = saliency_capture_attention(module, q, k, k, None, scaling=adapter.scale, saliency_capture=capture)
    assert out.shape == (1, 5, adapter.num_heads, adapter.head_dim)
    assert capture._queries[1][0].shape == (1, adapter.num_heads, 2, adapter.head_dim)  # rows 3 and 4
    assert not capture._queries[0]


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive"])
@pytest.mark.parametrize("q_len", [1, 7])
def test_row_lse_matches_logsumexp(mask_kind, q_len):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, d, kv = 2, 6, 3, 8, 11
    q = torch.randn(B, H, q_len, d, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, kv, d, generator=gen, dtype=torch.float64)
    offset = kv - q_len
    allowed = torch.arange(kv)[None, :] <= (offset + torch.arange(q_len))[:, None]  # [q, kv]
    allowed = allowed[None, None].expand(B, 1, q_len, kv).clone()
    allowed[1, :, :, :3] = False  # left padding of the second rollout
    mask = None
    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(B, 1, q_len, kv, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    else:
        allowed[1, :, :, :3] = True
    scores = (q @ k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)) * 0.3
    want = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    first = q_len // 2
    rows = None if mask is None else mask[:, :, first:]
    got = _row_lse(q[:, :, first:], k, rows, 0.3, offset + torch.arange(first, q_len))
    torch.testing.assert_close(got, want[:, :, first:], rtol=1e-12, atol=1e-12)


def test_nothing_recorded_is_an_error():
    processor = build_tiny_processor()
    capture = SaliencyCapture(get_adapter(build_tiny_model(processor)), first_row=0)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        capture.result()
    with pytest.raises(ValueError, match="first_row"):
        SaliencyCapture(capture.adapter, first_row=-1)


def test_sliding_window_rows_are_reduced_at_once():
    """A decode row of a sliding-window layer has its LSE computed in the call (its mask is no prefix of
    later ones); a full-attention decode row is deferred to result(), with the same value."""
    processor = build_tiny_processor()
    adapter = get_adapter(build_tiny_model(processor))
    module = adapter.attention_modules[0]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, adapter.num_heads, 1, adapter.head_dim, generator=gen)
    k = torch.randn(2, adapter.num_kv_heads, 6, adapter.head_dim, generator=gen)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., :2] = False
    window = SaliencyCapture(adapter, first_row=5, num_rows=1)
    deferred = SaliencyCapture(adapter, first_row=5, num_rows=1)
    for capture, sliding in ((window, 4), (deferred, None)):
        capture._seen[0] = 5  # this call's row sits at position 5
        capture.record_attention(module, q, k, mask, adapter.scale, sliding)
    assert window._lse[0][0] is not None and deferred._lse[0][0] is None
    scores = q @ k.repeat_interleave(adapter.num_heads // adapter.num_kv_heads, dim=1).transpose(-1, -2)
    want = torch.logsumexp((scores * adapter.scale).masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(window._lse[0][0], want)
    deferred._rms.append(torch.ones(2, 1))
    for layer in range(1, adapter.num_layers):  # result() stacks every layer: give the others one row too
        deferred._queries[layer].append(q)
        deferred._lse[layer].append(want)
    torch.testing.assert_close(deferred.result().lse[0], want)


class _Attention(torch.nn.Module):
    """What ``sdpa_attention_forward`` reads from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
@pytest.mark.parametrize("heads,kv_heads", [(6, 3), (4, 4)])
def test_decode_kernel_output_is_sdpa_and_lse_is_logsumexp(dtype, mask_kind, heads, kv_heads):
    """One decode row through the CPU kernel directly: the output is sdpa_attention_forward's bit for bit,
    and the LSE it hands over is the row's log-sum-exp."""
    gen = torch.Generator().manual_seed(0)
    B, d, kv = 3, 16, 37
    query = torch.randn(B, 1, heads, d, generator=gen).to(dtype).transpose(1, 2)  # as transformers lays it out
    key = torch.randn(B, kv_heads, kv, d, generator=gen).to(dtype)
    value = torch.randn(B, kv_heads, kv, d, generator=gen).to(dtype)
    allowed = torch.ones(B, heads if mask_kind == "per_head" else 1, 1, kv, dtype=torch.bool)
    allowed[1, ..., :5] = False  # left padding
    allowed[2, ..., 7] = False
    mask = {"none": None, "bool": allowed, "per_head": allowed,
            "additive": torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)}[mask_kind]
    kwargs = dict(dropout=0.0, scaling=0.3, sliding_window=None)
    fused = _decode_attention_with_lse(query, key, value, mask, kwargs)
    if capture_module._FLASH_CPU is None:
        assert fused is None
        return
    output, lse = fused
    want, _ = sdpa_attention_forward(_Attention(heads // kv_heads), query, key, value, mask, **kwargs)
    assert torch.equal(output, want)
    scores = query.double() @ key.double().repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2) * 0.3
    if mask_kind != "none":
        scores = scores.masked_fill(~allowed, float("-inf"))
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=tol, atol=tol)


def test_decode_kernel_declines_what_sdpa_would_not_run_there():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    assert _decode_attention_with_lse(q, k, k, None, dict(dropout=0.1, scaling=0.3)) is None
    assert _decode_attention_with_lse(q, k, k, None, dict(softcap=30.0, scaling=0.3)) is None
    assert _decode_attention_with_lse(q, k, k[..., :4], None, dict(scaling=0.3)) is None  # SDPA: math kernel


def test_generation_takes_decode_lse_from_the_kernel_or_defers_it_alike(processor, monkeypatch):
    """On CPU every decode row's LSE comes from the attention kernel (nothing left for result() to
    reduce); without the kernel they are deferred and reduced after generation, to the same values."""
    model = build_tiny_model(processor, seed=3, dtype=torch.float64)
    inputs = _inputs(processor)
    P = inputs["input_ids"].shape[1]

    def run():
        with capture_saliency(model, first_row=P - 1) as capture:
            tokens = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        deferred = sum(lse is None for per_layer in capture._lse for lse in per_layer)
        return tokens, deferred, capture.result()

    tokens, deferred, fused = run()
    assert deferred == (0 if capture_module._FLASH_CPU is not None else 7 * len(fused.lse))
    monkeypatch.setattr(capture_module, "_FLASH_CPU", None)
    tokens_without, deferred_without, reduced = run()
    assert torch.equal(tokens, tokens_without)
    assert deferred_without == 7 * len(reduced.lse)  # 8 rows: the prefill's last, then 7 decode steps
    for layer in range(len(fused.lse)):
        assert torch.equal(fused.queries[layer], reduced.queries[layer])
        torch.testing.assert_close(fused.lse[layer], reduced.lse[layer], rtol=1e-12, atol=1e-12)
