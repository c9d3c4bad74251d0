"""Loading data in the Saliency-R1 format: ``image``, ``problem``, ``solution``, ``bbox``.

``bbox`` holds one normalised box ``[x1, y1, x2, y2]`` (values in ``[0, 1]``) or a list of them, as
a string (``"[0.12,0.30,0.55,0.81]"``) or a list. Sources, all through ``datasets``:

- a parquet file, a JSONL file, or a directory of either (``*.parquet`` / ``*.jsonl``);
- an image folder: images plus ``metadata.jsonl`` (``file_name``, ``problem``, ``solution``, ``bbox``).

``image`` may be decoded images, ``{"bytes", "path"}`` dicts, or paths (relative to the data file's
directory, or to ``image_root``). Every record is checked once when loading; a bad one (a JSONL
line that is not UTF-8 or not JSON, a missing field, an unreadable image, a malformed box, a box
outside the image, an image the model's processor would reject) is reported with its index and
reason and skipped, so a run never crashes on it later. Images larger than
``max_image_side`` on a side are dropped, as in the public setup.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from saliency_r1.boxes import parse_boxes

logger = logging.getLogger(__name__)

REQUIRED = ("image", "problem", "solution", "bbox")


def parse_normalised_boxes(value) -> list[list[float]]:
    """A record's box or boxes, normalised, as a list of ``[x1, y1, x2, y2]``: each checked by
    :func:`saliency_r1.boxes.parse_box`, and at least one (a record needs its evidence).

    >>> parse_normalised_boxes("[0.1, 0.2, 0.5, 0.6]")
    [[0.1, 0.2, 0.5, 0.6]]
    >>> parse_normalised_boxes([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    """
    boxes = parse_boxes(value)
    if not boxes:
        raise ValueError(f"bbox {value!r} holds no box")
    return [list(box) for box in boxes]


def _open_image(value, base: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(_resolve(value["path"], base))
    elif isinstance(value, str):
        image = Image.open(_resolve(value, base))
    else:
        raise ValueError(f"image must be an image, a path or {{'bytes', 'path'}}, got {type(value).__name__}")
    image.load()  # decode now: a truncated file must fail here, not mid-run
    return image.convert("RGB")


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else base / candidate


@dataclass
class SaliencyDataset:
    """Validated records of a Saliency-R1-format source.

    ``dataset[i]`` is a dict: ``image`` (PIL RGB), ``problem``, ``solution``, ``bbox`` (the original
    string), ``boxes`` (``list[[x1, y1, x2, y2]]`` normalised) and ``index`` (the record's index in the
    source). ``skipped`` lists ``(index, reason)`` of every record left out.
    """

    rows: object  # datasets.Dataset with the image column undecoded
    keep: list[int]
    base: Path
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> dict:
        index = self.keep[i]
        row = self.rows[index]
        return {"image": _open_image(row["image"], self.base), "problem": str(row["problem"]),
                "solution": str(row["solution"]), "bbox": row["bbox"] if isinstance(row["bbox"], str)
                else json.dumps(row["bbox"]), "boxes": parse_normalised_boxes(row["bbox"]), "index": index}


@dataclass
class _JsonlRows:
    """The records of JSONL files, one per line, each parsed on its own: a line that is not UTF-8 or not a
    JSON object is a bad record (reported with its index), not a failure of the whole load."""

    records: list[dict | str]  # a record, or why its line is bad
    column_names: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if isinstance(record, str):
            raise ValueError(record)
        return record


def _read_jsonl(files: list[Path]) -> _JsonlRows:
    records, columns = [], {}
    for file in files:
        for number, line in enumerate(file.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                records.append(f"{file.name} line {number} is not UTF-8 ({error.reason} at byte {error.start})")
                continue
            except ValueError as error:
                records.append(f"{file.name} line {number} is not JSON ({error})")
                continue
            if not isinstance(record, dict):
                records.append(f"{file.name} line {number} is not a JSON object")
                continue
            records.append(record)
            columns.update(dict.fromkeys(record))
    return _JsonlRows(records, list(columns))


def _load_rows(path: Path, split: str):
    import datasets

    if path.is_dir():
        parquet, jsonl = sorted(path.glob("*.parquet")), sorted(path.glob("*.jsonl"))
        if (path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file():
            rows = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        elif parquet:
            rows = datasets.load_dataset("parquet", data_files=[str(p) for p in parquet], split=split)
        elif jsonl:
            return _read_jsonl(jsonl)
        else:
            raise FileNotFoundError(f"{path}: no metadata.jsonl (image folder), *.parquet or *.jsonl files")
    elif path.suffix == ".parquet":
        rows = datasets.load_dataset("parquet", data_files=str(path), split=split)
    elif path.suffix in (".jsonl", ".json"):
        return _read_jsonl([path])
    else:
        raise ValueError(f"{path}: expected a .parquet or .jsonl file, or a directory")
    if "image" in rows.column_names and isinstance(rows.features["image"], datasets.Image):
        rows = rows.cast_column("image", datasets.Image(decode=False))  # decode ourselves, record by record
    return rows


def load_saliency_data(path: str | Path, *, split: str = "train", max_image_side: int | None = 512,
                       image_root: str | Path | None = None, limit: int | None = None,
                       check_image: Callable[[Image.Image], None] | None = None) -> SaliencyDataset:
    """Loads and validates a Saliency-R1-format source (see the module docstring).

    Args:
        path: a parquet/JSONL file, a directory of them, or an image folder with ``metadata.jsonl``.
        split: the ``datasets`` split to read.
        max_image_side: records with an image wider or taller than this are dropped (``None``: keep all).
        image_root: directory that relative image paths start from (default: the data's directory).
        limit: validate and keep at most this many records (the first ones).
        check_image: raises ``ValueError`` for an image the model's processor would reject (see
            :func:`saliency_r1.models.image_check`); such records are skipped like any bad one.

    Bad and dropped records are logged (warning) with their index and collected in ``skipped``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    rows = _load_rows(path, split)
    missing = [c for c in REQUIRED if c not in rows.column_names]
    if missing:
        raise ValueError(f"{path}: columns {missing} are missing (have {rows.column_names}); the Saliency-R1 "
                         f"format needs {list(REQUIRED)}")
    base = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    keep, skipped = [], []
    for index in range(len(rows)):
        if limit is not None and len(keep) >= limit:
            break
        try:
            row = rows[index]
            for column in REQUIRED:
                value = row.get(column)
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"{column} is missing or empty")
            parse_normalised_boxes(row["bbox"])
            try:
                image = _open_image(row["image"], base)
            except Exception as error:  # PIL raises many kinds (DecompressionBombError, struct.error, ...)
                raise ValueError(f"unreadable image: {type(error).__name__}: {error}") from None
            if max_image_side is not None and max(image.size) > max_image_side:
                raise ValueError(f"image {image.size[0]}x{image.size[1]} exceeds max_image_side={max_image_side}")
            if check_image is not None:
                check_image(image)
        except ValueError as error:
            skipped.append((index, str(error)))
            logger.warning("%s: record %d skipped: %s", path, index, error)
            continue
        keep.append(index)
    if skipped:
        logger.warning("%s: %d of %d records skipped", path, len(skipped), len(keep) + len(skipped))
    return SaliencyDataset(rows=rows, keep=keep, base=base, skipped=skipped)
