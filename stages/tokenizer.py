"""``mtk tokenizer train``: make a vocabulary from local text, with no internet."""

from __future__ import annotations

import typer

SUMMARY = "Train a GPT-2 style byte-level BPE or a BERT WordPiece vocabulary from local files."
app = typer.Typer(no_args_is_help=True, help=SUMMARY)
