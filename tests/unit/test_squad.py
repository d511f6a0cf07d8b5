"""SQuAD v1.1: the official metric on hand-checked cases and, against a reimplementation of the official
evaluate-v1.1.py, on real dev questions (tests/data/squad); files that are not SQuAD v1.1; T5 inputs,
truncation and answers as text on the real slice; scoring a predictions file with the CLI; the answer log
that an interrupted evaluation resumes from."""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import pytest
import torch

from mtk.squad import (
    AnswerLog,
    Question,
    SquadError,
    SquadExamples,
    exact_match,
    f1_score,
    normalize_answer,
    read_predictions,
    read_squad,
    squad_metrics,
)
from tests.conftest import run

SLICE = Path(__file__).parents[1] / "data" / "squad" / "dev-v1.1-slice.json"


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear  ", "apple pear"),
        ("Theatre and thermal", "theatre and thermal"),  # articles only as whole words
        ("Zürich's café", "zürichs café"),  # unicode kept, punctuation dropped
        ("", ""),
    ],
)
def test_normalization_is_the_official_scripts(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Denver Broncos", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # prediction "denver broncos won", gold "denver broncos": precision 2/3, recall 1 -> F1 0.8
    assert f1_score("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    assert f1_score("", "Denver Broncos") == 0.0  # empty prediction
    assert f1_score("a the", "an") == 0.0  # both empty after normalisation: no common token
    assert f1_score("yes yes no", "yes no no") == pytest.approx(2 / 3)  # token counts, not sets


def test_metrics_take_the_best_gold_answer_and_count_missing_predictions_as_wrong():
    questions = [
        Question("1", "q", "c", ("Santa Clara", "Levi's Stadium")),
        Question("2", "q", "c", ("1966",)),
        Question("3", "q", "c", ("blue",)),
    ]
    metrics = squad_metrics(questions, {"1": "levis stadium", "2": "in 1966"})
    assert metrics["exact_match"] == pytest.approx(100 / 3)  # only question 1
    assert metrics["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)  # "in 1966": P 1/2, R 1 -> 2/3
    assert metrics["questions"] == 3


def squad_file(tmp_path, data, version="1.1"):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"version": version, "data": data}))
    return path


GOOD_QA = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"title": "Art"}], r"article 0 \('Art'\): no 'paragraphs' list"),
        ([{"title": "Art", "paragraphs": [{"qas": []}]}], r"article 0 \('Art'\), paragraph 0: needs a 'context'"),
        ([{"paragraphs": [{"context": "c", "qas": [{"id": "q7", "question": "?", "answers": []}]}]}],
         r"article 0, paragraph 0, question 'q7': needs 'answers'"),
        ([{"paragraphs": [{"context": "c", "qas": [GOOD_QA, GOOD_QA]}]}], r"question 'q1': the id is used twice"),
        ([{"paragraphs": [{"context": "c", "qas": [{**GOOD_QA, "is_impossible": True}]}]}],
         r"question 'q1': an unanswerable \(SQuAD 2.0\) question"),
        ([], "no questions"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file_and_the_place(tmp_path, data, message):
    path = squad_file(tmp_path, data)
    with pytest.raises(SquadError, match=message) as err:
        read_squad(path)
    assert str(path) in str(err.value)


def test_squad_2_files_and_non_json_are_refused(tmp_path):
    with pytest.raises(
        SquadError, match=r"SQuAD v2.0 \(unanswerable questions\); eval-squad scores SQuAD v1.1"
    ):
        read_squad(squad_file(tmp_path, [], version="v2.0"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SquadError, match="bad.json: not a JSON file"):
        read_squad(tmp_path / "bad.json")


def test_questions_of_a_good_file(tmp_path):
    data = [{"title": "A", "paragraphs": [{"context": "Ann met Bob.", "qas": [
        GOOD_QA, {"id": "q2", "question": "Whom?", "answers": [{"text": "Bob", "answer_start": 8}, {"text": "Bob."}]}
    ]}]}]  # fmt: skip
    questions = read_squad(squad_file(tmp_path, data))
    assert questions == [
        Question("q1", "Who?", "Ann met Bob.", ("Ann",), "A"),
        Question("q2", "Whom?", "Ann met Bob.", ("Bob", "Bob."), "A"),
    ]


# ---- the official evaluate-v1.1.py, reimplemented from the published script --------------------


def official_normalize(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_f1(prediction, ground_truth):
    prediction_tokens = official_normalize(prediction).split()
    ground_truth_tokens = official_normalize(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact(prediction, ground_truth):
    return official_normalize(prediction) == official_normalize(ground_truth)


def official_evaluate(dataset, predictions):
    f1 = exact = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue  # "Unanswered question ... will receive score 0."
                truths = [answer["text"] for answer in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact += max(official_exact(prediction, truth) for truth in truths)
                f1 += max(official_f1(prediction, truth) for truth in truths)
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def crafted_predictions(questions: list[Question]) -> dict[str, str]:
    """Per question, in turn: the gold answer, upper case, extra punctuation, an article added, the
    last gold answer (another of several), a partial answer, a longer one, an empty one, a wrong one,
    none."""
    variants = [
        lambda g: g[0],
        lambda g: g[0].upper(),
        lambda g: f'"{g[0]}."',
        lambda g: f"The {g[0]}",
        lambda g: g[-1],
        lambda g: g[0].split()[0],
        lambda g: f"{g[0]} and an apple, as the story tells",
        lambda g: "",
        lambda g: "Łódź 元朝 nonsense",
        None,  # left out: scores 0
    ]
    predictions = {}
    for i, question in enumerate(questions):
        variant = variants[i % len(variants)]
        if variant is not None:
            predictions[question.id] = variant(question.answers)
    return predictions


def test_the_slice_of_the_real_dev_set_reads_whole():
    questions = read_squad(SLICE)
    assert len(questions) == 99
    assert list(dict.fromkeys(q.title for q in questions)) == [
        "Super_Bowl_50",
        "Warsaw",
        "Yuan_dynasty",
        "Prime_number",
    ]
    first = questions[0]
    assert (first.id, first.question) == (
        "56be4db0acb8001400a502ec",
        "Which NFL team represented the AFC at Super Bowl 50?",
    )
    assert first.answers == ("Denver Broncos",) * 3 and first.context.startswith(
        "Super Bowl 50 was an American"
    )
    yuan = next(q for q in questions if q.id == "57285ed5ff5b5019007da1b6")
    assert yuan.answers == ("Yuán Cháo", "Yuán Cháo", "元朝")  # unicode as in the file
    assert sum(len(set(q.answers)) > 1 for q in questions) >= 30  # several distinct gold answers


def test_metrics_equal_the_official_script_on_real_questions():
    dataset = json.loads(SLICE.read_text(encoding="utf-8"))["data"]
    questions = read_squad(SLICE)
    predictions = crafted_predictions(questions)
    official = official_evaluate(dataset, predictions)
    ours = squad_metrics(questions, predictions)
    assert 20 < official["exact_match"] < 80 and official["f1"] > official["exact_match"]  # not trivial
    assert ours["exact_match"] == pytest.approx(official["exact_match"], abs=1e-12)
    assert ours["f1"] == pytest.approx(official["f1"], abs=1e-12)
    assert ours["unanswered"] == len(questions) - len(predictions) == 9
    for article in ours["articles"]:  # each article scored alone by the official script
        alone = official_evaluate([a for a in dataset if a["title"] == article["title"]], predictions)
        assert (article["exact_match"], article["f1"]) == pytest.approx((alone["exact_match"], alone["f1"]))
    assert sum(a["questions"] for a in ours["articles"]) == 99


def test_the_official_normalisation_of_every_gold_answer():
    for question in read_squad(SLICE):
        for truth in question.answers:
            assert normalize_answer(truth) == official_normalize(truth)
            assert f1_score(truth.upper(), truth) == official_f1(truth.upper(), truth)


# ---- scoring an existing predictions file (no model) --------------------------------------------


def test_eval_squad_scores_a_predictions_file(tmp_path):
    questions = read_squad(SLICE)
    predictions = crafted_predictions(questions)
    (tmp_path / "predictions.json").write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    official = official_evaluate(json.loads(SLICE.read_text(encoding="utf-8"))["data"], predictions)
    output = run("eval-squad", "--dev-file", SLICE, "--predictions", tmp_path / "predictions.json",
                 "--out", tmp_path / "scores")  # fmt: skip
    assert f"exact match {official['exact_match']:.2f}, F1 {official['f1']:.2f}" in output
    assert "9 of 99 questions have no prediction ('" in output and "they score 0" in output
    assert "Yuan_dynasty" in output and "Prime_number" in output  # the per-article table
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert metrics["exact_match"] == pytest.approx(official["exact_match"])
    assert [a["title"] for a in metrics["articles"]] == [
        "Super_Bowl_50",
        "Warsaw",
        "Yuan_dynasty",
        "Prime_number",
    ]
    manifest = json.loads((tmp_path / "scores" / "mtk.json").read_text())
    assert manifest["stage"] == "eval-squad" and len(manifest["inputs"]) == 2


def test_a_predictions_file_for_other_questions_is_refused(tmp_path):
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps({"56be4db0acb8001400a502ec": "Denver Broncos", "nope-1": "x", "nope-2": "y"}))
    output = run("eval-squad", "--dev-file", SLICE, "--predictions", path, code=2)
    assert "2 of its 3 ids are no question of the dev file ('nope-1', 'nope-2')" in output
    path.write_text(json.dumps({"56be4db0acb8001400a502ec": ["Denver"]}))
    assert "are not strings" in run("eval-squad", "--dev-file", SLICE, "--predictions", path, code=2)
    path.write_text("[]")
    assert "expected a predictions object" in run(
        "eval-squad", "--dev-file", SLICE, "--predictions", path, code=2
    )
    with pytest.raises(SquadError, match="no such file"):
        read_predictions(tmp_path / "missing.json", [])


def test_predictions_and_load_exclude_each_other(tmp_path):
    assert "leave out --load" in run(
        "eval-squad", "--dev-file", SLICE, "--predictions", SLICE, "--load", tmp_path, code=2
    )
    assert "give --load" in run("eval-squad", "--dev-file", SLICE, code=2)


# ---- T5 inputs on the real slice ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """A WordPiece vocabulary trained on the slice's contexts and questions, T5's sentinels after it."""
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import load_tokenizer
    from mtk.data.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("squad-wordpiece")
    texts = {text for q in read_squad(SLICE) for text in (q.context, q.question)}
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sorted(texts)))
    tokenizer = load_tokenizer(train_tokenizer([root / "text.jsonl"], "wordpiece", 1500, root / "tok",
                                               show_progress=False), vocab_extra_ids=100)  # fmt: skip
    return tokenizer, WordPieceIds.from_manifest(tokenizer.describe(), "t5", sentinels=True)


def test_t5_inputs_are_question_then_context(wordpiece):
    tokenizer, ids = wordpiece
    questions = read_squad(SLICE)
    examples = SquadExamples(questions, tokenizer, ids, encoder_length=1024, decoder_length=32)
    assert examples.truncated == examples.answers_cut == 0
    first = examples[0]
    sample = next(examples[i] for i in range(len(questions)) if examples._question(i) == 0)
    text = tokenizer.decode([t for t in sample["text_enc"].tolist() if t != ids.pad])
    assert text.startswith(
        "question : which nfl team represented the afc at super bowl 50? context : super bowl 50"
    )
    answer = tokenizer.encode("Denver Broncos")
    assert sample["text_dec"].tolist()[: len(answer) + 1] == [ids.bos, *answer]
    assert sample["labels"].tolist()[: len(answer) + 2] == [*answer, ids.eos, -1]
    assert int(sample["loss_mask"].sum()) == len(answer) + 1 and len(first["text_enc"]) == 1024


def test_t5_inputs_with_a_tokenizer_json_end_with_one_eos(tmp_path):
    """A tokenizer.json that closes every text with </s> (T5's): the encoder input ends with it once,
    and the question, context and answer are encoded without it (the label ends with one eos)."""
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import load_tokenizer
    from tests.integration.test_hf_t5 import write_t5_tokenizer

    write_t5_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    ids = WordPieceIds.from_manifest(tokenizer.describe(), "t5", True)
    context = "the favourite word of anna is apple"
    question = Question("q", "what is the favourite word of anna ?", context, ("apple",))
    examples = SquadExamples([question], tokenizer, ids, encoder_length=64, decoder_length=8)
    encoder = examples.encoder[0]
    assert encoder[-1] == ids.eos and ids.eos not in encoder[:-1]
    assert examples.answers[0] == [t for t in tokenizer.encode("apple") if t != ids.eos]
    assert examples[0]["labels"].tolist()[: len(examples.answers[0]) + 1] == [*examples.answers[0], ids.eos]


def raw_questions() -> list[dict]:
    data = json.loads(SLICE.read_text(encoding="utf-8"))["data"]
    return [qa for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def test_truncation_counts_on_real_contexts(wordpiece):
    tokenizer, ids = wordpiece
    questions = read_squad(SLICE)
    examples = SquadExamples(questions, tokenizer, ids, encoder_length=224, decoder_length=32)
    prompts = [tokenizer.encode(f"question: {q.question} context:") for q in questions]
    contexts = [tokenizer.encode(q.context) for q in questions]
    over = [len(p) + len(c) > 224 for p, c in zip(prompts, contexts, strict=True)]
    assert examples.truncated == sum(over) and 0 < examples.truncated < len(questions)
    assert all(
        len(e) == (224 if o else len(p) + len(c))
        for e, o, p, c in zip(examples.encoder, over, prompts, contexts, strict=True)
    )
    # cut off from its answers: no gold answer's tokens are a run of the kept tokens
    spans = {qa["id"]: [(a["answer_start"], len(a["text"])) for a in qa["answers"]] for qa in raw_questions()}
    cut = []
    for question, prompt, context, truncated in zip(questions, prompts, contexts, over, strict=True):
        kept = f" {' '.join(map(str, context[: 224 - len(prompt)]))} "
        golds = [f" {' '.join(map(str, tokenizer.encode(truth)))} " for truth in question.answers]
        if truncated and not any(gold in kept for gold in golds):
            cut.append(question)
    assert examples.answers_cut == len(cut) > 0
    for question in cut:  # each gold answer, where the file puts it, ends beyond the kept characters
        prompt = tokenizer.encode(f"question: {question.question} context:")
        kept_end = tokenizer.core.encode(question.context).offsets[224 - len(prompt) - 1][1]
        assert all(start + length > kept_end for start, length in spans[question.id])


def test_answers_are_the_contexts_own_text(wordpiece):
    tokenizer, ids = wordpiece
    questions = read_squad(SLICE)
    examples = SquadExamples(questions, tokenizer, ids, encoder_length=1024, decoder_length=32)
    levis = next(r for r, q in enumerate(questions) if "Levi's Stadium" in q.answers)
    assert tokenizer.decode(tokenizer.encode("Levi's Stadium")) == "levi ' s stadium"  # a lossy decoding
    assert examples.answer_text(levis, tokenizer.encode("Levi's Stadium")) == "Levi's Stadium"
    yuan = next(r for r, q in enumerate(questions) if q.id == "57285ed5ff5b5019007da1b6")
    assert examples.answer_text(yuan, tokenizer.encode("Yuán Cháo")) == "Yuán Cháo"
    assert examples.answer_text(yuan, tokenizer.encode("not here at all")) == "not here at all"  # decoded
    assert examples.answer_text(yuan, []) == ""
    golds = [(r, truth) for r, q in enumerate(questions) for truth in q.answers]
    assert sum(examples.answer_text(r, tokenizer.encode(t)) == t for r, t in golds) >= 0.95 * len(golds)


# ---- the answer log an interrupted evaluation resumes from -------------------------------------


def test_the_answer_log_resumes_cuts_a_torn_line_and_forgets_another_models_answers(tmp_path):
    path, header = tmp_path / "squad" / "answers.jsonl", {"model": "runs/a", "iteration": 5}
    log = AnswerLog(path, header)
    log.append({"q1": "Denver Broncos", "q2": "元朝"})
    log.append({"q3": ""})
    log.close()
    with path.open("ab") as file:
        file.write(b'{"id": "q4", "ans')  # killed while writing
    again = AnswerLog(path, header)
    assert again.answers == {"q1": "Denver Broncos", "q2": "元朝", "q3": ""} and not again.stale
    again.append({"q4": "four"})
    again.close()
    assert len(path.read_text(encoding="utf-8").splitlines()) == 5  # the header, q1 ... q4
    assert AnswerLog(path, header).answers["q4"] == "four"
    other = AnswerLog(path, {**header, "iteration": 6})
    assert other.answers == {} and other.stale
    other.close()
    assert path.read_text().splitlines() == [json.dumps({**header, "iteration": 6})]


def test_fine_tuning_warms_up_then_decays_linearly_to_zero(tmp_path):
    from mtk.config import apply_overrides
    from mtk.presets import load_preset
    from mtk.squad import SquadOptions, finetune_config
    from mtk.train.schedule import learning_rate

    config = apply_overrides(load_preset("t5-tiny").sections, {"mock_data": True})
    options = SquadOptions(
        out=tmp_path, finetune_iters=100, lr=1e-3, global_batch_size=32, lr_warmup_fraction=0.1
    )
    train = finetune_config(config, options).train
    lrs = [learning_rate(train, step * 32) for step in (0, 5, 10, 55, 100)]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4, 0.0], abs=1e-9)
    flat = finetune_config(
        config, SquadOptions(out=tmp_path, finetune_iters=100, lr=1e-3, lr_warmup_fraction=0.0)
    )
    assert learning_rate(flat.train, 0) == pytest.approx(1e-3)


# ---- answers restricted to the context -------------------------------------------------------


def test_context_spans_pick_the_likeliest_token_that_keeps_a_run_of_the_context():
    from mtk.squad import ContextSpans

    eos = 1
    spans = ContextSpans([[5, 6, 7, 5, 8], []], eos)

    def step(*preferred: int) -> list[int]:
        logits = torch.zeros(2, 10)
        for rank, token in enumerate(preferred):  # the first named is the likeliest
            logits[:, token] = 10.0 - rank
        return spans(logits).tolist()

    assert step(9, eos, 5) == [5, eos]  # 9 and the end are not a first token of the first context
    assert step(7, 8, 6) == [8, eos]  # after 5 come 6 or 8 in the context, not 7
    assert step(5, eos) == [eos, eos]  # 8 ends the context: only the end is left
    assert step(5) == [eos, eos]  # and stays so once ended


def test_answers_from_the_context_are_runs_of_its_kept_tokens(wordpiece):
    """A random T5 answering real questions freely makes up token sequences; restricted to the
    context, every answer is a run of the context's kept tokens and scores as the context's text."""
    from mtk.config import ModelConfig
    from mtk.models.t5 import T5Model
    from mtk.squad import _find, answer_questions

    tokenizer, ids = wordpiece
    questions = read_squad(SLICE)[:12]
    examples = SquadExamples(questions, tokenizer, ids, encoder_length=160, decoder_length=16)
    config = ModelConfig(family="t5", num_layers=1, decoder_num_layers=1, hidden_size=32, num_attention_heads=2,
                         seq_length=160, decoder_seq_length=16, max_position_embeddings=160,
                         vocab_size=ids.sentinels[0] + 1, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = T5Model(config)
    free = answer_questions(model, examples, 5, 6, "cpu")
    spans = answer_questions(model, examples, 5, 6, "cpu", from_context=True)
    assert sum(answer in q.context for q, answer in zip(questions, free.values(), strict=True)) < 6
    for row, question in enumerate(questions):
        answer = spans[question.id]
        assert answer and answer in question.context, (answer, question.id)
        assert _find(examples.context_tokens(row), tokenizer.encode(answer)) is not None
