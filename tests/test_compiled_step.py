"""The AAHR training step on the fused ops (issue 14 items 3-4): torch.compile(fullgraph=True) of the training
loss with zero graph breaks and results equal to eager; zero host reads during one fused training step."""
from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import pytest
import torch

import aahr_fast.ops as ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _e2e  # noqa: E402

B = 12


def _step(**overrides):
    cfg = _e2e.model_config("flickr8k_cpu", dropout=0.0, embed_dim=64, **overrides)
    return _e2e.TrainStep(cfg)


def _batch():
    b = _e2e.random_batch(B, max_tokens=11, seed=3)
    b["img_index"] = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])  # duplicate images: DWS positives > 1
    return b


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    out = fn(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_aahr_training_loss_compiles_fullgraph_zero_breaks_equal_to_eager(request, backend):
    """The whole AAHR training loss (encoders, prototypes, graph, MoCo) on the fused cpp ops: one graph, no
    break, and the same loss, parts and parameter gradients as eager (Dynamo + AOTAutograd; Inductor as well,
    marked slow: about 2-3 min of compilation on 2 shared cores)."""
    import torch._inductor.config as inductor_config

    patch = inductor_config.patch(fallback_random=True)  # same RNG stream as eager
    patch.__enter__()
    request.addfinalizer(lambda: patch.__exit__(None, None, None))
    step = _step()
    model, batch = step.model, _batch()
    model.prepare_step()

    def fn(batch):
        return model.training_losses(batch, 0, None)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(batch)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled_fn = torch.compile(fn, fullgraph=True, backend=counter)
    with ops.value_checks(False):
        eager, g_eager = _loss_and_grads(model, batch, fn)
        compiled, g_comp = _loss_and_grads(model, batch, compiled_fn)
        model.on_after_optimizer_step()  # enqueue: the queue counters move on the host
        compiled_fn(batch)
    assert counter.frame_count == 1, "a second step must not recompile"
    assert set(eager["parts"]) == {"base", "proto", "gnn", "moco", "total"}
    assert all(float(v) != 0.0 for v in eager["parts"].values()), eager["parts"]
    for k in eager["parts"]:
        torch.testing.assert_close(compiled["parts"][k], eager["parts"][k], rtol=1e-4, atol=1e-5)
    assert g_eager.keys() == g_comp.keys() and len(g_eager) > 10
    for n in g_eager:
        torch.testing.assert_close(g_comp[n], g_eager[n], rtol=1e-3, atol=1e-5, msg=n)


_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Patch the torch.Tensor methods that read values on the host; yields the list of (method, stack) hits."""
    hits: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name, orig):
        def f(self, *a, **k):
            hits.append(f"{name}: {traceback.format_stack(limit=3)[0].strip()}")
            return orig(self, *a, **k)
        return f

    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        yield hits
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def test_count_host_reads_sees_a_read():
    with count_host_reads() as hits:
        x = torch.ones(3)
        if x.sum() > 0:  # __bool__
            float(x[0])
    assert len(hits) == 2, hits


def test_fused_training_step_reads_nothing_on_the_host():
    """Forward, backward, gradient clipping and the momentum update / enqueue of one AAHR step on the fused
    cpp ops, inside value_checks(False) (the trainer validates lengths at collate): zero host reads."""
    step = _step()
    model, batch = step.model, _batch()
    assert _e2e.default_backend("cpu") == "cpp"
    step(batch)  # warm-up: extension build, host mirrors of the queue counters
    model.prepare_step()
    with ops.value_checks(False), count_host_reads() as hits:
        step.opt.zero_grad(set_to_none=True)
        out = model.training_losses(batch, 1, step.gen)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(step.params, 2.0)
        model.on_after_optimizer_step()
    assert hits == [], "\n".join(hits)
    # the same step reads the lengths when value checks are on (eager users keep their errors)
    with count_host_reads() as hits:
        model.training_losses(batch, 1, step.gen)
    assert hits, "value checks should read the lengths on the host"


def test_gpucheck_no_sync_guard_records_host_reads_on_cpu():
    from aahr_fast import gpucheck

    with gpucheck.no_sync_guard("cpu") as reads:
        torch.ones(2).sum().item()
    assert len(reads) == 1 and reads[0].startswith("item")
    torch.ones(1).item()  # restored


def test_gpucheck_compiled_step_runs_without_host_reads_on_cpu():
    """The CPU parts of gpucheck's compiled training step (the CUDA guard itself cannot run here)."""
    from aahr_fast import gpucheck

    report: dict = {}
    ok = gpucheck.compiled_step_check("cpu", True, report, compile_backend="aot_eager")
    row = report["compiled_step"]
    assert ok and row["status"] == "ok" and row["host_reads"] == [] and row["graph_breaks"] == 0, str(row)
    assert "compiled AAHR training step" in _tables(report)


def _tables(report):
    import io

    from aahr_fast import gpucheck

    full = dict(device="cpu", selftest=True, torch=torch.__version__, cuda=None, triton=None, budget_s=1.0, checks=[],
                speed=[], gallery=[], cuda_ext={"status": "not requested"}, notes="", **report)
    buf = io.StringIO()
    gpucheck.print_tables(full, out=buf)
    return buf.getvalue()
