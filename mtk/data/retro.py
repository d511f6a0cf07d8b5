"""RETRO training samples: a GPT sample and, for each of its chunks, the tokens of its neighbours."""

from __future__ import annotations

import numpy as np
import torch

RETRIEVED_CHUNKS = 2  # a neighbour is its chunk and the one after it (Megatron's retro_num_retrieved_chunks)


def neighbour_shape(seq_length: int, chunk_length: int, num_neighbors: int) -> tuple[int, int, int]:
    """(chunks, k, r) of one sample's neighbour tokens."""
    return seq_length // chunk_length, num_neighbors, RETRIEVED_CHUNKS * chunk_length


def sample_documents(dataset, index: int) -> list[tuple[int, int]]:
    """(dataset of the blend, document) pairs that GPT sample ``index`` of ``dataset`` takes tokens from."""
    from mtk.data.blended import BlendedDataset

    if isinstance(dataset, BlendedDataset):
        which = int(dataset.dataset_index[index])
        inner = sample_documents(dataset.datasets[which], int(dataset.dataset_sample_index[index]))
        return [(which, doc) for _, doc in inner]
    return [(0, int(doc)) for doc in dataset.sample_documents(index)]


class RetroDataset:
    """GPT samples with ``neighbours`` (chunks, k, 2 x chunk length): for every chunk of the sample its
    first k saved neighbours, each the database chunk and the one after it in the same document
    (end-of-document tokens where the document ends, a chunk is short, or a neighbour is missing)."""

    def __init__(
        self,
        samples,
        neighbours: np.ndarray,
        chunks: np.ndarray,
        datasets: list,
        num_neighbors: int,
        chunk_length: int,
        eod: int,
    ) -> None:
        self.samples, self.neighbours, self.chunks, self.datasets = samples, neighbours, chunks, datasets
        self.k, self.m, self.eod = num_neighbors, chunk_length, eod

    def __len__(self) -> int:
        return len(self.samples)

    def _chunk(self, row: int) -> np.ndarray:
        out = np.full(self.m, self.eod, dtype=np.int64)
        if 0 <= row < len(self.chunks):
            dataset, doc, start, end, _ = (int(v) for v in self.chunks[row])
            out[: end - start] = self.datasets[dataset].get(doc, start, end - start)
        return out

    def _continuation(self, row: int) -> int:
        following = row + 1
        if row < 0 or following >= len(self.chunks):
            return -1
        same = (self.chunks[following, :2] == self.chunks[row, :2]).all()
        return following if same else -1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        rows = self.neighbours[index, :, : self.k]
        tokens = np.stack(
            [
                np.stack(
                    [np.concatenate([self._chunk(r), self._chunk(self._continuation(r))]) for r in chunk]
                )
                for chunk in rows.tolist()
            ]
        )
        return sample | {"neighbours": torch.from_numpy(tokens)}
