"""``model.preset=authors`` (issue 15 item 3): one switch that reproduces the authors' released code where we
deliberately differ; each element is its own key, and each key changes behaviour (tests below)."""
from __future__ import annotations

import math

import pytest
import torch

from aahr_fast.config import load_config
from aahr_fast.models import build_model
from aahr_fast.models.config import PRESETS, ModelConfig
from aahr_fast.models.encoders import EncoderOutput
from aahr_fast.models.graph import BiasedEncoderLayer, InstanceGraph
from aahr_fast.utils.errors import ConfigError

DIMS = dict(region_dim=12, img_global_dim=6, token_dim=10, txt_global_dim=5)
KEYS = ("pool_mask_padding", "bn_mask_padding", "relevance_mask_padding", "moco_mask_same_image",
        "graph_attn_dropout", "init")


def cfg(**kw) -> ModelConfig:
    base = dict(embed_dim=16, frag_heads=2, graph_heads=2, pool_heads=2, num_prototypes=8, queue_size=12,
                proto_start=0, graph_start=0, moco_start=0, dropout=0.0, ops_backend="reference")
    base.update(kw)
    return ModelConfig(**base).validate()


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg(**kw), DIMS)


def batch(b=4, n=7, length=9, seed=0, pad_seed=None):
    """A batch whose padded slots hold random values (seeded by ``pad_seed``), valid slots by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = dict(regions=torch.randn(b, n, 12, generator=g), region_lens=torch.tensor([n, 3, 5, 2])[:b],
               img_global=torch.randn(b, 6, generator=g), tokens=torch.randn(b, length, 10, generator=g),
               token_lens=torch.tensor([length, 4, 6, 3])[:b], txt_global=torch.randn(b, 5, generator=g),
               img_index=torch.arange(b), cap_index=torch.arange(b))
    if pad_seed is not None:
        gp = torch.Generator().manual_seed(pad_seed)
        for key, lens in (("regions", out["region_lens"]), ("tokens", out["token_lens"])):
            x = out[key]
            pad = torch.arange(x.shape[1])[None, :] >= lens[:, None]
            x[pad] = torch.randn(int(pad.sum()), x.shape[2], generator=gp) * 3
    return out


# ------------------------------------------------------------------------------------------ the switch
def test_preset_fills_each_key_and_explicit_values_win():
    ours, authors = ModelConfig(), ModelConfig(preset="authors")
    assert {k: getattr(ours, k) for k in KEYS} == PRESETS["ours"]
    assert {k: getattr(authors, k) for k in KEYS} == PRESETS["authors"]
    assert all(PRESETS["ours"][k] != PRESETS["authors"][k] for k in KEYS)
    mixed = load_config("f30k_paper", ["model.preset=authors", "model.moco_mask_same_image=true"]).model
    assert mixed.moco_mask_same_image is True and mixed.pool_mask_padding is False
    legacy = ModelConfig(paper_compat=True, moco_mask_same_image=True)       # the older switch still forces
    assert not (legacy.moco_mask_same_image or legacy.pool_mask_padding or legacy.bn_mask_padding
                or legacy.relevance_mask_padding)
    assert load_config("f30k_paper").model.preset == "ours"                  # corrected behaviour by default
    with pytest.raises(ConfigError, match="preset"):
        load_config("synthetic", ["model.preset=theirs"])
    with pytest.raises(ConfigError, match="init"):
        load_config("synthetic", ["model.init=xavier"])


def test_saved_config_round_trips():
    from aahr_fast.config import config_from_dict, config_to_dict

    c = load_config("synthetic", ["model.preset=authors", "model.init=torch"])
    again = config_from_dict(config_to_dict(c)).model
    assert {k: getattr(again, k) for k in KEYS} == {k: getattr(c.model, k) for k in KEYS}
    assert again.init == "torch"


# ------------------------------------------------------------------------------------------ each key
def test_pool_mask_padding_key():
    """Masked: a caption's embedding ignores what its padded slots hold; unmasked (authors): it does not."""
    for flag, invariant in ((True, True), (False, False)):
        model = build(pool_mask_padding=flag).eval()
        with torch.no_grad():
            a, b = model.encode_texts(batch(pad_seed=1)), model.encode_texts(batch(pad_seed=2))
        assert torch.allclose(a, b, atol=1e-6) == invariant, flag


def test_bn_mask_padding_key():
    """Masked: the BatchNorm running statistics ignore padded region rows; unmasked (authors): they do not."""
    for flag, invariant in ((True, True), (False, False)):
        stats = []
        for pad_seed in (1, 2):
            model = build(bn_mask_padding=flag, pool_mask_padding=True).train()
            model.img_enc(batch(pad_seed=pad_seed))
            stats.append(model.img_enc.enc.proj.norm.running_mean.clone())
        assert torch.allclose(*stats, atol=1e-6) == invariant, flag


def test_relevance_mask_padding_key():
    """Masked: region-word relevance ignores padded region slots; unmasked (authors): they enter it."""
    g = torch.Generator().manual_seed(0)
    b, n, length, d = 4, 6, 5, 16
    rlens, tlens = torch.tensor([6, 2, 4, 3]), torch.tensor([5, 3, 2, 4])
    words = torch.randn(b, length, d, generator=g)
    regions = torch.randn(b, n, d, generator=g)
    other = regions.clone()
    pad = torch.arange(n)[None, :] >= rlens[:, None]
    other[pad] = torch.randn(int(pad.sum()), d, generator=g)
    mask_r, mask_t = pad.logical_not(), torch.arange(length)[None, :] < tlens[:, None]
    zero = torch.zeros(b, d)
    txt = EncoderOutput(words, mask_t, tlens, zero, zero)
    for flag, invariant in ((True, True), (False, False)):
        graph = InstanceGraph(cfg(relevance_mask_padding=flag))
        r1 = graph.inter_relevance(EncoderOutput(regions, mask_r, rlens, zero, zero), txt)
        r2 = graph.inter_relevance(EncoderOutput(other, mask_r, rlens, zero, zero), txt)
        same = all(torch.allclose(x, y, atol=1e-6) for x, y in zip(r1, r2))
        assert same == invariant, flag


def test_moco_mask_same_image_key():
    """With the queue holding keys of the batch's own images, masking them changes the MoCo loss."""
    losses = {}
    for flag in (True, False):
        model = build(moco_mask_same_image=flag, use_graph=False, use_prototypes=False).train()
        bt = batch()
        for q in (model.queue_v, model.queue_t):       # fill the queues with keys of images 0..3
            q.enqueue(torch.nn.functional.normalize(torch.randn(12, 16), dim=1), torch.arange(12) % 4)
        out = model.training_step(bt, 0, torch.Generator().manual_seed(0))
        losses[flag] = out["parts"]["moco"]
    assert losses[True] != pytest.approx(losses[False])


def test_graph_attn_dropout_key():
    """Dropout on the instance Transformer's attention probabilities: training outputs vary between draws
    (eval equals the fused op); without it (ours, other dropouts 0) training equals eval."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g)
    bias = torch.where(torch.rand(6, 6, generator=g) > 0.3, torch.rand(6, 6, generator=g), float("-inf"))
    bias.fill_diagonal_(0.5)
    for p, varies in ((0.0, False), (0.5, True)):
        torch.manual_seed(0)
        layer = BiasedEncoderLayer(16, 2, 16, dropout=0.0, attn_dropout=p)
        with torch.no_grad():
            ref = layer.eval()(x, bias)
            layer.train()
            outs = [layer(x, bias) for _ in range(2)]
        assert (not torch.allclose(outs[0], ref, atol=1e-6)) == varies, p
    assert InstanceGraph(cfg(graph_attn_dropout=True, dropout=0.1)).layer.attn_dropout == 0.1
    assert InstanceGraph(cfg(graph_attn_dropout=False, dropout=0.1)).layer.attn_dropout == 0.0


def test_init_key():
    """authors: Xavier-uniform, zero-bias region / global projections and an MHA-style instance Transformer."""
    ours, theirs = build(init="torch"), build(init="authors")
    for model, zero in ((ours, False), (theirs, True)):
        proj = model.img_enc.enc.proj
        linears = [proj.fc, proj.mlp_in, proj.mlp_out, model.img_enc.enc.glob_proj, model.txt_enc.enc.glob_proj]
        layer = model.graph.layer
        linears_g = [layer.q_proj, layer.k_proj, layer.v_proj]
        biases = [m.bias for m in linears + linears_g] + [layer.out_proj.bias]
        assert all(bool((bb == 0).all()) for bb in biases) == zero
    for lin in (theirs.img_enc.enc.proj.fc, theirs.img_enc.enc.proj.mlp_in):
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    q = theirs.graph.layer.q_proj.weight
    assert q.abs().max() <= math.sqrt(6.0 / (4 * 16)) < math.sqrt(6.0 / 32)
    # the text projection keeps PyTorch's default init in the authors' code too
    assert not bool((theirs.txt_enc.enc.proj.fc.bias == 0).all())


def test_whole_preset_changes_a_trained_step():
    bt = batch(pad_seed=1)
    parts = {}
    for preset in ("ours", "authors"):
        model = build(preset=preset, dropout=0.1).train()
        torch.manual_seed(1)
        parts[preset] = model.training_step(bt, 0, torch.Generator().manual_seed(0))["parts"]["base"]
    assert parts["ours"] != pytest.approx(parts["authors"])


def test_checkpoint_written_before_the_new_keys_still_matches_its_config():
    """Resume compares the checkpoint's stored model config with the current one: a config stored before the
    preset keys existed resolves to the same values (ours; the authors' four with paper_compat)."""
    from aahr_fast.checkpoint import _diff, _resolved_model_config
    from aahr_fast.config import config_to_dict

    for compat in (False, True):
        current = config_to_dict(ModelConfig(paper_compat=compat))
        old = {k: v for k, v in current.items() if k not in KEYS + ("preset",)}
        old["moco_mask_same_image"] = True                # the old default, overridden by paper_compat
        assert _diff(_resolved_model_config(old), current) == [], compat
    assert _resolved_model_config({"no_such_key": 1}) == {"no_such_key": 1}
