"""Cross-modal retrieval evaluation: R@K, medr, meanr, rsum; Flickr 1K, COCO 5-fold 1K, COCO 5K; ECCV Caption.

Protocol (data-and-eval.md section 4, the one shared by SCAN / VSE-infinity (GPO) / HREM / CHAN):

* ``sims`` is an ``(N, M)`` matrix, rows = images, columns = captions, larger = more similar.
  ``caption_image`` ``(M,) int64`` gives the image row of every caption. Captions are grouped by
  ``caption_image``, never by "5 consecutive columns", so COCO's 5-7 captions per image (or any other
  count >= 1, in any column order) work.
* i2t: the rank of image ``i`` is the 0-based position of its best-ranked ground-truth (GT) caption in the
  row sorted by descending similarity. t2i: the rank of caption ``c`` is the 0-based position of its
  image in the column sorted by descending similarity.
* R@K = 100 * fraction of queries with rank < K (percent); medr = floor(median(rank)) + 1;
  meanr = mean(rank) + 1; rsum = sum of R@K over both directions and all K (max 600 for K = 1, 5, 10).
* Tie rule (documented, deterministic, pessimistic): an item's rank is the number of items scoring
  strictly higher plus the number of *non-GT* items scoring exactly the same. Tied GT items do not push
  each other down; tied non-GT items always come first. A constant similarity matrix therefore scores
  R@1 = 0 in both directions (as soon as there are >= 2 images), never 100. The reference code breaks
  ties arbitrarily through NumPy's unstable argsort, so with continuous scores (no ties) both agree.
* COCO 1K = mean over the 5 folds of 1,000 images (images ``[1000f, 1000f+1000)`` and their captions)
  of every metric, rsum included; COCO 5K = the whole 5,000 x 25,000 matrix; Flickr 1K = the whole
  matrix. Slicing the 5K matrix is exactly the per-fold computation (every pairwise score is independent
  of the gallery).

Ranking never sorts: for a row block it counts, with one comparison against the GT score, how many
entries beat it (``rank_i2t[i] = #{c not GT(i) : S[i,c] >= max_{g in GT(i)} S[i,g]}`` and
``rank_t2i[c] = #{j != img(c) : S[j,c] >= S[img(c),c]}``), both directions in one pass over row blocks.
Scores are compared in their own dtype (float16/32/64 or integer), never rounded. The only temporaries
are the block's boolean comparison (counted in uint8 groups of 255, so no int copy) and O(N + M)
vectors: blocks hold ``chunk_size`` rows (default: as many as fit 64 MiB at 2 bytes per entry), so the
extra memory is bounded whatever N is, and no sorted copy exists.

Measured (2-core shared AMD EPYC, load average 7-9 from other jobs, ``torch.set_num_threads(1)``,
float32 N(0,1) scores with a GT boost; reproduce with ``.venv/bin/python -m aahr_fast.evaluation --bench``
or ``pytest benchmarks/bench_evaluation.py --benchmark-only``):

* ``recall_metrics`` on 5,000 x 25,000 (COCO 5K; the input matrix itself is 477 MiB): 0.21-0.39 s
  (median of 3-5 runs, varies with load); peak extra torch allocation 43.8 MiB (profiler allocator
  events; VmHWM rise after ``clear_refs`` 43.8 MiB). ``evaluate_coco_5fold`` on it: 0.08-0.13 s, 9.5 MiB.
* ``recall_metrics`` on 1,000 x 5,000: 10-22 ms, peak extra 9.4 MiB; the reference codebases' NumPy
  argsort loop takes 157-333 ms on the same matrix (15-24x slower) with the same numbers.

ECCV Caption (data-and-eval.md section 8) is computed with the ``eccv_caption`` package (PyPI 0.1.0,
offline, its ground truth ships inside it): :func:`eccv_metrics` builds the int-id-keyed ranked lists it
needs and converts its fractions to percent.

Metric dict keys (flat, JSON friendly, values are Python floats): ``i2t_r{K}``, ``i2t_medr``,
``i2t_meanr``, ``t2i_r{K}``, ``t2i_medr``, ``t2i_meanr``, ``rsum``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from aahr_fast.utils.errors import ConfigError, DataError

__all__ = [
    "similarity_matrix",
    "i2t_ranks",
    "t2i_ranks",
    "compute_ranks",
    "rank_from_embeddings",
    "metrics_from_ranks",
    "recall_metrics",
    "evaluate_1k",
    "evaluate_coco_5fold",
    "evaluate_coco_5k",
    "evaluate_protocol",
    "PROTOCOLS",
    "eccv_metrics",
    "ECCV_DEFAULT_METRICS",
    "coco_test_caption_ids",
    "coco_test_caption_image_ids",
    "coco_test_image_ids",
    "format_table",
    "format_eccv_table",
]

PROTOCOLS = ("1k", "coco5fold", "5k")
DEFAULT_KS = (1, 5, 10)
# Temporary memory one ranking block may use (bool + int32 comparison results, NaN mask).
_BLOCK_BYTES = 64 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------
# input checks


def _as_tensor(x, name: str) -> torch.Tensor:
    """numpy array / torch tensor / nested list -> torch tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise DataError(f"{name}: expected a numeric array, got dtype=object")
        if x.dtype.kind not in "biuf":
            raise DataError(f"{name}: expected a numeric array, got dtype {x.dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only arrays (np.load mmap): never written to here
            return torch.from_numpy(x)
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from None


def _check_sims(sims) -> torch.Tensor:
    """Return ``sims`` as a 2-D real tensor (float or integer scores, compared in their own dtype)."""
    s = _as_tensor(sims, "sims")
    if s.dim() != 2:
        raise DataError(f"sims: expected a 2-D (N images, M captions) matrix, got shape {tuple(s.shape)}")
    if s.dtype == torch.bool or s.is_complex():
        raise DataError(f"sims: expected real similarity scores, got dtype {s.dtype}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise DataError(f"sims: empty matrix of shape {tuple(s.shape)}")
    return s


def _check_caption_image(caption_image, n_images: int, n_captions: int, device=None) -> torch.Tensor:
    """Validate the caption -> image-row map against an (N, M) matrix; return int64 tensor on ``device``.

    Raises:
        DataError: not 1-D / not integer; length != M (names a transposed matrix when that fits);
            an index outside [0, N); an image row without any caption.
    """
    ci = _as_tensor(caption_image, "caption_image")
    if ci.dim() != 1:
        raise DataError(f"caption_image: expected a 1-D (M,) array, got shape {tuple(ci.shape)}")
    if ci.is_floating_point() or ci.is_complex() or ci.dtype == torch.bool:
        raise DataError(f"caption_image: expected integer image indices, got dtype {ci.dtype}")
    ci = ci.to(torch.int64)
    if ci.numel() != n_captions:
        hint = ""
        if ci.numel() == n_images:
            hint = " (sims looks transposed: rows must be images, columns captions)"
        raise DataError(
            f"caption_image has {ci.numel()} entries but sims has {n_captions} caption columns{hint}; "
            f"sims must be (N images = {n_images}, M captions) with one caption_image entry per column"
        )
    ci_cpu = ci.cpu()
    bad = torch.nonzero((ci_cpu < 0) | (ci_cpu >= n_images)).flatten()
    if bad.numel():
        j = int(bad[0])
        raise DataError(
            f"caption_image[{j}] = {int(ci_cpu[j])} is not an image row of sims (expected 0 <= index < "
            f"{n_images}); {bad.numel()} caption(s) out of range"
        )
    counts = torch.bincount(ci_cpu, minlength=n_images)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        raise DataError(
            f"image row {int(empty[0])} has no caption in caption_image ({empty.numel()} of {n_images} "
            f"image rows have none): the captions-per-image grouping does not match the {n_images} x "
            f"{n_captions} similarity matrix (every image row needs >= 1 caption; e.g. a one-row-per-"
            f"caption image array needs im_div, data-and-eval.md 1.1)"
        )
    return ci.to(device) if device is not None else ci


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"ks: expected a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _auto_rows(n_cols: int, bytes_per_elem: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ConfigError(f"chunk_size: expected a positive integer or None, got {chunk_size!r}")
        return int(chunk_size)
    return max(1, _BLOCK_BYTES // max(1, n_cols * bytes_per_elem))


def _check_no_nan(block: torch.Tensor, row0: int, what: str = "sims", col0: int = 0) -> None:
    """Raise DataError naming the first NaN of ``block`` (rows offset by ``row0``).

    A float sum is a cheap screen (no temporary): it is NaN iff the block holds a NaN or both +inf and
    -inf; only then is the exact element-wise test run.
    """
    if not block.is_floating_point() or not bool(torch.isnan(block.sum())):
        return
    nan = torch.nonzero(torch.isnan(block))
    if nan.numel():
        r, c = (int(v) for v in nan[0])
        raise DataError(
            f"{what}[{row0 + r}, {col0 + c}] is NaN: similarities must be numbers (ranks would be undefined)"
        )


_U8 = 255  # a uint8 sum of up to 255 booleans cannot overflow


def _count_true(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Number of True entries of a 2-D bool ``mask`` along ``dim`` -> int32, without an int copy of it.

    Sums groups of 255 booleans in uint8 (same dtype in and out, so no cast copy; a plain
    ``sum(dtype=int32)`` materialises a 4-byte copy of the whole mask), then the small partial sums in int32.
    """
    u = mask.view(torch.uint8)
    length = u.shape[dim]
    q = length // _U8
    total = None
    if q:
        main = u.narrow(dim, 0, q * _U8)
        main = main.unflatten(dim, (q, _U8)).sum(dim + 1, dtype=torch.uint8)
        total = main.sum(dim, dtype=torch.int32)
    rest = length - q * _U8
    if rest:
        tail = u.narrow(dim, q * _U8, rest).sum(dim, dtype=torch.int32)
        total = tail if total is None else total + tail
    return total


# ----------------------------------------------------------------------------------------------------
# similarity and ranks


def similarity_matrix(
    img_emb, txt_emb, chunk_size: int = 1024, device: str | torch.device | None = None
) -> torch.Tensor:
    """Plain dot-product similarity ``S = img_emb @ txt_emb.T``, computed in row blocks.

    Args:
        img_emb: ``(N, D)`` image embeddings (torch tensor or numpy array, any float dtype).
        txt_emb: ``(M, D)`` caption embeddings.
        chunk_size: image rows per matmul block (bounds the temporary memory on GPU).
        device: where to compute and return ``S`` (default: ``img_emb``'s device; CPU for numpy).
    Returns:
        ``(N, M)`` float32 tensor on ``device``. No normalisation is applied: normalise the embeddings
        first for cosine (VSE / SCAN similarity).
    Raises:
        DataError: an input that cannot be converted to a numeric tensor; not 2-D; not floating point;
            different ``D``; or a NaN/inf embedding (names the array and the row).
        ConfigError: ``chunk_size`` not a positive integer.
    """
    img = _as_tensor(img_emb, "img_emb")
    txt = _as_tensor(txt_emb, "txt_emb")
    _check_embeddings(img, txt)
    dev = torch.device(device) if device is not None else img.device
    rows = _auto_rows(1, 1, chunk_size)
    img = img.to(dev, torch.float32)
    txt_t = txt.to(dev, torch.float32).t()
    out = torch.empty(img.shape[0], txt.shape[0], dtype=torch.float32, device=dev)
    for r0 in range(0, img.shape[0], rows):
        torch.mm(img[r0 : r0 + rows], txt_t, out=out[r0 : r0 + rows])
    return out


def _check_embeddings(img: torch.Tensor, txt: torch.Tensor) -> None:
    for name, e in (("img_emb", img), ("txt_emb", txt)):
        if e.dim() != 2:
            raise DataError(f"{name}: expected a 2-D (count, D) array, got shape {tuple(e.shape)}")
        if not e.is_floating_point():
            raise DataError(f"{name}: expected floating-point embeddings, got dtype {e.dtype}")
        bad = ~torch.isfinite(e).all(dim=1)
        if bool(bad.any()):
            raise DataError(f"{name}: row {int(torch.nonzero(bad)[0])} contains NaN/inf")
    if img.shape[1] != txt.shape[1]:
        raise DataError(f"img_emb has dimension {img.shape[1]} but txt_emb has {txt.shape[1]}: D must match")


def _lowest(dtype: torch.dtype):
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def _ranks_from_matrix(s: torch.Tensor, ci: torch.Tensor, rows: int, want_i2t: bool, want_t2i: bool):
    """One pass over row blocks of a checked matrix; returns (i2t (N,) | None, t2i (M,) | None) int64."""
    n, m = s.shape
    dev = s.device
    gt = s[ci, torch.arange(m, device=dev)]  # (M,) score of every caption with its own image
    if gt.is_floating_point() and bool(torch.isnan(gt).any()):
        c = int(torch.nonzero(torch.isnan(gt))[0])
        raise DataError(f"sims[{int(ci[c])}, {c}] is NaN: similarities must be numbers (ranks would be undefined)")
    i2t = t2i = None
    if want_i2t:
        best = torch.full((n,), _lowest(s.dtype), dtype=s.dtype, device=dev)
        best.scatter_reduce_(0, ci, gt, reduce="amax", include_self=True)
        # GT captions tied with the best GT score: they are counted by ">=" below but are not pushed
        # down by each other (pessimistic rule counts only tied non-GT items).
        n_tied = torch.bincount(ci[gt == best[ci]], minlength=n)
        i2t = torch.empty(n, dtype=torch.int64, device=dev)
    if want_t2i:
        t2i = torch.zeros(m, dtype=torch.int64, device=dev)
    gt_row = gt.unsqueeze(0)
    for r0 in range(0, n, rows):
        blk = s[r0 : r0 + rows]
        _check_no_nan(blk, r0)
        if want_i2t:
            i2t[r0 : r0 + blk.shape[0]] = _count_true(blk >= best[r0 : r0 + rows, None], 1)
        if want_t2i:
            t2i += _count_true(blk >= gt_row, 0)
    if want_i2t:
        i2t -= n_tied
    if want_t2i:
        t2i -= 1  # the caption's own image satisfies ">=" once
    return i2t, t2i


def _prepare(sims, caption_image, chunk_size):
    s = _check_sims(sims)
    ci = _check_caption_image(caption_image, s.shape[0], s.shape[1], device=s.device)
    rows = _auto_rows(s.shape[1], 2, chunk_size)
    return s, ci, rows


def compute_ranks(sims, caption_image, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """i2t and t2i ranks of a similarity matrix in one pass (see :func:`i2t_ranks`, :func:`t2i_ranks`).

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions (torch or numpy, any real dtype;
            compared in its own dtype, never rounded).
        caption_image: ``(M,)`` integer image row of each caption.
        chunk_size: image rows per block (default: as many as fit in 64 MiB of temporaries).
    Returns:
        ``(i2t (N,), t2i (M,))`` int64 0-based ranks on ``sims``' device (data-and-eval.md section 4).
    Raises:
        DataError: ``sims`` not a 2-D non-empty real (non-bool, non-complex) matrix; ``caption_image``
            not 1-D integer, of length != M (the message names a transposed matrix when that fits), with
            an index outside ``[0, N)``, or leaving an image row without any caption; a NaN score
            (names its ``[row, column]``).
        ConfigError: ``chunk_size`` not a positive integer or None.
    """
    s, ci, rows = _prepare(sims, caption_image, chunk_size)
    return _ranks_from_matrix(s, ci, rows, True, True)


def i2t_ranks(sims, caption_image, chunk_size: int | None = None) -> torch.Tensor:
    """Image-to-text ranks: for each image, the 0-based rank of its best-ranked GT caption.

    ``rank_i = #{c : S[i,c] > s*_i} + #{c not in GT(i) : S[i,c] = s*_i}`` with
    ``s*_i = max_{g in GT(i)} S[i,g]`` (data-and-eval.md section 4, pessimistic tie rule: tied non-GT
    captions count as ranked above, tied GT captions do not). GT(i) = ``{c : caption_image[c] == i}``,
    any size >= 1.

    Args / Raises: as :func:`compute_ranks`.
    Returns:
        ``(N,)`` int64 tensor on ``sims``' device.
    """
    s, ci, rows = _prepare(sims, caption_image, chunk_size)
    return _ranks_from_matrix(s, ci, rows, True, False)[0]


def t2i_ranks(sims, caption_image, chunk_size: int | None = None) -> torch.Tensor:
    """Text-to-image ranks: for each caption, the 0-based rank of its image among all images.

    ``rank_c = #{j != g : S[j,c] >= S[g,c]}`` with ``g = caption_image[c]`` (data-and-eval.md section 4,
    pessimistic tie rule: an image tied with the GT image counts as ranked above it).

    Args / Raises: as :func:`compute_ranks`.
    Returns:
        ``(M,)`` int64 tensor on ``sims``' device.
    """
    s, ci, rows = _prepare(sims, caption_image, chunk_size)
    return _ranks_from_matrix(s, ci, rows, False, True)[1]


def rank_from_embeddings(
    img_emb, txt_emb, caption_image, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """i2t and t2i ranks of ``S = img_emb @ txt_emb.T`` without materialising ``S``.

    i2t is computed on row blocks ``img[r0:r1] @ txt.T`` (every image's row is complete in its block),
    t2i on column blocks ``img @ txt[c0:c1].T`` (every caption's column is complete), so each rank is
    compared against a GT score from the very same matmul: exact and self-consistent, at the price of
    two matmul passes. Same tie rule as :func:`i2t_ranks` / :func:`t2i_ranks`. Scores are float32 on
    ``img_emb``'s device; they may differ from :func:`similarity_matrix` in the last float bit (different
    matmul shapes), so ranks can differ only where two scores are within float rounding.

    Args:
        img_emb: ``(N, D)`` image embeddings; txt_emb: ``(M, D)``; caption_image: ``(M,)`` int.
        chunk_size: rows (images) / columns (captions) per block (default: 64 MiB of temporaries).
    Returns:
        ``(i2t (N,), t2i (M,))`` int64 0-based ranks on ``img_emb``'s device.
    Raises:
        DataError: as :func:`similarity_matrix` (embeddings) and :func:`compute_ranks` (``caption_image``).
        ConfigError: ``chunk_size`` not a positive integer or None.
    """
    img = _as_tensor(img_emb, "img_emb")
    txt = _as_tensor(txt_emb, "txt_emb")
    _check_embeddings(img, txt)
    dev = img.device
    img = img.to(dev, torch.float32)
    txt = txt.to(dev, torch.float32)
    n, m = img.shape[0], txt.shape[0]
    ci = _check_caption_image(caption_image, n, m, device=dev)
    # i2t over image-row blocks; captions grouped by image (CSR) so each block finds its GT columns.
    order = torch.argsort(ci, stable=True)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(ci.cpu(), minlength=n), 0)
    rows = _auto_rows(m, 5, chunk_size)
    txt_t = txt.t()
    i2t = torch.empty(n, dtype=torch.int64, device=dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        blk = img[r0:r1] @ txt_t
        caps = order[int(ptr[r0]) : int(ptr[r1])]
        loc = ci[caps] - r0
        g = blk[loc, caps]
        best = torch.full((r1 - r0,), -math.inf, device=dev).scatter_reduce_(0, loc, g, "amax", include_self=True)
        n_tied = torch.bincount(loc[g == best[loc]], minlength=r1 - r0)
        i2t[r0:r1] = _count_true(blk >= best[:, None], 1) - n_tied
        del blk
    cols = _auto_rows(n, 5, chunk_size)
    t2i = torch.empty(m, dtype=torch.int64, device=dev)
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        blk = img @ txt[c0:c1].t()  # (N, C)
        g = blk[ci[c0:c1], torch.arange(c1 - c0, device=dev)]
        t2i[c0:c1] = _count_true(blk >= g[None, :], 0) - 1
        del blk
    return i2t, t2i


# ----------------------------------------------------------------------------------------------------
# metrics and protocols


def metrics_from_ranks(i2t, t2i, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """R@K / medr / meanr / rsum from 0-based ranks (data-and-eval.md section 4).

    Args:
        i2t: ``(N,)`` 0-based image-to-text ranks; t2i: ``(M,)`` 0-based text-to-image ranks (int).
        ks: the K of R@K.
    Returns:
        ``{"i2t_r{K}": %, "i2t_medr", "i2t_meanr", "t2i_r{K}": %, "t2i_medr", "t2i_meanr", "rsum"}``,
        R@K in percent (100 * fraction of queries with rank < K), medr = floor(median(rank)) + 1 (median
        of an even count = mean of the two middle ranks), meanr = mean(rank) + 1, rsum = sum of all R@K.
    Raises:
        DataError: empty or negative ranks. ConfigError: bad ``ks``.
    """
    ks = _check_ks(ks)
    out: dict[str, float] = {}
    rsum = 0.0
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        r = _as_tensor(r, f"{name} ranks").detach().cpu().numpy().astype(np.int64, copy=False).ravel()
        if r.size == 0 or r.min() < 0:
            raise DataError(f"{name} ranks: expected a non-empty array of 0-based ranks")
        for k in ks:
            v = 100.0 * float(np.count_nonzero(r < k)) / r.size
            out[f"{name}_r{k}"] = v
            rsum += v
        out[f"{name}_medr"] = float(math.floor(float(np.median(r)))) + 1.0
        out[f"{name}_meanr"] = float(r.mean()) + 1.0
    out["rsum"] = rsum
    return out


def recall_metrics(
    sims, caption_image, ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None
) -> dict[str, float]:
    """R@K / medr / meanr / rsum of the whole ``(N, M)`` matrix (see :func:`metrics_from_ranks`).

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions (torch CPU/GPU or numpy).
        caption_image: ``(M,)`` int image row of each caption (any number >= 1 of captions per image).
        ks: the K of R@K (percent). chunk_size: image rows per ranking block (default: auto, 64 MiB).
    Returns:
        flat dict of Python floats (module docstring lists the keys).
    Raises:
        DataError: shapes inconsistent, caption_image out of range, an image without caption, NaN.
        ConfigError: bad ``ks`` / ``chunk_size``.
    """
    ks = _check_ks(ks)
    i2t, t2i = compute_ranks(sims, caption_image, chunk_size)
    return metrics_from_ranks(i2t, t2i, ks)


def evaluate_1k(sims, caption_image, ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None) -> dict[str, float]:
    """Flickr30K/Flickr8K 1K test protocol: metrics of the whole matrix (N is 1,000 there; not enforced).

    Protocol of SCAN / VSE-infinity / HREM / CHAN (data-and-eval.md section 4); identical to
    :func:`recall_metrics`.

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions (torch CPU/GPU or numpy, any real
            dtype, compared in its own dtype). Flickr: ``(1000, 5000)``.
        caption_image: ``(M,)`` integer image row of each caption (>= 1 caption per image, any order).
        ks: the K of R@K. chunk_size: image rows per ranking block (default: auto, 64 MiB).
    Returns:
        flat dict of Python floats: ``i2t_r{K}`` / ``t2i_r{K}`` (percent), ``i2t_medr``, ``i2t_meanr``,
        ``t2i_medr``, ``t2i_meanr`` (1-based ranks), ``rsum`` (percent, max ``200 * len(ks)``).
    Raises:
        DataError: as :func:`compute_ranks` (bad ``sims`` / ``caption_image`` shapes, dtypes or indices,
            an image without caption, a NaN score).
        ConfigError: ``ks`` not a non-empty sequence of positive ints; bad ``chunk_size``.
    """
    return recall_metrics(sims, caption_image, ks, chunk_size)


def evaluate_coco_5k(
    sims, caption_image, ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None
) -> dict[str, float]:
    """COCO 5K protocol: metrics of the whole ``testall`` matrix (5,000 x 25,000; N not enforced).

    Protocol of SCAN / VSE-infinity / HREM / CHAN (data-and-eval.md section 4); identical to
    :func:`recall_metrics` (only :func:`evaluate_protocol` warns when N != 5,000).

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions (COCO ``testall``: ``(5000, 25000)``;
            torch CPU/GPU or numpy, any real dtype).
        caption_image: ``(M,)`` integer image row of each caption.
        ks: the K of R@K. chunk_size: image rows per ranking block (default: auto, 64 MiB).
    Returns:
        flat dict of Python floats with the keys of :func:`evaluate_1k` (recalls and rsum in percent).
    Raises:
        DataError: as :func:`compute_ranks` (bad ``sims`` / ``caption_image`` shapes, dtypes or indices,
            an image without caption, a NaN score).
        ConfigError: ``ks`` not a non-empty sequence of positive ints; bad ``chunk_size``.
    """
    return recall_metrics(sims, caption_image, ks, chunk_size)


def evaluate_coco_5fold(
    sims,
    caption_image,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
    n_folds: int = 5,
    return_folds: bool = False,
):
    """COCO 1K protocol: mean over ``n_folds`` image folds of every metric, rsum included.

    Fold ``f`` is images ``[f*F, (f+1)*F)`` with ``F = N / n_folds`` (1,000 for COCO ``testall``) and the
    captions whose ``caption_image`` falls in it (columns ``[5000f, 5000f+5000)`` in SCAN's layout, but
    any column order works). The sub-matrix is a view when the fold's captions are contiguous.

    Args:
        sims, caption_image, ks, chunk_size: as :func:`recall_metrics`.
        n_folds: number of folds; N must be divisible by it.
        return_folds: also return the list of per-fold metric dicts.
    Returns:
        the mean metric dict (Python floats, keys of :func:`recall_metrics`; recalls and rsum in percent,
        each the arithmetic mean over the folds), or ``(mean, [fold dicts])`` when ``return_folds``.
    Raises:
        DataError: as :func:`recall_metrics`, or N not divisible by ``n_folds``.
        ConfigError: bad ``ks`` / ``chunk_size``; ``n_folds`` not a positive int.
    """
    ks = _check_ks(ks)
    s = _check_sims(sims)
    n, m = s.shape
    ci = _check_caption_image(caption_image, n, m)
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise ConfigError(f"n_folds: expected a positive integer, got {n_folds!r}")
    if n % n_folds:
        raise DataError(f"COCO 5-fold: {n} image rows cannot be split into {n_folds} equal folds (expected 5,000)")
    size = n // n_folds
    folds = []
    for f in range(n_folds):
        a, b = f * size, (f + 1) * size
        caps = torch.nonzero((ci >= a) & (ci < b)).flatten()
        c0, c1 = int(caps[0]), int(caps[-1]) + 1
        if c1 - c0 == caps.numel():
            sub = s[a:b, c0:c1]
        else:
            sub = s[a:b].index_select(1, caps.to(s.device))
        folds.append(recall_metrics(sub, ci[caps] - a, ks, chunk_size))
    mean = {k: float(np.mean([fd[k] for fd in folds])) for k in folds[0]}
    return (mean, folds) if return_folds else mean


def evaluate_protocol(
    sims, caption_image, protocol: str = "1k", ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None
) -> dict[str, float]:
    """Dispatch on the protocol name: ``"1k"`` (Flickr, whole matrix), ``"coco5fold"`` (COCO 1K, 5-fold
    mean), ``"5k"`` (COCO 5K, whole matrix); data-and-eval.md section 4.

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions. caption_image: ``(M,)`` int.
        protocol: one of :data:`PROTOCOLS`. ks, chunk_size: as :func:`recall_metrics`.
    Returns:
        flat metric dict of Python floats (keys of :func:`recall_metrics`; percent recalls and rsum).
    Warns:
        UserWarning: ``"coco5fold"`` / ``"5k"`` on a matrix with N != 5,000 image rows.
    Raises:
        ConfigError: any other protocol name; bad ``ks`` / ``chunk_size``.
        DataError: as :func:`evaluate_1k` / :func:`evaluate_coco_5fold` / :func:`evaluate_coco_5k`.
    """
    fns: dict[str, Callable] = {"1k": evaluate_1k, "coco5fold": evaluate_coco_5fold, "5k": evaluate_coco_5k}
    if protocol not in fns:
        raise ConfigError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    n_images = int(sims.shape[0]) if hasattr(sims, "shape") and len(sims.shape) == 2 else None
    if protocol in ("coco5fold", "5k") and n_images is not None and n_images != 5000:
        # the COCO protocols are defined on the 5,000-image testall split; on another N the numbers are
        # not comparable with published COCO 1K / 5K results (and 5 folds of N/5 images score higher)
        warnings.warn(f"protocol {protocol!r} is the COCO 5K-test protocol, but the similarity matrix has "
                      f"{n_images} image rows (expected 5,000): results are not comparable with COCO numbers",
                      stacklevel=2)
    return fns[protocol](sims, caption_image, ks=ks, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------------
# table


def format_table(metrics: Mapping[str, float], title: str | None = None) -> str:
    """Render a metric dict as the field's R@K table.

    Layout (one decimal; medr/meanr line only when present)::

                 Image-to-text     |    Text-to-image     |
          R@1    R@5   R@10 |   R@1    R@5   R@10 |   rsum
         80.1   95.2   97.9 |  62.3   86.8   92.0 |  514.3
        medr 1.0 meanr 2.1 (i2t) | medr 1.0 meanr 5.9 (t2i)

    Args:
        metrics: dict with ``i2t_r{K}`` / ``t2i_r{K}`` for the same Ks (and ``rsum``), as returned by
            :func:`recall_metrics` / :func:`evaluate_protocol`.
        title: optional first line.
    Raises:
        DataError: no recall keys, or the two directions have different Ks.
    """
    def kset(prefix: str) -> list[int]:
        out = []
        for key in metrics:
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                out.append(int(key[len(prefix):]))
        return sorted(out)

    ks_i, ks_t = kset("i2t_r"), kset("t2i_r")
    if not ks_i or ks_i != ks_t:
        raise DataError(f"format_table: expected i2t_r<K> and t2i_r<K> keys for the same Ks, got {sorted(metrics)}")
    rsum = metrics.get("rsum", sum(metrics[f"i2t_r{k}"] + metrics[f"t2i_r{k}"] for k in ks_i))
    w = 7
    half = w * len(ks_i)
    lines = [] if title is None else [title]
    lines.append(f"{'Image-to-text':^{half}} |{'Text-to-image':^{half}} |")
    heads = "".join(f"{'R@' + str(k):>{w}}" for k in ks_i)
    lines.append(f"{heads} |{heads} | {'rsum':>{w - 1}}")
    vi = "".join(f"{metrics[f'i2t_r{k}']:>{w}.1f}" for k in ks_i)
    vt = "".join(f"{metrics[f't2i_r{k}']:>{w}.1f}" for k in ks_i)
    lines.append(f"{vi} |{vt} | {rsum:>{w - 1}.1f}")
    if all(f"{d}_{m}" in metrics for d in ("i2t", "t2i") for m in ("medr", "meanr")):
        lines.append(
            f"medr {metrics['i2t_medr']:.1f} meanr {metrics['i2t_meanr']:.1f} (i2t) | "
            f"medr {metrics['t2i_medr']:.1f} meanr {metrics['t2i_meanr']:.1f} (t2i)"
        )
    return "\n".join(lines)


def format_eccv_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Render :func:`eccv_metrics` output: one line per metric, ``name  i2t  t2i`` in percent.

    Args:
        results: ``{metric: {"i2t": percent, "t2i": percent}}`` as returned by :func:`eccv_metrics`.
    Returns:
        the table as one string (header line + one line per metric, sorted by name, two decimals).
    Raises:
        KeyError: a metric entry without an ``"i2t"`` or ``"t2i"`` value (not validated further).
    """
    width = max(len(k) for k in results) if results else 10
    lines = [f"{'metric':<{width}} {'i2t':>7} {'t2i':>7}"]
    for name in sorted(results):
        v = results[name]
        lines.append(f"{name:<{width}} {v['i2t']:>7.2f} {v['t2i']:>7.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# ECCV Caption

ECCV_DEFAULT_METRICS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "coco_1k_recalls", "coco_5k_recalls")
_ECCV_VALID = frozenset(
    {"coco_1k_r1", "coco_5k_r1", "cxc_r1", "coco_1k_recalls", "coco_5k_recalls", "cxc_recalls",
     "eccv_r1", "eccv_map_at_r", "eccv_rprecision", "eccv_recalls"}
)


def _eccv_data_dir() -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "failed to import ujson" on first import
            import eccv_caption
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise ConfigError("ECCV Caption needs the `eccv-caption` package (pip install eccv-caption)") from exc
    return os.path.join(os.path.dirname(os.path.abspath(eccv_caption.__file__)), "data")


def _new_eccv_metrics():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson" on import
        from eccv_caption import Metrics
    return Metrics()


@functools.lru_cache(maxsize=1)
def _coco_test_tables() -> tuple[np.ndarray, np.ndarray]:
    d = _eccv_data_dir()
    cap_ids = np.load(os.path.join(d, "coco_test_ids.npy")).astype(np.int64)
    with open(os.path.join(d, "original_caption_to_image.json")) as fh:
        c2i = json.load(fh)
    try:
        img = np.array([int(c2i[str(int(c))][0]) for c in cap_ids], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"{d}/original_caption_to_image.json: no image for caption id {exc}") from None
    cap_ids.flags.writeable = False
    img.flags.writeable = False
    return cap_ids, img


def coco_test_caption_ids() -> np.ndarray:
    """The 25,000 COCO caption (annotation) ids of the 5K test split in SCAN ``testall`` row order.

    Loaded from ``eccv_caption/data/coco_test_ids.npy`` (shipped with the package, offline).
    Returns:
        ``(25000,)`` int64 array (a fresh copy).
    Raises:
        ConfigError: the ``eccv-caption`` package is not installed.
        DataError: the package's ``original_caption_to_image.json`` lacks one of the caption ids.
    """
    return _coco_test_tables()[0].copy()


def coco_test_caption_image_ids() -> np.ndarray:
    """COCO image id of each of the 25,000 test captions, aligned with :func:`coco_test_caption_ids`.

    Mapped through the package's ``original_caption_to_image.json`` (data-and-eval.md 1.7: matches
    SCAN's ``testall_ids.txt`` at all 25,000 positions).
    Returns:
        ``(25000,)`` int64 array (a fresh copy).
    Raises:
        ConfigError / DataError: as :func:`coco_test_caption_ids`.
    """
    return _coco_test_tables()[1].copy()


def coco_test_image_ids() -> np.ndarray:
    """The 5,000 COCO test image ids in SCAN ``testall`` image order (every 5th caption's image).

    Returns:
        ``(5000,)`` int64 array; row ``i`` of a testall similarity matrix is this image.
    Raises:
        DataError: if the shipped ids are not in blocks of 5 captions per image, or as
            :func:`coco_test_caption_ids`.
        ConfigError: as :func:`coco_test_caption_ids`.
    """
    img = _coco_test_tables()[1]
    blocks = img.reshape(-1, 5)
    if not (blocks == blocks[:, :1]).all():
        raise DataError("eccv_caption coco_test_ids.npy: captions are not in blocks of 5 per image")
    return blocks[:, 0].copy()


def _unique_int_ids(x, name: str, expected: int) -> np.ndarray:
    a = np.asarray(x.cpu().numpy() if isinstance(x, torch.Tensor) else x)
    if a.ndim != 1 or a.shape[0] != expected:
        where = "row" if name == "image_ids" else "column"
        raise DataError(f"{name}: expected a 1-D array of {expected} ids (one per sims {where}), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        try:
            b = a.astype(np.int64)
        except (TypeError, ValueError):
            raise DataError(f"{name}: expected integer COCO ids, got dtype {a.dtype}") from None
        if not (b.astype(a.dtype) == a).all():
            raise DataError(f"{name}: expected integer COCO ids, got non-integer values")
        a = b
    a = a.astype(np.int64)
    uniq, counts = np.unique(a, return_counts=True)
    if uniq.size != a.size:
        dup = int(uniq[counts > 1][0])
        raise DataError(f"{name}: ids must be unique (ECCV R-Precision divides by set sizes); id {dup} repeats")
    return a


def eccv_metrics(
    sims,
    image_ids,
    caption_ids,
    top_k: int | None = None,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    target_metrics: Sequence[str] = ECCV_DEFAULT_METRICS,
    chunk_size: int | None = None,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """ECCV Caption metrics (Chun et al. ECCV 2022; data-and-eval.md section 8) via ``eccv_caption``.

    Builds ``i2t = {image id: [caption ids by descending similarity]}`` and
    ``t2i = {caption id: [image ids ...]}`` (Python int keys and values, two separate id spaces) and
    calls ``eccv_caption.Metrics().compute_all_metrics(i2t, t2i, target_metrics, Ks=ks)``.
    Ties are ordered by lower row/column index first (stable sort).

    List length: ``top_k=None`` (default) passes the full ranking (every caption / every image), the safe
    reference, but slow: at 5K x 25K it took 163 s and 2.9 GB peak RSS (Python lists of 250M entries and
    the package's per-fold list filtering), against 8.2 s for ``top_k=48`` with identical results (measured
    on the 2-core shared CPU under load, 1 thread, default targets; reproduce with
    ``.venv/bin/python -m aahr_fast.evaluation --bench-eccv``, about 3 minutes).
    An integer ``top_k`` passes each query's global top ``top_k`` *plus*, when a COCO 1K metric is
    requested, each 1K fold's top ``max(ks)`` items in their ranked order, so the package's per-fold
    filtering never runs short and never under-estimates 1K recall (the truncation pitfall of
    data-and-eval.md section 8). Every list is a subsequence of the full ranking that keeps its first
    ``top_k`` items, and every requested metric reads at most the first ``max(largest positive set,
    max(ks))`` items (48 for ECCV i2t), so any accepted ``top_k`` gives exactly the full-ranking numbers;
    a shorter ``top_k`` is refused.

    Args:
        sims: ``(N, M)`` similarities, rows images, columns captions (COCO 5K: 5,000 x 25,000).
        image_ids: ``(N,)`` unique COCO image ids of the rows (:func:`coco_test_image_ids` for testall).
        caption_ids: ``(M,)`` unique COCO caption ids of the columns (:func:`coco_test_caption_ids`).
        top_k: ranked-list length, None = full ranking.
        ks: the K of ``*_recalls``. target_metrics: subset of the package's metric names (``pmrp`` is
            not supported: its GT is a separate download).
        chunk_size: rows/columns sorted per block. verbose: show the package's tqdm bars.
    Returns:
        ``{metric: {"i2t": percent, "t2i": percent}}`` with metric names from the package, e.g.
        ``eccv_map_at_r``, ``eccv_rprecision``, ``eccv_r1``, ``coco_1k_r1``, ``coco_5k_r10``.
    Raises:
        DataError: shapes, non-unique / non-integer ids, or query ids of the requested GT missing from
            ``image_ids`` / ``caption_ids`` (e.g. swapped or row-index ids); NaN scores.
        ConfigError: unknown target metric, ``top_k`` too short, bad ``ks``.
    """
    ks = _check_ks(ks)
    targets = tuple(target_metrics)
    unknown = [t for t in targets if t not in _ECCV_VALID]
    if unknown or not targets:
        raise ConfigError(f"target_metrics: unknown {unknown} (valid: {sorted(_ECCV_VALID)})")
    s = _check_sims(sims)
    n, m = s.shape
    img_ids = _unique_int_ids(image_ids, "image_ids", n)
    cap_ids = _unique_int_ids(caption_ids, "caption_ids", m)
    met = _new_eccv_metrics()

    # Ground-truth sets the requested metrics read; every query id must be present.
    gts = []
    if any(t.startswith("coco") for t in targets):
        gts.append(("COCO", met.coco_gts))
    if any(t.startswith("cxc") for t in targets):
        gts.append(("CxC", met.cxc_gts))
    if any(t.startswith("eccv") for t in targets):
        gts.append(("ECCV", met.eccv_gts))
    img_set, cap_set = set(img_ids.tolist()), set(cap_ids.tolist())
    need = [max(ks)]
    for name, gt in gts:
        for side, have, label in (("i2t", img_set, "image_ids"), ("t2i", cap_set, "caption_ids")):
            missing = [q for q in gt[side] if q not in have]
            if missing:
                raise DataError(
                    f"{label}: {len(missing)} of the {len(gt[side])} {name} {side} query ids are missing "
                    f"(e.g. {missing[:3]}); {label} must be COCO {'image' if side == 'i2t' else 'caption'} ids "
                    f"(coco_test_image_ids() / coco_test_caption_ids() give the testall order)"
                )
            need.append(max(len(set(v)) for v in gt[side].values()))
    longest = max(need)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < longest:
            raise ConfigError(
                f"top_k={top_k!r} is shorter than the largest positive set / K of the requested metrics "
                f"({longest}); use top_k >= {longest} or None (full ranking)"
            )
        top_k = int(top_k)

    fold_k = max(ks) if any(t.startswith("coco_1k") for t in targets) and top_k is not None else 0
    cap_fold = img_fold = None
    if fold_k:
        coco_caps, coco_imgs = _coco_test_tables()
        per = len(coco_caps) // 5
        cf = {int(c): i // per for i, c in enumerate(coco_caps)}
        imf = {int(im): i // per for i, im in enumerate(coco_imgs)}
        cap_fold = torch.tensor([cf.get(int(c), -1) for c in cap_ids], dtype=torch.int8)
        img_fold = torch.tensor([imf.get(int(i), -1) for i in img_ids], dtype=torch.int8)

    cap_objs = cap_ids.tolist()
    img_objs = img_ids.tolist()
    i2t = _ranked_lists(s, img_objs, cap_objs, top_k, cap_fold, fold_k, chunk_size, by_rows=True)
    t2i = _ranked_lists(s, cap_objs, img_objs, top_k, img_fold, fold_k, chunk_size, by_rows=False)

    call_targets = set(targets)
    if "eccv_rprecision" in call_targets:
        # eccv_caption 0.1.0 only computes R-Precision together with mAP@R (its check is misspelt).
        call_targets.add("eccv_map_at_r")
    wanted = _expand_targets(targets, ks)
    sink = io.StringIO()
    ctx = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(sink)  # its tqdm bars
    with ctx:
        raw = dict(met.compute_all_metrics(i2t, t2i, target_metrics=tuple(call_targets), Ks=ks, verbose=verbose))
        # 0.1.0 drops eccv_recalls when mAP@R is requested too, and X_r1 when X_recalls is: ask again
        for key in sorted(wanted - set(raw)):
            family, _, k = key.rpartition("_r")
            if k.isdigit() and f"{family}_recalls" in _ECCV_VALID:
                raw.update(met.compute_all_metrics(i2t, t2i, target_metrics=(f"{family}_recalls",), Ks=(int(k),),
                                                   verbose=verbose))
    out = {}
    for key in sorted(wanted):
        if key not in raw:  # pragma: no cover - depends on the package version
            raise ConfigError(f"eccv_caption did not return {key!r}; installed version not supported")
        out[key] = {d: 100.0 * float(raw[key][d]) for d in ("i2t", "t2i")}
    return out


def _expand_targets(targets: Iterable[str], ks: Sequence[int]) -> set[str]:
    out = set()
    for t in targets:
        if t.endswith("_recalls"):
            out.update(f"{t[: -len('_recalls')]}_r{k}" for k in ks)
        else:
            out.add(t)
    return out


def _top_items(blk: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of each row's top ``k`` scores, exactly ``argsort(descending, stable)[:, :k]``.

    ``torch.topk`` gives the set unless more scores tie with the k-th one than there are places left
    (then, as a stable sort would, the lowest-index tied scores are kept); the set is then ordered by
    descending score with ties by lower index. O(R x M) without a full sort.

    Args:
        blk: ``(R, M)`` float scores without NaN; k: ``1 <= k <= M``.
    Returns:
        ``(R, k)`` int64 indices.
    """
    vals, idx = torch.topk(blk, k, dim=1)
    thr = vals[:, -1:]
    ambiguous = torch.nonzero(_count_true(blk >= thr, 1) > k).flatten()
    if ambiguous.numel():
        sub, t = blk[ambiguous], thr[ambiguous]
        above = sub > t
        eq = sub == t
        eq &= eq.cumsum(1, dtype=torch.int32) <= (k - _count_true(above, 1))[:, None]
        idx[ambiguous] = torch.nonzero(above | eq)[:, 1].view(-1, k)
    idx = torch.sort(idx, dim=1).values
    order = torch.argsort(blk.gather(1, idx), dim=1, descending=True, stable=True)
    return idx.gather(1, order)


def _ranked_lists(s, query_objs, item_objs, top_k, item_fold, fold_k, chunk_size, by_rows: bool) -> dict:
    """Rank the items of each query (rows of ``s`` when ``by_rows`` else columns): {query id: [item ids]}.

    ``top_k=None``: full stable descending ranking. Otherwise the global top ``top_k`` plus each fold's
    top ``fold_k`` (``item_fold`` int8 (n_items,), folds 0..4), merged in full-ranking order, so every
    list is a subsequence of the full ranking that contains its first ``top_k`` items.
    """
    n_q = s.shape[0] if by_rows else s.shape[1]
    n_items = s.shape[1] if by_rows else s.shape[0]
    full = top_k is None or top_k >= n_items
    rows = _auto_rows(n_items, 40 if full else 12, chunk_size)
    out: dict[int, list[int]] = {}
    getter = item_objs.__getitem__
    fold_cols = []
    if fold_k and not full:
        fold_cols = [torch.nonzero(item_fold == f).flatten().to(s.device) for f in range(5)]
    for q0 in range(0, n_q, rows):
        blk = s[q0 : q0 + rows] if by_rows else s[:, q0 : q0 + rows].t().contiguous()
        if by_rows:
            _check_no_nan(blk, q0)
        else:
            _check_no_nan(blk.t(), 0, col0=q0)
        if full:
            order = torch.argsort(blk, dim=1, descending=True, stable=True).cpu()
            for j, row in enumerate(order.tolist()):
                out[query_objs[q0 + j]] = list(map(getter, row))
            continue
        top = _top_items(blk, top_k)
        picks = [top]
        if fold_cols:
            top_fold = item_fold.to(blk.device)[top]
        for f, cols in enumerate(fold_cols):
            kf = min(fold_k, cols.numel())
            # only queries whose global top list holds fewer than kf items of fold f need more
            short = torch.nonzero(_count_true(top_fold == f, 1) < kf).flatten()
            if short.numel():
                sub = blk[short].index_select(1, cols)
                extra = torch.zeros((blk.shape[0], kf), dtype=torch.int64, device=blk.device)
                extra[:] = top[:, :1]  # rows that need nothing re-mark an already kept item
                extra[short] = cols[_top_items(sub, kf)]
                picks.append(extra)
        keep = torch.zeros(blk.shape, dtype=torch.bool, device=blk.device)
        for p in picks:
            keep.scatter_(1, p, True)
        pos = torch.nonzero(keep)  # (n, 2) row-major, ascending column within a row
        vals = blk[pos[:, 0], pos[:, 1]]
        o = torch.argsort(vals, descending=True, stable=True)
        o = o[torch.argsort(pos[o, 0], stable=True)]  # group by row, keep score-desc / index-asc order
        counts = _count_true(keep, 1).tolist()
        flat = pos[o, 1].cpu().tolist()
        start = 0
        for j, c in enumerate(counts):
            out[query_objs[q0 + j]] = list(map(getter, flat[start : start + c]))
            start += c
    return out


# ----------------------------------------------------------------------------------------------------
# measurement entry point: python -m aahr_fast.evaluation --bench


def _bench_main() -> None:  # pragma: no cover - measurement script
    import time

    from .utils.memory import peak_extra_bytes

    torch.set_num_threads(1)
    for n in (1000, 5000):
        m = 5 * n
        g = torch.Generator().manual_seed(0)
        s = torch.randn(n, m, generator=g)
        ci = torch.arange(n).repeat_interleave(5)
        recall_metrics(s, ci)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            recall_metrics(s, ci)
            times.append(time.perf_counter() - t0)
        peak, _ = peak_extra_bytes(recall_metrics, s, ci)
        print(
            f"{n} x {m}: median {sorted(times)[1]:.3f} s over 3 runs (1 thread), peak extra torch allocation "
            f"{peak / 2**20:.1f} MiB on top of the {s.numel() * 4 / 2**20:.0f} MiB matrix"
        )


def _bench_eccv_main() -> None:  # pragma: no cover - measurement script
    import resource
    import time

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    # even noise scores, odd GT scores 0.4 of the noise range higher: no GT/non-GT ties
    s = torch.randint(0, 2**26, (5000, 25000), generator=g, dtype=torch.int32).mul_(2)
    ci = torch.arange(5000).repeat_interleave(5)
    s[ci, torch.arange(25000)] += 53687090 + 1
    img, cap = coco_test_image_ids(), coco_test_caption_ids()
    t0 = time.perf_counter()
    compact = eccv_metrics(s, img, cap, top_k=48)
    t1 = time.perf_counter()
    full = eccv_metrics(s, img, cap)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"eccv_metrics 5,000 x 25,000 (1 thread): top_k=48 {t1 - t0:.1f} s, full ranking {t2 - t1:.1f} s, "
          f"peak RSS {rss:.2f} GiB; identical results: {compact == full}")
    print(format_eccv_table(full))


if __name__ == "__main__":  # pragma: no cover
    import sys

    if "--bench" in sys.argv:
        _bench_main()
    elif "--bench-eccv" in sys.argv:
        _bench_eccv_main()
    else:
        print("usage: python -m aahr_fast.evaluation --bench | --bench-eccv")
