"""The saliency engine: from rollouts to saliency maps.

Three entry points:

- :func:`saliency_from_capture`: given what a :func:`~saliency_r1.capture.capture_saliency` block recorded
  and the cache the model returned, the maps of every rollout (for a caller that runs its own forward);
- :func:`generate_with_saliency`: capture during ``generate``;
- :func:`saliency_for_completions`: one teacher-forced forward over completions generated elsewhere
  (vLLM, a file);
- :func:`saliency_fused_forward`: the same forward with each layer's part computed inside its attention
  call and nothing kept, no cache; it returns the completion's log-probs too (an old-policy pass).

The last two return a :class:`RolloutSaliency`. The maps are ``S(i)`` of ``docs/method.md`` section 3:
summed over layers (one batched ``layer_saliency`` call per layer for all rollouts), heads and answer
positions, raw (``relu`` is for display and is applied by the reward op itself), one ``[h', w']`` map
per image on the processor's resized grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from saliency_r1.adapters import ModelAdapter, get_adapter
from saliency_r1.capture import CapturedRows, capture_saliency
from saliency_r1.kernels.checks import PATHS
from saliency_r1.logps import pad_completions
from saliency_r1.ops import layer_saliency
from saliency_r1.projection import answer_logit_directions, project_answer_vectors
from saliency_r1.spans import Spans, end_of_turn_ids, find_spans, trim_completion


__all__ = ["PATHS", "RolloutSaliency", "generate_with_saliency", "saliency_for_completions",
           "saliency_for_completions_by_path", "saliency_from_capture", "saliency_fused_forward"]


@dataclass
class RolloutSaliency:
    """Saliency of a batch of rollouts (``B`` of them; ``P`` prompt positions, ``C`` completion positions).

    Maps are float32 (float64 for a float64 model) on each image's merged grid ``(h', w')``.

    Attributes:
        sequences: ``[B, P + C]`` prompt (left-padded) then completion (right-padded).
        prompt_length: ``P``.
        completion_ids: per rollout, its completion up to and including the end-of-turn token, no padding.
        texts: decoded completions, special tokens kept (``<think>`` etc.).
        valid: float32 ``[B]`` on the sequences' device, 1.0 where the think/answer structure is well formed and
            the saliency's inputs and sum are finite.
        maps: per rollout, per image: the raw answer map ``S`` as ``[h', w']`` (zeros if invalid).
        spans: per rollout, its :class:`~saliency_r1.spans.Spans` (completion-token indices).
        image_grids: per rollout, each image's ``(h', w')``.
        answer_token_maps: per rollout, per image: ``[A_b, h', w']``, ``S(a, i)`` of each answer token
            (``maps`` is their sum over ``a``).
        think_token_maps: with ``details``: per rollout, per image, ``[T_b, h', w']``: attention of each
            think token's row on the image, ``sum over l, h of alpha(t -> i)``; else ``None``.
        think_token_logit_maps: with ``details``: per rollout, per image, ``[T_b, h', w']``: the
            logit-decomposed direct map of each think row for the token it predicted (the next
            completion token); else ``None``.
        answer_to_think: with ``details``: per rollout, ``[A_b, T_b]``, ``sum over l, h of alpha(a -> t)``:
            which reasoning tokens each answer token read; else ``None``.
        answer_attention_maps: with ``attention``: per rollout, per image, ``[h', w']``: the answer rows'
            attention on the image averaged over layers, heads and answer tokens (the raw-attention map
            that faithfulness compares against, ``docs/method.md`` section 8); else ``None``.
        completion_logps: from :func:`saliency_fused_forward`: ``[B, C]`` float32 log-probs of the (right-padded)
            completion tokens at the given temperature, from the same forward; else ``None``.
        path: the op path used (``"cot"``, ``"direct"`` or ``"both"``).
        non_finite: bool ``[B]`` on the maps' device: the rollouts made invalid by a NaN or inf among what the
            saliency read (queries, log-sum-exps, keys, values, the final norm's RMS) or in its sum.
        timings: seconds: ``"generate"`` or ``"forward"`` (the model run with capture) and ``"saliency"``.
        captured_bytes: bytes the capture held (queries, LSEs, RMS).
    """

    sequences: torch.LongTensor
    prompt_length: int
    completion_ids: list[torch.Tensor]
    texts: list[str]
    valid: torch.Tensor
    maps: list[list[torch.Tensor]]
    spans: list[Spans]
    image_grids: list[list[tuple[int, int]]]
    answer_token_maps: list[list[torch.Tensor]]
    think_token_maps: list[list[torch.Tensor]] | None = None
    think_token_logit_maps: list[list[torch.Tensor]] | None = None
    answer_to_think: list[torch.Tensor] | None = None
    answer_attention_maps: list[list[torch.Tensor]] | None = None
    completion_logps: torch.Tensor | None = None
    non_finite: torch.Tensor | None = None
    path: str = "cot"
    timings: dict[str, float] = field(default_factory=dict)
    captured_bytes: int = 0

    def reward(self, boxes: Sequence, image_sizes: Sequence) -> torch.Tensor:
        """The saliency reward of every rollout (``docs/method.md`` section 4) on its first image's map, times
        ``valid``.

        Args:
            boxes: per rollout, its normalised box(es) (any form ``saliency_r1.boxes.parse_boxes`` takes).
            image_sizes: per rollout, the ORIGINAL image's ``(H, W)`` in pixels (the map is stretched over it).

        Returns:
            float32 ``[B]``.
        """
        from saliency_r1.rewards import saliency_in_box

        if any(not per_image for per_image in self.maps):
            raise ValueError("a rollout has no image map: the saliency reward needs an image in every prompt")
        return saliency_in_box([per_image[0] for per_image in self.maps], boxes, image_sizes, valid=self.valid)



# ---------------------------------------------------------------------------------------- helpers


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _split_images(adapter: ModelAdapter, prompt_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                  batch: int) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
    """Per rollout: its image-token positions and each image's grid. ``prompt_ids`` is ``[B_in, P]``; rows
    of a batch of ``batch = B_in * n`` rollouts (``num_return_sequences = n``) repeat each prompt ``n`` times."""
    positions = adapter.image_positions(prompt_ids)
    grids = adapter.image_grids(image_grid_thw) if image_grid_thw is not None else []
    per_prompt, next_grid = [], 0
    for row, pos in enumerate(positions):
        row_grids, count = [], 0
        while count < pos.numel():
            if next_grid >= len(grids):
                raise ValueError(f"prompt {row} has {pos.numel()} image tokens but image_grid_thw runs out of "
                                 "images: pass the image_grid_thw the processor returned with these input_ids")
            h, w = grids[next_grid]
            row_grids.append((h, w))
            count += h * w
            next_grid += 1
        if count != pos.numel():
            raise ValueError(f"prompt {row} has {pos.numel()} image tokens, which image_grid_thw does not split "
                             "into whole images")
        per_prompt.append(row_grids)
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {next_grid}")
    if batch % len(positions):
        raise ValueError(f"{batch} rollouts are not a whole number of copies of the {len(positions)} prompts")
    repeat = batch // len(positions)
    return ([p for p in positions for _ in range(repeat)], [g for g in per_prompt for _ in range(repeat)])


def _pad_index(rows: list[list[int]], device, *also: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Host lists right-padded (with 0) into int64 ``[B, max(max_len, 1)]`` tensors on ``device``: ``rows``,
    then each of ``also`` (lists of the same lengths). At least one column, so that a batch without any
    answer (or think) token still gives the op well-formed, all-padding inputs; one copy to the device."""
    width = max([len(r) for r in rows] + [1])
    out = torch.zeros(1 + len(also), len(rows), width, dtype=torch.long)
    for j, lists in enumerate((rows, *also)):
        for b, r in enumerate(lists):
            out[j, b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return tuple(out.to(device).unbind(0)) if also else (out[0].to(device), None)


def _to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU copies of integer tensors (``None`` stays ``None``), in one device-to-host copy."""
    present = [t for t in tensors if t is not None]
    flat = torch.cat([t.reshape(-1).long() for t in present]).cpu()
    out, start = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


class _RowTaker:
    """``x[b, :, index[b, j]]`` for ``x`` of ``[B, H, R]`` or ``[B, H, R, d]`` and ``index [B, J]``, as one
    ``index_select`` over ``x``'s rows: 10x faster on CPU than ``gather`` with an expanded index (a layer's
    image keys, ``[4, 2, 256, 32]`` of 340 positions: 31 us against 313 us), which made up a quarter of the
    saliency's time in the CPU benchmark. The flat row index depends only on ``(H, R)``: built once per
    shape, it serves every layer."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self._flat: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch, heads, rows = x.shape[:3]
        flat = self._flat.get((heads, rows))
        if flat is None:
            base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * rows
            flat = self._flat[heads, rows] = (base + self.index[:, None, :]).reshape(-1)
        taken = x.reshape(batch * heads * rows, -1).index_select(0, flat)
        return taken.view(batch, heads, self.index.shape[1], *x.shape[3:])


def _alpha_head_sum(q: torch.Tensor, lse: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``sum over h of exp(s q[h] . k[kv(h)] - lse[h])``: ``q [B, H, R, d]``, ``lse [B, H, R]``,
    ``k [B, H_kv, M, d]`` -> ``[B, R, M]`` in ``lse``'s dtype."""
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    dtype = lse.dtype
    scores = torch.matmul(q.to(dtype).reshape(batch, kv_heads, groups * rows, dim), k.to(dtype).transpose(-1, -2))
    scores = scores.view(batch, heads, rows, -1) * scale
    return torch.exp(scores - lse.unsqueeze(-1)).sum(1)


def _per_image(values: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Split the last axis (a rollout's image tokens, images one after another) into ``[..., h', w']`` per image."""
    out, start = [], 0
    for h, w in grids:
        out.append(values[..., start:start + h * w].reshape(*values.shape[:-1], h, w))
        start += h * w
    return out


# ---------------------------------------------------------------------------------------- core


@torch.no_grad()
def saliency_from_capture(model: nn.Module, processor, captured: CapturedRows, cache, sequences: torch.Tensor,
                          prompt_length: int, prompt_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, *,
                          adapter: ModelAdapter | None = None, path: str = "cot", details: bool = False,
                          attention: bool = False, completion_ids: Sequence[Sequence[int] | torch.Tensor] | None = None,
                          spans: Sequence[Spans] | None = None) -> RolloutSaliency:
    """Maps of every rollout from a capture and the cache of the same model run.

    Args:
        model: the model that ran.
        processor: its processor (or tokenizer): used to find spans and decode completions.
        captured: ``capture.result()`` of a :func:`capture_saliency` block with ``first_row = P - 1``.
        cache: the cache the run returned (``output.cache`` / ``output.past_key_values``), ``[B, H_kv, S, d]``
            per layer.
        sequences: ``[B, P + C]`` prompt then completion.
        prompt_length: ``P``.
        prompt_ids: ``[B_in, P]`` the prompts' ids as given to the processor's output (``B`` is a multiple of
            ``B_in``: ``num_return_sequences`` copies of each prompt, adjacent).
        image_grid_thw: ``[num_images, 3]`` of those prompts (``None`` without images).
        adapter: defaults to ``get_adapter(model)``.
        path: ``"cot"`` (the default, through the think tokens), ``"direct"`` or ``"both"``.
        details: also compute the per-think-token maps and the answer-to-think weights.
        attention: also compute the raw-attention map of the answer rows (``answer_attention_maps``).
        completion_ids: per rollout completion ids; default ``sequences[:, P:]`` trimmed at end-of-turn.
        spans: per rollout, the think and answer tokens to use instead of those :func:`find_spans` finds
            (a rollout whose spans are not ``valid`` gets a zero map).

    Returns:
        :class:`RolloutSaliency` (``timings`` holds ``"saliency"``).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    started = time.perf_counter()
    adapter = adapter or get_adapter(model)
    if captured.first_row != prompt_length - 1:
        raise ValueError(f"the capture starts at row {captured.first_row}, expected prompt_length - 1 = "
                         f"{prompt_length - 1}")
    plan = _plan(adapter, processor, sequences, prompt_length, prompt_ids, image_grid_thw, captured.num_rows,
                 captured.rms.device, completion_ids=completion_ids, spans=spans)
    maps = _LayerSum(adapter, plan, path, details=details, attention=attention, rms=captured.rms)
    for layer in range(adapter.num_layers):
        keys, values = adapter.layer_kv(cache, layer)
        maps.add(layer, captured.queries[layer], captured.lse[layer], keys, values)
    result = maps.finish(sequences)
    result.timings["saliency"] = time.perf_counter() - started
    result.captured_bytes = captured.nbytes()
    return result


@dataclass
class _Plan:
    """What the saliency reads, found on the host once per batch: per rollout its completion, spans, text and
    image grids, and the padded row indices of its answer rows, think rows and image keys on the device."""

    prompt_length: int
    completions: list[list[int]]
    spans: list[Spans]
    texts: list[str]
    grids: list[list[tuple[int, int]]]
    lengths_host: list[tuple[int, int, int]]  # per rollout: image tokens, think tokens, answer tokens
    lengths: torch.Tensor  # the same, [B, 3] on the device
    answer_rows: torch.Tensor  # [B, A] recorded row of each answer token (row k predicts completion token k)
    answer_ids: torch.Tensor  # [B, A]
    think_rows: torch.Tensor  # [B, T] recorded row of each think token (token k sits at row k + 1)
    predicted: torch.Tensor  # [B, T] the token each think row predicted
    image_index: torch.Tensor  # [B, N] absolute positions of the image tokens


def _plan(adapter: ModelAdapter, processor, sequences: torch.Tensor, prompt_length: int, prompt_ids: torch.Tensor,
          image_grid_thw: torch.Tensor | None, num_rows: int, device, *,
          completion_ids: Sequence[Sequence[int] | torch.Tensor] | None = None,
          spans: Sequence[Spans] | None = None) -> _Plan:
    """The :class:`_Plan` of a batch (see :func:`saliency_from_capture` for the arguments); ``num_rows`` is how
    many completion rows were (or will be) recorded."""
    tokenizer = _tokenizer(processor)
    batch, P = sequences.shape[0], prompt_length
    # The step's one read from the device: the token ids (spans and texts are found on the host) and the
    # image grids, in one copy. Everything after the plan is queued on the device without waiting for it.
    host_sequences, host_prompts, host_grids = _to_host(sequences, prompt_ids, image_grid_thw)
    stops = end_of_turn_ids(tokenizer)
    if completion_ids is None:
        completion_ids = [trim_completion(row[P:], stops) for row in host_sequences]
    completions = [c.tolist() if isinstance(c, torch.Tensor) else list(c) for c in completion_ids]
    if spans is None:
        spans = [find_spans(c, tokenizer, stop_ids=stops) for c in completions]
    elif len(spans) != batch:
        raise ValueError(f"spans has {len(spans)} entries for {batch} rollouts")
    texts = tokenizer.batch_decode(completions, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    image_pos, grids = _split_images(adapter, host_prompts, host_grids, batch)
    vocab = adapter.unembedding.shape[0]
    for b, s in enumerate(spans):  # every index the op will read must have been recorded, every id be a token
        if s.valid and (max(s.answer) >= num_rows or (s.think and max(s.think) + 1 >= num_rows)):
            raise ValueError(f"rollout {b}: its spans reach completion token {max(s.answer + s.think)}, but the "
                             f"capture recorded {num_rows} rows")
        if s.valid and not all(0 <= completions[b][k] < vocab for k in s.answer + s.think):
            raise ValueError(f"rollout {b}: its completion holds token ids outside the model's vocabulary [0, {vocab})")
    answer_lists = [s.answer if s.valid else [] for s in spans]
    think_lists = [[k + 1 for k in s.think] if s.valid else [] for s in spans]
    image_lists = [p.tolist() for p in image_pos]
    lengths_host = [(len(n), len(t), len(a)) for n, t, a in zip(image_lists, think_lists, answer_lists)]
    answer_rows, answer_ids = _pad_index(answer_lists, device, [[c[k] for k in a] for c, a in zip(completions, answer_lists)])
    think_rows, predicted = _pad_index(think_lists, device, [[c[r] for r in t] for c, t in zip(completions, think_lists)])
    image_index, _ = _pad_index(image_lists, device)
    lengths = torch.tensor(lengths_host, dtype=torch.long).reshape(batch, 3).to(device)
    return _Plan(prompt_length=P, completions=completions, spans=list(spans), texts=texts, grids=grids,
                 lengths_host=lengths_host, lengths=lengths, answer_rows=answer_rows, answer_ids=answer_ids,
                 think_rows=think_rows, predicted=predicted, image_index=image_index)


class _LayerSum:
    """The maps of a batch, summed over layers: :meth:`add` one layer's recorded rows with its keys and values
    (one ``layer_saliency`` call for all rollouts), then :meth:`finish`.

    With ``rms`` (``[B, R]``, the final norm's RMS at the recorded rows) the logit directions carry it from
    the start; with ``rms=None`` (a fused forward, where the layers run before the final norm) they leave it
    out and :meth:`finish` takes it: every map is linear in each answer row's ``1 / rms(x_a)``.
    """

    def __init__(self, adapter: ModelAdapter, plan: _Plan, path: str, *, details: bool = False,
                 attention: bool = False, rms: torch.Tensor | None = None) -> None:
        self.adapter, self.plan, self.path, self.details, self.attention = adapter, plan, path, details, attention
        device = plan.lengths.device
        unit = None if rms is not None else torch.ones(plan.answer_rows.shape, device=device,
                                                       dtype=adapter.norm_weight.dtype
                                                       if adapter.norm_weight.dtype == torch.float64 else torch.float32)
        with torch.autocast(device.type, enabled=False):
            self.rms_answer = rms.gather(1, plan.answer_rows) if rms is not None else None
            # g_a once per batch; u = W_O^T g_a per layer (check_ids=False: checked on the host by the plan).
            self.g = answer_logit_directions(adapter.norm_weight, adapter.unembedding, plan.answer_ids,
                                             self.rms_answer if rms is not None else unit, check_ids=False)
            if details:
                # The think row r predicted completion token r: its own "answer" for the logit-decomposed map.
                rms_think = rms.gather(1, plan.think_rows) if rms is not None else torch.ones(
                    plan.think_rows.shape, device=device, dtype=unit.dtype)
                self.g_think = answer_logit_directions(adapter.norm_weight, adapter.unembedding, plan.predicted,
                                                       rms_think, check_ids=False)
                self.think_lengths = plan.lengths[:, [0, 1, 1]]
        self.take_answer, self.take_think = _RowTaker(plan.answer_rows), _RowTaker(plan.think_rows)
        self.take_think_key = _RowTaker(plan.think_rows + (plan.prompt_length - 1))  # row r is position P - 1 + r
        self.take_image = _RowTaker(plan.image_index)
        self.total = self.think_image = self.think_logit = self.answer_think = self.answer_image = None
        # A rollout with a NaN or inf among what the op reads is invalid (docs/method.md section 3.3).
        self.non_finite = torch.zeros(len(plan.completions), dtype=torch.bool, device=device)

    @staticmethod
    def _sum(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        return part if total is None else total + part

    def add(self, layer: int, q: torch.Tensor, lse: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Layer ``layer``'s part: ``q [B, H, R, d]`` and ``lse [B, H, R]`` of the recorded rows, ``keys`` and
        ``values [B, H_kv, S, d]`` of every position."""
        adapter, scale = self.adapter, self.adapter.scale
        # The projections and attention probabilities are float32 (float64) work: a caller's bf16 autocast
        # (the training loop's, evaluation's) would run their matmuls in bf16.
        with torch.autocast(q.device.type, enabled=False):
            q_answer, lse_answer = self.take_answer(q), self.take_answer(lse)
            q_think, lse_think = self.take_think(q), self.take_think(lse)
            # Under autocast the rotary embedding promotes q and k to fp32 while v stays bf16: the op takes one
            # dtype, the queries'.
            k_think = self.take_think_key(keys).to(q.dtype)
            k_image, v_image = self.take_image(keys).to(q.dtype), self.take_image(values).to(q.dtype)
            o_proj = adapter.o_proj_weight(layer)
            u = project_answer_vectors(self.g, o_proj, adapter.num_heads).to(q.dtype)
            # NaN or inf in a query, key, value or projection reaches the op's output, checked in finish(); an
            # infinite log-sum-exp would not (it turns probabilities into 0), so it is checked here.
            for read in (lse_answer, lse_think):
                self.non_finite |= ~torch.isfinite(read).flatten(1).all(1)
            self.total = self._sum(self.total, layer_saliency(q_think, lse_think, q_answer, lse_answer, k_think,
                                                              k_image, v_image, u, self.plan.lengths, scale, self.path))
            if self.details:
                u_think = project_answer_vectors(self.g_think, o_proj, adapter.num_heads).to(q.dtype)
                self.think_logit = self._sum(self.think_logit, layer_saliency(
                    q_think, lse_think, q_think, lse_think, k_think, k_image, v_image, u_think, self.think_lengths,
                    scale, "direct"))
                self.think_image = self._sum(self.think_image, _alpha_head_sum(q_think, lse_think, k_image, scale))
                self.answer_think = self._sum(self.answer_think, _alpha_head_sum(q_answer, lse_answer, k_think, scale))
            if self.attention:
                self.answer_image = self._sum(self.answer_image, _alpha_head_sum(q_answer, lse_answer, k_image, scale))

    def finish(self, sequences: torch.Tensor, rms: torch.Tensor | None = None) -> RolloutSaliency:
        """The :class:`RolloutSaliency` of the batch; ``rms`` (``[B, R]``) when it was left out at the start."""
        plan, adapter, non_finite = self.plan, self.adapter, self.non_finite
        total, think_logit = self.total, self.think_logit
        with torch.autocast(total.device.type, enabled=False):
            rms_answer = self.rms_answer
            if rms_answer is None:
                rms_answer = rms.gather(1, plan.answer_rows).to(total.dtype)
                total = total / rms_answer[:, :, None]
                if self.details:
                    think_logit = think_logit / rms.gather(1, plan.think_rows).to(total.dtype)[:, :, None]
            # A rollout whose sum is not finite, or whose final-norm scale is not (an infinite RMS makes g, and so
            # the map, 0), is invalid too: its maps are zero, its validity 0.
            non_finite |= ~torch.isfinite(total).flatten(1).all(1) | ~torch.isfinite(rms_answer).all(1)
            think_image, answer_think, answer_image = self.think_image, self.answer_think, self.answer_image
            if self.details:
                non_finite |= ~(torch.isfinite(think_logit).flatten(1).all(1)
                                & torch.isfinite(think_image).flatten(1).all(1)
                                & torch.isfinite(answer_think).flatten(1).all(1))
            if self.attention:
                non_finite |= ~torch.isfinite(answer_image).flatten(1).all(1)
            keep = ~non_finite[:, None, None]
            total = total.where(keep, 0.0)
            if self.details:
                think_logit, think_image, answer_think = (x.where(keep, 0.0)
                                                          for x in (think_logit, think_image, answer_think))
            if self.attention:
                answer_image = answer_image.where(keep, 0.0)
            maps, answer_maps = [], []
            think_maps = [] if self.details else None
            think_logit_maps = [] if self.details else None
            answer_to_think = [] if self.details else None
            answer_attention = [] if self.attention else None
            for b, (n, t, a) in enumerate(plan.lengths_host):
                grids = plan.grids[b]
                per_token = total[b, :a, :n]
                answer_maps.append(_per_image(per_token, grids))
                maps.append(_per_image(per_token.sum(0), grids))
                if self.details:
                    think_maps.append(_per_image(think_image[b, :t, :n].to(total.dtype), grids))
                    think_logit_maps.append(_per_image(think_logit[b, :t, :n], grids))
                    answer_to_think.append(answer_think[b, :a, :t].to(total.dtype))
                if self.attention:
                    mean = answer_image[b, :a, :n].sum(0) / max(a * adapter.num_layers * adapter.num_heads, 1)
                    answer_attention.append(_per_image(mean.to(total.dtype), grids))
        device = plan.lengths.device
        valid = torch.tensor([s.valid for s in plan.spans], dtype=torch.float32).to(device) * (~non_finite).float()
        return RolloutSaliency(
            sequences=sequences, prompt_length=plan.prompt_length,
            completion_ids=[torch.tensor(c, dtype=torch.long) for c in plan.completions], texts=plan.texts, maps=maps,
            spans=plan.spans, valid=valid.to(sequences.device), non_finite=non_finite, image_grids=plan.grids,
            answer_token_maps=answer_maps, think_token_maps=think_maps, think_token_logit_maps=think_logit_maps,
            answer_to_think=answer_to_think, answer_attention_maps=answer_attention, path=self.path)


def generate_with_saliency(model: nn.Module, processor, inputs, *, adapter: ModelAdapter | None = None,
                           path: str = "cot", details: bool = False, **generate_kwargs) -> RolloutSaliency:
    """``model.generate(**inputs, **generate_kwargs)`` with capture, then the maps of every rollout.

    Args:
        model: a model served by an adapter (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
        processor: its processor.
        inputs: the processor's ``BatchFeature`` (``input_ids`` ``[B, P]`` left-padded, ``attention_mask``,
            ``pixel_values``, ``image_grid_thw``, ...), on the model's device.
        adapter: defaults to ``get_adapter(model)``.
        path: ``"cot"``, ``"direct"`` or ``"both"``.
        details: also compute the per-think-token maps and answer-to-think weights.
        generate_kwargs: passed to ``generate`` (``max_new_tokens``, ``do_sample``, ``num_return_sequences``,
            ...); beam search is refused (it reorders the cache under the recorded rows).

    Returns:
        :class:`RolloutSaliency` with ``B * num_return_sequences`` rollouts.
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError("generate_with_saliency supports num_beams=1 only (beam search reorders the cache)")
    if generate_kwargs.get("use_cache", True) is False:
        raise ValueError("generate_with_saliency needs use_cache=True: keys and values are read from the cache")
    adapter = adapter or get_adapter(model)
    prompt_ids = inputs["input_ids"]
    P = prompt_ids.shape[1]
    generate_kwargs = {**generate_kwargs, "return_dict_in_generate": True}
    started = time.perf_counter()
    with torch.no_grad(), capture_saliency(model, first_row=P - 1, adapter=adapter) as capture:
        output = model.generate(**inputs, **generate_kwargs)
    generated = time.perf_counter() - started
    result = saliency_from_capture(model, processor, capture.result(), adapter.output_cache(output), output.sequences, P,
                                   prompt_ids, inputs.get("image_grid_thw"), adapter=adapter, path=path,
                                   details=details)
    result.timings["generate"] = generated
    return result


def _teacher_forced_batch(adapter: ModelAdapter, processor, inputs, completion_ids, trim: bool = True) -> tuple:
    """``(completions, body, forward)``: each completion cut after its end-of-turn token, the right-padded ids
    ``[B, C]`` of the completions the forward takes (the cut ones; with ``trim=False`` every given token), and the
    model inputs of prompt (left-padded) then completion.

    Raises:
        ValueError: a completion count that does not match the prompts; prompts that are not left-padded.
    """
    tokenizer = _tokenizer(processor)
    prompt_ids = inputs["input_ids"]
    batch = prompt_ids.shape[0]
    if len(completion_ids) != batch:
        raise ValueError(f"completion_ids has {len(completion_ids)} completions for {batch} prompts: repeat each "
                         "prompt in inputs once per completion")
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("the prompts must be left-padded (every prompt's last position attended): got a prompt "
                         "whose last position is padding; tokenize with padding_side='left'")
    stops = end_of_turn_ids(tokenizer)
    completions = [trim_completion(c, stops) for c in completion_ids]
    # An empty completion (a backend may return one) is an invalid rollout, not an error.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body, body_mask = pad_completions([torch.as_tensor(c, dtype=torch.long)
                                       for c in (completions if trim else completion_ids)], pad, prompt_ids.device)
    return completions, body, adapter.teacher_forced_inputs(dict(inputs), body, body_mask)


def saliency_for_completions(model: nn.Module, processor, inputs,
                             completion_ids: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor, *,
                             adapter: ModelAdapter | None = None, path: str = "cot", details: bool = False,
                             attention: bool = False, spans: Sequence[Spans] | None = None) -> RolloutSaliency:
    """Maps of completions generated elsewhere (vLLM, a file): one teacher-forced forward with capture.

    Args:
        model: a model served by an adapter.
        processor: its processor.
        inputs: the processor's ``BatchFeature`` of the ``B`` prompts (left-padded), one prompt per completion.
        completion_ids: ``B`` completions: a list of 1-D id sequences, or a right-padded ``[B, C]`` tensor; each
            is cut after its first end-of-turn token.
        adapter, path, details: as in :func:`generate_with_saliency`.
        attention, spans: as in :func:`saliency_from_capture`.

    Returns:
        :class:`RolloutSaliency`; equal (within floating-point tolerance) to what
        :func:`generate_with_saliency` gives for the same completions.
    """
    return saliency_for_completions_by_path(model, processor, inputs, completion_ids, paths=(path,), adapter=adapter,
                                            details=details, attention=attention, spans=spans)[path]


def saliency_for_completions_by_path(model: nn.Module, processor, inputs,
                                     completion_ids: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor, *,
                                     paths: Sequence[str] = PATHS, adapter: ModelAdapter | None = None,
                                     details: bool = False, attention: bool = False,
                                     spans: Sequence[Spans] | None = None) -> dict[str, RolloutSaliency]:
    """:func:`saliency_for_completions` for several paths from ONE teacher-forced forward and capture (the
    faithfulness evaluation compares them on the same rows). ``attention`` is computed once, with the first
    path, and shared by every result. Returns ``{path: RolloutSaliency}``."""
    if not paths:
        raise ValueError("paths must name at least one saliency path")
    adapter = adapter or get_adapter(model)
    prompt_ids = inputs["input_ids"]
    P = prompt_ids.shape[1]
    completions, body, forward = _teacher_forced_batch(adapter, processor, inputs, completion_ids)
    width = body.shape[1]
    sequences = forward["input_ids"]
    started = time.perf_counter()
    with torch.no_grad(), capture_saliency(model, first_row=P - 1, num_rows=width, adapter=adapter) as capture:
        output = model(**forward, use_cache=True, logits_to_keep=1, saliency_capture=capture)
    ran = time.perf_counter() - started
    captured, cache = capture.result(), adapter.output_cache(output)
    results: dict[str, RolloutSaliency] = {}
    for path in paths:
        result = saliency_from_capture(model, processor, captured, cache, sequences, P, prompt_ids,
                                       inputs.get("image_grid_thw"), adapter=adapter, path=path, details=details,
                                       attention=attention and not results, completion_ids=completions, spans=spans)
        result.timings["forward"] = ran
        if results:
            result.answer_attention_maps = next(iter(results.values())).answer_attention_maps
        results[path] = result
    return results


def saliency_fused_forward(model: nn.Module, processor, inputs,
                           completion_ids: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor, *,
                           adapter: ModelAdapter | None = None, path: str = "cot", details: bool = False,
                           attention: bool = False, spans: Sequence[Spans] | None = None,
                           temperature: float = 1.0, trim: bool = True) -> RolloutSaliency:
    """Maps and log-probs of given completions from ONE teacher-forced forward without a cache.

    Inside each language layer's attention call, where its queries, keys and values are all present, the
    layer's part of ``S(a, i)`` is computed for the whole batch and added up; nothing else is kept (no
    queries, keys, values or cache). The final norm's ``1 / rms(x_a)``, unknown until the last layer has
    run, is applied once at the end (the map is linear in it). The same forward gives the completion's
    log-probs (``completion_logps``), so it can serve as GRPO's old-policy pass.

    Args: as :func:`saliency_for_completions`, plus ``temperature`` of the log-probs and ``trim``: ``False``
        runs the forward, and gives log-probs, over every given completion token, also those after the first
        end-of-turn token (a trainer that scores what its sampler returned); the maps stop at the end of turn
        either way.

    Returns:
        :class:`RolloutSaliency` equal (within floating-point tolerance) to :func:`saliency_for_completions`'s
        for the same completions, with ``completion_logps [B, C]``.

    Raises:
        ValueError: a batch whose layout cannot be placed: prompts that are not left-padded, a completion
            count that does not match the prompts.
    """
    from saliency_r1.logps import _hidden_instead_of_logits, token_logps

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    adapter = adapter or get_adapter(model)
    prompt_ids = inputs["input_ids"]
    P = prompt_ids.shape[1]
    completions, body, forward = _teacher_forced_batch(adapter, processor, inputs, completion_ids, trim)
    width = body.shape[1]
    sequences = forward["input_ids"]
    started = time.perf_counter()
    device = adapter.norm_weight.device
    plan = _plan(adapter, processor, sequences, P, prompt_ids, inputs.get("image_grid_thw"), width, device,
                 completion_ids=completions, spans=spans)
    layers = _LayerSum(adapter, plan, path, details=details, attention=attention)
    with (torch.no_grad(), _hidden_instead_of_logits(adapter.model) as head,
          capture_saliency(model, first_row=P - 1, num_rows=width, adapter=adapter, on_layer=layers.add) as capture):
        hidden = model(**forward, use_cache=False, logits_to_keep=width + 1, saliency_capture=capture).logits[:, :-1]
        logps = token_logps(hidden, head, body, temperature)
    ran = time.perf_counter() - started
    result = layers.finish(sequences, rms=capture.rms())
    result.completion_logps = logps
    result.timings.update(forward=ran, saliency=time.perf_counter() - started - ran)
    return result
