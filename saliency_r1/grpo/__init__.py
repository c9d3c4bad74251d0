"""Our lean GRPO loop (``loop``): its configuration, loss, scores, checkpoints, the tiny model's cold
start, and its plots, each in its own module."""
