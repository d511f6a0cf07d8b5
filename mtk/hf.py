"""Hugging Face checkpoints in and out of mtk run directories: BERT, post-norm as the original
(``model_type`` "bert") or pre-norm as Megatron's ("megatron-bert").

A Hugging Face folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``,
read with ``torch.load(weights_only=True)``, which runs no code). ``import_hf`` turns it into an mtk
run directory whose iteration-0 checkpoint holds the weights, so ``mtk train --load`` continues
from it and every tool reads it; ``export_hf`` writes a run's checkpoint back as a
``BertForPreTraining`` (post-norm) or ``MegatronBertForPreTraining`` (pre-norm) folder that
``transformers`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mtk.checkpoint import CheckpointError, checkpoint_description, load_checkpoint
from mtk.config import RunConfig, apply_overrides
from mtk.manifest import atomic_output, atomic_write_text

# mtk name -> Hugging Face name; {i} is a layer index
BERT_NAMES = {
    "embedding.weight": "embeddings.word_embeddings.weight",
    "position_embedding.weight": "embeddings.position_embeddings.weight",
    "token_type_embedding.weight": "embeddings.token_type_embeddings.weight",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
    "binary_head.weight": "cls.seq_relationship.weight",
    "binary_head.bias": "cls.seq_relationship.bias",
}
BERT_LAYER_NAMES = {
    "attention.q_proj": "attention.self.query",
    "attention.k_proj": "attention.self.key",
    "attention.v_proj": "attention.self.value",
    "attention.out_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
# where the norms sit: after each residual add and on the embeddings (post-norm), or before each
# block and at the end of the encoder (pre-norm, Megatron's)
NORMS = {
    "bert": (
        {"embedding_norm": "embeddings.LayerNorm"},
        {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"},
    ),
    "megatron-bert": (
        {"encoder.final_norm": "encoder.ln"},
        {"attention_norm": "attention.ln", "mlp_norm": "ln"},
    ),
}
ARCHITECTURES = {"bert": "BertForPreTraining", "megatron-bert": "MegatronBertForPreTraining"}
HEADS = ("lm_head.", "binary_head.", "pooler.")  # what a bare BertModel checkpoint may lack
VOCAB_ROWS = ("embedding.weight", "lm_head.bias")  # padded to the vocabulary mtk allocates


class HFError(ValueError):
    """A Hugging Face folder mtk cannot read or a checkpoint it cannot write as one."""


def model_type(config) -> str:
    return "bert" if config.post_norm else "megatron-bert"


def bert_names(config) -> dict[str, str]:
    """Every mtk BERT parameter's Hugging Face name (without the ``bert.`` prefix of the base model)."""
    names = dict(BERT_NAMES)
    model_norms, layer_norms = NORMS[model_type(config)]
    for ours, theirs in model_norms.items():
        for kind in ("weight", "bias"):
            names[f"{ours}.{kind}"] = f"{theirs}.{kind}"
    for i in range(config.num_layers):
        for ours, theirs in {**BERT_LAYER_NAMES, **layer_norms}.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layers.{i}.{ours}.{kind}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    return names


def _hf_name(theirs: str) -> str:
    """The model-base part of ``bert.``-prefixed names, and TF-era LayerNorm names as today's."""
    theirs = theirs.removeprefix("bert.")
    return theirs.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model folder."""
    folder = Path(folder)
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{folder}: no config.json (is this a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{folder / 'config.json'}: unreadable ({err})") from None
    return hf_config


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder by their base-model names, running no pickled code."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        weights = {}
        for file in files:
            try:
                weights.update(load_file(file))
            except Exception as err:  # safetensors' own error type
                raise HFError(f"{file}: not a readable safetensors file ({err})") from None
    elif (folder / "pytorch_model.bin").is_file():
        try:
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:  # the weights-only unpickler refuses anything but tensors
            raise HFError(f"{folder / 'pytorch_model.bin'}: not a plain weights file ({err})") from None
    else:
        raise HFError(f"{folder}: no model.safetensors or pytorch_model.bin")
    return {_hf_name(name): tensor for name, tensor in weights.items()}


def bert_config(hf_config: dict[str, Any], preset_sections: dict[str, dict[str, Any]]) -> RunConfig:
    """A preset's config with the model section of a Hugging Face BERT ``config.json``."""
    if hf_config.get("model_type") not in NORMS:
        raise HFError(
            f"model_type {hf_config.get('model_type')!r}: mtk imports BERT ('bert', 'megatron-bert') checkpoints"
        )
    problems = []
    if hf_config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {hf_config['hidden_act']!r} (mtk's BERT uses the exact 'gelu')")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf_config['position_embedding_type']!r}")
    if hf_config.get("type_vocab_size", 2) != 2:
        problems.append(f"type_vocab_size {hf_config['type_vocab_size']} (mtk's BERT has 2 token types)")
    if problems:
        raise HFError("this BERT differs from mtk's: " + "; ".join(problems))
    max_positions = hf_config["max_position_embeddings"]
    preset_length = preset_sections.get("model", {}).get("seq_length", max_positions)
    model = {
        "family": "bert",
        "num_layers": hf_config["num_hidden_layers"],
        "hidden_size": hf_config["hidden_size"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "ffn_hidden_size": hf_config["intermediate_size"],
        "max_position_embeddings": max_positions,
        "seq_length": min(preset_length, max_positions),
        "vocab_size": hf_config["vocab_size"],
        "norm_epsilon": hf_config.get("layer_norm_eps", 1e-12),
        "hidden_dropout": hf_config.get("hidden_dropout_prob", 0.1),
        "attention_dropout": hf_config.get("attention_probs_dropout_prob", 0.1),
        "init_method_std": hf_config.get("initializer_range", 0.02),
        "normalization": "LayerNorm",
        "add_bias_linear": True,
        "bert_binary_head": True,
        "post_norm": hf_config["model_type"] == "bert",
    }
    sections = {name: dict(values) for name, values in preset_sections.items()}
    sections["model"] = model
    return apply_overrides(sections, {})


def bert_from_hf(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Copy the Hugging Face ``weights`` into an mtk ``BertModel``; returns the heads that were not in
    them (kept at their initial values). HFError for a missing base weight or a shape mismatch."""
    names = bert_names(model.config)
    missing = []
    with torch.no_grad():
        for ours, param in model.named_parameters():
            theirs = weights.get(names[ours])
            if theirs is None:
                if not ours.startswith(HEADS):
                    raise HFError(f"the checkpoint has no {names[ours]} (mtk's {ours})")
                missing.append(ours)
                continue
            target = param[: theirs.shape[0]] if ours in VOCAB_ROWS else param
            if target.shape != theirs.shape:
                raise HFError(
                    f"{names[ours]}: shape {tuple(theirs.shape)}, mtk expects {tuple(target.shape)}"
                )
            target.copy_(theirs)
            if ours in VOCAB_ROWS:
                param[theirs.shape[0] :].zero_()  # padding rows: never a real token
    return missing


def import_hf(folder: str | os.PathLike, preset: str, save: str | os.PathLike) -> dict[str, Any]:
    """Write an mtk run directory ``save`` whose iteration-0 checkpoint holds the BERT of ``folder``.

    Returns what was done: parameters, heads not in the checkpoint, unused checkpoint tensors.
    """
    from mtk.checkpoint import RunDir
    from mtk.models.bert import BertModel
    from mtk.presets import load_preset
    from mtk.train.loop import Trainer, TrainOptions
    from mtk.train.run import write_run_description

    config = bert_config(read_hf_config(folder), load_preset(preset).sections)
    weights = read_hf_weights(folder)
    if RunDir(save).checkpoints():
        raise CheckpointError(f"{save} already holds checkpoints; import into a new directory")
    model = BertModel(config.model)
    model.init_weights(config.train.seed)
    missing = bert_from_hf(weights, model)
    used = set(bert_names(config.model).values())
    unused = sorted(name for name in weights if name not in used and not name.endswith("position_ids"))
    unused = [name for name in unused if name != "cls.predictions.decoder.weight"]  # tied: the embedding
    options = TrainOptions(save=str(save), device="cpu")
    tokenizer = None
    if (Path(folder) / "vocab.txt").is_file():  # recorded, as prepared data records it
        from mtk.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(folder) / "vocab.txt", "wordpiece").describe()
    trainer = Trainer(config, model, (None, None, None), options, tokenizer=tokenizer)
    write_run_description(config, RunDir(save), None, sum(p.numel() for p in model.parameters()))
    trainer.save()
    trainer.finish_save()
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "config": config,
        "missing": missing,
        "unused": unused,
        "parameters": parameters,
        "tokenizer": tokenizer,
    }


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, iteration: int | None = None) -> Path:
    """A run's BERT checkpoint as a Hugging Face ``BertForPreTraining`` (post-norm) or
    ``MegatronBertForPreTraining`` (pre-norm) folder: config.json, model.safetensors, and the
    vocab.txt the data was prepared with, when the run records one."""
    from safetensors.torch import save_file

    description = checkpoint_description(run_dir, iteration)
    config = RunConfig.from_dict(description["config"]).model
    if config.family != "bert":
        raise HFError(f"{run_dir}: a {config.family} checkpoint; --to hf writes BERT checkpoints")
    if not config.bert_binary_head:
        raise HFError(f"{run_dir}: a BERT without token types and pooler; Hugging Face's BERT has both")
    state = load_checkpoint(run_dir, iteration)["model"]
    names = bert_names(config)
    weights = {}
    for ours, tensor in state.items():
        tensor = tensor[: config.vocab_size] if ours in VOCAB_ROWS else tensor
        theirs = names[ours]
        weights[theirs if theirs.startswith("cls.") else f"bert.{theirs}"] = tensor.contiguous().clone()
    weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"].clone()
    hf_config = {
        "architectures": [ARCHITECTURES[model_type(config)]],
        "model_type": model_type(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.ffn_hidden_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": 2,
        "initializer_range": config.init_method_std,
        "layer_norm_eps": config.norm_epsilon,
        "position_embedding_type": "absolute",
    }
    if config.num_attention_heads * config.kv_channels != config.hidden_size:
        raise HFError("Hugging Face BERT needs heads x head width == hidden_size")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    tokenizer = description.get("tokenizer") or {}
    if tokenizer.get("kind") == "wordpiece" and Path(tokenizer["files"][0]["path"]).is_file():
        vocab = Path(tokenizer["files"][0]["path"]).read_text(encoding="utf-8")
        atomic_write_text(out / "vocab.txt", vocab)
        atomic_write_text(
            out / "tokenizer_config.json",
            json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.get("lower_case")})
            + "\n",
        )
    return out
