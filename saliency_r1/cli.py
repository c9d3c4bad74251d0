"""The ``saliency-r1`` command.

    saliency-r1 train                      # tiny VLM, synthetic set, CPU, a few minutes
    saliency-r1 train --model Qwen/Qwen2.5-VL-3B-Instruct --data train.parquet --eval-data val.parquet \\
        --lora true --learning-rate 1e-5 --num-generations 8 --max-completion-length 512 --bf16 true \\
        --micro-batch-size 2
    accelerate launch -m saliency_r1.cli train ...  # several GPUs (DDP; not FSDP or DeepSpeed)
    saliency-r1 evaluate runs/saliency-r1/checkpoint-40 [--data val.parquet] [--limit 200]
    saliency-r1 explain runs/saliency-r1/checkpoint-40 --image cat.png --question "What is on the mat?"
    saliency-r1 explain Qwen/Qwen2.5-VL-3B-Instruct --image cat.png --question "..." --compare runs/.../checkpoint-40
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from saliency_r1.errors import ConfigError

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
    import time

    import torch
    from PIL import Image

    from saliency_r1.explain import completion_token_ids, explain
    from saliency_r1.models import resolve_model

    started = time.perf_counter()
    # Everything that can be checked without weights is checked first: the images, the models (their
    # families), the completion's length against the context, the output folder.
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as error:
            raise ConfigError(f"--image {path}: not an image that can be read ({error})") from None
    sources = [resolve_model(reference) for reference in [args.model] + ([args.compare] if args.compare else [])]
    for source in sources:
        source.check_family()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    processors = [source.processor() for source in sources]
    if args.completion is not None:
        for source, processor in zip(sources, processors):
            context = source.max_positions()
            tokens = len(completion_token_ids(getattr(processor, "tokenizer", processor), args.completion))
            if context is not None and tokens >= context:
                raise ConfigError(f"--completion: {tokens} tokens, more than {source.reference}'s context of "
                                  f"{context} positions")
    out = Path(args.out) if args.out else Path(f"{Path(args.image[0]).stem}-explained")
    if out.suffix.lower() in (".png", ".jpg", ".html", ".json") and not out.is_dir():
        raise ConfigError(f"--out {out}: the folder to write overlay.png, flow.html and explanation.json into, "
                          "not a file name")
    _make_parent(str(out / "flow.html"))

    boxes = [box for given in args.box for box in given] if args.box else None  # the union of every --box
    explanations = []
    for source, processor in zip(sources, processors):
        model = source.load(device, dtype)
        explanations.append(explain(
            model, processor, images, args.question, boxes=boxes, completion=args.completion,
            system_prompt=args.system_prompt if args.system_prompt is not None else source.system_prompt,
            path=args.path or source.saliency_path, max_new_tokens=args.max_new_tokens or source.max_new_tokens,
            model_name=source.reference))
        del model
    first = explanations[0]
    paths = first.save(out, compare=explanations[1] if len(explanations) > 1 else None)
    for explanation in explanations:
        prefix = f"{explanation.model_name}: " if len(explanations) > 1 else ""
        print(f"{prefix}{explanation.text}")
        print(f"{prefix}valid: {explanation.valid} | think: {''.join(explanation.think_tokens)!r} | "
              f"answer: {''.join(explanation.answer_tokens)!r}")
        if explanation.reward is not None:
            print(f"{prefix}saliency in box: {explanation.reward:.3f} | pointing game: "
                  f"{'hit' if explanation.pointing_hit else 'miss'}")
    print(f"overlay:      {paths['overlay']}")
    print(f"page:         {paths['flow']}")
    print(f"numbers:      {paths['explanation']}")
    print(f"done in {time.perf_counter() - started:.1f} s")
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


def _box_argument(text: str) -> list[list[float]]:
    """A box (or a list of boxes) as the data holds them, checked as the data loader checks them."""
    from saliency_r1.data.loader import parse_normalised_boxes

    try:
        return parse_normalised_boxes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    explain = commands.add_parser(
        "explain", help="answer a question about an image (or explain a given answer) and show where it looked",
        description="Explain one answer of a model: writes overlay.png, flow.html (an interactive page, offline) "
                    "and explanation.json (every number) into --out.")
    explain.add_argument("model", help="a Hugging Face model (local folder or hub id) of a supported family, a peft "
                                       "LoRA adapter folder, or a checkpoint written by train")
    explain.add_argument("--image", required=True, action="append", help="an image file (repeat for several)")
    explain.add_argument("--question", required=True, help="the question")
    explain.add_argument("--box", action="append", type=_box_argument,
                         help="an evidence box on the first image, normalised '[x1,y1,x2,y2]' (repeat for several: "
                              "their union); gives the saliency reward and the pointing game")
    explain.add_argument("--completion", default=None,
                         help="explain this completion (teacher-forced, one forward) instead of generating one")
    explain.add_argument("--compare", default=None, metavar="MODEL_B",
                         help="the same question through a second model, side by side on one page")
    explain.add_argument("--path", choices=("cot", "direct", "both"), default=None,
                         help="saliency path (default: a checkpoint's own, else cot)")
    explain.add_argument("--out", default=None, help="output folder (default: <image name>-explained)")
    explain.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    explain.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                         help="default: bfloat16 on cuda, float32 on cpu")
    explain.add_argument("--max-new-tokens", type=_positive_int, default=None,
                         help="generation budget (default: a checkpoint's own, else 256)")
    explain.add_argument("--system-prompt", default=None, help="default: a checkpoint's own, else the reasoning prompt")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "evaluate": _evaluate, "explain": _explain}[args.command](args)
    except (ConfigError, FileNotFoundError) as error:  # input that cannot work: a usage error, not a traceback
        parser.exit(2, f"saliency-r1 {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
