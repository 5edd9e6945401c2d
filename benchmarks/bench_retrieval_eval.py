"""End-to-end evaluation benchmark: encode a test split with the model, then rank it (issue 6).

Run: ``.venv/bin/python -m pytest benchmarks/bench_retrieval_eval.py --benchmark-only`` (two to four
minutes on 2 shared cores; the 5K case dominates).

``bench_evaluation.py`` times the ranking of a given similarity matrix; this file times what an
evaluation of a trained model costs end to end: the model's encoders (eval mode, no_grad, batches of
500 = ``data.eval_batch_size`` of the flickr8k_cpu config) over random features of the Flickr8k
prepared shapes (49 x 1280 regions + 1280-d global per image; <= 32 x 384 tokens + 384-d sentence vector
per caption; stored as float16 like the prepared folder and converted per batch, as the collate does),
then the ``aahr_fast.evaluation`` ranking and R@K / medr / meanr / rsum.

Groups ``retrieval-1k-T*`` (1,000 images x 5,000 captions, Flickr 1K test / one COCO fold) and
``retrieval-5k-T*`` (5,000 x 25,000, COCO 5K), model preset ``flickr8k_cpu`` (``benchmarks/_e2e.py``).
Rows (the encoding is the same, the ranking differs):
* ``matrix``: the trainer's path (``aahr_fast/engine.py`` ``evaluate_model``): the full (N, M)
  ``similarity_matrix`` then ``recall_metrics`` (``base_row``: the report's ratios are against it);
* ``streamed``: ``rank_from_embeddings`` (row / column blocks, the (N, M) matrix never exists) then
  ``metrics_from_ranks``.

Timing: the 1K rows run one profiled call (memory) and then ``ROUNDS`` timed calls; the 5K rows run one
call, profiled and timed (``timed_call_profiled``: true; an encode of 5,000 + 25,000 items takes about 30 s
of CPU, so repeating it would double the suite's largest cost; the profiler's overhead is small for these
few large ops: compare ``profiled_call_s`` with the median on the 1K rows).

``extra_info``: ``peak_extra_mib`` (torch allocator, profiler events, measured on the profiled call; the
float16 feature store allocated before is not included), ``encode_s`` / ``rank_s`` (the split of that
call, wall seconds), ``profiled_call_s``, ``images``, ``captions``, ``embed_dim``, ``threads``, ``rsum`` (random
features: a sanity value, the same for both rows up to float ties), ``gflops`` (encoder FLOPs counted by
``FlopCounterMode`` on one batch and scaled, + the 2 N M D of the similarity) / median, and
``frac_mm_ceiling`` against one fp32 ``torch.mm`` of the encoders' largest GEMM (500*49 x 1280) @
(1280 x D) at the same thread count, measured right after the row (``_e2e.mm_ceiling_now``).
"""
from __future__ import annotations

import time

import pytest
import torch

import _e2e
from aahr_fast import evaluation as ev
from aahr_fast.models import build_model

BATCH = 500
CASES = {"1k": 1000, "5k": 5000}
ROUNDS = {"1k": 2, "5k": 1}
CAPS_PER_IMAGE = 5


class EncodedSplit:
    """Random float16 features of ``n`` images and ``5 n`` captions, and the model that encodes them."""

    def __init__(self, n: int, device: str = "cpu", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = _e2e.FLICKR8K_DIMS
        self.n, self.m, self.device = n, CAPS_PER_IMAGE * n, device
        self.regions = torch.empty(n, _e2e.N_REGIONS, d["region_dim"], dtype=torch.float16)
        for i in range(0, n, BATCH):  # chunked: no float32 copy of the whole store
            self.regions[i:i + BATCH] = torch.randn(self.regions[i:i + BATCH].shape, generator=g)
        self.img_global = torch.randn(n, d["img_global_dim"], generator=g).half()
        self.tokens = torch.empty(self.m, _e2e.MAX_TOKENS, d["token_dim"], dtype=torch.float16)
        for i in range(0, self.m, BATCH):
            self.tokens[i:i + BATCH] = torch.randn(self.tokens[i:i + BATCH].shape, generator=g)
        self.token_lens = _e2e.caption_lengths(self.m, seed=seed + 1)
        self.txt_global = torch.randn(self.m, d["txt_global_dim"], generator=g).half()
        self.caption_image = torch.arange(n).repeat_interleave(CAPS_PER_IMAGE)
        self.cfg = _e2e.model_config("flickr8k_cpu")
        torch.manual_seed(seed)
        self.model = build_model(self.cfg, _e2e.FLICKR8K_DIMS).to(device).eval()

    def image_batch(self, i: int) -> dict:
        r = self.regions[i:i + BATCH]
        return dict(regions=r.to(self.device, torch.float32),
                    region_lens=torch.full((r.shape[0],), _e2e.N_REGIONS, dtype=torch.int64, device=self.device),
                    img_global=self.img_global[i:i + BATCH].to(self.device, torch.float32))

    def text_batch(self, i: int) -> dict:
        return dict(tokens=self.tokens[i:i + BATCH].to(self.device, torch.float32),
                    token_lens=self.token_lens[i:i + BATCH].to(self.device),
                    txt_global=self.txt_global[i:i + BATCH].to(self.device, torch.float32))

    @torch.no_grad()
    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) image and (M, D) caption embeddings, float32 on the CPU (as ``engine.encode_split``)."""
        img = torch.cat([self.model.encode_images(self.image_batch(i)).float().cpu() for i in range(0, self.n, BATCH)])
        txt = torch.cat([self.model.encode_texts(self.text_batch(i)).float().cpu() for i in range(0, self.m, BATCH)])
        return img, txt

    def encoder_flops(self) -> float:
        """Encoder FLOPs of the whole split: one image batch and one caption batch counted, scaled."""
        with torch.no_grad():
            fi = _e2e.count_flops(self.model.encode_images, self.image_batch(0))
            ft = _e2e.count_flops(self.model.encode_texts, self.text_batch(0))
        return fi * self.n / min(BATCH, self.n) + ft * self.m / min(BATCH, self.m)


def rank(kind: str, img: torch.Tensor, txt: torch.Tensor, ci: torch.Tensor) -> dict:
    """R@K metrics of ``img @ txt.T`` by the ``matrix`` or ``streamed`` path (module docstring)."""
    if kind == "matrix":
        return ev.recall_metrics(ev.similarity_matrix(img, txt), ci)
    if kind == "streamed":
        return ev.metrics_from_ranks(*ev.rank_from_embeddings(img, txt, ci))
    raise ValueError(kind)


_SPLITS: dict = {}


def _split(case: str) -> EncodedSplit:
    if case not in _SPLITS:
        _SPLITS.clear()  # one store at a time (the 5K store is 1.2 GB of float16)
        _SPLITS[case] = EncodedSplit(CASES[case])
    return _SPLITS[case]


@pytest.mark.parametrize("kind", ["matrix", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_encode_and_rank(benchmark, bench_tools, threads, case, kind):
    t = bench_tools
    group = f"retrieval-{case}-T{threads}"
    benchmark.group = group
    split = _split(case)
    split.model.eval()
    timings = {}

    def first_call():
        t0 = time.perf_counter()
        img, txt = split.encode()
        t1 = time.perf_counter()
        out = rank(kind, img, txt, split.caption_image)
        timings.update(encode_s=t1 - t0, rank_s=time.perf_counter() - t1)
        return out

    def profiled_call():
        t0 = time.perf_counter()
        peak, metrics = t.peak_extra_bytes(first_call)
        timings.update(peak=peak, metrics=metrics, profiled_call_s=time.perf_counter() - t0)

    if ROUNDS[case] > 1:
        profiled_call()

        def run():
            img, txt = split.encode()
            return rank(kind, img, txt, split.caption_image)

        benchmark.pedantic(run, rounds=ROUNDS[case], iterations=1, warmup_rounds=0)
    else:  # single shot: the timed call is the profiled one (overhead: see profiled_call_s of the 1K rows)
        benchmark.pedantic(profiled_call, rounds=1, iterations=1, warmup_rounds=0)
    peak, metrics = timings["peak"], timings["metrics"]
    assert 0.0 <= metrics["rsum"] <= 600.0
    d = split.cfg.embed_dim
    info = dict(images=split.n, captions=split.m, embed_dim=d, threads=threads, peak_extra_mib=peak / 2**20,
                rsum=round(metrics["rsum"], 3), encode_s=round(timings["encode_s"], 3),
                rank_s=round(timings["rank_s"], 3), profiled_call_s=round(timings["profiled_call_s"], 3),
                timed_call_profiled=ROUNDS[case] == 1, base_row=kind == "matrix")
    med = t.median_seconds(benchmark)
    if med is not None:
        flops = split.encoder_flops() + 2.0 * split.n * split.m * d
        ceiling = _e2e.mm_ceiling_now(BATCH * _e2e.N_REGIONS, d, _e2e.FLICKR8K_DIMS["region_dim"])
        gf = t.gflops(flops, med)
        info.update(gflops=gf, frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    t.record(benchmark, group, kind, **info)
