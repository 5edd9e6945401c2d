"""``ModelConfig``: every hyperparameter of the AAHR model, its losses and the VSE baseline.

Defaults are the paper's values (docs ``aahr-method.md`` section 4, Flickr30K column), except that the
correct behaviour (padding masks everywhere, same-image masking in every loss and in the MoCo queue) is
on by default. ``preset="authors"`` (one switch, ``model.preset=authors``) reproduces the authors' released code where we
deliberately differ (docs/FIDELITY.md); each element is its own key, which the preset fills when left unset
(``None``) and which an explicit value overrides:

=========================  ==========  ===========  ================================================
key                        ``ours``    ``authors``  what
=========================  ==========  ===========  ================================================
``pool_mask_padding``      True        False        attention pooling (GGLP) masks padded slots (6.6)
``bn_mask_padding``        True        False        projection BatchNorm statistics from valid rows only
``relevance_mask_padding`` True        False        region-word relevance masks padded region slots (6.9)
``moco_mask_same_image``   True        False        queued keys of the query's own image are not negatives
``graph_attn_dropout``     False       True         dropout (``dropout``) on the instance Transformer's
                                                    attention probabilities
``init``                   "torch"     "authors"    PyTorch default init / the authors' (Xavier-uniform,
                                                    zero bias on the region and global projections;
                                                    MHA-style Xavier in-projection, zero biases in the
                                                    instance Transformer)
=========================  ==========  ===========  ================================================

Padded fragment rows are zeroed after the projection unless pooling or relevance is unmasked (then they
keep their projected values, as in the authors' code). ``paper_compat=True`` (older switch, kept for old
configs) forces the first four to the authors' values, whatever they are set to.
Not reproduced: the 2-matrix CLIP projection (one Linear here, same function), ``M`` divisible by ``B``
(any ``M`` works), HREM's discarded relation MLP and the gradient-free KL regulariser (6.4).
Behaviour shared with the authors' code in both modes: the momentum key encoders follow the model's
train/eval mode (dropout active in training), the final embedding is not re-normalised after fusion.

Warm-up starts (``proto_start``, ``graph_start``, ``moco_start``) accept
- an ``int``: an iteration number (0-based; the part is active when ``step >= start``);
- a ``str`` ``"<x>ep"`` / ``"<x>epoch(s)"``: epochs, e.g. ``"1.5ep"``;
- a ``float`` in ``[0, 1]`` (or a string holding one, e.g. ``"0.25"``): a fraction of the whole training.
Epoch and fraction forms need the trainer to call ``model.resolve_schedule(steps_per_epoch,
total_steps)``; :func:`resolve_start` does the conversion. A start of an enabled part at or beyond the total
steps is legal (it switches that branch off for the run) but issues a :class:`ScheduleWarning`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from aahr_fast.utils.errors import ConfigError, unknown_key_error

StartSpec = Union[int, float, str]

#: The switch of the part each warm-up start gates (the start matters only while the switch is on).
START_SWITCHES = {"proto_start": "use_prototypes", "graph_start": "use_graph", "moco_start": "use_moco"}


class ScheduleWarning(UserWarning):
    """A warm-up start resolves to an iteration at or beyond the end of training: that part never runs."""


def late_start_message(name: str, spec: StartSpec, start: int, total_steps: int) -> Optional[str]:
    """The warning text when warm-up ``name`` (``spec`` resolved to iteration ``start``) never begins within
    ``total_steps`` optimiser steps (iterations ``0 .. total_steps - 1``), else None."""
    if start < total_steps:
        return None
    switch = START_SWITCHES.get(name, "its switch")
    return (f"model.{name}={spec!r} resolves to iteration {start}, at or beyond the end of training "
            f"({total_steps} steps): that branch never runs in this run. Fine to switch it off; otherwise "
            f"lower model.{name} (or set model.{switch}=false to say so explicitly)")

_LOSSES = ("dws", "hardest", "sum")
_NORMS = ("masked_bn", "layernorm", "none")
_PROJ = ("mlp", "linear")
_NOGLOBAL_POOL = ("learned", "mean")
_INTER_REL = ("scan", "chan")
_ARCHS = ("aahr", "vse")
_TEXT_MODES = ("frozen", "finetune")
_INITS = ("torch", "authors")

#: Values each preset gives the keys left unset (None); see the module docstring.
PRESETS: dict[str, dict[str, Any]] = {
    "ours": {"pool_mask_padding": True, "bn_mask_padding": True, "relevance_mask_padding": True,
             "moco_mask_same_image": True, "graph_attn_dropout": False, "init": "torch"},
    "authors": {"pool_mask_padding": False, "bn_mask_padding": False, "relevance_mask_padding": False,
                "moco_mask_same_image": False, "graph_attn_dropout": True, "init": "authors"},
}
#: The keys ``paper_compat=True`` forces to the authors' values.
PAPER_COMPAT_KEYS = ("pool_mask_padding", "bn_mask_padding", "relevance_mask_padding", "moco_mask_same_image")


@dataclass
class ModelConfig:
    """Hyperparameters of :class:`aahr_fast.models.aahr.AAHR` and :class:`~aahr_fast.models.baseline.VSEBaseline`.

    Source of each default: ``aahr-method.md`` section 4 (paper / authors' code [C]) unless noted.
    Raises :class:`~aahr_fast.utils.errors.ConfigError` from :meth:`validate` (called by
    ``build_model``) for out-of-range or unknown values.
    """

    # --- which model --------------------------------------------------------------------------
    arch: str = "aahr"                      # "aahr" or "vse" (mean-pooled VSE baseline)
    paper_compat: bool = False              # older switch: forces PAPER_COMPAT_KEYS to the authors' values
    preset: str = "ours"                    # "ours" (corrected) / "authors" (their code): fills the keys below

    # --- fidelity switches (None = from ``preset``; docs/FIDELITY.md) ---------------------------
    pool_mask_padding: Optional[bool] = None       # ours True / authors False
    bn_mask_padding: Optional[bool] = None         # ours True / authors False
    relevance_mask_padding: Optional[bool] = None  # ours True / authors False
    moco_mask_same_image: Optional[bool] = None    # ours True / authors False
    graph_attn_dropout: Optional[bool] = None      # ours False / authors True
    init: Optional[str] = None                     # ours "torch" / authors "authors"

    # --- shared embedding ---------------------------------------------------------------------
    embed_dim: int = 1024                   # joint space D
    dropout: float = 0.1                    # fragment / instance Transformer dropout

    # --- image encoder (section 2.2) ----------------------------------------------------------
    img_proj: str = "mlp"                   # "mlp": W0 r + MLP(r) (GPO/HREM FC+MLP); "linear"
    img_mlp_hidden: Optional[int] = None    # MLP hidden width; None -> embed_dim // 2 (paper 512)
    proj_norm: str = "masked_bn"            # norm inside the MLP: masked BN statistics / LayerNorm / none

    # --- text encoder (section 2.3) -----------------------------------------------------------
    text_mode: str = "frozen"               # "frozen": batch["tokens"]; "finetune": batch["input_ids"] -> backbone
    text_backbone_path: Optional[str] = None  # local BERT-family folder; None -> MiniLM package (offline)
    backbone_lr_mult: float = 0.1           # lr multiplier of the fine-tuned backbone
    text_trainable_layers: int = 0          # finetune: 0 = all BERT layers train; k = only the top k (the
                                            # embeddings and lower layers frozen, shared with the momentum copy)
    txt_proj: str = "linear"                # paper: Linear(768 -> D); "mlp" gives the image-side block

    # --- fragment level ("GAT"), pooling, fusion -----------------------------------------------
    use_fragment_transformer: bool = True   # one post-norm Transformer layer over regions / words
    frag_heads: int = 16
    frag_ff_dim: Optional[int] = None       # None -> embed_dim (paper FF = d)
    maxk: int = 2                           # max-k residual vector, k (HREM)
    residual_beta: float = 0.8              # paper Eq. (2): v = beta v_res + (1-beta) v_pool
    pool_heads: int = 8                     # global-guided pooling heads (GGLP)
    pool_head_dim: Optional[int] = None     # per-head width; None -> embed_dim (the paper: full-width heads)
    use_global: bool = True                 # frozen global vector branch (GGLP query + gated fusion)
    noglobal_pool: str = "learned"          # pooling without the global branch: learned query / mean
    use_gated_fusion: bool = True           # f = z l2(v) + (1-z) l2(g); off -> f = l2(l2(v) + l2(g))

    # --- base loss (section 3) ----------------------------------------------------------------
    loss: str = "dws"                       # "dws" distance-weighted triplet / "hardest" VSE++ / "sum" hinges
    margin: float = 0.2
    dws_n: int = 512                        # dimension constant of the distance-weight formula (hard-coded 512)
    dws_cutoff: float = 1.7                 # 1.7 Flickr30K, 1.9 COCO
    dws_min_dist: float = 0.5
    mask_same_image: bool = True            # same-image pairs are never negatives (hardest / sum)

    # --- clustering prototypes (section 2.5) ---------------------------------------------------
    use_prototypes: bool = True
    num_prototypes: int = 384
    sinkhorn_eps: float = 0.1
    sinkhorn_iters: int = 3
    proto_tau: float = 0.1
    proto_weight: float = 0.2
    proto_start: StartSpec = 2200

    # --- instance neighbourhood graph (section 2.6) --------------------------------------------
    use_graph: bool = True
    use_gcn: bool = True                    # the three GCN layers (AAHR); off -> HREM-style graph
    graph_start: StartSpec = 8000
    graph_weight: float = 1.0
    graph_sigma: float = 1.0                # paper Eq. (10)
    graph_rho: float = 0.5                  # top floor(rho B) neighbours per row
    graph_lam: float = 1.0                  # attention-bias weight lambda (1.0 F30K, 1.5 COCO)
    gcn_dropout: float = 0.6
    gcn_slope: float = 0.2
    relevance_slope: float = 0.1            # LeakyReLU slope of the region-word cosine
    inter_relevance: str = "scan"           # "scan" (AAHR/HREM mean relevance) or "chan" (hard assignment)
    graph_heads: int = 16
    graph_ff_dim: Optional[int] = None      # None -> embed_dim

    # --- momentum encoders + queues (section 2.4) ----------------------------------------------
    use_moco: bool = True
    queue_size: int = 2048
    moco_momentum: float = 0.999
    moco_tau: float = 0.07
    moco_weight: float = 1.0
    moco_start: StartSpec = 0               # extra warm-up; the loss also waits until the queue is full once

    # --- misc ----------------------------------------------------------------------------------
    ops_backend: Optional[str] = None       # forced aahr_fast.ops backend; None -> by device / AAHR_OPS_BACKEND

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        """Fill the fidelity switches left unset from :data:`PRESETS` [``preset``]; ``paper_compat`` forces
        :data:`PAPER_COMPAT_KEYS` to the authors' values. Raises ConfigError for an unknown preset."""
        if self.preset not in PRESETS:
            raise ConfigError(f"ModelConfig.preset={self.preset!r}: expected one of {tuple(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.paper_compat:
            for key in PAPER_COMPAT_KEYS:
                setattr(self, key, PRESETS["authors"][key])

    def validate(self) -> "ModelConfig":
        """Check ranges and enumerations; returns ``self``. Raises ConfigError naming the field."""
        def choice(name: str, allowed: tuple) -> None:
            val = getattr(self, name)
            if val not in allowed:
                raise ConfigError(f"ModelConfig.{name}={val!r}: expected one of {allowed}")

        choice("arch", _ARCHS)
        choice("loss", _LOSSES)
        choice("proj_norm", _NORMS)
        choice("img_proj", _PROJ)
        choice("txt_proj", _PROJ)
        choice("noglobal_pool", _NOGLOBAL_POOL)
        choice("inter_relevance", _INTER_REL)
        choice("text_mode", _TEXT_MODES)
        choice("preset", tuple(PRESETS))
        choice("init", _INITS)
        for name in PRESETS["ours"]:
            if name != "init" and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: expected true or false")
        for name in ("embed_dim", "frag_heads", "pool_heads", "maxk", "num_prototypes", "sinkhorn_iters",
                     "graph_heads", "queue_size", "dws_n"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ConfigError(f"ModelConfig.{name}={val!r}: expected a positive int")
        for name in ("img_mlp_hidden", "frag_ff_dim", "pool_head_dim", "graph_ff_dim"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ConfigError(f"ModelConfig.{name}={val!r}: expected None or a positive int")
        for name in ("dropout", "gcn_dropout"):
            val = getattr(self, name)
            if not 0.0 <= float(val) < 1.0:
                raise ConfigError(f"ModelConfig.{name}={val!r}: expected a probability in [0, 1)")
        if not 0.0 <= self.residual_beta <= 1.0:
            raise ConfigError(f"ModelConfig.residual_beta={self.residual_beta!r}: expected a value in [0, 1]")
        if not 0.0 <= self.moco_momentum <= 1.0:
            raise ConfigError(f"ModelConfig.moco_momentum={self.moco_momentum!r}: expected a value in [0, 1]")
        if not 0.0 < self.graph_rho <= 1.0:
            raise ConfigError(f"ModelConfig.graph_rho={self.graph_rho!r}: expected a value in (0, 1]")
        for name in ("sinkhorn_eps", "proto_tau", "moco_tau", "graph_sigma", "dws_min_dist", "dws_cutoff"):
            if not float(getattr(self, name)) > 0.0:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: expected a positive number")
        if self.margin < 0:
            raise ConfigError(f"ModelConfig.margin={self.margin!r}: expected >= 0")
        if self.embed_dim % self.frag_heads:
            raise ConfigError(f"ModelConfig.embed_dim={self.embed_dim} is not divisible by frag_heads={self.frag_heads}")
        if self.embed_dim % self.graph_heads:
            raise ConfigError(f"ModelConfig.embed_dim={self.embed_dim} is not divisible by graph_heads={self.graph_heads}")
        k = self.text_trainable_layers
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"ModelConfig.text_trainable_layers={k!r}: expected an int >= 0 (0 = all layers of the "
                              f"fine-tuned text backbone train; k = only the top k)")
        if k > 0 and self.text_mode != "finetune":
            raise ConfigError(f"ModelConfig.text_trainable_layers={k} needs text_mode='finetune' (text_mode="
                              f"{self.text_mode!r} trains no backbone layer); set text_trainable_layers=0")
        # the upper bound (the backbone's layer count) is checked where the backbone is loaded (TextBackbone)
        for name in ("proto_start", "graph_start", "moco_start"):
            parse_start(getattr(self, name), name)  # raises on a malformed spec
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict and validate it.

        Raises:
            ConfigError: an unknown key (the first in sorted order; the closest valid key is suggested, the
                same message as the YAML loader's: ``aahr_fast.utils.errors.unknown_key_error``), or an invalid value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            err = unknown_key_error("", unknown[0], sorted(names))
            more = f" (unknown keys: {unknown})" if len(unknown) > 1 else ""
            raise ConfigError(f"ModelConfig: {err}{more}")
        return cls(**data).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints / YAML)."""
        return dataclasses.asdict(self)


_EPOCH_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ep|epoch|epochs)\s*$", re.IGNORECASE)


def parse_start(spec: StartSpec, name: str = "start") -> tuple[str, float]:
    """Parse a warm-up start into ``("iter", n)``, ``("epoch", x)`` or ``("frac", f)``.

    Raises ConfigError (naming ``name``) for negative values, fractions above 1 or unreadable strings.
    """
    if isinstance(spec, bool):
        raise ConfigError(f"{name}={spec!r}: expected an int (iterations), 'Xep' (epochs) or a float fraction")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"{name}={spec!r}: iterations must be >= 0")
        return ("iter", float(spec))
    if isinstance(spec, float):
        if not (0.0 <= spec <= 1.0) or math.isnan(spec):
            raise ConfigError(f"{name}={spec!r}: a float is a fraction of training and must lie in [0, 1]")
        return ("frac", spec)
    if isinstance(spec, str):
        s = spec.strip()
        m = _EPOCH_RE.match(s)
        if m:
            return ("epoch", float(m.group(1)))
        if re.fullmatch(r"[0-9]+", s):
            return ("iter", float(int(s)))
        try:
            val = float(s)
        except ValueError:
            val = None
        if val is not None:
            return parse_start(val, name)
    raise ConfigError(f"{name}={spec!r}: expected an int (iterations), 'Xep' (epochs) or a float fraction in [0, 1]")


def resolve_start(spec: StartSpec, steps_per_epoch: Optional[int], total_steps: Optional[int],
                  name: str = "start") -> int:
    """Convert a warm-up start to an iteration number.

    Args:
        spec: see :func:`parse_start`.
        steps_per_epoch: optimiser steps per epoch (needed for ``"Xep"``).
        total_steps: optimiser steps of the whole run (needed for fractions).
    Returns:
        the first (0-based) iteration at which the part is active; ``ceil`` of the converted value.
    Raises:
        ConfigError when the needed count is missing or not positive.
    """
    kind, val = parse_start(spec, name)
    if kind == "iter":
        return int(val)
    if kind == "epoch":
        if not steps_per_epoch or steps_per_epoch < 1:
            raise ConfigError(f"{name}={spec!r} is given in epochs: call resolve_schedule(steps_per_epoch>0, ...) first")
        return int(math.ceil(val * steps_per_epoch - 1e-9))
    if not total_steps or total_steps < 1:
        raise ConfigError(f"{name}={spec!r} is a fraction of training: call resolve_schedule(..., total_steps>0) first")
    return int(math.ceil(val * total_steps - 1e-9))
