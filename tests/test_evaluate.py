"""saliency-r1 evaluate: any model, several side by side, per-sample records, resuming, sharding, faithfulness,
the randomisation check, the summary, and bad input named before work is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saliency_r1.cli import main
from saliency_r1.evaluation_run import read_records, samples_file
from saliency_r1.faithfulness import MAP_SOURCES, fraction_grid
from saliency_r1.grpo.config import TrainConfig
from saliency_r1.report import bootstrap, summarise_model, summary_markdown
from saliency_r1.sanity import cascade_levels, randomised_top_layers, spearman

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------- the command


def test_two_models_on_the_same_samples_with_faithfulness_and_the_randomisation_check(hub_folder, cold_model, tmp_path,
                                                                                       capsys):
    out = tmp_path / "eval"
    code, printed = _run(["evaluate", hub_folder, cold_model, "--synthetic", "3", "--out", str(out), "--faithfulness",
                          "--steps", "4", "--sanity", "--max-new-tokens", "24", "--batch-size", "2"], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == [hub_folder, cold_model]
    assert summary["faithfulness"]["fractions"] == fraction_grid(4)
    first, second = (read_records(samples_file(out, m)) for m in (hub_folder, cold_model))
    assert sorted(first) == sorted(second) == [0, 1, 2]
    # The same weights saved two ways: the same completions on the same samples, the same numbers.
    assert [first[i]["completion"] for i in range(3)] == [second[i]["completion"] for i in range(3)]
    for record in first.values():
        assert set(record) >= {"completion", "valid", "format", "accuracy", "saliency_in_box", "pointing_game",
                               "faithfulness", "sanity"}
        if record["valid"]:
            assert set(record["faithfulness"]) == set(MAP_SOURCES)
            for curve in record["faithfulness"].values():
                assert len(curve["deletion"]) == len(curve["insertion"]) == len(fraction_grid(4))
                assert 0 <= curve["deletion_auc"] <= 1 and 0 <= curve["insertion_auc"] <= 1
            assert [name for name, _, _ in cascade_levels(TrainConfig().tiny_layers)] == list(record["sanity"])
    model = summary["models"][hub_folder]
    assert model["samples"] == 3 and set(model["faithfulness"]) == set(MAP_SOURCES)
    rate = model["rates"]["accuracy"]
    assert rate["low"] <= rate["mean"] <= rate["high"]
    table = (out / "summary.md").read_text()
    assert table in printed.out and f"| {hub_folder} | cot | 3 |" in table and f"| {cold_model} | cot | 3 |" in table
    assert "## Faithfulness" in table and "## Model randomisation" in table
    assert (out / "summary.png").stat().st_size > 20_000


def test_a_rerun_refuses_the_folder_and_resume_evaluates_only_what_is_missing(hub_folder, tmp_path, capsys,
                                                                               monkeypatch):
    import saliency_r1.evaluate as evaluate_module

    evaluated = []
    real = evaluate_module.evaluate_batch

    def counting(model, processor, examples, indices, options):
        evaluated.extend(indices)
        return real(model, processor, examples, indices, options)

    monkeypatch.setattr(evaluate_module, "evaluate_batch", counting)
    out = tmp_path / "eval"
    base = ["evaluate", hub_folder, "--synthetic", "4", "--out", str(out), "--max-new-tokens", "16"]
    assert _run(base + ["--limit", "2"], capsys)[0] == 0
    assert evaluated == [0, 1]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = _refused(base, capsys)
    assert f"--out {out}: holds the results of an evaluation" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    err = _refused(base + ["--resume", "--path", "direct"], capsys)
    assert "other settings" in err and "path" in err
    assert _run(base + ["--resume"], capsys)[0] == 0
    assert evaluated == [0, 1, 2, 3]
    records = read_records(samples_file(out, hub_folder))
    assert sorted(records) == [0, 1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["models"][hub_folder]["samples"] == 4


def test_a_record_cut_short_by_a_crash_is_evaluated_again(hub_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    base = ["evaluate", hub_folder, "--synthetic", "3", "--out", str(out), "--max-new-tokens", "8"]
    assert _run(base, capsys)[0] == 0
    path = samples_file(out, hub_folder)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1]) + lines[1][:25])  # a crash in the middle of writing record 1
    assert list(read_records(path)) == [0]
    code, printed = _run(base + ["--resume"], capsys)
    assert code == 0 and sorted(read_records(path)) == [0, 1, 2]
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_model_named_two_ways_is_refused_and_two_models_never_share_a_file(hub_folder, tmp_path, capsys):
    assert "named twice" in _refused(["evaluate", hub_folder, hub_folder + "/", "--out", str(tmp_path / "e"),
                                      "--synthetic", "1"], capsys)
    for name in ("run 1", "run_1"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert samples_file(tmp_path, str(tmp_path / "m" / "run 1")) != samples_file(tmp_path, str(tmp_path / "m" / "run_1"))
    (tmp_path / "link").symlink_to(hub_folder)  # one model, two names: one file
    assert samples_file(tmp_path, str(tmp_path / "link")) == samples_file(tmp_path, hub_folder)


def test_resume_refuses_data_that_changed_and_takes_a_larger_synthetic_set(hub_folder, tmp_path, capsys):
    from saliency_r1.data.synthetic import SyntheticGroundedVQA

    records = []
    for i, example in enumerate(SyntheticGroundedVQA(4, seed=5)):
        example["image"].save(tmp_path / f"{i}.png")
        records.append(json.dumps({"image": f"{i}.png", "problem": example["problem"], "solution": example["solution"],
                                   "bbox": example["bbox"]}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(records) + "\n")
    out = tmp_path / "eval"
    base = ["evaluate", hub_folder, "--data", str(data), "--out", str(out), "--max-new-tokens", "8"]
    assert _run(base + ["--limit", "2"], capsys)[0] == 0
    data.write_text("\n".join(records[1:]) + "\n")  # the first record removed: every index now names another one
    assert "the data changed" in _refused(base + ["--resume"], capsys)

    synthetic = ["evaluate", hub_folder, "--out", str(tmp_path / "s"), "--max-new-tokens", "8"]
    assert _run(synthetic + ["--synthetic", "2"], capsys)[0] == 0
    assert _run(synthetic + ["--synthetic", "3", "--resume"], capsys)[0] == 0
    assert "other settings" in _refused(synthetic + ["--synthetic", "3", "--resume", "--dtype", "float64"], capsys)
    assert "other settings" in _refused(synthetic + ["--synthetic", "3", "--resume", "--max-new-tokens", "9"], capsys)


def test_a_failed_run_leaves_no_results_to_refuse_and_the_summary_says_what_was_not_measured(hub_folder, tmp_path,
                                                                                              capsys):
    out = tmp_path / "eval"
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(hub_folder):
        (broken / name).write_bytes((Path(hub_folder) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot be loaded" in _refused(["evaluate", str(broken), "--synthetic", "2", "--out", str(out)], capsys)
    code, printed = _run(["evaluate", hub_folder, "--synthetic", "2", "--out", str(out), "--max-new-tokens", "2",
                          "--faithfulness", "--sanity"], capsys)
    assert code == 0
    assert "No well-formed completion: nothing to measure" in printed.out
    assert "No well-formed completion: nothing to check" in printed.out


@pytest.mark.parametrize("case", ["limit 0", "both data sources", "twice", "no data", "bad records",
                                  "only bad records", "missing data", "cannot load", "out is a file"])
def test_bad_input_is_named(case, hub_folder, tmp_path, capsys):
    from saliency_r1.data.synthetic import SyntheticGroundedVQA

    out = str(tmp_path / "eval")
    good = SyntheticGroundedVQA(1, seed=5)[0]
    good["image"].save(tmp_path / "good.png")
    record = {"image": "good.png", "problem": good["problem"], "solution": good["solution"], "bbox": good["bbox"]}
    if case == "limit 0":
        assert "--limit" in _refused(["evaluate", hub_folder, "--out", out, "--limit", "0"], capsys)
    elif case == "both data sources":
        assert "not allowed with" in _refused(["evaluate", hub_folder, "--out", out, "--synthetic", "2", "--data",
                                               "x.jsonl"], capsys)
    elif case == "twice":
        assert "named twice" in _refused(["evaluate", hub_folder, hub_folder, "--out", out, "--synthetic", "1"], capsys)
    elif case == "no data":
        assert "pass --data PATH or --synthetic N" in _refused(["evaluate", hub_folder, "--out", out], capsys)
    elif case in ("bad records", "only bad records"):
        lines = ["{not json", json.dumps({**record, "bbox": "[0.5,0.5,0.1,0.1]"})]
        if case == "bad records":
            lines.append(json.dumps(record))
        (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
        argv = ["evaluate", hub_folder, "--out", out, "--data", str(tmp_path / "data.jsonl"), "--max-new-tokens", "8"]
        if case == "bad records":
            code, printed = _run(argv, capsys)
            assert code == 0 and "2 bad records skipped" in printed.err
            assert list(read_records(samples_file(Path(out), hub_folder))) == [0]
        else:
            assert "no usable records (2 skipped" in _refused(argv, capsys)
    elif case == "missing data":
        assert "no such file" in _refused(["evaluate", hub_folder, "--out", out, "--data", str(tmp_path / "x.jsonl")],
                                          capsys)
    elif case == "cannot load":
        broken = tmp_path / "broken"
        broken.mkdir()
        for name in os.listdir(hub_folder):
            (broken / name).write_bytes((Path(hub_folder) / name).read_bytes())
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        err = _refused(["evaluate", str(broken), "--out", out, "--synthetic", "1"], capsys)
        assert f"{broken}: the model cannot be loaded" in err
    elif case == "out is a file":
        Path(out).write_text("x")
        assert "a file, where the folder" in _refused(["evaluate", hub_folder, "--out", out, "--synthetic", "1"],
                                                      capsys)


@pytest.mark.slow
def test_two_processes_share_the_samples_and_merge_them(hub_folder, tmp_path):
    """Under torchrun each process evaluates every other sample; the merged file equals one process's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    common = [hub_folder, "--synthetic", "5", "--max-new-tokens", "16", "--batch-size", "2"]
    single = subprocess.run([sys.executable, "-m", "saliency_r1.cli", "evaluate", *common, "--out",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "saliency_r1.cli", "evaluate", *common, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))  # the parts are merged away
    one, two = (read_records(samples_file(tmp_path / name, hub_folder)) for name in ("one", "two"))
    assert sorted(two) == [0, 1, 2, 3, 4]
    for index in range(5):
        for key in ("completion", "accuracy", "format", "valid", "pointing_game"):
            assert one[index][key] == two[index][key], (index, key)
        assert one[index]["saliency_in_box"] == pytest.approx(two[index]["saliency_in_box"], abs=1e-6)
    assert double.stdout.count("# Evaluation") == 1  # one process summarises


# ---------------------------------------------------------------------------------------- the parts


def test_randomised_layers_change_the_maps_and_are_restored_bit_for_bit():
    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.synthetic import SyntheticGroundedVQA
    from saliency_r1.prompts import SYSTEM_PROMPT, prompt_inputs
    from saliency_r1.saliency import saliency_for_completions
    from saliency_r1.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=3).eval()
    adapter = get_adapter(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    example = SyntheticGroundedVQA(1, seed=2)[0]
    inputs = prompt_inputs(processor, adapter, [example], SYSTEM_PROMPT)
    ids = processor.tokenizer("<think>red dark</think><answer>dark</answer>", add_special_tokens=False)["input_ids"]
    completion = [ids + [processor.tokenizer.eos_token_id]]
    original = saliency_for_completions(model, processor, inputs, completion, path="both").maps[0][0]
    seen = []
    for name, count, vision in cascade_levels(adapter.num_layers):
        with randomised_top_layers(adapter, count, vision=vision, seed=0):
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
            seen.append((name, changed))
            randomised = saliency_for_completions(model, processor, inputs, completion, path="both").maps[0][0]
        assert not torch.allclose(randomised, original)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    top = {name: changed for name, changed in seen}
    assert top["top_1"] and all(".layers.1." in n for n in top["top_1"])  # the top layer of two, matrices only
    assert any(".layers.0." in n for n in top["top_2"]) and not any("visual" in n for n in top["top_2"])
    assert any("visual" in n for n in top["top_2+vision"])
    assert not any("norm" in n or n.endswith("bias") for _, changed in seen for n in changed)


def test_spearman_against_its_definition():
    a = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    b = torch.tensor([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0])

    def ranks(x):  # average ranks of ties, written out
        return torch.tensor([float((x < v).sum()) + (float((x == v).sum()) - 1) / 2 for v in x])

    ra, rb = ranks(a), ranks(b)
    expected = float(((ra - ra.mean()) * (rb - rb.mean())).sum() / ((ra - ra.mean()).norm() * (rb - rb.mean()).norm()))
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman(a, a.exp()) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(8)) == 0.0


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.0, 1.0] * 50
    first, second = bootstrap(values), bootstrap(values)
    assert first == second and first["n"] == 100 and first["mean"] == 0.5
    assert 0.38 < first["low"] < 0.5 < first["high"] < 0.62  # about 1.96 standard errors (0.05) each side
    assert bootstrap([])["n"] == 0


def test_the_summary_table_has_a_row_per_model():
    record = {"format": True, "accuracy": 1.0, "saliency_in_box": 0.25, "pointing_game": True, "faithfulness": None}
    summary = {"data": "d", "models": {"a": {"path": "cot", **summarise_model([record] * 3)},
                                       "b": {"path": "direct", **summarise_model([{**record, "accuracy": 0.0}])}}}
    table = summary_markdown(summary)
    assert "| a | cot | 3 | 1.000 [0.439, 1.000] | 1.000 [0.439, 1.000] | 0.250 [0.250, 0.250]" in table
    assert "| b | direct | 1 | 1.000 [0.207, 1.000] | 0.000 [0.000, 0.793]" in table
    assert "Faithfulness" not in table
