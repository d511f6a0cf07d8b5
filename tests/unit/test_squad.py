"""SQuAD v1.1: the official metric on hand-checked cases, and files that are not SQuAD v1.1."""

from __future__ import annotations

import json

import pytest

from mtk.squad import Question, SquadError, exact_match, f1_score, normalize_answer, read_squad, squad_metrics


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
        Question("q1", "Who?", "Ann met Bob.", ("Ann",)),
        Question("q2", "Whom?", "Ann met Bob.", ("Bob", "Bob.")),
    ]
