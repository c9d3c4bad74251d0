"""Prints the lines for bench/RESULTS.md at the end of a benchmark session."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

from common import RESULT_LINES  # noqa: E402

HEADER = ("| date | machine | benchmark | ours | baseline | speed-up | ours peak mem | baseline peak mem "
          "| memory ratio | notes |\n|---|---|---|---|---|---|---|---|---|---|")


def pytest_terminal_summary(terminalreporter):
    if RESULT_LINES:
        terminalreporter.write_sep("=", "lines for bench/RESULTS.md")
        terminalreporter.write_line(HEADER)
        for line in RESULT_LINES:
            terminalreporter.write_line(line)
