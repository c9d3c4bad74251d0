"""Does the saliency reward teach the policy to look at the evidence? (the evidence of learning)

Per seed: a cold start of the tiny model with that seed (or a given checkpoint), its lever, then GRPO
from it twice with the same seed, steps and data: the demo's rewards with the saliency reward on
(``saliency_weight`` as configured) and off (``saliency_weight = 0``). Then both final policies are
scored on the same held-out images (paired per image; ``--paired-limit`` of them), and, with
``--faithfulness N``, their maps' deletion and insertion curves are drawn on the first N of them
(``saliency-r1 evaluate --faithfulness``).

The lever is what the reward can pull: the held-out saliency-in-box of the cold start's own sampled
completions whose reasoning names the target, against those naming another object of the image. A
reward for saliency-in-box can only raise it by making the first kind more likely when the
first kind scores higher.

The script prints the table for ``bench/RESULTS.md`` (per seed: lever, start, on, off and the paired
on - off difference; across seeds: the mean on - off with its 95% t-interval and the seeds the reward
leads in), writes ``results.json`` and draws the held-out curves and the gain against the lever.
Each finished stage is kept under ``--out``; a rerun with the same arguments resumes.

    python bench/learning.py --seeds 31 32 33 34 35 36 37 38 --prompts-per-step 16 --num-generations 8 \\
        --learning-rate 3e-4 --train-size 8192 --steps 400 --saliency-weight 10 \\
        --eval-limit 512 --eval-size 512 --eval-every 100 --faithfulness 64 --paired-limit 1536
                                                   # the evidence configuration (bench/RESULTS.md)
    python bench/learning.py --seeds 0 --steps 40  # one quick pair, the demo configuration
    python bench/learning.py --seeds 11 12 --lever-only
                                                   # only the cold starts and their levers
    python bench/learning.py --model CKPT --data train.parquet --eval-data held.parquet --seeds 0
                                                   # a real checkpoint on a GPU: no cold start, no lever
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

METRICS = ("saliency_in_box", "pointing_game", "accuracy")
SHORT = {"saliency_in_box": "SIB", "pointing_game": "PG", "accuracy": "acc"}
# Two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom (no scipy in the environment).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def main(argv: list[str] | None = None) -> None:
    from saliency_r1.grpo.config import build_parser, config_from_args

    parser = build_parser(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Seeds: each gets its own cold start (tiny model) and one on/off pair.")
    parser.add_argument("--out", default="runs/learning", help="Where the runs, table and figure go.")
    parser.add_argument("--figure", default="bench/figures/learning_saliency_reward.png", help="The plot.")
    parser.add_argument("--lever-only", action="store_true", help="Stop after the cold starts and their levers.")
    parser.add_argument("--faithfulness", type=int, default=0, metavar="N",
                        help="Deletion/insertion curves of both final policies' maps on the first N held-out "
                             "images (0: not measured).")
    parser.add_argument("--paired-limit", type=int, default=0, metavar="N",
                        help="Held-out images on which both final policies are scored, paired (0: --eval-limit). "
                             "Changing it rescores kept runs without training them again.")
    args = parser.parse_args(argv)
    base = config_from_args(args)
    if base.saliency_weight == 0:
        raise SystemExit("--saliency-weight must be non-zero: it is the 'on' run's weight")
    if base.data is not None and (base.model is None or base.eval_data is None):
        raise SystemExit("--data needs --model (the tiny cold start writes reasoning for the synthetic set "
                         "only) and --eval-data (the comparison is on held-out data)")
    if args.paired_limit < 0:
        raise SystemExit(f"--paired-limit must be >= 0, got {args.paired_limit}")
    if base.data is not None and args.lever_only:
        raise SystemExit("--lever-only needs the synthetic set (leave --data unset)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(base, seed, out / f"seed-{seed}", lever_only=args.lever_only,
                                 faithfulness=args.faithfulness, paired_limit=args.paired_limit or base.eval_limit)
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print_levers(results)
    if not args.lever_only:
        print_table(results, base)
        plot(results, Path(args.figure))
        print(f"figure {args.figure}")
    print(f"total {time.time() - started:.0f} s; results {out / 'results.json'}")


def run_seed(base, seed: int, out: Path, *, lever_only: bool, faithfulness: int, paired_limit: int) -> dict:
    """Cold start, lever, the on/off pair, the paired held-out scores and the faithfulness of one seed;
    each stage's result is kept in ``out`` and reused by a rerun."""
    from saliency_r1.grpo.cold_start import export_cold_start
    from saliency_r1.grpo.loop import train

    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}

    def keep(key, value):
        result[key] = value
        result_path.write_text(json.dumps(result, indent=1))

    if base.model is None:  # the tiny model: a cold start of this seed
        cold = out / "cold-start"
        recipe = {field.name: getattr(base, field.name) for field in dataclasses.fields(base)
                  if field.name.startswith(("cold_start_", "tiny_", "synthetic_", "num_objects", "image_size"))}
        if result.get("cold_start_recipe", recipe) != recipe:
            raise SystemExit(f"{out}: its cold start was made with {result['cold_start_recipe']}, this run asks for "
                             f"{recipe}; give another --out")
        if not (cold / "config.json").exists():
            began = time.time()
            export_cold_start(dataclasses.replace(base, seed=seed), cold)
            keep("cold_start_seconds", round(time.time() - began, 1))
            keep("cold_start_recipe", recipe)
    else:  # a user's checkpoint brings its own cold start
        cold = Path(base.model)
    cold_cfg = dataclasses.replace(base, model=str(cold), cold_start_steps=0, seed=seed, progress=False)
    if base.data is None and "lever" not in result:  # the levers write worked reasoning: synthetic set only
        keep("lever", lever(cold_cfg))
        print(f"seed {seed} lever: {lever_text(result['lever'])}", flush=True)
    if lever_only:
        return result

    for name, weight in (("on", base.saliency_weight), ("off", 0.0)):
        if name in result:
            if result[name].get("saliency_weight", weight) != weight:
                raise SystemExit(f"{out}: its '{name}' run was trained at saliency weight "
                                 f"{result[name]['saliency_weight']}, this run asks for {weight}; give another --out")
            continue
        # A run killed part-way resumes from its last checkpoint (resume is exact on the CPU).
        cfg = dataclasses.replace(cold_cfg, saliency_weight=weight, output_dir=str(out / f"saliency-{name}"),
                                  save_every=base.eval_every or base.steps, resume="auto")
        began = time.time()
        run = train(cfg)
        keep(name, {"seconds": round(time.time() - began, 1), "checkpoint": str(run.checkpoint),
                    "saliency_weight": weight, "evaluations": {str(k): v for k, v in run.evaluations.items()}})
        print(f"seed {seed} saliency {name}: {result[name]['seconds']:.0f} s, held-out SIB/PG "
              + " -> ".join(f"{m['saliency_in_box']:.3f}/{m['pointing_game']:.3f}"
                            for m in run.evaluations.values()), flush=True)
    if "paired" not in result or result.get("paired_limit", base.eval_limit) != paired_limit:
        # The synthetic held-out set grows to the limit; its first images stay the same (pure in the index).
        scoring = dataclasses.replace(cold_cfg, eval_limit=paired_limit, eval_size=(
            cold_cfg.eval_size if cold_cfg.eval_data else max(cold_cfg.eval_size, paired_limit)))
        keep("paired", paired_held_out(scoring, result["on"]["checkpoint"], result["off"]["checkpoint"]))
        keep("paired_limit", paired_limit)
    if faithfulness and "faithfulness" not in result:
        keep("faithfulness", faithfulness_of(result["on"]["checkpoint"], result["off"]["checkpoint"],
                                             out / "faithfulness", faithfulness))
    return result


def lever(cfg) -> dict:
    """The cold start's levers on the held-out set: teacher-forced (worked reasoning naming the target,
    then the next object) and sampled (the policy's own completions, grouped by the object named)."""
    from saliency_r1.data.sets import load_data
    from saliency_r1.models import load_policy

    model, processor = load_policy(cfg)
    _, held_out = load_data(cfg)
    return {"teacher_forced": naming_lever(cfg, model, processor, held_out),
            **sampled_lever(cfg, model, processor, held_out),
            "anatomy": attention_anatomy(cfg, model, processor, held_out)}


def attention_anatomy(cfg, model, processor, held_out, count: int = 48) -> dict:
    """Why a cold start has a lever or not, from teacher-forced worked completions (``<think>colour
    tone</think><answer>tone</answer>``) naming the target and naming the next object, per layer and head
    (eager attention):

    - ``finder``: the share of the colour row's image attention inside the named object's box (the row
      that predicts the tone, the chain node whose image attention the cot map uses), per head, and
      ``finder_chance``: that share under uniform attention;
    - ``answer_to_think`` / ``answer_to_image``: the answer row's attention on the think tokens and on the
      image tokens, per head;
    - ``reasoning_reads``: how often the colour row's most likely next token is the named object's tone,
      when the named object is not the target (the case the question's colour cannot answer);
    - ``answer_follows_reasoning``: when the reasoning names another object whose tone differs from the
      target's, how often the answer's most likely token is that object's tone rather than the target's
      (0: the answer reads the image, 1: it copies the reasoning).
    """
    import torch

    from saliency_r1.adapters import get_adapter
    from saliency_r1.data.synthetic import normalised_box, worked_completion
    from saliency_r1.prompts import prompt_inputs, system_prompt_or_default
    from saliency_r1.rewards import saliency_in_box

    tokenizer = processor.tokenizer
    text_config = model.config.text_config
    heads = text_config.num_hidden_layers * text_config.num_attention_heads
    finder, chance, to_think, to_image = torch.zeros(heads), [], torch.zeros(heads), torch.zeros(heads)
    reads, follows, rows = [], [], 0
    previous = text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        for index in range(min(count, len(held_out))):
            example = held_out[index]
            inputs = prompt_inputs(processor, get_adapter(model), [example], system_prompt_or_default(cfg.system_prompt))
            P = inputs["input_ids"].shape[1]
            image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
            grid = inputs["image_grid_thw"][0, 1:] // model.config.vision_config.spatial_merge_size
            size = example["image"].width
            for shift in (0, 1):  # the target, then the next object
                named = (example["target_index"] + shift) % len(example["objects"])
                colour, _, shade, box = example["objects"][named]
                ids = tokenizer(worked_completion(example, named), add_special_tokens=False)["input_ids"]
                # <think> colour tone </think> <answer> tone ...: the colour row is P + 1, the answer row P + 4
                sequence = torch.cat([inputs["input_ids"][0], torch.tensor(ids)])[None]
                with torch.no_grad():
                    out = model(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                output_attentions=True)
                attention = torch.cat([a[0] for a in out.attentions])  # [layers * heads, S, S]
                colour_row = attention[:, P + 1, image]
                bbox = normalised_box(box, size)
                maps = [m.reshape(*grid.tolist()) for m in torch.cat([colour_row, torch.ones(1, len(image))])]
                shares = saliency_in_box(maps, [bbox] * len(maps), [(size, size)] * len(maps))
                finder += shares[:-1]
                chance.append(shares[-1].item())
                to_think += attention[:, P + 4, P + 1:P + 3].sum(-1)
                to_image += attention[:, P + 4, image].sum(-1)
                rows += 1
                if shift:
                    reads.append(out.logits[0, P + 1].argmax().item() == ids[2])
                    target_shade = example["objects"][example["target_index"]][2]
                    if shade != target_shade:
                        answer = out.logits[0, P + 4].argmax().item()
                        follows.append(answer == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(shade)[0]))
    finally:
        model.set_attn_implementation({"text_config": previous})
    return {"finder": (finder / rows).tolist(), "finder_chance": statistics.mean(chance),
            "answer_to_think": (to_think / rows).tolist(), "answer_to_image": (to_image / rows).tolist(),
            "reasoning_reads": mean_or_nan(reads), "answer_follows_reasoning": mean_or_nan(follows)}


def naming_lever(cfg, model, processor, held_out, count: int = 48) -> dict[str, list[float]]:
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
    levers = {}
    for path in ("cot", "direct"):
        means = []
        for shift in (0, 1):  # 0: the target; 1: the next object
            texts = [worked_completion(e, (e["target_index"] + shift) % len(e["objects"])) for e in examples]
            ids = [torch.tensor(processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in texts]
            rollout = saliency_for_completions(model, processor, inputs, ids, path=path)
            rewards = saliency_in_box([m[0] for m in rollout.maps], [e["bbox"] for e in examples],
                                      [(e["image"].height, e["image"].width) for e in examples], rollout.valid)
            means.append(rewards.mean().item())
        levers[path] = means
    return levers


def sampled_lever(cfg, model, processor, held_out, count: int = 64, generations: int = 8) -> dict:
    """What the policy itself writes: held-out saliency reward of greedy and of sampled (temperature
    ``cfg.temperature``) completions, grouped by the object their reasoning names first (the target,
    another object of the image, or a colour not in it): ``{mode: {group: [count, mean, standard error]}}``,
    and ``lever``: sampled target - other, with its standard error and whether it is above the noise
    (its 95% interval clear of 0)."""
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
        result[mode] = {k: [len(v), mean_or_nan(v), standard_error(v)] for k, v in groups.items()}
    (_, target, target_se), (_, other, other_se) = result["sampled"]["target"], result["sampled"]["other"]
    difference, error = target - other, math.hypot(target_se, other_se)
    result["lever"] = {"difference": difference, "standard_error": error,
                       "above_noise": bool(difference - 1.96 * error > 0)}
    return result


def paired_held_out(cfg, on_checkpoint: str, off_checkpoint: str) -> dict:
    """Both final policies' greedy completions on the same held-out images (``cfg.eval_limit`` of them):
    the per-image on - off differences' mean and 95% bootstrap interval, per metric."""
    from saliency_r1.data.sets import load_data
    from saliency_r1.evaluate import EvaluationOptions, evaluate_batch
    from saliency_r1.models import load_policy
    from saliency_r1.prompts import system_prompt_or_default
    from saliency_r1.report import bootstrap

    _, held_out = load_data(cfg)
    indices = list(range(min(cfg.eval_limit, len(held_out))))
    options = EvaluationOptions(system_prompt=system_prompt_or_default(cfg.system_prompt),
                                max_new_tokens=cfg.max_completion_length, path=cfg.saliency_path)
    records = {}
    for name, checkpoint in (("on", on_checkpoint), ("off", off_checkpoint)):
        model, processor = load_policy(dataclasses.replace(cfg, model=str(Path(checkpoint) / "model")))
        records[name] = []
        for start in range(0, len(indices), 16):
            batch = indices[start:start + 16]
            records[name] += evaluate_batch(model, processor, [held_out[i] for i in batch], batch, options)
    return {metric: bootstrap(float(a[metric]) - float(b[metric]) for a, b in zip(records["on"], records["off"]))
            for metric in METRICS}


def faithfulness_of(on_checkpoint: str, off_checkpoint: str, out: Path, count: int) -> dict:
    """``saliency-r1 evaluate --faithfulness`` of both final policies on the first ``count`` held-out
    images: per policy, the cot map's deletion and insertion AUC and their paired differences from
    a random ranking and from raw attention (mean and 95% bootstrap interval)."""
    from saliency_r1.cli import main as cli

    cli(["evaluate", on_checkpoint, off_checkpoint, "--out", str(out), "--faithfulness", "--limit", str(count),
         "--resume"])
    summary = json.loads((out / "summary.json").read_text())
    figures = {}
    for name, checkpoint in (("on", on_checkpoint), ("off", off_checkpoint)):
        model = summary["models"][checkpoint]
        figures[name] = {**{f"cot {figure}": model["faithfulness"]["cot"][figure]
                            for figure in ("deletion_auc", "insertion_auc")},
                         **{f"cot {figure}": value for figure, value in model["faithfulness_paired"]["cot"].items()}}
    return figures


def mean_or_nan(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval of ``values`` (independent seeds)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    half = quantile * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def lever_text(lever: dict) -> str:
    sampled = lever["sampled"]
    tf = lever["teacher_forced"]["cot"]
    return (f"sampled target {sampled['target'][1]:.3f} (n {sampled['target'][0]}) / other {sampled['other'][1]:.3f} "
            f"(n {sampled['other'][0]}) / absent {sampled['absent'][1]:.3f} (n {sampled['absent'][0]}); "
            f"difference {lever['lever']['difference']:+.3f} +- {lever['lever']['standard_error']:.3f} "
            f"({'above' if lever['lever']['above_noise'] else 'NOT above'} the noise); "
            f"teacher-forced cot {tf[0]:.3f} / {tf[1]:.3f}; greedy names the target in "
            f"{lever['greedy']['target'][0]} of {sum(g[0] for g in lever['greedy'].values())}")


def print_levers(results: dict) -> None:
    with_lever = {seed: r["lever"] for seed, r in results.items() if "lever" in r}
    if not with_lever:
        return
    print("\n| seed | sampled naming target / other / absent: count, mean SIB | lever (target - other) +- s.e. |")
    print("|---|---|---|")
    for seed, lever in with_lever.items():
        s = lever["sampled"]
        print(f"| {seed} | " + " / ".join(f"{s[k][0]}, {s[k][1]:.3f}" for k in ("target", "other", "absent"))
              + f" | {lever['lever']['difference']:+.3f} +- {lever['lever']['standard_error']:.3f}"
              + ("" if lever["lever"]["above_noise"] else " (not above the noise)") + " |")
    above = sum(lever["lever"]["above_noise"] for lever in with_lever.values())
    print(f"lever above the noise (95% interval clear of 0) in {above} of {len(with_lever)} seeds")


def print_table(results: dict, cfg) -> None:
    data = f"{cfg.num_objects}-object synthetic set" if cfg.data is None else cfg.data
    print(f"\n{cfg.model or 'tiny model'} on {data}, {cfg.steps} GRPO steps of {cfg.prompts_per_step} x "
          f"{cfg.num_generations}, saliency weight {cfg.saliency_weight}; start, on and off: the runs' own evaluations "
          f"({cfg.eval_limit} held-out); on - off: both final policies on the same "
          f"{next(iter(results.values()))['paired']['saliency_in_box']['n']} held-out")
    print("| seed | lever | start SIB / PG / acc | reward on | reward off | on - off SIB [95% paired interval] |")
    print("|---|---|---|---|---|---|")
    cell = lambda m: " / ".join(f"{m[k]:.3f}" for k in METRICS)  # noqa: E731
    for seed, r in results.items():
        evaluations = {name: r[name]["evaluations"] for name in ("on", "off")}
        first, last = min(evaluations["on"], key=int), max(evaluations["on"], key=int)
        lever = f"{r['lever']['lever']['difference']:+.3f}" if "lever" in r else "-"
        paired = r["paired"]["saliency_in_box"]
        print(f"| {seed} | {lever} | {cell(evaluations['on'][first])} | {cell(evaluations['on'][last])} | "
              f"{cell(evaluations['off'][last])} | {paired['mean']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}] |")
    print()
    for metric in METRICS:
        gains = [r["paired"][metric]["mean"] for r in results.values()]
        mean, low, high = t_interval(gains)
        above = sum(r["paired"][metric]["low"] > 0 for r in results.values())
        below = sum(r["paired"][metric]["high"] < 0 for r in results.values())
        print(f"{metric}, reward on - off over {len(gains)} seeds: {mean:+.3f} [95% t-interval {low:+.3f}, "
              f"{high:+.3f}]; on ahead in {sum(g > 0 for g in gains)} of {len(gains)} seeds, "
              f"its paired interval above 0 in {above} and below 0 in {below}")
    faithful = {seed: r["faithfulness"] for seed, r in results.items() if "faithfulness" in r}
    if faithful:
        print("\n| seed | run | cot deletion AUC | cot insertion AUC | deletion - random | insertion - random "
              "| deletion - raw attention | insertion - raw attention |")
        print("|---|---|---|---|---|---|---|---|")
        interval = lambda f: f"{f['mean']:.3f} [{f['low']:.3f}, {f['high']:.3f}]"  # noqa: E731
        for seed, runs in faithful.items():
            for name, f in runs.items():
                print(f"| {seed} | {name} | " + " | ".join(interval(f[f"cot {k}"]) for k in (
                    "deletion_auc", "insertion_auc", "deletion_auc - random", "insertion_auc - random",
                    "deletion_auc - attention", "insertion_auc - attention")) + " |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric, title in zip(axes, ("saliency_in_box", "pointing_game"),
                                 ("held-out saliency in box, change from step 0",
                                  "held-out pointing game, change from step 0")):
        for name, color in (("on", "tab:red"), ("off", "tab:gray")):
            for i, r in enumerate(results.values()):
                evaluations = r[name]["evaluations"]
                steps = sorted(evaluations, key=int)
                start = evaluations[steps[0]][metric]
                ax.plot([int(s) for s in steps], [evaluations[s][metric] - start for s in steps], color=color,
                        alpha=0.7, marker="o", markersize=3, label=f"saliency reward {name}" if i == 0 else None)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    ax = axes[2]
    for seed, r in results.items():
        if "lever" not in r:
            continue
        lever, gain = r["lever"]["lever"], r["paired"]["saliency_in_box"]
        color = "tab:blue" if lever["above_noise"] else "tab:orange"
        ax.errorbar(lever["difference"], gain["mean"], xerr=1.96 * lever["standard_error"],
                    yerr=[[gain["mean"] - gain["low"]], [gain["high"] - gain["mean"]]], fmt="o", color=color,
                    capsize=3)
        ax.annotate(str(seed), (lever["difference"], gain["mean"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("lever: sampled SIB, naming target - another (95%)")
    ax.set_ylabel("gain: held-out SIB, on - off (95%, paired)")
    ax.set_title("gain against lever, per seed (blue: lever above the noise)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
