"""The synthetic grounded-VQA set and the Saliency-R1-format loader."""

import io
import json
import math

import pytest
from PIL import Image

from saliency_r1.data.loader import load_saliency_data, parse_normalised_boxes
from saliency_r1.data.synthetic import SyntheticConfig, SyntheticGroundedVQA
from saliency_r1.data.synthetic import COLORS, tone, worked_completion


def test_synthetic_is_deterministic_and_seeds_differ():
    a, b, c = SyntheticGroundedVQA(6, seed=3), SyntheticGroundedVQA(6, seed=3), SyntheticGroundedVQA(6, seed=4)
    for i in range(6):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
        assert (a[i]["problem"], a[i]["solution"], a[i]["bbox"]) == (b[i]["problem"], b[i]["solution"], b[i]["bbox"])
    assert any(a[i]["image"].tobytes() != c[i]["image"].tobytes() for i in range(6))


@pytest.mark.parametrize("questions", ["shade", "shape"])
@pytest.mark.parametrize("size", [112, 168, 224])
def test_synthetic_box_holds_the_answer(size, questions):
    data = SyntheticGroundedVQA(20, seed=1, config=SyntheticConfig(image_size=size, questions=questions))
    for example in data:
        image, (color, shape, shade) = example["image"], example["target"]
        assert image.size == (size, size)
        x_lo, y_lo, x_hi, y_hi = example["box_pixels"]
        # The object's colour is at its centre (every shape covers its box centre).
        assert image.getpixel(((x_lo + x_hi) // 2, (y_lo + y_hi) // 2)) == tone(COLORS[color], shade)
        if questions == "shade":  # the colour names the object, its tone is the answer
            assert example["solution"] == shade and f"the {color} object" in example["problem"]
        else:
            assert example["solution"] in (color, shape)
            assert (shape if example["solution"] == color else color) in example["problem"]
        assert worked_completion(example) == f"<think>{color} {shade if questions == 'shade' else shape}</think>" \
            f"<answer>{example['solution']}</answer>"
        # The normalised string maps back to the pixel box by docs/method.md section 4's floor rule.
        x1, y1, x2, y2 = parse_normalised_boxes(example["bbox"])[0]
        assert (math.floor(size * x1), math.floor(size * y1), math.floor(size * x2), math.floor(size * y2)) == \
            (x_lo, y_lo, x_hi, y_hi)


def test_synthetic_hf_dataset_matches():
    data = SyntheticGroundedVQA(3, seed=2)
    hf = data.to_hf()
    assert hf.column_names == ["image", "problem", "solution", "bbox"]
    assert hf[1]["bbox"] == data[1]["bbox"] and hf[1]["image"].tobytes() == data[1]["image"].tobytes()


def test_synthetic_rejects_bad_config():
    with pytest.raises(ValueError, match="num_objects"):
        SyntheticConfig(num_objects=9)
    with pytest.raises(ValueError, match="max_object"):
        SyntheticConfig(min_object=40, max_object=30)
    with pytest.raises(ValueError, match="questions"):
        SyntheticConfig(questions="size")


@pytest.mark.parametrize("bad, message", [
    ("[0.1, 0.2, 0.5]", "four numbers"), ("[0.1, 0.2, 1.5, 0.6]", "outside"), ("[0.5, 0.2, 0.1, 0.6]", "x2 < x1"),
    ("not a box", "list of numbers"), ("[]", "no box"), ("[0.1, 0.2, 0.1, 0.6]", "empty"),
])
def test_parse_boxes_names_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_normalised_boxes(bad)


def _png(size=(64, 48), color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(tmp_path):
    """Six records: good, malformed box, box outside, unreadable image, too large, good (path)."""
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return [
        {"image": "ok.png", "problem": "What color?", "solution": "red", "bbox": "[0.1,0.1,0.5,0.5]"},
        {"image": "ok.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,0.5]"},
        {"image": "ok.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,1.2,0.5]"},
        {"image": "broken.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,0.5,0.5]"},
        {"image": "big.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,0.5,0.5]"},
        {"image": "ok.png", "problem": "How many?", "solution": "3", "bbox": "[[0,0,0.5,0.5],[0.5,0.5,1,1]]"},
    ]


def _check(data, tmp_path):
    assert len(data) == 2
    assert [index for index, _ in data.skipped] == [1, 2, 3, 4]
    reasons = dict(data.skipped)
    assert "four numbers" in reasons[1] and "outside" in reasons[2]
    assert "unreadable" in reasons[3] and "max_image_side" in reasons[4]
    first, second = data[0], data[1]
    assert first["index"] == 0 and first["image"].size == (40, 40) and first["solution"] == "red"
    assert second["index"] == 5 and second["boxes"] == [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]


def test_loader_jsonl_skips_bad_records(tmp_path, caplog):
    Image.new("RGB", (600, 100)).save(tmp_path / "big.png")
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records(tmp_path)))
    with caplog.at_level("WARNING"):
        data = load_saliency_data(path, max_image_side=512)
    _check(data, tmp_path)
    assert "record 3 skipped" in caplog.text


def test_loader_parquet_with_image_bytes(tmp_path):
    import datasets

    Image.new("RGB", (600, 100)).save(tmp_path / "big.png")
    records = _records(tmp_path)
    for record in records:  # embed the bytes, as Hugging Face parquet exports do
        record["image"] = {"bytes": (tmp_path / record["image"]).read_bytes(), "path": None}
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "train.parquet"))
    _check(load_saliency_data(tmp_path / "train.parquet"), tmp_path)


def test_loader_image_folder_and_max_side(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png((64, 48)))
    (folder / "b.png").write_bytes(_png((300, 40)))
    rows = [{"file_name": "a.png", "problem": "q", "solution": "green", "bbox": "[0.0,0.0,0.5,0.5]"},
            {"file_name": "b.png", "problem": "q", "solution": "green", "bbox": "[0.0,0.0,0.5,0.5]"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_saliency_data(folder, max_image_side=256)
    assert len(data) == 1 and data[0]["image"].size == (64, 48) and data.skipped[0][0] == 1
    assert len(load_saliency_data(folder, max_image_side=None)) == 2


def test_loader_names_missing_columns(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q"}))
    with pytest.raises(ValueError, match="problem"):
        load_saliency_data(path)


def test_a_jsonl_line_that_is_not_utf8_or_json_is_a_bad_record(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    good = json.dumps({"image": "ok.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,0.5,0.5]"}).encode()
    lines = [good, b'{"image": "ok.png", "problem": "caf\xe9", "solution": "a", "bbox": "[0,0,1,1]"}', b"{not json",
             b"[1, 2]", good]
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines))
    data = load_saliency_data(tmp_path / "train.jsonl")
    assert len(data) == 2 and [data[i]["index"] for i in range(2)] == [0, 4]
    reasons = dict(data.skipped)
    assert "line 2 is not UTF-8" in reasons[1] and "line 3 is not JSON" in reasons[2]
    assert "line 4 is not a JSON object" in reasons[3]


def test_an_image_the_processor_would_reject_is_skipped_at_load(tmp_path):
    """A 500 x 2 PNG passes every other check, but the Qwen processors refuse an aspect ratio over 200: it
    crashed training at step 2 before the loader asked the processor."""
    from saliency_r1.models import image_check
    from saliency_r1.tiny import build_tiny_processor

    Image.new("RGB", (500, 2)).save(tmp_path / "thin.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    rows = [{"image": name, "problem": "q", "solution": "a", "bbox": "[0.1,0.0,0.5,1.0]"} for name in ("ok.png", "thin.png")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    processor = build_tiny_processor()
    data = load_saliency_data(tmp_path / "train.jsonl", check_image=image_check(processor))
    assert len(data) == 1 and data.skipped[0][0] == 1 and "aspect ratio" in data.skipped[0][1]
    assert len(load_saliency_data(tmp_path / "train.jsonl")) == 2  # without the check: what crashed the run
    with pytest.raises(ValueError, match="aspect ratio"):  # the processor itself refuses it
        processor.image_processor(images=[Image.open(tmp_path / "thin.png").convert("RGB")])


def test_a_jsonl_record_without_a_field_is_a_bad_record(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    rows = [{"image": "ok.png", "problem": "q", "solution": "a", "bbox": "[0.1,0.1,0.5,0.5]"},
            {"image": "ok.png", "problem": "q", "bbox": "[0.1,0.1,0.5,0.5]"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = load_saliency_data(tmp_path / "train.jsonl")
    assert len(data) == 1 and data.skipped == [(1, "solution is missing or empty")]
