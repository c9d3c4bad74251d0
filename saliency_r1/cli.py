"""The ``saliency-r1`` command.

    saliency-r1 train                      # tiny VLM, synthetic set, CPU, a few minutes
    saliency-r1 train --model Qwen/Qwen2.5-VL-3B-Instruct --data train.parquet --eval-data val.parquet \\
        --lora true --learning-rate 1e-5 --num-generations 8 --max-completion-length 512 --bf16 true \\
        --micro-batch-size 2
    accelerate launch -m saliency_r1.cli train ...  # several GPUs (DDP; not FSDP or DeepSpeed)
    saliency-r1 evaluate runs/saliency-r1/checkpoint-40 --out eval [--data val.parquet] [--limit 200]
    saliency-r1 evaluate runs/.../checkpoint-40 Qwen/Qwen2.5-VL-3B-Instruct --data val.jsonl --out eval --faithfulness
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
    from accelerate import PartialState

    from saliency_r1.evaluation_run import ModelRun, model_key, prepare_out_folder, run_evaluation
    from saliency_r1.faithfulness import FaithfulnessOptions
    from saliency_r1.models import resolve_model
    from saliency_r1.prompts import system_prompt_or_default

    # Everything that can be checked without weights is checked first: the models (their families and
    # processors), the data, the output folder.
    keys = [model_key(reference) for reference in args.models]
    if len(set(keys)) != len(keys):
        raise ConfigError("a MODEL is named twice (" + ", ".join(r for r, k in zip(args.models, keys)
                                                                    if keys.count(k) > 1) + ")")
    sources = [resolve_model(reference) for reference in args.models]
    processors = []
    for source in sources:
        source.check_family()
        processors.append(source.checked_processor())
    device, dtype = _device_and_dtype(args)
    state = PartialState(cpu=device == "cpu")  # on the CPU, torchrun's processes join a gloo group only when asked
    if state.num_processes > 1 and device == "cuda":
        device = str(state.device)
    dataset, data_name, skipped = _evaluation_data(args, sources, processors[0], quiet=not state.is_main_process)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    faithfulness = FaithfulnessOptions(steps=args.steps, baseline=args.baseline, seed=args.seed,
                                       batch_size=args.faithfulness_batch_size) if args.faithfulness else None
    runs = [ModelRun(reference=reference, source=source, path=args.path or source.saliency_path,
                     max_new_tokens=args.max_new_tokens or source.max_new_tokens,
                     system_prompt=system_prompt_or_default(args.system_prompt if args.system_prompt is not None
                                                            else source.system_prompt))
            for reference, source in zip(args.models, sources)]
    settings = {"data": data_name, "dtype": str(dtype).removeprefix("torch."), "sanity": args.sanity,
                "seed": args.seed if (args.sanity or args.faithfulness) else None,
                "faithfulness": None if faithfulness is None else {"steps": faithfulness.steps,
                                                                   "baseline": faithfulness.baseline},
                "models": {key: run.settings() for key, run in zip(keys, runs)}}
    out = Path(args.out)
    prepare_out_folder(out, settings, resume=args.resume, write=False)  # every process, before any writes
    state.wait_for_everyone()
    if state.is_main_process:
        prepare_out_folder(out, settings, resume=True)
    summary = run_evaluation(runs, dataset, count=count, out=out, data_name=data_name,
                             options_extra={"faithfulness": faithfulness, "sanity": args.sanity, "seed": args.seed},
                             batch_size=args.batch_size, device=device, dtype=dtype, skipped=skipped)
    if state.is_main_process:
        print((out / "summary.md").read_text())
        for name, path in summary["files"].items():
            print(f"{name + ':':<10}{path}")
        for model in summary["models"].values():
            print(f"samples:  {out / model['samples_file']}")
    return 0


def _evaluation_data(args: argparse.Namespace, sources, processor, *, quiet: bool = False) -> tuple:
    """``(dataset, name, skipped)``: ``--data``, ``--synthetic N``, or the held-out set of the first checkpoint
    of train; the name identifies the data (a resumed run must name the same), ``skipped`` counts bad records."""
    from saliency_r1.data.synthetic import SyntheticConfig, SyntheticGroundedVQA
    from saliency_r1.grpo.config import TrainConfig

    run_config = next((s.run_config for s in sources if s.run_config is not None), None)
    data, flag = args.data, "--data"
    if not data and not args.synthetic:
        if run_config is None:
            raise ConfigError("no data: pass --data PATH or --synthetic N (only a checkpoint of train brings its own "
                              "held-out set)")
        if run_config.data is not None and not run_config.eval_data:
            raise ConfigError(f"{sources[0].reference}: its run had no held-out data: pass --data or --synthetic N")
        data, flag = run_config.eval_data, f"{sources[0].reference}'s held-out data ({run_config.eval_data})"
    if data:
        from saliency_r1.data.loader import load_saliency_data
        from saliency_r1.models import image_check

        if not Path(data).exists():
            raise ConfigError(f"{flag}: no such file or directory: {data}")
        try:  # every image the processor takes is evaluated: the size cap is a training filter (public setup)
            dataset = load_saliency_data(data, max_image_side=None, check_image=image_check(processor))
        except ValueError as error:
            raise ConfigError(f"{flag}: {error}") from None
        if len(dataset) == 0:
            raise ConfigError(f"{flag}: no usable records ({len(dataset.skipped)} skipped, the reasons logged)")
        if dataset.skipped and not quiet:
            print(f"{flag}: {len(dataset.skipped)} bad records skipped (the reasons logged), {len(dataset)} kept",
                  file=sys.stderr)
        return dataset, str(Path(data).resolve()), len(dataset.skipped)
    cfg = run_config or TrainConfig()
    drawing = SyntheticConfig(image_size=cfg.image_size, num_objects=cfg.num_objects, questions=cfg.synthetic_questions)
    size = args.synthetic or cfg.eval_size
    name = (f"synthetic held-out set: seed {cfg.eval_seed}, {drawing.image_size} px, {drawing.num_objects} objects, "
            f"{drawing.questions} questions")
    return SyntheticGroundedVQA(size, seed=cfg.eval_seed, config=drawing), name, 0


def _device_and_dtype(args: argparse.Namespace) -> tuple:
    """``--device`` (default: cuda when present) and ``--dtype`` (default: bf16 on cuda, float32 on cpu)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    return device, dtype


def _explain(args: argparse.Namespace) -> int:
    import time

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
    device, dtype = _device_and_dtype(args)
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


def _model_options(parser: argparse.ArgumentParser, *, path_help: str) -> None:
    """The options of a command that runs any model: saliency path, device, dtype, generation."""
    parser.add_argument("--path", choices=("cot", "direct", "both"), default=None, help=path_help)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None,
                        help="generation budget (default: a checkpoint's own, else 256)")
    parser.add_argument("--system-prompt", default=None, help="default: a checkpoint's own, else the reasoning prompt")


def build_parser() -> argparse.ArgumentParser:
    from saliency_r1.grpo.config import build_parser as config_parser

    parser = argparse.ArgumentParser(prog="saliency-r1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    config_parser(commands.add_parser("train", help="GRPO with saliency rewards (no arguments: the CPU demo)"))
    evaluate = commands.add_parser(
        "evaluate", help="accuracy, pointing game and saliency-in-box of one or more models; faithfulness of the maps",
        description="Evaluate models on the same held-out samples: writes samples-<model>.jsonl (one record a sample), "
                    "summary.md, summary.json and summary.png (95% intervals) into --out. Under torchrun "
                    "or accelerate launch each process takes a shard.")
    evaluate.add_argument("models", nargs="+", metavar="MODEL",
                          help="a Hugging Face model (local folder or hub id) of a supported family, a peft LoRA adapter "
                               "folder, or a checkpoint written by train; several are compared side by side")
    data = evaluate.add_mutually_exclusive_group()
    data.add_argument("--data", help="held-out data in the Saliency-R1 format (default: the held-out set of the first "
                                     "checkpoint of train)")
    data.add_argument("--synthetic", type=_positive_int, metavar="N", help="the first N images of the synthetic "
                                                                           "held-out set")
    evaluate.add_argument("--out", required=True, help="the folder for the results")
    evaluate.add_argument("--resume", action="store_true",
                          help="continue the evaluation in --out: samples already written are skipped")
    evaluate.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N records")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generation call (default 8)")
    evaluate.add_argument("--faithfulness", action="store_true",
                          help="deletion and insertion curves of every map source (docs/method.md section 8)")
    evaluate.add_argument("--steps", type=_positive_int, default=16,
                          help="faithfulness grid: r = i/steps, plus 0.05, 0.15 and 0.30 (default 16)")
    evaluate.add_argument("--baseline", choices=("black", "mean", "blur"), default="black",
                          help="what deleted pixels become, and what inserted pixels are laid over (default black)")
    evaluate.add_argument("--faithfulness-batch-size", type=_positive_int, default=32,
                          help="perturbed images per teacher-forced forward (default 32; lower it for memory)")
    evaluate.add_argument("--sanity", action="store_true",
                          help="the model-randomisation check: rank correlation of the maps with those under "
                               "randomised top layers")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random ranking and randomised weights")
    _model_options(evaluate, path_help="saliency path of the reported map (default: a checkpoint's own, else cot)")
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
    explain.add_argument("--out", default=None, help="output folder (default: <image name>-explained)")
    _model_options(explain, path_help="saliency path (default: a checkpoint's own, else cot)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "evaluate": _evaluate, "explain": _explain}[args.command](args)
    except (ConfigError, FileNotFoundError) as error:  # input that cannot work: a usage error, not a traceback
        parser.exit(2, f"saliency-r1 {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue: what was written is kept)" if args.command == "evaluate" else ""
        parser.exit(130, f"saliency-r1 {args.command}: interrupted{hint}\n")


if __name__ == "__main__":
    sys.exit(main())
