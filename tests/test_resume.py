"""Exact resume, for real: ``python -m aahr_fast.train`` runs in a subprocess, is SIGKILLed after a
checkpoint (mid-epoch, and just past an epoch boundary), resumed with ``--resume``, and its
metrics.jsonl losses, dev metrics and test results must equal those of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aahr_fast.data.toy import write_toy_features
from aahr_fast.engine import STALL_ENV, MetricsLog

REPO = Path(__file__).resolve().parents[1]
TOY_SPLITS = {"train": 120, "dev": 30, "test": 30}   # 600 captions / 32 = 18 iterations per epoch
STEPS_PER_EPOCH = 600 // 32
CONFIG = {
    "data": {"word_mask_prob": 0.2},   # word masking (issue 15): per-item draws keep resume exact
    "model": {"embed_dim": 32, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 32,
              "graph_ff_dim": 32, "num_prototypes": 8, "queue_size": 64, "proto_start": 5,
              "graph_start": 8, "ops_backend": "reference"},
    "optim": {"batch_size": 32, "lr": 2.0e-3},
    "schedule": {"epochs": 2, "decay_epochs": [1]},   # the lr changes across the boundary
    "run": {"threads": 1, "progress": False, "plots": False, "save_every_steps": 7, "seed": 3},
}


def _train(args, env_extra=None, stall_at=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(STALL_ENV, None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "aahr_fast.train", *args]
    if stall_at is None:
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        return out
    env[STALL_ENV] = str(stall_at)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("STALLED"):
                break
        else:
            pytest.fail(f"training exited (status {proc.wait()}) before reaching step {stall_at}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return None


def _summary(run: Path):
    records = MetricsLog.read(run / "metrics.jsonl")
    steps = {r["step"]: (r["loss"], r["parts"], r["lr"], r["grad_norm"]) for r in records if r["type"] == "step"}
    epochs = {r["epoch"]: (r["dev"], r["train_loss"]) for r in records if r["type"] == "epoch"}
    test = json.loads((run / "test_results.json").read_text())["metrics"]
    return steps, epochs, test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "toy"
    write_toy_features(data, TOY_SPLITS, seed=2)
    cfg = root / "toy.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    full = root / "full"
    _train(["--config", str(cfg), "--data", str(data), "--out", str(full)])
    return root, data, cfg, _summary(full)


@pytest.mark.parametrize("kill_after, resumes_from", [
    (12, 7),                       # mid-epoch 1: resume from the step-7 checkpoint, permutation restored
    pytest.param(STEPS_PER_EPOCH + 2, STEPS_PER_EPOCH,  # just into epoch 2: from the epoch-1 checkpoint
                 marks=pytest.mark.slow),
])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(setup, kill_after, resumes_from):
    root, data, cfg, (want_steps, want_epochs, want_test) = setup
    run = root / f"killed{kill_after}"
    _train(["--config", str(cfg), "--data", str(data), "--out", str(run)], stall_at=kill_after)
    last = json.loads((run / "last.json").read_text())
    assert last["step"] == resumes_from
    assert not (run / "test_results.json").exists()
    before = MetricsLog.read(run / "metrics.jsonl")
    assert max(r["step"] for r in before if r["type"] == "step") == kill_after  # steps past the checkpoint ran

    _train(["--out", str(run), "--resume"])
    steps, epochs, test = _summary(run)
    assert sorted(steps) == sorted(want_steps) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for s in want_steps:
        assert steps[s] == want_steps[s], f"step {s}: resumed {steps[s]} != uninterrupted {want_steps[s]}"
    assert epochs == want_epochs
    assert test == want_test
    resumes = [r for r in MetricsLog.read(run / "metrics.jsonl") if r["type"] == "resume"]
    assert [r["step"] for r in resumes] == [resumes_from]


def test_resume_refuses_a_changed_config(setup, capsys):
    from aahr_fast import train as train_cli

    root = setup[0]
    assert train_cli.main(["--out", str(root / "full"), "--resume", "optim.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "differs" in err
    assert train_cli.main(["--out", str(root / "full"), "--resume", "model.embed_dim=64"]) == 2
    assert "model.embed_dim" in capsys.readouterr().err


def test_resuming_a_finished_run_only_reevaluates(setup, capsys):
    """A run resumed after its last epoch trains nothing and reports the same test metrics."""
    from aahr_fast import train as train_cli

    root, _, _, (want_steps, _, want_test) = setup
    run = root / "full"
    assert train_cli.main(["--out", str(run), "--resume", "run.progress=false"]) == 0
    steps, _, test = _summary(run)
    assert steps == want_steps and test == want_test
