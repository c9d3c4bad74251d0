"""The GRPO training loop of Saliency-R1, readable top to bottom.

``train(cfg)`` does, per step: sample prompts; generate ``G`` completions of each with the saliency
capture on; score them (format, accuracy, saliency-in-box through ``saliency_r1.ops.reward``,
extra callables); normalise advantages within each group; take ``inner_iterations`` optimizer
steps of the clipped surrogate (ratio to the policy that generated); log; checkpoint.

Multi-process runs go through accelerate (DDP): launch the same command with ``accelerate launch``
(GPUs) or ``torchrun`` (the CPU test); each process samples its own prompts, gradients are
averaged by DDP, and every process holds the same parameters after each step. FSDP and DeepSpeed
are refused before anything loads (:func:`check_distribution`); TRL's trainer
(``saliency_r1.trl``) handles DeepSpeed itself.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.utils.data import Subset
from tqdm.auto import tqdm

from saliency_r1.adapters import get_adapter
from saliency_r1.grpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from saliency_r1.grpo.config import TrainConfig
from saliency_r1.grpo.loss import group_advantages, policy_loss


# ============================================================================ model and data

def load_policy(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """``(model, processor)``: the checkpoint at ``cfg.model``, or the tiny model built in code."""
    if cfg.model is None:
        from saliency_r1.tiny import build_tiny_model, build_tiny_processor

        processor = build_tiny_processor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        model = build_tiny_model(processor, seed=cfg.seed, dtype=dtype, num_hidden_layers=cfg.tiny_layers,
                                 hidden_size=cfg.tiny_hidden, intermediate_size=2 * cfg.tiny_hidden)
        return model, processor
    from transformers import AutoModelForImageTextToText

    processor = load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    model = AutoModelForImageTextToText.from_pretrained(
        cfg.model, dtype=dtype, attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"})
    # Rollouts must be drawn from pi / T exactly, or the ratio's denominator is wrong: drop the
    # checkpoint's own logit adjustments (Qwen2.5-VL-Instruct ships repetition_penalty=1.05).
    generation = model.generation_config
    generation.repetition_penalty, generation.no_repeat_ngram_size, generation.min_p = 1.0, 0, None
    return model, processor


def lora_base_dtype(cfg: TrainConfig, device_type: str) -> torch.dtype:
    """bf16 for the frozen base of a LoRA run under bf16, else fp32. The base gains nothing from
    fp32 weights, and autocast would cast all of it again at every forward (it caches only the
    casts of weights that require grad)."""
    return torch.bfloat16 if cfg.lora and cfg.uses_bf16(device_type) else torch.float32


def with_lora(model, cfg: TrainConfig):
    """``model`` with trainable LoRA adapters on ``cfg.lora_targets`` (peft); the base is frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=cfg.lora_targets))


def load_processor(path: str, min_pixels: int, max_pixels: int):
    """``AutoProcessor`` of a checkpoint. A tiny-model checkpoint (saved without a video processor)
    comes back from ``AutoProcessor`` as a bare tokenizer: its processor is rebuilt in code, and
    its tokenizer checked against the saved one."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    if hasattr(processor, "image_processor"):
        return processor
    from saliency_r1.tiny import build_tiny_processor

    tiny = build_tiny_processor(min_pixels=min_pixels, max_pixels=max_pixels, vocab_size=len(processor))
    if tiny.tokenizer.get_vocab() != processor.get_vocab():
        raise ValueError(f"{path}: no processor saved, and its tokenizer is not the tiny model's")
    return tiny


def vision_token_ids(model) -> list[int]:
    """Ids of the image/video placeholder and vision start/end tokens of ``model``'s config.

    Generation suppresses them: a sampled ``<|image_pad|>`` would be embedded as text while the
    policy generates, but the teacher-forced forward of the update (and the saliency of a
    teacher-forced capture) would try to place image features on it and fail.
    """
    config = getattr(model, "config", None)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [i for i in (getattr(config, n, None) for n in names) if i is not None]


def load_data(cfg: TrainConfig):
    """``(train, held_out)``: indexable sets of records (``image``, ``problem``, ``solution``, ``bbox``)."""
    from saliency_r1.data import SyntheticConfig, SyntheticGroundedVQA, load_saliency_data

    if cfg.data is None:
        drawing = SyntheticConfig(image_size=cfg.image_size, num_objects=cfg.num_objects,
                                  questions=cfg.synthetic_questions)
        return (SyntheticGroundedVQA(cfg.train_size, seed=cfg.data_seed, config=drawing),
                SyntheticGroundedVQA(cfg.eval_size, seed=cfg.eval_seed, config=drawing))
    train = load_saliency_data(cfg.data, max_image_side=cfg.max_image_side)
    if len(train) == 0:
        raise ValueError(f"{cfg.data}: no usable records ({len(train.skipped)} skipped)")
    held_out = load_saliency_data(cfg.eval_data, max_image_side=cfg.max_image_side) if cfg.eval_data else None
    return train, held_out


def system_prompt(cfg: TrainConfig) -> str:
    from saliency_r1.tiny import SYSTEM_PROMPT

    return cfg.system_prompt if cfg.system_prompt is not None else SYSTEM_PROMPT


def prompt_inputs(processor, examples: list[dict], system: str, repeat: int = 1):
    """Processor inputs of ``examples``' prompts (chat template, one image each), each repeated
    ``repeat`` times in a row (a GRPO group), left-padded: ``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw`` (and ``mm_token_type_ids`` on recent transformers)."""
    texts, images = [], []
    for example in examples:
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example["problem"]}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts += [text] * repeat
        images += [[example["image"]]] * repeat
    processor.tokenizer.padding_side = "left"  # generation appends after the prompt
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def image_rows(inputs) -> list[slice]:
    """Each sample's rows of ``pixel_values`` (one image per sample, ``t*h*w`` patches each)."""
    counts = inputs["image_grid_thw"].prod(-1).tolist()
    if len(counts) != inputs["input_ids"].shape[0]:
        raise ValueError(f"expected one image per prompt, got {len(counts)} images for "
                         f"{inputs['input_ids'].shape[0]} prompts")
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def select(inputs, rows: list[int], pixel_rows: list[slice]) -> dict:
    """The samples ``rows`` of a batch of prompt inputs, pixel rows included."""
    picked = {k: v[rows] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    picked["pixel_values"] = torch.cat([inputs["pixel_values"][pixel_rows[r]] for r in rows])
    picked["image_grid_thw"] = inputs["image_grid_thw"][rows]
    return picked


# Rows of ``[B * C]`` completion positions whose fp32 logits exist at once: 512 x Qwen's 151,936
# vocabulary is 311 MB, where one micro-batch of 8 x 512 tokens would hold 2.5 GB for backward.
LOGIT_CHUNK_ROWS = 512


class _FinalHidden(torch.nn.Module):
    """Stands in for the output head during a forward, so ``.logits`` carries the final-norm hidden
    states and the vocabulary projection can be done chunk by chunk."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def _hidden_instead_of_logits(model):
    owner = get_adapter(getattr(model, "module", model)).model  # inside DDP and peft wrappers
    head = owner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"expected a linear output head, got {type(head).__name__}")
    owner.set_output_embeddings(_FinalHidden())
    try:
        yield head
    finally:
        owner.set_output_embeddings(head)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def token_logps(hidden: torch.Tensor, head: torch.nn.Linear, ids: torch.Tensor, temperature: float,
                chunk_rows: int = LOGIT_CHUNK_ROWS) -> torch.Tensor:
    """``log softmax(head(hidden) / temperature)[ids]`` for ``hidden [..., D]`` and ``ids [...]``.

    The fp32 logits of ``chunk_rows`` rows exist at a time: under autograd each chunk is
    checkpointed (its logits are recomputed in backward instead of kept), so the memory held for
    backward is the hidden states, not ``rows x vocabulary``.
    """
    flat_hidden, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    checkpointed = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    chunks = []
    for start in range(0, flat_ids.numel(), chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (flat_hidden[rows], head.weight, head.bias, flat_ids[rows], temperature)
        chunks.append(torch.utils.checkpoint.checkpoint(_chunk_logps, *args, use_reentrant=False)
                      if checkpointed else _chunk_logps(*args))
    return torch.cat(chunks).view(ids.shape) if chunks else flat_hidden.new_zeros(ids.shape, dtype=torch.float32)


def completion_logps(model, prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Log-probs ``[b, C]`` of the completion tokens under ``model`` (teacher-forced, one forward).

    Logits are divided by the sampling temperature, so the ratio compares the distributions that
    were sampled from (as TRL does). The vocabulary projection runs after the forward, in
    checkpointed chunks (:func:`token_logps`).
    """
    extend = {"input_ids": completion_ids, "attention_mask": completion_mask.to(prompt["attention_mask"].dtype)}
    if "mm_token_type_ids" in prompt:  # completion tokens are text
        extend["mm_token_type_ids"] = torch.zeros_like(completion_ids, dtype=prompt["mm_token_type_ids"].dtype)
    batch = {k: torch.cat([prompt[k], extend[k]], dim=1) if k in extend else v for k, v in prompt.items()}
    length = completion_ids.shape[1]
    with _hidden_instead_of_logits(model) as head:
        hidden = model(**batch, logits_to_keep=length + 1, use_cache=False).logits[:, :-1]
    return token_logps(hidden, head, completion_ids, temperature)


def pad_completions(completions: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads per-rollout completion ids: ``(ids [B, C], mask [B, C])``."""
    length = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(completions), length), dtype=torch.float32, device=device)
    for row, tokens in enumerate(completions):
        ids[row, :len(tokens)] = tokens.to(device)
        mask[row, :len(tokens)] = 1.0
    return ids, mask


class PromptOrder:
    """Which prompts each step uses: a fresh seeded permutation per epoch, so position ``p`` of the
    stream is a pure function of ``(seed, p)`` and resuming needs only the position."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self._epoch, self._perm = size, seed, -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=generator).tolist(), epoch
        return self._perm[offset]


# ============================================================================ rewards

def load_reward_callable(spec: str):
    """``"module:function"`` to the callable."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"extra reward {spec!r} must be written 'module:function'")
    return getattr(importlib.import_module(module), name)


def score(rollout, examples: list[dict], extra: list) -> dict[str, torch.Tensor]:
    """Each reward component per rollout (float32 ``[B]``, on the maps' device), unweighted."""
    from saliency_r1.rewards import accuracy_reward, format_reward, saliency_rewards

    device = rollout.valid.device
    columns = {"solution": [e["solution"] for e in examples], "bbox": [e["bbox"] for e in examples],
               "image": [e["image"] for e in examples]}
    form = torch.tensor(format_reward(rollout.texts), device=device)
    # SPEC section 4: the saliency reward is multiplied by the format validity.
    scores = {"format": form,
              "accuracy": torch.tensor(accuracy_reward(rollout.texts, **columns), device=device),
              "saliency": saliency_rewards(rollout.maps, columns["bbox"], columns["image"], rollout.valid * form)}
    for fn in extra:
        name = getattr(fn, "__name__", "extra")
        values = fn(completions=rollout.texts, saliency_maps=rollout.maps, saliency_valid=rollout.valid, **columns)
        scores[name] = torch.tensor([math.nan if v is None else v for v in values], device=device, dtype=torch.float32)
    return scores


def pointing_rate(rollout, examples: list[dict], form: torch.Tensor) -> float:
    """Pointing-game hit rate over the rollouts (host-side; called at log steps only), gated like
    the reward (SPEC section 4): well-formed spans (``rollout.valid``) and format (``form``)."""
    from saliency_r1.data import parse_normalised_boxes
    from saliency_r1.metrics import pixel_boxes, pointing_game_hit

    hits = 0
    for maps, valid, example in zip(rollout.maps, (rollout.valid * form).tolist(), examples):
        width, height = example["image"].size
        if valid and maps:
            boxes = pixel_boxes(parse_normalised_boxes(example["bbox"]), height, width)
            hits += pointing_game_hit(maps[0], (height, width), boxes)
    return hits / max(1, len(examples))


# ============================================================================ cold start

def cold_start_set(data, size: int) -> tuple[list[dict], list[str]]:
    """The cold start's fixed set, as a real cold start is: the first ``size`` examples of ``data``,
    each with one worked completion whose reasoning names an object drawn once per image (the
    target for a third of them with three objects, so where the policy looks is left for GRPO).
    With this set, naming the target puts the map on it (two model seeds); drawing a fresh object
    at every visit instead gave cold starts where naming the target barely moves the map, or
    moves it away (bench/RESULTS.md, evidence point 8)."""
    from saliency_r1.data.synthetic import worked_completion

    if not hasattr(data, "config"):
        raise ValueError("cold_start_steps needs the synthetic set (its reasoning can be written out)")
    examples = [data[i] for i in range(min(size, len(data)))]
    texts = [worked_completion(example, random.Random(i).randrange(len(example["objects"])))
             for i, example in enumerate(examples)]
    return examples, texts


def cold_start(model, processor, data, cfg: TrainConfig, device) -> list[float]:
    """Supervised steps on worked completions of the synthetic set (the paper's cold start): the
    policy learns the ``<think>/<answer>`` format and to name an object of the image and read it
    before answering. The set (:func:`cold_start_set`) is cycled in order, ``cold_start_batch``
    examples a step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.cold_start_lr)
    eos = processor.tokenizer.eos_token_id
    examples, texts = cold_start_set(data, cfg.cold_start_size)
    completions = [torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
                   for text in texts]
    # The processor is most of a tiny step's time: run it once over the set, then pick rows.
    prompts = prompt_inputs(processor, examples, system_prompt(cfg))
    pixel_rows = image_rows(prompts)
    batches = [list(range(i, min(i + cfg.cold_start_batch, len(examples))))
               for i in range(0, len(examples), cfg.cold_start_batch)]
    model.train()
    losses = []
    for step in tqdm(range(cfg.cold_start_steps), desc="cold start", disable=not cfg.progress, leave=False):
        picks = batches[step % len(batches)]
        prompt = {k: v.to(device) for k, v in select(prompts, picks, pixel_rows).items()}
        completion_ids, mask = pad_completions([completions[i] for i in picks], processor.tokenizer.pad_token_id,
                                               device)
        logps = completion_logps(model, prompt, completion_ids, mask, 1.0)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # milliseconds of tiny-model steps: a sync per step is immaterial here
    model.eval()
    return losses


def export_cold_start(cfg: TrainConfig, directory: str | Path) -> Path:
    """Builds the tiny model, runs ``cfg.cold_start_steps`` of cold start and saves model and
    processor to ``directory`` (``save_pretrained``), so that runs can start from it with
    ``--model DIRECTORY --cold-start-steps 0`` (the evidence runs and the tests share one)."""
    directory = Path(directory)
    if cfg.model is not None:
        raise ValueError("export_cold_start builds the tiny model: leave cfg.model unset")
    model, processor = load_policy(cfg)
    train_data, _ = load_data(cfg)
    cold_start(model, processor, train_data, cfg, torch.device("cpu"))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# ============================================================================ the run

@dataclass
class RunResult:
    """Where a run put its outputs, and its held-out evaluations (``{step: metrics}``)."""

    log_path: Path
    plot_path: Path
    checkpoint: Path
    evaluations: dict[int, dict] = field(default_factory=dict)


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.uses_bf16(device.type) else contextlib.nullcontext()


def check_distribution(distributed_type) -> None:
    """Refuses the accelerate set-ups the loop cannot run, before any weights load.

    FSDP and DeepSpeed ZeRO-3 shard the weights. Rollouts generate with the unwrapped model, and the
    saliency reads ``W_O``, the final norm and ``W_U`` between forwards: both need the weights whole.
    DeepSpeed at any stage also steps its optimizer at every backward, while the loop accumulates
    micro-batches under ``no_sync``. Single-device runs and DDP are what the loop supports.
    """
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(f"the GRPO loop runs on one device or under DDP, not {distributed_type.value}: FSDP and "
                         "ZeRO-3 shard the weights that generation and the saliency (W_O, final norm, W_U) read "
                         "whole, and DeepSpeed steps its optimizer at every backward, where the loop accumulates "
                         "micro-batches. With --lora true the bf16 base of a 7B model (16.6 GB) fits on each GPU "
                         "under DDP; TRL's trainer (saliency_r1.trl) handles DeepSpeed itself.")


def train(cfg: TrainConfig) -> RunResult:
    """Runs GRPO as configured; returns where logs, plot and final checkpoint went."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from saliency_r1.evaluate import evaluate
    from saliency_r1.explain import generate_with_saliency
    from saliency_r1.grpo.plots import plot_reward_curves

    accelerator = Accelerator(cpu=cfg.device_type() == "cpu", log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir)
    check_distribution(accelerator.distributed_type)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # the same on every process: identical initial weights
    base_dtype = lora_base_dtype(cfg, device.type)
    model, processor = load_policy(cfg, base_dtype if cfg.model else torch.float32)
    model.to(device)
    train_data, held_out = load_data(cfg)
    system = system_prompt(cfg)
    extra = [load_reward_callable(spec) for spec in cfg.extra_rewards]
    weights = {"format": cfg.format_weight, "accuracy": cfg.accuracy_weight, "saliency": cfg.saliency_weight}

    # Cold start of the tiny model (deterministic; rerun on resume, where the checkpoint's weights
    # then replace it).
    if cfg.cold_start_steps and cfg.model is None:
        cold_start(model, processor, train_data, cfg, device)
    if cfg.lora:  # after the tiny model's cold start, which trains all of its weights in fp32
        model = with_lora(model.to(base_dtype), cfg)
    reference = None
    if cfg.beta != 0.0 and not cfg.lora:  # with LoRA the reference is the base model, adapters off
        reference = copy.deepcopy(model).eval().requires_grad_(False)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    # The scheduler stays out of prepare(): accelerate would step it once per process for every
    # optimizer step, finishing an 8-GPU warm-up 8 times too early.
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed + rank)  # distinct sampling noise per process; DDP has just synchronised the weights
    policy = accelerator.unwrap_model(model)
    adapter = get_adapter(policy)
    suppress = vision_token_ids(adapter.model)

    start_step, evaluations = 0, {}
    resume_from = latest_checkpoint(out) if cfg.resume == "auto" else cfg.resume
    if resume_from:
        state = load_checkpoint(resume_from, model=policy, optimizer=optimizer, scheduler=scheduler, rank=rank)
        start_step = state["step"]
        evaluations = {int(k): v for k, v in state.get("evaluations", {}).items()}
    order = PromptOrder(len(train_data), cfg.seed)
    global_prompts = cfg.prompts_per_step * world
    log_path = out / "train.jsonl"
    if accelerator.is_main_process and not resume_from:
        log_path.write_text("")
    elif accelerator.is_main_process and log_path.exists():
        # Steps logged after the checkpoint run again: drop their records so none appears twice.
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        log_path.write_text("".join(line + "\n" for line in kept))
    if cfg.report_to:
        # Trackers take scalar hyper-parameters only (TensorBoard's hparams): lists and None as text.
        accelerator.init_trackers("saliency-r1", config={
            k: ",".join(v) if isinstance(v, list) else "" if v is None else v for k, v in cfg.to_dict().items()})

    def run_evaluation(step: int) -> None:
        if held_out is None:
            return
        # Every process evaluates its share (no rank waits in a collective while another evaluates
        # alone, which a long evaluation would turn into a timeout); rates combine by sample count.
        shard = Subset(held_out, range(rank, min(cfg.eval_limit, len(held_out)), world))
        names = ("saliency_in_box", "pointing_game", "accuracy", "format", "valid")
        local = evaluate(policy, processor, shard, system_prompt=system, max_new_tokens=cfg.max_completion_length,
                         path=cfg.saliency_path, progress=cfg.progress and accelerator.is_main_process,
                         bf16=cfg.uses_bf16(device.type)) if len(shard) else dict.fromkeys(names, 0.0) | {"samples": 0}
        sums = accelerator.reduce(torch.tensor([local[k] * local["samples"] for k in names] + [local["samples"]],
                                               dtype=torch.float64, device=device), reduction="sum").tolist()
        metrics = {**{k: v / sums[-1] for k, v in zip(names, sums)}, "samples": int(sums[-1])}
        evaluations[step] = metrics
        if not accelerator.is_main_process:
            return
        record = {"step": step, "split": "eval", **{f"eval/{k}": v for k, v in metrics.items()}}
        with log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")

    if start_step == 0:
        run_evaluation(0)

    pending = []  # per-step metrics as device tensors: converted (one sync) at log steps only
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="GRPO",
               disable=not (cfg.progress and accelerator.is_main_process))
    for step in bar:
        timed = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        clock = _Clock(device, sync=timed)

        # ---- 1. rollout: G completions per prompt, saliency captured along the way
        first = step * global_prompts + rank * cfg.prompts_per_step
        prompts = [train_data[order[first + j]] for j in range(cfg.prompts_per_step)]
        examples = [e for e in prompts for _ in range(cfg.num_generations)]
        inputs = prompt_inputs(processor, prompts, system, repeat=cfg.num_generations).to(device)
        policy.eval()
        with torch.no_grad(), _autocast(cfg, device):
            rollout = generate_with_saliency(policy, processor, inputs, adapter=adapter, path=cfg.saliency_path,
                                             do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                             max_new_tokens=cfg.max_completion_length, suppress_tokens=suppress)
        clock.lap("rollout")

        # ---- 2. rewards, 3. group-normalised advantages
        scores = score(rollout, examples, extra)
        total = sum(weights.get(name, 1.0) * value.nan_to_num(0.0) for name, value in scores.items())
        # Over every process's rollouts (the batch std is global), then this process's slice.
        local = total.numel()
        advantages = group_advantages(accelerator.gather(total), cfg.num_generations,
                                      cfg.advantage_scale)[rank * local:(rank + 1) * local]
        clock.lap("reward")

        # ---- 4. loss and optimizer step(s) on this batch of rollouts
        completion_ids, mask = pad_completions(rollout.completion_ids, processor.tokenizer.pad_token_id, device)
        pixel_rows = image_rows(inputs)
        micro = [list(range(i, min(i + cfg.micro_batch_size, len(examples))))
                 for i in range(0, len(examples), cfg.micro_batch_size)]
        # Per-token (DAPO) normalisation divides by the tokens of the whole batch; DDP then averages
        # the processes' gradients, so each divides by global tokens / processes.
        token_count = (accelerator.reduce(mask.sum(), reduction="sum") / world).clamp(min=1.0)
        with torch.no_grad(), _autocast(cfg, device):  # still in eval mode: no dropout in the denominators
            # The ratio's denominator: the generating policy. Only needed when later inner
            # iterations have moved away from it; the first uses logps.detach().
            old = [completion_logps(policy, select(inputs, rows, pixel_rows), completion_ids[rows], mask[rows],
                                    cfg.temperature) for rows in micro] if cfg.inner_iterations > 1 else None
            ref = [_reference_logps(reference, policy, cfg, select(inputs, rows, pixel_rows), completion_ids[rows],
                                    mask[rows]) for rows in micro] if cfg.beta != 0.0 else None
        clip_fraction = torch.zeros((), device=device)
        kl = torch.zeros((), device=device)
        model.train()
        for _ in range(cfg.inner_iterations):
            for m, rows in enumerate(micro):
                sync = m + 1 == len(micro)  # DDP all-reduces gradients once per optimizer step
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), _autocast(cfg, device):
                    logps = completion_logps(model, select(inputs, rows, pixel_rows), completion_ids[rows],
                                             mask[rows], cfg.temperature)
                    loss, stats = policy_loss(
                        logps, old[m] if old else logps.detach(), advantages[rows], mask[rows],
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, normalisation=cfg.normalisation,
                        max_completion_length=cfg.max_completion_length, token_count=token_count,
                        beta=cfg.beta, ref_logps=ref[m] if ref else None)
                    if cfg.normalisation != "token":  # means over the micro-batch -> mean over the batch
                        loss = loss * len(rows) / len(examples)
                    accelerator.backward(loss)
                share = len(rows) / len(examples) / cfg.inner_iterations
                clip_fraction += stats["clip_fraction"] * share
                kl += stats["kl"] * share
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        policy.eval()
        clock.lap("update")

        # ---- 5. log (host syncs only here), checkpoint, evaluate
        lengths = mask.sum(-1)
        pending.append((step, {**{f"reward/{k}": v.nanmean() for k, v in scores.items()},
                               "reward/total": total.mean(), "saliency_in_box": scores["saliency"].mean(),
                               "accuracy": scores["accuracy"].mean(), "format": scores["format"].mean(),
                               "valid": rollout.valid.mean(), "kl": kl, "clip_fraction": clip_fraction,
                               "completion_length/mean": lengths.mean(), "completion_length/max": lengths.max(),
                               "learning_rate": torch.tensor(learning_rate)}))
        if timed:
            record = _flush(pending, accelerator)
            local_rate = torch.tensor(pointing_rate(rollout, examples, scores["format"]), device=device)
            record["pointing_game"] = float(accelerator.reduce(local_rate, reduction="mean"))  # every process's
            # generate() ends in a host sync (stopping criteria); the rest of the synced rollout lap is saliency.
            generation = rollout.timings["generate"]
            record.update({"time/generation": generation, "time/saliency": clock.laps["rollout"] - generation,
                           "time/reward": clock.laps["reward"], "time/update": clock.laps["update"]})
            record["time/saliency_share"] = (record["time/saliency"] + record["time/reward"]) / sum(clock.laps.values())
            record["tokens_per_second"] = float(lengths.sum()) * world / max(generation, 1e-9)
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                if cfg.report_to:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
                bar.set_postfix(reward=f"{record['reward/total']:.3f}", sal=f"{record['saliency_in_box']:.3f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            run_evaluation(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            if done == cfg.steps:
                run_evaluation(done)
            save_checkpoint(out / f"checkpoint-{done}", model=policy, optimizer=optimizer, scheduler=scheduler,
                            state={"step": done, "data_position": done * global_prompts,
                                   "evaluations": evaluations},
                            config=cfg, rank=rank, is_main=accelerator.is_main_process, processor=processor)
            accelerator.wait_for_everyone()
    bar.close()
    if cfg.report_to:
        accelerator.end_training()
    plot_path = out / "reward_curves.png"
    if accelerator.is_main_process:
        plot_reward_curves(log_path, plot_path)
    accelerator.wait_for_everyone()
    return RunResult(log_path=log_path, plot_path=plot_path, checkpoint=out / f"checkpoint-{cfg.steps}",
                     evaluations=evaluations)


def _reference_logps(reference, policy, cfg, prompt, completion_ids, mask):
    if reference is not None:
        return completion_logps(reference, prompt, completion_ids, mask, cfg.temperature)
    with policy.disable_adapter():  # LoRA: the base model is the reference
        return completion_logps(policy, prompt, completion_ids, mask, cfg.temperature)


def _flush(pending: list, accelerator) -> dict:
    """Reduces the pending steps' metrics over steps and processes (``.../max`` by max, the rest by
    mean): one host sync."""
    names = list(pending[-1][1])
    stacked = torch.stack([torch.stack([metrics[n].float().to(accelerator.device) for n in names])
                           for _, metrics in pending])
    is_max = torch.tensor([n.endswith("/max") for n in names], device=stacked.device)
    means = accelerator.reduce(stacked.mean(0), reduction="mean")
    maxima = accelerator.reduce(stacked.amax(0), reduction="max")
    record = {"step": pending[-1][0] + 1, **dict(zip(names, torch.where(is_max, maxima, means).tolist()))}
    pending.clear()
    return record


class _Clock:
    """Wall time of each phase of a step; synchronises CUDA at phase ends only on timed steps."""

    def __init__(self, device: torch.device, sync: bool):
        self.cuda, self.sync, self.laps, self._last = device.type == "cuda", sync, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sync and self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def load_trained(checkpoint: str | Path):
    """``(model, processor, cfg)`` of a checkpoint written by :func:`train`, ready for evaluation
    (in eval mode, on the device the run trained on: the GPU when there is one, unless ``use_cpu``).

    A full fine-tune loads from ``checkpoint/model``; a LoRA run rebuilds its base as the run did
    (checkpoint path or tiny model, plus the deterministic cold start) and loads the adapter.
    """
    from saliency_r1.grpo.checkpoint import load_weights

    checkpoint = Path(checkpoint)
    cfg = TrainConfig.load(checkpoint / "config.yaml")
    device = cfg.device_type()
    base_dtype = lora_base_dtype(cfg, device)  # the base the adapter was trained on
    model, processor = load_policy(cfg, base_dtype if cfg.model else torch.float32)
    if cfg.lora:
        if cfg.cold_start_steps and cfg.model is None:
            train_data, _ = load_data(cfg)
            cold_start(model, processor, train_data, cfg, torch.device("cpu"))
        model = with_lora(model.to(base_dtype), cfg)
    load_weights(model, checkpoint / "model")
    return model.to(device).eval(), processor, cfg
