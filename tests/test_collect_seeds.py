"""tools/collect_seeds.py: results entries are derived from the run folder, overrides included."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from aahr_fast.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("collect_seeds", REPO / "tools" / "collect_seeds.py")
collect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect)


def _fake_run(folder: Path, overrides: list[str], finished: bool = True) -> Path:
    folder.mkdir()
    save_config(load_config("vse_baseline_flickr8k", overrides), folder / "config.yaml")
    records = [{"type": "step", "epoch": 1, "step": 1, "loss": 1.0},
               {"type": "epoch", "epoch": 1, "seconds": 10.0, "dev": {"rsum": 250.0}},
               {"type": "epoch", "epoch": 2, "seconds": 12.5, "dev": {"rsum": 260.0}}]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    if finished:
        (folder / "test_results.json").write_text(json.dumps(
            {"protocol": "1k", "checkpoint": {"epoch": 2}, "metrics": {"i2t_r1": 20.0, "rsum": 255.5}}))
    return folder


def test_entry_derives_overrides_dev_of_selected_epoch_and_time(tmp_path):
    run = _fake_run(tmp_path / "r", ["optim.lr=0.001", "run.seed=3", "run.threads=1"])
    entry = collect.run_entry(run, "vse_baseline_flickr8k")
    assert entry["seed"] == 3
    assert entry["overrides"] == ["optim.lr=0.001"]  # seed and threads are run-level, not overrides
    assert entry["dev"] == {"rsum": 260.0} and entry["best_epoch"] == 2
    assert entry["test"] == {"i2t_r1": 20.0, "rsum": 255.5, "protocol": "1k"}
    assert entry["train_seconds"] == 22.5


def test_unfinished_runs_are_left_out_and_summary_has_mean_and_std(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", ["run.seed=0"])
    b = _fake_run(tmp_path / "b", ["run.seed=1"], finished=False)
    out = tmp_path / "seeds.json"
    assert collect.main(["--out", str(out), "--group", "vse", "vse_baseline_flickr8k", str(a), str(b)]) == 0
    data = json.loads(out.read_text())
    assert [e["seed"] for e in data["vse"]] == [0]
    assert data["summary"]["vse"] == {"runs": 1, "test_rsum_mean": 255.5, "test_rsum_std": None,
                                      "dev_rsum_mean": 260.0, "dev_rsum_std": None}
    assert "has not finished" in capsys.readouterr().err


def test_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        collect.run_entry(tmp_path / "nope", "vse_baseline_flickr8k")


def test_merge_adds_seeds_of_another_session_and_replaces_the_same_run(tmp_path):
    out = tmp_path / "seeds.json"
    a0 = _fake_run(tmp_path / "a0", ["run.seed=0"])
    assert collect.main(["--out", str(out), "--commit", "c1", "--group", "vse", "vse_baseline_flickr8k", str(a0)]) == 0
    # a later session: seed 1, and seed 0 again (same overrides -> replaces), another group beside
    a1 = _fake_run(tmp_path / "a1", ["run.seed=1"])
    a0b = _fake_run(tmp_path / "a0b", ["run.seed=0"])
    ab = _fake_run(tmp_path / "ab", ["run.seed=0", "optim.lr=0.001"])
    assert collect.main(["--out", str(out), "--merge", "--commit", "c2", "--group", "vse", "vse_baseline_flickr8k",
                         str(a1), str(a0b), "--group", "vse_lr", "vse_baseline_flickr8k", str(ab)]) == 0
    data = json.loads(out.read_text())
    assert [(e["seed"], e["commit"]) for e in data["vse"]] == [(0, "c2"), (1, "c2")]
    assert data["vse_lr"][0]["overrides"] == ["optim.lr=0.001"]
    assert data["summary"]["vse"]["runs"] == 2 and data["summary"]["vse_lr"]["runs"] == 1
    # without --merge the file holds only what this invocation names
    assert collect.main(["--out", str(out), "--group", "vse", "vse_baseline_flickr8k", str(a1)]) == 0
    data = json.loads(out.read_text())
    assert [e["seed"] for e in data["vse"]] == [1] and "vse_lr" not in data and "commit" not in data["vse"][0]


@pytest.mark.parametrize("held", [
    {"vse": [{"no_seed": 1}]},
    {"vse": [{"seed": None, "overrides": []}, {"seed": 1, "overrides": []}]},
    {"vse": [{"seed": 0, "overrides": "abc"}]},
    [1, 2],
])
def test_merge_refuses_a_file_that_is_not_a_results_file(tmp_path, held):
    out = tmp_path / "seeds.json"
    out.write_text(json.dumps(held))
    a0 = _fake_run(tmp_path / "a0", ["run.seed=0"])
    with pytest.raises(SystemExit, match="not a results file"):
        collect.main(["--out", str(out), "--merge", "--group", "vse", "vse_baseline_flickr8k", str(a0)])
    assert json.loads(out.read_text()) == held


def test_a_group_named_summary_is_refused(tmp_path):
    out = tmp_path / "seeds.json"
    a0 = _fake_run(tmp_path / "a0", ["run.seed=0"])
    with pytest.raises(SystemExit, match="'summary' is where"):
        collect.main(["--out", str(out), "--group", "summary", "vse_baseline_flickr8k", str(a0)])
    assert not out.exists()
