"""Partial fine-tuning of the text backbone (``model.text_trainable_layers``, issue 16 item 2).

A tiny random 3-layer BERT (tests/_tiny_bert.py) stands in for MiniLM: the split into a frozen lower part
(embeddings + first ``L - k`` layers) and trainable top ``k`` layers, the momentum copy without the frozen
part, the param groups, the validation, and the shipped ``flickr8k_cpu_ft`` config trained for two steps.
"""
from __future__ import annotations

import copy

import pytest
import torch

from _tiny_bert import VOCAB, make_tiny_bert
from aahr_fast.backbones import TextBackbone
from aahr_fast.data.toy import write_toy_features
from aahr_fast.models import build_model
from aahr_fast.models.config import ModelConfig
from aahr_fast.utils.errors import ConfigError

LAYERS = 3
DIMS = dict(region_dim=12, img_global_dim=6, token_dim=10, txt_global_dim=5)


@pytest.fixture(scope="module")
def bert3(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert3"), hidden=32, heads=2, intermediate=32, layers=LAYERS)


def _ids():
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0], [2, 7, 3, 0, 0, 0, 0], [2, 5, 6, 7, 8, 9, 3]])
    return ids, torch.tensor([5, 3, 7])


def _cfg(bert, k, **kw):
    base = dict(embed_dim=16, frag_heads=2, graph_heads=2, pool_heads=2, num_prototypes=8, queue_size=6,
                text_mode="finetune", text_backbone_path=str(bert), text_trainable_layers=k,
                proto_start=0, graph_start=0, moco_start=0, ops_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def _batch(b=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, length + 1, (b,), generator=g)
    lens[0] = length
    ids = torch.randint(5, len(VOCAB), (b, length), generator=g)
    ids[:, 0] = 2
    for i, n in enumerate(lens.tolist()):
        ids[i, n - 1] = 3
        ids[i, n:] = 0
    return {"regions": torch.randn(b, 5, DIMS["region_dim"], generator=g), "region_lens": torch.full((b,), 5),
            "img_global": torch.randn(b, DIMS["img_global_dim"], generator=g), "input_ids": ids, "token_lens": lens,
            "txt_global": torch.randn(b, DIMS["txt_global_dim"], generator=g),
            "img_index": torch.tensor([0, 0, 1, 2, 3, 4][:b]), "cap_index": torch.arange(b)}


# ------------------------------------------------------------------------------------------ backbone
@pytest.mark.parametrize("k", range(LAYERS + 1))
def test_lower_upper_equal_the_bert_forward(bert3, k):
    tb = TextBackbone(bert3, trainable=True, trainable_layers=k).eval()
    ids, lens = _ids()
    ref = tb.bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    low = tb.lower(ids, lens)
    assert low.requires_grad == (k == 0)               # frozen lower part: no graph
    assert torch.equal(tb.upper(low, lens), ref)       # bit-identical to BertModel.forward
    assert torch.equal(tb.hidden_states(ids, lens), ref)


@pytest.mark.parametrize("k", [1, 2, LAYERS])
def test_frozen_part_has_no_grad_and_stays_in_eval_mode(bert3, k):
    tb = TextBackbone(bert3, trainable=True, trainable_layers=k)
    tb.train()
    layers = list(tb.bert.encoder.layer)
    assert tb.split == LAYERS - k and tb.lower_is_frozen
    for mod in [tb.bert.embeddings, tb.bert.pooler, *layers[: LAYERS - k]]:
        assert not mod.training and not any(p.requires_grad for p in mod.parameters())
    for mod in layers[LAYERS - k:]:
        assert mod.training and all(p.requires_grad for p in mod.parameters())
    # dropout in the trainable layers only: the lower output is the same in train and eval mode
    ids, lens = _ids()
    torch.testing.assert_close(tb.lower(ids, lens), tb.eval().lower(ids, lens), rtol=0, atol=0)


def test_all_layers_train_by_default(bert3):
    tb = TextBackbone(bert3, trainable=True)
    assert tb.trainable_layers == 0 and tb.split == 0 and not tb.lower_is_frozen and tb.frozen_modules() == []
    assert all(p.requires_grad for p in tb.parameters())
    frozen = TextBackbone(bert3)              # the prepare / search backbone: everything frozen
    assert frozen.lower_is_frozen and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("k", [LAYERS + 1, -1, True, 1.5])
def test_trainable_layers_out_of_range(bert3, k):
    with pytest.raises(ConfigError, match=r"text_trainable_layers.*0\.\.3"):
        TextBackbone(bert3, trainable=True, trainable_layers=k)


def test_model_config_validates_trainable_layers(bert3):
    for bad in (-1, True, "2", 1.0):
        with pytest.raises(ConfigError, match="text_trainable_layers"):
            ModelConfig(text_mode="finetune", text_trainable_layers=bad).validate()
    with pytest.raises(ConfigError, match="text_mode='finetune'"):
        ModelConfig(text_mode="frozen", text_trainable_layers=2).validate()
    ModelConfig(text_mode="frozen", text_trainable_layers=0).validate()
    with pytest.raises(ConfigError, match=r"0\.\.3 .*3 transformer layers"):   # known when the backbone loads
        build_model(_cfg(bert3, LAYERS + 1), DIMS)


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("k", [1, 2])
def test_param_groups_hold_only_the_top_layers(bert3, k):
    torch.manual_seed(0)
    model = build_model(_cfg(bert3, k), DIMS)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    top = [p for layer in list(model.txt_enc.backbone.bert.encoder.layer)[LAYERS - k:] for p in layer.parameters()]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in top}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert all(p.requires_grad for g in groups.values() for p in g["params"])


@pytest.mark.parametrize("k", [1, 2])
def test_momentum_copy_holds_no_frozen_layers(bert3, k):
    torch.manual_seed(0)
    model = build_model(_cfg(bert3, k), DIMS)
    key_bb = model.txt_key.backbone
    assert key_bb.bert.embeddings is None and key_bb.bert.pooler is None
    assert all(layer is None for layer in list(key_bb.bert.encoder.layer)[: LAYERS - k])
    keys = [n for n in model.state_dict() if n.startswith("txt_key.backbone.")]
    assert keys and all(any(f".encoder.layer.{i}." in n for i in range(LAYERS - k, LAYERS)) for n in keys)
    online = {p.data_ptr() for p in model.txt_enc.parameters()}
    assert not any(p.data_ptr() in online for p in model.txt_key.parameters())       # no shared storage
    with pytest.raises(ConfigError, match="momentum copy"):
        model.txt_key.lower(_batch())
    # the online encoder's top layers and the key's have the same names: the EMA matches them
    key_names = {n for n, _ in model.txt_key.named_parameters()}
    assert key_names <= {n for n, _ in model.txt_enc.named_parameters()}


def test_full_finetune_keeps_the_full_momentum_copy_and_its_keys(bert3):
    """k = 0: the key encoder is a full copy, as before (same state-dict keys as the online encoder)."""
    torch.manual_seed(0)
    model = build_model(_cfg(bert3, 0), DIMS)
    sd = model.state_dict()
    online = sorted(n[len("txt_enc."):] for n in sd if n.startswith("txt_enc."))
    key = sorted(n[len("txt_key."):] for n in sd if n.startswith("txt_key."))
    assert online == key and "backbone.bert.embeddings.word_embeddings.weight" in key


@pytest.mark.parametrize("k", [0, 1, 2])
def test_shared_lower_gives_the_keys_of_a_full_key_encoder(bert3, k):
    """The key encoder fed the online lower() output equals a complete encoder holding the key's weights."""
    torch.manual_seed(0)
    model = build_model(_cfg(bert3, k), DIMS)
    with torch.no_grad():
        for p in model.txt_key.parameters():     # make the key weights differ from the online ones
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = _batch()
    full = copy.deepcopy(model.txt_enc)
    missing, unexpected = full.load_state_dict(model.txt_key.state_dict(), strict=False)
    assert not unexpected and bool(missing) == (k > 0)          # k > 0: the key has no frozen layers
    assert all(n.startswith("backbone.bert.") for n in missing)
    with torch.no_grad():
        low = model.txt_enc.lower(batch)
        got = model.txt_key.upper(model.txt_key.lower(batch, shared=low)).fused
        torch.testing.assert_close(got, full(batch).fused, rtol=0, atol=0)


def test_training_step_updates_only_the_top_layers_and_ema_over_them(bert3):
    torch.manual_seed(0)
    model = build_model(_cfg(bert3, 1, moco_momentum=0.5), DIMS)
    model.train()
    bb = model.txt_enc.backbone
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    key_before = {n: p.detach().clone() for n, p in model.txt_key.backbone.named_parameters()}
    opt = torch.optim.SGD(model.param_groups(0.5), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        opt.zero_grad()
        out = model.training_step(_batch(seed=step), step, gen)
        out["loss"].backward()
        opt.step()
        model.on_after_optimizer_step()
    for n, p in bb.named_parameters():
        top = n.startswith(f"bert.encoder.layer.{LAYERS - 1}.")
        assert torch.equal(p, before[n]) != top, n            # only the top layer moved, the rest bit-identical
    moved = [n for n, p in model.txt_key.backbone.named_parameters() if not torch.equal(p, key_before[n])]
    assert moved and all(n.startswith(f"bert.encoder.layer.{LAYERS - 1}.") for n in moved)


def test_vse_baseline_takes_the_setting(bert3):
    model = build_model(_cfg(bert3, 2, arch="vse"), DIMS)
    groups = {g["name"]: g for g in model.param_groups(1e-3)}
    top = [p for layer in list(model.backbone.bert.encoder.layer)[LAYERS - 2:] for p in layer.parameters()]
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in top}
    model.train()
    out = model.training_step(_batch(), 0, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert model.backbone.bert.embeddings.word_embeddings.weight.grad is None


def test_checkpoint_round_trip_with_partial_finetune(bert3, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    src = build_model(_cfg(bert3, 2), DIMS)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    dst = build_model(_cfg(bert3, 2), DIMS)
    dst.load_state_dict(load_file(str(tmp_path / "w.safetensors")))   # strict
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


# ------------------------------------------------------------------------------------------ shipped config
def test_flickr8k_cpu_ft_config_trains_top_layers_only(bert3, tmp_path):
    """``flickr8k_cpu_ft`` on a toy folder (its input ids index the tiny BERT's vocabulary), two steps of the
    real trainer: the frozen embeddings and lower layers are bit-identical, the top 2 layers changed, word
    masking on ids is on, and the momentum copy holds only the top 2 layers."""
    from aahr_fast.config import load_config
    from aahr_fast.engine import Trainer

    toy = tmp_path / "toy"
    write_toy_features(toy, {"train": 8, "dev": 4, "test": 4}, max_tokens=12)
    cfg = load_config("flickr8k_cpu_ft", [
        f"data.path={toy}", f"model.text_backbone_path={bert3}", "model.embed_dim=32", "model.num_prototypes=8",
        "model.queue_size=16", "model.proto_start=0", "model.graph_start=0", "optim.batch_size=16",
        "schedule.epochs=1", "schedule.decay_epochs=[]", "schedule.max_steps_per_epoch=2", "run.device=cpu",
        "run.progress=false", "run.plots=false", "model.ops_backend=reference"])
    assert cfg.model.text_mode == "finetune" and cfg.model.text_trainable_layers == 2
    assert cfg.model.backbone_lr_mult == 0.1 and cfg.data.word_mask_prob == 0.2
    assert cfg.data.word_mask_split == [0.5, 0.1, 0.4]
    trainer = Trainer(cfg, toy, tmp_path / "run", log=lambda m: None)
    wm = trainer.train_set.word_mask
    assert wm is not None and wm.mask_id == VOCAB.index("[MASK]")          # whole words on ids
    model = trainer.model
    bb = model.txt_enc.backbone
    before = {n: p.detach().clone() for n, p in bb.named_parameters()}
    trainer.fit()
    frozen_prefixes = ("bert.embeddings.", "bert.pooler.", "bert.encoder.layer.0.")
    for n, p in bb.named_parameters():
        if n.startswith(frozen_prefixes):
            assert torch.equal(p, before[n]), n
        else:
            assert n.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2.")), n
    assert any(not torch.equal(p, before[n]) for n, p in bb.named_parameters() if "layer.2." in n)
    key_names = [n for n, _ in model.txt_key.backbone.named_parameters()]
    assert key_names and all(n.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2.")) for n in key_names)
