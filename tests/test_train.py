"""The trainer end to end on toy features (tiny widths, seconds): outputs of a 2-epoch run, recall far
above chance, the evaluate CLI on that run, checkpoint/config mismatches, the non-finite guard."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from aahr_fast import evaluate as evaluate_cli
from aahr_fast import train as train_cli
from aahr_fast.checkpoint import load_weights, resolve_checkpoint
from aahr_fast.config import config_from_dict, validate_config
from aahr_fast.data.toy import write_toy_features
from aahr_fast.engine import MetricsLog, NonFiniteLossError, StepDecay, Trainer

TOY_SPLITS = {"train": 200, "dev": 50, "test": 50}
#: Tiny AAHR (every branch on: prototypes, instance graph, MoCo) that learns the toy data in 2 epochs.
TOY_CONFIG = {
    "model": {"embed_dim": 64, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 64,
              "graph_ff_dim": 64, "num_prototypes": 16, "queue_size": 64, "proto_start": 0.5,
              "graph_start": 0.5, "ops_backend": "reference"},
    "optim": {"batch_size": 32, "lr": 2.0e-3},
    "schedule": {"epochs": 2, "decay_epochs": [2]},
    "run": {"threads": 1, "progress": False},
}


def _chance_rsum(n_images: int, caps_per_image: int = 5) -> float:
    """Expected rsum of random scores: t2i R@K = K/N; i2t R@K = P(some of the GT captions in the top K)."""
    total = 0.0
    m = n_images * caps_per_image
    for k in (1, 5, 10):
        total += 100.0 * k / n_images
        total += 100.0 * (1.0 - math.comb(m - caps_per_image, k) / math.comb(m, k))
    return total


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_features(folder, TOY_SPLITS, seed=0)
    return folder


@pytest.fixture(scope="module")
def toy_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "toy.yaml"
    path.write_text(yaml.safe_dump(TOY_CONFIG))
    return path


@pytest.fixture(scope="module")
def trained_run(toy_dir, toy_config_file, tmp_path_factory):
    """One 2-epoch run through the CLI entry point (in process)."""
    out = tmp_path_factory.mktemp("runs") / "toy"
    code = train_cli.main(["--config", str(toy_config_file), "--data", str(toy_dir), "--out", str(out)])
    assert code == 0
    return out


def test_run_writes_every_output(trained_run, toy_dir):
    out = trained_run
    for name in ("config.yaml", "metrics.jsonl", "last.json", "best.json", "loss.png", "dev_rsum.png",
                 "test_results.json"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "dev_rsum.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = json.loads((out / "last.json").read_text())
    assert last["epoch"] == 2 and last["step"] == 2 * (TOY_SPLITS["train"] * 5 // 32)
    for key in ("weights", "state"):
        assert (out / last[key]).is_file()
    records = MetricsLog.read(out / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, last["step"] + 1))
    assert all(math.isfinite(r["loss"]) and "base" in r["parts"] for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2] and all("rsum" in r["dev"] for r in epochs)
    # lr decays x0.1 after epoch 2 is configured -> the whole run stays at the base lr
    assert {r["lr"] for r in steps} == {2.0e-3}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["embed_dim"] == 64 and saved["data"]["path"] == str(toy_dir)
    assert saved["run"]["out_dir"] == str(out)


def test_best_is_selected_on_dev_and_recall_far_above_chance(trained_run):
    out = trained_run
    records = MetricsLog.read(out / "metrics.jsonl")
    dev = {r["epoch"]: r["dev"]["rsum"] for r in records if r["type"] == "epoch"}
    best = json.loads((out / "best.json").read_text())
    assert dev[best["epoch"]] == max(dev.values()) and best["dev_rsum"] == max(dev.values())
    res = json.loads((out / "test_results.json").read_text())
    m = res["metrics"]
    n = TOY_SPLITS["test"]
    assert res["num_images"] == n and res["chance_r1"] == pytest.approx(100 / n)
    assert m["rsum"] > 2.0 * _chance_rsum(n), (m, _chance_rsum(n))
    assert m["t2i_r1"] > 5 * (100 / n) and m["i2t_r1"] > 2.5 * (100 / n) * 5


def test_evaluate_cli_reproduces_the_test_table(trained_run, toy_dir, tmp_path, capsys):
    sims_path, json_path = tmp_path / "sims.npy", tmp_path / "eval.json"
    code = evaluate_cli.main(["--checkpoint", str(trained_run), "--data", str(toy_dir), "--save-sims",
                              str(sims_path), "--json", str(json_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "R@1" in printed and "rsum" in printed
    got = json.loads(json_path.read_text())["metrics"]
    want = json.loads((trained_run / "test_results.json").read_text())["metrics"]
    assert got == pytest.approx(want)
    sims = np.load(sims_path)
    assert sims.shape == (TOY_SPLITS["test"], TOY_SPLITS["test"] * 5) and sims.dtype == np.float32
    # the dev split and the last checkpoint work too
    assert evaluate_cli.main(["--checkpoint", str(trained_run / "last.json"), "--data", str(toy_dir),
                              "--split", "dev"]) == 0


def test_evaluate_rejects_a_different_config(trained_run, toy_dir, tmp_path, capsys):
    other = dict(TOY_CONFIG, model={**TOY_CONFIG["model"], "embed_dim": 32, "frag_ff_dim": 32})
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    code = evaluate_cli.main(["--checkpoint", str(trained_run), "--data", str(toy_dir), "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "model.embed_dim" in err and "64" in err and "32" in err


def test_evaluate_rejects_different_feature_dims(trained_run, tmp_path, capsys):
    folder = tmp_path / "wide"
    write_toy_features(folder, {"train": 4, "dev": 4, "test": 6}, seed=1, region_dim=48)
    code = evaluate_cli.main(["--checkpoint", str(trained_run), "--data", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "region_dim" in err and "64" in err and "48" in err


def test_load_weights_into_a_model_of_another_config(trained_run, toy_dir):
    from aahr_fast.checkpoint import read_weights_meta
    from aahr_fast.models import build_model
    from aahr_fast.utils.errors import CheckpointError

    ref = resolve_checkpoint(trained_run)
    meta = read_weights_meta(ref.weights)
    cfg = config_from_dict(meta["config"])
    cfg.model.num_prototypes = 8
    model = build_model(cfg.model, meta["dims"])
    with pytest.raises(CheckpointError, match="model.num_prototypes"):
        load_weights(model, ref, expected_model_config={**meta["config"]["model"], "num_prototypes": 8})
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_weights(model, ref)


def test_cli_errors_are_one_line_messages(toy_dir, toy_config_file, tmp_path, capsys):
    assert train_cli.main(["--config", str(toy_config_file), "--data", str(toy_dir), "--out", str(tmp_path / "a"),
                           "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "did you mean 'optim.lr'" in err and "Traceback" not in err
    assert train_cli.main(["--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert train_cli.main(["--config", "no_such_config"]) == 2
    assert "shipped configs" in capsys.readouterr().err


def test_existing_run_needs_resume(trained_run, toy_dir, toy_config_file, capsys):
    assert train_cli.main(["--config", str(toy_config_file), "--data", str(toy_dir), "--out", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_step_decay_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    sched = StepDecay(opt, [15, 25], 0.1)
    lrs = []
    for epoch in (0, 14, 15, 24, 25, 39):
        sched.set_epoch(epoch)
        lrs.append([g["lr"] for g in opt.param_groups])
    want = [[1, 0.1], [1, 0.1], [0.1, 0.01], [0.1, 0.01], [0.01, 0.001], [0.01, 0.001]]
    assert np.allclose(lrs, want)
    other = StepDecay(opt, [1], 0.5)
    other.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])


# ---------------------------------------------------------------------------- non-finite guard


def _toy_cfg(**run):
    data = {**TOY_CONFIG, "run": {**TOY_CONFIG["run"], "plots": False, **run}}
    return validate_config(config_from_dict(data))


def _builder(bad_steps):
    """build_model whose training step ``s in bad_steps`` (0-based) returns a NaN loss (the trainer calls
    ``training_losses``, the host-read-free form of ``training_step``)."""
    from aahr_fast.models import build_model

    def build(cfg, dims):
        model = build_model(cfg, dims)
        real = model.training_losses

        def training_losses(batch, step, generator):
            out = real(batch, step, generator)
            return {**out, "loss": out["loss"] * float("nan")} if step in bad_steps else out

        model.training_losses = training_losses
        return model

    return build


def test_sporadic_nonfinite_loss_is_skipped_and_logged(toy_dir, tmp_path):
    cfg = _toy_cfg()
    logs = []
    trainer = Trainer(cfg, toy_dir, tmp_path / "run", log=logs.append, model_builder=_builder({3, 4, 20}))
    trainer.fit()
    records = MetricsLog.read(tmp_path / "run" / "metrics.jsonl")
    skips = [r for r in records if r["type"] == "skip"]
    assert [r["step"] for r in skips] == [4, 5, 21] and all(r["reason"] == "non-finite loss" for r in skips)
    assert sum("skipped" in m for m in logs) == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_gradient_is_skipped(toy_dir, tmp_path):
    from aahr_fast.models import build_model

    cfg = _toy_cfg()
    state = {"armed": False}

    def build(mcfg, dims):
        model = build_model(mcfg, dims)
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: torch.full_like(g, float("nan")) if state["armed"] else g)
        real = model.training_losses

        def training_losses(batch, step, generator):
            state["armed"] = step == 6
            return real(batch, step, generator)

        model.training_losses = training_losses
        return model

    trainer = Trainer(cfg, toy_dir, tmp_path / "run", log=lambda m: None, model_builder=build)
    trainer.fit()
    skips = [r for r in MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if r["type"] == "skip"]
    assert [(r["step"], r["reason"]) for r in skips] == [(7, "non-finite gradient")]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(toy_dir, tmp_path):
    cfg = _toy_cfg(max_nonfinite_steps=3, save_every_steps=4)
    run = tmp_path / "run"
    trainer = Trainer(cfg, toy_dir, run, log=lambda m: None, model_builder=_builder(set(range(10, 10_000))))
    with pytest.raises(NonFiniteLossError, match="3 consecutive") as err:
        trainer.fit()
    assert str(run / "last.json") in str(err.value)
    last = json.loads((run / "last.json").read_text())
    assert last["step"] == 8  # the last checkpoint before the first bad step (step index 10 = iteration 11)
    records = MetricsLog.read(run / "metrics.jsonl")
    assert records[-1]["type"] == "stop" and records[-1]["step"] == 13
    from aahr_fast.models import build_model

    model = build_model(cfg.model, trainer.dims)
    load_weights(model, resolve_checkpoint(run, prefer="last"))
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_cli_reports_the_guard_with_exit_status_3(toy_dir, toy_config_file, tmp_path, monkeypatch, capsys):
    import aahr_fast.models as models

    monkeypatch.setattr(models, "build_model", _builder(set(range(0, 10_000))))
    code = train_cli.main(["--config", str(toy_config_file), "--data", str(toy_dir), "--out", str(tmp_path / "r"),
                           "run.max_nonfinite_steps=2"])
    assert code == 3 and "2 consecutive steps had a non-finite loss" in capsys.readouterr().err


def test_eccv_needs_the_coco_5k_split(trained_run, toy_dir, capsys):
    code = evaluate_cli.main(["--checkpoint", str(trained_run), "--data", str(toy_dir), "--eccv"])
    err = capsys.readouterr().err
    assert code == 2 and "COCO 5K" in err and "50 images x 250 captions" in err


def test_moving_average_is_trailing():
    from aahr_fast.plots import moving_average

    assert np.allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert np.allclose(moving_average(np.array([2.0, 4.0]), 1), [2.0, 4.0])
    assert moving_average(np.array([]), 3).size == 0


def test_trainer_step_runs_without_value_checks_after_collate_validated_lengths(toy_dir, tmp_path):
    """The trainer validates lengths at collate and runs the model step inside value_checks(False) (issue 14)."""
    import numpy as np

    from aahr_fast.data.features import collate_batch
    from aahr_fast.models import build_model
    from aahr_fast.ops import value_checks_enabled
    from aahr_fast.utils.errors import DataError

    with pytest.raises(DataError, match="item 1 has no tokens"):
        collate_batch([{"tokens": np.ones((3, 4), np.float32)}, {"tokens": np.ones((0, 4), np.float32)}])
    seen = []

    def build(mcfg, dims):
        model = build_model(mcfg, dims)
        real = model.training_losses

        def training_losses(batch, step, generator):
            seen.append(value_checks_enabled(batch["token_lens"]))
            return real(batch, step, generator)

        model.training_losses = training_losses
        return model

    cfg = validate_config(config_from_dict({**TOY_CONFIG, "schedule": {"epochs": 1, "decay_epochs": [1]},
                                            "run": {**TOY_CONFIG["run"], "plots": False}}))
    Trainer(cfg, toy_dir, tmp_path / "run", log=lambda m: None, model_builder=build).fit()
    assert seen and not any(seen) and value_checks_enabled(torch.ones(1))
