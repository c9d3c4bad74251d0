"""saliency-r1: saliency-map rewards that teach vision-language models to look where they reason.

``saliency_r1.reward`` and ``saliency_r1.layer_saliency`` are the ops (``saliency_r1.ops``). They are
loaded on first use, so that importing a submodule (the command line, a configuration) pays for
neither torch nor the compiled library.
"""

__all__ = ["layer_saliency", "reward"]


def __getattr__(name: str):
    if name in __all__:
        from saliency_r1 import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'saliency_r1' has no attribute {name!r}")
