"""Regressions found by trying the documented entry points as a new user (review pass).

* ``--data`` naming a path that does not exist: one ``error:`` line (exit 2) and no misleading
  "is not a prepared feature folder: preparing it into ..." line first (train and evaluate);
* ``--batch-size 0`` / negative for ``evaluate`` and ``index``: exit 2 with a message, not a silent fall
  back to the run's default (0) nor a ValueError traceback from the DataLoader (negative);
* the cross-similarity ops on the ``meta`` device (every tensor, lengths included): shapes come back
  instead of ``RuntimeError: Tensor.item() cannot be called on meta tensors`` from the length check.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from aahr_fast import evaluate as evaluate_cli
from aahr_fast import index as index_cli
from aahr_fast import train as train_cli
from aahr_fast.data.toy import write_toy_features
from aahr_fast.ops import fragment_word_relevance, hard_assignment_similarity
from aahr_fast.utils.errors import DataError

TINY = {
    "model": {"embed_dim": 16, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 16,
              "graph_ff_dim": 16, "num_prototypes": 8, "queue_size": 32, "proto_start": 0.5, "graph_start": 0.5,
              "ops_backend": "reference"},
    "optim": {"batch_size": 16},
    "schedule": {"epochs": 1, "decay_epochs": []},
    "run": {"threads": 1, "progress": False, "plots": False},
}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_features(folder, {"train": 40, "dev": 16, "test": 16}, seed=0)
    return folder


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def run_dir(toy_dir, cfg_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train_cli.main(["--config", str(cfg_file), "--data", str(toy_dir), "--out", str(out)]) == 0
    return out


def test_train_with_missing_data_path_is_one_clear_error(cfg_file, tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    assert train_cli.main(["--config", str(cfg_file), "--data", str(missing), "--out", str(tmp_path / "r")]) == 2
    cap = capsys.readouterr()
    assert "does not exist" in cap.err and str(missing) in cap.err and "Traceback" not in cap.err
    assert "preparing it into" not in cap.out + cap.err
    assert not (tmp_path / "r" / "last.json").exists()


def test_resolve_data_raises_data_error_for_missing_path(tmp_path):
    from aahr_fast.config import load_config

    cfg = load_config("synthetic", [f"data.path={tmp_path / 'nope'}"], validate=False)
    with pytest.raises(DataError, match="does not exist"):
        train_cli.resolve_data(cfg, log=lambda s: pytest.fail(f"logged before failing: {s}"))


def test_evaluate_with_missing_data_path_is_one_clear_error(run_dir, tmp_path, capsys):
    assert evaluate_cli.main(["--checkpoint", str(run_dir), "--data", str(tmp_path / "nope")]) == 2
    cap = capsys.readouterr()
    assert "does not exist" in cap.err and "preparing it into" not in cap.out + cap.err


@pytest.mark.parametrize("bs", ["0", "-3"])
def test_evaluate_rejects_non_positive_batch_size(run_dir, bs, capsys):
    assert evaluate_cli.main(["--checkpoint", str(run_dir), "--batch-size", bs]) == 2
    err = capsys.readouterr().err
    assert "--batch-size must be an integer >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize("bs", ["0", "-3"])
def test_index_rejects_non_positive_batch_size(run_dir, toy_dir, tmp_path, bs, capsys):
    out = tmp_path / "idx"
    assert index_cli.main(["--checkpoint", str(run_dir), "--data", str(toy_dir), "--modality", "image",
                           "--out", str(out), "--batch-size", bs]) == 2
    err = capsys.readouterr().err
    assert "batch_size must be an integer >= 1" in err and "Traceback" not in err
    assert not (out / "index.json").exists()


@pytest.mark.parametrize("op", [fragment_word_relevance, hard_assignment_similarity])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_cross_similarity_ops_on_meta_tensors_give_shapes(op, backend):
    regions = torch.empty(3, 5, 8, device="meta")
    words = torch.empty(2, 4, 8, device="meta")
    region_lens = torch.tensor([5, 3, 1]).to("meta")
    word_lens = torch.tensor([4, 2]).to("meta")
    out = op(regions, region_lens, words, word_lens, backend=backend)
    if op is fragment_word_relevance:
        t2i, i2t = out
        assert t2i.shape == (2, 3) and i2t.shape == (3, 2) and t2i.device.type == "meta"
    else:
        assert out.shape == (3, 2) and out.device.type == "meta"


def test_lengths_on_cpu_are_still_range_checked():
    """The meta shortcut must not weaken the CPU check (a length 0 / > N is a DataError naming the index)."""
    regions, words = torch.randn(3, 5, 8), torch.randn(2, 4, 8)
    with pytest.raises(DataError, match=r"region_lens\[1\] = 0 is outside \[1, 5\]"):
        fragment_word_relevance(regions, torch.tensor([5, 0, 1]), words, torch.tensor([4, 2]))
    with pytest.raises(DataError, match=r"word_lens\[0\] = 5 is outside \[1, 4\]"):
        hard_assignment_similarity(regions, torch.tensor([5, 3, 1]), words, torch.tensor([5, 2]))


@pytest.mark.parametrize("content", ["garbage", "empty", "other_keys"])
def test_image_backbone_bad_weights_file_is_a_config_error(tmp_path, content):
    """``prepare --image-weights FILE`` with a file that is not an efficientnet-lite0 state dict: ConfigError
    naming the file (exit 2 in the CLI), not an UnpicklingError / AssertionError traceback."""
    from aahr_fast.backbones import ImageBackbone
    from aahr_fast.utils.errors import ConfigError

    path = tmp_path / "w.pth"
    if content == "garbage":
        path.write_text("{}")
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match=r"weights file .*w\.pth cannot be loaded"):
        ImageBackbone(path)


def test_prepare_cli_bad_image_weights_exit_2(flickr8k_dir, tmp_path, capsys):
    from aahr_fast import prepare as prepare_cli

    (tmp_path / "w.pth").write_text("not a torch file")
    code = prepare_cli.main([str(flickr8k_dir), str(tmp_path / "out"), "--image-weights",
                             str(tmp_path / "w.pth"), "--num-images", "2", "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be loaded" in err and "Traceback" not in err
