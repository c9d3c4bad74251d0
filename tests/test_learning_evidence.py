"""bench/learning.py, the evidence of learning: per seed a cold start, its lever, an on/off pair, the paired
held-out comparison and the maps' faithfulness, resumable; the interval arithmetic it reports."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from saliency_r1.grpo.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning_evidence", ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_is_students(learning):
    mean, low, high = learning.t_interval([1.0, 2.0, 3.0])  # s.d. 1, s.e. 1/sqrt(3), t(2) = 4.303
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / 3 ** 0.5, abs=1e-3) and mean - low == high - mean
    assert learning.t_interval([0.5])[1] != learning.t_interval([0.5])[1]  # NaN: one seed has no interval
    many = [float(v % 7) for v in range(100)]  # past the table: the normal quantile
    assert learning.t_interval(many)[2] - statistics.mean(many) == pytest.approx(
        1.96 * statistics.stdev(many) / 10, rel=1e-9)


@pytest.mark.slow
def test_two_seeds_end_to_end_and_a_rerun_resumes(learning, tmp_path, monkeypatch):
    # 40 cold-start steps at 3e-3 give well-formed completions (tests/conftest.py), so every measure is live.
    args = ["--seeds", "3", "4", "--cold-start-steps", "40", "--cold-start-lr", "3e-3", "--cold-start-batch", "8",
            "--cold-start-size", "16", "--train-size", "16",
            "--steps", "2", "--eval-every", "1", "--prompts-per-step", "2", "--num-generations", "2",
            "--max-completion-length", "12", "--eval-size", "4", "--eval-limit", "4", "--saliency-weight", "10",
            "--faithfulness", "2", "--progress", "false", "--out", str(tmp_path / "runs"),
            "--figure", str(tmp_path / "learning.png")]
    learning.main(args)
    results = json.loads((tmp_path / "runs" / "results.json").read_text())
    shape = TrainConfig()
    assert sorted(results) == ["3", "4"] and (tmp_path / "learning.png").stat().st_size > 0
    for seed, result in results.items():
        sampled = result["lever"]["sampled"]
        assert sum(group[0] for group in sampled.values()) == 4 * 8  # every sampled completion is grouped
        lever = result["lever"]["lever"]
        assert lever["difference"] == pytest.approx(sampled["target"][1] - sampled["other"][1], nan_ok=True)
        assert len(result["lever"]["anatomy"]["finder"]) == shape.tiny_layers * shape.tiny_heads  # one per head
        # The paired held-out scores are the final policies' greedy completions again: their on - off means
        # must equal the difference of the two runs' own final evaluations.
        last = {name: result[name]["evaluations"]["2"] for name in ("on", "off")}
        for metric in learning.METRICS:
            paired = result["paired"][metric]
            assert paired["n"] == 4 and paired["low"] <= paired["mean"] <= paired["high"]
            assert paired["mean"] == pytest.approx(last["on"][metric] - last["off"][metric], abs=1e-6)
        for run in ("on", "off"):
            faithful = result["faithfulness"][run]
            assert 0 <= faithful["cot deletion_auc"]["mean"] <= 1 and faithful["cot insertion_auc"]["n"] == 2
            assert {"cot deletion_auc - random", "cot insertion_auc - attention"} <= set(faithful)

    def no_training(cfg):
        raise AssertionError("a finished pair was trained again")

    monkeypatch.setattr("saliency_r1.grpo.loop.train", no_training)
    learning.main(args)  # every stage is kept: nothing reruns, the same results come back
    assert json.loads((tmp_path / "runs" / "results.json").read_text()) == results
    learning.main(args + ["--paired-limit", "3"])  # a new paired size rescores the kept policies, trains nothing
    rescored = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert all(rescored[seed]["paired"]["accuracy"]["n"] == 3 and rescored[seed]["on"] == results[seed]["on"]
               for seed in results)
    with pytest.raises(SystemExit, match="its cold start was made with"):  # another recipe: not mixed in
        learning.main(args + ["--cold-start-grounding", "0"])
    with pytest.raises(SystemExit, match="trained at saliency weight 10"):  # nor a run of another weight
        learning.main(args + ["--saliency-weight", "3"])
