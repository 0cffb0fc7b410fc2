"""Tiny random-init models for tests and benchmarks: a BERT with a character WordPiece vocabulary.

Builds in seconds with no download; used by the test suite and by ``benchmarks/*`` at tiny scale.
"""

from __future__ import annotations

import string
from pathlib import Path

TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list(string.ascii_lowercase + string.digits)
    + ["##" + c for c in string.ascii_lowercase + string.digits]
    + list(".,;:!?'\"-()&/$%#")
)


def build_tiny_model(folder: Path, num_labels: int = 4, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny BERT classifier + fast tokenizer into ``folder`` (random init, seconds)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # the vocabulary as a dict: transformers 5 builds an empty WordPiece from ``vocab_file`` here, and every
    # word would become [UNK] (a test model that sees only the text's length)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(TINY_VOCAB)}, do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    return folder
