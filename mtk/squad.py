"""SQuAD v1.1 with a T5 run: read the files, fine-tune text-to-text, answer greedily, score as the
official evaluation script does.

Each question becomes ``question: Q context: C`` -> the answer. A context longer than the encoder
length is truncated (its end is cut; the question is always whole), so an answer that lies beyond
the cut cannot be found: ``SquadExamples.truncated`` counts such questions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mtk.config import RunConfig


class SquadError(ValueError):
    """A SQuAD file that is not SQuAD v1.1, named with the place that is wrong."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # the gold answers' texts


def read_squad(path: str | os.PathLike) -> list[Question]:
    """The questions of a SQuAD v1.1 JSON file (``{"data": [{"title", "paragraphs": [{"context",
    "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SquadError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise SquadError(f'{path}: expected a SQuAD object {{"version": ..., "data": [articles]}}')
    if str(data.get("version", "")).startswith("v2"):
        raise SquadError(
            f"{path}: SQuAD {data['version']} (unanswerable questions); eval-squad scores SQuAD v1.1"
        )
    questions, seen = [], set()
    for a, article in enumerate(data["data"]):
        where = f"{path}: article {a}" + (
            f" ({article['title']!r})" if isinstance(article, dict) and "title" in article else ""
        )
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise SquadError(f"{where}: no 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not isinstance(paragraph.get("qas"), list):
                raise SquadError(f"{where}, paragraph {p}: needs a 'context' string and a 'qas' list")
            for q, qa in enumerate(paragraph["qas"]):
                qid = qa.get("id") if isinstance(qa, dict) else None
                place = (
                    f"{where}, paragraph {p}, question {qid!r}"
                    if qid is not None
                    else f"{where}, paragraph {p}, question {q}"
                )
                if not isinstance(qid, str) or not isinstance(qa.get("question"), str):
                    raise SquadError(f"{place}: needs an 'id' and a 'question' string")
                if qa.get("is_impossible") or "plausible_answers" in qa:
                    raise SquadError(
                        f"{place}: an unanswerable (SQuAD 2.0) question; eval-squad scores SQuAD v1.1"
                    )
                answers = qa.get("answers")
                texts = (
                    [ans.get("text") for ans in answers]
                    if isinstance(answers, list) and all(isinstance(ans, dict) for ans in answers)
                    else None
                )
                if not texts or not all(isinstance(text, str) for text in texts):
                    raise SquadError(f"{place}: needs 'answers', a list of {{'text': ...}} (at least one)")
                if qid in seen:
                    raise SquadError(f"{place}: the id is used twice")
                seen.add(qid)
                questions.append(Question(qid, qa["question"], context, tuple(texts)))
    if not questions:
        raise SquadError(f"{path}: no questions")
    return questions


# ---- the official SQuAD v1.1 evaluation (evaluate-v1.1.py), the same arithmetic ---------------


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(predicted) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_metrics(questions: list[Question], predictions: dict[str, str]) -> dict[str, float]:
    """Exact match and F1 in percent, each the max over a question's gold answers, averaged over
    every question (a question without a prediction scores 0, as the official script counts it)."""
    em = f1 = 0.0
    for question in questions:
        prediction = predictions.get(question.id)
        if prediction is None:
            continue
        em += max(exact_match(prediction, truth) for truth in question.answers)
        f1 += max(f1_score(prediction, truth) for truth in question.answers)
    count = len(questions)
    return {"exact_match": 100.0 * em / count, "f1": 100.0 * f1 / count, "questions": count}


# ---- T5 samples -----------------------------------------------------------------------------


class SquadExamples:
    """Questions as T5 samples (the pretraining dataset's keys), encoded once with the run's tokenizer.

    ``num_samples`` > the questions cycles through them, each pass in its own order drawn from
    ``seed``: sample ``i`` is a pure function of ``i``, so fine-tuning resumes exactly.
    """

    def __init__(self, questions, tokenizer, ids, encoder_length: int, decoder_length: int,
                 num_samples: int | None = None, seed: int = 1234) -> None:  # fmt: skip
        self.questions, self.ids = questions, ids
        self.encoder_length, self.decoder_length = encoder_length, decoder_length
        self.num_samples = num_samples or len(questions)
        self.seed = seed
        prompts = tokenizer.encode_batch([f"question: {q.question} context:" for q in questions])
        contexts = tokenizer.encode_batch([q.context for q in questions])
        answers = tokenizer.encode_batch([q.answers[0] for q in questions])
        self.encoder, self.truncated = [], 0
        for prompt, context, question in zip(prompts, contexts, questions, strict=True):
            room = encoder_length - len(prompt)
            if room < 1:
                raise SquadError(
                    f"question {question.id!r}: the question alone fills the encoder length {encoder_length}"
                )
            self.truncated += len(context) > room
            self.encoder.append(prompt + context[:room])
        self.answers = [answer[: decoder_length - 1] for answer in answers]

    def __len__(self) -> int:
        return self.num_samples

    def _question(self, index: int) -> int:
        count = len(self.questions)
        epoch, position = divmod(index, count)
        return int(np.random.default_rng([self.seed, epoch]).permutation(count)[position])

    def encoder_batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder inputs and mask of questions ``rows``, padded to their longest."""
        longest = max(len(self.encoder[r]) for r in rows)
        tokens = torch.full((len(rows), longest), self.ids.pad)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(self.encoder[r])] = torch.tensor(self.encoder[r])
            mask[i, : len(self.encoder[r])] = 1
        return tokens, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        q = self._question(index)
        encoder, answer, ids = self.encoder[q], self.answers[q], self.ids
        decoder_in, labels = [ids.bos, *answer], [*answer, ids.eos]
        enc_pad, dec_pad = self.encoder_length - len(encoder), self.decoder_length - len(decoder_in)
        return {
            "text_enc": torch.tensor(encoder + [ids.pad] * enc_pad),
            "text_dec": torch.tensor(decoder_in + [ids.pad] * dec_pad),
            "labels": torch.tensor(labels + [-1] * dec_pad),
            "loss_mask": torch.tensor([1] * len(labels) + [0] * dec_pad),
            "enc_mask": torch.tensor([1] * len(encoder) + [0] * enc_pad),
            "dec_mask": torch.tensor([1] * len(decoder_in) + [0] * dec_pad),
        }


def answer_questions(model, examples: SquadExamples, tokenizer, batch_size: int, max_answer_tokens: int,
                     device: str, progress=None) -> dict[str, str]:  # fmt: skip
    """Greedy answers (batched, KV cache) to every question of ``examples``, decoded to text."""
    from mtk.generate import generate_seq2seq

    model.eval()
    predictions = {}
    order = sorted(range(len(examples.questions)), key=lambda r: len(examples.encoder[r]))  # less padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        tokens, mask = examples.encoder_batch(rows)
        answers = generate_seq2seq(
            model, tokens.to(device), mask.to(device), examples.ids.bos, examples.ids.eos, max_answer_tokens
        )
        for row, answer in zip(rows, answers, strict=True):
            predictions[examples.questions[row].id] = tokenizer.decode(answer) if answer else ""
        if progress is not None:
            progress(len(rows))
    return predictions


@dataclass
class SquadOptions:
    """What ``mtk eval-squad`` was asked: fine-tuning (skipped with ``finetune_iters`` 0) and answering."""

    out: Path  # run directory of the fine-tuning; squad/ inside it holds the results
    finetune_iters: int = 1000
    lr: float = 1e-4
    micro_batch_size: int = 8
    global_batch_size: int = 32
    max_answer_tokens: int = 32
    eval_batch_size: int = 32
    device: str = "cpu"
    log_interval: int = 50


def evaluate_squad(load: str | os.PathLike, train_file: str | None, dev_file: str, options: SquadOptions,
                   show=None, progress=None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune the T5 of run ``load`` on ``train_file`` (unless ``finetune_iters`` is 0), answer the
    questions of ``dev_file`` and write ``squad/predictions.json``, ``squad/metrics.json`` and
    ``squad/mtk.json`` in ``options.out``; returns the metrics."""
    from mtk.checkpoint import RunDir, checkpoint_description, load_checkpoint
    from mtk.config import ConfigError, RunConfig
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import tokenizer_from_manifest
    from mtk.manifest import atomic_write_text, describe_file, write_manifest

    description = checkpoint_description(load)
    config = RunConfig.from_dict(description["config"], where=f"{load} (checkpoint config)")
    if config.model.family != "t5":
        raise ConfigError(f"{load}: a {config.model.family} run; eval-squad fine-tunes and evaluates T5 runs")
    entry = description.get("tokenizer")
    if not entry:
        raise ConfigError(f"{load}: trained on mock data, without a tokenizer to read SQuAD's text with")
    ids = WordPieceIds.from_manifest(entry, "t5", sentinels=True)
    tokenizer = tokenizer_from_manifest(entry)
    dev = read_squad(dev_file)
    train = read_squad(train_file) if options.finetune_iters and train_file else None
    if options.finetune_iters and train is None:
        raise ConfigError(
            "fine-tuning needs --train-file (or --no-finetune to evaluate the checkpoint as it is)"
        )
    from mtk.train.build import build_model, check_config

    model_config = config.model
    out, iteration = Path(options.out), description["iteration"]
    if train is not None:
        tuned = finetune_config(config, options)
        check_config(tuned, 1, options.device, ignore=("data",))  # SQuAD is neither --data nor mock data
        model_config = tuned.model  # completed by the family (T5: the decoder depth)
        encoder_length = model_config.seq_length
        decoder_length = model_config.decoder_seq_length or model_config.seq_length
        samples = options.finetune_iters * options.global_batch_size
        examples = SquadExamples(
            train, tokenizer, ids, encoder_length, decoder_length, samples, tuned.train.seed
        )
        # built as `mtk train` builds it (FP8, recomputation ... of the run), on one process
        built = build_model(tuned, options.device, check=False)
        if not RunDir(out).checkpoints():  # a fresh fine-tuning starts from the weights of --load
            built.module.load_state_dict(load_checkpoint(load)["model"])
        finetuned, iteration = _finetune(tuned, built.model, examples, entry, options, show)
        weights = finetuned.state_dict()  # plain parameter names, through recomputation wrappers
        model = build_model(tuned, options.device, training=False).module  # answers as generate does
        model.load_state_dict(weights)
    else:
        model = build_model(config, options.device, training=False).module
        model.load_state_dict(load_checkpoint(load)["model"])
        model_config = model.config
        encoder_length = model_config.seq_length
        decoder_length = model_config.decoder_seq_length or model_config.seq_length
    model = model.to(options.device)
    dev_examples = SquadExamples(dev, tokenizer, ids, encoder_length, decoder_length)
    predictions = answer_questions(
        model,
        dev_examples,
        tokenizer,
        options.eval_batch_size,
        options.max_answer_tokens,
        options.device,
        progress,
    )
    metrics = {
        **squad_metrics(dev, predictions),
        "truncated_contexts": dev_examples.truncated,
        "finetune_iterations": options.finetune_iters if train is not None else 0,
        "checkpoint_iteration": iteration,
    }
    folder = out / "squad"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        folder / "predictions.json", json.dumps(predictions, indent=1, ensure_ascii=False) + "\n"
    )
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_manifest(
        folder / "mtk.json",
        stage="eval-squad",
        load=str(Path(load).resolve()),
        inputs=[describe_file(dev_file)] + ([describe_file(train_file)] if train is not None else []),
        tokenizer=entry,
        metrics=metrics,
        outputs=[describe_file(folder / "predictions.json"), describe_file(folder / "metrics.json")],
    )
    return metrics


def finetune_config(config: RunConfig, options: SquadOptions) -> RunConfig:
    """The config of the fine-tuning of run ``config`` on SQuAD: its model, ``options``' batches and
    length, a linear decay from ``options.lr`` to 0 without warm-up, no evaluation, one save at the
    end, one process (the run's FP8 and recomputation kept; its data replaced by SQuAD's)."""
    from mtk.train.build import one_process

    train = dataclasses.replace(
        config.train,
        train_iters=options.finetune_iters,
        train_samples=None,
        micro_batch_size=options.micro_batch_size,
        global_batch_size=options.global_batch_size,
        batch_size_ramp=None,
        rampup_batch_size=None,
        lr=options.lr,
        min_lr=0.0,
        lr_decay_style="linear",
        lr_decay_iters=None,
        lr_decay_samples=None,
        lr_wsd_decay_iters=None,
        lr_wsd_decay_samples=None,
        lr_warmup_iters=0,
        lr_warmup_fraction=None,
        lr_warmup_samples=None,
        eval_interval=0,
        save_interval=None,
        log_interval=max(1, min(options.log_interval, options.finetune_iters)),
    )
    data = dataclasses.replace(config.data, data_path=None, mock_data=False)
    return dataclasses.replace(config, train=train, data=data, parallel=one_process(config.parallel))


def _finetune(config, model, examples, tokenizer_entry, options: SquadOptions, show):
    """Train ``model`` on ``examples`` into the run directory ``options.out`` (resuming its own
    checkpoint if it has one); returns the model and the iteration reached."""
    from mtk.checkpoint import RunDir
    from mtk.data.prepared import DataFacts
    from mtk.train.loop import Trainer, TrainOptions
    from mtk.train.metrics import MetricsLogger
    from mtk.train.run import seed_everything, write_run_description

    run_dir = RunDir(options.out)
    seed_everything(config.train.seed)
    with run_dir.lock():
        trainer = Trainer(
            config, model, (examples, None, None), TrainOptions(save=str(options.out), device=options.device, num_workers=0),
            tokenizer=tokenizer_entry,
        )  # fmt: skip
        facts = DataFacts(config.model.vocab_size, tokenizer_entry.get("eod"), tokenizer_entry, [])
        write_run_description(config, run_dir, facts, sum(p.numel() for p in model.parameters()))
        logger = MetricsLogger(run_dir, None, None, options.device, show, enabled=True)
        try:
            if trainer.resume():
                logger.message(f"resumed the fine-tuning from iteration {trainer.state.iteration}")
            logger.forget_after(trainer.state.iteration)
            state = trainer.run(logger)
        finally:
            logger.close()
    return trainer.model.parts[0], state.iteration
