"""Callbacks of the training tasks, and the ``callbacks`` config group made into a trainer's callbacks."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def configured_callbacks(cfg: DictConfig, loggers: list) -> list:
    """The ``callbacks`` group instantiated, less what this trainer would refuse: the LR monitor without
    loggers, the progress bar with ``trainer.enable_progress_bar`` off."""
    import hydra

    bar = bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True))
    return [hydra.utils.instantiate(c) for name, c in (cfg.get("callbacks") or {}).items()
            if c is not None and (loggers or name != "lr_monitor") and (bar or name != "progress_bar")]
