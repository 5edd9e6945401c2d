"""Trace every ``aahr::*_triton`` operator as ``torch.compile`` does, on a CPU-only machine (run as a script).

Run with ``TRITON_INTERPRET`` unset or ``0``: the operators are then ``torch.library.triton_op``s, and the
launchers pick their GPU launch configurations. Each forward and backward operator is called on fake tensors
(``FakeTensorMode``: nothing runs, no GPU needed) under ``make_fx`` + functionalization, which is the
decomposition AOTAutograd applies before Inductor. The fake tensors are CPU tensors: fake *CUDA* tensors
trace too, but on a CPU-only torch build every Python tensor indexing (``x[:b]``) inside the body fails
(``PyTorch is not linked with support for cuda devices``, a device guard), which a CUDA build does not do.
The operator bodies do not check the device (the public entry points do), so the graph is the one a CUDA
input gives, with the same kernels, grids and constexprs.
Prints one JSON object: operator -> {"kernels": number of ``triton_kernel_wrapper_functional`` nodes,
"aahr": number of ``aahr::`` calls left in the graph (0 = decomposed), "noted_kernels": kernels recorded for
AOTAutograd's cache key (``_library.note_triton_kernels``), "outputs": [[shape, dtype], ...] of
the traced body, "fake": the same from the registered fake}. Kernel mutation analysis needs a GPU driver;
without one torch assumes every tensor argument is written (a warning per launch, silenced here).
"""
from __future__ import annotations

import json
import logging
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
from torch._library.triton import get_triton_kernels_for_op  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch._subclasses.functional_tensor import dispatch_functionalize  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

import aahr_fast.kernels.correlation  # noqa: E402,F401  (each kernel module registers its family)
import aahr_fast.kernels.cross_similarity  # noqa: E402,F401
import aahr_fast.kernels.message_passing  # noqa: E402,F401
import aahr_fast.kernels.prototypes  # noqa: E402,F401
from aahr_fast.ops import _triton_glue as tg  # noqa: E402
from aahr_fast.ops._library import registration_kind  # noqa: E402


def cases(mode: FakeTensorMode) -> list[tuple[object, tuple]]:
    """(operator, args) for every triton forward and backward operator, fake CUDA tensors, odd shapes."""
    with mode:
        def f(*shape, dtype=torch.float32):
            return torch.empty(shape, device="cpu", dtype=dtype)

        r, w = f(3, 5, 7), f(4, 6, 7)
        rl, wl = f(3, dtype=torch.int64), f(4, dtype=torch.int64)
        v, t = f(5, 6), f(5, 6)
        n = 5
        return [
            (tg.cross_similarity_op, (r, rl, w, wl, "relevance", 0.1, 1e-8, 1.0)),
            (tg.cross_similarity_backward_op, (f(4, 3), f(3, 4), r, rl, w, wl, "relevance", 0.1, 1e-8, 1.0,
                                               [True, True])),
            (tg.intra_relevance_op, (v, 0.7)),
            (tg.intra_relevance_backward_op, (f(5, 5), v, f(1, 5, 5), 0.7)),
            (tg.topk_connection_op, (f(5, 5), 2)),
            (tg.instance_correlation_op, (v, t, f(5, 5), f(5, 5), 0.7, 2, 0.5)),
            (tg.instance_correlation_backward_op, (f(10, 10), f(10, 10), v, t, f(10, 10, dtype=torch.bool),
                                                   f(2, 5, 5), 0.7, 0.5, [True, True])),
            (tg.gcn_layer_op, (f(5, 5), f(5, 4), f(4, 3), f(3), 0.2)),
            (tg.gcn_layer_backward_op, (f(5, 3), f(5, 5), f(5, 4), f(4, 3), f(5, 3), f(5, 3), 0.2, True,
                                        [True, True, True, True])),
            (tg.masked_attention_op, (f(2, n, 3), f(2, n, 3), f(2, n, 3), f(n, n))),
            (tg.masked_attention_backward_op, (f(2, n, 3), f(2, n, 3), f(2, n, 3), f(2, n, 3), f(n, n), f(2, n, 3),
                                               f(2, n), [True, True, True, True])),
            (tg.sinkhorn_op, (f(6, 5), 0.1, 3)),
            (tg.swapped_prediction_loss_op, (f(4, 5), f(4, 5), f(3, 5), f(7, 5), f(6, 5), 0.1, 3, 0.1)),
            (tg.swapped_prediction_loss_backward_op, (f(), f(4, 5), f(4, 5), f(3, 5), f(4, 3), f(4, 3),
                                                      [True, True, True])),
        ]


def _meta(out) -> list:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [[list(o.shape), str(o.dtype)] for o in outs]


def main() -> None:
    mode = FakeTensorMode()
    report = {}
    for op, args in cases(mode):
        qual = f"aahr::{op._name}"
        with mode:  # as AOTAutograd: trace "real" mode inside the active fake mode
            gm = make_fx(dispatch_functionalize(lambda *a, op=op: op(*a)), tracing_mode="real")(*args)
        targets = [str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"]
        out_node = next(nd for nd in gm.graph.nodes if nd.op == "output")
        outs = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]
        with mode:
            fake = op._abstract_fn(*args)
        report[qual] = {
            "kind": registration_kind(qual),
            "noted_kernels": len(get_triton_kernels_for_op(qual)),
            "kernels": sum("triton_kernel_wrapper_functional" in s for s in targets),
            "aahr": sum(s.startswith("aahr.") for s in targets),
            "outputs": [[list(o.meta["val"].shape), str(o.meta["val"].dtype)] for o in outs],
            "fake": _meta(fake),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
