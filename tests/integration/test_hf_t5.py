"""Hugging Face T5 in and out: small random ``T5ForConditionalGeneration`` of both kinds (v1.0: ReLU,
tied and scaled output; v1.1 / Flan-T5: gated GELU, its own lm_head) with a SentencePiece-style
tokenizer.json, imported into mtk, give transformers' logits and greedy answers, export back to
folders transformers loads, and an imported one fine-tunes and is scored by `mtk eval-squad`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import checkpoint_description, load_checkpoint
from mtk.config import ModelConfig, RunConfig
from mtk.data.tokenizer import tokenizer_from_manifest
from mtk.generate import generate_seq2seq
from mtk.models import family_spec
from mtk.models.t5 import RelativePositionBias
from tests.conftest import invoke
from tests.integration.test_eval_squad import FILLERS, NAMES, WORDS, write_squad

SENTINELS = 100
PIECES = sorted({word for text in [*WORDS, *NAMES, *FILLERS, "what is the favourite word of ?"] for word in text.split()})  # fmt: skip


def write_t5_tokenizer(folder: Path) -> int:
    """A small Unigram tokenizer.json as T5's: <pad> 0, </s> 1, <unk> 2, then pieces, then the sentinels
    in T5's order (<extra_id_0> the highest id), and </s> after each text; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    letters = sorted({c for piece in PIECES for c in piece})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{piece}", -1.0) for piece in PIECES] + [(c, -5.0) for c in letters]
    core = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    core.add_special_tokens(["<pad>", "</s>", "<unk>"])
    core.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(SENTINELS))])
    core.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return core.get_vocab_size(with_added_tokens=True)


def save_hf_t5(kind: str, folder: Path):
    """A random T5 of ``kind`` saved as a Hugging Face folder, and the model transformers loads from it."""
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True)
    vocab = write_t5_tokenizer(folder)
    torch.manual_seed(0)
    v1_0 = kind == "v1.0"
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0,
                      feed_forward_proj="relu" if v1_0 else "gated-gelu", tie_word_embeddings=v1_0)  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(folder)
    if not v1_0:  # as Flan-T5's checkpoints: an lm_head of its own, config.json saying so
        weights = load_file(folder / "model.safetensors")
        weights["lm_head.weight"] = torch.randn(vocab, 32)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        settings = json.loads((folder / "config.json").read_text())
        settings.pop("scale_decoder_outputs", None)
        (folder / "config.json").write_text(json.dumps({**settings, "tie_word_embeddings": False}))
    return T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    hf = save_hf_t5(request.param, root / "hf")
    result = invoke("checkpoint", "import-hf", root / "hf", "--preset", "t5-tiny", "--save", root / "run")
    assert "not in the checkpoint" not in result.output and "not used" not in result.output
    return hf, root


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, vocab - SENTINELS, (2, 30), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 21:] = 0  # padding in the encoder
    return tokens, mask, torch.randint(3, vocab, (2, 25), generator=generator)


def load_t5(run: Path):
    """The model of an mtk T5 run's checkpoint, and the run's tokenizer."""
    description = checkpoint_description(run)
    config = RunConfig.from_dict(description["config"]).model
    model = family_spec("t5").build(config)
    model.load_state_dict(load_checkpoint(run)["model"])
    return model.eval(), tokenizer_from_manifest(description["tokenizer"])


def greedy_hf(hf, tokens: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    """transformers' greedy answers, without its cache (which assumes the encoder's depth in the decoder)."""
    out = hf.generate(
        input_ids=tokens,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        num_beams=1,
        use_cache=False,
    )
    answers = [row[1:].tolist() for row in out]  # after the decoder start (<pad>)
    return [answer[: answer.index(1)] if 1 in answer else answer for answer in answers]


def test_imported_t5_gives_transformers_logits_and_answers_and_exports_back(imported, tmp_path):
    from transformers import T5ForConditionalGeneration

    hf, root = imported
    model, tokenizer = load_t5(root / "run")
    assert tokenizer is not None and tokenizer.kind == "hf"  # the folder's tokenizer.json is the run's
    vocab = hf.config.vocab_size
    tokens, mask, decoder = batch(vocab)
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask, decoder_input_ids=decoder).logits
        ours = model(tokens, decoder, mask)[..., :vocab]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    answers = greedy_hf(hf, tokens, mask, 12)
    assert generate_seq2seq(model, tokens, mask, bos=0, eos=1, max_new_tokens=12) == answers

    invoke("checkpoint", "convert", root / "run", "--to", "hf", "-o", tmp_path / "hf")
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        again = back(input_ids=tokens, attention_mask=mask, decoder_input_ids=decoder).logits
    torch.testing.assert_close(again, theirs, atol=1e-5, rtol=1e-5)
    assert greedy_hf(back, tokens, mask, 12) == answers
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_t5s(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    config = ModelConfig(
        family="t5", num_attention_heads=2, hidden_size=8, position_embedding_type="relative"
    )
    bias = RelativePositionBias(config, bidirectional)
    relative = torch.arange(-300, 300)
    expected = T5Attention._relative_position_bucket(relative, bidirectional, 32, 128)
    assert torch.equal(bias.bucket(relative), expected)


def test_cached_decoding_with_relative_positions_equals_whole_sequence():
    from mtk.models.t5 import T5Model

    config = ModelConfig(family="t5", num_layers=2, decoder_num_layers=2, hidden_size=32, num_attention_heads=4,
                         seq_length=16, vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0,
                         position_embedding_type="relative", normalization="RMSNorm", add_bias_linear=False)  # fmt: skip
    torch.manual_seed(0)
    model = T5Model(config).eval()
    tokens, decoder = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        whole = model(tokens, decoder)
        encoded = model.encode(tokens)
        for static in (False, True):
            caches = model.new_decoder_caches(2, 8, static=static)
            steps = [model.decode(encoded, decoder[:, :3], kv_caches=caches)]
            steps += [model.decode(encoded, decoder[:, i : i + 1], kv_caches=caches) for i in range(3, 7)]
            torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_t5_sentinels_are_found_in_t5s_order(tmp_path):
    from mtk.data.masking import WordPieceIds
    from mtk.data.tokenizer import load_tokenizer

    vocab = write_t5_tokenizer(tmp_path)
    ids = WordPieceIds.from_manifest(load_tokenizer(tmp_path / "tokenizer.json").describe(), "t5", True)
    assert ids.sentinels[0] == vocab - 1 and ids.sentinels[-1] == vocab - SENTINELS
    assert (ids.bos, ids.pad, ids.eos) == (0, 0, 1)  # <pad> starts the decoder, as Hugging Face's T5


@pytest.mark.slow  # fine-tunes an imported T5
def test_eval_squad_fine_tunes_and_scores_an_imported_t5(tmp_path):
    save_hf_t5("v1.1", tmp_path / "hf")
    invoke("checkpoint", "import-hf", tmp_path / "hf", "--preset", "t5-tiny", "--save", tmp_path / "run")
    write_squad(tmp_path / "train.json", 20, seed=1)
    write_squad(tmp_path / "dev.json", 5, seed=2)
    output = invoke("eval-squad", "--load", tmp_path / "run", "--train-file", tmp_path / "train.json",
                    "--dev-file", tmp_path / "dev.json", "--finetune-iters", "20", "--lr", "3e-3",
                    "--micro-batch-size", "8", "--global-batch-size", "8", "--out", tmp_path / "tuned").output  # fmt: skip
    metrics = json.loads((tmp_path / "tuned" / "squad" / "metrics.json").read_text())
    assert metrics["questions"] == 20 and metrics["finetune_iterations"] == 20
    assert f"exact match {metrics['exact_match']:.2f}" in output


def test_data_prepared_with_t5s_tokenizer_gives_t5_samples(tmp_path):
    """prepare-data with the folder's tokenizer.json, then T5 span corruption: sentinels in T5's order,
    the decoder started by <pad> (as transformers starts it)."""
    from mtk.config import apply_overrides
    from mtk.data.prepared import data_facts
    from mtk.presets import load_preset

    vocab = write_t5_tokenizer(tmp_path)
    sentences = [
        f"the favourite word of {n} is {w} . {f}"
        for n, w, f in zip(NAMES, WORDS[:6], FILLERS * 2, strict=True)
    ]
    (tmp_path / "stories.jsonl").write_text("\n".join([json.dumps({"text": " ".join(sentences)})] * 40))
    invoke("prepare-data", tmp_path / "stories.jsonl", "-o", tmp_path / "s", "-t", tmp_path / "tokenizer.json",
           "--split-sentences", "--workers", "1")  # fmt: skip
    prefix = str(tmp_path / "s_text_sentence")
    overrides = {"data_path": prefix, "seq_length": 64, "decoder_seq_length": 24, "vocab_size": vocab}
    config = apply_overrides(load_preset("t5-tiny").sections, overrides)
    train, _, _ = family_spec("t5").datasets(config, (4, 0, 0), data_facts(prefix))
    sample = train[0]
    decoder, encoder = sample["text_dec"].tolist(), sample["text_enc"].tolist()
    assert decoder[:2] == [0, vocab - 1]  # <pad>, then <extra_id_0>: the highest id
    assert vocab - 1 in encoder and 1 in encoder  # the first span's sentinel; the sentences' </s>


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_t5_initialisation_draws_as_transformers_does(kind):
    """``init_method = "t5"``: a fresh mtk T5, exported, has every tensor of a fresh transformers T5 of
    the same shape with the same mean and spread (queries included: mtk divides the scores by
    sqrt(kv_channels) where T5 draws its queries that much smaller); Megatron's init does not."""
    from transformers import T5Config, T5ForConditionalGeneration

    from mtk.models.t5 import T5Model
    from mtk.models.t5_hf import T5 as HFT5

    v1_0 = kind == "v1.0"
    settings = dict(vocab_size=2048, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2,
                    num_heads=4, feed_forward_proj="relu" if v1_0 else "gated-gelu", tie_word_embeddings=v1_0)  # fmt: skip
    torch.manual_seed(0)
    theirs = T5ForConditionalGeneration(T5Config(**settings)).state_dict()
    adapter = HFT5()
    config = ModelConfig(**adapter.model_config(settings), init_method="t5")
    family_spec("t5").complete(config)

    def spread(init_method: str) -> dict[str, tuple[float, float]]:
        model = T5Model(dataclasses.replace(config, init_method=init_method))
        exported = adapter.to_hf(model.state_dict(), config)
        return {name: (t.mean().item(), t.std().item()) for name, t in exported.items()}

    ours, megatron = spread("t5"), spread("normal")
    assert set(ours) <= set(theirs)
    for name, (mean, std) in ours.items():
        expected = theirs[name].float()
        scale = max(expected.std().item(), expected.abs().mean().item())
        tolerance = scale * (0.05 + 4 / expected.numel() ** 0.5)  # sampling error (32 x 4 tables)
        assert abs(mean - expected.mean().item()) < tolerance, name
        assert abs(std - expected.std().item()) < tolerance, name
    query = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert ours[query][1] > 5 * megatron[query][1]  # T5's (64 x 16)**-0.5 vs Megatron's 0.02 / 4
