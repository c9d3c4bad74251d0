"""saliency_r1.lmms in lmms-eval: the entry point registers the model, lmms-eval's own command line runs a
checkpoint on an offline task of ours (tests/lmms_task) and scores exactly what our own evaluation scores
on the same records, and the model class answers with the answer span, cut by a task's stop strings.

lmms-eval is an optional extra installed in an environment of its own (.ci/run's third leg, which sets
``SALIENCY_R1_LMMS_TESTS=required``: there a missing or broken lmms-eval fails the tests instead of
skipping them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "lmms_task"
TASK = "saliency_r1_synthetic"
RECORDS, BATCH, MAX_NEW_TOKENS = 10, 4, 64  # 10 records in batches of 4: a ragged last batch


@pytest.fixture(scope="session")
def lmms_eval():
    """lmms-eval, imported (session-scoped, and first among a test's arguments: it skips before the
    session's model fixtures are built)."""
    try:
        import lmms_eval.api.model  # (beside a mismatched torchvision this raises a RuntimeError)
    except Exception as error:  # noqa: BLE001
        reason = (f"lmms-eval does not import ({type(error).__name__}: {error}); pip install 'saliency-r1[lmms]' as "
                  ".ci/run's third leg does")
        if os.environ.get("SALIENCY_R1_LMMS_TESTS") == "required":
            pytest.fail(f"the lmms-eval tests are required here, but {reason}")
        pytest.skip(reason)
    import lmms_eval

    return lmms_eval


def test_without_lmms_eval_the_module_imports_and_the_model_names_the_extra():
    """Importing saliency_r1.lmms needs no lmms-eval (the package's import walk imports every module)."""
    probe = textwrap.dedent("""
        import sys
        sys.modules["lmms_eval"] = None  # as if not installed
        import saliency_r1.lmms as lmms
        try:
            lmms.SaliencyR1(pretrained="anything")
        except ImportError as error:
            print(error)
    """)
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert "pip install 'saliency-r1[lmms]'" in run.stdout


def test_the_entry_point_registers_the_model(lmms_eval):
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == "saliency_r1"]
    assert entry.value == "saliency_r1.lmms:manifest"
    # In a fresh process, importing our module first: lmms-eval's registry loads the entry point while
    # lmms_eval.models initialises, which must not find saliency_r1.lmms half imported.
    probe = textwrap.dedent("""
        import saliency_r1.lmms
        from lmms_eval.api.model import lmms
        from lmms_eval.models import get_model, get_model_manifest
        cls = get_model("saliency_r1")
        print(cls.__module__, cls.__name__, issubclass(cls, lmms), get_model("saliency-r1") is cls,
              get_model_manifest("saliency_r1").simple_class_path)
    """)
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-5:] == ["saliency_r1.lmms", "SaliencyR1", "True", "True", "saliency_r1.lmms.SaliencyR1"]


@pytest.fixture(scope="module")
def records_on_disk(tmp_path_factory):
    """Synthetic records as a Saliency-R1 JSONL file (absolute paths of PNG images) where the task reads it."""
    from saliency_r1.data.synthetic import SyntheticGroundedVQA

    folder = tmp_path_factory.mktemp("lmms-data")
    records = SyntheticGroundedVQA(RECORDS, seed=7)
    lines = []
    for i in range(len(records)):
        record = records[i]
        image = folder / f"{i}.png"
        record["image"].save(image)
        lines.append(json.dumps({"image": str(image), "problem": record["problem"], "solution": record["solution"],
                                 "bbox": record["bbox"]}))
    (folder / f"{TASK}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _lmms_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]


@pytest.mark.slow
def test_lmms_eval_scores_what_our_evaluation_scores(lmms_eval, cold_model, records_on_disk, tmp_path):
    import torch

    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.loader import load_saliency_data
    from saliency_r1.evaluate import evaluate
    from saliency_r1.models import resolve_model
    from saliency_r1.prompts import prompt_inputs, system_prompt_or_default
    from saliency_r1.rewards import accuracy_reward
    from saliency_r1.saliency import generate_with_saliency
    from saliency_r1.spans import answer_text

    out, log = tmp_path / "out", tmp_path / "saliency.jsonl"
    command = _lmms_eval_command() + [
        "--model", "saliency_r1",
        "--model_args", f"pretrained={cold_model},max_new_tokens={MAX_NEW_TOKENS},saliency_log={log}",
        "--tasks", TASK, "--include_path", str(TASK_DIR), "--batch_size", str(BATCH), "--device", "cpu",
        "--output_path", str(out), "--log_samples"]
    environment = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    run = subprocess.run(command, cwd=records_on_disk, env=environment, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    (results_file,) = out.rglob("*_results.json")
    (samples_file,) = out.rglob(f"*_samples_{TASK}.jsonl")
    scores = json.loads(results_file.read_text())["results"][TASK]
    theirs = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    logged = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda s: s["doc_id"])

    # Our own evaluation of the same records, and our engine's completions batch by batch as it draws them.
    source = resolve_model(cold_model)
    model, processor = source.load("cpu", torch.float32), source.processor()
    dataset = load_saliency_data(records_on_disk / f"{TASK}.jsonl", max_image_side=None)
    assert len(dataset) == RECORDS
    system_prompt = system_prompt_or_default(source.system_prompt)
    ours = evaluate(model, processor, dataset, system_prompt=system_prompt, batch_size=BATCH,
                    max_new_tokens=MAX_NEW_TOKENS, path=source.saliency_path, progress=False)
    adapter, completions = get_adapter(model), []
    for start in range(0, RECORDS, BATCH):
        batch = [dataset[i] for i in range(start, min(start + BATCH, RECORDS))]
        inputs = prompt_inputs(processor, adapter, batch, system_prompt)
        with torch.no_grad():
            completions += generate_with_saliency(model, processor, inputs, adapter=adapter, do_sample=False,
                                                  max_new_tokens=MAX_NEW_TOKENS,
                                                  suppress_tokens=adapter.vision_token_ids).texts
    solutions = [dataset[i]["solution"] for i in range(RECORDS)]

    # The scores lmms-eval reports are ours, exactly, and a real fraction (not all right, not all wrong).
    assert scores["accuracy,none"] == ours["accuracy"]
    assert 0 < ours["accuracy"] < 1
    assert scores["format,none"] == ours["format"]
    # Per sample: the same completions, the answer span returned, scored as accuracy_reward scores it.
    assert [s["doc_id"] for s in theirs] == [r["doc_id"] for r in logged] == list(range(RECORDS))
    assert [r["completion"] for r in logged] == completions
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in theirs]
    assert answers == [answer_text(c) or "" for c in completions] == [r["response"] for r in logged]
    assert [s["accuracy"] for s in theirs] == accuracy_reward(completions, solution=solutions)
    # The saliency the model logged is what our evaluation measures.
    assert sum(r["saliency_in_box"] for r in logged) / RECORDS == ours["saliency_in_box"]
    assert sum(float(r["pointing_game"]) for r in logged) / RECORDS == ours["pointing_game"]
    assert ours["saliency_in_box"] > 0


def _requests(docs: dict[str, list[dict]], order: list[tuple[str, int]], gen_kwargs: dict[str, dict], visuals=None):
    from lmms_eval.api.instance import Instance

    visuals = visuals or {}
    return [Instance(request_type="generate_until", idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1},
                     arguments=(docs[task][doc_id]["problem"], gen_kwargs[task],
                                visuals.get(task, lambda doc: [doc["image"]]), doc_id, task, "test"))
            for task, doc_id in order]


def test_the_model_answers_with_the_answer_span_in_request_order(lmms_eval, hub_folder):
    from saliency_r1.data.synthetic import SyntheticGroundedVQA
    from saliency_r1.lmms import SaliencyR1
    from saliency_r1.spans import answer_text

    model = SaliencyR1(pretrained=hub_folder, device="cpu", batch_size=2, max_new_tokens=MAX_NEW_TOKENS)
    assert model.budget({"max_new_tokens": 8}) == MAX_NEW_TOKENS
    records = SyntheticGroundedVQA(3, seed=11)
    docs = {"plain": [records[i] for i in range(3)],
            "cut": [{k: v for k, v in records[i].items() if k != "bbox"} for i in range(3)]}
    model.task_dict = {task: {"test": task_docs} for task, task_docs in docs.items()}
    # Two tasks interleaved; "cut" stops at "r" or "i" (one of them is in "dark", the other in "light"):
    # the answer span is cut, not the completion (whose reasoning holds them too, and would lose its answer).
    order = [("plain", 0), ("cut", 0), ("plain", 1), ("cut", 1), ("plain", 2), ("cut", 2)]
    responses = model.generate_until(_requests(docs, order, {"plain": {"until": ["\n\n"]},
                                                             "cut": {"until": ["r", "i"]}}))
    by_doc = {(s["task"], s["doc_id"]): s for s in model.samples}
    assert len(model.samples) == len(order)
    for (task, doc_id), response in zip(order, responses):
        sample = by_doc[task, doc_id]
        answer = answer_text(sample["completion"])
        assert answer, sample["completion"]  # the cold-started model's completions are well formed
        assert response == sample["response"] == (answer if task == "plain" else re.split("r|i", answer)[0].strip())
        assert ("saliency_in_box" in sample) == (task == "plain")  # only documents with boxes
    assert any(set("ri") & set(answer_text(s["completion"])) for s in model.samples)  # the cut did cut something

    # Two images, or none, in a prompt: answered (no saliency in the box: it is measured on one image).
    answers = model.generate_until(_requests(docs, [("plain", 0), ("plain", 1)], {"plain": {}},
                                             {"plain": lambda doc: [doc["image"], doc["image"]]}))
    answers += model.generate_until(_requests(docs, [("plain", 2)], {"plain": {}}, {"plain": lambda doc: []}))
    assert all(isinstance(a, str) for a in answers) and len(answers) == 3
    assert all("saliency_in_box" not in s for s in model.samples[-3:])

    # A completion cut by the budget has no well-formed answer: "" (scored 0), no saliency in the box.
    model.max_new_tokens = 3
    assert model.generate_until(_requests(docs, [("plain", 0)], {"plain": {}})) == [""]
    assert model.samples[-1]["valid"] is False and model.samples[-1]["saliency_in_box"] == 0.0

    # Without max_new_tokens the budget is the larger of the model's own (256 for a model folder) and the task's.
    model.max_new_tokens = None
    assert model.budget({"max_new_tokens": 1024}) == 1024 and model.budget({"max_new_tokens": 16}) == 256

    with pytest.raises(NotImplementedError, match="log-likelihood"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
