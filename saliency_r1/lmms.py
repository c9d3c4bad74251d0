"""Any saliency-r1 model in lmms-eval: ``lmms-eval --model saliency_r1 --model_args pretrained=CKPT --tasks pope,...``.

The model class is registered through the ``lmms_eval.models`` entry point (``pyproject.toml``), so it
needs the optional extra: ``pip install 'saliency-r1[lmms]'``. ``pretrained`` is anything
:func:`saliency_r1.models.resolve_model` takes: a checkpoint written by ``train``, a LoRA adapter folder,
a model folder in the Hugging Face layout, or a hub id.

Each request is answered as our own evaluation answers a record (:func:`saliency_r1.evaluate.evaluate`):
the think/answer system prompt (the checkpoint's own, else the default one), the images then the
question in the user turn, a greedy completion by our generation engine with the vision tokens
suppressed. lmms-eval receives the ANSWER SPAN of the completion (:func:`saliency_r1.spans.answer_text`;
an empty string for a completion without a well-formed think/answer structure), so that a task's own
metric scores the answer and not the reasoning.

Model arguments (``--model_args key=value,...``):

- ``pretrained`` (required): the model reference.
- ``device``: default ``cuda`` when present, else ``cpu`` (``--device`` sets it too).
- ``dtype``: ``float32``, ``bfloat16``, ``float16`` or ``float64``; default bf16 on cuda, float32 on cpu.
- ``max_new_tokens``: the completion budget, reasoning included, for every task. Without it, the larger
  of the checkpoint's budget (its run's ``max_completion_length``, else 256) and the task's
  ``max_new_tokens``: a task sizes its budget for a direct answer, a thinking model spends most of it
  on its reasoning.
- ``system_prompt``: the system message (a string, or a file holding it); default: the checkpoint's own,
  else :data:`saliency_r1.prompts.SYSTEM_PROMPT`.
- ``path``: saliency path (``cot``, ``direct``, ``both``); default: the checkpoint's own, else ``cot``.
- ``box_field``: the document field holding the evidence box(es), normalised ``[x1, y1, x2, y2]``
  (default ``bbox``). Where a document has one, and one image, the sample's saliency-in-box
  (energy-based pointing game) and pointing-game hit are measured as our evaluation measures them.
- ``saliency_log``: a JSONL file that receives one line per request: ``task``, ``doc_id``, the full
  ``completion``, the returned ``response``, ``valid``, and ``saliency_in_box``/``pointing_game`` where
  the document has boxes. The same records are kept in the instance's ``samples``; the mean
  saliency-in-box of each task is logged.
- ``tolerance``: pointing-game radius in pixels (default 15).

The batch size is lmms-eval's ``--batch_size``. Batches are formed from consecutive requests of one task
in lmms-eval's order (not sorted by length), as our evaluation batches consecutive records, so that both
produce the same completions. A task's stop strings (``until``) never stop the generation (a reasoning may
well contain the default ``"\\n\\n"``): they cut the returned answer span. Generation is always greedy.
``loglikelihood`` (multiple-choice scoring by likelihood) and multi-round generation are not supported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:  # an optional extra: without it this module still imports (the package's import walk), the class refuses
    from lmms_eval.api.model import lmms as _LmmsBase
except Exception as _error:  # noqa: BLE001 - absent, or present but broken: the class says why when used
    _LmmsBase, _LMMS_IMPORT_ERROR = object, _error
else:
    _LMMS_IMPORT_ERROR = None

MODEL_ID = "saliency_r1"
DTYPES = ("float32", "bfloat16", "float16", "float64")


def manifest():
    """The ``lmms_eval.models`` entry point's payload: the model id and the class path.

    A callable (lmms-eval's registry calls it), so that importing this module never imports
    ``lmms_eval.models``, whose registry loads the entry points while it initialises.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.SaliencyR1", aliases=("saliency-r1",))


def _logger():
    from loguru import logger  # lmms-eval's logger

    return logger


def apply_stop_strings(answer: str, until) -> str:
    """The answer cut at the first of the stop strings ``until`` (a string or a list), stripped.

    >>> apply_stop_strings("yes\\n\\nbecause", ["\\n\\n"]), apply_stop_strings("dark", None)
    ('yes', 'dark')
    """
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            answer = answer.split(stop)[0]
    return answer.strip()


class SaliencyR1(_LmmsBase):
    """A saliency-r1 model (any reference :func:`saliency_r1.models.resolve_model` takes) answering
    lmms-eval's ``generate_until`` requests with the answer span of its think/answer completion (see the
    module docstring for the model arguments)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | None = None, system_prompt: str | None = None,
                 path: str | None = None, box_field: str = "bbox", saliency_log: str | None = None,
                 tolerance: float = 15.0, max_batch_size: int | None = None) -> None:
        if _LMMS_IMPORT_ERROR is not None:
            raise ImportError("saliency_r1.lmms needs lmms-eval: pip install 'saliency-r1[lmms]'") \
                from _LMMS_IMPORT_ERROR
        super().__init__()
        import torch

        from saliency_r1.adapters import get_adapter
        from saliency_r1.errors import ConfigError
        from saliency_r1.models import resolve_model
        from saliency_r1.prompts import system_prompt_or_default

        if not pretrained:
            raise ConfigError("saliency_r1 needs --model_args pretrained=MODEL (a checkpoint of train, a LoRA "
                              "adapter folder, a model folder or a hub id)")
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"saliency_r1: --batch_size must be a number, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise ConfigError(f"saliency_r1: --batch_size must be at least 1, got {batch_size}")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"saliency_r1: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if max_new_tokens is not None and int(max_new_tokens) < 1:
            raise ConfigError(f"saliency_r1: max_new_tokens must be at least 1, got {max_new_tokens}")
        if path is not None and path not in ("cot", "direct", "both"):
            raise ConfigError(f"saliency_r1: path must be cot, direct or both, got {path!r}")

        self.source = resolve_model(str(pretrained))
        self.source.check_family()
        device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one GPU per process
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self._device = torch.device(device)
        dtype = dtype or ("bfloat16" if self._device.type == "cuda" else "float32")
        self.dtype = getattr(torch, dtype)
        self.processor = self.source.processor()
        self._model = self.source.load(self._device, self.dtype)
        self.adapter = get_adapter(self._model)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        own_prompt = self._resolve_system_prompt(str(system_prompt)) if system_prompt is not None else None
        self.system_prompt = system_prompt_or_default(own_prompt if own_prompt is not None
                                                      else self.source.system_prompt)
        self.path = path or self.source.saliency_path
        self.box_field = box_field
        self.tolerance = float(tolerance)
        self.saliency_log = Path(saliency_log) if saliency_log else None
        if self.saliency_log is not None:
            self.saliency_log.parent.mkdir(parents=True, exist_ok=True)
            self.saliency_log.write_text("")
        self.samples: list[dict] = []
        self._warned: set[str] = set()

    # lmms-eval reads these
    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def budget(self, gen_kwargs: dict) -> int:
        """The completion budget of a request (see ``max_new_tokens`` in the module docstring)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return max(self.source.max_new_tokens, int(gen_kwargs.get("max_new_tokens") or 0))

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "saliency_r1 does not score by log-likelihood (multiple-choice tasks with output_type loglikelihood or "
            "multiple_choice): it answers with the answer span of a think/answer completion; use a task variant "
            "with output_type generate_until")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("saliency_r1 does not support multi-round generation (generate_until_multi_round)")

    def generate_until(self, requests) -> list[str]:
        """The answer span of each request's greedy think/answer completion ("" when not well formed), in the
        order of ``requests``; batches of ``batch_size`` consecutive requests of one task and one set of
        generation arguments."""
        from tqdm import tqdm

        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups.setdefault((task, split, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        responses: list[str | None] = [None] * len(requests)
        first = len(self.samples)
        with tqdm(total=len(requests), desc="saliency_r1", disable=self.rank != 0) as bar:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    for i, response in zip(chunk, self._answer([requests[i] for i in chunk])):
                        responses[i] = response
                        context, gen_kwargs = requests[i].args[:2]
                        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), response)
                    bar.update(len(chunk))
        self._log_saliency(self.samples[first:])
        return responses

    def _answer(self, requests) -> list[str]:
        """One batch: its prompts (sub-batched by image count), completions, answers and saliency records."""
        from saliency_r1.errors import ConfigError

        gen_kwargs = requests[0].args[1] or {}
        if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample"):
            self._warn_once("sampling", "saliency_r1 generates greedily: the task's sampling arguments are ignored")
        items = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
            images = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
            for visual in images:
                if not hasattr(visual, "convert"):
                    raise ConfigError(f"saliency_r1 answers with images only; task {task} gives a "
                                      f"{type(visual).__name__} (a video or an audio clip?)")
            items.append({"task": task, "doc_id": doc_id, "doc": doc, "images": [v.convert("RGB") for v in images],
                          "question": context.replace("<image>", "") if isinstance(context, str) else str(context)})
        answers: list[str | None] = [None] * len(items)
        by_count: dict[int, list[int]] = {}
        for k, item in enumerate(items):
            by_count.setdefault(len(item["images"]), []).append(k)
        budget = self.budget(gen_kwargs)
        for count, ks in by_count.items():
            for k, response in zip(ks, self._generate([items[k] for k in ks], count, budget, gen_kwargs.get("until"))):
                answers[k] = response
        return answers

    def _generate(self, items: list[dict], count: int, budget: int, until) -> list[str]:
        import torch

        from saliency_r1.prompts import chat_messages, prompt_inputs
        from saliency_r1.saliency import generate_with_saliency
        from saliency_r1.spans import answer_text

        if count == 1:  # our evaluation's prompts exactly
            inputs = prompt_inputs(self.processor, self.adapter,
                                   [{"image": item["images"][0], "problem": item["question"]} for item in items],
                                   self.system_prompt)
        else:
            messages = [chat_messages(self.adapter, item["question"], self.system_prompt, num_images=count)
                        for item in items]
            texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in messages]
            self.processor.tokenizer.padding_side = "left"
            inputs = self.processor(text=texts, images=[item["images"] for item in items] if count else None,
                                    return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        with torch.no_grad():
            rollout = generate_with_saliency(self._model, self.processor, inputs, adapter=self.adapter, path=self.path,
                                             do_sample=False, max_new_tokens=budget,
                                             suppress_tokens=self.adapter.vision_token_ids)
        responses = []
        for b, item in enumerate(items):
            answer = answer_text(rollout.texts[b])
            response = "" if answer is None else apply_stop_strings(answer, until)
            responses.append(response)
            valid = bool(rollout.valid[b]) and bool(rollout.maps[b])
            record = {"task": item["task"], "doc_id": item["doc_id"], "completion": rollout.texts[b],
                      "response": response, "valid": valid}
            record.update(self._box_scores(item, rollout.maps[b], valid))
            self.samples.append(record)
            if self.saliency_log is not None:
                with self.saliency_log.open("a") as log:
                    log.write(json.dumps(record) + "\n")
        return responses

    def _box_scores(self, item: dict, maps, valid: bool) -> dict:
        """``saliency_in_box`` and ``pointing_game`` of a one-image document with boxes (``{}`` without),
        as :func:`saliency_r1.evaluate.evaluate_batch` measures them: an invalid completion scores 0 and a miss."""
        from saliency_r1.data.loader import parse_normalised_boxes
        from saliency_r1.metrics import energy_in_boxes, pixel_boxes, pointing_game_hit

        value = item["doc"].get(self.box_field) if isinstance(item["doc"], dict) else None
        if value is None or len(item["images"]) != 1:
            return {}
        try:
            boxes = parse_normalised_boxes(value)
        except (TypeError, ValueError) as error:
            self._warn_once(f"boxes:{item['task']}", f"saliency_r1: {item['task']}'s {self.box_field!r} is not a "
                                                     f"normalised [x1, y1, x2, y2] box ({error}); no saliency-in-box")
            return {}
        if not valid:
            return {"saliency_in_box": 0.0, "pointing_game": False}
        width, height = item["images"][0].size
        pixels = pixel_boxes(boxes, height, width)
        return {"saliency_in_box": energy_in_boxes(maps[0], (height, width), pixels),
                "pointing_game": pointing_game_hit(maps[0], (height, width), pixels, self.tolerance)}

    def _log_saliency(self, records: list[dict]) -> None:
        by_task: dict[str, list[dict]] = {}
        for record in records:
            if "saliency_in_box" in record:
                by_task.setdefault(record["task"], []).append(record)
        for task, scored in by_task.items():
            mean = sum(r["saliency_in_box"] for r in scored) / len(scored)
            hits = sum(r["pointing_game"] for r in scored) / len(scored)
            _logger().info(f"saliency_r1: {task}: saliency-in-box {mean:.4f}, pointing game {hits:.4f} "
                           f"over {len(scored)} samples")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _logger().warning(message)
