"""Can a small T5 learn to look an answer up in a long context? A generated reading task from real
SQuAD sentences, for mtk's T5 and, as a check, Hugging Face's ``T5ForConditionalGeneration``.

    python benchmarks/squad_toy.py make --train-file train-v1.1.json --out toy
    mtk eval-squad --load RUN --train-file toy/train.json --dev-file toy/dev.json --finetune-iters 1500 \\
        --lr 1e-3 --micro-batch-size 16 --global-batch-size 32 --eval-batch-size 64 --out toy/mtk
    python benchmarks/squad_toy.py hf --load RUN --toy toy --steps 1500 [--lr 1e-3] [--megatron-init]

``make``: 2,000 training and 50 dev articles of 4 paragraphs; each paragraph is six sentences of the
SQuAD training contexts with "the favourite word of NAME is WORD ." inserted at a random place (10
names, 500 words), and asks "what is the favourite word of NAME ?" (about 170 tokens of context).
``hf``: Hugging Face's T5 of the reference run's shape (``RUN``'s hidden size, layers and heads;
ReLU, tied embeddings, relative positions) trained from scratch in a bare PyTorch loop on the very
examples ``eval-squad`` trains on (mtk's ``SquadExamples`` with ``RUN``'s tokenizer), initialised as
T5 is (``--megatron-init``: every matrix from N(0, 0.02), as Megatron does): batches of 32,
AdamW, lr warm-up over 10% then linear decay, clipping at 1.0; then greedy answers to the dev
questions and their exact match. docs/bert-t5-squad.md has the results. Not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

NAMES = ["anna", "boris", "clara", "david", "elena", "felix", "george", "helen", "ivan", "julia"]


def make(train_file: Path, out: Path) -> None:
    rng = random.Random(0)
    squad = json.loads(train_file.read_text(encoding="utf-8"))
    paragraphs = [p["context"] for a in squad["data"] for p in a["paragraphs"]]
    sentences = [s for p in paragraphs[:3000] for s in re.split(r"(?<=\.) ", p) if 40 < len(s) < 200]
    words = sorted({w for s in sentences[:2000] for w in re.findall(r"[a-z]{5,9}", s.lower())})
    rng.shuffle(words)
    words = words[:500]

    def articles(count: int, seed: int) -> dict:
        draw, data = random.Random(seed), []
        for a in range(count):
            paragraphs = []
            for p in range(4):
                name, word = draw.choice(NAMES), draw.choice(words)
                filler = draw.sample(sentences, 6)
                filler.insert(draw.randrange(7), f"the favourite word of {name} is {word} .")
                context = " ".join(filler)
                question = {"id": f"q{seed}-{a}-{p}", "question": f"what is the favourite word of {name} ?",
                            "answers": [{"text": word, "answer_start": context.index(f" {word} .") + 1}]}  # fmt: skip
                paragraphs.append({"context": context, "qas": [question]})
            data.append({"title": f"s{a}", "paragraphs": paragraphs})
        return {"version": "1.1", "data": data}

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(articles(2000, 1)), encoding="utf-8")
    (out / "dev.json").write_text(json.dumps(articles(50, 2)), encoding="utf-8")
    print(f"wrote {out / 'train.json'} and {out / 'dev.json'}")


def hf(load: Path, toy: Path, steps: int, lr: float, megatron_init: bool) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from mtk.checkpoint import checkpoint_description
    from mtk.config import RunConfig
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import tokenizer_from_manifest
    from mtk.squad import SquadExamples, exact_match, read_squad

    torch.manual_seed(0)
    description = checkpoint_description(load)
    model_config = RunConfig.from_dict(description["config"]).model
    entry = description["tokenizer"]
    ids, tokenizer = WordPieceIds.from_manifest(entry, "t5", sentinels=True), tokenizer_from_manifest(entry)
    train, dev = read_squad(toy / "train.json"), read_squad(toy / "dev.json")
    encoder, decoder, batch = model_config.seq_length, model_config.decoder_seq_length or 64, 32
    examples = SquadExamples(train, tokenizer, ids, encoder, decoder, steps * batch, 1234)
    questions = SquadExamples(dev, tokenizer, ids, encoder, decoder)
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    config = T5Config(vocab_size=model_config.padded_vocab_size(), d_model=hidden, d_kv=hidden // heads,
                      d_ff=model_config.ffn_hidden_size, num_layers=model_config.num_layers,
                      num_decoder_layers=model_config.decoder_num_layers or model_config.num_layers,
                      num_heads=heads, dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True,
                      decoder_start_token_id=ids.bos, pad_token_id=ids.pad, eos_token_id=ids.eos)  # fmt: skip
    model = T5ForConditionalGeneration(config)
    if megatron_init:  # every matrix from N(0, 0.02), as Megatron (and mtk's T5) initialise
        for parameter in model.parameters():
            if parameter.dim() > 1:
                torch.nn.init.normal_(parameter, 0.0, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    start, smoothed = time.perf_counter(), None
    for step in range(steps):
        rows = [examples[step * batch + i] for i in range(batch)]
        stack = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        labels = stack["labels"].masked_fill(stack["loss_mask"] == 0, -100)
        loss = model(input_ids=stack["text_enc"], attention_mask=stack["enc_mask"],
                     decoder_input_ids=stack["text_dec"], labels=labels).loss  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if (step + 1) % 50 == 0:
            print(
                f"step {step + 1}: answer loss {smoothed:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    right = 0.0
    with torch.no_grad():
        for first in range(0, len(dev), 50):
            rows = list(range(first, min(first + 50, len(dev))))
            tokens, mask = questions.encoder_batch(rows)
            answers = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=8, do_sample=False)
            for row, answer in zip(rows, answers.tolist(), strict=True):
                answer = [t for t in answer[1:] if t != ids.pad]
                answer = answer[: answer.index(ids.eos)] if ids.eos in answer else answer
                right += exact_match(questions.answer_text(row, answer), dev[row].answers[0])
    print(f"exact match {100 * right / len(dev):.1f}% on {len(dev)} dev questions")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make", help="Write the toy's train.json and dev.json.")
    making.add_argument("--train-file", type=Path, required=True, help="SQuAD v1.1 train-v1.1.json")
    making.add_argument("--out", type=Path, required=True)
    training = commands.add_parser("hf", help="Train Hugging Face's T5 of RUN's shape on the toy.")
    training.add_argument("--load", type=Path, required=True, help="The mtk T5 run (shape, tokenizer).")
    training.add_argument("--toy", type=Path, required=True, help="The folder `make` wrote.")
    training.add_argument("--steps", type=int, default=1500)
    training.add_argument("--lr", type=float, default=1e-3)
    training.add_argument(
        "--megatron-init", action="store_true", help="Draw every matrix from N(0, 0.02), as Megatron does."
    )
    args = parser.parse_args()
    if args.command == "make":
        make(args.train_file, args.out)
    else:
        hf(args.load, args.toy, args.steps, args.lr, args.megatron_init)


if __name__ == "__main__":
    main()
