"""Think and answer spans from token ids, for both templates, with single-token and multi-token tags."""

from __future__ import annotations

import pytest

from saliency_r1.spans import Spans, end_of_turn_ids, find_spans, token_offsets, trim_completion
from saliency_r1.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def pieces(tok, token_ids, indices):
    return [tok.decode([token_ids[k]]) for k in indices]


def test_tagged_template(tok):
    c = ids(tok, "<think> the circle is red </think> <answer> red circle </answer><|im_end|>")
    s = find_spans(c, tok)
    assert s.valid and s.template == "tagged" and s.length == len(c)
    assert "".join(pieces(tok, c, s.think)) == " the circle is red "
    assert pieces(tok, c, s.answer) == [" red", " circle"]  # whitespace-only tokens dropped


def test_plain_template_runs_to_end_of_turn(tok):
    c = ids(tok, "<think>look left</think> red circle<|im_end|>") + ids(tok, " padding after the end")
    s = find_spans(c, tok)
    assert s.valid and s.template == "plain"
    assert "".join(pieces(tok, c, s.think)) == "look left"
    assert pieces(tok, c, s.answer) == [" red", " circle"]
    assert s.length == len(ids(tok, "<think>look left</think> red circle<|im_end|>"))


def test_empty_think_is_valid_with_no_think_tokens(tok):
    s = find_spans(ids(tok, "<think></think><answer>blue</answer><|im_end|>"), tok)
    assert s.valid and s.think == [] and len(s.answer) == 1


def test_truncated_completion_keeps_a_closed_answer(tok):
    c = ids(tok, "<think> hm </think><answer> yes </answer>")
    s = find_spans(c, tok)
    assert s.valid and pieces(tok, c, s.answer) == [" yes"] and s.length == len(c)


@pytest.mark.parametrize("text", ["<think> hm </think> red circle is", "<think> hm </think> yes <answer"])
def test_truncated_plain_answer_is_invalid(tok, text):
    # Without the end-of-turn token a plain answer may be cut mid-phrase or mid-tag (docs/method.md section 2).
    assert not find_spans(ids(tok, text), tok).valid


@pytest.mark.parametrize("text", [
    "red circle<|im_end|>",                                          # no structure
    "<think> the circle<|im_end|>",                                  # unclosed think
    "</think> red <think> x<|im_end|>",                              # out of order
    "<think> a </think><think> b </think> red<|im_end|>",            # two thinks
    "<think> a </think><answer> red<|im_end|>",                      # unclosed answer
    "<think> a </think><answer>  </answer><|im_end|>",               # empty answer
    "<think> a </think>   <|im_end|>",                               # empty plain answer
    "<think> a </think><answer> red </answer> more text<|im_end|>",  # text after the answer
    "so <think> a </think><answer> red </answer><|im_end|>",         # text before the think
    "<think> a </think> red </answer><|im_end|>",                    # stray closing tag
])
def test_invalid_structures(tok, text):
    s = find_spans(ids(tok, text), tok)
    assert s == Spans(valid=False, length=s.length) and s.think == [] and s.answer == []


def test_positions(tok):
    s = find_spans(ids(tok, "<think> a b </think> red<|im_end|>"), tok)
    P = 40
    assert s.answer_positions(P) == [P + k - 1 for k in s.answer]  # the rows that predicted the answer
    assert s.think_positions(P) == [P + k for k in s.think]         # the think tokens themselves


def test_trim_and_end_of_turn_ids(tok):
    stops = end_of_turn_ids(tok)
    assert stops == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trim_completion([5, 6, end, 7, 8], stops) == [5, 6, end]
    assert trim_completion([5, 6], stops) == [5, 6]


class CharTokenizer:
    """A tokenizer whose vocabulary spells the tags over several tokens, some straddling a tag boundary
    (as Qwen2.5's own vocabulary does: ``<think>`` is ``<``, ``think``, ``>`` there)."""

    eos_token_id = 0
    unk_token_id = None

    def __init__(self, vocab):
        self.vocab = ["<|im_end|>"] + list(vocab)

    def convert_tokens_to_ids(self, token):
        return self.vocab.index(token) if token in self.vocab else None

    def batch_decode(self, sequences, **kwargs):
        return ["".join(self.vocab[i] for i in seq) for seq in sequences]

    def encode(self, parts):
        return [self.vocab.index(p) for p in parts]


def test_multi_token_tags_and_straddling_tokens():
    parts = ["<", "think", ">\n", "The", " ball", " is", " red", ".\n</", "think", "> Red", " ball", "\n", "<|im_end|>"]
    tok = CharTokenizer(dict.fromkeys(parts))
    c = tok.encode(parts)
    s = find_spans(c, tok)
    assert s.valid and s.template == "plain"
    # ">\n" holds only whitespace of the think span; ".\n</" holds "." of it; "> Red" holds " Red" of the answer
    assert [parts[k] for k in s.think] == ["The", " ball", " is", " red", ".\n</"]
    assert [parts[k] for k in s.answer] == ["> Red", " ball"]


def test_multi_token_answer_tags():
    parts = ["<", "think", ">", "x", "</", "think", "><", "answer", "> B", "</", "answer", ">", "<|im_end|>"]
    tok = CharTokenizer(dict.fromkeys(parts))
    s = find_spans(tok.encode(parts), tok)
    assert s.valid and s.template == "tagged"
    assert [parts[k] for k in s.think] == ["x"] and [parts[k] for k in s.answer] == ["> B"]


def test_token_offsets_cover_the_text(tok):
    c = ids(tok, "<think> é </think> red")
    text, offsets = token_offsets(tok, c)
    assert offsets[0] == 0 and offsets[-1] == len(text) and len(offsets) == len(c) + 1
    assert text.startswith("<think>") and text.endswith("</think> red")
