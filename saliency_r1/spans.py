"""Think and answer spans of a completion, and the one predicate that decides whether a completion is
well formed (``docs/method.md`` section 2): the spans, the format reward, the saliency reward's
multiplier and evaluation all use :func:`parse_completion`.

Two templates are recognised:

- ``<think> reasoning </think> answer`` (the answer runs to the end-of-turn token; a completion cut off
  before it is invalid, since its answer may be a fragment), and
- ``<think> reasoning </think> <answer> answer </answer>``.

The tags may be single special tokens (a tokenizer that adds them) or several ordinary tokens (Qwen2.5's
own vocabulary spells ``<think>`` as ``<``, ``think``, ``>``); matching is done on text, and text is
mapped back to tokens through per-token character offsets: the completion's text is taken as the
concatenation of each token decoded on its own, so token ``k`` owns characters
``offsets[k]..offsets[k+1]``. (A character split over two byte-level tokens decodes to replacement
characters, which moves no tag: tags are ASCII.)

Think tokens are those inside ``<think>...</think>``; answer tokens those inside the answer text, minus
whitespace-only tokens. A token that straddles a tag counts when the part of it inside the span is not
whitespace. A completion with anything else (no tags, tags out of order or repeated, an empty answer,
an ``<answer>`` that is not closed, text after ``</answer>``) is invalid: empty spans, ``valid=False``.
An empty reasoning is well formed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Tokens that end an assistant turn in the Qwen chat templates.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class Spans:
    """Where the reasoning and the answer are in one completion.

    Attributes:
        valid: the completion has a well-formed think/answer structure.
        think: completion-token indices ``k`` of the think tokens (token ``k`` sits at sequence position
            ``P + k``), ascending; may be empty for a valid completion (``<think></think>``).
        answer: completion-token indices of the answer tokens, ascending; non-empty when valid.
        template: ``"tagged"`` (``<answer>...</answer>``), ``"plain"`` (answer after ``</think>``), or
            ``None`` when invalid.
        length: completion tokens up to and including the end-of-turn token (the tokens looked at).
    """

    valid: bool
    think: list[int] = field(default_factory=list)
    answer: list[int] = field(default_factory=list)
    template: str | None = None
    length: int = 0

    def think_positions(self, prompt_length: int) -> list[int]:
        """Sequence positions ``t`` of the think tokens (the key of the answer-to-think hop and the query row
        of the think-to-image hop, ``docs/method.md`` section 2)."""
        return [prompt_length + k for k in self.think]

    def answer_positions(self, prompt_length: int) -> list[int]:
        """Answer positions ``a = P + k - 1``: the rows that predicted the answer tokens."""
        return [prompt_length + k - 1 for k in self.answer]


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids of the tokens that end a completion: the tokenizer's EOS and Qwen's end-of-turn tokens it knows."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    unknown = tokenizer.unk_token_id
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != unknown:
            ids.add(int(token_id))
    return ids


def trim_completion(completion_ids: Sequence[int] | torch.Tensor, stop_ids: Iterable[int]) -> list[int]:
    """The completion up to and including its first end-of-turn token (all of it when there is none)."""
    ids = completion_ids.tolist() if isinstance(completion_ids, torch.Tensor) else list(completion_ids)
    stops = set(stop_ids)
    for k, token in enumerate(ids):
        if token in stops:
            return ids[:k + 1]
    return ids


def token_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The completion's text and the character offset of each token in it (``len(ids) + 1`` offsets)."""
    pieces = tokenizer.batch_decode([[token] for token in ids], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return "".join(pieces), offsets


def _tokens_in(text: str, offsets: list[int], lo: int, hi: int, *, keep_whitespace: bool) -> list[int]:
    """Tokens overlapping characters ``[lo, hi)``; those whose overlap is only whitespace are dropped unless
    they lie wholly inside and ``keep_whitespace``."""
    tokens = []
    for k in range(len(offsets) - 1):
        start, stop = offsets[k], offsets[k + 1]
        overlap_lo, overlap_hi = max(start, lo), min(stop, hi)
        if overlap_lo >= overlap_hi:
            continue
        inside = start >= lo and stop <= hi
        if text[overlap_lo:overlap_hi].strip() or (keep_whitespace and inside):
            tokens.append(k)
    return tokens


@dataclass(frozen=True)
class CompletionParts:
    """Where the reasoning and the answer are in a completion's text (character ranges ``[lo, hi)``)."""

    think: tuple[int, int]
    answer: tuple[int, int]
    template: str  # "tagged" or "plain"


def parse_completion(text: str, *, ended: bool) -> CompletionParts | None:
    """The one well-formedness predicate (``docs/method.md`` section 2), on a completion's text.

    Well formed: exactly one ``<think>`` (nothing but whitespace before it) and one ``</think>`` after it;
    then either ``<answer> answer </answer>`` with nothing but whitespace around it (tagged), or, with no
    answer tag at all, the rest of the text up to the end-of-turn token (plain: only when the completion
    ``ended`` with that token, else the answer may be a fragment). The answer holds at least one
    non-whitespace character; the reasoning may be empty.

    Args:
        text: the completion without its end-of-turn token.
        ended: whether the completion ended with an end-of-turn token.

    Returns:
        the character ranges of the reasoning and the answer, or ``None`` when not well formed.

    >>> parse_completion("<think> red </think><answer> dark </answer>", ended=False)
    CompletionParts(think=(7, 12), answer=(28, 34), template='tagged')
    >>> parse_completion("<think></think> dark", ended=True).template
    'plain'
    >>> parse_completion("<think></think> dark", ended=False) is None  # cut off: maybe a fragment
    True
    """
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    open_at, close_at = text.index(THINK_OPEN), text.index(THINK_CLOSE)
    if text[:open_at].strip() or close_at < open_at:
        return None
    think = (open_at + len(THINK_OPEN), close_at)
    rest_lo = close_at + len(THINK_CLOSE)
    rest = text[rest_lo:]
    if ANSWER_OPEN in rest or ANSWER_CLOSE in rest:
        match = re.fullmatch(r"(\s*)<answer>(.*?)</answer>\s*", rest, flags=re.DOTALL)
        if match is None or ANSWER_OPEN in match.group(2) or ANSWER_CLOSE in match.group(2):
            return None
        answer, template = (rest_lo + match.start(2), rest_lo + match.end(2)), "tagged"
    elif ended:
        answer, template = (rest_lo, len(text)), "plain"
    else:
        return None
    if not text[answer[0]:answer[1]].strip():
        return None
    return CompletionParts(think=think, answer=answer, template=template)


_TRAILING_END_OF_TURN = re.compile("(?:\\s*(?:" + "|".join(re.escape(t) for t in END_OF_TURN_TOKENS) + "))+\\s*$")


def answer_text(text: str) -> str | None:
    """The answer of a decoded completion as :func:`parse_completion` finds it (end-of-turn tokens at the
    end removed; text alone counts as ended, see :func:`is_well_formed`), stripped; ``None`` when the
    completion is not well formed.

    >>> answer_text("<think> red </think><answer> dark </answer>"), answer_text("<think></think> dark<|im_end|>")
    ('dark', 'dark')
    >>> answer_text("<answer> dark </answer>") is None
    True
    """
    stripped = _TRAILING_END_OF_TURN.sub("", text)
    parts = parse_completion(stripped, ended=True)
    return None if parts is None else stripped[parts.answer[0]:parts.answer[1]].strip()


def is_well_formed(text: str) -> bool:
    """:func:`parse_completion` on a decoded completion, end-of-turn tokens at its end removed.

    Text alone cannot tell a plain answer cut at the length limit from a finished one (TRL decodes
    completions without special tokens): a text counts as ended. Where the token ids are known,
    :func:`find_spans` knows whether the end-of-turn token came.

    >>> is_well_formed("<think> the square is red </think><answer> red </answer><|im_end|>")
    True
    >>> is_well_formed("<answer> red </answer>"), is_well_formed("<think></think><answer> </answer>")
    (False, False)
    """
    return parse_completion(_TRAILING_END_OF_TURN.sub("", text), ended=True) is not None


def find_spans(completion_ids: Sequence[int] | torch.Tensor, tokenizer, *,
               stop_ids: Iterable[int] | None = None) -> Spans:
    """Think and answer tokens of one completion (the rules: :func:`parse_completion`).

    Args:
        completion_ids: the generated token ids (``[C]``; anything after the first end-of-turn token,
            padding included, is ignored).
        tokenizer: the tokenizer that produced them (a ``PreTrainedTokenizerBase``).
        stop_ids: end-of-turn token ids; default :func:`end_of_turn_ids` of ``tokenizer``.

    Returns:
        :class:`Spans`; indices are completion-token indices.
    """
    stops = end_of_turn_ids(tokenizer) if stop_ids is None else set(stop_ids)
    ids = trim_completion(completion_ids, stops)
    ended = bool(ids) and ids[-1] in stops
    body = ids[:-1] if ended else ids
    text, offsets = token_offsets(tokenizer, body)
    parts = parse_completion(text, ended=ended)
    if parts is None:
        return Spans(valid=False, length=len(ids))
    answer = _tokens_in(text, offsets, *parts.answer, keep_whitespace=False)
    think = _tokens_in(text, offsets, *parts.think, keep_whitespace=True)
    return Spans(valid=True, think=think, answer=answer, template=parts.template, length=len(ids))
