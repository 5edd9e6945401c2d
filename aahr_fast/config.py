"""Training configuration: nested dataclasses, YAML files and ``section.key=value`` overrides.

A run is described by one :class:`TrainConfig` with five sections:

==========  ============================================================================
``data``    :class:`DataConfig`: where the features come from, splits, loader options
``model``   :class:`aahr_fast.models.ModelConfig` (owned by the model package)
``optim``   :class:`OptimConfig`: AdamW, batch size, backbone lr multiplier, grad clipping
``schedule`` :class:`ScheduleConfig`: epochs and the step decay (x ``decay_factor`` at epochs)
``run``     :class:`RunConfig`: seed, device, mixed precision, checkpointing, logging
==========  ============================================================================

Sources are applied in this order: dataclass defaults, then a YAML file (``--config``; shipped
configs live in ``aahr_fast/configs/*.yaml`` and can be named without path or suffix), then
command-line overrides ``section.key=value``. Override values are parsed as YAML scalars/lists
(``optim.lr=1e-3``, ``schedule.decay_epochs=[15,25]``, ``run.threads=null``) and then coerced to
the field's declared type, so ``optim.batch_size=abc`` fails with a message naming the key.

Errors (all :class:`aahr_fast.utils.errors.ConfigError`):
    * an unknown section or key (a typo) names the full dotted key and suggests the closest valid
      one (``difflib``);
    * a value that does not parse as the field's type names the key, the type and the value;
    * incompatible values (batch too small for the neighbour top-k, queue smaller than a batch,
      attention heads that do not divide the width, decay epochs out of order, ...) are reported by
      :func:`validate_config`.

The resolved configuration is saved with every run as ``config.yaml`` (:func:`save_config`) and
embedded in each checkpoint, so a run can be rebuilt from its folder alone.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from aahr_fast.utils.errors import ConfigError, unknown_key_error
from aahr_fast.utils.errors import suggest_key as _suggest
from aahr_fast.utils.io import atomic_write

__all__ = [
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RunConfig",
    "TrainConfig",
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "resolve_config_path",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_override",
    "validate_config",
    "save_config",
    "diff_configs",
    "unknown_key_error",
]

#: Folder of the shipped YAML configs (installed as package data).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Config used by ``python -m aahr_fast.train`` with no ``--config``: the embedded synthetic job.
DEFAULT_CONFIG = "synthetic"


def _model_config_cls() -> type:
    from aahr_fast.models.config import ModelConfig  # lazily: the model package may pull in torch

    return ModelConfig


def _default_model_config() -> Any:
    return _model_config_cls()()


@dataclass
class DataConfig:
    """Where the training/evaluation data comes from and how it is loaded.

    Attributes:
        path: ``"synthetic"`` (the embedded procedurally rendered dataset: rendered, then run through
            ``prepare`` into ``cache_dir``; both cached), a prepared feature folder (written by
            ``python -m aahr_fast.prepare``, see docs/DESIGN.md), or any raw dataset spec that
            ``aahr_fast.data.open_dataset`` understands (e.g. the Flickr8k folder), which is then
            prepared once into ``cache_dir``. The command-line ``--data`` sets this.
        train_split, dev_split, test_split: split names in the feature folder. Model selection uses
            ``dev_split`` only (never the test split).
        protocol: test protocol, ``"1k"`` (whole test matrix, Flickr), ``"coco5fold"`` or ``"5k"``.
        region_drop: size augmentation, probability of dropping each region in training (GPO).
        word_mask_prob: word masking in training (the authors' ``process_caption_bert``): probability that
            a word of a caption is selected (authors 0.2; 0 = off, the default). Fine-tuned text
            (``model.text_mode: finetune``): whole words on token ids; frozen token features: per token,
            see :class:`aahr_fast.data.features.WordMasking` and docs/FIDELITY.md.
        word_mask_split: ``[mask, random, delete]`` fractions of the selected words (authors 0.5 / 0.1 /
            0.4): replaced by [MASK], by random tokens, or deleted. Must sum to 1.
        num_workers: DataLoader worker processes (0 = load in the main process).
        eval_batch_size: items per forward pass when encoding dev/test images and captions.
        dev_max_images: evaluate model selection on only the first N dev images (None = all).
        cache_dir: cache for the synthetic dataset and prepared features; None means
            ``$AAHR_CACHE`` or ``~/.cache/aahr_fast``.
        synthetic_train, synthetic_dev, synthetic_test: images per split of the synthetic dataset.
        synthetic_seed: seed of the synthetic dataset renderer.
        prepare_batch_size: images per backbone forward pass when preparing features.
    """

    path: str = "synthetic"
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    protocol: str = "1k"
    region_drop: float = 0.2
    word_mask_prob: float = 0.0
    word_mask_split: list[float] = field(default_factory=lambda: [0.5, 0.1, 0.4])
    num_workers: int = 0
    eval_batch_size: int = 256
    dev_max_images: int | None = None
    cache_dir: str | None = None
    synthetic_train: int = 1000
    synthetic_dev: int = 200
    synthetic_test: int = 200
    synthetic_seed: int = 0
    prepare_batch_size: int = 32


@dataclass
class OptimConfig:
    """AdamW optimiser settings (the GPO/HREM/AAHR recipe, aahr-method.md section 4).

    The lr multiplier of a fine-tuned text backbone is ``model.backbone_lr_mult`` (0.1 in the paper),
    passed to ``model.param_groups(lr, backbone_lr_mult)``.

    Attributes:
        batch_size: captions per training batch (each with its image), drop_last.
        lr: base learning rate (5e-4 in the paper).
        weight_decay: AdamW decoupled weight decay (1e-4).
        grad_clip: max global L2 norm of the gradients (2.0); <= 0 disables clipping.
        betas, eps: AdamW moments and epsilon.
    """

    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 2.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """Length of training and the step learning-rate decay.

    Attributes:
        epochs: number of passes over the training captions.
        decay_epochs: after these (1-based) epochs the lr is multiplied by ``decay_factor``
            (AAHR: 15 and 25 of 40).
        decay_factor: multiplicative lr decay (0.1).
        max_steps_per_epoch: cap on the optimiser steps of an epoch (None = full epoch); for
            quick experiments and tests.
    """

    epochs: int = 40
    decay_epochs: list[int] = field(default_factory=lambda: [15, 25])
    decay_factor: float = 0.1
    max_steps_per_epoch: int | None = None


@dataclass
class RunConfig:
    """Run-level options: seeding, device, precision, checkpointing and logging.

    Attributes:
        out_dir: run folder (config.yaml, metrics.jsonl, checkpoints, plots, test_results.json);
            None means ``runs/<config name>-<timestamp>``. ``--out`` sets this.
        seed: seeds python ``random``, numpy, torch, the sampler generator and the model's generator.
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: mixed precision on GPU: ``"auto"`` (bf16 where supported, else fp16), ``"bf16"``,
            ``"fp16"`` (with a GradScaler) or ``"none"``. Always off on CPU.
        deterministic: ``torch.use_deterministic_algorithms`` (warn-only) and no cuDNN benchmark;
            with it, CPU runs are bit-reproducible and resume exactly.
        threads: ``torch.set_num_threads`` (None = leave torch's default).
        save_every_steps: also checkpoint every N optimiser steps (0 = only at epoch ends); makes a
            mid-epoch resume possible.
        log_every_steps: append a step record to metrics.jsonl every N steps.
        max_nonfinite_steps: stop after this many consecutive steps with a non-finite loss or
            gradient (each one is skipped and logged); the last good checkpoint is kept.
        collapse_patience: stop when training has looked collapsed (see :mod:`aahr_fast.collapse`) for
            this many iterations in a row (0 = report collapse but never stop). No checkpoint is written
            while it lasts, so the last good checkpoint is kept. Checked at every logged step.
        collapse_min_spread: a batch whose final image or text embeddings have a spread (RMS distance of
            the L2-normalised rows from their mean, 0..1) below this looks collapsed (0 = no spread check).
        collapse_loss_rtol: a loss equal to the previous checked one within this relative tolerance
            looks collapsed (stuck at a degenerate constant; a loss of exactly 0 never does); null = no
            loss check.
        eval_every_epochs: evaluate on the dev split every N epochs (and always after the last).
        progress: show a tqdm progress bar.
        plots: write PNG plots (loss curves, dev rsum) after every epoch.
        keep_checkpoints: how many epoch/step checkpoints to keep besides those ``last`` and
            ``best`` point to (0 = none).
    """

    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    deterministic: bool = True
    threads: int | None = None
    save_every_steps: int = 0
    log_every_steps: int = 1
    max_nonfinite_steps: int = 10
    collapse_patience: int = 50
    collapse_min_spread: float = 1e-3
    collapse_loss_rtol: float | None = 1e-6
    eval_every_epochs: int = 1
    progress: bool = True
    plots: bool = True
    keep_checkpoints: int = 0


@dataclass
class TrainConfig:
    """The whole configuration of one training run (see the module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=_default_model_config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


_AMP_MODES = ("auto", "none", "bf16", "fp16")
_PROTOCOLS = ("1k", "coco5fold", "5k")


# --------------------------------------------------------------------------------------------------
# typed conversion


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    if cls is TrainConfig:
        hints["model"] = _model_config_cls()
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp``; ConfigError naming ``key``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
        errors = []
        # Try the non-None members in declared order, but exact type matches first.
        members = [a for a in args if a is not type(None)]
        members.sort(key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        for member in members:
            try:
                return _coerce(value, member, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got boolean {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got boolean {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception as err:  # noqa: BLE001 - any constructor failure is a config error
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({err})") from None
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    kwargs = {}
    for name, value in data.items():
        name = str(name)
        if name not in types_:
            raise unknown_key_error(prefix, name, list(types_))
        kwargs[name] = _coerce(value, types_[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def config_from_dict(data: dict | None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a nested mapping (as read from YAML).

    Missing keys keep their defaults. Raises ConfigError on unknown keys or mistyped values.
    """
    return _build(TrainConfig, data or {}, "")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_to_dict(cfg: Any) -> dict:
    """Nested plain-python (YAML/JSON-safe) mapping of a config dataclass; tuples become lists."""
    return _plain(cfg)


# --------------------------------------------------------------------------------------------------
# files and overrides


def resolve_config_path(spec: str | os.PathLike | None) -> Path:
    """Find a config file: an existing path, or the name of a shipped config (``synthetic``,
    ``flickr8k_cpu``, ...; ``.yaml`` optional). None gives the default (synthetic) config.

    Raises:
        ConfigError: nothing found; the message lists the shipped configs and the closest one.
    """
    if spec is None:
        spec = DEFAULT_CONFIG
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = CONFIG_DIR / f"{name}.yaml"
    if str(path.parent) in ("", ".") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {str(spec)!r} not found{_suggest(name, names)} "
                      f"(shipped configs: {', '.join(names)})")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"section.key=value"`` into (``["section", "key"]``, parsed YAML value).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty key; expected section.key=value")
    raw = raw.strip()
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``section.key=value`` overrides to a nested mapping (in place, returned).

    Keys are checked when the mapping is built into a :class:`TrainConfig`; an override that tries
    to descend into a non-mapping value raises ConfigError here.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                *, validate: bool = True) -> TrainConfig:
    """Defaults <- YAML file <- overrides, then :func:`validate_config`.

    Args:
        path: a YAML file or the name of a shipped config; None = the default synthetic config.
        overrides: ``section.key=value`` strings.
        validate: run the compatibility checks.
    Raises:
        ConfigError: unreadable file, unknown key, mistyped or incompatible value.
    """
    data = _read_yaml(resolve_config_path(path))
    data = apply_overrides(data, overrides)
    cfg = config_from_dict(data)
    if validate:
        validate_config(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (``config.yaml`` in every run folder)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    with atomic_write(path, "w") as fh:
        fh.write(text)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings, as
    ``"key: a_value != b_value"`` lines (keys present in only one side included)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff_configs(va, vb, name))
        elif va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    return out


# --------------------------------------------------------------------------------------------------
# compatibility checks


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Reject values that cannot work together; returns ``cfg`` unchanged.

    Checks (each a ConfigError naming the keys involved):
        * ``optim.batch_size >= 2`` (the ranking losses need an in-batch negative);
        * lr, weight decay, factors, epochs, worker and step counts in range;
        * ``schedule.decay_epochs`` strictly increasing and within ``1..epochs`` (a decay after the last
          epoch would silently never happen);
        * ``run.amp`` in auto/none/bf16/fp16, ``data.protocol`` in 1k/coco5fold/5k;
        * model: attention heads divide the width; neighbour top-k ``floor(rho * B) >= 1``; the
          momentum queue holds at least one batch; at least one prototype.
    """
    o, s, r, d, m = cfg.optim, cfg.schedule, cfg.run, cfg.data, cfg.model
    if o.batch_size < 2:
        raise ConfigError(f"optim.batch_size={o.batch_size}: needs >= 2 (in-batch negatives)")
    for key, val in (("optim.lr", o.lr), ("optim.eps", o.eps)):
        if not (val > 0 and math.isfinite(val)):
            raise ConfigError(f"{key}={val}: must be a positive finite number")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas}: expected two values in [0, 1)")
    if s.epochs < 1:
        raise ConfigError(f"schedule.epochs={s.epochs}: needs >= 1")
    if not (0 < s.decay_factor <= 1):
        raise ConfigError(f"schedule.decay_factor={s.decay_factor}: expected a value in (0, 1]")
    if list(s.decay_epochs) != sorted(set(s.decay_epochs)) or any(e < 1 for e in s.decay_epochs):
        raise ConfigError(f"schedule.decay_epochs={s.decay_epochs}: expected strictly increasing epochs >= 1")
    late = [e for e in s.decay_epochs if e > s.epochs]
    if late:
        raise ConfigError(f"schedule.decay_epochs={s.decay_epochs}: epoch {late[0]} is beyond schedule.epochs="
                          f"{s.epochs}; decay epochs must lie within 1..{s.epochs} (the decay would never happen: "
                          f"lower it, or set schedule.decay_epochs=[] for no decay)")
    if s.max_steps_per_epoch is not None and s.max_steps_per_epoch < 1:
        raise ConfigError(f"schedule.max_steps_per_epoch={s.max_steps_per_epoch}: needs >= 1 or null")
    if r.amp not in _AMP_MODES:
        raise ConfigError(f"run.amp={r.amp!r}: expected one of {list(_AMP_MODES)}")
    if d.protocol not in _PROTOCOLS:
        raise ConfigError(f"data.protocol={d.protocol!r}: expected one of {list(_PROTOCOLS)}")
    if not (0 <= d.region_drop < 1):
        raise ConfigError(f"data.region_drop={d.region_drop}: expected a probability in [0, 1)")
    if not (0 <= d.word_mask_prob < 1):
        raise ConfigError(f"data.word_mask_prob={d.word_mask_prob}: expected a probability in [0, 1) (0 = off)")
    split = list(d.word_mask_split)
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"data.word_mask_split={split}: expected three non-negative fractions [mask, random, "
                          f"delete] summing to 1 (authors: [0.5, 0.1, 0.4])")
    for key, val, lo in (("data.num_workers", d.num_workers, 0), ("data.eval_batch_size", d.eval_batch_size, 1),
                         ("run.save_every_steps", r.save_every_steps, 0),
                         ("run.log_every_steps", r.log_every_steps, 1),
                         ("run.max_nonfinite_steps", r.max_nonfinite_steps, 1),
                         ("run.collapse_patience", r.collapse_patience, 0),
                         ("run.eval_every_epochs", r.eval_every_epochs, 1),
                         ("run.keep_checkpoints", r.keep_checkpoints, 0),
                         ("data.prepare_batch_size", d.prepare_batch_size, 1)):
        if val < lo:
            raise ConfigError(f"{key}={val}: needs >= {lo}")
    if not (0 <= r.collapse_min_spread < 1):
        raise ConfigError(f"run.collapse_min_spread={r.collapse_min_spread}: expected a value in [0, 1) (0 = off)")
    if r.collapse_loss_rtol is not None and not (0 <= r.collapse_loss_rtol < 1):
        raise ConfigError(f"run.collapse_loss_rtol={r.collapse_loss_rtol}: expected a value in [0, 1) or null (off)")
    if r.threads is not None and r.threads < 1:
        raise ConfigError(f"run.threads={r.threads}: needs >= 1 or null")
    if d.dev_max_images is not None and d.dev_max_images < 1:
        raise ConfigError(f"data.dev_max_images={d.dev_max_images}: needs >= 1 or null")
    _validate_model(m, o.batch_size)
    return cfg


def _validate_model(m: Any, batch: int) -> None:
    if hasattr(m, "validate"):
        try:
            m.validate()
        except ConfigError as err:
            raise ConfigError(str(err).replace("ModelConfig.", "model.")) from None
    if getattr(m, "arch", "aahr") != "aahr":
        return
    width = m.embed_dim
    head_dim = getattr(m, "pool_head_dim", None)
    for key in ("frag_heads", "graph_heads"):
        heads = getattr(m, key)
        if width % heads:
            raise ConfigError(f"model.{key}={heads} does not divide model.embed_dim={width}")
    if head_dim is None and getattr(m, "pool_heads", 1) < 1:
        raise ConfigError(f"model.pool_heads={m.pool_heads}: needs >= 1")
    if m.use_graph and math.floor(m.graph_rho * batch) < 1:
        raise ConfigError(f"model.graph_rho={m.graph_rho} with optim.batch_size={batch} gives top-k "
                          f"floor(rho*B)=0 neighbours; raise optim.batch_size or model.graph_rho")
    if m.use_moco and m.queue_size < batch:
        raise ConfigError(f"model.queue_size={m.queue_size} is smaller than optim.batch_size={batch}: "
                          f"the momentum queue must hold at least one batch")
