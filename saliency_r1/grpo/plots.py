"""The reward-curve plot of a run, drawn from its JSONL log."""

from __future__ import annotations

import json
from pathlib import Path

# Curves of the upper panel (rewards, each in [0, 1]) and the lower panel (interpretability).
REWARD_KEYS = ("reward/format", "reward/accuracy", "reward/saliency", "reward/total")
SALIENCY_KEYS = ("saliency_in_box", "pointing_game")


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL log (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward_curves(log_path: str | Path, png_path: str | Path, *, title: str | None = None,
                       smooth: int = 5, compare: dict[str, str | Path] | None = None) -> Path:
    """Draws each reward component, saliency-in-box and pointing-game rate against the step.

    Args:
        log_path: the run's ``train.jsonl`` (records with ``step`` and the keys above; held-out
            evaluation records carry ``"split": "eval"`` and are drawn as markers).
        png_path: where the PNG goes (parents created).
        title: figure title (default: the log's directory name).
        smooth: moving-average window over steps (faint raw curves stay visible).
        compare: more runs to overlay on the interpretability panel, ``{label: log_path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"": log_path, **(compare or {})}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for label, path in runs.items():
        records = read_log(path)
        train = [r for r in records if r.get("split", "train") == "train"]
        held_out = [r for r in records if r.get("split") == "eval"]
        steps = [r["step"] for r in train]
        panels = ((top, REWARD_KEYS), (bottom, SALIENCY_KEYS)) if label == "" else ((bottom, SALIENCY_KEYS),)
        for axis, keys in panels:
            for key in keys:
                values = [r[key] for r in train if key in r]
                if not values:
                    continue
                name = f"{label} {key}".strip()
                line, = axis.plot(steps[:len(values)], _smooth(values, smooth), label=name,
                                  linestyle="-" if label == "" else "--")
                axis.plot(steps[:len(values)], values, color=line.get_color(), alpha=0.2)
                evals = [(r["step"], r[f"eval/{key}"]) for r in held_out if f"eval/{key}" in r]
                if evals:
                    axis.plot(*zip(*evals), marker="o", color=line.get_color(), linestyle=":",
                              label=f"{name} (held-out)")
    top.set_ylabel("reward (batch mean)")
    bottom.set_ylabel("rate / fraction")
    bottom.set_xlabel("step")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    fig.suptitle(title or Path(log_path).parent.name)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
