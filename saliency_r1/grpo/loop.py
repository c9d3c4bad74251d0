"""The GRPO training loop of Saliency-R1, readable top to bottom.

``train(cfg)`` does, per step: sample prompts; generate ``G`` completions of each with the saliency
capture on (or, with ``--rollout-backend vllm``, sample them with vLLM and take the maps and the
policy's log-probs from one fused forward); score them (format, accuracy, saliency-in-box through ``saliency_r1.ops.reward``,
extra callables); normalise advantages within each group; take ``inner_iterations`` optimizer
steps of the clipped surrogate (ratio to the policy that generated; under vLLM, each token's term
weighted by the importance ratio of the policy to vLLM's sampler); hand vLLM the new weights; log;
checkpoint.

What the loop calls has its own module: model loading (``saliency_r1.models``), data
(``saliency_r1.data``), prompts (``saliency_r1.prompts``), log-probs (``saliency_r1.logps``), the
saliency engine (``saliency_r1.saliency``), scores (``saliency_r1.grpo.scores``), the tiny model's
cold start (``saliency_r1.grpo.cold_start``), the loss and checkpoints.

Multi-process runs go through accelerate (DDP): launch the same command with ``accelerate launch``
(GPUs) or ``torchrun`` (the CPU test); each process samples its own prompts, gradients are
averaged by DDP, and every process holds the same parameters after each step. FSDP and DeepSpeed
are refused before anything loads (:func:`check_distribution`); TRL's trainer
(``saliency_r1.trl``) handles DeepSpeed itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from saliency_r1.adapters import get_adapter
from saliency_r1.errors import ConfigError
from saliency_r1.grpo.checkpoint import (BASE_MODEL_DIR, latest_checkpoint, load_checkpoint, load_weights,
                                         save_checkpoint, save_model_dir)
from saliency_r1.grpo.config import TrainConfig, check_trackers_installed
from saliency_r1.grpo.loss import group_advantages, importance_sampling_weights, policy_loss
from saliency_r1.logps import completion_logps, pad_completions
from saliency_r1.models import load_policy_model, load_policy_processor, lora_base_dtype, with_lora
from saliency_r1.prompts import image_rows, prompt_inputs, select_rows, system_prompt_or_default

logger = logging.getLogger(__name__)


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


@dataclass
class RunResult:
    """Where a run put its outputs, and its held-out evaluations (``{step: metrics}``)."""

    log_path: Path
    plot_path: Path
    checkpoint: Path
    evaluations: dict[int, dict] = field(default_factory=dict)
    tracker_dirs: dict[str, Path] = field(default_factory=dict)  # local folder of each --report-to tracker


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

    from saliency_r1.data.sets import load_data
    from saliency_r1.evaluate import evaluate
    from saliency_r1.grpo.cold_start import cold_start
    from saliency_r1.grpo.plots import plot_reward_curves
    from saliency_r1.grpo.scores import load_reward_callable, pointing_rate, score_rollouts
    from saliency_r1.saliency import generate_with_saliency

    cfg.check_paths()  # before anything loads
    check_trackers_installed(cfg.report_to)
    if cfg.rollout_backend == "vllm":
        from saliency_r1.grpo.vllm_engine import check_vllm_installed, merged_weights, vllm_rollouts

        check_vllm_installed()
    extra = [load_reward_callable(spec) for spec in cfg.extra_rewards]
    accelerator = Accelerator(cpu=cfg.device_type() == "cpu", log_with=cfg.report_to or None,
                              project_dir=cfg.output_dir)
    check_distribution(accelerator.distributed_type)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if cfg.rollout_backend == "vllm" and world > 1:
        raise ConfigError(f"--rollout-backend vllm runs in one process (its engine lives in the training process); "
                          f"got {world}: launch without accelerate/torchrun, or use TRL's trainer (saliency_r1.trl) "
                          "with use_vllm=True")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)  # the same on every process: identical initial weights
    base_dtype = lora_base_dtype(cfg, device.type)
    processor = load_policy_processor(cfg)
    train_data, held_out = load_data(cfg, processor)  # before the model: bad records are found in seconds
    model = load_policy_model(cfg, processor, base_dtype if cfg.model else torch.float32).to(device)
    system = system_prompt_or_default(cfg.system_prompt)
    weights = {"format": cfg.format_weight, "accuracy": cfg.accuracy_weight, "saliency": cfg.saliency_weight}
    resume_from = latest_checkpoint(out) if cfg.resume == "auto" else cfg.resume

    # The tiny model's cold start (deterministic). A LoRA run keeps the cold-started base once, beside
    # its checkpoints, for resuming and evaluation to load; resuming a full fine-tune replaces every
    # weight, so it needs none.
    if cfg.cold_start_steps and cfg.model is None:
        if cfg.lora and resume_from:
            base_dir = Path(resume_from).parent / BASE_MODEL_DIR  # beside the checkpoint resumed from
            if not base_dir.is_dir():
                raise FileNotFoundError(f"{resume_from}: the tiny model's cold-started base, which its LoRA adapter "
                                        f"was trained on, should be in {base_dir}, which is missing")
            load_weights(model, base_dir)
        elif not resume_from:
            cold_start(model, processor, train_data, cfg, device)
            if cfg.lora and accelerator.is_main_process:
                save_model_dir(out / BASE_MODEL_DIR, model, processor)
            accelerator.wait_for_everyone()
    engine = None
    if cfg.rollout_backend == "vllm":
        # vLLM serves in the dtype the rollouts run in: the LoRA base's, or bf16 under autocast.
        served = base_dtype if cfg.lora else torch.bfloat16 if cfg.uses_bf16(device.type) else torch.float32
        engine = _start_vllm(model, processor, cfg, out, train_data, served)
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

    start_step, evaluations, bad_streak, best_format = 0, {}, 0, 0.0
    if resume_from:
        state = load_checkpoint(resume_from, model=policy, optimizer=optimizer, scheduler=scheduler, rank=rank)
        start_step = state["step"]
        evaluations = {int(k): v for k, v in state.get("evaluations", {}).items()}
        bad_streak, best_format = state.get("bad_streak", 0), state.get("best_format", 0.0)
    if engine is not None:
        engine.load_weights(merged_weights(policy))  # resumed, or LoRA: what vLLM serves is what trains
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
        names = ("saliency_in_box", "pointing_game", "accuracy", "format")
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
        inputs = prompt_inputs(processor, adapter, prompts, system, repeat=cfg.num_generations).to(device)
        policy.eval()
        with torch.no_grad(), _autocast(cfg, device):
            if engine is None:
                rollout = generate_with_saliency(policy, processor, inputs, adapter=adapter, path=cfg.saliency_path,
                                                 do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                                 max_new_tokens=cfg.max_completion_length,
                                                 suppress_tokens=adapter.vision_token_ids,
                                                 # A diverged policy's NaN logits become garbage completions
                                                 # (invalid rollouts, a non-finite step below), not a crash.
                                                 remove_invalid_values=True)
                sampling_logps, rejected = None, torch.zeros(len(examples), dtype=torch.bool, device=device)
            else:
                rollout, sampling_logps, rejected = vllm_rollouts(
                    engine, policy, processor, adapter, prompts, inputs, system_prompt=system,
                    num_generations=cfg.num_generations, max_tokens=cfg.max_completion_length,
                    temperature=cfg.temperature, top_p=cfg.top_p, path=cfg.saliency_path,
                    seed=(cfg.seed * 1_000_003 + step) * 1_000)  # a pure function of the step: resume samples alike
        clock.lap("rollout")

        # ---- 2. rewards, 3. group-normalised advantages
        scores = score_rollouts(rollout, examples, extra)
        scores = {name: value.masked_fill(rejected, 0.0) for name, value in scores.items()}  # vLLM's rejects
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
            # The ratio's denominator: the generating policy.
            sampling_weights, sampling_stats = None, {}
            if engine is not None:  # vLLM sampled: its fused forward gave the generating policy's log-probs
                old = [rollout.completion_logps[rows] for rows in micro]
                sampling_weights, sampling_stats = importance_sampling_weights(
                    rollout.completion_logps, sampling_logps, mask, cfg.importance_sampling,
                    cfg.importance_sampling_cap)
            elif cfg.inner_iterations > 1:  # later inner iterations move away from it
                old = [completion_logps(policy, select_rows(inputs, rows, pixel_rows), completion_ids[rows],
                                        mask[rows], cfg.temperature) for rows in micro]
            else:  # the one iteration uses logps.detach()
                old = None
            ref = [_reference_logps(reference, policy, cfg, select_rows(inputs, rows, pixel_rows), completion_ids[rows],
                                    mask[rows]) for rows in micro] if cfg.beta != 0.0 else None
        clip_fraction = torch.zeros((), device=device)
        kl = torch.zeros((), device=device)
        loss_sum = torch.zeros((), device=device)
        grad_norms, skipped = [], 0
        model.train()
        for _ in range(cfg.inner_iterations):
            for m, rows in enumerate(micro):
                sync = m + 1 == len(micro)  # DDP all-reduces gradients once per optimizer step
                with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), _autocast(cfg, device):
                    logps = completion_logps(model, select_rows(inputs, rows, pixel_rows), completion_ids[rows],
                                             mask[rows], cfg.temperature)
                    loss, stats = policy_loss(
                        logps, old[m] if old else logps.detach(), advantages[rows], mask[rows],
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, normalisation=cfg.normalisation,
                        max_completion_length=cfg.max_completion_length, token_count=token_count,
                        beta=cfg.beta, ref_logps=ref[m] if ref else None,
                        sampling_weights=None if sampling_weights is None else sampling_weights[rows])
                    if cfg.normalisation != "token":  # means over the micro-batch -> mean over the batch
                        loss = loss * len(rows) / len(examples)
                    accelerator.backward(loss)
                share = len(rows) / len(examples) / cfg.inner_iterations
                clip_fraction += stats["clip_fraction"] * share
                kl += stats["kl"] * share
                loss_sum += loss.detach() / cfg.inner_iterations
            # The norm before clipping (an infinite bound only measures). DDP has averaged the gradients,
            # so every process takes the same decision below.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                    cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            grad_norms.append(grad_norm.detach().float())
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
            # A sync per optimizer step, as a gradient scaler's: a NaN or inf loss (its gradient is then
            # NaN too) or gradient must not reach the weights. The step is skipped and logged.
            if bool(torch.isfinite(grad_norm)):
                optimizer.step()
                scheduler.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
        policy.eval()
        bad_streak = bad_streak + 1 if skipped == cfg.inner_iterations else 0
        clock.lap("update")
        if engine is not None and skipped < cfg.inner_iterations:
            engine.load_weights(merged_weights(policy))  # the next rollouts sample from the updated policy
            clock.lap("sync")

        # ---- 5. log (the step's metrics are read from the device only here), checkpoint, evaluate
        lengths = mask.sum(-1)
        pending.append((step, {**{f"reward/{k}": v.nanmean() for k, v in scores.items()},
                               "reward/total": total.mean(), "saliency_in_box": scores["saliency"].mean(),
                               "accuracy": scores["accuracy"].mean(), "format": scores["format"].mean(),
                               "kl": kl, "clip_fraction": clip_fraction, "loss": loss_sum,
                               "grad_norm": torch.stack(grad_norms).mean(),
                               "skipped_steps": torch.tensor(float(skipped), device=device),
                               "saliency/non_finite": rollout.non_finite.float().mean(),
                               "completion_length/mean": lengths.mean(), "completion_length/max": lengths.max(),
                               "rollout/rejected": rejected.float().mean(),
                               **{f"importance_sampling/{k}": v for k, v in sampling_stats.items()},
                               "learning_rate": torch.tensor(learning_rate)}))
        if timed:
            record = _flush(pending, accelerator)
            local_rate = torch.tensor(pointing_rate(rollout, examples), device=device)
            record["pointing_game"] = float(accelerator.reduce(local_rate, reduction="mean"))  # every process's
            # generate() ends in a host sync (stopping criteria); the rest of the synced rollout lap is saliency.
            generation = rollout.timings["generate"]
            record.update({"time/generation": generation, "time/saliency": clock.laps["rollout"] - generation,
                           "time/reward": clock.laps["reward"], "time/update": clock.laps["update"],
                           **({"time/weight_sync": clock.laps.get("sync", 0.0)} if engine is not None else {})})
            record["time/saliency_share"] = (record["time/saliency"] + record["time/reward"]) / sum(clock.laps.values())
            record["tokens_per_second"] = float(lengths.sum()) * world / max(generation, 1e-9)
            best_format = max(best_format, record["reward/format"])
            if record["reward/format"] == 0.0 and best_format > 0.0:
                record["warning"] = (f"the format reward collapsed to 0 (it was {best_format:.3f}): the policy no "
                                     "longer writes <think>...</think><answer>...</answer>; the learning rate may "
                                     "be too high")
                logger.warning("step %d: %s", record["step"], record["warning"])
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                if cfg.report_to:
                    accelerator.log({k: v for k, v in record.items() if k not in ("step", "warning")},
                                    step=record["step"])
                bar.set_postfix(reward=f"{record['reward/total']:.3f}", sal=f"{record['saliency_in_box']:.3f}")
        done = step + 1
        if bad_streak >= cfg.max_non_finite_steps:
            raise RuntimeError(f"training diverged: {bad_streak} steps in a row (to step {done}) had a NaN or "
                               f"infinite loss or gradient, and were skipped; the weights are those of step "
                               f"{done - bad_streak}. Lower --learning-rate ({cfg.learning_rate:g}) or "
                               f"--max-grad-norm, or resume from an earlier checkpoint.")
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            run_evaluation(done)
        # A skipped step left the weights as they were, so a checkpoint after one is the last good state.
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            if done == cfg.steps:
                run_evaluation(done)
            save_checkpoint(out / f"checkpoint-{done}", model=policy, optimizer=optimizer, scheduler=scheduler,
                            state={"step": done, "data_position": done * global_prompts,
                                   "evaluations": evaluations, "bad_streak": bad_streak, "best_format": best_format},
                            config=cfg, rank=rank, is_main=accelerator.is_main_process, processor=processor,
                            barrier=accelerator.wait_for_everyone)
    bar.close()
    tracker_dirs = {}
    if cfg.report_to and accelerator.is_main_process:
        tracker_dirs = {name: Path(directory) for name in cfg.report_to
                        if (directory := _tracker_dir(accelerator.get_tracker(name))) is not None}
    if cfg.report_to:
        accelerator.end_training()
    plot_path = out / "reward_curves.png"
    if accelerator.is_main_process:
        plot_reward_curves(log_path, plot_path)
    accelerator.wait_for_everyone()
    return RunResult(log_path=log_path, plot_path=plot_path, checkpoint=out / f"checkpoint-{cfg.steps}",
                     evaluations=evaluations, tracker_dirs=tracker_dirs)


def _start_vllm(model, processor, cfg: TrainConfig, out: Path, train_data, dtype: torch.dtype):
    """The vLLM engine of a run, before any step (and before LoRA wraps the model): started from ``--model``
    as it is, or from the tiny model saved in the hub layout into ``out/vllm-model``; the weights are handed
    over again before the first step (resumed, or with LoRA merged)."""
    from saliency_r1.grpo.vllm_engine import VLLMEngine
    from saliency_r1.models import save_in_hub_layout

    folder = cfg.model
    if folder is None:
        folder = save_in_hub_layout(model, processor, out / "vllm-model")
    text = model.config.get_text_config()
    image_tokens = cfg.max_pixels // (28 * 28)  # Qwen2.5-VL: one token per 28 x 28 pixels
    return VLLMEngine(folder, dtype=dtype, seed=cfg.seed,
                      max_model_len=min(text.max_position_embeddings,
                                        image_tokens + 2048 + cfg.max_completion_length),  # 2048: the text
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      image_pixels=(cfg.min_pixels, cfg.max_pixels), probe_image=train_data[0]["image"])


def _tracker_dir(tracker) -> str | None:
    """Where an accelerate tracker writes: TensorBoard's log directory, a W&B run's local directory."""
    if getattr(tracker, "logging_dir", None):
        return tracker.logging_dir
    run = getattr(tracker, "run", None)
    return str(Path(run.dir).parent) if getattr(run, "dir", None) else None


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
