"""The decoder model: parameter counts, architecture switches, attention against a reference, KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtk.config import apply_overrides
from mtk.layers.attention import fuse_qkv, split_qkv
from mtk.layers.init import initial_values
from mtk.models import family_spec
from mtk.models.gpt import SPEC, GPTModel
from mtk.presets import load_preset, preset_names


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_module_parameter_count_equals_config_formula(name):
    config = load_preset(name).config.model
    model = GPTModel(config)
    assert sum(p.numel() for p in model.parameters()) == SPEC.num_parameters(config)


def test_every_preset_builds_on_meta_device_with_its_counted_size():
    built = set()
    for name in preset_names():
        config = load_preset(name).config.model
        family = family_spec(config.family)
        with torch.device("meta"):
            model = family.build(config)
        assert sum(p.numel() for p in model.parameters()) == family.num_parameters(config), name
        initial_values(model)  # every parameter's module declares how it starts
        built.add(name)
    assert {"gpt3-175b", "llama3-405b", "gpt-tiny"} <= built


def test_architecture_switches():
    gpt = GPTModel(load_preset("gpt-tiny").config.model)
    llama = GPTModel(load_preset("llama-tiny").config.model)
    assert isinstance(gpt.decoder.final_norm, torch.nn.LayerNorm) and gpt.position_embedding is not None
    assert gpt.output is None  # tied: logits use the embedding matrix
    assert isinstance(llama.decoder.final_norm, torch.nn.RMSNorm) and llama.position_embedding is None
    assert llama.output is not None and llama.decoder.layers["0"].mlp.gate is not None
    attention = llama.decoder.layers["0"].attention
    q, k, v = split_qkv(attention.qkv_proj.weight, attention.heads, attention.groups)
    assert k.shape[0] == v.shape[0] == 2 * attention.head_dim  # 2 query groups
    assert q.shape[0] == attention.heads * attention.head_dim and attention.qkv_proj.bias is None


@pytest.mark.parametrize("heads, groups", [(4, 4), (8, 2), (6, 1)])
def test_fused_qkv_layout_is_megatrons_and_splits_back(heads, groups):
    """Per query group: its query heads, its key, its value (Megatron's linear_qkv); split inverts it."""
    d = 3
    q, k, v = (torch.randn(n * d, 5) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, groups)
    per_group = heads // groups
    first = fused[: (per_group + 2) * d]
    torch.testing.assert_close(first, torch.cat([q[: per_group * d], k[:d], v[:d]]), rtol=0, atol=0)
    for got, want in zip(split_qkv(fused, heads, groups), (q, k, v), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def reference_attention(layer, x, position_ids):
    """Plain softmax attention with keys/values repeated per group and explicit RoPE."""
    att = layer.attention
    batch, seq, _ = x.shape
    weights = split_qkv(att.qkv_proj.weight, att.heads, att.groups)
    biases = (None,) * 3 if att.qkv_proj.bias is None else split_qkv(att.qkv_proj.bias, att.heads, att.groups)
    q, k, v = (
        F.linear(x, w, b).view(batch, seq, -1, att.head_dim).transpose(1, 2)
        for w, b in zip(weights, biases, strict=True)
    )
    if att.rotary is not None:
        half = att.head_dim // 2
        inv_freq = 1.0 / (att.rotary.base ** (torch.arange(0, att.head_dim, 2).float() / att.head_dim))
        angles = position_ids[..., None].float() * inv_freq  # (batch, seq, half)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]

        def rotate(t):
            a, b = t[..., :half], t[..., half:]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

        q, k = rotate(q), rotate(k)
    repeat = att.heads // att.groups
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1), float("-inf"))
    out = scores.softmax(-1) @ v
    return att.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_attention_matches_reference(name):
    torch.manual_seed(0)
    model = GPTModel(load_preset(name).config.model).eval()
    layer = model.decoder.layers["0"]
    x = torch.randn(2, 12, model.config.hidden_size)
    positions = torch.arange(12).expand(2, 12)
    torch.testing.assert_close(
        layer.attention(x, positions), reference_attention(layer, x, positions), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_kv_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    model = GPTModel(load_preset(name).config.model).eval()
    tokens = torch.randint(0, 4000, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_kv_caches(2, 32)
        pieces = [model(tokens[:, :8], kv_caches=caches)]
        pieces += [model(tokens[:, i : i + 1], kv_caches=caches) for i in range(8, 14)]
        pieces.append(model(tokens[:, 14:], kv_caches=caches))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_init_follows_megatron():
    config = apply_overrides(
        load_preset("gpt-tiny").sections, {"init_method_std": 0.02, "num_layers": 8, "hidden_size": 256}
    )
    model = GPTModel(config.model)
    layer = model.decoder.layers["0"]
    assert layer.attention.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.attention.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert layer.mlp.fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.count_nonzero(layer.attention.qkv_proj.bias) == 0
    assert torch.all(layer.attention_norm.weight == 1)


def test_meta_built_model_is_materialised_with_the_weights_of_a_cpu_built_one():
    """Each parameter is drawn from (seed, its name): the same weights however the model is built."""
    from mtk.parallel.apply import parallelize
    from mtk.parallel.dims import ParallelDims

    config = apply_overrides(load_preset("llama-tiny").sections, {"seed": 7})
    with torch.device("meta"):
        meta = GPTModel(config.model)
    assert all(p.is_meta for p in meta.parameters())  # nothing allocated yet
    runner = parallelize(meta, SPEC, config, ParallelDims(world_size=1), None, "cpu")
    plain = GPTModel(config.model)
    plain.init_weights(seed=7)
    materialised = runner.parts[0].state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(materialised[name], tensor), name
    assert torch.equal(runner.parts[0].decoder.rotary.cos, plain.decoder.rotary.cos)
    other = GPTModel(config.model)
    other.init_weights(seed=8)
    assert not torch.equal(other.embedding.weight, plain.embedding.weight)


@pytest.mark.parametrize("granularity", ["selective", "full"])
def test_recomputation_changes_neither_gradients_nor_parameter_names(granularity):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from mtk.parallel.apply import apply_recompute

    config = apply_overrides(
        load_preset("llama-tiny").sections, {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    )
    torch.manual_seed(0)
    plain = GPTModel(config.model)
    recomputed = GPTModel(config.model)
    recomputed.load_state_dict(plain.state_dict())
    apply_recompute(SPEC.blocks(recomputed), granularity)
    wrapped = (
        recomputed.decoder.layers["0"] if granularity == "full" else recomputed.decoder.layers["0"].attention
    )
    assert type(wrapped).__name__ == "CheckpointWrapper"
    tokens = torch.randint(0, 4000, (2, 24))
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same dropout masks in both
        model(tokens).float().logsumexp(-1).mean().backward()
    for a, b in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert get_model_state_dict(recomputed).keys() == plain.state_dict().keys()


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_a_zero_centred_norm_holds_gamma_minus_one(normalization):
    """Megatron's --apply-layernorm-1p: the weight starts at 0 and is applied as 1 + weight, so a
    zero-centred norm with weight w is the plain norm with weight 1 + w."""
    from mtk.layers.norms import build_norm

    sections = {"model": {"normalization": normalization, "hidden_size": 16, "num_attention_heads": 2}}
    plain = build_norm(apply_overrides(sections, {}).model)
    centred = build_norm(apply_overrides(sections, {"apply_layernorm_1p": True}).model)
    assert [init.fill for init in initial_values(centred).values()] == [0.0] * len(list(centred.parameters()))
    assert initial_values(plain)["weight"].fill == 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        for param in centred.parameters():
            param.normal_()
        plain.load_state_dict(
            {name: p + 1 if name == "weight" else p for name, p in centred.state_dict().items()}
        )
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(centred(x), plain(x), atol=0, rtol=0)


def test_a_zero_centred_model_starts_as_the_plain_one_and_trains_the_offset():
    """The same seed gives the same function (norm weights 0 instead of 1, everything else equal),
    and the gradients of the norm weights are those of the plain model's."""
    plain_config = load_preset("llama-tiny").config.model
    centred_config = apply_overrides(load_preset("llama-tiny").sections, {"apply_layernorm_1p": True}).model
    plain, centred = GPTModel(plain_config), GPTModel(centred_config)
    plain.init_weights(seed=3)
    centred.init_weights(seed=3)
    assert torch.all(centred.decoder.final_norm.weight == 0)
    assert torch.all(plain.decoder.final_norm.weight == 1)
    tokens = torch.randint(0, 4000, (2, 16))
    for model in (plain, centred):
        model(tokens).float().logsumexp(-1).mean().backward()
    torch.testing.assert_close(centred(tokens), plain(tokens), atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), centred.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
