"""Multi-process training with ``torch.distributed`` (``torchrun --nproc_per_node=N -m aahr_fast.train``).

One process per rank; NCCL on GPU, gloo on CPU; initialised from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them, or with
``WORLD_SIZE=1``, :func:`init_from_env` returns None and the trainer runs its single-process path
unchanged (byte-identical results, exact resume).

What is per-rank and what is global, and why
--------------------------------------------
With global batch ``B`` and world size ``W`` (``B % W == 0``, else ConfigError), every rank takes the
``B/W`` captions ``perm[b*B + r*B/W : b*B + (r+1)*B/W]`` of global batch ``b`` of the *same* epoch
permutation a single process draws (:class:`ShardedBatchSampler`), so rank order = batch order.

* **Per rank** (cost scales with the shard): data loading and augmentation (region drop is a pure
  function of (seed, epoch, caption index), so it does not depend on the rank), the query encoders
  and the momentum key encoders on the local shard, and the prototype scores of the local shard.
  Dropout inside the encoders draws from a per-rank stream seeded by (seed, step, rank)
  (:meth:`DistContext.local_rng`) so that the shared stream below stays identical on all ranks.
* **Global** (each needs the whole batch): the triplet losses (in-batch negatives over all ``B``),
  the instance graph (the ``2B x 2B`` relevance / connection matrix, GCNs and masked attention), the
  MoCo InfoNCE queries and keys, and the queues. Their inputs are gathered with
  :func:`all_gather_grad` (forward ``all_gather``; backward ``all_reduce``-sum of the incoming
  gradient and the local slice, i.e. a reduce-scatter), and the image ids with :func:`all_gather_nograd`;
  every rank then computes the same global losses with the same generator (DWS negatives) and the same
  shared torch RNG stream (graph dropout), so the values equal the single-process ones up to float
  reduction order. Every rank enqueues the same gathered keys and ids, so the queues stay identical.
* **Prototype loss**: a distributed Sinkhorn-Knopp (:func:`distributed_sinkhorn`, SwAV's
  ``distributed_sinkhorn`` in the log domain): each rank keeps its ``(B/W, K)`` scores and the
  global sums (the total, and each prototype's row sum over the global batch) come from
  ``all_reduce``; the per-sample normalisation is local. The swapped-prediction loss is then a sum over
  the local rows divided by the global ``B`` (:func:`sharded_swapped_prediction_loss`).

Loss scaling (why gradients equal the single-process ones): DDP *averages* gradients over the ranks.
A gathered loss ``L`` is computed identically on all ranks; the gather backward sums the ``W``
identical upstream gradients, so rank ``r``'s encoder gradient is ``W dL/de_r`` and the DDP average
is ``sum_r dL/de_r de_r/dtheta = dL/dtheta``; parameters used directly by the global part (graph,
prototypes) get ``dL/dtheta`` on every rank, averaged to itself. The sharded prototype loss
``l_r`` (sum over the local rows / B, so ``sum_r l_r = L_proto``) is back-propagated as ``W l_r``
(average -> ``sum_r dl_r``); its *value* is replaced by the all-reduced ``sum_r l_r`` (a detached
correction), so the logged loss and its parts are the single-process numbers.

Everything else that writes (tqdm, metrics.jsonl, plots, config.yaml, checkpoints, dev / test
evaluation) happens on rank 0 with the unwrapped model; the other ranks wait at a barrier. Every
collective runs with the timeout ``AAHR_DIST_TIMEOUT_S`` (default 1800 s), so a rank that died makes
the others fail instead of hanging forever (torchrun also stops the remaining workers when one exits
with an error); :func:`shutdown` (``destroy_process_group``) runs in ``finally``.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from aahr_fast.utils.errors import ConfigError

__all__ = [
    "TIMEOUT_ENV",
    "DistContext",
    "init_from_env",
    "shutdown",
    "all_gather_grad",
    "all_gather_nograd",
    "distributed_sinkhorn",
    "sharded_swapped_prediction_loss",
    "ShardedBatchSampler",
    "TrainStepModule",
    "check_batch_divisible",
]

#: Seconds any collective (init, barrier, gather, all_reduce) may wait before the rank fails.
TIMEOUT_ENV = "AAHR_DIST_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class DistContext:
    """The process group of one multi-process run, as seen by one rank.

    Attributes:
        rank, world_size, local_rank: from torchrun. backend: ``"nccl"`` or ``"gloo"``.
        device: this rank's device (``cuda:<local_rank>`` on GPU, ``cpu`` otherwise).
        group: a second process group used for the model's own collectives (gathers, the
            distributed Sinkhorn, flags), so they never interleave with DDP's gradient buckets.
        seed: the run seed (for the per-rank RNG stream of :meth:`local_rng`).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    group: Any = None
    seed: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that logs, writes files and evaluates)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (fails after the timeout instead of hanging)."""
        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index or 0])
        else:
            dist.barrier(group=self.group)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place ``all_reduce`` (``"sum"``, ``"max"`` or ``"min"``) of ``t`` on the model group; returns ``t``."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op], group=self.group)
        return t

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on at least one rank (a collective: call on every rank)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce(t, "max").item() > 0)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; small objects only)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group,
                                   device=self.device if self.backend == "nccl" else None)
        return box[0]

    @contextlib.contextmanager
    def local_rng(self, step: int) -> Iterator[None]:
        """Run the block with the torch (and this rank's CUDA) RNG seeded from (seed, step, rank),
        restoring the shared stream afterwards: per-rank randomness (encoder dropout on the local
        shard) must not make the shared stream, used by the global part, differ between ranks."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            seed = (int(self.seed) * 1_000_003 + int(step)) * 1009 + int(self.rank)
            torch.manual_seed(seed % (2**63 - 1))
            yield


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        secs = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"${TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not secs > 0:
        raise ConfigError(f"${TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=secs)


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"torchrun environment: ${name}={raw!r} is not an integer") from None


def init_from_env(device_spec: str = "auto", seed: int = 0) -> Optional[DistContext]:
    """Initialise the default process group from torchrun's environment variables.

    Args:
        device_spec: ``run.device`` (``auto``/``cuda``/``cuda:N``/``cpu``). On CUDA each rank uses
            ``cuda:<LOCAL_RANK>`` and NCCL; on CPU, gloo.
        seed: ``run.seed``.
    Returns:
        the :class:`DistContext`, or None when ``WORLD_SIZE`` is unset or 1 (single process: no
        process group is created).
    Raises:
        ConfigError: malformed torchrun variables, a CUDA device with fewer GPUs than local ranks,
            or a bad ``$AAHR_DIST_TIMEOUT_S``. Initialisation that times out raises torch's error.
    """
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return None
    world, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    spec = str(device_spec or "auto")
    use_cuda = torch.cuda.is_available() if spec == "auto" else spec.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={spec!r}: CUDA is not available on this machine")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                              f"use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = _timeout()
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kw)
    group = dist.new_group(backend=backend, timeout=timeout)
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=device,
                       group=group, seed=int(seed))


def shutdown() -> None:
    """``destroy_process_group`` when one exists (safe to call twice, or without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch_divisible(batch_size: int, world_size: int) -> int:
    """Per-rank batch ``B / W``. Raises ConfigError when ``B`` is not divisible by ``W``."""
    if batch_size % world_size:
        raise ConfigError(f"optim.batch_size={batch_size} is not divisible by the world size {world_size} "
                          f"(torchrun --nproc_per_node x nodes): each rank takes B/W captions of the global batch")
    return batch_size // world_size


# --------------------------------------------------------------------------------------------------
# gathers


class _AllGatherGrad(torch.autograd.Function):
    """Forward: ``all_gather`` along dim 0 (rank order). Backward: ``all_reduce``-sum of the gradient
    of the gathered tensor and this rank's slice (= reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dctx: DistContext) -> torch.Tensor:  # noqa: D401
        ctx.dctx = dctx
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dctx.world_size)]
        dist.all_gather(parts, x.contiguous(), group=dctx.group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dctx = ctx.dctx
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=dctx.group)
        n = ctx.n
        return grad[dctx.rank * n:(dctx.rank + 1) * n], None


def all_gather_grad(x: torch.Tensor, ctx: Optional[DistContext]) -> torch.Tensor:
    """Differentiable gather of equal-shaped per-rank tensors along dim 0.

    Args:
        x: (n, ...) this rank's rows (same shape on every rank). ctx: None -> ``x`` unchanged.
    Returns:
        (W n, ...) rows of rank 0, 1, ..., W-1, dtype and device of ``x`` (``x`` itself when ``ctx`` is
        None or W = 1). The gradient reaching ``x`` is the sum over ranks of the gradients of the
        gathered tensor's slice of this rank (see the module docstring; reduce-scatter as in
        open_clip's gather with gradient).
    Raises:
        RuntimeError (torch.distributed, e.g. ``DistBackendError``): a rank did not join within
            ``$AAHR_DIST_TIMEOUT_S`` seconds, or the backend refuses the tensor. Shapes that differ
            between ranks are not checked here (the backend's error, or a wrong result).
    """
    if ctx is None or ctx.world_size == 1:
        return x
    return _AllGatherGrad.apply(x, ctx)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor, ctx: Optional[DistContext], pad_dim: Optional[int] = None) -> torch.Tensor:
    """Gather along dim 0 without gradient; with ``pad_dim`` the tensors may differ in that dimension
    and are zero-padded to the largest one first (e.g. fragments (n, N_r, D) with per-rank ``N_r``).

    Args:
        x: (n, ...) this rank's rows, any dtype (bool is sent as uint8 and converted back); every other
            dimension (and ``n``) must agree across ranks. ctx: None -> ``x`` unchanged.
        pad_dim: a dimension (>= 1) allowed to differ between ranks, or None.
    Returns:
        (W n, ...) detached tensor of rank 0, 1, ..., W-1, dtype and device of ``x``; along ``pad_dim``
        its size is the maximum over ranks (zeros appended). ``x`` itself when ``ctx`` is None or W = 1.
    Raises:
        RuntimeError (torch.distributed, e.g. ``DistBackendError``): timeout after
            ``$AAHR_DIST_TIMEOUT_S`` or a backend error; shapes differing outside ``pad_dim`` are not
            checked here.
    """
    if ctx is None or ctx.world_size == 1:
        return x
    x = x.detach().contiguous()
    if pad_dim is not None:
        size = torch.tensor([x.shape[pad_dim]], device=ctx.device, dtype=torch.long)
        ctx.all_reduce(size, "max")
        extra = int(size.item()) - x.shape[pad_dim]
        if extra:
            pad_shape = list(x.shape)
            pad_shape[pad_dim] = extra
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=pad_dim)
    is_bool = x.dtype == torch.bool
    if is_bool:   # gloo has no bool all_gather
        x = x.to(torch.uint8)
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x, group=ctx.group)
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


# --------------------------------------------------------------------------------------------------
# distributed Sinkhorn and the sharded prototype loss


def _global_logsumexp(x: torch.Tensor, dim: Optional[int], ctx: Optional[DistContext]) -> torch.Tensor:
    """logsumexp over ``dim`` (None = all) of the tensor formed by every rank's ``x`` (max-shifted sums)."""
    if ctx is None or ctx.world_size == 1:
        return torch.logsumexp(x.reshape(-1), 0) if dim is None else torch.logsumexp(x, dim, keepdim=True)
    if dim is None:
        m = x.max().reshape(1).clone()
    else:
        m = x.max(dim=dim, keepdim=True).values.clone()
    ctx.all_reduce(m, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (x - m).exp()
    s = s.sum().reshape(1) if dim is None else s.sum(dim=dim, keepdim=True)
    ctx.all_reduce(s, "sum")
    out = s.log() + m
    return out.reshape(()) if dim is None else out


@torch.no_grad()
def distributed_sinkhorn(scores: torch.Tensor, eps: float, n_iters: int, ctx: Optional[DistContext],
                         global_batch: Optional[int] = None) -> torch.Tensor:
    """SwAV Sinkhorn-Knopp codes of a batch sharded over ranks, in the log domain (no gradient).

    Same result as ``aahr_fast.ops.sinkhorn`` on the concatenated ``(B, K)`` scores (up to float
    reduction order): ``Q = exp(S / eps)^T`` divided by its global sum, then ``n_iters`` rounds of
    {each prototype row (a sum over all B samples: ``all_reduce``) normalised to 1/K, each sample
    column (local) normalised to 1/B}, times B. Source: aahr-method.md 2.5; SwAV ``distributed_sinkhorn``.

    Args:
        scores: (n, K) this rank's prototype scores (float32 recommended; half is computed in float32).
        eps: > 0. n_iters: >= 1. ctx: None = one process (then ``B = n``).
        global_batch: B; default ``n * world_size``.
    Returns:
        (n, K) codes of the local rows, dtype of ``scores`` (computed in float32), each row summing to 1
        (the full Q has prototype marginals B/K over the global batch).
    Raises:
        ValueError: ``scores`` not 2-D, or an empty global batch (B = 0). ``eps`` and ``n_iters`` are not
            validated: ``eps <= 0`` gives inf/NaN codes; ``n_iters = 0`` returns the globally normalised
            ``B exp(S / eps) / sum`` without the row/column rounds.
        RuntimeError (torch.distributed): a collective timed out or failed (multi-process only).
    """
    out_dtype = scores.dtype
    s = scores.detach().float()
    n, k = s.shape
    w = 1 if ctx is None else ctx.world_size
    b = global_batch if global_batch is not None else n * w
    log_q = (s / eps).t()                                                # (K, n)
    log_q = log_q - _global_logsumexp(log_q, None, ctx)
    log_k, log_b = math.log(k), math.log(b)
    for _ in range(n_iters):
        log_q = log_q - _global_logsumexp(log_q, 1, ctx) - log_k         # prototype rows: global sums
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b   # sample columns: local
    return (log_q + log_b).exp().t().to(out_dtype)


def sharded_swapped_prediction_loss(x_v: torch.Tensor, x_t: torch.Tensor, prototypes: torch.Tensor, *,
                                    eps: float, n_iters: int, tau: float,
                                    ctx: Optional[DistContext]) -> torch.Tensor:
    """AAHR's cross-modal swapped-prediction loss on a batch sharded over ranks.

    ``L = -1/B sum_i sum_k q^t_ik log softmax(x_v,i C^T / tau)_k - 1/B sum_i sum_k q^v_ik log softmax(x_t,i C^T / tau)_k``
    (aahr-method.md 2.5 / 3 item 2) with codes from :func:`distributed_sinkhorn`. Each rank sums its
    own rows (``l_r``, divided by the global B). The returned tensor's *value* is the global ``L``
    (``sum_r l_r``, all-reduced) and its *gradient* is that of ``W l_r``, so that after DDP's
    gradient averaging the update equals the single-process one (module docstring).

    Args:
        x_v, x_t: (n, D) local image / caption embeddings. prototypes: (K, D) (used as given).
        eps, n_iters, tau: Sinkhorn entropy / iterations, softmax temperature. ctx: None = one process.
    Returns:
        0-dim float tensor (nats), dtype of ``x_v @ prototypes.T``.
    Raises:
        RuntimeError: ``x_v`` / ``x_t`` / ``prototypes`` widths ``D`` differ (matmul); torch.distributed
            timeouts or failures (multi-process only).
        ValueError: as :func:`distributed_sinkhorn`.
    """
    w = 1 if ctx is None else ctx.world_size
    b = x_v.shape[0] * w
    s_v = x_v @ prototypes.t()
    s_t = x_t @ prototypes.t()
    q_v = distributed_sinkhorn(s_v, eps, n_iters, ctx, b)
    q_t = distributed_sinkhorn(s_t, eps, n_iters, ctx, b)
    local = (-(q_t * torch.log_softmax(s_v / tau, dim=1)).sum() - (q_v * torch.log_softmax(s_t / tau, dim=1)).sum()) / b
    if ctx is None or w == 1:
        return local
    total = local.detach().clone().reshape(1)
    ctx.all_reduce(total, "sum")
    scaled = local * w
    return scaled + (total.reshape(()) - scaled.detach())


# --------------------------------------------------------------------------------------------------
# sampler and the DDP wrapper


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This rank's part of each global batch of one epoch permutation.

    Global batch ``b`` is ``perm[b*B:(b+1)*B]`` (exactly the single-process batch); rank ``r`` of
    ``W`` yields ``perm[b*B + r*B/W : b*B + (r+1)*B/W]``, for ``b`` in ``start .. num_batches-1``.

    Args:
        perm: int64 (n,) permutation. batch_size: the global B. start: global batches already drawn.
        num_batches: global batches per epoch. rank, world_size: this rank / W.
    Raises:
        ConfigError: ``B`` not divisible by ``W``.
    """

    def __init__(self, perm: torch.Tensor, batch_size: int, start: int, num_batches: int,
                 rank: int, world_size: int) -> None:
        self.local = check_batch_divisible(int(batch_size), int(world_size))
        self.perm, self.batch_size = perm, int(batch_size)
        self.start, self.num_batches, self.rank = int(start), int(num_batches), int(rank)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.num_batches):
            lo = b * self.batch_size + self.rank * self.local
            yield self.perm[lo:lo + self.local].tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)


class TrainStepModule(torch.nn.Module):
    """Wraps a model so that ``forward(batch, step, generator)`` is ``model.training_step(...)``:
    DistributedDataParallel prepares its gradient reduction in ``forward``, and the trainer's models
    expose a ``training_step`` instead. ``self.model`` is the unwrapped model (checkpoints, evaluation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, step: int, generator: torch.Generator) -> dict:
        return self.model.training_step(batch, step, generator)
