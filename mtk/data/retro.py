"""RETRO training samples: a GPT sample and, for each of its chunks, the tokens of its neighbours."""

from __future__ import annotations

RETRIEVED_CHUNKS = 2  # a neighbour is its chunk and the one after it (Megatron's retro_num_retrieved_chunks)


def neighbour_shape(seq_length: int, chunk_length: int, num_neighbors: int) -> tuple[int, int, int]:
    """(chunks, k, r) of one sample's neighbour tokens."""
    return seq_length // chunk_length, num_neighbors, RETRIEVED_CHUNKS * chunk_length
