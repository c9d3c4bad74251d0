"""Shared measurement helpers for the benchmarks: peak memory on CPU and CUDA, median timing, and
the summary lines for bench/RESULTS.md (printed by bench/conftest.py at the end of the session)."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import statistics
import time
from typing import Any, Callable, Iterator

import pytest
import torch
from transformers import LogitsProcessor

RESULT_LINES: list[str] = []

# Language models of the generation benchmarks: a small one for 1-thread CPU runs, and
# Qwen2.5-VL-3B's (random weights) for CUDA.
SMALL_TEXT_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2)
QWEN2_5_VL_3B_TEXT_MODEL = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6)
# Every benchmark's devices: the CPU always; the CUDA variant is collected everywhere and skips
# itself without a GPU, so that a CPU dry run of bench/gpu.sh reports it.
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA variant (needs a GPU)")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]
# The words of the benchmarks' scripted reasoning.
THINK_WORDS = [" the", " circle", " is", " on", " the", " left", " and", " it", " is", " red", ",", " so"]


@contextlib.contextmanager
def one_cpu_thread(device: str) -> Iterator[None]:
    """One thread for a CPU run (the CI machine is shared: more threads would time the neighbours)."""
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scripted_completions(tokenizer, rows: int, length: int, answer: str) -> list[list[int]]:
    """Per row, a well-formed completion of exactly ``length`` tokens: a think of ``THINK_WORDS``
    (row ``r`` starts ``r`` words further into their cycle, so rows differ), then ``answer`` tagged."""
    def one(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    tail = one(f"</think><answer>{answer}</answer>") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    words = [one(word)[0] for word in THINK_WORDS]
    body = length - 1 - len(tail)
    return [one("<think>") + [words[(r + k) % len(words)] for k in range(body)] + tail for r in range(rows)]


class ScriptedRows(LogitsProcessor):
    """Generation along given completions: row ``r`` emits ``scripts[r]``, one token per step."""

    def __init__(self, scripts: list[list[int]]):
        self.scripts = torch.tensor(scripts)
        self.step = 0

    def __call__(self, input_ids, scores):
        if self.scripts.device != scores.device:  # once: no host-to-device copy per step
            self.scripts = self.scripts.to(scores.device)
        column = self.scripts[:, min(self.step, self.scripts.shape[1] - 1)]
        self.step += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(len(column), device=scores.device), column] = 0.0
        return forced


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_memory(fn: Callable[[], Any], *, cuda: bool) -> tuple[Any, int]:
    """Run ``fn`` once; return its result and the peak memory it took beyond what was in use before.

    CUDA: the caching allocator's peak allocated bytes. CPU: the process's peak resident set
    (VmHWM), reset before the call through /proc/self/clear_refs, minus the resident set before it;
    freed heap pages go back to the OS first (glibc malloc_trim), or a computation that reuses pages
    freed earlier in the process would read as 0 extra bytes.
    """
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    before = _rss_bytes("VmRSS")
    result = fn()
    return result, max(_rss_bytes("VmHWM") - before, 0)


def peak_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` once; return its result and the peak of tensor memory allocated during the call and not
    yet freed (the CPU allocator's events seen by the profiler, in time order).

    On CPU the resident-set peak (``common.measure_peak_memory``) cannot see these runs: freed tensors
    go back to the allocator, the next run reuses them, and the RSS does not move. The profiler's
    allocation events give what ``torch.cuda.max_memory_allocated`` gives on a GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, live)
    return result, peak


def time_median(fn: Callable[[], Any], *, rounds: int, warmup: int = 1, cuda: bool) -> float:
    """Median wall-clock seconds of ``fn`` over ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{torch.get_num_threads()}-thread CPU ({platform.machine()}), torch {torch.__version__}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def report(benchmark, name: str, *, ours_s: float, baseline_s: float, ours_peak: int, baseline_peak: int,
           **extra: Any) -> None:
    """Record a benchmark's figures in ``benchmark.extra_info`` and as a line for bench/RESULTS.md.

    ``ours_s`` is usually ``benchmark.stats.stats.median``; the baseline is timed in the same test.
    """
    info = dict(ours_s=ours_s, baseline_s=baseline_s, speedup=baseline_s / ours_s,
                ours_peak_bytes=ours_peak, baseline_peak_bytes=baseline_peak,
                memory_ratio=baseline_peak / max(ours_peak, 1), machine=machine(), **extra)
    benchmark.extra_info.update(info)
    extras = ", ".join(f"{key}={value}" for key, value in extra.items())
    RESULT_LINES.append(
        f"| {time.strftime('%Y-%m-%d')} | {machine()} | {name} | {_fmt_seconds(ours_s)} | {_fmt_seconds(baseline_s)} | "
        f"{info['speedup']:.1f}x | {_fmt_bytes(ours_peak)} | {_fmt_bytes(baseline_peak)} | "
        f"{info['memory_ratio']:.1f}x | {extras} |")
