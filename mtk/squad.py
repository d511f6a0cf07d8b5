"""SQuAD v1.1 with a T5 run: read the files, fine-tune text-to-text, answer greedily, score as the
official evaluation script does.

Each question becomes ``question: Q context: C`` -> the answer. A context longer than the encoder
length is truncated (its end is cut; the question is always whole), so an answer that lies beyond
the cut cannot be found: ``SquadExamples.truncated`` counts the truncated contexts and
``SquadExamples.answers_cut`` the questions whose every gold answer lies beyond the cut.

A generated answer that is a run of its context's tokens is reported as the context's own text
(case, accents and spacing as written; a WordPiece decode gives "levi ' s" for "Levi's"), else as
the decoded tokens. Answers are appended to ``squad/answers.jsonl`` batch by batch, so an
interrupted evaluation resumes with the questions not yet answered.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import string
import time
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
    title: str = ""  # of its article


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
        title = str(article.get("title", f"article {a}")) if isinstance(article, dict) else ""
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
                questions.append(Question(qid, qa["question"], context, tuple(texts), title))
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


def squad_metrics(questions: list[Question], predictions: dict[str, str]) -> dict[str, Any]:
    """Exact match and F1 in percent, each the max over a question's gold answers, averaged over
    every question (a question without a prediction scores 0, as the official script counts it),
    overall and per article (``articles``: title, questions, exact_match, f1, in the file's order)."""
    articles: dict[str, list[float]] = {}  # title -> [questions, em, f1]
    for question in questions:
        tally = articles.setdefault(question.title, [0, 0.0, 0.0])
        tally[0] += 1
        prediction = predictions.get(question.id)
        if prediction is not None:
            tally[1] += max(exact_match(prediction, truth) for truth in question.answers)
            tally[2] += max(f1_score(prediction, truth) for truth in question.answers)

    def percent(count: float, em: float, f1: float) -> dict[str, float]:
        return {"exact_match": 100.0 * em / count, "f1": 100.0 * f1 / count, "questions": int(count)}

    overall = percent(*(sum(column) for column in zip(*articles.values(), strict=True)))
    return {
        **overall,
        "unanswered": len(unanswered(questions, predictions)),
        "articles": [{"title": title, **percent(*tally)} for title, tally in articles.items()],
    }


def unanswered(questions: list[Question], predictions: dict[str, str]) -> list[str]:
    """Ids of the questions without a prediction, in the file's order."""
    return [question.id for question in questions if question.id not in predictions]


def some_ids(ids: list[str], shown: int = 5) -> str:
    """The first few of ``ids`` for a message: 'a', 'b', 'c' ... (N in all)."""
    head = ", ".join(repr(i) for i in ids[:shown])
    return head + (f" ... ({len(ids):,} in all)" if len(ids) > shown else "")


def read_predictions(path: str | os.PathLike, questions: list[Question]) -> dict[str, str]:
    """A predictions file as the official evaluate-v1.1.py reads it, ``{question id: answer text}``,
    checked against ``questions``: an id that is none of theirs is an error (the file answers another
    dev file); questions it leaves out are allowed (they score 0, see :func:`unanswered`)."""
    path = Path(path)
    try:
        predictions = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SquadError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SquadError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(predictions, dict):
        raise SquadError(f'{path}: expected a predictions object {{"question id": "answer text", ...}}')
    not_text = [qid for qid, answer in predictions.items() if not isinstance(answer, str)]
    if not_text:
        raise SquadError(f"{path}: the answers of {some_ids(not_text)} are not strings")
    known = {question.id for question in questions}
    unknown = [qid for qid in predictions if qid not in known]
    if unknown:
        raise SquadError(
            f"{path}: {len(unknown):,} of its {len(predictions):,} ids are no question of the dev file "
            f"({some_ids(unknown)}); score it against the dev file it answers"
        )
    return predictions


# ---- T5 samples -----------------------------------------------------------------------------


class SquadExamples:
    """Questions as T5 samples (the pretraining dataset's keys), encoded once with the run's tokenizer.

    ``num_samples`` > the questions cycles through them, each pass in its own order drawn from
    ``seed``: sample ``i`` is a pure function of ``i``, so fine-tuning resumes exactly.
    """

    def __init__(self, questions, tokenizer, ids, encoder_length: int, decoder_length: int,
                 num_samples: int | None = None, seed: int = 1234) -> None:  # fmt: skip
        self.questions, self.tokenizer, self.ids = questions, tokenizer, ids
        self.encoder_length, self.decoder_length = encoder_length, decoder_length
        self.num_samples = num_samples or len(questions)
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None  # the last pass's order
        self._offsets: dict[str, list[tuple[int, int]] | None] = {}  # context -> its tokens' spans
        # the pieces without the tokens a tokenizer.json adds to every text (T5's </s>); those end
        # the encoder input once, as Hugging Face's T5 is fed
        bare = _bare(tokenizer)
        self.tokenizer = bare
        closing = tokenizer.encode("") if bare is not tokenizer else []
        prompts = bare.encode_batch([f"question: {q.question} context:" for q in questions])
        texts = list(dict.fromkeys(q.context for q in questions))  # a paragraph has several questions
        self.contexts = dict(zip(texts, bare.encode_batch(texts), strict=True))
        answers = bare.encode_batch([q.answers[0] for q in questions])
        self.encoder, self.kept, self.truncated, self.answers_cut = [], [], 0, 0
        for prompt, question in zip(prompts, questions, strict=True):
            context = self.contexts[question.context]
            room = encoder_length - len(prompt) - len(closing)
            if room < 1:
                raise SquadError(
                    f"question {question.id!r}: the question alone fills the encoder length {encoder_length}"
                )
            self.encoder.append(prompt + context[:room] + closing)
            self.kept.append(min(room, len(context)))
            if len(context) > room:
                self.truncated += 1
                golds = bare.encode_batch(list(question.answers))
                self.answers_cut += all(_find(context[:room], gold) is None for gold in golds)
        self.answers = [answer[: decoder_length - 1] for answer in answers]

    def __len__(self) -> int:
        return self.num_samples

    def _question(self, index: int) -> int:
        count = len(self.questions)
        epoch, position = divmod(index, count)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(count)
        return int(self._order[1][position])

    def answer_text(self, row: int, answer: list[int]) -> str:
        """Question ``row``'s answer ``answer`` (token ids) as text: the context's own characters where
        the tokens are a run of its kept tokens, else their decoding."""
        context = self.questions[row].context
        span = _find(self.context_tokens(row), answer) if answer else None
        if span and context not in self._offsets:
            self._offsets[context] = _offsets(self.tokenizer, context, self.contexts[context])
        offsets = self._offsets[context] if span else None
        if offsets is None:
            return self.tokenizer.decode(answer) if answer else ""
        return context[offsets[span[0]][0] : offsets[span[1] - 1][1]]

    def context_tokens(self, row: int) -> list[int]:
        """The tokens of question ``row``'s context that its encoder input keeps."""
        return self.contexts[self.questions[row].context][: self.kept[row]]

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


def _find(tokens: list[int], run: list[int]) -> tuple[int, int] | None:
    """Where ``run`` first occurs in ``tokens`` (start, end), or None."""
    if not run:
        return None
    first, length = run[0], len(run)
    for start in (i for i, token in enumerate(tokens) if token == first):
        if tokens[start : start + length] == run:
            return start, start + length
    return None


def _bare(tokenizer):
    """``tokenizer`` without the special tokens a tokenizer.json adds around each text, if it adds any."""
    if getattr(tokenizer, "add_special_tokens", False):
        return dataclasses.replace(tokenizer, add_special_tokens=False)
    return tokenizer


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """Character spans of ``text``'s tokens ``ids`` where the tokenizer is a Hugging Face
    ``tokenizers`` pipeline that gives the same ids, else None."""
    core = getattr(tokenizer, "core", None)
    if core is None or not hasattr(core, "encode"):
        return None
    encoding = core.encode(text, add_special_tokens=getattr(tokenizer, "add_special_tokens", False))
    return encoding.offsets if encoding.ids == ids else None


class ContextSpans:
    """Greedy choice among the tokens that keep each answer a run of its context's tokens (SQuAD v1.1's
    answers are spans of the context): the first token any of the context's, each next one a token
    that follows the run so far somewhere in the context, or the end once the run is one token long.
    A ``choose`` for ``generate_seq2seq``: it follows the tokens it picks."""

    def __init__(self, contexts: list[list[int]], eos: int) -> None:
        self.contexts = [torch.tensor(context, dtype=torch.long) for context in contexts]
        self.eos = eos
        self.ends: list[torch.Tensor | None] = [None] * len(contexts)  # where each run may end so far

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        nexts = []
        for row, (context, ends) in enumerate(zip(self.contexts, self.ends, strict=True)):
            following = torch.arange(len(context)) if ends is None else ends[ends < len(context) - 1] + 1
            allowed[row, context[following].to(logits.device)] = True
            allowed[row, self.eos] |= ends is not None or not len(context)
            nexts.append(following)
        tokens = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        for row, (token, following) in enumerate(zip(tokens.tolist(), nexts, strict=True)):
            self.ends[row] = following[self.contexts[row][following] == token]
        return tokens


def answer_questions(model, examples: SquadExamples, batch_size: int, max_answer_tokens: int, device: str,
                     done: frozenset[str] | set[str] = frozenset(), on_batch=None,
                     from_context: bool = False) -> dict[str, str]:  # fmt: skip
    """Greedy answers (batched, KV cache) to the questions of ``examples`` whose ids are not in
    ``done``, shortest inputs first (least padding); ``on_batch(answers)`` after each batch.
    ``from_context``: every answer a run of its (kept) context's tokens (``ContextSpans``)."""
    from mtk.generate import generate_seq2seq

    model.eval()
    predictions: dict[str, str] = {}
    rows = [r for r, question in enumerate(examples.questions) if question.id not in done]
    rows.sort(key=lambda r: len(examples.encoder[r]))
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        tokens, mask = examples.encoder_batch(batch)
        spans = (
            ContextSpans([examples.context_tokens(r) for r in batch], examples.ids.eos)
            if from_context
            else None
        )
        answers = generate_seq2seq(
            model, tokens.to(device), mask.to(device), examples.ids.bos, examples.ids.eos, max_answer_tokens,
            choose=spans,
        )  # fmt: skip
        texts = {
            examples.questions[r].id: examples.answer_text(r, a) for r, a in zip(batch, answers, strict=True)
        }
        predictions.update(texts)
        if on_batch is not None:
            on_batch(texts)
    return predictions


class AnswerLog:
    """``answers.jsonl``: a header line (what answers: run, iteration, settings), then one
    ``{"id", "answer"}`` line per question, appended and synced batch by batch. Reopened with the same
    header, its answers count as done (a line torn by a kill is cut off); with another header, it starts
    over (the answers came from another model)."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path, self.answers, self.stale = path, {}, False
        keep = 0
        if path.is_file():
            lines = path.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is torn
            try:
                if lines and json.loads(lines[0]) == header:
                    keep = len(lines[0]) + 1
                    for line in lines[1:]:
                        record = json.loads(line)
                        self.answers[record["id"]] = record["answer"]
                        keep += len(line) + 1
                else:
                    self.stale = bool(lines)
            except (ValueError, KeyError, TypeError):
                pass  # a line torn in its middle: keep what precedes it
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("r+b" if path.is_file() else "wb")
        self.file.truncate(keep)
        self.file.seek(keep)
        if keep == 0:
            self._write([header])

    def append(self, answers: dict[str, str]) -> None:
        self.answers.update(answers)
        self._write([{"id": qid, "answer": answer} for qid, answer in answers.items()])

    def _write(self, records: list[dict[str, Any]]) -> None:
        self.file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


@dataclass
class SquadOptions:
    """What ``mtk eval-squad`` was asked: fine-tuning (skipped with ``finetune_iters`` 0) and answering."""

    out: Path  # run directory of the fine-tuning; squad/ inside it holds the results
    finetune_iters: int = 1000
    lr: float = 1e-4
    lr_warmup_fraction: float = 0.1
    micro_batch_size: int = 8
    global_batch_size: int = 32
    max_answer_tokens: int = 32
    answer_from_context: bool = False  # answers restricted to runs of the context's tokens
    eval_batch_size: int = 32
    device: str = "cpu"
    log_interval: int = 50


def evaluate_squad(load: str | os.PathLike, train_file: str | None, dev_file: str, options: SquadOptions,
                   show=None, progress=None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune the T5 of run ``load`` on ``train_file`` (unless ``finetune_iters`` is 0), answer the
    questions of ``dev_file`` not yet in ``squad/answers.jsonl`` of ``options.out`` (resuming an
    interrupted evaluation), and write ``squad/predictions.json``, ``squad/metrics.json`` and
    ``squad/mtk.json`` there; returns the metrics. ``show(text)``: messages; ``progress(advance,
    total)``: questions answered (``total`` given on the first call, then None)."""
    from mtk.checkpoint import RunDir, checkpoint_description, load_checkpoint
    from mtk.config import ConfigError, RunConfig
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import tokenizer_from_manifest

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
    folder = out / "squad"
    source = out if train is not None else Path(load)
    header = {"model": str(source.resolve()), "iteration": iteration, "encoder_length": encoder_length,
              "max_answer_tokens": options.max_answer_tokens}  # fmt: skip
    if options.answer_from_context:  # (absent otherwise: the answer logs of earlier versions stay valid)
        header["answer_from_context"] = True
    log = AnswerLog(folder / "answers.jsonl", header)
    if show is not None and log.stale:
        show(f"{log.path}: answers of another checkpoint or settings; answering every question again")
    todo = sum(question.id not in log.answers for question in dev)
    if show is not None and todo < len(dev):
        show(f"resuming: {len(dev) - todo:,} of {len(dev):,} questions already answered in {log.path}")
    if progress is not None:
        progress(len(dev) - todo, len(dev))

    def on_batch(answers: dict[str, str]) -> None:
        log.append(answers)
        if progress is not None:
            progress(len(answers), None)

    started = time.perf_counter()
    try:
        answer_questions(model, dev_examples, options.eval_batch_size, options.max_answer_tokens,
                         options.device, set(log.answers), on_batch, options.answer_from_context)  # fmt: skip
    finally:
        log.close()
    seconds = time.perf_counter() - started
    predictions = {question.id: log.answers[question.id] for question in dev}
    metrics = {
        **squad_metrics(dev, predictions),
        "truncated_contexts": dev_examples.truncated,
        "answers_cut": dev_examples.answers_cut,
        "answer_from_context": options.answer_from_context,
        "finetune_iterations": options.finetune_iters if train is not None else 0,
        "checkpoint_iteration": iteration,
        "answered_now": todo,
        "answer_seconds": round(seconds, 3),
        "questions_per_second": round(todo / seconds, 2) if todo else None,
    }
    write_results(folder, metrics, dev_file, predictions, stage_inputs=[train_file] if train is not None else [],
                  load=str(Path(load).resolve()), tokenizer=entry)  # fmt: skip
    return metrics


def score_predictions(dev_file: str | os.PathLike, predictions_file: str | os.PathLike,
                      out: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The official scores of an existing predictions file on ``dev_file`` (no model), and the ids of
    the questions it leaves unanswered; ``out``: a folder to write ``metrics.json`` and ``mtk.json`` to."""
    dev = read_squad(dev_file)
    predictions = read_predictions(predictions_file, dev)
    metrics = squad_metrics(dev, predictions)
    if out is not None:
        write_results(Path(out), metrics, dev_file, None, stage_inputs=[predictions_file])
    return metrics, unanswered(dev, predictions)


def write_results(folder: Path, metrics: dict[str, Any], dev_file, predictions: dict[str, str] | None,
                  stage_inputs: list, **manifest: Any) -> None:  # fmt: skip
    """``metrics.json``, ``predictions.json`` (unless None) and the ``mtk.json`` manifest in ``folder``."""
    from mtk.manifest import atomic_write_text, describe_file, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    if predictions is not None:
        text = json.dumps(predictions, indent=1, ensure_ascii=False) + "\n"
        atomic_write_text(folder / "predictions.json", text)
        outputs.append(folder / "predictions.json")
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    outputs.append(folder / "metrics.json")
    write_manifest(
        folder / "mtk.json",
        stage="eval-squad",
        **manifest,
        inputs=[describe_file(dev_file)] + [describe_file(path) for path in stage_inputs],
        metrics={key: value for key, value in metrics.items() if key != "articles"},
        outputs=[describe_file(path) for path in outputs],
    )


def finetune_config(config: RunConfig, options: SquadOptions) -> RunConfig:
    """The config of the fine-tuning of run ``config`` on SQuAD: its model, ``options``' batches and
    length, a linear warm-up over ``options.lr_warmup_fraction`` of the steps to ``options.lr``
    and a linear decay to 0, no evaluation, one save at the
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
        lr_warmup_fraction=options.lr_warmup_fraction or None,
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
