"""Hugging Face checkpoints in and out of mtk run directories.

Model types: those the families declare (``TrainableFamily.hf_adapters``): ``bert`` (post-norm, the
original) and ``megatron-bert`` (Megatron's pre-norm BERT) in ``mtk/models/bert_hf.py``, ``llama``
and ``gpt2`` (mtk's decoder) in ``mtk/models/gpt_hf.py``, ``t5`` in ``mtk/models/t5_hf.py``; this module is the generic part, and finds
an adapter by ``model_type`` among the registered families'. A Hugging Face folder holds
``config.json`` and ``*.safetensors`` (or ``pytorch_model.bin``, read with
``torch.load(weights_only=True)``, which runs no code). ``import_hf`` turns it into an mtk run
directory whose iteration-0 checkpoint holds the weights and whose tokenizer is the folder's
(tokenizer.json or vocab.txt; none only when asked), so
``mtk train --load`` continues from it and ``mtk generate`` samples from it; ``export_hf`` writes a
run's checkpoint back as a folder ``transformers`` loads (``BertForPreTraining``,
``MegatronBertForPreTraining``, ``LlamaForCausalLM``, ``GPT2LMHeadModel``,
``T5ForConditionalGeneration``). Llama's RoPE is plain or
Llama 3.1's scaled one (``rope_type`` "llama3"); other scalings are refused. Norm weights mtk holds
zero-centred (``apply_layernorm_1p``: gamma - 1) are written as Hugging Face's gamma.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from mtk.checkpoint import CheckpointError, checkpoint_description, load_checkpoint
from mtk.config import ModelConfig, RunConfig
from mtk.manifest import atomic_output, atomic_write_text
from mtk.models.hf_adapter import HFAdapter, HFError

IGNORED = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers, not weights


def adapters() -> dict[str, HFAdapter]:
    """Hugging Face model type -> its adapter, as the registered families declare them
    (``TrainableFamily.hf_adapters``), in the order of the families."""
    from mtk.models import family_names, family_spec

    return {
        adapter.model_type: adapter for name in family_names() for adapter in family_spec(name).hf_adapters
    }


def architecture(model_type: Any) -> HFAdapter:
    known = adapters()
    if not isinstance(model_type, str) or model_type not in known:
        raise HFError(
            f"model_type {model_type!r}: mtk imports {', '.join(repr(t) for t in known)} checkpoints"
        )
    return known[model_type]


def for_config(config: ModelConfig) -> HFAdapter:
    """The Hugging Face model type an mtk model exports as: the first of its family's adapters that
    matches its config."""
    from mtk.models import family_spec

    for adapter in family_spec(config.family).hf_adapters:
        if adapter.matches(config):
            return adapter
    raise HFError(f"a {config.family} model has no Hugging Face export in mtk")


# ---- reading and writing ------------------------------------------------------------------------


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face model folder: a JSON object, else HFError naming the file."""
    file = Path(folder) / "config.json"
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{folder}: no config.json (is this a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFError(f"{file}: unreadable ({err})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file}: expected a JSON object of the model's settings, found a {type(hf).__name__}")
    return hf


def _weight_files(folder: Path) -> list[tuple[Path, dict[str, torch.Tensor]]]:
    """Each weights file of a Hugging Face folder with its tensors, under the names it gives them."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        loaded = []
        for file in files:
            try:
                loaded.append((file, load_file(file)))
            except Exception as err:  # safetensors' own error type
                raise HFError(f"{file}: not a readable safetensors file ({err})") from None
        return loaded
    file = folder / "pytorch_model.bin"
    if not file.is_file():
        raise HFError(f"{folder}: no *.safetensors or pytorch_model.bin")
    try:
        return [(file, torch.load(file, map_location="cpu", weights_only=True))]
    except Exception as err:  # the weights-only unpickler refuses anything but tensors
        raise HFError(f"{file}: not a plain weights file ({err})") from None


def _check_weight(file: Path, name: str, tensor: torch.Tensor) -> None:
    """HFError unless ``tensor`` holds finite floating-point values: copying an integer tensor into a
    parameter would cast it, and a NaN would train to NaN."""
    if not tensor.is_floating_point():
        raise HFError(
            f"{file}: {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating point; mtk imports "
            "float32, float16 or bfloat16 weights (dequantize a quantized checkpoint first)"
        )
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())
    if bad:
        raise HFError(
            f"{file}: {name} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} of "
            f"{tensor.numel():,}; the checkpoint is damaged (download it again)"
        )


def read_hf_weights(
    folder: str | os.PathLike, base_prefix: str, expected: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """Every weight of a Hugging Face folder (all ``*.safetensors`` shards, or ``pytorch_model.bin``
    read without running pickled code), base-model names without ``base_prefix``. The tensors named in
    ``expected`` (the same names) must hold finite floating-point values: HFError naming the tensor and
    its file otherwise."""
    weights = {}
    for file, tensors in _weight_files(Path(folder)):
        for name, tensor in tensors.items():
            ours = name.removeprefix(base_prefix)  # TF-era BERT names LayerNorm parameters gamma/beta
            ours = ours.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias"
            )
            if ours in expected:
                _check_weight(file, name, tensor)
            weights[ours] = tensor
    return weights


def hf_run_config(
    hf: dict[str, Any], preset_sections: dict[str, dict[str, Any]], where: str = "config.json"
) -> RunConfig:
    """A preset's training settings with the model of a Hugging Face ``config.json`` (``where``: the
    file, which every error names: a missing key, a value of the wrong type, a model mtk does not do)."""
    try:
        model = architecture(hf.get("model_type")).model_config(hf)
        lengths = preset_sections.get("model", {})  # the preset's, up to the model's positions
        model["seq_length"] = min(lengths.get("seq_length", model["max_position_embeddings"]),
                                  model["max_position_embeddings"])  # fmt: skip
        if "decoder_seq_length" in lengths:  # T5's
            model["decoder_seq_length"] = min(lengths["decoder_seq_length"], model["max_position_embeddings"])
    except KeyError as err:
        raise HFError(f"{where} has no {err.args[0]!r}, which a {hf['model_type']} model needs") from None
    except HFError as err:
        raise HFError(f"{where}: {err}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as err:
        raise HFError(
            f"{where}: a value of the wrong type ({err}); compare it with the model's original config.json"
        ) from None
    sections = {name: dict(values) for name, values in preset_sections.items()}
    sections["model"] = model
    return RunConfig.from_dict(sections, where=where)


def load_into(model: torch.nn.Module, arch: HFAdapter, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy Hugging Face ``weights`` (see ``read_hf_weights``) into an mtk ``model``; returns the heads
    that were not there (kept at their initial values). HFError for a missing weight or a shape. A
    norm weight Hugging Face stores as gamma goes into a zero-centred norm (``apply_layernorm_1p``)
    as gamma - 1."""
    from mtk.layers.norms import zero_centered_weights

    ours = arch.to_mtk(weights, model.config)
    centred = set(zero_centered_weights(model))
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = ours.get(name)
            if tensor is None:
                if not name.startswith(arch.heads):
                    raise HFError(
                        f"the checkpoint has no {arch.names(model.config).get(name, name)} (mtk's {name})"
                    )
                missing.append(name)
                continue
            target = param[: tensor.shape[0]] if name in arch.vocab_rows else param
            if target.shape != tensor.shape:
                theirs = arch.names(model.config).get(name, name)
                raise HFError(
                    f"the checkpoint's {theirs} has shape {tuple(tensor.shape)}, the model its config.json "
                    f"describes needs {tuple(target.shape)} (mtk's {name})"
                )
            target.copy_(tensor - 1 if name in centred else tensor)
            if name in arch.vocab_rows:
                param[tensor.shape[0] :].zero_()  # padding rows: never a real token
    return missing


def _folder_tokenizer(folder: Path, arch: HFAdapter) -> dict[str, Any]:
    """The folder's tokenizer as a manifest entry; HFError if it has none, or one mtk cannot read."""
    from mtk.data.tokenizer import TokenizerError, load_tokenizer

    for name, kind in arch.tokenizer_files:
        if (folder / name).is_file():
            try:
                return load_tokenizer(folder / name, kind).describe()
            except TokenizerError as err:
                problem = str(err)
            except UnicodeDecodeError as err:  # a binary vocab.txt
                problem = f"{folder / name}: not UTF-8 text ({err})"
            raise HFError(
                f"{problem}; replace it with the model's, or pass --no-tokenizer to import the weights alone"
            )
    looked_for = " or ".join(name for name, _ in arch.tokenizer_files)
    raise HFError(
        f"{folder}: no tokenizer (looked for {looked_for}); add the model's, or pass --no-tokenizer to "
        "import the weights alone (then prepare data with the model's tokenizer yourself)"
    )


def import_hf(
    folder: str | os.PathLike, preset: str | None, save: str | os.PathLike, with_tokenizer: bool = True
) -> dict[str, Any]:
    """Write an mtk run directory ``save`` whose iteration-0 checkpoint holds the model of ``folder``,
    and whose tokenizer is the folder's (``with_tokenizer`` False: none, the weights alone).

    Everything is checked before the model is allocated: config.json, the tokenizer, every weight
    (finite floating point, the names and shapes the config describes). The model is then built as
    every command builds one (``mtk.train.build.build_model``, for forward use), initialised from
    ``config.train.seed``, and the weights are copied in. Returns what was done: config, parameters,
    heads not in the checkpoint, unused checkpoint tensors, the tokenizer entry (or None).
    """
    from mtk.checkpoint import RunDir
    from mtk.data.prepared import DataFacts
    from mtk.models import family_spec
    from mtk.models.spec import check_model_fits
    from mtk.presets import load_preset
    from mtk.train.build import build_model
    from mtk.train.run import save_weights_checkpoint, write_run_description

    folder = Path(folder)
    hf, where = read_hf_config(folder), str(folder / "config.json")
    try:
        arch = architecture(hf.get("model_type"))
    except HFError as err:
        raise HFError(f"{where}: {err}") from None
    config = hf_run_config(hf, load_preset(preset or arch.default_preset).sections, where)
    spec = family_spec(config.model.family)
    check_model_fits(spec, config.model, torch.device("cpu"))  # before a weight is read
    if RunDir(save).checkpoints():
        raise CheckpointError(f"{save} already holds checkpoints; import into a new directory")
    tokenizer = _folder_tokenizer(folder, arch) if with_tokenizer else None
    used = arch.used_names(config.model)
    weights = read_hf_weights(folder, arch.base_prefix, expected=used)
    try:
        with torch.device("meta"):  # names and shapes against config.json, before a byte is allocated
            load_into(spec.build(config.model), arch, weights)
    except HFError as err:
        raise HFError(f"{folder}: {err}") from None
    # its fit was checked before a weight was read (check_model_fits above)
    model = build_model(config, "cpu", training=False, check=False).module
    missing = load_into(model, arch, weights)
    unused = sorted(name for name in weights if name not in used and not name.endswith(IGNORED))
    # the checkpoint is a starting point: a preset without a run length (a batch-size ramp) still imports
    length = (
        {}
        if config.train.train_iters or config.train.train_samples and not config.train.batch_size_ramp
        else {"train_iters": 1}
    )
    checkpoint_config = dataclasses.replace(config, train=dataclasses.replace(config.train, **length))
    facts = DataFacts(config.model.vocab_size, tokenizer.get("eod") if tokenizer else None, tokenizer, [])
    write_run_description(config, RunDir(save), facts, sum(p.numel() for p in model.parameters()))
    # the weights alone (no optimizer): `mtk train --load` starts its optimizer fresh from them
    save_weights_checkpoint(checkpoint_config, model, save, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "config": config,
        "missing": missing,
        "unused": unused,
        "parameters": parameters,
        "tokenizer": tokenizer,
    }


def _zero_centered_weights(config: ModelConfig) -> list[str]:
    """The parameters of a model of ``config`` that hold gamma - 1 (``apply_layernorm_1p``)."""
    if not config.apply_layernorm_1p:
        return []
    from mtk.layers.norms import zero_centered_weights
    from mtk.models import family_spec

    with torch.device("meta"):  # names only
        return zero_centered_weights(family_spec(config.family).build(config))


def export_hf(run_dir: str | os.PathLike, out: str | os.PathLike, iteration: int | None = None) -> Path:
    """A run's checkpoint as a Hugging Face folder: config.json, model.safetensors, and the tokenizer
    files the run records (tokenizer.json, or vocab.txt)."""
    from safetensors.torch import save_file

    description = checkpoint_description(run_dir, iteration)
    config = RunConfig.from_dict(description["config"]).model
    arch = for_config(config)
    hf_config = {"architectures": [arch.hf_class], "model_type": arch.model_type, **arch.hf_config(config)}
    state = load_checkpoint(run_dir, iteration)["model"]
    state = {name: t[: config.vocab_size] if name in arch.vocab_rows else t for name, t in state.items()}
    for name in _zero_centered_weights(config):  # gamma - 1 in mtk, gamma in Hugging Face
        state[name] = state[name] + 1
    converted = arch.to_hf(state, config)
    heads = tuple(name for name in arch.tied_outputs(config)) + ("cls.", "lm_head.")
    weights = {
        (name if name.startswith(heads) else f"{arch.base_prefix}{name}"): tensor.contiguous().clone()
        for name, tensor in converted.items()
    }
    for name, source in arch.tied_outputs(config).items():
        weights[name] = state[source].contiguous().clone()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    tokenizer = description.get("tokenizer") or {}
    source = Path(tokenizer["files"][0]["path"]) if tokenizer.get("files") else None
    if source is not None and source.is_file():
        if tokenizer["kind"] == "hf":
            shutil.copyfile(source, out / "tokenizer.json")
            config_file = source.with_name("tokenizer_config.json")
            if config_file.is_file():
                shutil.copyfile(config_file, out / "tokenizer_config.json")
        elif tokenizer["kind"] == "wordpiece":
            shutil.copyfile(source, out / "vocab.txt")
            settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.get("lower_case")}
            atomic_write_text(out / "tokenizer_config.json", json.dumps(settings) + "\n")
    return out
