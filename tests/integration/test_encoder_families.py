"""BERT and T5 through the CLI as a user runs them: a WordPiece vocabulary trained on the bundled
corpus, the corpus prepared with --split-sentences (and T5's sentinels), training, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtk.checkpoint import latest_iteration
from tests.conftest import invoke as cli
from tests.conftest import read_metrics, state_differences

CORPUS = Path(__file__).resolve().parents[2] / "mtk" / "assets" / "sample.jsonl"
COMMON = ["--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--split", "90,5,5",
          "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0",
          "--device", "cpu"]  # fmt: skip
PRESET_ARGS = {"bert-tiny": [], "t5-tiny": ["--set", "decoder_seq_length=32"]}


def invoke(*args: str) -> str:
    return cli(*args).output


@pytest.fixture(scope="module")
def sentences(wordpiece_sentences) -> str:
    return wordpiece_sentences


records = read_metrics


def train_args(preset: str, data: str, iters: int) -> list[str]:
    return ["--preset", preset, "--data", data, "--train-iters", str(iters), *COMMON, *PRESET_ARGS[preset]]


def test_the_prepared_data_carries_the_sentinels(sentences):
    manifest = json.loads(Path(f"{sentences}.mtk.json").read_text())
    tokenizer = manifest["tokenizer"]
    assert tokenizer["kind"] == "wordpiece" and tokenizer["vocab_extra_ids"] == 100
    assert manifest["vocab_size"] == tokenizer["vocab_size"] == 2100  # sentinels 2000..2099
    from mtk.data.masking import WordPieceIds

    ids = WordPieceIds.from_manifest(tokenizer, "t5", sentinels=True)
    assert ids.sentinels == tuple(range(2000, 2100)) and (ids.bos, ids.eos) == (ids.cls, ids.sep)


@pytest.mark.slow  # 100+ steps of two families
@pytest.mark.parametrize("preset", ["bert-tiny", "t5-tiny"])
def test_encoder_families_learn_the_bundled_corpus(preset, sentences, tmp_path):
    invoke("train", *train_args(preset, sentences, 40), "--save", str(tmp_path / "run"))
    train = [r for r in records(tmp_path / "run") if "split" not in r]
    assert train[0]["loss"] > 7.0  # about ln(2100) + ln(2) at the start
    assert sum(r["lm_loss" if preset == "bert-tiny" else "loss"] for r in train[-5:]) / 5 < 6.3
    if preset == "bert-tiny":  # the two losses, each in every record, adding up to the loss
        assert all(r["loss"] == pytest.approx(r["lm_loss"] + r["sop_loss"], rel=1e-5) for r in train)
        assert 0.5 < train[-1]["sop_loss"] < 0.9
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["vocab_size"] == 2100  # inherited from the data manifest


@pytest.mark.slow  # encoder 512 / decoder 128 samples
def test_t5_220m_trains_at_its_published_lengths_on_mock_data(tmp_path):
    """The recipe's encoder 512 / decoder 128, vocabulary and schedule; layers, width and batch
    shrunk to run on a CPU."""
    shrunk = {"num_layers": 2, "decoder_num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "kv_channels": 16, "ffn_hidden_size": 128}  # fmt: skip
    sets = [arg for key, value in shrunk.items() for arg in ("--set", f"{key}={value}")]
    invoke("train", "--preset", "t5-220m", "--mock-data", *sets, "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1", "--eval-interval", "0",
           "--num-workers", "0", "--device", "cpu", "--save", str(tmp_path / "run"))  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"]["seq_length"], config["model"]["decoder_seq_length"]) == (512, 128)
    assert config["model"]["vocab_size"] == 29096 and config["train"]["precision"] == "bf16"
    train = [r for r in records(tmp_path / "run") if "split" not in r]
    assert [r["iteration"] for r in train] == [1, 2] and all(8 < r["loss"] < 12 for r in train)


def test_document_level_data_is_refused_before_training(tmp_path, sentences):
    tok = Path(sentences).parent / "tok"
    invoke("prepare-data", str(CORPUS), "-o", str(tmp_path / "docs"), "-t", str(tok), "--workers", "1")
    result = cli(
        "train",
        *train_args("bert-tiny", str(tmp_path / "docs_text_document"), 2),
        "--save",
        str(tmp_path / "r"),
        code=None,
    )
    assert result.exit_code != 0 and "re-run prepare-data with --split-sentences" in result.output
    assert "Traceback" not in result.output


def test_t5_without_sentinels_is_refused_with_the_flag_to_use(tmp_path, sentences):
    tok = Path(sentences).parent / "tok"
    invoke("prepare-data", str(CORPUS), "-o", str(tmp_path / "plain"), "-t", str(tok), "--split-sentences",
           "--workers", "1")  # fmt: skip
    data = str(tmp_path / "plain_text_sentence")
    result = cli("train", *train_args("t5-tiny", data, 2), "--save", str(tmp_path / "r"), code=None)
    assert result.exit_code != 0 and "--vocab-extra-ids 100" in result.output


@pytest.mark.slow  # training subprocesses, one killed
@pytest.mark.parametrize("preset", ["bert-tiny", "t5-tiny"])
def test_resume_after_sigkill_is_exact(preset, sentences, tmp_path, kill_during_training):
    args = [*train_args(preset, sentences, 24), "--set", "hidden_dropout=0.1", "--save-interval", "4"]
    invoke("train", *args, "--save", str(tmp_path / "straight"))
    run = tmp_path / "killed"
    assert kill_during_training(args, run, 8) < 24
    invoke("train", *args, "--save", str(run))
    assert latest_iteration(run) == 24

    def losses(folder: Path) -> dict[int, tuple]:
        return {r["iteration"]: (r["loss"], r.get("sop_loss")) for r in records(folder) if "split" not in r}

    assert losses(tmp_path / "straight") == losses(run), state_differences(tmp_path / "straight", run)
