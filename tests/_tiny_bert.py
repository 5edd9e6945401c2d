"""A tiny, randomly initialised BERT saved to a local folder, for tests that need a fine-tuned text backbone
without network access (bert-base-uncased is not available offline). Hidden 768 gives bert-base's true
token width at a fraction of its cost (1 layer, small vocabulary)."""
from __future__ import annotations

from pathlib import Path

#: WordPiece vocabulary: the five special tokens first ([PAD] = 0), whole words, then continuation pieces.
WORDS = ["a", "the", "dog", "cat", "man", "runs", "on", "grass", "red", "ball", "with", "in", "of", "play",
         "ing", "jump", "park", "two", "small", "white", ".", ","]
PIECES = ["##s", "##ing", "##ed", "##er", "##y"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + PIECES


def make_tiny_bert(folder: str | Path, hidden: int = 768, layers: int = 1, heads: int = 12,
                   intermediate: int = 256, seed: int = 0) -> Path:
    """Write ``config.json``, weights and a WordPiece tokenizer (``vocab.txt``) of a random BERT to ``folder``.

    Returns the folder. ``hidden`` must be divisible by ``heads``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder
