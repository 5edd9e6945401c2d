"""AAHR model, its losses and the VSE baseline (``aahr-method.md`` sections 2, 3, 4, 6).

Public API (used by ``aahr_fast.train`` / ``aahr_fast.evaluate``):
    ModelConfig                     every hyperparameter (defaults = the paper's)
    build_model(cfg, dims)          -> AAHR | VSEBaseline
    model.training_step(batch, step, generator) -> {"loss": Tensor, "parts": {name: float}}
    model.encode_images(batch) / model.encode_texts(batch) -> (B, D)
    model.param_groups(lr, backbone_lr_mult), model.on_after_optimizer_step(),
    model.resolve_schedule(steps_per_epoch, total_steps)
"""
from aahr_fast.models.aahr import AAHR, build_model
from aahr_fast.models.baseline import VSEBaseline
from aahr_fast.models.config import ModelConfig, parse_start, resolve_start

__all__ = ["AAHR", "VSEBaseline", "ModelConfig", "build_model", "parse_start", "resolve_start"]
