"""The summary of an evaluation run: per model, every rate and faithfulness figure with a 95% interval
over samples, as ``summary.json``, a Markdown table (``summary.md``) and a plot (``summary.png``).

A rate of yes/no outcomes (format, accuracy, pointing game) gets the Wilson score interval, which stays
honest when every sample agrees (8 of 8 is [0.68, 1], not [1, 1]); a mean of continuous values
(saliency-in-box, curve areas, correlations, paired differences) gets a percentile bootstrap (2,000
resamples, seeded, so two runs over the same records give the same summary).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saliency_r1.evaluate import RATES
from saliency_r1.faithfulness import MAP_SOURCES, REPORTED_POINTS

RESAMPLES = 2_000
BINARY_RATES = ("format", "accuracy", "pointing_game")
OUR_SOURCES = ("cot", "direct", "both")
CONTROLS = ("random", "attention")
"""Each of our maps is compared with these on the same samples (paired differences of the AUCs)."""
FAITHFULNESS_FIGURES = ("deletion_auc", "insertion_auc") + tuple(f"{m}_{round(f * 100)}" for m, f in REPORTED_POINTS)


def bootstrap(values, *, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean of ``values`` and its percentile bootstrap interval.

    >>> bootstrap([1.0, 1.0, 1.0])
    {'mean': 1.0, 'low': 1.0, 'high': 1.0, 'n': 3}
    """
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(1)
    tail = (1 - level) / 2 * 100
    return {"mean": float(data.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "n": int(data.size)}


def wilson(successes: float, n: int, *, level: float = 0.95) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the rate ``successes / n`` and its Wilson score interval.

    >>> {k: round(v, 3) for k, v in wilson(8, 8).items()}
    {'mean': 1.0, 'low': 0.676, 'high': 1.0, 'n': 8}
    """
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "low": float(max(0.0, centre - half)), "high": float(min(1.0, centre + half)), "n": n}


def summarise_model(records: list[dict]) -> dict:
    """The summary of one model's sample records (see :func:`saliency_r1.evaluate.evaluate_batch`)."""
    summary: dict = {"samples": len(records)}
    summary["rates"] = {rate: wilson(sum(float(r[rate]) for r in records), len(records)) if rate in BINARY_RATES
                        else bootstrap(float(r[rate]) for r in records) for rate in RATES}
    summary["faithfulness_samples"] = sum(1 for r in records if r.get("faithfulness"))
    faithful = [r["faithfulness"] for r in records if r.get("faithfulness")]
    if faithful:
        summary["faithfulness"] = {
            source: {figure: bootstrap(f[source][figure] for f in faithful) for figure in FAITHFULNESS_FIGURES}
            for source in MAP_SOURCES}
        summary["faithfulness_paired"] = {
            source: {f"{figure} - {control}": bootstrap(f[source][figure] - f[control][figure] for f in faithful)
                     for control in CONTROLS for figure in ("deletion_auc", "insertion_auc")}
            for source in OUR_SOURCES}
        summary["curves"] = {source: {mode: np.mean([f[source][mode] for f in faithful], axis=0).tolist()
                                      for mode in ("deletion", "insertion")} for source in MAP_SOURCES}
    sanity = [r["sanity"] for r in records if r.get("sanity")]
    if sanity:
        from saliency_r1.sanity import FAIL_CORRELATION

        levels = list(sanity[0])  # the cascade's order
        summary["sanity"] = {level: bootstrap(s[level] for s in sanity) for level in levels}
        summary["sanity_passed"] = bool(summary["sanity"][levels[-1]]["mean"] < FAIL_CORRELATION)
    return summary


def _cell(figure: dict, scale: float = 1.0, digits: int = 3) -> str:
    if figure["n"] == 0:
        return "-"
    return f"{figure['mean'] * scale:.{digits}f} [{figure['low'] * scale:.{digits}f}, {figure['high'] * scale:.{digits}f}]"


def summary_markdown(summary: dict) -> str:
    """The tables of ``summary.md``: the rates, a row per model; per model, faithfulness by map source."""
    models = summary["models"]
    skipped = summary.get("records_skipped", 0)
    lines = ["# Evaluation", "", f"Data: {summary['data']}; {summary.get('samples_requested', '?')} samples asked for"
             + (f", {skipped} bad records skipped at load" if skipped else "")
             + "; saliency path per model as listed. Each cell: the rate or mean over samples [95% interval: Wilson "
               "for format, accuracy and pointing game, bootstrap for the rest].", "",
             "| model | path | samples | " + " | ".join(RATES) + " |",
             "|---|---|---|" + "---|" * len(RATES)]
    for name, model in models.items():
        lines.append(f"| {name} | {model['path']} | {model['samples']} | "
                     + " | ".join(_cell(model["rates"][rate]) for rate in RATES) + " |")
    missing = {name: model["samples"] for name, model in models.items()
               if model["samples"] < summary.get("samples_requested", model["samples"])}
    if missing:
        lines += ["", "**Incomplete**: " + "; ".join(f"{name} has {n} of {summary['samples_requested']} samples"
                                                     for name, n in missing.items())
                  + " (rerun with --resume to evaluate the rest)."]
    for name, model in models.items():
        if summary.get("faithfulness") and "faithfulness" not in model:
            lines += ["", f"## Faithfulness: {name}", "", "No well-formed completion: nothing to measure (faithfulness "
                      "follows the answer tokens of well-formed completions)."]
        if "faithfulness" in model:
            figures = FAITHFULNESS_FIGURES
            n = model["faithfulness"][MAP_SOURCES[0]]["deletion_auc"]["n"]
            lines += ["", f"## Faithfulness: {name}", "",
                      f"{n} well-formed completions; the answer tokens' mean probability, teacher-forced, as "
                      f"the top pixels are deleted (lower is more faithful) or inserted (higher is more faithful); "
                      f"baseline {summary['faithfulness']['baseline']}; AUC over r in [0, 1]; points x100.", "",
                      "| map | " + " | ".join(figures) + " |", "|---|" + "---|" * len(figures)]
            for source in MAP_SOURCES:
                cells = [_cell(model["faithfulness"][source][f], 1.0 if f.endswith("auc") else 100.0,
                               4 if f.endswith("auc") else 2) for f in figures]
                lines.append(f"| {source} | " + " | ".join(cells) + " |")
            paired = model["faithfulness_paired"]
            columns = list(paired[OUR_SOURCES[0]])
            lines += ["", "Paired differences on the same samples (a faithful map: deletion AUC below the controls', "
                      "negative; insertion AUC above, positive):", "",
                      "| map | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for source in OUR_SOURCES:
                lines.append(f"| {source} | " + " | ".join(_cell(paired[source][c], digits=4) for c in columns) + " |")
        if summary.get("sanity") and "sanity" not in model:
            lines += ["", f"## Model randomisation: {name}", "", "No well-formed completion: nothing to check."]
        if "sanity" in model:
            verdict = "passed" if model["sanity_passed"] else "FAILED (the maps barely change with the model)"
            lines += ["", f"## Model randomisation: {name} ({verdict})", "",
                      f"Spearman correlation of each `{model['path']}` map with the map of the same completion after "
                      "the model's top language layers, then all of them, then the vision encoder too, are "
                      "randomised.", "",
                      "| layers randomised | correlation |", "|---|---|"]
            lines += [f"| {level.replace('_', ' ').replace('+', ' + ')} | {_cell(figure)} |"
                      for level, figure in model["sanity"].items()]
    return "\n".join(lines) + "\n"


def summary_plot(summary: dict, path: Path) -> None:
    """``summary.png``: the rates per model with their intervals; with faithfulness, each model's mean
    deletion and insertion curves per map source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    with_curves = [name for name, model in models.items() if "curves" in model]
    figure = plt.figure(figsize=(12, 4.2 * (1 + len(with_curves))))
    grid = figure.add_gridspec(1 + len(with_curves), 2)
    bars = figure.add_subplot(grid[0, :])
    width = 0.8 / max(len(models), 1)
    for m, (name, model) in enumerate(models.items()):
        means = [model["rates"][r]["mean"] for r in RATES]
        errors = [[mean - model["rates"][r]["low"] for r, mean in zip(RATES, means)],
                  [model["rates"][r]["high"] - mean for r, mean in zip(RATES, means)]]
        bars.bar(np.arange(len(RATES)) + m * width, means, width, yerr=errors, capsize=3, label=_short(name, 60))
    bars.set_xticks(np.arange(len(RATES)) + width * (len(models) - 1) / 2, [r.replace("_", " ") for r in RATES])
    bars.set_ylim(0, 1.05)
    bars.set_title("rates (95% bootstrap intervals)")
    bars.legend(fontsize=8)
    fractions = summary.get("faithfulness", {}).get("fractions")
    for k, name in enumerate(with_curves):
        for j, mode in enumerate(("deletion", "insertion")):
            axis = figure.add_subplot(grid[1 + k, j])
            for source in MAP_SOURCES:
                axis.plot(fractions, models[name]["curves"][source][mode], marker=".", label=source,
                          linestyle="--" if source in ("random", "gaussian") else "-")
            axis.set_xlabel("fraction of pixels " + ("deleted" if mode == "deletion" else "inserted"))
            axis.set_ylabel("answer probability (mean)")
            axis.set_title(f"{mode}: {_short(name)}")
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def write_summary(out: Path, summary: dict) -> dict[str, Path]:
    """Writes ``summary.json``, ``summary.md`` and ``summary.png`` into ``out``; returns their paths."""
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "plot": out / "summary.png"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["markdown"].write_text(summary_markdown(summary))
    summary_plot(summary, paths["plot"])
    return paths
