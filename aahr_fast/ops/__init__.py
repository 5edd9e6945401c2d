"""Public fused ops of aahr_fast. The model calls only these.

Each op validates its inputs once, picks a backend (``backend=`` argument > ``AAHR_OPS_BACKEND`` >
default by device and availability; see :mod:`aahr_fast.ops._dispatch`) and runs that backend's
implementation. The C++, Triton and CUDA kernels are registered PyTorch operators (``torch.ops.aahr.<op>_cpp``,
``<op>_triton`` (a ``torch.library.triton_op``; an opaque custom op under the Triton interpreter),
``<op>_cuda``: schema, fake implementation, registered autograd; :mod:`aahr_fast.ops._library`), so the ops
compile with ``torch.compile(fullgraph=True)``; the reference runs through plain autograd. Contracts:
docs/DESIGN.md, "Ops contract".

Cross similarity (:mod:`.cross_similarity`): :func:`fragment_word_relevance`, :func:`hard_assignment_similarity`.
Instance correlation (:mod:`.correlation`): :func:`intra_relevance`, :func:`topk_connection`,
:func:`instance_correlation` (-> :class:`Correlation`).
Message passing (:mod:`.message_passing`): :func:`gcn_layer`, :func:`masked_attention`.
Prototypes (:mod:`.prototypes`): :func:`sinkhorn`, :func:`swapped_prediction_loss`.
"""
from . import _dispatch
from ._dispatch import (
    BACKENDS,
    BackendFallbackWarning,
    BackendUnavailableError,
    register,
    registered,
    resolve_backend,
)
from ._common import value_checks, value_checks_enabled
from .correlation import Correlation, instance_correlation, intra_relevance, topk_connection
from .cross_similarity import fragment_word_relevance, hard_assignment_similarity
from .message_passing import gcn_layer, masked_attention
from .prototypes import sinkhorn, swapped_prediction_loss

__all__ = [
    "BACKENDS",
    "BackendFallbackWarning",
    "BackendUnavailableError",
    "Correlation",
    "fragment_word_relevance",
    "gcn_layer",
    "hard_assignment_similarity",
    "instance_correlation",
    "intra_relevance",
    "masked_attention",
    "register",
    "registered",
    "resolve_backend",
    "sinkhorn",
    "swapped_prediction_loss",
    "topk_connection",
    "value_checks",
    "value_checks_enabled",
]
