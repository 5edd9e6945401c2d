"""Training and evaluation loop pieces used by ``python -m aahr_fast.train`` / ``evaluate``.

:class:`Trainer` runs one training job described by a :class:`aahr_fast.config.TrainConfig` on a
prepared feature folder (docs/DESIGN.md):

* AdamW over ``model.param_groups(lr, backbone_lr_mult)``, step decay (x ``decay_factor`` after the
  given epochs, :class:`StepDecay`), global-norm gradient clipping (2.0), autocast bf16/fp16 on GPU
  only (a GradScaler with fp16), everything on ``run.device`` (never a hard-coded ``.cuda()``);
* seeded and deterministic on CPU: python/numpy/torch seeds, ``torch.use_deterministic_algorithms``
  (warn-only), the epoch permutation drawn from a dedicated sampler generator, per-item augmentation
  derived from (seed, epoch, caption index) by the data layer, a DataLoader generator +
  ``worker_init_fn``, and a separate ``torch.Generator`` for the model's own sampling;
* a training guard: a step whose loss or gradient norm is non-finite is skipped (no optimizer step,
  no momentum/queue update) and logged; ``run.max_nonfinite_steps`` consecutive ones stop the run with
  :class:`NonFiniteLossError`, leaving the last good checkpoint in place;
* a collapse guard (:mod:`aahr_fast.collapse`): at every logged step the spread of the detached
  embeddings the step returned and the loss are checked; a collapse (embeddings all alike, or a loss
  stuck at a constant) is logged and recorded (``"collapse"``), no checkpoint is written while it lasts,
  and ``run.collapse_patience`` iterations of it stop the run with :class:`TrainingCollapseError`;
* model selection on the *dev* split by rsum (never test); checkpoints (:mod:`aahr_fast.checkpoint`)
  after every epoch and every ``run.save_every_steps`` iterations, holding everything needed to
  resume exactly, including the epoch's sampler permutation and position;
* ``metrics.jsonl`` (one JSON record per logged step / finished epoch / event), PNG plots, and the
  final test table (``evaluation.format_table``) written to ``test_results.json``.

Exact resume: on CPU with ``run.deterministic`` a run killed after iteration k and resumed from its
last checkpoint logs the same loss at every later iteration and ends with the same metrics as an
uninterrupted run (same thread count). This holds because every source of randomness is either
saved in the checkpoint (global RNGs, sampler and model generators, optimizer/scaler/schedule state,
momentum queues as model buffers) or a pure function of (seed, epoch, index).

Multi-process (``torchrun``, ``Trainer(..., dist=DistContext)``, see :mod:`aahr_fast.distributed`):
each rank trains under DistributedDataParallel on its ``B/W`` captions of every global batch of the
same permutation; the losses use the gathered global batch, so the logged losses equal the
single-process ones up to float reduction order. Rank 0 alone logs, evaluates and checkpoints; the
other ranks wait at a barrier after each epoch. A distributed run resumes exactly with torchrun.

Iteration numbering: ``step`` counts batches drawn (skipped ones included), 0-based when passed to
``model.training_step``; metrics records use the 1-based count of finished iterations.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from aahr_fast.ops import value_checks
from torch.utils.data import DataLoader, Subset

from aahr_fast.checkpoint import (
    CKPT_DIR,
    CheckpointRef,
    checkpoint_tag,
    collect_garbage,
    load_train_state,
    load_weights,
    read_weights_meta,
    resolve_checkpoint,
    save_checkpoint,
    update_pointer,
)
from aahr_fast.collapse import CollapseMonitor, TrainingCollapseError, step_statistics
from aahr_fast.config import TrainConfig, config_to_dict, save_config
from aahr_fast.metrics_log import MetricsLog  # re-exported: engine.MetricsLog is public
from aahr_fast.utils.errors import AAHRError, CheckpointError, ConfigError
from aahr_fast.utils.io import atomic_save_json

__all__ = [
    "NonFiniteLossError",
    "TrainingCollapseError",
    "select_device",
    "amp_dtype",
    "configure_determinism",
    "seed_everything",
    "StepDecay",
    "EpochBatchSampler",
    "MetricsLog",
    "open_feature_split",
    "feature_dims",
    "encode_split",
    "evaluate_model",
    "Trainer",
]


#: Test hook (used by tests/test_resume.py): after this iteration the process prints
#: ``STALLED <step>`` to stderr and sleeps, so a test can SIGKILL it at a known point. Unset: no-op.
STALL_ENV = "AAHR_TRAIN_STALL_AFTER_STEP"
_STALL_AFTER_STEP = int(os.environ.get(STALL_ENV, "-1") or -1)


def _stall(step: int) -> None:
    print(f"STALLED {step}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


class NonFiniteLossError(AAHRError, RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient; the run stopped."""


# --------------------------------------------------------------------------------------------------
# devices, precision, seeding


def select_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> ``cuda`` when available else ``cpu``; otherwise ``torch.device(spec)``.

    Raises:
        ConfigError: an unparsable device, or a CUDA device asked for where CUDA is unavailable.
    """
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"run.device={spec!r}: not a device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={spec!r}: CUDA is not available on this machine (use cpu or auto)")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``run.amp`` on ``device``: None on CPU or with ``"none"``; ``"auto"`` picks
    bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or mode == "none":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels where torch has them (warn-only elsewhere), no cuDNN autotuning."""
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = bool(deterministic)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init_fn(worker_id: int) -> None:
    # Each DataLoader worker gets torch seed base_seed + id (from the loader generator); derive the
    # numpy / python seeds from it so libraries that use the global RNGs are seeded per worker too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _rng_state(sampler_gen: torch.Generator, model_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "sampler": sampler_gen.get_state(),
        "model": model_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, sampler_gen: torch.Generator, model_gen: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    sampler_gen.set_state(state["sampler"])
    model_gen.set_state(state["model"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# schedule, sampler, metrics log


class StepDecay:
    """Step learning-rate decay: ``lr = base_lr * factor ** (number of decay epochs already passed)``.

    The GPO/HREM/AAHR schedule (AAHR: x0.1 after epochs 15 and 25 of 40). ``base_lr`` is each param
    group's lr at construction (so a backbone group keeps its multiplier). Call :meth:`set_epoch`
    with the number of finished epochs before each epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay_epochs: list[int], factor: float) -> None:
        self.optimizer = optimizer
        self.decay_epochs = sorted(int(e) for e in decay_epochs)
        self.factor = float(factor)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.epoch = 0

    def multiplier(self, finished_epochs: int) -> float:
        """``factor ** #{e in decay_epochs : e <= finished_epochs}``."""
        return self.factor ** sum(1 for e in self.decay_epochs if e <= finished_epochs)

    def set_epoch(self, finished_epochs: int) -> None:
        """Set every group's lr for the epoch that follows ``finished_epochs`` finished ones."""
        self.epoch = int(finished_epochs)
        mult = self.multiplier(self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult

    def state_dict(self) -> dict:
        return {"decay_epochs": list(self.decay_epochs), "factor": self.factor,
                "base_lrs": list(self.base_lrs), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.decay_epochs = [int(e) for e in state["decay_epochs"]]
        self.factor = float(state["factor"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.set_epoch(int(state["epoch"]))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of one epoch from a fixed permutation, starting at batch ``start`` (for a mid-epoch
    resume). ``drop_last`` semantics: only full batches, at most ``num_batches`` of them.

    Args:
        perm: int64 (n,) permutation of the dataset indices for this epoch.
        batch_size: items per batch. start: batches already consumed. num_batches: batches per epoch.
    """

    def __init__(self, perm: torch.Tensor, batch_size: int, start: int, num_batches: int) -> None:
        self.perm = perm
        self.batch_size = int(batch_size)
        self.start = int(start)
        self.num_batches = int(num_batches)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.num_batches):
            yield self.perm[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)


class _NullMetricsLog(MetricsLog):
    """The metrics log of a non-zero rank in a multi-process run: writes nothing (rank 0 logs)."""

    def append(self, record: dict) -> None:
        pass

    def truncate_to_step(self, step: int) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# data and evaluation helpers


def open_feature_split(folder: str | os.PathLike, split: str) -> Any:
    """Open one split of a prepared feature folder (:class:`aahr_fast.data.features.FeatureSplit`).

    Args:
        folder: the prepared (or plain SCAN precomp) feature folder. split: split name, e.g. ``"train"``,
            ``"dev"``, ``"test"`` (``dev`` gets the SCAN truncation to its first 5,000 captions).
    Returns:
        the memory-mapped :class:`FeatureSplit` (nothing is read until an item is asked for).
    Raises:
        DataError: as :class:`FeatureSplit`: the folder or ``{split}_ims.npy`` missing; extra files
            without ``meta.json``; ``meta.json`` unreadable or without this split; counts, shapes or
            dtypes of the files disagreeing with each other or with ``meta.json`` (names the file).
    """
    from aahr_fast.data.features import FeatureSplit

    return FeatureSplit(folder, split)


def feature_dims(fs: Any) -> dict:
    """The dims dict ``build_model`` takes: region_dim, img_global_dim, token_dim, txt_global_dim
    (None where the folder lacks the file).

    Args:
        fs: an opened :class:`FeatureSplit` (or any object with these four attributes).
    Returns:
        ``{"region_dim": Dr, "img_global_dim": Dg | None, "token_dim": Dt | None,
        "txt_global_dim": Dgt | None}``, Python ints (feature widths, not counts).
    Raises:
        AttributeError: ``fs`` lacks one of the attributes (nothing else is checked here; the model
            checks the dims against its config, :func:`aahr_fast.models.build_model`).
    """
    return {"region_dim": fs.region_dim, "img_global_dim": fs.img_global_dim,
            "token_dim": fs.token_dim, "txt_global_dim": fs.txt_global_dim}


def _text_field(model_cfg: Any) -> str:
    return "input_ids" if getattr(model_cfg, "text_mode", "frozen") == "finetune" else "tokens"


def _word_masking(data_cfg: Any, model_cfg: Any) -> Any:
    """The training set's :class:`~aahr_fast.data.features.WordMasking` (None when ``data.word_mask_prob``
    is 0): on token ids with the fine-tuned backbone's tokenizer, else on frozen token features."""
    prob = float(getattr(data_cfg, "word_mask_prob", 0.0))
    if prob <= 0:
        return None
    from aahr_fast.data.features import WordMasking, word_masking_for_tokenizer

    if _text_field(model_cfg) == "input_ids":
        return word_masking_for_tokenizer(prob, data_cfg.word_mask_split, getattr(model_cfg, "text_backbone_path", None))
    return WordMasking(prob, data_cfg.word_mask_split)


def _uses_global(model_cfg: Any) -> bool:
    return bool(getattr(model_cfg, "use_global", True)) and getattr(model_cfg, "arch", "aahr") == "aahr"


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def encode_split(model: torch.nn.Module, fs: Any, model_cfg: Any, *, device: torch.device,
                 batch_size: int = 256, max_images: int | None = None,
                 autocast: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Encode all images and captions of a split with the model in eval mode.

    Args:
        model: has ``encode_images(batch) -> (B, D)`` and ``encode_texts(batch) -> (B, D)``.
        fs: the :class:`FeatureSplit`. model_cfg: selects token features vs input ids and globals.
        device: where the model runs; batches are moved there. batch_size: items per DataLoader batch.
        max_images: keep only the first N images and their captions (None = all).
        autocast: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision;
            the embeddings are cast back to float32.
    Returns:
        img_emb (N, D) float32 CPU, txt_emb (M, D) float32 CPU, caption_image int64 numpy (M,) into the
        N images (captions of images past ``max_images`` removed, order kept). The model's train/eval
        mode is restored afterwards.
    Raises:
        DataError: a field the model config needs is not stored in the folder (token features /
            input ids, ``img_global`` / ``txt_global``), a feature row holds NaN/Inf (names file and row),
            or the model's ``encode_*`` rejects the batch (e.g. feature sizes that differ from its dims).
        ValueError: ``batch_size`` not a positive int (raised by ``DataLoader``).
        RuntimeError: ``max_images <= 0`` (no image to encode; ``torch.cat`` of an empty list).
    """
    from aahr_fast.data.features import ImageDataset, TextDataset, collate_images, collate_texts

    was_training = model.training
    model.eval()
    glob = _uses_global(model_cfg)
    images = ImageDataset(fs, with_global=glob)
    texts = TextDataset(fs, text=_text_field(model_cfg), with_global=glob)
    cap_img = np.asarray(fs.caption_image, dtype=np.int64)
    if max_images is not None and max_images < len(images):
        images = Subset(images, range(max_images))
        caps = np.flatnonzero(cap_img < max_images)
        texts = Subset(texts, caps.tolist())
        cap_img = cap_img[caps]
    out = []
    for ds, collate, fn in ((images, collate_images, model.encode_images), (texts, collate_texts, model.encode_texts)):
        chunks = []
        # A private generator: creating the loader iterator must not consume the global torch RNG.
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                            generator=torch.Generator())
        for batch in loader:
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                emb = fn(batch)
            chunks.append(emb.float().cpu())
        out.append(torch.cat(chunks))
    model.train(was_training)
    return out[0], out[1], cap_img


def evaluate_model(model: torch.nn.Module, fs: Any, model_cfg: Any, *, device: torch.device,
                   batch_size: int = 256, protocol: str = "1k", max_images: int | None = None,
                   autocast: torch.dtype | None = None, return_sims: bool = False) -> Any:
    """R@K metrics of ``model`` on a split: dot-product similarities of the final embeddings, scored
    by ``aahr_fast.evaluation.evaluate_protocol`` (``protocol`` 1k / coco5fold / 5k).

    Args:
        model, fs, model_cfg, device, batch_size, max_images, autocast: as :func:`encode_split`.
        protocol: ``"1k"`` (whole matrix), ``"coco5fold"`` (mean over 5 folds) or ``"5k"``
            (data-and-eval.md section 4). return_sims: also return the similarity matrix.
    Returns:
        the metrics dict of Python floats (``i2t_r{K}`` / ``t2i_r{K}`` percent for K = 1, 5, 10, medr,
        meanr, rsum), and the (N, M) float32 CPU similarity matrix (rows images, columns captions) as a
        second value when ``return_sims``.
    Warns:
        UserWarning: a COCO protocol on a split with N != 5,000 images (from ``evaluate_protocol``).
    Raises:
        DataError: as :func:`encode_split`; a NaN similarity; ``"coco5fold"`` with N not divisible by 5.
        ConfigError: an unknown ``protocol``.
        ValueError / RuntimeError: as :func:`encode_split`.
    """
    from aahr_fast.evaluation import evaluate_protocol

    img, txt, cap_img = encode_split(model, fs, model_cfg, device=device, batch_size=batch_size,
                                     max_images=max_images, autocast=autocast)
    sims = img @ txt.T
    metrics = evaluate_protocol(sims, torch.from_numpy(cap_img), protocol=protocol)
    metrics = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) or torch.is_tensor(v) else v)
               for k, v in dict(metrics).items()}
    return (metrics, sims) if return_sims else metrics


# --------------------------------------------------------------------------------------------------
# the trainer


@dataclass
class _Progress:
    epoch: int = 0              # finished epochs
    step: int = 0               # iterations drawn so far (skipped included)
    batch_in_epoch: int = 0     # batches of the current epoch already drawn
    perm: torch.Tensor | None = None
    best_rsum: float = -math.inf
    best_epoch: int = 0
    nonfinite_run: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    best_tag: str | None = None
    best_info: dict = field(default_factory=dict)


class Trainer:
    """One training run (see the module docstring).

    Args:
        cfg: the resolved :class:`TrainConfig`.
        data_dir: prepared feature folder with the train/dev/test splits named in ``cfg.data``.
        run_dir: output folder (created).
        resume: continue from ``run_dir/last.json``.
        log: where human-readable messages go (default: stderr).
        model_builder: ``(model_cfg, dims) -> nn.Module`` (default ``aahr_fast.models.build_model``).
        dist: the :class:`aahr_fast.distributed.DistContext` of a multi-process run (torchrun), or
            None for one process. With it the model trains under DistributedDataParallel on this
            rank's shard of every global batch, and only rank 0 logs, writes files and evaluates
            (see aahr_fast/distributed.py).
    Raises:
        ConfigError: ``run_dir`` already holds a run and ``resume`` is False; too few training
            captions for one batch; ``optim.batch_size`` not divisible by the world size.
        CheckpointError: ``resume`` without a usable checkpoint, or with a checkpoint whose config
            or feature dims differ.
        DataError: from the feature folder.
    """

    def __init__(self, cfg: TrainConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike, *,
                 resume: bool = False, log: Callable[[str], None] | None = None,
                 model_builder: Callable[[Any, dict], torch.nn.Module] | None = None,
                 dist: Any = None) -> None:
        self.cfg = cfg
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        self.is_main = self.dist is None or self.dist.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not self.is_main:   # rank 0 alone logs, writes and evaluates
            self.log = lambda msg: None
        if model_builder is None:
            from aahr_fast.models import build_model as model_builder
        self.model_builder = model_builder
        self.metrics_log = (MetricsLog if self.is_main else _NullMetricsLog)(self.run_dir / "metrics.jsonl")
        self._ddp = None
        self._setup()

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        run = cfg.run
        if not self.resume and (self.run_dir / "last.json").exists():
            raise ConfigError(f"run folder {self.run_dir} already holds a run (last.json); pass --resume to "
                              f"continue it or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = select_device(run.device) if self.dist is None else self.dist.device
        if run.threads is not None:
            torch.set_num_threads(run.threads)
        seed_everything(run.seed)
        self.autocast = amp_dtype(run.amp, self.device)

        from aahr_fast.data.features import CaptionDataset

        d, m = cfg.data, cfg.model
        self.train_fs = open_feature_split(self.data_dir, d.train_split)
        self.dev_fs = open_feature_split(self.data_dir, d.dev_split)
        self.dims = feature_dims(self.train_fs)
        self.train_set = CaptionDataset(self.train_fs, train=True, region_drop=d.region_drop,
                                        text=_text_field(m), with_global=_uses_global(m), seed=run.seed,
                                        word_mask=_word_masking(d, m))
        n = len(self.train_set)
        bs = cfg.optim.batch_size
        if n < bs:
            raise ConfigError(f"optim.batch_size={bs} but the {d.train_split!r} split of {self.data_dir} has only "
                              f"{n} captions (batches are full, drop_last)")
        if self.dist is not None:
            from aahr_fast.distributed import check_batch_divisible

            check_batch_divisible(bs, self.dist.world_size)
        self.batches_per_epoch = n // bs
        if cfg.schedule.max_steps_per_epoch is not None:
            self.batches_per_epoch = min(self.batches_per_epoch, cfg.schedule.max_steps_per_epoch)
        self.total_steps = self.batches_per_epoch * cfg.schedule.epochs

        self.model = self.model_builder(m, dict(self.dims)).to(self.device)
        if hasattr(self.model, "resolve_schedule"):
            self.model.resolve_schedule(self.batches_per_epoch, self.total_steps)
        if self.dist is not None:
            self._wrap_ddp()
        if hasattr(self.model, "param_groups"):
            groups = self.model.param_groups(cfg.optim.lr, getattr(m, "backbone_lr_mult", 0.1))
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = StepDecay(self.optimizer, cfg.schedule.decay_epochs, cfg.schedule.decay_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        self.sampler_gen = torch.Generator().manual_seed(run.seed + 1)
        self.model_gen = torch.Generator(device=self.device).manual_seed(run.seed + 2)
        self.p = _Progress()
        self.collapse = CollapseMonitor(run.collapse_patience, run.collapse_min_spread, run.collapse_loss_rtol)
        self.config_dict = config_to_dict(cfg)

        if self.resume:
            self._load_resume()
        elif self.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            if self.metrics_log.path.exists():
                self.metrics_log.path.unlink()
        n_params = sum(p.numel() for p in self.params)
        self.log(f"[train] device={self.device} amp={self.autocast} threads={torch.get_num_threads()} "
                 f"train captions={n} batches/epoch={self.batches_per_epoch} epochs={cfg.schedule.epochs} "
                 f"trainable params={n_params:,} run={self.run_dir}")

    def _wrap_ddp(self) -> None:
        """Multi-process: the model computes its losses on the gathered global batch
        (``set_distributed``) and trains under DistributedDataParallel (its construction broadcasts
        rank 0's parameters and buffers, so every rank starts from the same model)."""
        from torch.nn.parallel import DistributedDataParallel

        from aahr_fast.distributed import TrainStepModule

        if not hasattr(self.model, "set_distributed"):
            raise ConfigError(f"model.arch={getattr(self.cfg.model, 'arch', '?')!r}: this model does not support "
                              f"multi-process training (no set_distributed)")
        self.model.set_distributed(self.dist)
        dev = self.dist.device
        # find_unused_parameters: prototypes / graph have no gradient before their warm-up starts;
        # broadcast_buffers off: the queues are identical by construction, BN statistics stay per rank
        import inspect

        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
        self._ddp = DistributedDataParallel(TrainStepModule(self.model),
                                            device_ids=[dev.index] if dev.type == "cuda" else None,
                                            find_unused_parameters=True, **no_sync)

    def _train_state(self) -> dict:
        p = self.p
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": {"epoch": p.epoch, "step": p.step, "batch_in_epoch": p.batch_in_epoch,
                         "best_rsum": p.best_rsum, "best_epoch": p.best_epoch, "nonfinite_run": p.nonfinite_run,
                         "epoch_loss_sum": p.epoch_loss_sum, "epoch_loss_n": p.epoch_loss_n,
                         "batches_per_epoch": self.batches_per_epoch, "best_tag": p.best_tag,
                         "best_info": dict(p.best_info), "collapse": self.collapse.state_dict()},
            "perm": p.perm,
            "rng": _rng_state(self.sampler_gen, self.model_gen),
        }

    def _load_resume(self) -> None:
        last = self.run_dir / "last.json"
        if not last.is_file():
            raise CheckpointError(f"--resume: {self.run_dir} has no last.json checkpoint pointer "
                                  f"(no checkpoint was completed in that run)")
        ref = resolve_checkpoint(last)
        load_weights(self.model, ref, expected_model_config=self.config_dict["model"], expected_dims=self.dims)
        state = load_train_state(ref)
        prog = state["progress"]
        if prog["batches_per_epoch"] != self.batches_per_epoch:
            raise CheckpointError(f"{ref.state}: checkpoint has {prog['batches_per_epoch']} batches per epoch, "
                                  f"the current data/config gives {self.batches_per_epoch}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        p = self.p
        p.epoch, p.step, p.batch_in_epoch = prog["epoch"], prog["step"], prog["batch_in_epoch"]
        p.best_rsum, p.best_epoch = float(prog["best_rsum"]), int(prog["best_epoch"])
        p.nonfinite_run = int(prog["nonfinite_run"])
        p.epoch_loss_sum, p.epoch_loss_n = float(prog["epoch_loss_sum"]), int(prog["epoch_loss_n"])
        p.perm = state["perm"]
        self.collapse.load_state_dict(prog.get("collapse"))
        _set_rng_state(state["rng"], self.sampler_gen, self.model_gen)
        self.metrics_log.truncate_to_step(p.step)
        self.metrics_log.append({"type": "resume", "step": p.step, "epoch": p.epoch,
                                 "batch_in_epoch": p.batch_in_epoch, "checkpoint": str(ref.weights.name)})
        p.best_tag, p.best_info = prog.get("best_tag"), dict(prog.get("best_info") or {})
        if self.is_main:
            self._restore_best_pointer()
        self.log(f"[train] resumed from {ref.weights.name}: epoch {p.epoch} (+{p.batch_in_epoch} batches), "
                 f"step {p.step}")

    def _save(self, pointers: tuple[str, ...], info: dict | None = None) -> CheckpointRef | None:
        p = self.p
        epoch_for_tag = p.epoch + (1 if p.batch_in_epoch else 0)
        if "best" in pointers:
            p.best_tag = checkpoint_tag(epoch_for_tag, p.step)
            p.best_info = dict(info or {})
        if not self.is_main:   # multi-process: rank 0 writes (all ranks hold the same model and state)
            return None
        ref = save_checkpoint(self.run_dir, self.model, self._train_state(), epoch=epoch_for_tag, step=p.step,
                              config=self.config_dict, dims=self.dims, pointers=pointers, info=info)
        collect_garbage(self.run_dir, keep=self.cfg.run.keep_checkpoints)
        return ref

    def _restore_best_pointer(self) -> None:
        """After a resume, make best.json name the best checkpoint the state records (a kill may have
        landed between the writes of last.json and best.json)."""
        p = self.p
        if p.best_tag is None:
            return
        weights = self.run_dir / CKPT_DIR / f"{p.best_tag}.safetensors"
        if not weights.is_file():
            return
        meta = read_weights_meta(weights)
        record = {"weights": f"{CKPT_DIR}/{p.best_tag}.safetensors", "state": f"{CKPT_DIR}/{p.best_tag}.pt",
                  "ckpt_id": meta["ckpt_id"], "epoch": meta["epoch"], "step": meta["step"], **p.best_info}
        current = None
        try:
            current = json.loads((self.run_dir / "best.json").read_text())
        except (OSError, ValueError):
            pass
        if current != record:
            update_pointer(self.run_dir, "best", record)

    # ---------------------------------------------------------------- loop
    def _epoch_loader(self, epoch: int, start: int) -> DataLoader:
        if self.p.perm is None or start == 0:
            self.p.perm = torch.randperm(len(self.train_set), generator=self.sampler_gen)
        self.train_set.set_epoch(epoch)
        loader_gen = torch.Generator().manual_seed(self.cfg.run.seed * 1000003 + epoch)
        if self.dist is None:
            sampler = EpochBatchSampler(self.p.perm, self.cfg.optim.batch_size, start, self.batches_per_epoch)
        else:   # this rank's B/W captions of each global batch of the same permutation
            from aahr_fast.distributed import ShardedBatchSampler

            sampler = ShardedBatchSampler(self.p.perm, self.cfg.optim.batch_size, start, self.batches_per_epoch,
                                          self.dist.rank, self.dist.world_size)
        from aahr_fast.data.features import collate_captions

        nw = self.cfg.data.num_workers
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_captions, num_workers=nw,
                          worker_init_fn=_worker_init_fn, generator=loader_gen,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _train_step(self, batch: dict) -> dict:
        cfg = self.cfg
        p = self.p
        self.optimizer.zero_grad(set_to_none=True)
        # The fused step (forward + backward) reads no tensor value on the host: lengths were validated where
        # the data entered (collate_batch), so the ops' value checks are off, and the model returns its loss
        # parts as tensors (AAHR.training_losses). The guard and the log read them once, after the backward.
        with value_checks(False), \
                torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self._ddp is not None:
                out = self._ddp(batch, p.step, self.model_gen)
            elif hasattr(self.model, "training_losses"):
                out = self.model.training_losses(batch, p.step, self.model_gen)
            else:
                out = self.model.training_step(batch, p.step, self.model_gen)
        loss = out["loss"]
        with value_checks(False):
            self.scaler.scale(loss).backward()   # every rank runs it (DDP's backward is collective)
        stats = step_statistics(out)   # 0-d tensors from the detached embeddings; read at logging time
        loss_val = float(loss.detach().float().item())   # first host read of the step
        parts = {k: float(v) for k, v in (out.get("parts") or {}).items()}
        record = {"type": "step", "epoch": p.epoch + 1, "step": p.step + 1, "loss": loss_val, "parts": parts,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        bad_loss = not math.isfinite(loss_val)
        if self.dist is not None:   # every rank must take the same branch
            bad_loss = self.dist.any(bad_loss)
        if bad_loss:
            self.optimizer.zero_grad(set_to_none=True)
            return {**record, "type": "skip", "reason": "non-finite loss"}
        self.scaler.unscale_(self.optimizer)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        record["grad_norm"] = gnorm
        if not math.isfinite(gnorm):
            if self.scaler.is_enabled():  # fp16 overflow: the scaler skips the step and lowers its scale
                self.scaler.step(self.optimizer)
                self.scaler.update()
                return {**record, "type": "skip", "reason": "fp16 gradient overflow (scaler)", "counted": False}
            self.optimizer.zero_grad(set_to_none=True)
            return {**record, "type": "skip", "reason": "non-finite gradient"}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if hasattr(self.model, "on_after_optimizer_step"):
            self.model.on_after_optimizer_step()
        if stats:
            record["_stats"] = stats
        return record

    def fit(self) -> dict:
        """Train for the remaining epochs, then evaluate the best (dev rsum) checkpoint on the test
        split. Returns the test results dict (also written to ``test_results.json``).

        Raises:
            NonFiniteLossError: ``run.max_nonfinite_steps`` consecutive non-finite steps.
            TrainingCollapseError: ``run.collapse_patience`` steps that looked collapsed (aahr_fast.collapse).
        """
        prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        configure_determinism(self.cfg.run.deterministic, self.device)
        try:
            return self._fit()
        finally:  # the process-wide switch goes back to what the caller had (matters for library use)
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])

    def _fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        p = self.p
        t_start = time.perf_counter()
        while p.epoch < cfg.schedule.epochs:
            epoch = p.epoch
            self.scheduler.set_epoch(epoch)
            self.model.train()
            start = p.batch_in_epoch
            if start == 0:
                p.epoch_loss_sum, p.epoch_loss_n = 0.0, 0
            loader = self._epoch_loader(epoch, start)
            t_epoch = time.perf_counter()
            bar = tqdm(loader, total=self.batches_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}",
                       disable=not (cfg.run.progress and self.is_main), leave=False, dynamic_ncols=True, file=sys.stderr)
            for batch in bar:
                batch = _to_device(batch, self.device)
                rec = self._train_step(batch)
                p.step += 1
                p.batch_in_epoch += 1
                if rec["type"] == "skip":
                    if rec.get("counted", True):
                        p.nonfinite_run += 1
                    self.metrics_log.append(rec)
                    self.log(f"[train] step {p.step}: skipped ({rec['reason']}, loss={rec['loss']})")
                    if p.nonfinite_run >= cfg.run.max_nonfinite_steps:
                        self._stop_nonfinite()
                else:
                    p.nonfinite_run = 0
                    p.epoch_loss_sum += rec["loss"]
                    p.epoch_loss_n += 1
                    stats = rec.pop("_stats", None)
                    if p.step % cfg.run.log_every_steps == 0:
                        self._check_collapse(rec, stats)
                        self.metrics_log.append(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)
                every = cfg.run.save_every_steps
                if (every and p.step % every == 0 and p.batch_in_epoch < self.batches_per_epoch
                        and p.nonfinite_run == 0 and not self.collapse.withholding):
                    self._save(("last",))
                if p.step == _STALL_AFTER_STEP:
                    _stall(p.step)
            bar.close()
            self._end_epoch(time.perf_counter() - t_epoch)
        if self.collapse.withholding and not (self.run_dir / "last.json").is_file():
            self._stop_collapse({"steps": p.step - self.collapse.since + 1, "reason": self.collapse.reason},
                                ended=True)
        results = self._final_test()
        results["train_seconds_this_process"] = round(time.perf_counter() - t_start, 3)
        return results

    def _check_collapse(self, rec: dict, stats: dict | None) -> None:
        """The collapse check of one logged step record (at logging time: the stat tensors are read to
        the host here, with one ``tolist()``). Adds ``spread`` to ``rec``; reports the start / end of a
        collapse (log line + ``"collapse"`` record); raises :class:`TrainingCollapseError` after
        ``run.collapse_patience`` iterations of it."""
        values: dict[str, float] = {}
        if stats:
            names = sorted(stats)
            values = dict(zip(names, torch.stack([stats[k].float().reshape(()) for k in names]).cpu().tolist()))
            rec["spread"] = {k.split("_", 1)[1]: round(v, 6) for k, v in values.items()}
        verdict = self.collapse.check(rec["step"], rec["loss"], values)
        event = verdict["event"]
        p = self.p
        if event == "start":
            self.log(f"[train] step {p.step}: WARNING training looks collapsed: {verdict['reason']}. No checkpoint "
                     f"is written while this lasts; {self._collapse_budget()}")
            self.metrics_log.append({"type": "collapse", "epoch": rec["epoch"], "step": rec["step"],
                                     "reason": verdict["reason"], "loss": rec["loss"], **(
                                         {"spread": rec["spread"]} if "spread" in rec else {})})
        elif event == "recovered":
            self.log(f"[train] step {p.step}: training no longer looks collapsed (after {verdict['steps']} steps)")
            self.metrics_log.append({"type": "collapse", "epoch": rec["epoch"], "step": rec["step"],
                                     "recovered": True, "steps": verdict["steps"]})
        elif event == "stop":
            self.metrics_log.append(rec)
            self._stop_collapse(verdict)

    def _collapse_budget(self) -> str:
        n = self.cfg.run.collapse_patience
        return (f"training stops if it lasts {n} steps (run.collapse_patience)" if n
                else "run.collapse_patience=0: it will not stop training")

    def _last_good(self) -> str:
        last = self.run_dir / "last.json"
        return f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"

    def _stop_collapse(self, verdict: dict, ended: bool = False) -> None:
        what = (f"training ended at step {self.p.step} with no checkpoint to test" if ended else
                f"training stopped at step {self.p.step} (epoch {self.p.epoch + 1})")
        msg = (f"{what}: it has looked collapsed for "
               f"{verdict['steps']} steps (run.collapse_patience={self.cfg.run.collapse_patience}): "
               f"{verdict['reason']}; {self._last_good()} (nothing was saved during the collapse). Lower "
               f"optim.lr, check the features (constant or duplicated rows), or change model.loss / model.margin")
        self.metrics_log.append({"type": "stop", "step": self.p.step, "reason": msg})
        raise TrainingCollapseError(msg)

    def _stop_nonfinite(self) -> None:
        n = self.cfg.run.max_nonfinite_steps
        last = self.run_dir / "last.json"
        where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        msg = (f"training stopped at step {self.p.step} (epoch {self.p.epoch + 1}): {n} consecutive steps had a "
               f"non-finite loss or gradient (each was skipped; see {self.metrics_log.path}); {where}. "
               f"Lower optim.lr, check the features for extreme values, or use run.amp=bf16/none")
        self.metrics_log.append({"type": "stop", "step": self.p.step, "reason": msg})
        raise NonFiniteLossError(msg)

    def _end_epoch(self, seconds: float) -> None:
        cfg = self.cfg
        p = self.p
        epoch = p.epoch + 1
        record: dict[str, Any] = {"type": "epoch", "epoch": epoch, "step": p.step,
                                  "train_loss": p.epoch_loss_sum / max(1, p.epoch_loss_n),
                                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        pointers: tuple[str, ...] = ("last",)
        info: dict[str, Any] = {}
        if (epoch % cfg.run.eval_every_epochs == 0 or epoch == cfg.schedule.epochs) and self.is_main:
            dev = evaluate_model(self.model, self.dev_fs, cfg.model, device=self.device,
                                 batch_size=cfg.data.eval_batch_size, protocol="1k",
                                 max_images=cfg.data.dev_max_images, autocast=self.autocast)
            record["dev"] = dev
            info["dev_rsum"] = dev["rsum"]
            if dev["rsum"] > p.best_rsum and not self.collapse.withholding:
                p.best_rsum, p.best_epoch = dev["rsum"], epoch
                pointers = ("last", "best")
            self.log(f"[train] epoch {epoch}: train loss {record['train_loss']:.4f}, dev rsum {dev['rsum']:.2f} "
                     f"(best {p.best_rsum:.2f} @ epoch {p.best_epoch}), {seconds:.1f}s")
        p.epoch = epoch
        p.batch_in_epoch = 0
        p.perm = None
        if self.collapse.active:
            record["collapse"] = self.collapse.reason
        if self.collapse.withholding:   # keep the last good checkpoint (see aahr_fast.collapse)
            self.log(f"[train] epoch {epoch}: no checkpoint written, training looks collapsed "
                     f"({self.collapse.reason})")
        else:
            self._save(pointers, info)
        self.metrics_log.append(record)
        if cfg.run.plots and self.is_main:
            from aahr_fast.plots import plot_run

            plot_run(self.metrics_log.path, self.run_dir)
        if self.dist is not None:   # the other ranks wait for rank 0's evaluation and checkpoint
            self.dist.barrier()

    def _final_test(self) -> dict:
        if self.dist is None:
            return self._final_test_main()
        results = self._final_test_main() if self.is_main else None
        return self.dist.broadcast_object(results)   # every rank returns rank 0's results

    def _final_test_main(self) -> dict:
        cfg = self.cfg
        from aahr_fast.evaluation import format_table

        ref = resolve_checkpoint(self.run_dir, prefer="best")
        load_weights(self.model, ref)
        test_fs = open_feature_split(self.data_dir, cfg.data.test_split)
        metrics = evaluate_model(self.model, test_fs, cfg.model, device=self.device,
                                 batch_size=cfg.data.eval_batch_size, protocol=cfg.data.protocol,
                                 autocast=self.autocast)
        table = format_table(metrics)
        results = {
            "split": cfg.data.test_split,
            "protocol": cfg.data.protocol,
            "num_images": test_fs.num_images,
            "num_captions": test_fs.num_captions,
            "chance_r1": 100.0 / test_fs.num_images,
            "checkpoint": ref.info,
            "best_dev_rsum": self.p.best_rsum,
            "metrics": metrics,
        }
        atomic_save_json(results, self.run_dir / "test_results.json")
        self.log(f"[train] test ({cfg.data.test_split}, {test_fs.num_images} images, protocol {cfg.data.protocol}) "
                 f"with the best dev checkpoint (epoch {ref.info.get('epoch')}):")
        print(table, flush=True)
        return results
