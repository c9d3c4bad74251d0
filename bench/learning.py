"""Does the saliency reward teach the policy to look at the evidence? (issue 5's evidence run)

One cold start of the tiny model (or a given checkpoint), then GRPO from it twice per seed with the same seed, steps and
data: the demo's rewards with the saliency reward on (``saliency_weight`` as configured) and off
(``saliency_weight = 0``). Held-out saliency-in-box and pointing game are measured before and at
every ``--eval-every`` steps; the script prints the table for ``bench/RESULTS.md`` and draws the
held-out curves. First it measures the lever the reward can pull: held-out saliency-in-box when
the reasoning (teacher-forced) names the target object against when it names another one.

    python bench/learning.py                       # 3 seeds, the demo configuration (CPU)
    python bench/learning.py --seed 0 --seeds 0 --prompts-per-step 16 --num-generations 8 \
        --learning-rate 3e-4 --train-size 8192 --steps 400 --saliency-weight 10 \
        --eval-limit 128 --eval-size 128 --eval-every 100
                                                   # the smallest configuration that shows the
                                                   # effect (bench/RESULTS.md): 25 min a pair
    python bench/learning.py --seeds 0 --steps 40  # one quick pair
    python bench/learning.py --lever-only          # only the cold start and its levers
    python bench/learning.py --model CKPT --data train.parquet --eval-data held.parquet --seeds 0
                                                   # a real checkpoint on a GPU: no cold start
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from saliency_r1.grpo.config import build_parser, config_from_args
    from saliency_r1.data.sets import load_data
    from saliency_r1.grpo.cold_start import export_cold_start
    from saliency_r1.grpo.loop import train
    from saliency_r1.models import load_policy

    parser = build_parser(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GRPO seeds (one pair each).")
    parser.add_argument("--out", default="runs/learning", help="Where the runs, table and figure go.")
    parser.add_argument("--figure", default="bench/figures/learning_saliency_reward.png", help="The plot.")
    parser.add_argument("--lever-only", action="store_true", help="Stop after measuring the lever (no GRPO).")
    args = parser.parse_args(argv)
    base = config_from_args(args)
    if base.saliency_weight == 0:
        raise SystemExit("--saliency-weight must be non-zero: it is the 'on' run's weight")
    if base.data is not None and (base.model is None or base.eval_data is None):
        raise SystemExit("--data needs --model (the tiny cold start writes reasoning for the synthetic set "
                         "only) and --eval-data (the comparison is on held-out data)")
    if base.data is not None and args.lever_only:
        raise SystemExit("--lever-only needs the synthetic set (leave --data unset)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    if base.model is None:  # the tiny model: one cold start shared by every run
        cold = out / "cold-start"
        if not (cold / "config.json").exists():
            export_cold_start(base, cold)
        print(f"cold start: {time.time() - started:.0f} s ({base.cold_start_steps} steps)", flush=True)
    else:  # a user's checkpoint brings its own cold start
        cold = Path(base.model)
    cold_cfg = dataclasses.replace(base, model=str(cold))
    if base.data is None:  # the levers write worked reasoning, which only the synthetic set has
        model, processor = load_policy(cold_cfg)
        _, held_out = load_data(cold_cfg)
        lever = naming_lever(cold_cfg, model, processor, held_out)
        print("lever (held-out saliency-in-box, reasoning names the target / another object): "
              + ", ".join(f"{path} {target:.3f} / {other:.3f}" for path, (target, other) in lever.items()),
              flush=True)
        for mode, rows in sampled_lever(cold_cfg, model, processor, held_out).items():
            print(f"{mode} completions, by the object the reasoning names (count, mean saliency-in-box): "
                  + ", ".join(f"{named} {n} {mean:.3f}" for named, (n, mean) in rows.items()), flush=True)
        del model
    if args.lever_only:
        return

    runs: dict[tuple[str, int], dict[int, dict]] = {}
    for seed in args.seeds:
        for name, weight in (("on", base.saliency_weight), ("off", 0.0)):
            cfg = dataclasses.replace(cold_cfg, cold_start_steps=0, seed=seed, saliency_weight=weight,
                                      output_dir=str(out / f"saliency-{name}-seed{seed}"), save_every=0,
                                      progress=False)
            began = time.time()
            runs[name, seed] = train(cfg).evaluations
            print(f"seed {seed} saliency {name}: {time.time() - began:.0f} s, held-out "
                  + " -> ".join(f"{m['saliency_in_box']:.3f}/{m['pointing_game']:.3f}"
                                for m in runs[name, seed].values()), flush=True)
    (out / "evaluations.json").write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in runs.items()}, indent=1))
    print_table(runs, args.seeds, base)
    plot(runs, args.seeds, Path(args.figure))
    print(f"total {time.time() - started:.0f} s; figure {args.figure}")


def naming_lever(cfg, model, processor, held_out, count: int = 48) -> dict[str, tuple[float, float]]:
    """Mean held-out saliency reward of worked completions whose reasoning names the target,
    and of ones naming the next object instead, per saliency path."""
    import torch

    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.synthetic import worked_completion
    from saliency_r1.prompts import prompt_inputs, system_prompt_or_default
    from saliency_r1.rewards import saliency_in_box
    from saliency_r1.saliency import saliency_for_completions

    examples = [held_out[i] for i in range(min(count, len(held_out)))]
    inputs = prompt_inputs(processor, get_adapter(model), examples, system_prompt_or_default(cfg.system_prompt))
    eos = processor.tokenizer.eos_token_id
    lever = {}
    for path in ("cot", "direct"):
        means = []
        for shift in (0, 1):  # 0: the target; 1: the next object
            texts = [worked_completion(e, (e["target_index"] + shift) % len(e["objects"])) for e in examples]
            ids = [torch.tensor(processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in texts]
            rollout = saliency_for_completions(model, processor, inputs, ids, path=path)
            rewards = saliency_in_box([m[0] for m in rollout.maps], [e["bbox"] for e in examples],
                                      [(e["image"].height, e["image"].width) for e in examples], rollout.valid)
            means.append(rewards.mean().item())
        lever[path] = tuple(means)
    return lever


def sampled_lever(cfg, model, processor, held_out, count: int = 64,
                  generations: int = 8) -> dict[str, dict[str, tuple[int, float]]]:
    """What the policy itself writes: held-out saliency reward of greedy and of sampled
    (temperature ``cfg.temperature``) completions, grouped by the object their reasoning names
    first (the target, another object of the image, or a colour not in it)."""
    import torch

    from saliency_r1.adapters import get_adapter
    from saliency_r1.grpo.scores import score_rollouts
    from saliency_r1.prompts import prompt_inputs, system_prompt_or_default
    from saliency_r1.saliency import generate_with_saliency

    examples = [held_out[i] for i in range(min(count, len(held_out)))]
    torch.manual_seed(cfg.seed)
    result = {}
    for mode, repeat, sampling in (("greedy", 1, {"do_sample": False}),
                                   ("sampled", generations, {"do_sample": True, "temperature": cfg.temperature,
                                                             "top_k": 0})):
        groups: dict[str, list[float]] = {"target": [], "other": [], "absent": []}
        for start in range(0, len(examples), 8):
            batch = examples[start:start + 8]
            inputs = prompt_inputs(processor, get_adapter(model), batch, system_prompt_or_default(cfg.system_prompt),
                                   repeat=repeat)
            rollout = generate_with_saliency(model, processor, inputs, path=cfg.saliency_path,
                                             max_new_tokens=cfg.max_completion_length, **sampling)
            repeated = [e for e in batch for _ in range(repeat)]
            rewards = score_rollouts(rollout, repeated, [])["saliency"].tolist()
            for text, example, reward in zip(rollout.texts, repeated, rewards):
                words = text.split("<think>")[-1].split("</think>")[0].split()
                colours = [obj[0] for obj in example["objects"]]
                named = ("target" if words[:1] == [example["target"][0]]
                         else "other" if words[:1] and words[0] in colours else "absent")
                groups[named].append(reward)
        result[mode] = {k: (len(v), sum(v) / len(v) if v else float("nan")) for k, v in groups.items()}
    return result


def print_table(runs, seeds, cfg) -> None:
    data = f"{cfg.num_objects}-object synthetic set" if cfg.data is None else cfg.data
    print(f"\n{cfg.model or 'tiny model'} on {data}, {cfg.steps} GRPO steps of {cfg.prompts_per_step} x "
          f"{cfg.num_generations}, {cfg.eval_limit} held-out, saliency weight {cfg.saliency_weight}")
    print("| seed | start SIB / PG / acc | reward on: SIB / PG / acc | reward off: SIB / PG / acc |")
    print("|---|---|---|---|")
    cell = lambda m: f"{m['saliency_in_box']:.3f} / {m['pointing_game']:.3f} / {m['accuracy']:.3f}"  # noqa: E731
    ends = {"on": [], "off": []}
    for seed in seeds:
        on, off = runs["on", seed], runs["off", seed]
        start, last = min(on), max(on)
        ends["on"].append(on[last])
        ends["off"].append(off[last])
        print(f"| {seed} | {cell(on[start])} | {cell(on[last])} | {cell(off[last])} |")
    start = runs["on", seeds[0]][min(runs["on", seeds[0]])]
    mean = {name: {k: statistics.mean(m[k] for m in ms) for k in ("saliency_in_box", "pointing_game", "accuracy")}
            for name, ms in ends.items()}
    print(f"| mean | {cell(start)} | {cell(mean['on'])} | {cell(mean['off'])} |")
    for metric in ("saliency_in_box", "pointing_game"):
        gains = [on[metric] - off[metric] for on, off in zip(ends["on"], ends["off"])]
        spread = f" +- {statistics.stdev(gains) / len(gains) ** 0.5:.3f} (standard error)" if len(gains) > 1 else ""
        wins = sum(gain > 0 for gain in gains)
        print(f"{metric}, reward on - off: {statistics.mean(gains):+.3f}{spread}; on ahead in {wins} of {len(gains)} seeds")


def plot(runs, seeds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in zip(axes, ("saliency_in_box", "pointing_game"),
                                 ("held-out saliency in box", "held-out pointing game")):
        for name, color in (("on", "tab:red"), ("off", "tab:gray")):
            for i, seed in enumerate(seeds):
                evaluations = runs[name, seed]
                steps = sorted(evaluations)
                ax.plot(steps, [evaluations[s][metric] for s in steps], color=color, alpha=0.8, marker="o",
                        markersize=3, label=f"saliency reward {name}" if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
