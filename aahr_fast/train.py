"""``python -m aahr_fast.train``: train AAHR (or the VSE baseline) and print the test recalls.

Usage::

    python -m aahr_fast.train                       # the main job: synthetic dataset, default config
    python -m aahr_fast.train --config flickr8k_cpu --data /path/to/prepared_or_raw_flickr8k
    python -m aahr_fast.train --config X --out runs/x optim.lr=2e-4 schedule.epochs=10
    python -m aahr_fast.train --out runs/x --resume  # continue exactly where runs/x stopped

With no arguments this is the README's main job: it renders the embedded synthetic dataset
(``aahr_fast.data.synthetic.make_synthetic``) into the cache folder (``data.cache_dir``, else
``$AAHR_CACHE``, else ``~/.cache/aahr_fast``), extracts frozen EfficientNet-Lite0 region and MiniLM
token features with ``aahr_fast.prepare`` (cached: a re-run skips both), trains AAHR with
``aahr_fast/configs/synthetic.yaml`` and prints the test R@K table (chance R@1 = 100 / N_test).

``--data`` accepts ``synthetic``, a prepared feature folder (``meta.json`` present) or SCAN precomp
folder, or a raw dataset that ``aahr_fast.data.open_dataset`` reads (e.g. the Flickr8k folder),
which is prepared once into the cache first.

Outputs in the run folder (``--out``, default ``runs/<config>-<timestamp>``): ``config.yaml`` (the
resolved config), ``metrics.jsonl``, ``checkpoints/`` + ``last.json`` / ``best.json``,
``loss.png`` / ``dev_rsum.png``, ``test_results.json``.

Resume: ``--resume`` reloads ``config.yaml`` of the run folder (overrides may change only run-level
keys such as ``run.progress``; a change that would alter training raises CheckpointError naming
the keys) and continues from ``last.json``; on CPU in deterministic mode the continued run
reproduces the uninterrupted one exactly (same losses, same final metrics).

Multi-process (``docs/DISTRIBUTED.md``)::

    torchrun --nproc_per_node=2 -m aahr_fast.train --config X --out runs/x   # DDP, gloo on CPU / NCCL on GPU
    torchrun --nproc_per_node=2 -m aahr_fast.train --out runs/x --resume

``optim.batch_size`` stays the *global* batch (each rank takes B / world size captions of it); rank 0
prepares the data, logs, writes every file and evaluates (``aahr_fast/distributed.py``).

Exit status: 0 on success, 2 for configuration / data / checkpoint errors (a one-line message),
3 when the non-finite-loss guard or the collapse guard (``run.collapse_patience``) stopped training,
130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from aahr_fast.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    resolve_config_path,
    validate_config,
)
from aahr_fast.utils.errors import AAHRError, CheckpointError, ConfigError, DataError

__all__ = ["main", "build_parser", "resolve_data", "cache_root", "RESUME_MUTABLE_KEYS"]

#: Config keys that may differ between a run and its resumption (they do not change training).
RESUME_MUTABLE_KEYS = frozenset({
    "data.path", "data.cache_dir", "data.num_workers", "data.eval_batch_size",
    "run.out_dir", "run.device", "run.progress", "run.plots", "run.save_every_steps",
    "run.keep_checkpoints", "run.log_every_steps", "run.threads",
})


def cache_root(cfg: TrainConfig) -> Path:
    """Cache folder for the synthetic dataset and prepared features: ``data.cache_dir``, else
    ``$AAHR_CACHE``, else ``~/.cache/aahr_fast``."""
    root = cfg.data.cache_dir or os.environ.get("AAHR_CACHE") or Path.home() / ".cache" / "aahr_fast"
    return Path(root).expanduser()


def _is_feature_folder(path: Path, split: str) -> bool:
    return path.is_dir() and ((path / "meta.json").is_file() or (path / f"{split}_ims.npy").is_file())


def resolve_data(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """Turn ``cfg.data.path`` into a prepared feature folder, building it when needed.

    * ``"synthetic"``: render the synthetic dataset (``data.synthetic_*`` sizes and seed) under
      ``<cache>/synthetic/<tag>`` and prepare it into ``<cache>/prepared/<tag>`` (both cached);
    * a folder with ``meta.json`` or ``<train_split>_ims.npy``: used as is;
    * anything else ``open_dataset`` reads: prepared into ``<cache>/prepared/<name>-<hash>``.

    Raises:
        DataError: a ``data.path`` that does not exist (before any "preparing" message), or from the
            readers and ``prepare``. ConfigError: from ``prepare``.
    """
    d = cfg.data
    splits = tuple(dict.fromkeys((d.train_split, d.dev_split, d.test_split)))
    cache = cache_root(cfg)
    threads = cfg.run.threads
    if d.path == "synthetic":
        from aahr_fast.data.synthetic import make_synthetic
        from aahr_fast.prepare import prepare

        tag = f"synthetic-seed{d.synthetic_seed}-{d.synthetic_train}-{d.synthetic_dev}-{d.synthetic_test}"
        t0 = time.perf_counter()
        data = make_synthetic(cache / "synthetic" / tag, n_train=d.synthetic_train, n_dev=d.synthetic_dev,
                              n_test=d.synthetic_test, seed=d.synthetic_seed)
        log(f"[data] synthetic dataset ({', '.join(f'{k}: {v.num_images} images' for k, v in data.items())}) "
            f"ready in {time.perf_counter() - t0:.1f}s under {cache / 'synthetic' / tag}")
        out = cache / "prepared" / tag
        t0 = time.perf_counter()
        prepare({k: data[k] for k in splits}, out, splits=splits, batch_size=d.prepare_batch_size,
                threads=threads, progress=cfg.run.progress)
        log(f"[data] features ready in {time.perf_counter() - t0:.1f}s: {out}")
        return out
    path = Path(d.path).expanduser()
    if _is_feature_folder(path, d.train_split):
        return path
    if not path.exists() and not str(d.path).startswith("synthetic:"):
        raise DataError(f"data.path / --data {str(d.path)!r}: {path} does not exist (expected 'synthetic', "
                        "a prepared feature folder, or a raw dataset folder / .json to prepare)")
    from aahr_fast.prepare import prepare

    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    out = cache / "prepared" / f"{path.stem}-{key}"
    log(f"[data] {path} is not a prepared feature folder: preparing it into {out} (cached)")
    prepare(str(path), out, splits=splits, batch_size=d.prepare_batch_size, threads=threads,
            progress=cfg.run.progress)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m aahr_fast.train",
        description="Train AAHR image-text matching; with no arguments, the embedded synthetic main job.",
        epilog="Overrides: section.key=value, e.g. optim.lr=2e-4 schedule.epochs=10 model.num_prototypes=64.",
    )
    p.add_argument("--config", help="YAML config file or shipped config name (default: synthetic)")
    p.add_argument("--data", help="'synthetic', a prepared feature folder, or a raw dataset to prepare")
    p.add_argument("--out", help="run folder (default runs/<config>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--save-every-steps", type=int, help="also checkpoint every N iterations (mid-epoch resume)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p


def _cli_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    for flag, key in (("data", "data.path"), ("out", "run.out_dir"), ("device", "run.device"),
                      ("save_every_steps", "run.save_every_steps"), ("threads", "run.threads")):
        val = getattr(args, flag)
        if val is not None:
            out.append(f"{key}={val}")
    if args.no_progress:
        out.append("run.progress=false")
    return out


def _latest_run(stem: str) -> Path | None:
    runs = sorted((p for p in Path("runs").glob(f"{stem}-*") if (p / "last.json").is_file()),
                  key=lambda p: (p / "last.json").stat().st_mtime)
    return runs[-1] if runs else None


def _resume_config(run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> TrainConfig:
    import yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"--resume: {saved_path} is missing (not a run folder?)")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    saved_cfg = config_from_dict(saved)
    if args.config:
        new = load_config(args.config, overrides, validate=False)
    else:
        new = config_from_dict(apply_overrides(config_to_dict(saved_cfg), overrides))
    diffs = [d for d in diff_configs(config_to_dict(saved_cfg), config_to_dict(new))
             if d.split(":", 1)[0] not in RESUME_MUTABLE_KEYS]
    if diffs:
        raise CheckpointError(f"--resume: the config differs from the one {run_dir} was trained with "
                              f"(saved {saved_path}): " + "; ".join(diffs))
    return validate_config(new)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()

    rank0 = os.environ.get("RANK", "0") == "0"

    def log(msg: str) -> None:
        if rank0:
            print(msg, file=sys.stderr, flush=True)

    dctx = None
    try:
        overrides = _cli_overrides(args)
        stem = Path(resolve_config_path(args.config)).stem if args.config else "synthetic"
        if args.resume:
            run_dir = Path(args.out) if args.out else _latest_run(stem)
            if run_dir is None:
                raise ConfigError(f"--resume: no --out given and no runs/{stem}-* folder with a checkpoint")
            cfg = _resume_config(run_dir, args, overrides)
        else:
            cfg = load_config(args.config, overrides)
            run_dir = Path(cfg.run.out_dir) if cfg.run.out_dir else Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if cfg.run.threads is not None:
            import torch

            torch.set_num_threads(cfg.run.threads)
        from aahr_fast.distributed import init_from_env

        dctx = init_from_env(cfg.run.device, cfg.run.seed)   # None without torchrun (or WORLD_SIZE=1)
        if dctx is not None:
            run_dir = Path(dctx.broadcast_object(str(run_dir)))   # a timestamped default must agree
        cfg.run.out_dir = str(run_dir)
        if dctx is not None and not dctx.is_main:
            dctx.barrier()                      # rank 0 prepares (and caches) the data first
        data_dir = resolve_data(cfg, log)
        if dctx is not None and dctx.is_main:
            dctx.barrier()
        from aahr_fast.engine import Trainer

        trainer = Trainer(cfg, data_dir, run_dir, resume=args.resume, log=log, dist=dctx)
        results = trainer.fit()
        m = results["metrics"]
        log(f"[train] done in {time.perf_counter() - t0:.1f}s (this process, incl. data preparation); "
            f"test rsum {m.get('rsum', float('nan')):.2f}, chance R@1 = {results['chance_r1']:.2f}%; "
            f"results in {run_dir / 'test_results.json'}")
        return 0
    except KeyboardInterrupt:
        log("[train] interrupted; resume with --resume --out <run folder>")
        return 130
    except AAHRError as err:
        from aahr_fast.engine import NonFiniteLossError, TrainingCollapseError

        from aahr_fast.utils.validate import error_message

        if dctx is not None and not rank0:   # every rank reports its own error
            print(f"error (rank {dctx.rank}): {error_message(err)}", file=sys.stderr, flush=True)
        log(f"error: {error_message(err)}")
        return 3 if isinstance(err, (NonFiniteLossError, TrainingCollapseError)) else 2
    finally:
        if dctx is not None:   # destroy_process_group, also after an error
            from aahr_fast.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
