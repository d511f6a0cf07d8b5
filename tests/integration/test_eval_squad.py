"""`mtk eval-squad` end to end: a tiny T5 pretrained on the bundled corpus answers nothing right,
fine-tuned on a generated SQuAD v1.1 file it answers most questions; the fine-tuning resumes, and so
does an interrupted answering; real dev questions (tests/data/squad) are read, truncated and scored
per article."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mtk.squad import read_squad
from tests.conftest import invoke

SLICE = Path(__file__).parents[1] / "data" / "squad" / "dev-v1.1-slice.json"

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "music",
    "paper",
    "light",
    "table",
    "garden",
    "silver",
    "window",
]
NAMES = ["anna", "boris", "clara", "david", "elena", "felix"]
FILLERS = [
    "the weather was calm that day .",
    "many people walked along the road .",
    "a small dog slept near the door .",
]


def write_squad(path: Path, articles: int, seed: int) -> None:
    """Questions a small model can learn to answer by reading: whose favourite word is which."""
    rng = random.Random(seed)
    data = []
    for a in range(articles):
        paragraphs = []
        for p in range(4):
            name, word = rng.choice(NAMES), rng.choice(WORDS)
            context = f"the favourite word of {name} is {word} . {rng.choice(FILLERS)}"
            question = {"id": f"q{a}-{p}", "question": f"what is the favourite word of {name} ?",
                        "answers": [{"text": word, "answer_start": context.index(f" {word} ") + 1}]}  # fmt: skip
            paragraphs.append({"context": context, "qas": [question]})
        data.append({"title": f"story {a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": data}))


@pytest.mark.slow  # pretraining and fine-tuning a tiny T5
def test_fine_tuning_raises_exact_match_and_resumes(wordpiece_sentences, tmp_path):
    write_squad(tmp_path / "train.json", 100, seed=1)
    write_squad(tmp_path / "dev.json", 10, seed=2)
    t5 = tmp_path / "t5"
    invoke("train", "--preset", "t5-tiny", "--data", wordpiece_sentences, "--split", "90,5,5", "--train-iters", "20",
           "--seq-length", "64", "--set", "decoder_seq_length=24", "--num-workers", "0", "--save", str(t5))  # fmt: skip
    invoke("eval-squad", "--load", str(t5), "--dev-file", str(tmp_path / "dev.json"), "--no-finetune")
    before = json.loads((t5 / "squad" / "metrics.json").read_text())
    assert before["questions"] == 40 and before["exact_match"] < 5 and before["finetune_iterations"] == 0
    output = invoke(
        "eval-squad", "--load", t5, "--dev-file", SLICE, "--no-finetune", "--out", tmp_path / "real"
    ).output
    real = json.loads((tmp_path / "real" / "squad" / "metrics.json").read_text())
    assert real["questions"] == 99 and real["answered_now"] == 99 and real["questions_per_second"] > 0
    assert real["truncated_contexts"] == 99 and 0 < real["answers_cut"] < 99  # 64-token encoder
    assert [a["title"] for a in real["articles"]] == [
        "Super_Bowl_50",
        "Warsaw",
        "Yuan_dynasty",
        "Prime_number",
    ]
    assert "Yuan_dynasty" in output and "99 questions answered at" in output
    # answers kept in the context: each one the context's own text (the kept start of it)
    invoke("eval-squad", "--load", t5, "--dev-file", SLICE, "--no-finetune", "--answer-from-context",
           "--out", tmp_path / "spans")  # fmt: skip
    spans = json.loads((tmp_path / "spans" / "squad" / "metrics.json").read_text())
    assert spans["answer_from_context"] and not real["answer_from_context"] and spans["questions"] == 99
    answers = json.loads((tmp_path / "spans" / "squad" / "predictions.json").read_text())
    contexts = {q.id: q.context for q in read_squad(SLICE)}
    assert all(answer and answer in contexts[qid] for qid, answer in answers.items())

    finetune = ["eval-squad", "--load", str(t5), "--train-file", str(tmp_path / "train.json"),
                "--dev-file", str(tmp_path / "dev.json"), "--finetune-iters", "600", "--lr", "3e-3",
                "--micro-batch-size", "16", "--global-batch-size", "16"]  # fmt: skip
    output = invoke(*finetune).output
    out = tmp_path / "t5-squad"
    after = json.loads((out / "squad" / "metrics.json").read_text())
    assert after["exact_match"] > 40 and after["f1"] >= after["exact_match"]
    assert f"exact match {after['exact_match']:.2f}" in output
    predictions = json.loads((out / "squad" / "predictions.json").read_text())
    assert len(predictions) == 40 and set(predictions.values()) <= set(WORDS) | {""}
    manifest = json.loads((out / "squad" / "mtk.json").read_text())
    assert manifest["stage"] == "eval-squad" and manifest["metrics"]["exact_match"] == after["exact_match"]
    assert manifest["tokenizer"]["vocab_extra_ids"] == 100
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "600"
    again = invoke(*finetune).output  # the fine-tuning run resumes like any run: complete, same answers
    assert "the run is complete" in again and "resuming: 40 of 40 questions already answered" in again
    assert json.loads((out / "squad" / "predictions.json").read_text()) == predictions

    # an answering killed after 10 answers (the 11th torn): a rerun answers the 30 others only
    log = out / "squad" / "answers.jsonl"
    header, *lines = log.read_text().splitlines()
    kept = [json.loads(line) for line in lines[:10]]
    torn = lines[10][:7]
    log.write_text("\n".join([header, *(json.dumps({**r, "answer": "kept"}) for r in kept), torn]))
    third = invoke(*finetune).output
    assert "resuming: 10 of 40 questions already answered" in third and "30 questions answered at" in third
    resumed = json.loads((out / "squad" / "predictions.json").read_text())
    assert {qid for qid, answer in resumed.items() if answer == "kept"} == {r["id"] for r in kept}
    assert all(resumed[qid] == answer for qid, answer in predictions.items() if resumed[qid] != "kept")
    assert json.loads((out / "squad" / "metrics.json").read_text())["answered_now"] == 30


def test_eval_squad_refuses_a_run_of_another_family(tmp_path):
    gpt = tmp_path / "gpt"
    invoke("train", "--preset", "gpt-tiny", "--mock-data", "--train-iters", "1", "--seq-length", "16",
           "--num-workers", "0", "--save", str(gpt))  # fmt: skip
    write_squad(tmp_path / "dev.json", 1, seed=0)
    result = invoke(
        "eval-squad", "--load", gpt, "--dev-file", tmp_path / "dev.json", "--no-finetune", code=None
    )
    assert result.exit_code != 0 and "eval-squad fine-tunes and evaluates T5 runs" in result.output
    assert "Traceback" not in result.output
