"""Fine-tuning: recipes (config + presets), trainable-parameter strategies, loss, loop.

>>> from paligemma_xray.train import resolve
>>> config = resolve()            # big-vision, the original recipe
>>> config.recipe, config.trainable, config.optimizer, config.lr, config.steps
('big-vision', 'attention', 'sgd', 0.01, 64)

``run(config)`` trains and returns a :class:`RunSummary`; ``run(config, resume=True)``
continues the run in ``config.out`` exactly where its last checkpoint left it.

The loop (torch, transformers) is imported on first use, so that reading recipes (the
command line's ``--help``) stays light.
"""

from typing import Any

from paligemma_xray.train.recipes import PRESETS, TrainConfig, from_run, preset, resolve

_LOOP = ("Interrupted", "RunSummary", "lr_factor", "run")


def __getattr__(name: str) -> Any:
    if name in _LOOP:
        from paligemma_xray.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'paligemma_xray.train' has no attribute {name!r}")


__all__ = ["PRESETS", "TrainConfig", "from_run", "preset", "resolve", *_LOOP]
