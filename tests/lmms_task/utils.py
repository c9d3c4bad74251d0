"""The functions of the saliency_r1_synthetic lmms-eval task (saliency_r1_synthetic.yaml)."""

from PIL import Image

from saliency_r1.rewards import answers_match, extract_answer


def doc_to_visual(doc):
    """The record's image (``image``: a path), RGB, as saliency_r1.data.loader opens it."""
    with Image.open(doc["image"]) as image:
        image.load()
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question as it is (our evaluation adds nothing to it)."""
    return doc["problem"]


def process_results(doc, results):
    """``accuracy`` as saliency_r1.rewards.accuracy_reward scores an answer (the model returns the answer span,
    "" for a completion without a well-formed think/answer structure, which scores 0), and ``format``: whether
    there was an answer."""
    answer = results[0].strip()
    reference = extract_answer(str(doc["solution"])) or str(doc["solution"])
    return {"accuracy": float(bool(answer) and answers_match(answer, reference)), "format": float(bool(answer))}
