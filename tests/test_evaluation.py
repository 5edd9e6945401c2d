"""Tests of aahr_fast.evaluation: ranks, R@K / medr / meanr / rsum, protocols, chunking, ECCV Caption.

Expected values come from hand-computed cases and from an independent brute-force reference that
sorts every row / column with the documented pessimistic tie rule (tied non-GT items first).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aahr_fast import evaluation as ev
from aahr_fast.utils.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _one_thread():
    """The suite shares 2 cores; conftest restores the thread count afterwards."""
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# independent reference: explicit sort with the pessimistic tie rule


def ref_ranks(sims: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, m = sims.shape
    i2t = np.empty(n, dtype=np.int64)
    for i in range(n):
        gt = caption_image == i
        # descending score; among equal scores non-GT (False) before GT (True)
        order = sorted(range(m), key=lambda c: (-sims[i, c], bool(gt[c])))
        i2t[i] = min(pos for pos, c in enumerate(order) if gt[c])
    t2i = np.empty(m, dtype=np.int64)
    for c in range(m):
        g = caption_image[c]
        order = sorted(range(n), key=lambda j: (-sims[j, c], j == g))
        t2i[c] = order.index(g)
    return i2t, t2i


def ref_metrics(i2t: np.ndarray, t2i: np.ndarray, ks=(1, 5, 10)) -> dict:
    out, rsum = {}, 0.0
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * np.mean(r < k)
            rsum += out[f"{name}_r{k}"]
        out[f"{name}_medr"] = math.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = rsum
    return out


def assert_metrics_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


# ------------------------------------------------------------------------------------------------
# hand-computed cases


def test_i2t_best_of_five_hand_case():
    # 2 images x 10 captions; image 0 owns captions 0-4, image 1 owns 5-9.
    s = np.zeros((2, 10), dtype=np.float32)
    # image 0: non-GT captions 5, 6 score above every GT caption; best GT is caption 3 (0.7)
    s[0] = [0.1, 0.2, 0.3, 0.7, 0.0, 0.9, 0.8, 0.05, 0.01, 0.02]
    # image 1: its GT caption 9 is the very best
    s[1] = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.99]
    ci = np.repeat(np.arange(2), 5)
    assert ev.i2t_ranks(s, ci).tolist() == [2, 0]


def test_t2i_rank_hand_case():
    # 3 images x 3 captions, caption c belongs to image c.
    s = np.array([[0.9, 0.1, 0.5],
                  [0.2, 0.8, 0.6],
                  [0.3, 0.7, 0.4]], dtype=np.float32)
    ci = np.array([0, 1, 2])
    # caption 0: image 0 best -> 0; caption 1: image 1 (0.8) best -> 0; caption 2: 0.6, 0.5 above 0.4 -> 2
    assert ev.t2i_ranks(s, ci).tolist() == [0, 0, 2]
    i2t, t2i = ev.compute_ranks(s, ci)
    assert i2t.tolist() == [0, 0, 1] and t2i.tolist() == [0, 0, 2]


def test_medr_meanr_recall_from_ranks_hand_case():
    i2t = np.array([0, 3, 1, 10])          # median 2.0 -> medr 3; mean 3.5 -> meanr 4.5
    t2i = np.array([0, 0, 1, 4, 5, 20, 7])  # median 4 -> medr 5; mean 37/7 -> meanr 44/7
    m = ev.metrics_from_ranks(i2t, t2i)
    assert m["i2t_r1"] == 25.0 and m["i2t_r5"] == 75.0 and m["i2t_r10"] == 75.0
    assert m["i2t_medr"] == 3.0 and m["i2t_meanr"] == 4.5
    assert m["t2i_r1"] == pytest.approx(200 / 7) and m["t2i_r5"] == pytest.approx(400 / 7)
    assert m["t2i_r10"] == pytest.approx(600 / 7)
    assert m["t2i_medr"] == 5.0 and m["t2i_meanr"] == pytest.approx(44 / 7)
    assert m["rsum"] == pytest.approx(25 + 75 + 75 + 1200 / 7)
    # even count with a fractional median: floor(median) + 1
    assert ev.metrics_from_ranks([0, 1], [2, 5])["t2i_medr"] == 4.0  # median 3.5 -> 3 + 1


def test_recall_metrics_matches_reference_on_standard_layout():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(20, 100, generator=g)
    ci = np.repeat(np.arange(20), 5)
    s[ci, np.arange(100)] += 1.5  # some signal, far from 0 and 100
    ref = ref_metrics(*ref_ranks(s.numpy(), ci))
    got = ev.recall_metrics(s, ci)
    assert_metrics_equal(got, ref)
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


# ------------------------------------------------------------------------------------------------
# ties


def test_constant_matrix_scores_zero_recall_at_1():
    n, m = 20, 100
    s = torch.full((n, m), 0.25)
    ci = torch.arange(n).repeat_interleave(5)
    i2t, t2i = ev.compute_ranks(s, ci)
    assert (i2t == m - 5).all()  # every non-GT caption is tied and counted above
    assert (t2i == n - 1).all()
    met = ev.recall_metrics(s, ci)
    assert met["i2t_r1"] == 0.0 and met["t2i_r1"] == 0.0
    assert met["rsum"] == 0.0  # ranks 95 and 19 are >= 10


def test_tie_rule_tied_gt_does_not_push_down_tied_non_gt_does():
    ci = np.array([0, 0, 1])
    # image 0: both GT captions tied at the top, nothing else as high -> rank 0
    # image 1: its GT caption (2) ties with non-GT caption 0 -> rank 1
    s = np.array([[0.9, 0.9, 0.1],
                  [0.5, 0.2, 0.5]], dtype=np.float32)
    assert ev.i2t_ranks(s, ci).tolist() == [0, 1]
    # caption 0: image 0 (0.9) vs image 1 (0.5) -> 0; caption 2: image 1 0.5 vs image 0 0.1 -> 0
    assert ev.t2i_ranks(s, ci).tolist() == [0, 0, 0]
    s2 = np.array([[0.5, 0.3], [0.5, 0.3]], dtype=np.float32)  # caption 0's image 0 tied with image 1
    assert ev.t2i_ranks(s2, np.array([0, 1])).tolist() == [1, 1]


# ------------------------------------------------------------------------------------------------
# variable captions per image, column order, chunking, dtypes, property test


def _variable_layout(rng: np.random.Generator, n: int, lo: int = 5, hi: int = 7):
    counts = rng.integers(lo, hi + 1, size=n)
    ci = np.repeat(np.arange(n), counts)
    rng.shuffle(ci)  # captions of one image are not contiguous
    return ci


def test_variable_captions_per_image_matches_reference():
    rng = np.random.default_rng(2)
    ci = _variable_layout(rng, 12)
    s = rng.integers(0, 6, size=(12, ci.size)).astype(np.float32)  # many ties
    s[ci, np.arange(ci.size)] += 2.0
    i2t, t2i = ev.compute_ranks(s, ci)
    ri, rt = ref_ranks(s, ci)
    np.testing.assert_array_equal(i2t.numpy(), ri)
    np.testing.assert_array_equal(t2i.numpy(), rt)
    assert_metrics_equal(ev.recall_metrics(s, ci), ref_metrics(ri, rt))


def test_grouping_is_by_caption_image_not_by_five_consecutive():
    # 2 images; image 0 has 2 captions, image 1 has 8. "5 consecutive" grouping would be wrong.
    ci = np.array([0, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    s = np.zeros((2, 10), dtype=np.float32)
    s[0, 4] = 1.0   # image 0's best caption is its own caption 4 -> rank 0
    s[1, 0] = 1.0   # image 1's top caption is image 0's -> its best GT is second
    s[1, 9] = 0.5
    assert ev.i2t_ranks(s, ci).tolist() == [0, 1]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, None])
def test_chunked_equals_unchunked(chunk):
    rng = np.random.default_rng(3)
    ci = _variable_layout(rng, 40, 1, 6)
    s = torch.from_numpy(rng.integers(0, 8, size=(40, ci.size)).astype(np.float32))
    full = ev.compute_ranks(s, ci, chunk_size=10**9)
    got = ev.compute_ranks(s, ci, chunk_size=chunk)
    assert torch.equal(full[0], got[0]) and torch.equal(full[1], got[1])
    assert ev.recall_metrics(s, ci, chunk_size=chunk) == ev.recall_metrics(s, ci, chunk_size=10**9)


def test_count_true_matches_sum_across_uint8_group_boundaries():
    rng = np.random.default_rng(4)
    for shape in [(1, 1), (3, 254), (2, 255), (600, 3), (5, 1021), (300, 300)]:
        mask = torch.from_numpy(rng.random(shape) < 0.9)
        for dim in (0, 1):
            assert torch.equal(ev._count_true(mask, dim), mask.sum(dim).to(torch.int32))
    ones = torch.ones(1000, 2, dtype=torch.bool)  # >255 per output: no uint8 overflow
    assert ev._count_true(ones, 0).tolist() == [1000, 1000]


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_dtypes_and_numpy_input(dtype):
    rng = np.random.default_rng(5)
    ci = np.repeat(np.arange(8), 3)
    s = rng.integers(-5, 5, size=(8, 24)).astype(dtype)
    ri, rt = ref_ranks(s.astype(np.float64), ci)
    i2t, t2i = ev.compute_ranks(s, ci)
    np.testing.assert_array_equal(i2t.numpy(), ri)
    np.testing.assert_array_equal(t2i.numpy(), rt)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    levels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    chunk=st.sampled_from([1, 2, None]),
)
def test_ranks_match_bruteforce_property(counts, levels, seed, chunk):
    rng = np.random.default_rng(seed)
    ci = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(ci)
    s = rng.integers(0, levels, size=(len(counts), ci.size)).astype(np.float32)
    i2t, t2i = ev.compute_ranks(s, ci, chunk_size=chunk)
    ri, rt = ref_ranks(s, ci)
    np.testing.assert_array_equal(i2t.numpy(), ri)
    np.testing.assert_array_equal(t2i.numpy(), rt)


# ------------------------------------------------------------------------------------------------
# embeddings


def test_similarity_matrix_chunked_is_plain_dot_product():
    g = torch.Generator().manual_seed(6)
    img, txt = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    full = img @ txt.T
    for chunk in (1, 5, 1024):
        s = ev.similarity_matrix(img, txt, chunk_size=chunk)
        assert s.dtype == torch.float32 and s.shape == (37, 101)
        torch.testing.assert_close(s, full, rtol=1e-5, atol=1e-5)
    s64 = ev.similarity_matrix(img.double().numpy(), txt.double().numpy())
    torch.testing.assert_close(s64, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_rank_from_embeddings_equals_matrix_ranks(chunk):
    # integer-valued embeddings: every dot product is exact, so both paths must agree bit for bit,
    # including the many ties
    rng = np.random.default_rng(7)
    ci = _variable_layout(rng, 15, 1, 5)
    img = torch.from_numpy(rng.integers(-2, 3, size=(15, 6)).astype(np.float32))
    txt = torch.from_numpy(rng.integers(-2, 3, size=(ci.size, 6)).astype(np.float32))
    want = ev.compute_ranks(ev.similarity_matrix(img, txt), ci)
    got = ev.rank_from_embeddings(img, txt, ci, chunk_size=chunk)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_embedding_errors():
    with pytest.raises(DataError, match="dimension 4 but txt_emb has 5"):
        ev.similarity_matrix(torch.zeros(2, 4), torch.zeros(3, 5))
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(DataError, match="txt_emb: row 1"):
        ev.rank_from_embeddings(torch.zeros(2, 4), bad, [0, 1, 1])


# ------------------------------------------------------------------------------------------------
# protocols


def _five_fold_case(n=50, seed=8):
    g = torch.Generator().manual_seed(seed)
    ci = torch.arange(n).repeat_interleave(5)
    s = torch.randn(n, 5 * n, generator=g)
    s[ci, torch.arange(5 * n)] += 1.0
    return s, ci


def test_coco_5fold_is_mean_of_independent_folds():
    s, ci = _five_fold_case()
    mean, folds = ev.evaluate_coco_5fold(s, ci, return_folds=True)
    per_fold = []
    for f in range(5):
        sub = s[10 * f : 10 * f + 10, 50 * f : 50 * f + 50].numpy().copy()
        per_fold.append(ref_metrics(*ref_ranks(sub, np.repeat(np.arange(10), 5))))
    for f in range(5):
        assert_metrics_equal(folds[f], per_fold[f])
    for k in mean:
        assert mean[k] == pytest.approx(np.mean([p[k] for p in per_fold]), abs=1e-9), k
    assert mean["rsum"] == pytest.approx(np.mean([p["rsum"] for p in per_fold]))
    # the folds see a 10-image gallery: easier than the 50-image matrix
    assert mean["rsum"] > ev.evaluate_coco_5k(s, ci)["rsum"]


def test_coco_5fold_groups_shuffled_variable_captions_by_image():
    rng = np.random.default_rng(9)
    ci = _variable_layout(rng, 20)
    s = rng.standard_normal((20, ci.size)).astype(np.float32)
    s[ci, np.arange(ci.size)] += 1.0
    mean = ev.evaluate_coco_5fold(s, ci)
    per = []
    for f in range(5):
        cols = np.nonzero((ci >= 4 * f) & (ci < 4 * f + 4))[0]
        per.append(ref_metrics(*ref_ranks(s[4 * f : 4 * f + 4][:, cols], ci[cols] - 4 * f)))
    for k in mean:
        assert mean[k] == pytest.approx(np.mean([p[k] for p in per]), abs=1e-9), k


def test_evaluate_protocol_dispatch():
    s, ci = _five_fold_case()
    whole = ev.recall_metrics(s, ci)
    assert ev.evaluate_protocol(s, ci, "1k") == whole == ev.evaluate_protocol(s, ci, "5k")
    assert ev.evaluate_protocol(s, ci, "coco5fold") == ev.evaluate_coco_5fold(s, ci)
    with pytest.raises(ConfigError, match="protocol"):
        ev.evaluate_protocol(s, ci, "coco1k")
    with pytest.raises(DataError, match="5 equal folds"):
        ev.evaluate_coco_5fold(s[:48, :240], ci[:240])


def test_custom_ks():
    s, ci = _five_fold_case()
    m = ev.recall_metrics(s, ci, ks=(1, 50))
    assert set(m) == {"i2t_r1", "i2t_r50", "i2t_medr", "i2t_meanr",
                      "t2i_r1", "t2i_r50", "t2i_medr", "t2i_meanr", "rsum"}
    assert_metrics_equal(m, ref_metrics(*ref_ranks(s.numpy(), ci.numpy()), ks=(1, 50)))
    assert m["i2t_r50"] >= m["i2t_r1"]
    with pytest.raises(ConfigError, match="ks"):
        ev.recall_metrics(s, ci, ks=(0, 5))


# ------------------------------------------------------------------------------------------------
# input errors


def test_mismatch_errors():
    s = np.zeros((4, 20), dtype=np.float32)
    good = np.repeat(np.arange(4), 5)
    with pytest.raises(DataError, match="19 entries but sims has 20 caption columns"):
        ev.recall_metrics(s, good[:19])
    with pytest.raises(DataError, match="transposed"):
        ev.recall_metrics(s.T, good)
    bad = good.copy()
    bad[7] = 4
    with pytest.raises(DataError, match=r"caption_image\[7\] = 4"):
        ev.recall_metrics(s, bad)
    with pytest.raises(DataError, match="caption_image"):
        ev.recall_metrics(s, good - 1)
    # SCAN one-row-per-caption images without im_div: 20 image rows, only 4 own captions
    with pytest.raises(DataError, match="image row 4 has no caption"):
        ev.recall_metrics(np.zeros((20, 20), dtype=np.float32), good)
    with pytest.raises(DataError, match="integer"):
        ev.recall_metrics(s, good.astype(np.float32))
    with pytest.raises(DataError, match="2-D"):
        ev.recall_metrics(np.zeros(20), good)
    with pytest.raises(DataError, match="real"):
        ev.recall_metrics(s.astype(bool), good)
    with pytest.raises(ConfigError, match="chunk_size"):
        ev.recall_metrics(s, good, chunk_size=0)
    assert isinstance(DataError("x"), ValueError)


def test_nan_is_reported_with_its_position():
    s = np.zeros((4, 20), dtype=np.float32)
    ci = np.repeat(np.arange(4), 5)
    s[2, 13] = np.nan  # not a GT entry of caption 13 (image 2 owns 10-14: it is GT) -> gt check
    with pytest.raises(DataError, match=r"sims\[2, 13\] is NaN"):
        ev.recall_metrics(s, ci)
    s[2, 13] = 0
    s[3, 1] = np.nan  # non-GT entry
    with pytest.raises(DataError, match=r"sims\[3, 1\] is NaN"):
        ev.recall_metrics(s, ci, chunk_size=1)
    s[3, 1] = 0
    s[0, 0], s[1, 0] = np.inf, -np.inf  # +inf and -inf but no NaN: valid scores
    assert ev.t2i_ranks(s, ci)[0] == 0


# ------------------------------------------------------------------------------------------------
# table


def test_format_table():
    m = ev.metrics_from_ranks([0, 0, 3, 20], [0, 1, 1, 30, 2, 2, 9, 9])
    out = ev.format_table(m, title="test")
    lines = out.splitlines()
    assert lines[0] == "test"
    assert "Image-to-text" in lines[1] and "Text-to-image" in lines[1]
    assert lines[2].split() == ["R@1", "R@5", "R@10", "|", "R@1", "R@5", "R@10", "|", "rsum"]
    assert lines[3].split() == ["50.0", "75.0", "75.0", "|", "12.5", "62.5", "87.5", "|", "362.5"]
    assert "medr" in lines[4]
    with pytest.raises(DataError, match="i2t_r"):
        ev.format_table({"rsum": 1.0})


# ------------------------------------------------------------------------------------------------
# ECCV Caption


def test_coco_test_ids_from_package():
    caps = ev.coco_test_caption_ids()
    cap_img = ev.coco_test_caption_image_ids()
    imgs = ev.coco_test_image_ids()
    assert caps.shape == (25000,) and caps.dtype == np.int64 and np.unique(caps).size == 25000
    assert cap_img.shape == (25000,) and imgs.shape == (5000,) and np.unique(imgs).size == 5000
    np.testing.assert_array_equal(np.repeat(imgs, 5), cap_img)
    caps[0] = -1  # copies: the cache is not mutated
    assert ev.coco_test_caption_ids()[0] != -1


def test_top_items_is_a_stable_descending_argsort_prefix():
    rng = np.random.default_rng(10)
    for levels in (3, 1000):
        blk = torch.from_numpy(rng.integers(0, levels, size=(9, 57)).astype(np.float32))
        want = torch.argsort(blk, dim=1, descending=True, stable=True)
        for k in (1, 4, 30, 57):
            assert torch.equal(ev._top_items(blk, k), want[:, :k])


def test_compact_ranked_lists_are_exact_subsequences_of_the_full_ranking():
    rng = np.random.default_rng(11)
    s = torch.from_numpy(rng.integers(0, 40, size=(13, 90)).astype(np.float32))
    item_fold = torch.from_numpy(rng.integers(0, 5, size=90).astype(np.int8))
    q, items = list(range(100, 113)), list(range(1000, 1090))
    full = ev._ranked_lists(s, q, items, None, None, 0, None, by_rows=True)
    compact = ev._ranked_lists(s, q, items, 7, item_fold, 3, 5, by_rows=True)
    fold_of = {items[j]: int(item_fold[j]) for j in range(90)}
    for key in q:
        f, c = full[key], compact[key]
        assert len(f) == 90 and len(set(f)) == 90
        assert c[:7] == f[:7]  # global prefix
        it = iter(f)
        assert all(x in it for x in c)  # subsequence (same relative order)
        for fold in range(5):  # each fold's first 3 in the full ranking are present, same order
            assert [x for x in c if fold_of[x] == fold][:3] == [x for x in f if fold_of[x] == fold][:3]
    # columns (t2i side)
    full_t = ev._ranked_lists(s, items, q, None, None, 0, None, by_rows=False)
    assert len(full_t[1000]) == 13
    np.testing.assert_array_equal(
        [q.index(x) for x in full_t[1000]], torch.argsort(s[:, 0], descending=True, stable=True).numpy()
    )


def test_ranked_lists_report_nan_position_on_both_sides():
    s = torch.zeros(6, 9)
    s[4, 7] = float("nan")
    for by_rows in (True, False):
        q = list(range(6)) if by_rows else list(range(9))
        items = list(range(9)) if by_rows else list(range(6))
        with pytest.raises(DataError, match=r"sims\[4, 7\] is NaN"):
            ev._ranked_lists(s, q, items, 3, None, 0, 2, by_rows=by_rows)


def _coco5k_base(seed: int) -> torch.Tensor:
    """(5000, 25000) int32 scores, even, < 2**27 (no tie with the odd scores given to GT pairs)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2**26, (5000, 25000), generator=g, dtype=torch.int32)
    return s.mul_(2)


def _pos(ids: np.ndarray) -> dict:
    return {int(x): i for i, x in enumerate(ids)}


@pytest.fixture(scope="module")
def eccv_oracle():
    """Scores from the package's own id mapping: COCO GT pairs >> ECCV i2t positives >> ECCV t2i
    positives >> noise, so COCO recalls and ECCV R@1 must be 100 in both directions."""
    met = ev._new_eccv_metrics()
    img, cap = ev.coco_test_image_ids(), ev.coco_test_caption_ids()
    ip, cp = _pos(img), _pos(cap)
    s = _coco5k_base(0)
    w = 2**27
    ci = torch.arange(5000).repeat_interleave(5)
    s[ci, torch.arange(25000)] += 4 * w + 1
    rows, cols = [], []
    for q, v in met.eccv_gts["i2t"].items():
        for c in v:
            if c in cp:  # 2 ECCV positives are outside the 25,000 test captions
                rows.append(ip[q])
                cols.append(cp[c])
    s[rows, cols] += 2 * w
    rows = [ip[q] for c, v in met.eccv_gts["t2i"].items() for q in v]
    cols = [cp[c] for c, v in met.eccv_gts["t2i"].items() for q in v]
    s[rows, cols] += w
    return s, img, cap


def test_eccv_oracle_scores_100(eccv_oracle):
    s, img, cap = eccv_oracle
    # the default targets plus eccv_recalls (which eccv_caption 0.1.0 drops when mAP@R is requested)
    r = ev.eccv_metrics(s, img, cap, top_k=100, target_metrics=ev.ECCV_DEFAULT_METRICS + ("eccv_recalls",))
    assert set(r) == {"eccv_map_at_r", "eccv_rprecision", "eccv_r1", "eccv_r5", "eccv_r10", "coco_1k_r1",
                      "coco_1k_r5", "coco_1k_r10", "coco_5k_r1", "coco_5k_r5", "coco_5k_r10"}
    for key in ("eccv_r1", "eccv_r5", "eccv_r10", "coco_1k_r1", "coco_1k_r5", "coco_1k_r10", "coco_5k_r1",
                "coco_5k_r5", "coco_5k_r10"):
        assert r[key] == {"i2t": 100.0, "t2i": 100.0}, key
    # mAP@R is not exactly 100: two ECCV positives are not in the test gallery
    assert r["eccv_map_at_r"]["i2t"] > 99.0 and r["eccv_map_at_r"]["t2i"] == 100.0
    assert "eccv_r1" in ev.format_eccv_table(r)


def test_eccv_shuffled_ids_score_low_and_input_errors(eccv_oracle):
    s, img, cap = eccv_oracle
    perm = np.random.default_rng(12).permutation(25000)
    r = ev.eccv_metrics(s, img, cap[perm], top_k=60, target_metrics=("eccv_r1", "coco_5k_r1"))
    assert set(r) == {"eccv_r1", "coco_5k_r1"}
    assert r["coco_5k_r1"]["i2t"] < 2 and r["coco_5k_r1"]["t2i"] < 2
    assert r["eccv_r1"]["i2t"] < 5 and r["eccv_r1"]["t2i"] < 5
    with pytest.raises(ConfigError, match="top_k=20 is shorter"):
        ev.eccv_metrics(s, img, cap, top_k=20)
    with pytest.raises(DataError, match="image_ids: [0-9]+ of the 5000 COCO i2t query ids are missing"):
        ev.eccv_metrics(s, np.arange(5000), cap, top_k=100)
    dup = img.copy()
    dup[1] = dup[0]
    with pytest.raises(DataError, match="unique"):
        ev.eccv_metrics(s, dup, cap, top_k=100)
    with pytest.raises(DataError, match="25000 ids"):
        ev.eccv_metrics(s, img, cap[:100], top_k=100)
    with pytest.raises(ConfigError, match="pmrp"):
        ev.eccv_metrics(s, img, cap, target_metrics=("pmrp",))


def test_eccv_coco_recalls_agree_with_our_protocols():
    """The package's COCO 5K / 1K recalls (its own fold logic, from our ranked lists) equal our
    evaluate_coco_5k / evaluate_coco_5fold on a mid-signal matrix without GT/non-GT ties."""
    s = _coco5k_base(1)
    ci = torch.arange(5000).repeat_interleave(5)
    s[ci, torch.arange(25000)] += 53687090 + 1  # +0.4 of the noise range; odd: GT never ties non-GT
    img, cap = ev.coco_test_image_ids(), ev.coco_test_caption_ids()
    r = ev.eccv_metrics(s, img, cap, top_k=48, target_metrics=("coco_1k_recalls", "coco_5k_recalls"))
    ours5k = ev.evaluate_coco_5k(s, ci)
    ours1k = ev.evaluate_coco_5fold(s, ci)
    for k in (1, 5, 10):
        for d in ("i2t", "t2i"):
            assert r[f"coco_5k_r{k}"][d] == pytest.approx(ours5k[f"{d}_r{k}"], abs=1e-9)
            assert r[f"coco_1k_r{k}"][d] == pytest.approx(ours1k[f"{d}_r{k}"], abs=1e-9)
    assert 5 < ours5k["i2t_r1"] < 95 and 5 < ours5k["t2i_r1"] < 95  # a non-trivial case


def test_coco_protocols_warn_when_the_gallery_is_not_5k():
    """coco5fold / 5k on a gallery other than 5,000 images still run but warn (numbers not comparable)."""
    import warnings as _w

    from aahr_fast.evaluation import evaluate_protocol

    sims = torch.eye(10).repeat_interleave(5, dim=1)  # 10 images x 50 captions, GT scores highest
    caption_image = torch.arange(10).repeat_interleave(5)
    with pytest.warns(UserWarning, match="expected 5,000"):
        evaluate_protocol(sims, caption_image, "coco5fold")
    with pytest.warns(UserWarning, match="expected 5,000"):
        evaluate_protocol(sims, caption_image, "5k")
    with _w.catch_warnings():
        _w.simplefilter("error")
        assert evaluate_protocol(sims, caption_image, "1k")["i2t_r1"] == 100.0
