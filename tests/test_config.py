"""Config system: YAML + typed ``section.key=value`` overrides, typo suggestions, compatibility checks,
shipped configs, and the paper configs building a model that runs one step at the true shapes."""
from __future__ import annotations

import pytest
import torch
import yaml

from aahr_fast.config import (
    CONFIG_DIR,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    diff_configs,
    load_config,
    parse_override,
    resolve_config_path,
    save_config,
    validate_config,
)
from aahr_fast.utils.errors import ConfigError

SHIPPED = ("synthetic", "flickr8k_cpu", "flickr8k_cpu_ft", "vse_baseline_flickr8k", "f30k_paper", "coco_paper")


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 1e-4 and cfg.optim.grad_clip == 2.0
    assert cfg.schedule.epochs == 40 and cfg.schedule.decay_epochs == [15, 25] and cfg.schedule.decay_factor == 0.1
    assert cfg.model.embed_dim == 1024 and cfg.model.backbone_lr_mult == 0.1
    validate_config(cfg)


def test_overrides_are_typed():
    data = apply_overrides({}, ["optim.lr=1e-3", "optim.batch_size=64", "schedule.decay_epochs=[3, 5]",
                                "run.threads=null", "run.deterministic=false", "model.proto_start=1.5ep",
                                "model.graph_start=0.25", "model.queue_size=128", "data.path=/x/y"])
    cfg = config_from_dict(data)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 64 and isinstance(cfg.optim.batch_size, int)
    assert cfg.schedule.decay_epochs == [3, 5]
    assert cfg.run.threads is None and cfg.run.deterministic is False
    assert cfg.model.proto_start == "1.5ep" and cfg.model.graph_start == 0.25
    assert cfg.data.path == "/x/y"


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "'optim.lr'"),
    ("optim.bach_size=3", "'optim.batch_size'"),
    ("modle.embed_dim=8", "'model'"),
    ("model.embed_dimm=8", "'model.embed_dim'"),
    ("schedule.epoch=3", "'schedule.epochs'"),
])
def test_unknown_key_names_it_and_suggests_the_closest(override, needle):
    with pytest.raises(ConfigError) as err:
        config_from_dict(apply_overrides({}, [override]))
    msg = str(err.value)
    key = override.split("=")[0]
    named = key if not key.startswith("modle") else "modle"  # an unknown section is named alone
    assert f"'{named}'" in msg and "did you mean" in msg and needle in msg


@pytest.mark.parametrize("override, needle", [
    ("optim.batch_size=abc", "optim.batch_size"),
    ("optim.lr=fast", "optim.lr"),
    ("run.deterministic=maybe", "run.deterministic"),
    ("schedule.decay_epochs=[1, x]", "schedule.decay_epochs[1]"),
])
def test_mistyped_value_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(apply_overrides({}, [override]))


@pytest.mark.parametrize("overrides, needle", [
    (["optim.batch_size=1"], "batch_size"),
    (["optim.batch_size=256", "model.queue_size=128"], "queue_size"),
    (["optim.batch_size=3", "model.graph_rho=0.3"], "graph_rho"),
    (["model.embed_dim=100", "model.frag_heads=16"], "frag_heads"),
    (["schedule.decay_epochs=[25, 15]"], "decay_epochs"),
    (["run.amp=fp8"], "run.amp"),
    (["data.protocol=2k"], "data.protocol"),
    (["model.num_prototypes=0"], "num_prototypes"),
])
def test_incompatible_values_raise(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_config(config_from_dict(apply_overrides({}, overrides)))


def test_compatible_small_settings_pass():
    cfg = config_from_dict(apply_overrides({}, ["optim.batch_size=4", "model.queue_size=4", "model.embed_dim=32",
                                                "model.frag_heads=4", "model.graph_heads=2"]))
    validate_config(cfg)
    # without MoCo / the graph, their sizes no longer matter
    validate_config(config_from_dict(apply_overrides({}, ["optim.batch_size=512", "model.use_moco=false"])))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override(".lr=3")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=3"])


def test_yaml_roundtrip_and_file_errors(tmp_path):
    cfg = load_config("synthetic", ["optim.lr=2e-4"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert diff_configs(config_to_dict(cfg), config_to_dict(load_config("synthetic"))) == [
        f"optim.lr: {2e-4!r} != {load_config('synthetic').optim.lr!r}"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(typo)
    with pytest.raises(ConfigError, match="did you mean 'synthetic'"):
        resolve_config_path("synthetc")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(name):
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    cfg = load_config(name)
    assert isinstance(cfg, TrainConfig)
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert set(raw) <= {"data", "model", "optim", "schedule", "run"}


PAPER = {
    # name: (K, lambda, batch, cutoff)
    "f30k_paper": (384, 1.0, 128, 1.7),
    "coco_paper": (768, 1.5, 256, 1.9),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_values(name):
    k, lam, batch, cutoff = PAPER[name]
    cfg = load_config(name)
    m = cfg.model
    assert (m.embed_dim, m.frag_heads, m.graph_heads, m.num_prototypes, m.graph_lam) == (1024, 16, 16, k, lam)
    assert (m.proto_start, m.graph_start, m.queue_size, m.dws_cutoff) == (2200, 8000, 2048, cutoff)
    assert cfg.optim.batch_size == batch and cfg.optim.lr == 5e-4
    assert cfg.schedule.epochs == 40 and cfg.schedule.decay_epochs == [15, 25]


@pytest.fixture(scope="module")
def tiny_bert_768(tmp_path_factory):
    """A 1-layer random BERT with bert-base's hidden size 768 (bert-base itself is not available offline)."""
    from _tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("bert768"), hidden=768, heads=12, intermediate=256)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_builds_and_steps_at_true_shapes(name, tiny_bert_768):
    """BUTD 36x2048 regions, fine-tuned BERT with hidden 768 on word ids (the authors' recipe; a tiny random
    1-layer BERT stands in for bert-base), CLIP 512 globals, width 1024 / 16 heads; a tiny batch, a step
    past every warm-up, backward and one (SGD, cheap at 150 M parameters) optimiser step."""
    from aahr_fast.models import build_model

    torch.set_num_threads(2)
    cfg = load_config(name, [f"model.text_backbone_path={tiny_bert_768}"])
    assert cfg.model.text_mode == "finetune" and cfg.run.amp == "none"
    dims = {"region_dim": 2048, "img_global_dim": 512, "token_dim": 768, "txt_global_dim": 512}
    model = build_model(cfg.model, dims)
    model.resolve_schedule(100, 1000)
    model.train()
    b, n, length = 4, 36, 9
    g = torch.Generator().manual_seed(0)
    batch = {
        "regions": torch.randn(b, n, 2048, generator=g), "region_lens": torch.tensor([36, 30, 36, 25]),
        "img_global": torch.randn(b, 512, generator=g),
        "input_ids": torch.randint(5, 32, (b, length), generator=g), "token_lens": torch.tensor([9, 7, 5, 9]),
        "txt_global": torch.randn(b, 512, generator=g),
        "img_index": torch.arange(b), "cap_index": torch.arange(b),
    }
    opt = torch.optim.SGD(model.param_groups(cfg.optim.lr, cfg.model.backbone_lr_mult), lr=cfg.optim.lr)
    out = model.training_step(batch, 10_000, torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"])
    assert out["parts"].get("gnn", 0.0) != 0.0 and out["parts"].get("proto", 0.0) != 0.0
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    assert model.txt_enc.backbone.hidden_size == 768
    assert model.txt_enc.backbone.bert.embeddings.word_embeddings.weight.grad is not None   # fine-tuned
    groups = {grp["name"]: grp["lr"] for grp in model.param_groups(cfg.optim.lr, cfg.model.backbone_lr_mult)}
    assert groups == {"main": 5e-4, "backbone": pytest.approx(5e-5)}
    opt.step()
    model.on_after_optimizer_step()
    model.eval()
    with torch.no_grad():
        assert model.encode_images(batch).shape == (b, 1024)
        assert model.encode_texts(batch).shape == (b, 1024)
