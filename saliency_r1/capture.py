"""Record what the saliency op needs while a model generates (or runs one teacher-forced forward).

The capture is a transformers attention function, registered as ``"saliency_capture"`` through
``AttentionInterface`` (with ``sdpa_mask`` under the same name in ``AttentionMaskInterface``, without
which the causal mask would be dropped). It returns exactly what ``sdpa_attention_forward`` returns,
and while a :class:`SaliencyCapture` is active it also keeps, per language layer, the rotary-embedded
query and the softmax log-sum-exp (LSE) of the rows that predict completion tokens: the last prompt
row during prefill, then each decode step's row. What is kept grows as
``layers x heads x completion tokens x head size``. On CPU a decode step calls the kernel SDPA itself
dispatches to, which returns each row's LSE along with the output. Elsewhere the LSE of a row is one
reduction over the keys it attends to (mask applied, so left padding is respected), computed in small
row blocks so no ``rows x sequence`` block outlives the computation; decode rows are reduced together
after generation (see :class:`SaliencyCapture`). Keys and values are not copied: they are read
afterwards from the cache the model returns. The final norm's RMS at the same rows comes from a
forward hook on the norm. The vision tower is not touched.

Ways to turn it on:

- at load time (after ``import saliency_r1.capture``, which registers it):
  ``from_pretrained(..., attn_implementation={"text_config": "saliency_capture", "vision_config": "sdpa"})``;
  without an active capture it behaves as ``"sdpa"``;
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
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from saliency_r1.adapters import ModelAdapter, get_adapter

CAPTURE_ATTENTION = "saliency_capture"

# Scores materialised at once by an LSE reduction (rows x keys x heads x batch), in float32: 1 MiB on
# CPU; 64 MiB on a GPU, where each block costs kernel launches (Qwen2.5-VL-3B, 8 rollouts of ~1,600
# positions: 81 rows a block, 7 blocks a layer) and a generation's own transients are far larger.
_LSE_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}

# The CPU kernel behind SDPA; it also returns the LSE of every query row (None if this torch lacks it).
# Its binding in the torch namespace: through torch.ops.aten each call costs ~5 us more.
_FLASH_CPU = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH = int(SDPBackend.FLASH_ATTENTION)

# How sdpa_attention_forward hands a decode row with grouped heads and a mask to SDPA: transformers
# 5.2x packs a group's heads as the query rows of their key head (pack_gqa); earlier releases (5.17)
# repeat the keys and values for every head. The fused decode step does the same, so that its output
# is SDPA's bit for bit under either.
_PACKS_GROUPED_HEADS = hasattr(sdpa_attention, "pack_gqa")

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

    A decode step on CPU hands over the LSEs the attention kernel returned. Otherwise, a call of several
    query rows (prefill, teacher-forced forward) has the LSEs of its recorded rows computed at once,
    from its own mask, and a decode step (one query row) only keeps its query: its LSE is computed in
    :meth:`result`, for all decode rows of a layer together, from the keys and the mask of
    that layer's last decode step. Generation only appends to the cache and to the mask, so row ``p``'s
    own mask is the last one cut at ``p`` (causality): the same numbers, without a dozen small kernel
    launches per layer and step inside the decode loop. Layers with a sliding window, whose masks are not
    prefixes of each other, compute their LSEs at every step instead.

    Args:
        adapter: the model's :class:`~saliency_r1.adapters.ModelAdapter`.
        first_row: absolute position of the first row to record (``P - 1``: the last prompt row).
        num_rows: how many rows to record (teacher-forced: the completion length); ``None`` records
            every row from ``first_row`` on (generation: each decode step's row).
        on_layer: a fused forward's consumer: called inside each language layer's attention with
            ``(layer, queries [B, H, R, d], lse [B, H, R], keys, values [B, H_kv, S, d])`` of the recorded rows,
            which are then dropped, not kept (no cache is needed: ``use_cache=False`` works). Needs
            ``num_rows`` (one teacher-forced forward); only the final norm's RMS is kept (:meth:`rms`).
    """

    def __init__(self, adapter: ModelAdapter, *, first_row: int, num_rows: int | None = None,
                 on_layer: Callable[..., None] | None = None) -> None:
        if first_row < 0:
            raise ValueError(f"first_row must be >= 0, got {first_row}")
        if num_rows is not None and num_rows < 1:
            raise ValueError(f"num_rows must be >= 1 or None, got {num_rows}")
        if on_layer is not None and num_rows is None:
            raise ValueError("on_layer (a fused forward) needs num_rows: every recorded row in one forward")
        self.adapter = adapter
        self.on_layer = on_layer
        self.first_row = first_row
        self.num_rows = num_rows
        self._layer_of = {id(module): layer for layer, module in enumerate(adapter.attention_modules)}
        num_layers = len(self._layer_of)
        self._queries: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        # Per layer, one entry per recorded call: its LSE, or None for a decode row deferred to result().
        self._lse: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self._last: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * num_layers
        self._scaling = [1.0] * num_layers
        self._rms: list[torch.Tensor] = []
        self._norm_eps = adapter.norm_eps  # read once: the property walks four modules (~20 us a decode step)
        self._seen = [0] * num_layers
        self._norm_seen = 0

    def _rows(self, start: int, count: int) -> slice | None:
        """The slice of a call's rows (absolute positions ``start..start+count-1``) to record."""
        stop = start + count
        lo = max(self.first_row, start)
        hi = stop if self.num_rows is None else min(stop, self.first_row + self.num_rows)
        return slice(lo - start, hi - start) if lo < hi else None

    def record_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, sliding_window: int | None = None,
                         lse: torch.Tensor | None = None, value: torch.Tensor | None = None) -> None:
        """Keep ``query`` (and the LSE) of the rows to record, for the language layer ``module`` belongs to.

        Args:
            module: the attention module (ignored unless it is one of the adapter's language layers).
            query: ``[B, H, q, d]`` rotary-embedded queries of this call.
            key: ``[B, H_kv, k, d]`` every key the call attends to (cache included); held, not copied.
            attention_mask: ``None`` (causal), bool ``[B|1, 1|H, q, k]`` (True attends) or additive float.
            scaling: softmax scale.
            sliding_window: the layer's window, if any (its LSEs are then never deferred).
            lse: ``[B, H, q]`` the LSEs of this call's rows as the attention kernel returned them, if it did.
            value: ``[B, H_kv, k, d]`` the call's values (read by ``on_layer`` only).
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
        if rows.stop - rows.start == q_len:  # every row (a decode step): no slicing op per layer and step
            q_rows = query.detach()
        else:  # a view of some rows would keep the whole call's queries alive
            q_rows = query.detach()[:, :, rows].clone()
        self._queries[layer].append(q_rows)
        self._scaling[layer] = scaling
        if lse is not None:
            self._lse[layer].append(lse if q_rows.shape[2] == q_len else lse[:, :, rows])
            return
        if q_len == 1 and sliding_window is None:
            self._lse[layer].append(None)
            self._last[layer] = (key.detach(), attention_mask)
            return
        # Query j of this call sits at key position kv_len - q_len + j (the cache precedes it).
        index = torch.arange(rows.start, rows.stop, device=key.device)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.index_select(-2, index) if attention_mask.shape[-2] > 1 else attention_mask
        self._lse[layer].append(_row_lse(q_rows, key.detach(), mask, scaling, index + (kv_len - q_len)))
        if self.on_layer is not None:
            if rows.stop - rows.start != self.num_rows:
                raise RuntimeError(f"a fused forward must hold all {self.num_rows} recorded rows in one call, got "
                                   f"{rows.stop - rows.start}: run one teacher-forced forward from an empty cache")
            self.on_layer(layer, self._queries[layer].pop(), self._lse[layer].pop(), key.detach(), value.detach())

    def record_norm(self, hidden: torch.Tensor) -> None:
        """Keep ``sqrt(mean(x^2) + eps)`` of the recorded rows of ``hidden`` (``[B, q, D]``, the final norm's input)."""
        q_len = hidden.shape[1]
        start = self._norm_seen
        self._norm_seen += q_len
        rows = self._rows(start, q_len)
        if rows is None:
            return
        x = hidden.detach()[:, rows] if rows.stop - rows.start < q_len else hidden.detach()
        if x.dtype != torch.float64:
            x = x.float()
        self._rms.append(x.pow(2).mean(-1).add_(self._norm_eps).sqrt_())

    def rms(self) -> torch.Tensor:
        """``[B, R]`` the final norm's RMS at the recorded rows (all a fused forward keeps)."""
        if not self._rms:
            raise RuntimeError("the capture recorded no final-norm input: run the model inside capture_saliency(...)")
        return torch.cat(self._rms, dim=1) if len(self._rms) > 1 else self._rms[0]

    def result(self) -> CapturedRows:
        """Everything recorded so far, stacked over rows (deferred decode-row LSEs are computed here)."""
        if not self._rms or any(not chunks for chunks in self._queries):
            raise RuntimeError(
                "the capture recorded nothing: run the model inside capture_saliency(...) with its language "
                f"attention set to {CAPTURE_ATTENTION!r}, starting from an empty cache")
        for layer, chunks in enumerate(self._queries):
            q = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
            parts = list(self._lse[layer])
            pending = [i for i, lse in enumerate(parts) if lse is None]
            if pending:
                # Chunk i holds rows offsets[i]..offsets[i+1]-1; deferred chunks are single decode rows.
                offsets = [0]
                for chunk in chunks:
                    offsets.append(offsets[-1] + chunk.shape[2])
                rows = torch.tensor([offsets[i] for i in pending], device=q.device)
                key, mask = self._last[layer]
                deferred = _row_lse(q.index_select(2, rows), key, mask, self._scaling[layer], rows + self.first_row)
                for j, i in enumerate(pending):
                    parts[i] = deferred[:, :, j:j + 1]
            # Keep one stacked copy (not the chunks and their concatenation); result() stays repeatable.
            self._queries[layer] = [q]
            self._lse[layer] = [torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]]
            self._last[layer] = None
        self._rms = [torch.cat(self._rms, dim=1)]
        return CapturedRows(queries=[chunks[0] for chunks in self._queries], lse=[parts[0] for parts in self._lse],
                            rms=self._rms[0], first_row=self.first_row)


def _row_lse(q_rows: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
             positions: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over keys of the scaled scores of ``q_rows`` (``[B, H, r, d]``), row ``j`` sitting at key
    position ``positions[j]`` (it attends keys ``0..positions[j]``) and masked by ``mask`` (``None``, or bool
    / additive ``[B|1, 1|H, r|1, >= k]``, cut to the keys).

    Returns float32 ``[B, H, r]`` (float64 for float64 inputs).
    """
    with torch.autocast(key.device.type, enabled=False):  # float32 scores even inside a bf16 forward
        return _row_lse_exact(q_rows, key, mask, scaling, positions)


def _row_lse_exact(q_rows: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                   positions: torch.Tensor) -> torch.Tensor:
    batch, heads, rows, dim = q_rows.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    dtype = torch.float64 if q_rows.dtype == torch.float64 else torch.float32
    # Grouped heads share their key head: fold the group into the row axis instead of repeating keys.
    keys_t = key.to(dtype).transpose(-1, -2)  # [B, H_kv, d, k]
    if mask is not None:
        mask = mask[..., :kv_len]
    key_index = torch.arange(kv_len, device=key.device)
    budget = _LSE_BLOCK_ELEMENTS.get(key.device.type, _LSE_BLOCK_ELEMENTS["cpu"])
    block_rows = max(1, budget // (batch * heads * kv_len))
    out = []
    for lo in range(0, rows, block_rows):
        hi = min(rows, lo + block_rows)
        q = q_rows[:, :, lo:hi].to(dtype).reshape(batch, kv_heads, groups * (hi - lo), dim)
        scores = torch.matmul(q, keys_t).view(batch, heads, hi - lo, kv_len).mul_(scaling)
        blocked = key_index[None, :] > positions[lo:hi, None]  # causal: row p attends keys 0..p
        if mask is not None:
            block = mask[..., lo:hi, :] if mask.shape[-2] > 1 else mask
            if block.dtype == torch.bool:
                blocked = blocked | ~block
            else:
                scores.add_(block.to(dtype))
        scores.masked_fill_(blocked, float("-inf"))
        # logsumexp in place (torch.logsumexp allocates twice and is slower on CPU); every row attends
        # at least its own position, so its maximum is finite.
        top = scores.amax(-1, keepdim=True)
        out.append(scores.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1)))
    return torch.cat(out, dim=2)


def _decode_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode step's attention through the CPU kernel that SDPA dispatches to, called directly so that
    the row LSEs it computes anyway come back too: recomputing them from the keys after generation took
    ~18 ms of a ~550 ms generation (+3 %) in the CPU benchmark (bench/test_bench_capture.py).

    The kernel gets what ``sdpa_attention_forward`` gives SDPA for one query row: a bool mask made
    additive as SDPA does; grouped heads as they are without a mask (``enable_gqa``) and, with one, as
    the installed transformers arranges them (a group's heads as the query rows of their key head,
    ``pack_gqa``, in 5.2x; keys and values repeated per head in 5.17). The output is then SDPA's bit for bit.

    Returns ``(output [B, 1, H, d_v], lse [B, H, 1])`` (LSE in float32, float64 for float64), or ``None``
    where SDPA would pick another kernel, the kernel is missing or rejects the inputs.
    """
    if (_FLASH_CPU is None or query.device.type != "cpu" or kwargs.get("dropout", 0.0)
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return None
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q, mask = query, attention_mask
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill_(mask.logical_not(), float("-inf"))
        if heads != kv_heads and _PACKS_GROUPED_HEADS:
            q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
            if mask.shape[1] > 1:
                mask = mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, mask.shape[-1])
        elif heads != kv_heads:
            key = sdpa_attention.repeat_kv(key, heads // kv_heads)
            value = sdpa_attention.repeat_kv(value, heads // kv_heads)
    scale = kwargs.get("scaling")
    grouped = q.shape[1] != key.shape[1]
    if torch._fused_sdp_choice(q, key, value, mask, 0.0, False, scale=scale, enable_gqa=grouped) != _FLASH:
        return None
    try:
        out, lse = _FLASH_CPU(q, key, value, 0.0, False, attn_mask=mask, scale=scale)
    except RuntimeError:
        return None
    return (out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(),
            lse.reshape(batch, heads, 1))


def saliency_capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, **kwargs):
    """Attention function registered as ``"saliency_capture"``: SDPA's output (``sdpa_attention_forward``),
    plus a record of ``query`` and its row LSEs when a :class:`SaliencyCapture` is active (passed as the
    ``saliency_capture`` keyword, or set by :func:`capture_saliency`).

    Shapes as transformers passes them: ``query [B, H, q, d]``, ``key``/``value [B, H_kv, k, d]``.
    """
    capture = kwargs.pop("saliency_capture", None) or _ACTIVE.get()
    if capture is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    fused = _decode_attention_with_lse(query, key, value, attention_mask, kwargs) if query.shape[2] == 1 else None
    if fused is not None:
        output, lse = (fused[0], None), fused[1]
    else:
        output, lse = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs), None
    scaling = kwargs.get("scaling")
    capture.record_attention(module, query, key, attention_mask,
                             scaling if scaling is not None else query.shape[-1] ** -0.5,
                             kwargs.get("sliding_window"), lse, value)
    return output


def register_capture_attention() -> None:
    """Register ``"saliency_capture"`` with transformers (attention function and its SDPA mask); idempotent.
    Importing this module already did."""
    AttentionInterface.register(CAPTURE_ATTENTION, saliency_capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


register_capture_attention()


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
                     adapter: ModelAdapter | None = None,
                     on_layer: Callable[..., None] | None = None) -> Iterator[SaliencyCapture]:
    """Record queries, LSEs and final-norm RMS of the completion rows while the block runs ``model``.

    Args:
        model: a model served by an adapter (``saliency_r1.adapters``).
        first_row: absolute position of the first recorded row: ``P - 1`` for a (padded) prompt of
            ``P`` positions, the row that predicts the first completion token.
        num_rows: rows to record for a teacher-forced forward (the completion length ``C``); ``None``
            (generation) records the prefill's last row and every decode step's row.
        adapter: defaults to ``get_adapter(model)``.
        on_layer: see :class:`SaliencyCapture` (a fused forward: each layer consumed inside its attention).

    Yields:
        the :class:`SaliencyCapture`; call ``.result()`` after the model ran. Run the model from an
        empty cache and keep the returned cache: the saliency reads keys and values from it.
    """
    adapter = adapter or get_adapter(model)
    register_capture_attention()
    capture = SaliencyCapture(adapter, first_row=first_row, num_rows=num_rows, on_layer=on_layer)
    hook = adapter.final_norm.register_forward_hook(lambda _module, args, _output: capture.record_norm(args[0]))
    token = _ACTIVE.set(capture)
    try:
        with text_attention(model, CAPTURE_ATTENTION, adapter):
            yield capture
    finally:
        _ACTIVE.reset(token)
        hook.remove()
