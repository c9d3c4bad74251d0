"""The training and held-out sets a run's configuration names: the synthetic grounded-VQA set, or
Saliency-R1-format files."""

from __future__ import annotations


def load_data(cfg, processor=None):
    """``(train, held_out)``: indexable sets of records (``image``, ``problem``, ``solution``, ``bbox``);
    ``held_out`` is ``None`` when ``cfg.data`` is given without ``cfg.eval_data``.

    Args:
        cfg: a :class:`~saliency_r1.grpo.config.TrainConfig`.
        processor: the model's processor; records whose image it would reject are skipped at load.
    """
    from saliency_r1.data.loader import load_saliency_data
    from saliency_r1.data.synthetic import SyntheticConfig, SyntheticGroundedVQA

    if cfg.data is None:
        drawing = SyntheticConfig(image_size=cfg.image_size, num_objects=cfg.num_objects,
                                  questions=cfg.synthetic_questions)
        return (SyntheticGroundedVQA(cfg.train_size, seed=cfg.data_seed, config=drawing),
                SyntheticGroundedVQA(cfg.eval_size, seed=cfg.eval_seed, config=drawing))
    from saliency_r1.errors import ConfigError
    from saliency_r1.models import image_check

    check = image_check(processor) if processor is not None else None
    train = load_saliency_data(cfg.data, max_image_side=cfg.max_image_side, check_image=check)
    if len(train) == 0:
        raise ConfigError(f"--data {cfg.data}: no usable records ({len(train.skipped)} skipped, the reasons logged)")
    held_out = (load_saliency_data(cfg.eval_data, max_image_side=cfg.max_image_side, check_image=check)
                if cfg.eval_data else None)
    return train, held_out
