"""Checkpoints: safetensors weights + a torch training-state file, committed through pointer files.

Layout inside a run folder::

    checkpoints/<tag>.safetensors   model.state_dict() (parameters AND buffers: momentum encoders,
                                    queues, queue pointers); header metadata holds the resolved
                                    config, the feature dims, the epoch/step and a checkpoint id
    checkpoints/<tag>.pt            training state: optimizer, lr schedule, GradScaler, epoch and
                                    iteration counters, sampler permutation/position, best dev rsum,
                                    RNG states (python, numpy, torch, CUDA, sampler generator, model
                                    generator) and the same checkpoint id
    last.json / best.json           pointers {"weights", "state", "ckpt_id", "epoch", "step", ...}

``<tag>`` is ``e{epoch:03d}-s{step:08d}``. Every file is written atomically
(:mod:`aahr_fast.utils.io`), in the order weights -> state -> pointer; files that no pointer names
are deleted only after the pointers were replaced. A SIGKILL at any moment therefore leaves
``last.json`` naming a complete, loadable pair (the previous one until the new pointer lands), and
the id shared by the two files catches a mismatched pair.

Errors: :class:`aahr_fast.utils.errors.CheckpointError` for a missing/unreadable/mismatched
checkpoint, and for weights that do not fit the model (differing config keys and feature dims are
named, then the parameter names/shapes that differ).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from aahr_fast.utils.errors import CheckpointError
from aahr_fast.utils.io import atomic_save_json, atomic_save_torch, atomic_write_path

__all__ = [
    "CheckpointRef",
    "checkpoint_tag",
    "save_checkpoint",
    "update_pointer",
    "resolve_checkpoint",
    "read_weights_meta",
    "load_weights",
    "load_train_state",
    "collect_garbage",
]

FORMAT = "aahr_fast.checkpoint/1"
CKPT_DIR = "checkpoints"


@dataclass
class CheckpointRef:
    """A checkpoint on disk: its weights file, its training-state file (None for a bare weights
    file) and the pointer information (epoch, step, dev rsum, ...) when it came from a pointer."""

    weights: Path
    state: Path | None
    info: dict
    #: what the user gave (run folder, pointer, ``.pt`` ...) when it is not ``weights`` itself; errors
    #: about ``weights`` name it too (see :func:`read_weights_meta`)
    given: Path | None = None


def checkpoint_tag(epoch: int, step: int) -> str:
    """File stem of the checkpoint taken after ``epoch`` epochs and ``step`` iterations."""
    return f"e{epoch:03d}-s{step:08d}"


def _write_safetensors(model: torch.nn.Module, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_model

    save_model(model, path, metadata=metadata)


def save_checkpoint(run_dir: str | os.PathLike, model: torch.nn.Module, train_state: dict, *,
                    epoch: int, step: int, config: dict, dims: dict,
                    pointers: Iterable[str] = ("last",), info: dict | None = None) -> CheckpointRef:
    """Write one checkpoint (weights, then state) and then flip the named pointers to it.

    Args:
        run_dir: the run folder.
        model: the model; its whole ``state_dict`` (buffers included) goes to safetensors (shared
            tensors are stored once).
        train_state: optimizer/scheduler/scaler state dicts, counters and RNG states; only plain
            python containers, numbers, strings and tensors (loaded back with ``weights_only=True``).
        epoch, step: completed epochs (the epoch being trained for a mid-epoch checkpoint) and
            iterations, used for the tag and the pointer.
        config: the resolved config as a plain mapping (``config_to_dict``).
        dims: feature dims {region_dim, img_global_dim, token_dim, txt_global_dim}.
        pointers: pointer names to update (``"last"``, ``"best"``).
        info: extra pointer fields (e.g. ``dev_rsum``).
    Returns:
        the new :class:`CheckpointRef`.
    """
    run_dir = Path(run_dir)
    tag = checkpoint_tag(epoch, step)
    ckpt_id = uuid.uuid4().hex
    weights = run_dir / CKPT_DIR / f"{tag}.safetensors"
    state_path = run_dir / CKPT_DIR / f"{tag}.pt"
    meta = {
        "format": FORMAT,
        "ckpt_id": ckpt_id,
        "epoch": str(epoch),
        "step": str(step),
        "config": json.dumps(config, sort_keys=True),
        "dims": json.dumps(dims, sort_keys=True),
    }
    atomic_write_path(weights, lambda tmp: _write_safetensors(model, tmp, meta))
    atomic_save_torch({"format": FORMAT, "ckpt_id": ckpt_id, **train_state}, state_path)
    record = {"weights": str(weights.relative_to(run_dir)), "state": str(state_path.relative_to(run_dir)),
              "ckpt_id": ckpt_id, "epoch": epoch, "step": step, **(info or {})}
    for name in pointers:
        update_pointer(run_dir, name, record)
    return CheckpointRef(weights, state_path, record)


def update_pointer(run_dir: str | os.PathLike, name: str, record: dict) -> None:
    """Atomically (re)write ``run_dir/<name>.json`` to point at a checkpoint record."""
    atomic_save_json(record, Path(run_dir) / f"{name}.json")


def _read_pointer(path: Path) -> CheckpointRef:
    try:
        record = json.loads(path.read_text())
        weights = (path.parent / record["weights"]).resolve()
        state = (path.parent / record["state"]).resolve() if record.get("state") else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint pointer ({err})") from None
    if not weights.is_file():
        raise CheckpointError(f"{path}: points at missing weights file {weights}")
    return CheckpointRef(weights, state, record)


def resolve_checkpoint(spec: str | os.PathLike, prefer: str = "best") -> CheckpointRef:
    """Find a checkpoint from a run folder, a pointer file, a ``.safetensors`` or a ``.pt`` file.

    Args:
        spec: run folder (uses ``<prefer>.json``, falling back to the other pointer), a pointer
            ``.json``, a weights ``.safetensors`` (its ``.pt`` sibling is used when present) or a
            state ``.pt`` (its ``.safetensors`` sibling holds the weights).
        prefer: ``"best"`` or ``"last"``.
    Raises:
        CheckpointError: nothing usable at ``spec``.
    """
    path = Path(spec)
    if path.is_dir():
        order = [prefer] + [n for n in ("best", "last") if n != prefer]
        for name in order:
            if (path / f"{name}.json").is_file():
                return _with_given(_read_pointer(path / f"{name}.json"), path)
        raise CheckpointError(f"{path}: no best.json or last.json checkpoint pointer (not a run folder, "
                              f"or no epoch finished yet)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".json":
        return _with_given(_read_pointer(path), path)
    if path.suffix == ".safetensors":
        state = path.with_suffix(".pt")
        return CheckpointRef(path, state if state.is_file() else None, {})
    if path.suffix == ".pt":
        weights = path.with_suffix(".safetensors")
        if not weights.is_file():
            raise CheckpointError(f"{path}: its weights file {weights.name} is missing")
        return CheckpointRef(weights, path, {}, given=path)
    raise CheckpointError(f"{path}: expected a run folder, a .json pointer, .safetensors or .pt checkpoint")


def _with_given(ref: CheckpointRef, given: Path) -> CheckpointRef:
    ref.given = given
    return ref


def _whose(path: Path, given: str | os.PathLike | None) -> str:
    """``path`` as an error names it: with the checkpoint the user gave when that is another file."""
    if given is None or Path(given) == path:
        return str(path)
    return f"checkpoint {given}: its weights file {path}"


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is structurally wrong with a ``.safetensors`` file, in words, or None when its size agrees
    with its header (cheap: reads the 8-byte length and the JSON header only, never the tensors).

    Detects a missing or empty file, a file shorter than its header, an unparsable header and a file
    shorter than the byte range its tensors need (a truncated copy or an interrupted download).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{'empty' if size == 0 else 'truncated'}: {size} bytes, not even the 8-byte header length"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return (f"truncated or not a safetensors file: {size} bytes, but its header length field "
                        f"says the header alone needs {8 + n} bytes")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError) as err:
        return f"corrupt header (not JSON: {err})"
    if not isinstance(header, dict):
        return "corrupt header (not a JSON object)"
    try:
        need = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "corrupt header (tensor entries without data_offsets)"
    if 8 + n + need > size:
        return (f"truncated: {size} bytes, but its tensors need {8 + n + need} bytes "
                f"({8 + n + need - size} missing; an interrupted copy or download?)")
    return None


def read_weights_meta(path: str | os.PathLike, *, given: str | os.PathLike | None = None) -> dict:
    """Header metadata of a weights file: ``config`` and ``dims`` (dicts), ``epoch``/``step`` (int),
    ``ckpt_id`` (str).

    Args:
        path: the ``.safetensors`` weights file.
        given: what the user named (``CheckpointRef.given``: a ``.pt``, pointer or run folder); errors then
            name it and say that ``path`` is its weights file.
    Raises:
        CheckpointError: missing, truncated (byte counts named), corrupt or foreign file.
    """
    from safetensors import safe_open

    path = Path(path)
    who = _whose(path, given)
    problem = safetensors_problem(path)
    if problem is not None:
        raise CheckpointError(f"{who} is {problem}" if problem == "missing" else f"{who} is unusable: {problem}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{who}: unreadable safetensors checkpoint ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{who}: not an aahr_fast checkpoint (format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        return {"config": json.loads(meta["config"]), "dims": json.loads(meta["dims"]),
                "epoch": int(meta["epoch"]), "step": int(meta["step"]), "ckpt_id": meta["ckpt_id"]}
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{who}: corrupt checkpoint metadata ({err})") from None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_diff(a.get(key, "<missing>"), b.get(key, "<missing>"), name))
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r} != current {b!r}"]


def _resolved_model_config(stored: Any) -> Any:
    """A checkpoint's stored model config with the keys added since it was written filled in as the code
    resolves them (defaults, ``preset``), so an older checkpoint compares equal to the config rebuilt from
    it. Falls back to ``stored`` unchanged when it does not build (e.g. a non-AAHR config). Raises nothing."""
    if not isinstance(stored, dict):
        return stored
    try:
        from aahr_fast.models.config import ModelConfig

        return ModelConfig(**stored).to_dict()
    except Exception:  # noqa: BLE001 - comparison then happens on the raw dict, as before
        return stored


def load_weights(model: torch.nn.Module, ref: CheckpointRef | str | os.PathLike, *,
                 expected_model_config: dict | None = None, expected_dims: dict | None = None) -> dict:
    """Load checkpoint weights into ``model`` (strict: every parameter and buffer must match).

    Args:
        model: a model built for the checkpoint's config and dims.
        ref: a :class:`CheckpointRef` or anything :func:`resolve_checkpoint` accepts.
        expected_model_config: the ``model`` config section the caller built ``model`` from; a
            difference with the checkpoint's raises CheckpointError listing the differing keys.
        expected_dims: the feature dims of the data the caller will feed; same check.
    Returns:
        the weights metadata (see :func:`read_weights_meta`).
    Raises:
        CheckpointError: differing config or dims (named), missing/unexpected keys, shape mismatch.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    if not isinstance(ref, CheckpointRef):
        ref = resolve_checkpoint(ref)
    meta = read_weights_meta(ref.weights, given=ref.given)
    problems = []
    if expected_dims is not None:
        problems += [f"feature dim {d}" for d in _diff(meta["dims"], expected_dims)]
    if expected_model_config is not None:
        problems += [f"config model.{d}" for d in _diff(_resolved_model_config(meta["config"].get("model", {})),
                                                         expected_model_config)]
    if problems:
        raise CheckpointError(f"{ref.weights}: checkpoint was trained with a different setup: "
                              + "; ".join(problems))
    current = model.state_dict()
    with safe_open(str(ref.weights), framework="pt") as fh:
        stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    bad = [f"{k}: checkpoint {stored[k]} vs model {tuple(v.shape)}"
           for k, v in current.items() if k in stored and tuple(v.shape) != stored[k]]
    if bad:
        raise CheckpointError(f"{ref.weights}: parameter shapes differ from the model: " + "; ".join(bad[:10]))
    try:
        missing, unexpected = load_model(model, str(ref.weights), strict=False)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{_whose(ref.weights, ref.given)}: cannot load weights ({err})") from None
    if missing or unexpected:
        raise CheckpointError(f"{ref.weights}: weights do not match the model: missing {sorted(missing)[:10]}, "
                              f"unexpected {sorted(unexpected)[:10]}")
    return meta


def load_train_state(ref: CheckpointRef) -> dict:
    """Load the training-state file of ``ref`` (``weights_only=True``) and check that it belongs to
    the same checkpoint as the weights. Raises CheckpointError when absent, corrupt or mismatched."""
    if ref.state is None or not Path(ref.state).is_file():
        raise CheckpointError(f"{ref.weights}: no training-state .pt file beside it; cannot resume from it")
    try:
        state = torch.load(ref.state, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{ref.state}: unreadable training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{ref.state}: not an aahr_fast training state")
    meta = read_weights_meta(ref.weights, given=ref.given)
    if state.get("ckpt_id") != meta["ckpt_id"]:
        raise CheckpointError(f"{ref.state} and {ref.weights} belong to different checkpoints "
                              f"(ids {state.get('ckpt_id')} != {meta['ckpt_id']})")
    return state


def collect_garbage(run_dir: str | os.PathLike, keep: int = 0) -> list[Path]:
    """Delete checkpoint files no pointer names, except the ``keep`` newest tags, and stale
    temporary files from interrupted writes. Returns the deleted paths."""
    run_dir = Path(run_dir)
    folder = run_dir / CKPT_DIR
    if not folder.is_dir():
        return []
    referenced = set()
    for name in ("last", "best"):
        p = run_dir / f"{name}.json"
        if p.is_file():
            try:
                ref = _read_pointer(p)
            except CheckpointError:
                continue
            referenced.add(ref.weights.name)
            if ref.state is not None:
                referenced.add(ref.state.name)
    tags = sorted({p.stem for p in folder.glob("e*-s*.safetensors")})
    kept_tags = set(tags[-keep:]) if keep > 0 else set()
    deleted = []
    for p in folder.iterdir():
        stale_tmp = p.name.startswith(".")
        unreferenced = p.suffix in (".safetensors", ".pt") and p.name not in referenced and p.stem not in kept_tags
        if stale_tmp or unreferenced:
            try:
                p.unlink()
                deleted.append(p)
            except OSError:
                pass
    return deleted
