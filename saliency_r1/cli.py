"""The ``saliency-r1`` command.

    saliency-r1 train                      # tiny VLM, synthetic set, CPU, a few minutes
    saliency-r1 train --model Qwen/Qwen2.5-VL-3B-Instruct --data train.parquet --eval-data val.parquet \\
        --lora true --learning-rate 1e-5 --num-generations 8 --max-completion-length 512 --bf16 true \\
        --micro-batch-size 2
    accelerate launch -m saliency_r1.cli train ...  # several GPUs (DDP; not FSDP or DeepSpeed)
    saliency-r1 evaluate runs/saliency-r1/checkpoint-40 [--data val.parquet] [--limit 200]
    saliency-r1 explain runs/saliency-r1/checkpoint-40 --image cat.png --question "What is on the mat?"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saliency_r1.grpo.config import ConfigError

TRACKER_NAMES = {"tensorboard": "TensorBoard", "wandb": "W&B run"}


def _train(args: argparse.Namespace) -> int:
    from saliency_r1.grpo.config import config_from_args
    from saliency_r1.grpo.loop import train

    cfg = config_from_args(args)
    result = train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"logs (JSONL):      {result.log_path}")
        for tracker, directory in result.tracker_dirs.items():
            print(f"{TRACKER_NAMES[tracker] + ':':<19}{directory}")
        print(f"reward curves:     {result.plot_path}")
        print(f"final checkpoint:  {result.checkpoint}")
        for step, metrics in sorted(result.evaluations.items()):
            print(f"held-out @ step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                         if k != "samples"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from saliency_r1.data.sets import load_data
    from saliency_r1.evaluate import evaluate
    from saliency_r1.grpo.checkpoint import load_trained
    from saliency_r1.prompts import system_prompt_or_default

    _check_checkpoint(args.checkpoint)
    if args.data and not Path(args.data).exists():
        raise ConfigError(f"--data {args.data}: no such file or directory")
    _make_parent(args.out)
    model, processor, cfg = load_trained(args.checkpoint)
    if args.data:
        from saliency_r1.data.loader import load_saliency_data
        from saliency_r1.models import image_check

        dataset = load_saliency_data(args.data, max_image_side=cfg.max_image_side, check_image=image_check(processor))
    else:
        _, dataset = load_data(cfg, processor)
        if dataset is None:
            raise ConfigError("this run had no held-out data: pass --data")
    metrics = evaluate(model, processor, dataset, system_prompt=system_prompt_or_default(cfg.system_prompt),
                       limit=args.limit,
                       max_new_tokens=cfg.max_completion_length, path=cfg.saliency_path,
                       bf16=cfg.uses_bf16(next(model.parameters()).device.type))
    print(json.dumps(metrics, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from PIL import Image

    from saliency_r1.explain import explain
    from saliency_r1.grpo.checkpoint import load_trained

    try:  # the image before the model: a bad path costs nothing
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as error:
        raise ConfigError(f"--image {args.image}: not an image that can be read ({error})") from None
    _check_checkpoint(args.checkpoint)
    _make_parent(args.out)
    model, processor, cfg = load_trained(args.checkpoint)
    result = explain(model, processor, image, args.question, boxes=args.box, system_prompt=cfg.system_prompt,
                     path=cfg.saliency_path, max_new_tokens=cfg.max_completion_length)
    print(result.text)
    print("valid:", result.valid, "| think:", "".join(result.think_tokens), "| answer:", "".join(result.answer_tokens))
    if result.reward is not None:
        print(f"saliency in box: {result.reward:.3f}")
    if args.out:
        from saliency_r1.viz import plot_explanation, save_png

        save_png(plot_explanation(result, boxes=args.box), args.out)
        print("overlay:", args.out)
    return 0


def _check_checkpoint(path: str) -> None:
    """A checkpoint written by train, complete; a run's folder gets the name of its latest checkpoint."""
    from saliency_r1.grpo.checkpoint import checkpoint_problem, latest_checkpoint

    problem = checkpoint_problem(path)
    if problem is None:
        return
    latest = latest_checkpoint(path) if Path(path).is_dir() else None
    hint = f"; this looks like a run's folder: its latest checkpoint is {latest}" if latest else ""
    raise ConfigError(f"{path}: not a checkpoint written by train ({problem}){hint}")


def _make_parent(out: str | None) -> None:
    """The folder an --out file goes to, made before the work rather than failing after it."""
    if out:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--out {out}: cannot create its folder ({error.strerror})") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _box_argument(text: str) -> str:
    """A box as the data holds them, checked as the data loader checks them (one validation of boxes)."""
    from saliency_r1.data.loader import parse_normalised_boxes

    try:
        parse_normalised_boxes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from saliency_r1.grpo.config import build_parser as config_parser

    parser = argparse.ArgumentParser(prog="saliency-r1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    config_parser(commands.add_parser("train", help="GRPO with saliency rewards (no arguments: the CPU demo)"))
    evaluate = commands.add_parser("evaluate", help="held-out saliency-in-box, pointing game and accuracy")
    evaluate.add_argument("checkpoint", help="a checkpoint directory written by train")
    evaluate.add_argument("--data", help="held-out data in the Saliency-R1 format (default: the run's)")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N records")
    evaluate.add_argument("--out", help="also write the metrics to this JSON file")
    explain = commands.add_parser("explain", help="answer one question and show where the answer looked")
    explain.add_argument("checkpoint", help="a checkpoint directory written by train")
    explain.add_argument("--image", required=True, help="image file")
    explain.add_argument("--question", required=True, help="the question")
    explain.add_argument("--box", default=None, type=_box_argument,
                         help="evidence box, normalised '[x1,y1,x2,y2]' (prints the reward)")
    explain.add_argument("--out", default=None, help="write the saliency overlay PNG here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "evaluate": _evaluate, "explain": _explain}[args.command](args)
    except ConfigError as error:  # a value that cannot work: a usage error, not a traceback
        parser.exit(2, f"saliency-r1 {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
