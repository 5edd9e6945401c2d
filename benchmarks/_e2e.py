"""Shared pieces of the end-to-end and scaling benchmarks (``bench_train_step.py``, ``bench_retrieval_eval.py``,
``bench_scaling.py``). Not collected by pytest (no ``bench_`` prefix); imported by module name (pytest puts
this folder on ``sys.path`` when it collects the benchmark files).

Shapes are those of the Flickr8k feature folder written by ``python -m aahr_fast.prepare`` (``meta.json``
of ``/work/cache/flickr8k_prepared``): 49 "regions" (EfficientNet-Lite0 7x7 grid) x 1280, a 1280-d global
image vector, MiniLM token features 384-d, a 384-d sentence vector. Captions are padded to 32 tokens with
realistic lengths: round(Normal(17, 5)) clipped to [7, 32] (incl. [CLS]/[SEP]), as in
``bench_cross_similarity.py``.

Model presets:
* ``flickr8k_cpu``: the ``model`` section of the shipped ``aahr_fast/configs/flickr8k_cpu.yaml`` at width 256
  (``embed_dim`` pinned to 256, the width the published benchmark numbers were measured at; the shipped
  config trains at 512), 4 heads, K = 128 prototypes, queue 2048: the configuration trained on this CPU machine;
* ``paper``: :class:`aahr_fast.models.ModelConfig` defaults (the paper's Flickr30K widths: D = 1024,
  16 heads, K = 384, queue 2048).
Both with every warm-up start at 0 and the MoCo queues marked full, so one step runs every loss term
(base triplet, prototypes, instance graph, MoCo).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Optional

import pytest
import torch

from aahr_fast.models import ModelConfig, build_model

#: feature dims of the Flickr8k prepared folder (meta.json "dims").
FLICKR8K_DIMS = dict(region_dim=1280, img_global_dim=1280, token_dim=384, txt_global_dim=384)
N_REGIONS = 49
MAX_TOKENS = 32
PRESETS = ("flickr8k_cpu", "paper")
#: the expectation text of the training-step batch sweep ("train-B", bench_scaling.py; its B = 128 point is
#: the flickr8k_cpu CPU row of bench_train_step.py).
TRAIN_SWEEP_EXPECT = ("time between B (encoders, momentum encoders, prototypes, MoCo) and B^2 (relevance, graph, "
                      "triplet): the slope of the counted FLOPs; memory between 1 (activations) and 2 (reference "
                      "B^2 N L relevance scores)")


def train_sweep_info(batch_size: int) -> dict:
    """``extra_info["sweeps"]`` entry of a training-step row at ``batch_size`` (see bench_scaling.py)."""
    return {"train-B": dict(x_name="B", x=batch_size, expect=TRAIN_SWEEP_EXPECT)}


def model_config(preset: str = "flickr8k_cpu", **overrides) -> ModelConfig:
    """:class:`ModelConfig` of a preset (module docstring) with all warm-ups at step 0, plus ``overrides``.

    Raises ValueError for an unknown preset, ConfigError (from ``validate``) for bad overrides.
    """
    if preset == "flickr8k_cpu":
        from aahr_fast.config import load_config

        cfg = load_config("flickr8k_cpu").model
        overrides = {"embed_dim": 256, **overrides}
    elif preset == "paper":
        cfg = ModelConfig()
    else:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {PRESETS}")
    return dataclasses.replace(cfg, proto_start=0, graph_start=0, moco_start=0, **overrides).validate()


def caption_lengths(n: int, max_tokens: int = MAX_TOKENS, seed: int = 0) -> torch.Tensor:
    """(n,) int64 token counts: round(Normal(17, 5)) clipped to [min(7, max_tokens), max_tokens]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 5 + 17).round().clamp(min(7, max_tokens), max_tokens).to(torch.int64)


def random_batch(b: int, *, n_regions: int = N_REGIONS, max_tokens: int = MAX_TOKENS, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict:
    """A training batch dict (docs/DESIGN.md) of ``b`` random image-caption pairs, float32 features.

    All ``n_regions`` regions are valid (grid features); ``img_index`` = ``arange(b)`` (one caption per
    image in the batch, as in the GPO-style caption sampler for distinct images).
    """
    g = torch.Generator().manual_seed(seed)
    d = FLICKR8K_DIMS
    batch = dict(
        regions=torch.randn(b, n_regions, d["region_dim"], generator=g),
        region_lens=torch.full((b,), n_regions, dtype=torch.int64),
        img_global=torch.randn(b, d["img_global_dim"], generator=g),
        tokens=torch.randn(b, max_tokens, d["token_dim"], generator=g),
        token_lens=caption_lengths(b, max_tokens, seed + 1),
        txt_global=torch.randn(b, d["txt_global_dim"], generator=g),
        img_index=torch.arange(b),
        cap_index=torch.arange(b),
    )
    return {k: v.to(device) for k, v in batch.items()}


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work (timings of GPU rows); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TrainStep:
    """One optimiser step of the trainer (``aahr_fast/engine.py`` ``_train_step``, without AMP):
    zero_grad, ``model.training_step``, backward, global-norm clip 2.0, AdamW step,
    ``model.on_after_optimizer_step()`` (EMA of the key encoders + enqueue).

    Args: cfg: :class:`ModelConfig`; device; lr (5e-4, the flickr8k_cpu config). ``self(batch)``
    returns the loss parts dict. The MoCo queues are marked full at construction.
    """

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu", lr: float = 5e-4, seed: int = 0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = build_model(cfg, FLICKR8K_DIMS).to(self.device).train()
        for q in (getattr(self.model, "queue_v", None), getattr(self.model, "queue_t", None)):
            if q is not None:
                q.count.fill_(q.size)  # "filled once": the MoCo loss runs from the first timed step
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.model.param_groups(lr), lr=lr, weight_decay=1e-4)
        self.gen = torch.Generator().manual_seed(seed)
        self.step_no = 0

    def compile(self) -> "TrainStep":
        """Run the model's loss (``AAHR.training_losses``: encoders, prototypes, graph, MoCo; forward and, through
        AOTAutograd, backward) as one ``torch.compile(fullgraph=True)`` graph from now on; the optimiser, clip and
        EMA / enqueue stay eager. The negative sampling then draws from the global RNG."""
        self._loss_fn = torch.compile(lambda batch, step: self.model.training_losses(batch, step, None),
                                      fullgraph=True)
        # the step only gates the warm-ups (step >= start): clamped to the last start, it compiles once
        self._step_cap = max(self.model.start_of(k) for k in ("proto_start", "graph_start", "moco_start"))
        return self

    def __call__(self, batch: dict) -> dict:
        self.opt.zero_grad(set_to_none=True)
        if getattr(self, "_loss_fn", None) is not None:
            from aahr_fast.ops import value_checks

            self.model.prepare_step()
            with value_checks(False):
                out = self._loss_fn(batch, min(self.step_no, self._step_cap))
            out = {"loss": out["loss"], "parts": {k: float(v) for k, v in out["parts"].items()}}
        else:
            out = self.model.training_step(batch, self.step_no, self.gen)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.opt.step()
        self.model.on_after_optimizer_step()
        self.step_no += 1
        sync(self.device)
        return out["parts"]


@contextlib.contextmanager
def ops_backend_env(value: Optional[str]) -> Iterator[None]:
    """Set ``AAHR_OPS_BACKEND`` to ``value`` (None: unset, i.e. the default by device) for the block."""
    old = os.environ.get("AAHR_OPS_BACKEND")
    if value is None:
        os.environ.pop("AAHR_OPS_BACKEND", None)
    else:
        os.environ["AAHR_OPS_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AAHR_OPS_BACKEND", None)
        else:
            os.environ["AAHR_OPS_BACKEND"] = old


def default_backend(device: str | torch.device = "cpu", op: str = "fragment_word_relevance") -> str:
    """The backend the dispatcher picks for ``op`` on ``device`` with no argument and no environment
    override (``cpp`` on CPU when the extension builds, ``triton`` on CUDA, else ``reference``)."""
    from aahr_fast.ops import _dispatch

    with ops_backend_env(None):
        return _dispatch.resolve_backend(None, torch.zeros(1, device=device), op=op)


def mm_ceiling_now(m: int, n: int, k: int, repeats: int = 3) -> float:
    """GFLOP/s of one fp32 ``(m x k) @ (k x n)`` ``torch.mm`` measured now at the current thread count
    (median of ``repeats`` after one warm-up). Not cached, unlike ``bench_tools.mm_ceiling_gflops``: the
    end-to-end rows run for tens of seconds each, and the load of this shared machine changes between
    them, so each row's ceiling is measured right after the row."""
    import time

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        ts.append(time.perf_counter() - t0)
    return 2.0 * m * n * k / sorted(ts)[len(ts) // 2] / 1e9


def count_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of one call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmul / bmm / conv /
    attention aten ops, forward and backward). Custom C++ ops are not counted, so count a
    reference-backend call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return float(counter.get_total_flops())


_FLOPS: dict = {}


def step_flops(preset: str, batch_size: int, device: str = "cpu", max_counted: int = 256) -> float:
    """FLOPs of one reference-backend training step, counted by :func:`count_flops` (cached).

    Above ``max_counted`` (where the reference step's (B, B, L, N) relevance scores need gigabytes) the
    count is extrapolated exactly: every counted matmul of a step is linear in B (encoders, momentum
    encoders, prototypes, MoCo against the queue, GCN weights) or quadratic (region-word relevance,
    correlation, GCN adjacency, attention over 2B nodes, triplet similarities), so
    ``flops(B) = a B + b B^2`` with a, b from the counts at ``max_counted / 2`` and ``max_counted``.
    """
    key = (preset, batch_size, device)
    if key in _FLOPS:
        return _FLOPS[key]
    if batch_size > max_counted:
        b1, b2 = max_counted // 2, max_counted
        f1, f2 = step_flops(preset, b1, device, max_counted), step_flops(preset, b2, device, max_counted)
        b = (f2 / b2 - f1 / b1) / (b2 - b1)
        a = f1 / b1 - b * b1
        _FLOPS[key] = a * batch_size + b * batch_size ** 2
        return _FLOPS[key]
    step = TrainStep(model_config(preset), device)
    batch = random_batch(batch_size, device=device)
    with ops_backend_env("reference"):
        _FLOPS[key] = count_flops(step, batch)
    return _FLOPS[key]


def run_step_benchmark(benchmark, tools, *, group: str, preset: str, batch_size: int, mode: str, device: str,
                       threads: int, rounds: int, **extra) -> dict:
    """Time ``rounds`` training steps of one row (``mode`` = ``"reference"`` or ``"default"``), record
    memory / FLOP rate / ceiling fraction into ``extra_info`` (and the conftest summary). Returns the
    ``extra_info`` dict. Shared with ``bench_scaling.py``."""
    ref = mode in ("reference", "compiled-reference")
    backend = "reference" if ref else default_backend(device)
    if not ref and backend == "reference":
        pytest.skip(f"no fused backend on {device} here (the default resolves to the reference)")
    benchmark.group = group
    cfg = model_config(preset)
    flops = step_flops(preset, batch_size, device)
    step = TrainStep(cfg, device)
    compiled = mode.startswith("compiled")
    if compiled:
        torch._dynamo.reset()
        step.compile()
    batch = random_batch(batch_size, device=device)
    with ops_backend_env("reference" if ref else None):
        if compiled:
            step(batch)  # compilation (not timed)
        parts = step(batch)  # warm-up (extension load, allocator) + the parts check
        expected = {"base", "proto", "gnn", "moco", "total"}
        assert expected <= set(parts) and all(torch.isfinite(torch.tensor(list(parts.values())))), parts
        assert all(parts[k] != 0.0 for k in ("proto", "gnn", "moco")), f"a loss term did not run: {parts}"
        peak, _ = tools.peak_extra_bytes(step, batch) if device == "cpu" else (_cuda_peak(step, batch), None)
        benchmark.pedantic(step, args=(batch,), rounds=rounds, iterations=1, warmup_rounds=0)
    info = dict(backend=backend + ("-compiled" if compiled else ""), compiled=compiled, preset=preset, batch=batch_size, embed_dim=cfg.embed_dim, threads=threads,
                device=device, peak_extra_mib=peak / 2**20, step_gflop=flops / 1e9,
                loss_parts={k: round(v, 4) for k, v in parts.items()}, **extra)
    med = tools.median_seconds(benchmark)
    if med is not None:
        gf = tools.gflops(flops, med)
        info.update(gflops=gf)
        if device == "cpu":
            ceiling = mm_ceiling_now(batch_size * N_REGIONS, cfg.embed_dim, FLICKR8K_DIMS["region_dim"])
            info.update(frac_mm_ceiling=gf / ceiling, mm_ceiling_gflops=ceiling)
    tools.record(benchmark, group, info["backend"], **info)
    return info


def _cuda_peak(fn, *args) -> int:
    """Peak extra CUDA memory of one call (``torch.cuda`` allocator statistics)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
