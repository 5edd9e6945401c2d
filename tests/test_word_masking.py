"""Word masking (issue 15 item 1) and the single BERT loader with old-checkpoint loading (issue 15 item 6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_bert import VOCAB, make_tiny_bert
from aahr_fast.config import load_config
from aahr_fast.data.features import (CaptionDataset, FeatureSplit, WordMasking, collate_captions,
                                     word_masking_for_tokenizer)
from aahr_fast.data.toy import write_toy_features
from aahr_fast.utils.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), hidden=32, heads=2, intermediate=32)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_features(folder, {"train": 20, "dev": 4, "test": 4}, max_tokens=12)
    return folder


def ids_of(*tokens):
    return np.array([VOCAB.index(t) for t in ("[CLS]",) + tokens + ("[SEP]",)], dtype=np.int64)


# ------------------------------------------------------------------------------------------ the draw
def test_draw_rates_match_the_authors_split():
    wm = WordMasking(0.2, (0.5, 0.1, 0.4))
    codes = wm.draw(200_000, np.random.default_rng(0))
    frac = np.bincount(codes, minlength=4) / codes.size
    assert frac[0] == pytest.approx(0.8, abs=0.005)
    assert frac[1] == pytest.approx(0.10, abs=0.004)     # 0.2 * 0.5 -> [MASK]
    assert frac[2] == pytest.approx(0.02, abs=0.002)     # 0.2 * 0.1 -> random
    assert frac[3] == pytest.approx(0.08, abs=0.003)     # 0.2 * 0.4 -> deleted


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="prob"):
        WordMasking(1.0)
    with pytest.raises(ValueError, match="summing"):
        WordMasking(0.2, (0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="word_mask_split"):
        load_config("synthetic", ["data.word_mask_split=[0.5,0.1]"])
    with pytest.raises(ConfigError, match="word_mask_prob"):
        load_config("synthetic", ["data.word_mask_prob=1.5"])


# ------------------------------------------------------------------------------------------ token ids
def test_ids_whole_words_mask_random_delete(tiny_bert):
    wm = word_masking_for_tokenizer(0.999, (1.0, 0.0, 0.0), tiny_bert)
    ids = ids_of("two", "dog", "##s", "play", "##ing")
    out = wm.apply_ids(ids, np.random.default_rng(0))
    assert out.tolist() == ids_of("[MASK]", "[MASK]", "[MASK]", "[MASK]", "[MASK]").tolist()
    delete = word_masking_for_tokenizer(0.999, (0.0, 0.0, 1.0), tiny_bert)
    assert delete.apply_ids(ids, np.random.default_rng(0)).tolist() == ids_of().tolist()   # [CLS] [SEP] kept
    rnd = word_masking_for_tokenizer(0.999, (0.0, 1.0, 0.0), tiny_bert)
    out = rnd.apply_ids(ids, np.random.default_rng(1))
    assert out.shape == ids.shape and out[0] == ids[0] and out[-1] == ids[-1]
    assert (out[1:-1] != ids[1:-1]).any() and out.max() < len(VOCAB)


def test_ids_pieces_share_their_words_outcome(tiny_bert):
    """A word and its ## pieces are selected together (words, not WordPiece tokens, are the unit)."""
    wm = word_masking_for_tokenizer(0.5, (0.5, 0.0, 0.5), tiny_bert)
    ids = ids_of("dog", "##s", "play", "##ing", "cat")
    seen = set()
    for seed in range(200):
        out = wm.apply_ids(ids, np.random.default_rng(seed))
        toks = [VOCAB[i] for i in out[1:-1]]
        seen.add(tuple(toks))
        for word, piece in (("dog", "##s"), ("play", "##ing")):
            assert (word in toks) == (piece in toks), toks         # deleted together
        assert toks.count("[MASK]") in (0, 1, 2, 3, 4, 5)
        if "##s" not in toks and "dog" not in toks and len(toks) == 5:
            assert toks[:2] == ["[MASK]", "[MASK]"]
    assert len(seen) > 10


def test_dataset_masks_ids_in_training_only_and_reproducibly(toy, tiny_bert):
    fs = FeatureSplit(toy, "train")
    wm = word_masking_for_tokenizer(0.5, (0.5, 0.1, 0.4), tiny_bert)
    ds = CaptionDataset(fs, train=True, text="input_ids", word_mask=wm, seed=3)
    plain = CaptionDataset(fs, train=True, text="input_ids", seed=3)
    ev = CaptionDataset(fs, train=False, text="input_ids", word_mask=wm, seed=3)
    changed = sum(not np.array_equal(ds[c]["input_ids"], plain[c]["input_ids"]) for c in range(len(ds)))
    assert changed > len(ds) // 2
    assert all(np.array_equal(ev[c]["input_ids"], fs.input_ids(c)) for c in range(10))
    assert all(np.array_equal(ds[c]["input_ids"], ds[c]["input_ids"]) for c in range(10))    # (seed, epoch, c)
    # the region drop draws come first and are unchanged by masking
    assert all(np.array_equal(ds[c]["regions"], plain[c]["regions"]) for c in range(10))
    first = [ds[c]["input_ids"] for c in range(10)]
    ds.set_epoch(1)
    assert any(not np.array_equal(a, ds[c]["input_ids"]) for c, a in enumerate(first))
    with pytest.raises(ValueError, match="mask_id"):
        CaptionDataset(fs, train=True, text="input_ids", word_mask=WordMasking(0.2))


# ------------------------------------------------------------------------------------------ frozen tokens
def test_dataset_masks_frozen_token_features(toy):
    fs = FeatureSplit(toy, "train")
    mask_only = CaptionDataset(fs, train=True, word_mask=WordMasking(0.999, (1.0, 0.0, 0.0)))
    item = mask_only[0]["tokens"]
    orig = fs.tokens(0)
    assert item.shape == orig.shape
    np.testing.assert_array_equal(item[[0, -1]], orig[[0, -1]])
    assert not item[1:-1].any()                                  # [MASK] -> zero feature
    delete = CaptionDataset(fs, train=True, word_mask=WordMasking(0.999, (0.0, 0.0, 1.0)))
    np.testing.assert_array_equal(delete[0]["tokens"], orig[[0, -1]])   # deleted rows leave the sequence
    rnd = CaptionDataset(fs, train=True, word_mask=WordMasking(0.999, (0.0, 1.0, 0.0)), seed=1)
    out = rnd[0]["tokens"]
    pool = np.concatenate([fs.tokens(c)[1:-1] for c in range(len(rnd))])
    for row in out[1:-1]:                                          # each one is some caption's inner token
        assert np.abs(pool - row).sum(1).min() == 0
    batch = collate_captions([rnd[c] for c in range(4)])
    assert batch["tokens"].shape[0] == 4


def test_masking_off_leaves_items_bit_identical(toy):
    """word_mask_prob = 0 (flickr8k_cpu / synthetic): the items, hence the recorded results, do not change."""
    fs = FeatureSplit(toy, "train")
    a = CaptionDataset(fs, train=True, seed=5)
    b = CaptionDataset(fs, train=True, seed=5, word_mask=WordMasking(0.0))
    for c in range(len(a)):
        x, y = a[c], b[c]
        assert np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["regions"], y["regions"])


def test_engine_builds_the_masking_of_the_text_mode(tiny_bert):
    from aahr_fast.engine import _word_masking

    cfg = load_config("flickr8k_cpu")
    assert cfg.data.word_mask_prob == 0.0 and _word_masking(cfg.data, cfg.model) is None
    cfg = load_config("flickr8k_cpu", ["data.word_mask_prob=0.2"])
    wm = _word_masking(cfg.data, cfg.model)
    assert wm.prob == 0.2 and wm.split == [0.5, 0.1, 0.4] and wm.mask_id is None      # frozen: per token
    cfg = load_config("flickr8k_cpu", ["data.word_mask_prob=0.2", "model.text_mode=finetune",
                                       f"model.text_backbone_path={tiny_bert}"])
    wm = _word_masking(cfg.data, cfg.model)
    assert wm.mask_id == VOCAB.index("[MASK]") and wm.vocab_size == len(VOCAB) and wm.continuation.sum() == 5


# ------------------------------------------------------------------------------------------ item 6
def test_one_bert_loader(tiny_bert):
    from aahr_fast import backbones
    from aahr_fast.models import encoders

    assert encoders.TextBackbone is backbones.TextBackbone
    tb = backbones.TextBackbone(tiny_bert, trainable=True)
    assert tb.hidden_size == 32 and tb.path == str(tiny_bert)
    ids = torch.tensor([[2, 7, 8, 3, 0]])
    hs = tb.hidden_states(ids, torch.tensor([4]))
    tok, _ = tb(ids, torch.tensor([4]))
    torch.testing.assert_close(hs[:, :4], tok[:, :4])


def test_old_checkpoint_layout_loads(tiny_bert):
    """A state dict saved when the fine-tuned BERT lived under ``txt_enc.backbone.model.*`` (the former
    aahr_fast.models.encoders.TextBackbone) loads into the merged loader (``...backbone.bert.*``)."""
    from aahr_fast.models import build_model
    from aahr_fast.models.config import ModelConfig

    dims = dict(region_dim=12, img_global_dim=6, token_dim=10, txt_global_dim=5)
    cfg = ModelConfig(embed_dim=16, frag_heads=2, graph_heads=2, pool_heads=2, num_prototypes=8, queue_size=20,
                      text_mode="finetune", text_backbone_path=str(tiny_bert))
    torch.manual_seed(0)
    src = build_model(cfg, dims)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01)
    new_sd = src.state_dict()
    old_sd = {k.replace(".backbone.bert.", ".backbone.model."): v for k, v in new_sd.items()}
    assert sum(".backbone.model." in k for k in old_sd) > 10
    dst = build_model(cfg, dims)
    dst.load_state_dict(old_sd)                       # strict
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, new_sd[k], msg=k)


def test_trainer_wires_word_masking_into_the_training_set(toy, tmp_path):
    from aahr_fast.config import config_from_dict
    from aahr_fast.engine import Trainer

    model = {"embed_dim": 16, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "num_prototypes": 8,
             "queue_size": 32, "ops_backend": "reference"}
    for prob, expect in ((0.0, None), (0.2, 0.2)):
        cfg = config_from_dict({"data": {"word_mask_prob": prob}, "model": model,
                                "optim": {"batch_size": 16}, "schedule": {"epochs": 1, "decay_epochs": []},
                                "run": {"progress": False, "plots": False, "device": "cpu"}})
        trainer = Trainer(cfg, toy, tmp_path / f"run{prob}", log=lambda m: None)
        got = trainer.train_set.word_mask
        assert (got.prob if got is not None else None) == expect
