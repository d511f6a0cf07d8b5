"""Sentence splitting for ``--split-sentences`` (BERT-style data).

We use ``sentencex`` (Wikimedia's rule-based segmenter: pure Python, no dependencies, no model
download, ~300 languages) instead of Megatron's NLTK punkt, which needs a data download.
"""

from __future__ import annotations

from sentencex import segment


def split_sentences(text: str, language: str = "en") -> list[str]:
    """Sentences of ``text`` with surrounding whitespace removed; empty pieces dropped."""
    return [sentence.strip() for sentence in segment(language, text) if sentence.strip()]
