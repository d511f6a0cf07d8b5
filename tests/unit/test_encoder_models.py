"""BERT and T5 models: counted sizes, masks, layouts, heads and losses against plain references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtk.config import apply_overrides
from mtk.layers.loss import IGNORE_INDEX
from mtk.models.bert import SPEC as BERT
from mtk.models.t5 import SPEC as T5
from mtk.presets import load_preset


def tiny(name: str, **overrides):
    return apply_overrides(load_preset(name).sections, {"seq_length": 16, **overrides}).model


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("bert-tiny", {}),
        ("bert-tiny", {"post_norm": True}),
        ("bert-tiny", {"bert_binary_head": False}),
        ("t5-tiny", {"decoder_seq_length": 8}),
        ("t5-tiny", {"decoder_num_layers": 3, "kv_channels": 8, "num_query_groups": 2}),
    ],
)
def test_parameter_count_equals_the_config_formula(name, overrides):
    config = tiny(name, **overrides)
    spec = BERT if config.family == "bert" else T5
    model = spec.build(config)
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters(config)


def test_post_norm_is_the_original_bert_layout():
    model = BERT.build(tiny("bert-tiny", post_norm=True))
    assert model.embedding_norm is not None and model.encoder.final_norm is None
    pre = BERT.build(tiny("bert-tiny"))
    assert pre.embedding_norm is None and pre.encoder.final_norm is not None
    layer, x = model.encoder.layers["0"].eval(), torch.randn(2, 16, 64)
    with torch.no_grad():  # norm(x + attention(x)), then norm(h + mlp(h))
        h = layer.attention_norm(x + layer.attention(x, causal=False))
        torch.testing.assert_close(layer(x, causal=False), layer.mlp_norm(h + layer.mlp(h)))


def test_bert_padding_is_invisible_to_the_tokens():
    config = tiny("bert-tiny")
    torch.manual_seed(0)
    model = BERT.build(config).eval()
    tokens = torch.randint(5, 4096, (2, 16))
    padding = torch.ones_like(tokens)
    padding[:, 12:] = 0
    other = tokens.clone()
    other[:, 12:] = 7  # different padding content
    types = torch.zeros_like(tokens)
    with torch.no_grad():
        logits, order = model(tokens, types, padding)
        logits2, order2 = model(other, types, padding)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    torch.testing.assert_close(order, order2)
    with torch.no_grad():  # without the mask, the padding is attended to
        assert not torch.allclose(model(tokens, types)[0][:, :12], model(other, types)[0][:, :12])


def test_bert_loss_is_mean_masked_token_loss_plus_mean_sentence_order_loss():
    config = tiny("bert-tiny")
    torch.manual_seed(0)
    model = BERT.build(config).eval()
    batch = {
        "text": torch.randint(5, 4096, (3, 16)),
        "types": torch.randint(0, 2, (3, 16)),
        "padding_mask": torch.ones(3, 16, dtype=torch.long),
        "labels": torch.randint(5, 4096, (3, 16)),
        "loss_mask": (torch.rand(3, 16) < 0.3).long(),
        "is_random": torch.tensor([1, 0, 1]),
    }
    batch["loss_mask"][:, 0] = 1
    model_batch = BERT.model_batch(batch)
    with torch.no_grad():
        outputs = model(model_batch.inputs, **model_batch.extra)
        terms = BERT.loss_terms(outputs, model_batch.targets)
    logits, order = outputs
    masked = batch["loss_mask"].bool()
    expected_lm = F.cross_entropy(logits[masked], batch["labels"][masked])
    expected_sop = F.cross_entropy(order, batch["is_random"])
    (lm_sum, lm_count), (sop_sum, sop_count) = terms["lm loss"], terms["sop loss"]
    torch.testing.assert_close(lm_sum / lm_count, expected_lm)
    torch.testing.assert_close(sop_sum / sop_count, expected_sop)
    assert int(lm_count) == int(masked.sum()) and int(sop_count) == 3
    assert BERT.loss_names(config) == ("lm loss", "sop loss")


def test_t5_decoder_is_causal_and_encoder_padding_is_invisible():
    config = tiny("t5-tiny", decoder_seq_length=8)
    torch.manual_seed(0)
    model = T5.build(config).eval()
    encoder, decoder = torch.randint(5, 4096, (2, 16)), torch.randint(5, 4096, (2, 8))
    mask = torch.ones_like(encoder)
    mask[:, 10:] = 0
    changed_decoder, changed_padding = decoder.clone(), encoder.clone()
    changed_decoder[:, 5:] = 9
    changed_padding[:, 10:] = 9
    with torch.no_grad():
        logits = model(encoder, decoder, mask)
        torch.testing.assert_close(model(encoder, changed_decoder, mask)[:, :5], logits[:, :5])
        torch.testing.assert_close(model(changed_padding, decoder, mask), logits)
        assert not torch.allclose(model(changed_padding, decoder), model(encoder, decoder))
    assert logits.shape == (2, 8, config.padded_vocab_size())


def test_t5_220m_as_published_passes_the_checks_and_a_decoder_without_room_for_one_span_does_not():
    """Samples stop their spans where the decoder is full, so the only length rule is that the first
    span fits: <bos>, its sentinel and up to 15% of the 510 sample tokens = 2 + 76."""
    from mtk.config import run_problems

    sections = load_preset("t5-220m").sections
    config = apply_overrides(sections, {"mock_data": True})
    assert (config.model.seq_length, config.model.decoder_seq_length) == (512, 128)
    assert run_problems(config, 1, T5) == []
    assert T5.problems(apply_overrides(sections, {"decoder_seq_length": 78})) == []
    (problem,) = T5.problems(apply_overrides(sections, {"decoder_seq_length": 77}))
    assert "cannot hold one span" in problem and "set decoder_seq_length >= 78" in problem


def test_t5_loss_counts_the_decoder_targets_only():
    config = tiny("t5-tiny", decoder_seq_length=8)
    labels = torch.tensor([[11, 12, 13, -1, -1, -1, -1, -1]])
    batch = {
        "text_enc": torch.randint(5, 4096, (1, 16)),
        "text_dec": torch.randint(5, 4096, (1, 8)),
        "enc_mask": torch.ones(1, 16, dtype=torch.long),
        "labels": labels,
        "loss_mask": (labels >= 0).long(),
    }
    model_batch = T5.model_batch(batch)
    assert model_batch.targets.tolist() == [[11, 12, 13] + [IGNORE_INDEX] * 5]
    logits = torch.randn(1, 8, config.padded_vocab_size())
    total, count = T5.loss_terms(logits, model_batch.targets)["lm loss"]
    torch.testing.assert_close(total / count, F.cross_entropy(logits[0, :3], labels[0, :3]))


@pytest.mark.parametrize("granularity", ["selective", "full"])
@pytest.mark.parametrize("name", ["bert-tiny", "t5-tiny"])
def test_recomputation_of_every_stack_keeps_the_gradients(name, granularity):
    """Both T5 stacks (and BERT's) recompute; the losses' gradients are those without recomputation."""
    from mtk.parallel.apply import apply_recompute

    config = tiny(
        name,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        **({"decoder_seq_length": 8} if name == "t5-tiny" else {}),
    )
    spec = BERT if config.family == "bert" else T5
    torch.manual_seed(0)
    plain, recomputed = spec.build(config), spec.build(config)
    recomputed.load_state_dict(plain.state_dict())
    apply_recompute(spec.blocks(recomputed), granularity)
    tokens = torch.randint(5, 4096, (2, 16))
    extra = (
        {"decoder_tokens": tokens[:, :8]} if name == "t5-tiny" else {"token_types": torch.zeros_like(tokens)}
    )
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same dropout masks in both
        outputs = model(tokens, **extra)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        sum(out.float().logsumexp(-1).mean() for out in outputs).backward()
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in recomputed.modules()) == sum(
        len(block) for block in spec.blocks(plain)
    )
    for a, b in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
