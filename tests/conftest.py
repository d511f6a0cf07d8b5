"""Fixtures shared by several test folders."""

from __future__ import annotations

import numpy as np
import pytest

from mtk.data.indexed import IndexWriter


@pytest.fixture
def write_corpus(tmp_path):
    """Factory: write ``documents`` (token lists, one sequence each) as ``tmp_path/NAME.bin/.idx``.

    Returns the prefix as a string.
    """

    def write(name: str, documents: list[list[int]], dtype: type = np.uint16) -> str:
        writer = IndexWriter(np.dtype(dtype))
        writer.add_documents([len(document) for document in documents], [1] * len(documents))
        prefix = tmp_path / name
        tokens = np.array([token for document in documents for token in document], dtype=dtype)
        (tmp_path / f"{name}.bin").write_bytes(tokens.tobytes())
        (tmp_path / f"{name}.idx").write_bytes(writer.to_bytes())
        return str(prefix)

    return write
