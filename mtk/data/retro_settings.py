"""The config keys a RETRO project's build-db fixes, in one place: ``mtk retro build-db`` takes them as
flags (``stages/retro.py``, which imports this at CLI start-up, so it imports nothing) and records them
under their config.json names; ``mtk train --retro-project`` inherits them
(``mtk.data.retro_project.INHERITED``)."""

BUILD_DB_KEYS = ("data_path", "retro_chunk_length", "seq_length", "split", "seed", "train_samples",
                 "global_batch_size", "eval_interval", "eval_iters", "data_cache_path")  # fmt: skip
