"""What BERT and T5 share as families: masked sentence-group samples, their WordPiece ids, and the
layouts a bidirectional encoder cannot run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from mtk.config import RunConfig
from mtk.models.spec import TrainableFamily


class MaskedLMFamily(TrainableFamily):
    """A family trained on masked sentence groups (``mtk.data.masking``) of WordPiece data."""

    needs_sentinels: ClassVar[bool] = False  # T5: the data needs --vocab-extra-ids
    train_data = "sentence"

    def layout_problems(self, config: RunConfig) -> list[str]:
        found = super().layout_problems(config)
        if config.parallel.context_parallel_size > 1:
            found.append(
                f"family '{self.name}': context parallelism shards causal attention by position; a "
                "bidirectional encoder attends to the whole sequence, so run it with --cp 1 (its "
                "sequences are 512 tokens: TP and DP fit them)"
            )
        return found

    def masking(self, config: RunConfig):
        from dataclasses import replace

        from mtk.data.masking import BERT_MASKING, T5_MASKING

        recipe = T5_MASKING if self.needs_sentinels else BERT_MASKING
        return replace(recipe, probability=config.data.mask_prob)

    def split_datasets(
        self, config: RunConfig, num_samples: tuple[int, int, int], facts: Any, make: Callable[..., Any]
    ) -> tuple[Any, Any, Any]:
        """Train, valid and test datasets of ``make(indexed, split, split_index, count, ids=...,
        cache_dir=...)``: over mock sentences, or the prepared data with its manifest's vocabulary."""
        data = config.data
        if data.mock_data:
            from mtk.data.mock import mock_sentences, mock_wordpiece_ids

            ids = mock_wordpiece_ids(config.model.vocab_size, sentinels=100 if self.needs_sentinels else 0)
            datasets = []
            for i, count in enumerate(num_samples):
                if not count:
                    datasets.append(None)
                    continue
                indexed, cache = mock_sentences(ids, config.model.vocab_size, config.train.seed + i)
                datasets.append(make(indexed, "1,0,0", 0, count, ids=ids, cache_dir=cache))
            return tuple(datasets)
        from mtk.data.blended import build_split_datasets
        from mtk.data.masking import WordPieceIds

        ids = WordPieceIds.from_manifest(facts.tokenizer if facts else None, self.name, self.needs_sentinels)
        return build_split_datasets(
            data.data_path,
            data.split,
            num_samples,
            lambda *args, **kwargs: make(*args, ids=ids, **kwargs),
            data.data_cache_path,
        )
