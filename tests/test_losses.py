"""Losses of aahr_fast.models.losses on hand-computed cases and against loop references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from aahr_fast.models.losses import (dws_negative_probs, dws_triplet, dws_triplet_oneway, matching_loss,
                                     queue_infonce, vse_loss)
from aahr_fast.utils.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)   # tiny tensors; conftest restores the thread count


def _pairs_from_sim(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = I, b = sim^T so that a @ b^T == sim exactly."""
    n = sim.shape[0]
    return torch.eye(n, dtype=torch.float64), sim.t().clone().to(torch.float64)


# S[i, j] = image i vs caption j; ids: captions 0 and 1 belong to the same image
S = torch.tensor([[0.90, 0.80, 0.30],
                  [0.75, 0.60, 0.50],
                  [0.20, 0.35, 0.95]], dtype=torch.float64)
IDS = torch.tensor([0, 0, 1])


def test_hardest_negative_masks_duplicate_image_ids():
    a, b = _pairs_from_sim(S)
    # masked: only row 1 vs caption 2 violates: 0.2 + 0.5 - 0.6 = 0.1
    assert vse_loss(a, b, IDS, margin=0.2).item() == pytest.approx(0.1, abs=1e-9)
    # diagonal-only masking: i2t rows 0.1, 0.35, 0; t2i columns 0.05, 0.4, 0
    assert vse_loss(a, b, IDS, margin=0.2, mask_same_image=False).item() == pytest.approx(0.9, abs=1e-9)
    assert vse_loss(a, b, None, margin=0.2).item() == pytest.approx(0.9, abs=1e-9)


def test_sum_of_hinges_hand_case():
    a, b = _pairs_from_sim(S)
    assert vse_loss(a, b, IDS, margin=0.2, max_violation=False).item() == pytest.approx(0.1, abs=1e-9)
    # unmasked: row0 0.1; row1 0.35 + 0.1; col0 0.05; col1 0.4
    assert vse_loss(a, b, IDS, margin=0.2, max_violation=False, mask_same_image=False).item() == pytest.approx(1.0, abs=1e-9)


def _vse_loop(s, ids, margin, hardest):
    n = len(s)
    tot = 0.0
    for i in range(n):
        c_i2t = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if ids[j] != ids[i]]
        c_t2i = [max(0.0, margin + s[j][i] - s[i][i]) for j in range(n) if ids[j] != ids[i]]
        for c in (c_i2t, c_t2i):
            if c:
                tot += max(c) if hardest else sum(c)
    return tot


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 7), seed=st.integers(0, 10_000), hardest=st.booleans())
def test_vse_matches_loop_reference(n, seed, hardest):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    ids = torch.randint(0, max(n - 1, 1), (n,), generator=g)
    want = _vse_loop((a @ b.t()).tolist(), ids.tolist(), 0.2, hardest)
    assert vse_loss(a, b, ids, margin=0.2, max_violation=hardest).item() == pytest.approx(want, abs=1e-9)


def test_dws_probs_follow_the_formula():
    torch.manual_seed(1)
    a = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    s = a @ b.t()
    probs, has_neg = dws_negative_probs(s, ids, n=8, cutoff=1.7, min_dist=0.5)
    assert has_neg.all()
    for i in range(6):
        w = []
        for k in range(6):
            d = max(math.sqrt(max(2 - 2 * s[i, k].item(), 0.0)), 0.5)
            ok = ids[k] != ids[i] and d < 1.7
            w.append(math.exp((2 - 8) * math.log(d) - 2.5 * math.log(1 - d * d / 4)) if ok else 0.0)
        if sum(w) == 0:
            w = [float(ids[k] != ids[i]) for k in range(6)]
        want = [x / sum(w) for x in w]
        assert probs[i].tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert probs[i][ids == ids[i]].sum() == 0


def test_dws_triplet_hand_case_is_summed_both_ways():
    # image 0 / captions 0, 1 of the same image; item 2 another image. Every anchor has exactly one
    # negative within the cutoff (s > 1 - 1.7^2/2 = -0.445), so sampling is deterministic.
    sim = torch.tensor([[0.50, 0.40, 0.45],
                        [0.30, 0.60, 0.70],
                        [-0.90, 0.10, 0.80]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1])
    a, b = _pairs_from_sim(sim)
    g = torch.Generator().manual_seed(0)
    # image anchors over captions: (0,0),(0,1) -> neg caption 2; (1,0),(1,1) -> neg 2; (2,2) -> caption 1 (0 is beyond cutoff)
    i2t = (max(0, .2 + .45 - .5) + max(0, .2 + .45 - .4) + max(0, .2 + .7 - .3) + max(0, .2 + .7 - .6)
           + max(0, .2 + .1 - .8))
    # caption anchors over images (columns): caption 0 pos images 0,1 neg image 2 (s=-0.9, beyond cutoff
    # but the only negative -> uniform fallback); caption 1 same with s=0.1; caption 2 pos image 2, negs 0 (.45), 1 (.7)
    t2i_fixed = (max(0, .2 - .9 - .5) + max(0, .2 - .9 - .3) + max(0, .2 + .1 - .4) + max(0, .2 + .1 - .6))
    got = dws_triplet(a, b, ids, g, margin=0.2, n=4).item()
    # the last anchor samples image 0 (hinge 0) or image 1 (hinge 0.1)
    options = [i2t + t2i_fixed + max(0, .2 + .45 - .8), i2t + t2i_fixed + max(0, .2 + .7 - .8)]
    assert min(abs(got - o) for o in options) < 1e-9
    seen = {round(dws_triplet(a, b, ids, g, n=4).item(), 9) for _ in range(40)}  # n=4: both negatives likely
    assert seen == {round(o, 9) for o in options}


def test_dws_deterministic_and_expectation_matches_probs():
    torch.manual_seed(3)
    a = F.normalize(torch.randn(5, 8), dim=1)
    b = F.normalize(torch.randn(5, 8), dim=1)
    ids = torch.arange(5)
    l1 = dws_triplet(a, b, ids, torch.Generator().manual_seed(7))
    l2 = dws_triplet(a, b, ids, torch.Generator().manual_seed(7))
    assert l1.item() == l2.item()
    # averaged over many draws, the loss is the probs-weighted hinge
    s = a @ b.t()
    probs, _ = dws_negative_probs(s, ids)
    want = sum((probs[i, k] * max(0.0, 0.2 + s[i, k] - s[i, i])).item() for i in range(5) for k in range(5))
    g = torch.Generator().manual_seed(0)
    many = torch.stack([dws_triplet_oneway(a, b, ids, g) for _ in range(400)])
    stderr = many.std().item() / 400 ** 0.5
    assert abs(many.mean().item() - want) < 4 * stderr + 1e-4


def test_dws_gradients_flow_and_zero_when_no_negatives():
    a = F.normalize(torch.randn(4, 6), dim=1).requires_grad_()
    b = F.normalize(torch.randn(4, 6), dim=1).requires_grad_()
    loss = dws_triplet(a, b, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    loss.backward()
    loss2 = dws_triplet(a, b * 0.1, torch.arange(4), torch.Generator().manual_seed(0), margin=5.0)
    assert loss2.item() > 0
    loss2.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_infonce_masks_same_image_queue_keys():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    qids, kids = torch.tensor([5]), torch.tensor([5, 7, 5])
    tau = 0.1
    got = queue_infonce(q, k, queue, tau=tau, q_ids=qids, queue_ids=kids)
    want = math.log1p(math.exp((0.0 - 0.6) / tau))               # only queue row 1 (s = 0) is a negative
    assert got.item() == pytest.approx(want, rel=1e-4)
    unmasked = queue_infonce(q, k, queue, tau=tau, q_ids=qids, queue_ids=kids, mask_same_image=False)
    want_u = -math.log(math.exp(6) / (math.exp(6) + math.exp(10) + math.exp(0) + math.exp(8)))
    assert unmasked.item() == pytest.approx(want_u, rel=1e-4)


def test_infonce_mean_over_batch_and_bad_shapes():
    q = F.normalize(torch.randn(3, 4), dim=1)
    k = F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(5, 4), dim=1)
    full = queue_infonce(q, k, queue)
    rows = [queue_infonce(q[i:i + 1], k[i:i + 1], queue) for i in range(3)]
    assert full.item() == pytest.approx(sum(r.item() for r in rows) / 3, rel=1e-6)
    with pytest.raises(DataError, match="queue_infonce"):
        queue_infonce(q, k, torch.randn(5, 3))
    with pytest.raises(DataError, match="dws_triplet"):
        dws_triplet(q, k[:2], torch.arange(3), torch.Generator())
    with pytest.raises(ConfigError, match="unknown loss"):
        matching_loss("nope", q, k, torch.arange(3), torch.Generator())
