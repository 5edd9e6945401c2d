"""Collapse detection in the trainer (issue 15, item 5): a model whose embeddings really collapse (every
encoder of AAHR, momentum key encoders included, outputs one constant vector from a given step on; the
losses then are constants) is reported in the log and in metrics.jsonl, stopped after
``run.collapse_patience`` steps with the last good checkpoint kept, and exits with status 3 from the CLI;
a healthy run is not flagged. Plus the statistics and the monitor's rules on their own."""
from __future__ import annotations

import json

import pytest
import torch

from aahr_fast import train as train_cli
from aahr_fast.checkpoint import load_weights, resolve_checkpoint
from aahr_fast.collapse import CollapseMonitor, embedding_spread, step_statistics
from aahr_fast.config import ConfigError, config_from_dict, validate_config
from aahr_fast.data.toy import write_toy_features
from aahr_fast.engine import MetricsLog, Trainer, TrainingCollapseError

TOY_SPLITS = {"train": 200, "dev": 50, "test": 50}
TOY_CONFIG = {   # the tiny every-branch AAHR of tests/test_train.py
    "model": {"embed_dim": 64, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 64,
              "graph_ff_dim": 64, "num_prototypes": 16, "queue_size": 64, "proto_start": 0.5,
              "graph_start": 0.5, "ops_backend": "reference"},
    "optim": {"batch_size": 32, "lr": 2.0e-3},
    "schedule": {"epochs": 2, "decay_epochs": [2]},
    "run": {"threads": 1, "progress": False, "plots": False},
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_features(folder, TOY_SPLITS, seed=0)
    return folder


def _cfg(model=None, schedule=None, **run):
    data = {**TOY_CONFIG, "model": {**TOY_CONFIG["model"], **(model or {})},
            "schedule": {**TOY_CONFIG["schedule"], **(schedule or {})}, "run": {**TOY_CONFIG["run"], **run}}
    return validate_config(config_from_dict(data))


def _armed(real, state, from_step):
    def step_fn(batch, step, generator):
        state["armed"] = step >= from_step
        return real(batch, step, generator)

    return step_fn


def _collapsing_builder(from_step: int):
    """build_model whose encoders (query and momentum key encoders) output constant fragments and
    embeddings from iteration ``from_step`` (0-based) on: every image and caption maps to the same vector."""
    from aahr_fast.models import build_model

    state = {"armed": False}

    def constant(enc):
        # the text encoders' outputs come from upper() (AAHR runs lower() once per batch for both text
        # encoders; forward = upper(lower(batch))); the image encoders' from forward()
        method = "upper" if hasattr(enc, "upper") else "forward"
        real = getattr(enc, method)

        def patched(arg):
            out = real(arg)
            if not state["armed"]:
                return out
            c = torch.full_like(out.fused[:1], 0.125)          # one vector for the whole batch
            return out._replace(frags=out.frags * 0 + 0.125, local=out.local * 0 + c, fused=out.fused * 0 + c)

        setattr(enc, method, patched)

    def build(cfg, dims):
        model = build_model(cfg, dims)
        for name in ("img_enc", "txt_enc", "img_key", "txt_key"):
            if getattr(model, name, None) is not None:
                constant(getattr(model, name))
        # the trainer calls training_losses (AAHR, no host reads) or training_step (the baselines): arm both
        for method in ("training_losses", "training_step"):
            if hasattr(model, method):
                setattr(model, method, _armed(getattr(model, method), state, from_step))
        return model

    return build


def test_a_collapsing_model_is_reported_and_stopped_keeping_the_last_good_checkpoint(toy_dir, tmp_path):
    cfg = _cfg(collapse_patience=5, save_every_steps=4)
    run = tmp_path / "run"
    logs = []
    trainer = Trainer(cfg, toy_dir, run, log=logs.append, model_builder=_collapsing_builder(10))
    with pytest.raises(TrainingCollapseError, match="looked collapsed for 5 steps") as err:
        trainer.fit()
    assert str(run / "last.json") in str(err.value) and "embedding spread" in str(err.value)
    records = MetricsLog.read(run / "metrics.jsonl")
    steps = {r["step"]: r for r in records if r["type"] == "step"}
    assert min(steps[s]["spread"]["img"] for s in range(1, 11)) > 0.1          # healthy before
    assert steps[11]["spread"] == {"img": 0.0, "txt": 0.0}                     # collapsed from iteration 11
    # the loss itself is not constant here (the hinge terms count the batch's other-image pairs, and the
    # prototypes keep moving): only the spread shows this collapse
    assert len({steps[s]["loss"] for s in range(11, 16)}) > 1
    collapse = [r for r in records if r["type"] == "collapse"]
    assert [r["step"] for r in collapse] == [11] and "embedding spread" in collapse[0]["reason"]
    assert records[-1]["type"] == "stop" and records[-1]["step"] == 15
    assert sum("looks collapsed" in m for m in logs) == 1
    last = json.loads((run / "last.json").read_text())
    assert last["step"] == 8          # the save at step 12 was withheld: it would hold the collapsed run
    from aahr_fast.models import build_model

    model = build_model(cfg.model, trainer.dims)
    load_weights(model, resolve_checkpoint(run, prefer="last"))
    model.eval()
    from aahr_fast.data.features import FeatureSplit, collate_images, ImageDataset

    fs = FeatureSplit(toy_dir, "dev")
    batch = collate_images([ImageDataset(fs, with_global=True)[i] for i in range(16)])
    with torch.no_grad():
        assert float(embedding_spread(model.encode_images(batch))) > 0.1   # the kept checkpoint is healthy


def test_a_loss_stuck_at_a_constant_is_caught_without_embeddings(toy_dir, tmp_path):
    """A model that returns no embeddings and whose loss is a constant (its margin term, say 3.2): the loss
    check alone flags it; patience 0 reports without stopping and checkpoints as usual."""
    from aahr_fast.models import build_model

    def build(mcfg, dims):
        model = build_model(mcfg, dims)
        for method in ("training_losses", "training_step"):
            if hasattr(model, method):
                real = getattr(model, method)

                def stuck(batch, step, generator, real=real, method=method):
                    out = real(batch, step, generator)
                    total = out["loss"].detach() * 0 + 3.2 if method == "training_losses" else 3.2
                    return {"loss": out["loss"] * 0 + 3.2, "parts": {"total": total}}

                setattr(model, method, stuck)
        return model

    cfg = _cfg(schedule={"epochs": 1, "decay_epochs": [], "max_steps_per_epoch": 6}, collapse_patience=0)
    logs = []
    Trainer(cfg, toy_dir, tmp_path / "run", log=logs.append, model_builder=build).fit()
    records = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    collapse = [r for r in records if r["type"] == "collapse"]
    assert [r["step"] for r in collapse] == [2] and "loss is stuck at 3.2" in collapse[0]["reason"]
    assert not any(r["type"] == "stop" for r in records)
    assert any("will not stop training" in m for m in logs)
    epoch = [r for r in records if r["type"] == "epoch"][0]
    assert "loss is stuck" in epoch["collapse"]
    assert (tmp_path / "run" / "last.json").is_file()         # report-only: checkpoints as usual


def test_the_cli_exits_with_status_3_on_collapse(toy_dir, tmp_path, monkeypatch, capsys):
    import yaml

    import aahr_fast.models as models

    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(yaml.safe_dump(TOY_CONFIG))
    monkeypatch.setattr(models, "build_model", _collapsing_builder(0))
    code = train_cli.main(["--config", str(cfg_file), "--data", str(toy_dir), "--out", str(tmp_path / "r"),
                           "run.collapse_patience=3"])
    err = capsys.readouterr().err
    assert code == 3 and "looked collapsed for 3 steps" in err and "no checkpoint was written yet" in err
    assert not (tmp_path / "r" / "last.json").exists()


def test_a_run_that_ends_collapsed_without_any_checkpoint_stops(toy_dir, tmp_path):
    cfg = _cfg(schedule={"epochs": 1, "decay_epochs": [], "max_steps_per_epoch": 4}, collapse_patience=50)
    trainer = Trainer(cfg, toy_dir, tmp_path / "run", log=lambda m: None, model_builder=_collapsing_builder(0))
    with pytest.raises(TrainingCollapseError, match="ended at step 4 with no checkpoint to test"):
        trainer.fit()


def test_a_healthy_run_is_not_flagged(toy_dir, tmp_path):
    """The 2-epoch toy run (every branch on: prototypes and graph start half-way) with patience 1."""
    cfg = _cfg(collapse_patience=1)
    trainer = Trainer(cfg, toy_dir, tmp_path / "run", log=lambda m: None)
    trainer.fit()   # patience 1: any flag would stop it
    # the monitor's state (the previous checked loss) is in the checkpoint: a resume continues the check
    resumed = Trainer(cfg, toy_dir, tmp_path / "run", resume=True, log=lambda m: None)
    assert resumed.collapse.state_dict() == trainer.collapse.state_dict()
    assert resumed.collapse.prev_loss is not None
    records = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 62 and not any(r["type"] in ("collapse", "stop") for r in records)
    assert min(min(r["spread"].values()) for r in steps) > 0.1
    assert (tmp_path / "run" / "last.json").is_file()


# ------------------------------------------------------------------ the pieces


def test_embedding_spread():
    g = torch.Generator().manual_seed(0)
    assert float(embedding_spread(torch.randn(256, 64, generator=g))) == pytest.approx(1.0, abs=0.02)
    same = torch.randn(1, 64, generator=g).expand(32, 64)
    assert float(embedding_spread(same)) < 1e-6
    assert float(embedding_spread(same * torch.rand(32, 1, generator=g) + 0)) < 1e-6   # scale does not matter
    assert float(embedding_spread(torch.zeros(8, 4))) == 0.0
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert float(embedding_spread(x)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="B, D"):
        embedding_spread(torch.zeros(0, 3))
    assert step_statistics({"loss": torch.tensor(1.0)}) == {}
    stats = step_statistics({"embeddings": (same, x)})
    assert set(stats) == {"spread_img", "spread_txt"} and all(t.dim() == 0 for t in stats.values())
    with pytest.raises(ValueError, match="pair"):
        step_statistics({"embeddings": same})


def test_the_monitor_rules():
    m = CollapseMonitor(patience=3, min_spread=1e-3, loss_rtol=1e-6)
    healthy = {"spread_img": 0.8, "spread_txt": 0.7}
    assert m.check(1, 0.0, healthy)["event"] is None
    assert m.check(2, 0.0, healthy)["event"] is None                 # a zero loss is never "stuck"
    assert m.check(3, 1.5, healthy)["event"] is None
    v = m.check(4, 1.5, healthy)                                     # equal to the previous loss
    assert v["event"] == "start" and "stuck at 1.5" in v["reason"] and m.active
    assert m.check(5, 1.2, healthy)["event"] == "recovered" and not m.active
    assert m.check(6, 1.1, {"spread_img": 1e-4, "spread_txt": 0.7})["event"] == "start"
    assert m.check(7, 1.0, {"spread_img": 0.5, "spread_txt": 1e-5})["event"] == "ongoing"
    v = m.check(8, 0.9, {"spread_img": 0.0, "spread_txt": 0.0})
    assert v["event"] == "stop" and v["steps"] == 3 and "img 0, txt 0" in v["reason"]
    state = m.state_dict()
    other = CollapseMonitor(3, 1e-3, 1e-6)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.active
    off = CollapseMonitor(patience=0, min_spread=0.0, loss_rtol=None)
    for s in range(1, 5):
        assert off.check(s, 2.0, {"spread_img": 0.0})["event"] is None
    with pytest.raises(ValueError):
        CollapseMonitor(-1, 0.0, None)


def test_config_keys_are_checked():
    cfg = _cfg()
    assert (cfg.run.collapse_patience, cfg.run.collapse_min_spread, cfg.run.collapse_loss_rtol) == (50, 1e-3, 1e-6)
    for bad in ({"collapse_patience": -1}, {"collapse_min_spread": 1.5}, {"collapse_loss_rtol": -0.1}):
        with pytest.raises(ConfigError, match="run.collapse_"):
            _cfg(**bad)
    assert _cfg(collapse_loss_rtol=None).run.collapse_loss_rtol is None
