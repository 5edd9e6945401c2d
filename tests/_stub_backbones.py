"""Stand-in for the frozen MiniLM text backbone in ``prepare`` tests (tests/test_bad_inputs.py,
tests/test_small_fixes.py): a :class:`aahr_fast.backbones.TextBackbone` subclass with its interface
(``tokenize``, ``forward``, ``dim``, ``model_path``) and word-hash embeddings, so prepare runs in
milliseconds without the ~10 s BERT load.

Not a test module (no ``test_`` prefix); imported by name because pytest puts ``tests/`` on ``sys.path``.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch


def stub_text_backbone(model_path: str | Path | None = None, dim: int = 8, vocab: int = 1024):
    """A text backbone whose identity is ``model_path`` (default: the packaged MiniLM folder, whose
    ``config.json`` prepare reads); token ids are ``[1, hash(word) ..., 2]`` with ``3 <= hash < vocab - 1``,
    features (B, L, dim) from an embedding table, the sentence vector their L2-normalised sum."""
    from aahr_fast.backbones import TextBackbone, default_text_model

    class Stub(TextBackbone):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.model_path = str(model_path or default_text_model())
            self.name, self.dim, self.trainable, self.max_length = "stub", dim, False, 64
            self.table = torch.nn.Embedding(vocab, dim)
            self.trainable_layers, self.split = 0, 0

        def frozen_modules(self):
            return [self.table]   # the whole stub is frozen, as a frozen TextBackbone's whole BERT

        def tokenize(self, captions):
            seqs = [[1, *(3 + zlib.crc32(w.encode()) % (vocab - 4) for w in c.split()), 2] for c in captions]
            ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
            return ids, torch.tensor([len(s) for s in seqs])

        def forward(self, input_ids, lengths):
            mask = torch.arange(input_ids.shape[1])[None] < lengths[:, None]
            tok = self.table(input_ids) * mask[..., None]
            return tok, torch.nn.functional.normalize(tok.sum(1), dim=-1)

    return Stub()


def stub_image_backbone(weights: str | Path, image_size: int = 32):
    """A stand-in for the EfficientNet-Lite0 image backbone whose identity is ``weights`` (any existing
    file): a 2x2 grid of mean colours through a 3->6 linear map, so regions are (B, 4, 6) and the global
    vector their mean (B, 6). Runs in milliseconds."""
    from aahr_fast.backbones import ImageBackbone

    class StubImage(ImageBackbone):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.weights_path, self.image_size, self.grid, self.num_regions, self.region_dim = \
                str(weights), image_size, 2, 4, 6
            self.lin = torch.nn.Linear(3, 6)

        def forward(self, x):
            cells = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
            regions = self.lin(cells)
            return regions, regions.mean(1)

    return StubImage()
