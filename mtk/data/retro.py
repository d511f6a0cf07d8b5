"""RETRO training samples: a GPT sample and, for each of its chunks, the tokens of its neighbours."""

from __future__ import annotations

import numpy as np
import torch

from mtk.data.retro_project import check_ids

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
        return len(self.neighbours)  # the samples queried: those a run reads

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        # ids read back from the project: never trusted to lie inside the database
        where = getattr(self.neighbours, "filename", None) or "the saved neighbours"
        rows = check_ids(
            np.asarray(self.neighbours[index, :, : self.k]), len(self.chunks), where, "query-neighbours"
        )
        tokens = neighbour_tokens(rows, self.chunks, self.datasets, self.m, self.eod)
        return sample | {"neighbours": torch.from_numpy(tokens)}


def neighbour_tokens(
    rows: np.ndarray, chunks: np.ndarray, datasets: list, chunk_length: int, eod: int
) -> np.ndarray:
    """Tokens (..., 2 x chunk length) of database chunks ``rows`` (-1: none), each followed by the next
    chunk of its document; end-of-document tokens fill what a short chunk, a document's end or a
    missing neighbour leave."""

    def chunk(row: int) -> np.ndarray:
        out = np.full(chunk_length, eod, dtype=np.int64)
        if 0 <= row < len(chunks):
            dataset, doc, start, end, _ = (int(v) for v in chunks[row])
            out[: end - start] = datasets[dataset].get(doc, start, end - start)
        return out

    def following(row: int) -> int:
        same = 0 <= row < len(chunks) - 1 and (chunks[row + 1, :2] == chunks[row, :2]).all()
        return row + 1 if same else -1

    flat = [np.concatenate([chunk(r), chunk(following(r))]) for r in rows.reshape(-1).tolist()]
    return np.stack(flat).reshape(*rows.shape, 2 * chunk_length)
