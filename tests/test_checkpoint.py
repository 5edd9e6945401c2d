"""Checkpoints: round trip (weights incl. buffers + training state), pointer resolution, mismatch errors,
garbage collection, and a SIGKILL in the middle of a save leaving the previous checkpoint loadable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aahr_fast.checkpoint import (
    collect_garbage,
    load_train_state,
    load_weights,
    read_weights_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from aahr_fast.utils.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]
DIMS = {"region_dim": 8, "img_global_dim": 4, "token_dim": 6, "txt_global_dim": 3}


class Tiny(torch.nn.Module):
    """A parameter, a queue buffer and a pointer buffer: what a checkpoint must carry."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.lin = torch.nn.Linear(width, 3)
        self.register_buffer("queue", torch.randn(3, 7))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))


def _state(opt):
    return {"optimizer": opt.state_dict(), "progress": {"epoch": 1, "step": 10},
            "rng": {"torch": torch.get_rng_state(), "python": (3, tuple(range(5)), None)}}


def _save(run, model, opt, epoch, step, pointers=("last",), width=5, info=None):
    cfg = {"model": {"embed_dim": width}, "optim": {"lr": 0.1}}
    return save_checkpoint(run, model, _state(opt), epoch=epoch, step=step, config=cfg, dims=DIMS,
                           pointers=pointers, info=info)


def test_round_trip_restores_weights_buffers_and_state(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.lin.weight.sum().backward()
    opt.step()
    model.ptr += 3
    ref = _save(tmp_path, model, opt, 1, 10, pointers=("last", "best"), info={"dev_rsum": 123.5})
    want = {k: v.clone() for k, v in model.state_dict().items()}

    other = Tiny()
    meta = load_weights(other, tmp_path / "last.json")
    for k, v in other.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert meta["epoch"] == 1 and meta["step"] == 10 and meta["dims"] == DIMS
    assert meta["config"]["model"]["embed_dim"] == 5
    state = load_train_state(resolve_checkpoint(tmp_path))
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["progress"] == {"epoch": 1, "step": 10}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["dev_rsum"] == 123.5 and best["ckpt_id"] == ref.info["ckpt_id"]


def test_resolve_every_kind_of_spec(tmp_path):
    model, opt = Tiny(), None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _save(tmp_path, model, opt, 1, 5, pointers=("last", "best"))
    second = _save(tmp_path, model, opt, 2, 10, pointers=("last",))
    assert resolve_checkpoint(tmp_path).weights == first.weights  # best preferred for a run folder
    assert resolve_checkpoint(tmp_path, prefer="last").weights == second.weights
    assert resolve_checkpoint(tmp_path / "last.json").weights == second.weights
    assert resolve_checkpoint(second.weights).state == second.state
    assert resolve_checkpoint(second.state).weights == second.weights
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no best.json or last.json"):
        resolve_checkpoint(empty)


def test_mismatches_are_named(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = _save(tmp_path, model, opt, 1, 5)
    with pytest.raises(CheckpointError, match=r"model.embed_dim: checkpoint 5 != current 9"):
        load_weights(Tiny(9), ref, expected_model_config={"embed_dim": 9})
    with pytest.raises(CheckpointError, match=r"feature dim region_dim: checkpoint 8 != current 16"):
        load_weights(Tiny(), ref, expected_dims={**DIMS, "region_dim": 16})
    with pytest.raises(CheckpointError, match=r"lin.weight: checkpoint \(3, 5\) vs model \(3, 9\)"):
        load_weights(Tiny(9), ref)

    class Extra(Tiny):
        def __init__(self):
            super().__init__()
            self.more = torch.nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match="missing"):
        load_weights(Extra(), ref)


def test_corrupt_and_mismatched_files(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a = _save(tmp_path, model, opt, 1, 5, pointers=())
    b = _save(tmp_path, model, opt, 2, 10, pointers=())
    # a state file of another checkpoint beside the weights
    os.replace(a.state, b.state)
    with pytest.raises(CheckpointError, match="different checkpoints"):
        load_train_state(resolve_checkpoint(b.weights))
    # truncated weights
    data = b.weights.read_bytes()
    b.weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is unusable: truncated.*bytes"):
        read_weights_meta(b.weights)
    # a foreign safetensors file
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an aahr_fast checkpoint"):
        load_weights(Tiny(), foreign)
    with pytest.raises(CheckpointError, match="no training-state"):
        load_train_state(resolve_checkpoint(foreign))


def test_garbage_collection_keeps_what_pointers_name(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    best = _save(tmp_path, model, opt, 1, 5, pointers=("last", "best"))
    _save(tmp_path, model, opt, 2, 10, pointers=("last",))
    last = _save(tmp_path, model, opt, 3, 15, pointers=("last",))
    (tmp_path / "checkpoints" / ".e004-s00000020.tmp.safetensors").write_bytes(b"partial")
    deleted = {p.name for p in collect_garbage(tmp_path)}
    assert deleted == {"e002-s00000010.safetensors", "e002-s00000010.pt", ".e004-s00000020.tmp.safetensors"}
    left = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert left == {best.weights.name, best.state.name, last.weights.name, last.state.name}


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch
    import aahr_fast.checkpoint as ck
    where, run = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    cfg, dims = {"model": {}}, {"region_dim": 1}
    ck.save_checkpoint(run, model, {"step": 1}, epoch=1, step=1, config=cfg, dims=dims)
    print("SAVED", float(model.weight.detach().sum()), flush=True)
    with torch.no_grad():
        model.weight.add_(1.0)

    def stall(*args, **kwargs):
        print("STALLED", flush=True)
        time.sleep(3600)

    if where == "weights":      # half of the new weights written to the temporary file
        def writer(m, path, metadata):
            with open(path, "wb") as fh:
                fh.write(b"\\x00" * 1000)
                fh.flush()
                os.fsync(fh.fileno())
            stall()
        ck._write_safetensors = writer
    elif where == "state":      # weights done, the state file being written
        from aahr_fast.utils.io import atomic_write

        def save_torch(obj, path):
            with atomic_write(path) as fh:
                fh.write(b"junk")
                fh.flush()
                stall()
        ck.atomic_save_torch = save_torch
    else:                       # both files done, the pointer not yet replaced
        ck.update_pointer = stall
    ck.save_checkpoint(run, model, {"step": 2}, epoch=2, step=2, config=cfg, dims=dims)
""")


@pytest.mark.parametrize("where", ["weights", "state", "pointer"])
def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, where, str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        saved = proc.stdout.readline().split()
        assert saved and saved[0] == "SAVED", proc.stderr.read()
        assert proc.stdout.readline().strip() == "STALLED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ref = resolve_checkpoint(run, prefer="last")
    assert ref.info["step"] == 1
    model = torch.nn.Linear(64, 64)
    meta = load_weights(model, ref)
    assert meta["step"] == 1
    assert float(model.weight.detach().sum()) == pytest.approx(float(saved[1]), abs=1e-4)
    assert load_train_state(ref)["step"] == 1
    # the interrupted save is cleaned up by the next collection and a new save works
    collect_garbage(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["e001-s00000001.pt",
                                                                       "e001-s00000001.safetensors"]
    save_checkpoint(run, model, {"step": 3}, epoch=3, step=3, config={"model": {}}, dims={"region_dim": 1})
    assert resolve_checkpoint(run, prefer="last").info["step"] == 3
