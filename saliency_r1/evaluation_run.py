"""An evaluation run: several models on the same samples, written into one folder.

    out/run.json                 the settings (a resumed run must match them)
    out/samples-<model>.jsonl    one record per sample (saliency_r1.evaluate.evaluate_batch), appended as
                                 each batch finishes: a rerun with --resume skips what is written
    out/summary.{json,md,png}    the comparison (saliency_r1.report)

Under ``torchrun`` or ``accelerate launch`` each process takes every ``world``-th pending sample and
appends to its own ``samples-<model>.rank<r>.jsonl``; the first process merges the parts (sorted by
sample index) once all are done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from saliency_r1.errors import ConfigError

SETTINGS_FILE = "run.json"
COMPARED_SETTINGS = ("data", "dtype", "faithfulness", "sanity", "seed")
"""Settings a resumed run must share with the run it continues, besides each model's own (path, generation
budget, system prompt: compared per model). The limit, the batch size, the synthetic set's size and the list
of models may change: records are per sample and per model, and each record is checked against the sample it
claims to be (:func:`check_records`)."""
RECORDED_FIELDS = ("problem", "solution", "bbox")
"""What a record keeps of its sample, so that a resumed run can tell the data changed under it."""


def model_key(reference: str) -> str:
    """What a model reference names, written one way: a local folder's resolved path, else the hub id."""
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.exists() else reference


def samples_file(out: Path, reference: str, rank: int | None = None) -> Path:
    """``samples-<name>-<hash>.jsonl`` (``.rank<r>.jsonl`` for one process's part): the model's last path parts
    for a person, a hash of :func:`model_key` so that two models never share a file.

    >>> samples_file(Path("out"), "Qwen/Qwen2.5-VL-3B-Instruct").name
    'samples-Qwen_Qwen2.5-VL-3B-Instruct-0b8dda4c.jsonl'
    """
    key = model_key(reference)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "/".join(Path(key).parts[-2:])).strip("_.") or "model"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    stem = f"samples-{name}-{digest}"
    return out / (f"{stem}.jsonl" if rank is None else f"{stem}.rank{rank}.jsonl")


def read_records(path: Path) -> dict[int, dict]:
    """The records of a samples file by sample index; a last line cut short by a crash is ignored."""
    records: dict[int, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[int(record["index"])] = record
    return records


def cut_partial_line(path: Path) -> None:
    """Drops a last line that a crash left without its newline, so that the next record starts a line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def sample_fields(example: dict) -> dict:
    """The fields of a sample a record keeps (:data:`RECORDED_FIELDS`), as JSON values."""
    return {name: example[name] if isinstance(example[name], (str, int, float)) else json.loads(json.dumps(
        example[name], default=str)) for name in RECORDED_FIELDS}


def check_records(records: dict[int, dict], dataset, reference: str) -> None:
    """Raises :class:`ConfigError` when a written record is not of the sample at its index in ``dataset`` (the
    data changed since it was written)."""
    for index, record in records.items():
        if index >= len(dataset):
            raise ConfigError(f"--resume: {reference}'s record {index} is beyond the {len(dataset)} records of the "
                              "data now: the data changed; choose another folder")
        expected = sample_fields(dataset[index])
        if any(record.get(name) != expected[name] for name in RECORDED_FIELDS if name in record):
            raise ConfigError(f"--resume: {reference}'s record {index} was written for another sample ({record.get('problem')!r}, "
                              f"now {expected['problem']!r}): the data changed; choose another folder")


def written_records(out: Path, reference: str) -> dict[int, dict]:
    """Every record written for ``reference``: the merged file and any process's part."""
    merged = samples_file(out, reference)
    records = read_records(merged)
    for part in sorted(out.glob(merged.stem + ".rank*.jsonl")):
        records.update(read_records(part))
    return records


def merge_parts(out: Path, reference: str) -> list[dict]:
    """Joins the parts of ``reference`` into its samples file (sorted by index, written beside and renamed into
    place), removes the parts, and returns the records."""
    merged = samples_file(out, reference)
    records = written_records(out, reference)
    ordered = [records[i] for i in sorted(records)]
    staging = merged.with_suffix(".jsonl.tmp")
    staging.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    os.replace(staging, merged)
    for part in out.glob(merged.stem + ".rank*.jsonl"):
        part.unlink()
    return ordered


def prepare_out_folder(out: Path, settings: dict, *, resume: bool, write: bool = True) -> None:
    """Checks ``out`` against ``settings`` and records them there.

    Raises:
        ConfigError: ``out`` is a file; ``out`` holds an evaluation's results and ``resume`` is not set;
            ``resume`` is set and the results there were made with other settings (named).
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, where the folder to write the results into is expected")
    saved_path = out / SETTINGS_FILE
    # Results are records; a run that failed before writing one (a model that did not load) left only run.json.
    has_results = out.is_dir() and any(p.stat().st_size > 0 for p in out.glob("samples-*.jsonl"))
    if has_results and not resume:
        raise ConfigError(f"--out {out}: holds the results of an evaluation already; pass --resume to continue it "
                          "(samples already written are skipped), or choose another folder")
    if has_results and saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"--out {out}: its {SETTINGS_FILE} cannot be read ({error}); choose another folder")
        differ = [f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now" for key in COMPARED_SETTINGS
                  if saved.get(key) != settings.get(key)]
        for key, model in settings["models"].items():  # each model's own settings, where it was evaluated before
            before = saved.get("models", {}).get(key)
            if isinstance(before, dict):
                differ += [f"{model['reference']} {name}: {before.get(name)!r} there, {value!r} now"
                           for name, value in model.items() if name != "reference" and before.get(name) != value]
        if differ:
            raise ConfigError(f"--resume: the results in {out} were made with other settings ({'; '.join(differ)}); "
                              "choose another folder for these")
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if saved_path.exists() and has_results:  # keep the models evaluated before, add the new ones
                saved = json.loads(saved_path.read_text())
                settings = {**settings, "models": {**saved.get("models", {}), **settings["models"]}}
            saved_path.write_text(json.dumps(settings, indent=2))
        except OSError as error:
            raise ConfigError(f"--out {out}: cannot write into it ({error.strerror})") from None


@dataclass
class ModelRun:
    """One model of the run: what it names, how it is evaluated."""

    reference: str
    source: object  # saliency_r1.models.ModelSource
    path: str
    max_new_tokens: int
    system_prompt: str

    def settings(self) -> dict:
        """What a resumed run must evaluate this model with again."""
        return {"reference": self.reference, "path": self.path, "max_new_tokens": self.max_new_tokens,
                "system_prompt": self.system_prompt}


def run_evaluation(runs: list[ModelRun], dataset, *, count: int, out: Path, data_name: str, options_extra: dict,
                   batch_size: int, device: str, dtype, progress: bool = True, skipped: int = 0) -> dict:
    """Evaluates every model of ``runs`` on the first ``count`` records of ``dataset`` (resuming what is written),
    then, on the first process, merges the parts and writes the summary. Returns the summary (``{}`` on the other
    processes).

    Args:
        options_extra: keyword arguments of :class:`~saliency_r1.evaluate.EvaluationOptions` shared by every
            model (``faithfulness``, ``sanity``, ``seed``).
        skipped: bad records the data loader skipped (reported in the summary).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from saliency_r1.evaluate import EvaluationOptions, evaluate_batch
    from saliency_r1.report import summarise_model, write_summary

    state = PartialState()  # the one the command set up (a shared singleton)
    rank, world = state.process_index, state.num_processes
    for run in runs:
        done = written_records(out, run.reference)
        check_records(done, dataset, run.reference)
        mine = [i for i in range(count) if i not in done][rank::world]
        if not mine:
            continue
        options = EvaluationOptions(system_prompt=run.system_prompt, max_new_tokens=run.max_new_tokens, path=run.path,
                                    **options_extra)
        try:
            model = run.source.load(device, dtype)
        except ConfigError:
            raise
        except Exception as error:  # a model that cannot load is a usage error naming it, not a traceback
            raise ConfigError(f"{run.reference}: the model cannot be loaded ({type(error).__name__}: {error})") from None
        processor = run.source.processor()
        part = samples_file(out, run.reference, rank if world > 1 else None)
        cut_partial_line(part)
        with part.open("a") as sink, tqdm(total=len(mine), desc=f"evaluate {run.reference}", leave=True,
                                          disable=not (progress and state.is_main_process)) as bar:
            for start in range(0, len(mine), batch_size):
                indices = mine[start:start + batch_size]
                examples = [dataset[i] for i in indices]
                for record, example in zip(evaluate_batch(model, processor, examples, indices, options), examples):
                    sink.write(json.dumps({**record, **sample_fields(example)}) + "\n")
                sink.flush()
                bar.update(len(indices))
        del model
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    summary = {"data": data_name, "samples_requested": count, "records_skipped": skipped,
               "sanity": bool(options_extra.get("sanity")), "models": {}}
    if options_extra.get("faithfulness") is not None:
        faithful = options_extra["faithfulness"]
        summary["faithfulness"] = {"baseline": faithful.baseline, "steps": faithful.steps, "seed": faithful.seed,
                                   "fractions": faithful.fractions}
    for run in runs:
        records = [r for r in merge_parts(out, run.reference) if r["index"] < count]
        summary["models"][run.reference] = {"path": run.path, "samples_file": samples_file(out, run.reference).name,
                                            **summarise_model(records)}
    summary["files"] = {name: str(path) for name, path in write_summary(out, summary).items()}
    return summary
