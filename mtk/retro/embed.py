"""Chunk embeddings with a BERT (mtk's BERT family holding Hugging Face weights).

A chunk's text is encoded as [CLS] wordpieces [SEP] (at most 256 tokens, as Megatron); its embedding is
the mean of the final hidden states over the wordpieces (not [CLS], [SEP] or padding), L2-normalised,
float32. Texts are batched by length, so that a batch pads little; the threads are the caller's
(``mtk.retro.ranks.join`` gives each rank its share of the node's cores).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtk.data.tokenizer import Tokenizer
from mtk.manifest import sha256_file

MAX_LENGTH = 256  # Megatron's retro_bert_max_chunk_length
BATCH = 64


class BertEmbedder:
    def __init__(self, folder: str | Path, tokenizer: Tokenizer, device: str = "cpu") -> None:
        from mtk.hf import architecture, hf_run_config, load_into, read_hf_config, read_hf_weights
        from mtk.models.bert import BertModel

        self.folder = Path(folder)
        hf = read_hf_config(self.folder)
        arch = architecture(hf.get("model_type"))
        config = hf_run_config(hf, {"model": {"seq_length": MAX_LENGTH}})
        self.model = BertModel(config.model)
        load_into(self.model, arch, read_hf_weights(self.folder, arch.base_prefix))
        self.model.eval().to(device)
        self.device = device
        self.tokenizer = tokenizer
        self.cls, self.sep = tokenizer.special_ids["cls"], tokenizer.special_ids["sep"]
        self.pad = tokenizer.special_ids["pad"]
        self.dim = config.model.hidden_size

    @functools.cached_property
    def description(self) -> dict[str, Any]:
        """Folder, width and file hashes: what the index records (hashed once: the weights are large)."""
        files = sorted(p for p in self.folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
        return {"folder": str(self.folder.resolve()), "dim": self.dim,
                "files": {p.name: sha256_file(p) for p in files}}  # fmt: skip

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str], grouped: bool = True) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised. ``grouped``: batch the texts by length (sorted by
        wordpieces, returned in their order), so that a batch pads little; off: batches in text order."""
        # an empty chunk (whitespace only) still gets a vector: [CLS] [PAD] [SEP], as Megatron
        ids = [row[: MAX_LENGTH - 2] or [self.pad] for row in self.tokenizer.encode_batch(list(texts))]
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = np.argsort([len(row) for row in ids], kind="stable") if grouped else np.arange(len(ids))
        for first in range(0, len(order), BATCH):
            rows = order[first : first + BATCH]
            out[rows] = self._embed([ids[i] for i in rows]).numpy()
        return out

    def _embed(self, batch: list[list[int]]) -> torch.Tensor:
        """Normalised mean of the final states over each row's wordpieces (cls and sep added here)."""
        lengths = torch.tensor([len(piece) for piece in batch])
        tokens = torch.full((len(batch), int(lengths.max()) + 2), self.pad, dtype=torch.long)
        for j, piece in enumerate(batch):
            tokens[j, : len(piece) + 2] = torch.tensor([self.cls, *piece, self.sep])
        position = torch.arange(tokens.shape[1])
        present = position < lengths[:, None] + 2
        words = (position >= 1) & (position <= lengths[:, None])
        padded = not bool(present.all())  # an unpadded batch needs no attention mask
        mask = present.long().to(self.device) if padded else None
        states = self.model.hidden_states(tokens.to(self.device), None, mask).float()
        words = words[..., None].to(self.device, torch.float32)
        mean = (states * words).sum(1) / words.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(mean, dim=-1).cpu()
