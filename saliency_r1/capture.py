"""Record what the saliency op needs while a model generates (or runs one teacher-forced forward).

The capture is a transformers attention function, registered as ``"saliency_capture"`` through
``AttentionInterface`` (with ``sdpa_mask`` under the same name in ``AttentionMaskInterface``, without
which the causal mask would be dropped). It returns exactly what ``sdpa_attention_forward`` returns,
and while a :class:`SaliencyCapture` is active it also keeps, per language layer, the rotary-embedded
query and the softmax log-sum-exp (LSE) of the rows that predict completion tokens: the last prompt
row during prefill, then each decode step's row. What is kept grows as
``layers x heads x completion tokens x head size``; the LSE of a row is one reduction over the keys it
attends to (mask applied, so left padding is respected), computed in small row blocks so no
``rows x sequence`` block outlives a layer call. Keys and values are not copied: they are read
afterwards from the cache the model returns. The final norm's RMS at the same rows comes from a
forward hook on the norm. The vision tower is not touched.

Ways to turn it on:

- at load time: ``from_pretrained(..., attn_implementation={"text_config": "saliency_capture",
  "vision_config": "sdpa"})``; without an active capture it behaves as ``"sdpa"``;
- for a block of code: ``with capture_saliency(model, first_row=P - 1) as capture: model.generate(...)``
  (switches the language model's attention to the capture, restores it on exit).

The active capture reaches the attention function as the ``saliency_capture`` keyword of a forward
call (transformers passes forward's extra keywords down to every attention call) or, where a keyword
cannot ride along (``generate`` rejects keywords its model's forward does not name), through a
context variable set by :func:`capture_saliency`.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from saliency_r1.adapters import ModelAdapter, get_adapter

CAPTURE_ATTENTION = "saliency_capture"

# Rows whose LSE is computed together: bounds the transient score block at 64 x keys per head.
_LSE_ROW_BLOCK = 64

_ACTIVE: contextvars.ContextVar["SaliencyCapture | None"] = contextvars.ContextVar("saliency_capture", default=None)


@dataclass
class CapturedRows:
    """What one capture recorded, stacked over the recorded rows ``r = 0..R-1`` (row ``r`` is absolute
    sequence position ``first_row + r``).

    Attributes:
        queries: per language layer, ``[B, H, R, d]`` rotary-embedded queries (model dtype).
        lse: per language layer, ``[B, H, R]`` softmax log-sum-exp of the scaled scores (float32, or
            float64 for a float64 model).
        rms: ``[B, R]`` the final norm's ``sqrt(mean(x^2) + eps)`` of the residual at those rows (same dtype
            as ``lse``).
        first_row: absolute position of row 0 (``P - 1`` for a prompt of ``P`` positions).
    """

    queries: list[torch.Tensor]
    lse: list[torch.Tensor]
    rms: torch.Tensor
    first_row: int

    @property
    def num_rows(self) -> int:
        return int(self.rms.shape[1])

    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        tensors = [*self.queries, *self.lse, self.rms]
        return sum(t.numel() * t.element_size() for t in tensors)


class SaliencyCapture:
    """Accumulates queries, LSEs and final-norm RMS of the rows at absolute positions
    ``first_row, first_row + 1, ...`` (``num_rows`` of them, or every later row when ``None``).

    Positions are counted per layer from the first call after the capture starts, so the model must
    start from an empty cache (as ``generate`` and a plain forward do).

    Args:
        adapter: the model's :class:`~saliency_r1.adapters.ModelAdapter`.
        first_row: absolute position of the first row to record (``P - 1``: the last prompt row).
        num_rows: how many rows to record (teacher-forced: the completion length); ``None`` records
            every row from ``first_row`` on (generation: each decode step's row).
    """

    def __init__(self, adapter: ModelAdapter, *, first_row: int, num_rows: int | None = None) -> None:
        if first_row < 0:
            raise ValueError(f"first_row must be >= 0, got {first_row}")
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 or None, got {num_rows}")
        self.adapter = adapter
        self.first_row = first_row
        self.num_rows = num_rows
        self._layer_of = {id(module): layer for layer, module in enumerate(adapter.attention_modules)}
        num_layers = len(self._layer_of)
        self._queries: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._lse: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._rms: list[torch.Tensor] = []
        self._seen = [0] * num_layers
        self._norm_seen = 0

    def _rows(self, start: int, count: int) -> slice | None:
        """The slice of a call's rows (absolute positions ``start..start+count-1``) to record."""
        stop = start + count
        lo = max(self.first_row, start)
        hi = stop if self.num_rows is None else min(stop, self.first_row + self.num_rows)
        return slice(lo - start, hi - start) if lo < hi else None

    def record_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float) -> None:
        """Keep ``query`` and the LSE of the rows to record, for the language layer ``module`` belongs to.

        Args:
            module: the attention module (ignored unless it is one of the adapter's language layers).
            query: ``[B, H, q, d]`` rotary-embedded queries of this call.
            key: ``[B, H_kv, k, d]`` every key the call attends to (cache included).
            attention_mask: ``None`` (causal), bool ``[B|1, 1|H, q, k]`` (True attends) or additive float.
            scaling: softmax scale.
        """
        layer = self._layer_of.get(id(module))
        if layer is None:
            return
        q_len, kv_len = query.shape[2], key.shape[2]
        start = self._seen[layer]
        self._seen[layer] += q_len
        rows = self._rows(start, q_len)
        if rows is None:
            return
        q_rows = query.detach()[:, :, rows]
        self._queries[layer].append(q_rows)
        # Query j of this call sits at key position kv_len - q_len + j (the cache precedes it).
        offset = kv_len - q_len
        self._lse[layer].append(_row_lse(q_rows, key.detach(), attention_mask, scaling,
                                         rows.start, offset, query.shape[2]))

    def record_norm(self, hidden: torch.Tensor) -> None:
        """Keep ``sqrt(mean(x^2) + eps)`` of the recorded rows of ``hidden`` (``[B, q, D]``, the final norm's input)."""
        q_len = hidden.shape[1]
        start = self._norm_seen
        self._norm_seen += q_len
        rows = self._rows(start, q_len)
        if rows is None:
            return
        x = hidden.detach()[:, rows]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        self._rms.append(torch.sqrt(x.pow(2).mean(-1) + self.adapter.norm_eps))

    def result(self) -> CapturedRows:
        """Everything recorded so far, stacked over rows."""
        if not self._rms or any(not chunks for chunks in self._queries):
            raise RuntimeError(
                "the capture recorded nothing: run the model inside capture_saliency(...) with its language "
                f"attention set to {CAPTURE_ATTENTION!r}, starting from an empty cache")
        return CapturedRows(queries=[torch.cat(chunks, dim=2) for chunks in self._queries],
                            lse=[torch.cat(chunks, dim=2) for chunks in self._lse],
                            rms=torch.cat(self._rms, dim=1), first_row=self.first_row)


def _row_lse(q_rows: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
             first: int, offset: int, q_len: int) -> torch.Tensor:
    """Log-sum-exp over keys of the scaled scores of ``q_rows`` (``[B, H, r, d]``, rows ``first..`` of a
    call of ``q_len`` queries whose query ``j`` is at key position ``offset + j``), mask applied.

    Returns float32 ``[B, H, r]`` (float64 for float64 inputs).
    """
    batch, heads, rows, dim = q_rows.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    dtype = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    # Grouped heads share their key head: fold the group into the row axis instead of repeating keys.
    keys_t = key.to(dtype).transpose(-1, -2)  # [B, H_kv, d, k]
    out = []
    for lo in range(0, rows, _LSE_ROW_BLOCK):
        hi = min(rows, lo + _LSE_ROW_BLOCK)
        q = q_rows[:, :, lo:hi].to(dtype).reshape(batch, kv_heads, groups * (hi - lo), dim)
        scores = (torch.matmul(q, keys_t) * scaling).view(batch, heads, hi - lo, kv_len)
        query_index = torch.arange(first + lo, first + hi, device=key.device)
        if attention_mask is None:
            if q_len > 1:  # causal: query j attends keys 0..offset + j
                keep = torch.arange(kv_len, device=key.device)[None, :] <= (offset + query_index)[:, None]
                scores = scores.masked_fill(~keep, float("-inf"))
        else:
            mask = attention_mask.index_select(-2, query_index) if attention_mask.shape[-2] > 1 \
                else attention_mask
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(dtype)
        out.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(out, dim=2)


def saliency_capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs):
    """Attention function registered as ``"saliency_capture"``: SDPA's output (``sdpa_attention_forward``),
    plus a record of ``query`` and its row LSEs when a :class:`SaliencyCapture` is active (passed as the
    ``saliency_capture`` keyword, or set by :func:`capture_saliency`).

    Shapes as transformers passes them: ``query [B, H, q, d]``, ``key``/``value [B, H_kv, k, d]``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = kwargs.pop("saliency_capture", None) or _ACTIVE.get()
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if capture is not None:
        scaling = kwargs.get("scaling")
        capture.record_attention(module, query, key, attention_mask,
                                 scaling if scaling is not None else query.shape[-1] ** -0.5)
    return output


def register_capture_attention() -> None:
    """Register ``"saliency_capture"`` with transformers (attention function and its SDPA mask); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTENTION, saliency_capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def text_attention(model: nn.Module, implementation: str, adapter: ModelAdapter | None = None) -> Iterator[None]:
    """Within the block, the language model of ``model`` uses attention ``implementation``; the vision
    tower keeps its own. The previous implementation is restored on exit."""
    adapter = adapter or get_adapter(model)
    config = adapter.text_model.config
    previous = config._attn_implementation
    if previous == implementation:
        yield
        return
    model.set_attn_implementation({"text_config": implementation})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous})


@contextlib.contextmanager
def capture_saliency(model: nn.Module, *, first_row: int, num_rows: int | None = None,
                     adapter: ModelAdapter | None = None) -> Iterator[SaliencyCapture]:
    """Record queries, LSEs and final-norm RMS of the completion rows while the block runs ``model``.

    Args:
        model: a model served by an adapter (``saliency_r1.adapters``).
        first_row: absolute position of the first recorded row: ``P - 1`` for a (padded) prompt of
            ``P`` positions, the row that predicts the first completion token.
        num_rows: rows to record for a teacher-forced forward (the completion length ``C``); ``None``
            (generation) records the prefill's last row and every decode step's row.
        adapter: defaults to ``get_adapter(model)``.

    Yields:
        the :class:`SaliencyCapture`; call ``.result()`` after the model ran. Run the model from an
        empty cache and keep the returned cache: the saliency reads keys and values from it.
    """
    adapter = adapter or get_adapter(model)
    register_capture_attention()
    capture = SaliencyCapture(adapter, first_row=first_row, num_rows=num_rows)
    hook = adapter.final_norm.register_forward_hook(lambda _module, args, _output: capture.record_norm(args[0]))
    token = _ACTIVE.set(capture)
    try:
        with text_attention(model, CAPTURE_ATTENTION, adapter):
            yield capture
    finally:
        _ACTIVE.reset(token)
        hook.remove()
