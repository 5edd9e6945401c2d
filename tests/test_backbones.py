"""Frozen offline backbones: EfficientNet-Lite0 regions/global, MiniLM tokens/sentence vector, OpenCLIP error."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aahr_fast.backbones import (ImageBackbone, OpenCLIPGlobal, TextBackbone, default_text_model,
                                 load_rgb_image)
from aahr_fast.utils.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # conftest restores the previous count


@pytest.fixture(scope="module")
def image_bb() -> ImageBackbone:
    return ImageBackbone()


@pytest.fixture(scope="module")
def text_bb() -> TextBackbone:
    return TextBackbone()


def _jpeg(path: Path, color=(200, 30, 60), size=(224, 224)) -> Path:
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)
    return path


# ------------------------------------------------------------------------------------------------ images
def test_preprocess_scaling_and_resize(image_bb, tmp_path):
    img = Image.new("RGB", (300, 180), (255, 0, 128))  # non-square, not 224: must be resized
    gray = Image.new("L", (224, 224), 51)  # grayscale -> RGB
    x = image_bb.preprocess([img, gray])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    expect = (np.array([255, 0, 128]) / 255 - 0.498) / 0.502
    assert torch.allclose(x[0].mean(dim=(1, 2)), torch.tensor(expect, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(x[1], torch.full_like(x[1], (51 / 255 - 0.498) / 0.502), atol=1e-6)
    # a file path goes through the same decoder
    x2 = image_bb.preprocess([_jpeg(tmp_path / "a.jpg", (10, 20, 30))])
    assert x2.shape == (1, 3, 224, 224)


def test_preprocess_rejects_bad_array(image_bb):
    with pytest.raises(DataError, match="uint8"):
        image_bb.preprocess([np.zeros((224, 224, 3), np.float32)])


def test_forward_regions_are_row_major_grid_and_global_is_mean(image_bb):
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        regions, glob = image_bb(x)
        fmap = image_bb.net.extract_features(x)  # (2,1280,7,7)
    assert regions.shape == (2, 49, 1280) and glob.shape == (2, 1280)
    assert torch.allclose(regions[:, 3 * 7 + 5], fmap[:, :, 3, 5], atol=1e-5)
    assert torch.allclose(regions[:, 7], fmap[:, :, 1, 0], atol=1e-5)
    assert torch.allclose(glob, regions.mean(dim=1), atol=1e-6)
    assert torch.isfinite(regions).all()


def test_image_backbone_is_frozen(image_bb):
    assert not any(p.requires_grad for p in image_bb.parameters())
    image_bb.train()
    assert not image_bb.training and not image_bb.net.training


def test_forward_rejects_wrong_shape(image_bb):
    with pytest.raises(DataError, match="224"):
        image_bb(torch.zeros(1, 3, 100, 100))


def test_real_photo_classified_correctly(image_bb):
    """Preprocessing + weights are right: Grace Hopper's photo -> ImageNet 'military uniform' (652) in top 5."""
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not shipped by this matplotlib")
    with torch.inference_mode():
        logits = image_bb.net(image_bb.preprocess([photo]).contiguous(memory_format=torch.channels_last))
    assert 652 in logits.topk(5).indices[0].tolist()


def test_truncated_jpeg_raises_data_error_naming_file(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    data = good.read_bytes()
    bad = tmp_path / "cut_off.jpg"
    bad.write_bytes(data[: len(data) // 2])
    assert load_rgb_image(good).shape == (224, 224, 3)
    with pytest.raises(DataError, match="cut_off.jpg"):
        load_rgb_image(bad)


def test_not_an_image_and_missing_file(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("this is not a jpeg")
    with pytest.raises(DataError, match="notes.jpg"):
        load_rgb_image(txt)
    with pytest.raises(DataError, match="missing.jpg"):
        load_rgb_image(tmp_path / "missing.jpg")


def test_missing_weights_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.pth"):
        ImageBackbone(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------ text
def test_tokenize_counts_cls_sep_and_pads_with_zero(text_bb):
    ids, lens = text_bb.tokenize(["a dog", "two dogs run on the beach ."])
    assert ids.dtype == torch.int64 and lens.dtype == torch.int64
    assert lens.tolist() == [4, 9]
    assert ids.shape == (2, 9)
    cls, sep = text_bb.tokenizer.cls_token_id, text_bb.tokenizer.sep_token_id
    assert ids[0, 0] == cls and ids[0, 3] == sep and (ids[0, 4:] == 0).all()
    assert ids[1, 8] == sep


def test_tokenize_rejects_non_string(text_bb):
    with pytest.raises(DataError, match="caption 1"):
        text_bb.tokenize(["ok", None])


def test_text_forward_pooling_and_padding_invariance(text_bb):
    caps = ["A dog runs .", "Two children play with a red ball on a sandy beach near the water ."]
    ids, lens = text_bb.tokenize(caps)
    with torch.inference_mode():
        tok, sent = text_bb(ids, lens)
        tok1, sent1 = text_bb(*text_bb.tokenize(caps[:1]))  # alone: no padding
    assert tok.shape == (2, ids.shape[1], 384) and sent.shape == (2, 384)
    assert (tok[0, lens[0]:] == 0).all()
    assert torch.allclose(sent.norm(dim=1), torch.ones(2), atol=1e-5)
    mean = tok[1, : lens[1]].mean(0)
    assert torch.allclose(sent[1], mean / mean.norm(), atol=1e-5)
    assert torch.allclose(tok[0, : lens[0]], tok1[0], atol=1e-4)
    assert torch.allclose(sent[0], sent1[0], atol=1e-5)
    assert not torch.allclose(sent[0], sent[1], atol=1e-2)


def test_sentence_vector_matches_sentence_transformers(text_bb):
    st = pytest.importorskip("sentence_transformers")
    caps = ["A man rides a bike down a hill .", "a black cat sleeps"]
    ref = st.SentenceTransformer(default_text_model(), device="cpu").encode(caps, convert_to_tensor=True)
    with torch.inference_mode():
        _, sent = text_bb(*text_bb.tokenize(caps))
    assert torch.allclose(sent, ref.cpu(), atol=1e-5)


def test_text_forward_rejects_bad_lengths(text_bb):
    ids, lens = text_bb.tokenize(["a dog"])
    with pytest.raises(DataError, match="lengths"):
        text_bb(ids, torch.tensor([ids.shape[1] + 1]))


def test_frozen_vs_trainable_text_backbone(text_bb):
    assert not any(p.requires_grad for p in text_bb.parameters())
    text_bb.train()
    assert not text_bb.bert.training
    tb = TextBackbone(trainable=True)
    tb.train()
    assert tb.bert.training and all(p.requires_grad for p in tb.parameters())
    tok, sent = tb(*tb.tokenize(["a dog runs"]))
    (tok.sum() + sent.sum()).backward()
    assert tb.bert.embeddings.word_embeddings.weight.grad is not None


def test_bad_text_folder_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        TextBackbone(tmp_path)


def test_hf_offline_is_set(text_bb):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


# ------------------------------------------------------------------------------------------------ CLIP
def test_openclip_without_checkpoint_says_how_to_enable(tmp_path):
    with pytest.raises(ConfigError, match="open_clip") as exc:
        OpenCLIPGlobal(tmp_path / "missing.pt")
    assert "checkpoint" in str(exc.value)
