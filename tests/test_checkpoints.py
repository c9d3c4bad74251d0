"""Checkpoints survive a crash at any moment: writes are atomic, resume takes the newest complete
checkpoint, and a run killed again and again ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saliency_r1.grpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from saliency_r1.grpo.config import TrainConfig
from saliency_r1.grpo.loop import train

SMALL = dict(prompts_per_step=2, num_generations=2, max_completion_length=12, train_size=16, eval_size=2,
             eval_limit=2, micro_batch_size=3, progress=False, use_cpu=True)


def _load_every_checkpoint(output_dir: Path, cold_model: str) -> list[int]:
    """Loads every ``checkpoint-*`` left in ``output_dir`` into a fresh model and optimizer: the steps."""
    from saliency_r1.models import load_policy

    steps = []
    for path in sorted(output_dir.glob("checkpoint-*")):
        model, _ = load_policy(TrainConfig(model=cold_model))
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        steps.append(load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)["step"])
    return steps


@pytest.mark.slow
def test_incomplete_checkpoints_are_skipped_and_named(tmp_path, cold_model, caplog):
    cfg = TrainConfig(**SMALL, model=cold_model, steps=2, save_every=1, output_dir=str(tmp_path))
    train(cfg)
    # What a kill left behind before saves were atomic: a marker written before the configuration, and an
    # empty marker (a kill during its write).
    for step, damage in ((3, "no config"), (4, "empty state")):
        broken = tmp_path / f"checkpoint-{step}"
        os.system(f"cp -r {tmp_path / 'checkpoint-2'} {broken}")
        if damage == "no config":
            (broken / "config.yaml").unlink()
        else:
            (broken / "state.json").write_text("")
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    assert "checkpoint-4: state.json is unreadable" in caplog.text and "checkpoint-3: no config.yaml" in caplog.text
    resumed = train(TrainConfig(**{**cfg.to_dict(), "steps": 3, "resume": "auto"}))
    assert resumed.checkpoint.name == "checkpoint-3" and (resumed.checkpoint / "config.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint: state.json is unreadable"):
        train(TrainConfig(**{**cfg.to_dict(), "steps": 5, "resume": str(tmp_path / "checkpoint-4")}))


def test_weights_with_nan_are_never_written(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(RuntimeError, match="refusing to write .*checkpoint-3: its weights hold NaN or inf"):
        save_checkpoint(tmp_path / "checkpoint-3", model=model, optimizer=optimizer, scheduler=scheduler,
                        state={"step": 3}, config=TrainConfig())
    assert not list(tmp_path.iterdir())


CHILD = textwrap.dedent("""
    # One attempt of a run: resumes what is there, and can be told to stall in the middle of a save.
    import sys, time
    from pathlib import Path
    import torch
    from saliency_r1.grpo.config import TrainConfig
    from saliency_r1.grpo.loop import train

    settings, markers, stall_in_save = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    if stall_in_save:
        import saliency_r1.grpo.checkpoint as checkpoint
        save = checkpoint._save_durably
        def stalling(obj, path):
            save(obj, path)
            if path.name == "optimizer.pt":  # the model is written, the marker not yet
                (markers / "in-save").touch()
                time.sleep(60)
        checkpoint._save_durably = stalling
    (markers / "training").touch()
    train(TrainConfig(**eval(settings)))
""")


@pytest.mark.slow
def test_a_run_killed_again_and_again_ends_where_an_uninterrupted_one_does(tmp_path, cold_model):
    settings = dict(SMALL, model=cold_model, steps=5, save_every=1)
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads (so the same rounding) in every process
    uninterrupted = subprocess.run([sys.executable, str(child), repr({**settings, "output_dir": str(tmp_path / "reference")}),
                                    str(tmp_path), "0"], env=env, capture_output=True, text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = load_file(tmp_path / "reference" / "checkpoint-5" / "model" / "model.safetensors")

    out = tmp_path / "killed"
    rng = random.Random(5)
    kills = []
    for attempt in range(5):
        markers = tmp_path / f"markers-{attempt}"
        markers.mkdir()
        stall = attempt % 2 == 0  # every other kill lands inside a save
        process = subprocess.Popen([sys.executable, str(child), repr({**settings, "output_dir": str(out), "resume": "auto"}),
                                    str(markers), "1" if stall else "0"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        wanted = markers / ("in-save" if stall else "training")
        deadline = time.time() + 120
        while not wanted.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not stall:
            time.sleep(rng.uniform(0.0, 2.0))  # somewhere in the steps (or the saves) that follow
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills.append("in a save" if stall else "at random")
        _, err = process.communicate(timeout=60)
        assert process.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
        # Whatever is left loads; the marker of an unfinished save never names a checkpoint.
        steps = _load_every_checkpoint(out, cold_model)
        assert steps == sorted(steps) and all(json.loads((out / f"checkpoint-{s}" / "state.json").read_text())["step"] == s
                                              for s in steps)
    assert kills.count("in a save") >= 2, kills
    finished = subprocess.run([sys.executable, str(child), repr({**settings, "output_dir": str(out), "resume": "auto"}),
                               str(tmp_path), "0"], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    got = load_file(out / "checkpoint-5" / "model" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert _load_every_checkpoint(out, cold_model) == [1, 2, 3, 4, 5]
