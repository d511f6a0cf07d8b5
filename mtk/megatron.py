"""The bridge to Megatron-LM's ``pretrain_*.py`` scripts, both ways, through one table.

``TABLE`` holds one entry per Megatron argument mtk understands. Where a config field has Megatron's
name (``num_layers`` <-> ``--num-layers``) the entry is derived from the name and Megatron's default
(``SAME_NAME``); the others are written out (``EXCEPTIONS``): renamed, negated, converted, or several
flags for one key. Each entry works both ways: ``to_megatron`` writes a config's arguments,
``from_megatron`` reads them back, so a preset written by ``megatron_command`` and read by
``import_script`` is the same config, apart from what ``megatron_command`` reports Megatron cannot say.

Defaults are Megatron's, written in mtk's terms: an argument left out of a script means Megatron's
default, which the import writes down where mtk's differs; an argument at Megatron's default is left
out of the export. Settings that describe the machine (paths, launcher, logging, kernels) are not part
of a preset: the import lists them as skipped, never silently drops them; an argument mtk does not
know is listed by name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import shlex
import textwrap
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from mtk import config as cfg
from mtk.presets import preset_toml
from mtk.shell_script import find_command, is_script_word

PROGRAM = r"pretrain_\w+\.py"


# Each family's facts about Megatron-LM (its pretrain_*.py script, the inputs that script needs, the
# switches it needs, the flags it names differently) are attributes of its spec (mtk/models/spec.py),
# looked up through the registry: a registered family with a script has its export and import too.
def _families() -> list[Any]:
    """The registered family specs (mtk.models imports torch: only when a command is converted)."""
    from mtk.models import family_names, family_spec

    return [family_spec(name) for name in family_names()]


def _family(name: str) -> Any:
    from mtk.models import family_spec

    return family_spec(name)


def _script(spec: Any) -> str:
    if spec.megatron_script is None:
        raise MegatronError(f"family '{spec.name}' has no Megatron-LM script to convert to or from")
    return spec.megatron_script


def _renamed(flag: str) -> tuple[str, ...]:
    """The names some family's script gives ``flag`` (pretrain_t5.py: --encoder-num-layers)."""
    names = (spec.megatron_flag_names.get(flag) for spec in _families())
    return tuple(dict.fromkeys(name for name in names if name))


class MegatronError(cfg.ConfigError):
    """A Megatron script or argument mtk cannot turn into a preset, with what to change."""


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()  # Megatron requires the argument or derives it: always written

# Megatron's arguments named as mtk's config fields, with Megatron's value when the flag is left out,
# in mtk's terms (Megatron-LM's megatron/training/arguments.py and its config dataclasses; RETRO's
# from commit 93ddc24, the last with RETRO). A bool is a switch: the flag sets the other value.
SAME_NAME: dict[str, Any] = {
    # model
    "num_layers": NO_DEFAULT,
    "hidden_size": NO_DEFAULT,
    "num_attention_heads": NO_DEFAULT,
    "kv_channels": NO_DEFAULT,  # derived as mtk does (hidden / heads), written to be explicit
    "seq_length": NO_DEFAULT,
    "max_position_embeddings": NO_DEFAULT,
    "vocab_size": NO_DEFAULT,  # read by NullTokenizer (mock data); real tokenizers count their files
    "make_vocab_size_divisible_by": 128,
    "normalization": "LayerNorm",
    "norm_epsilon": 1e-5,
    "apply_layernorm_1p": False,
    "position_embedding_type": "learned_absolute",
    "relative_attention_num_buckets": 32,  # pretrain_t5.py with --position-embedding-type relative
    "relative_attention_max_distance": 128,
    "rotary_base": 10000,
    "use_rope_scaling": False,
    "rope_scaling_factor": 8.0,
    "swiglu": False,
    "openai_gelu": False,
    "untie_embeddings_and_output_weights": False,
    "init_method_std": 0.02,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "decoder_num_layers": NO_DEFAULT,
    "decoder_seq_length": NO_DEFAULT,
    "retro_num_neighbors": 2,
    # data
    "split": "969,30,1",  # Megatron's legacy default, which it warns about
    "mask_prob": 0.15,
    "short_seq_prob": 0.1,
    # train
    "micro_batch_size": NO_DEFAULT,
    "rampup_batch_size": None,
    "train_iters": None,
    "train_samples": None,
    "lr": NO_DEFAULT,
    "min_lr": 0.0,
    "lr_decay_style": "linear",
    "lr_wsd_decay_style": "exponential",
    "lr_decay_iters": None,
    "lr_decay_samples": None,
    "lr_wsd_decay_iters": None,
    "lr_wsd_decay_samples": None,
    "lr_warmup_fraction": None,
    "lr_warmup_iters": 0,
    "lr_warmup_samples": None,  # Megatron's 0, which mtk leaves unset
    "weight_decay": 0.01,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_eps": 1e-8,
    "clip_grad": 1.0,
    "loss_scale": None,
    "initial_loss_scale": 2.0**32,
    "min_loss_scale": 1.0,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "fp8_recipe": "delayed",
    "fp8_amax_history_len": 1,
    "fp8_amax_compute_algo": "most_recent",
    "fp8_margin": 0,
    "first_last_layers_bf16": False,
    "num_layers_at_start_in_bf16": 1,
    "num_layers_at_end_in_bf16": 1,
    "log_interval": 100,
    "save_interval": None,
    "eval_interval": 0,  # unset in Megatron: never (mtk's 0)
    "eval_iters": 100,
    "seed": 1234,
    # parallel
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "context_parallel_size": 1,
    "account_for_embedding_in_pipeline_split": False,
    "account_for_loss_in_pipeline_split": False,
    "use_distributed_optimizer": False,
    "grad_reduce_in_bf16": False,
}
# tweaks of same-name entries (the flags a family's script names differently: its spec's
# megatron_flag_names)
SAME_NAME_OPTIONS: dict[str, dict[str, Any]] = {
    "split": {"always": True},
    "fp8_recipe": {"choices": ("tensorwise", "delayed", "mxfp8", "blockwise", "custom")},
}

# config keys Megatron has no argument for: the values Megatron behaves as (None: mtk's default), and why
MTK_ONLY: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    "post_norm": (
        (False,),
        "Megatron's transformer layers are pre-norm (post-norm loads original BERT checkpoints)",
    ),
    "relu": ((False,), "Megatron-LM's arguments choose GELU, SwiGLU or squared ReLU, not ReLU (T5 v1.0)"),
    "geglu": ((False,), "Megatron-LM's arguments have no gated GELU (T5 v1.1, Flan-T5)"),
    "init_method": (
        ("normal",),
        "Megatron draws from normal(0, --init-method-std); T5's own scheme has no argument",
    ),
    "fp8_backend": (("auto", "te"), "Megatron runs FP8 through Transformer Engine only"),
    "fp8_strict": ((False, True), "Megatron has no other FP8 backend to fall back to"),
    "compile": (
        (None, False, True),
        "Megatron-LM has no torch.compile switch; compiling changes speed, not the model",
    ),
    "retro_chunk_length": (
        None,
        "pretrain_retro.py reads it from --retro-project-dir (retro_gpt_chunk_length)",
    ),
    "rope_scaling_low_freq_factor": ((1.0,), "Megatron's --use-rope-scaling fixes it at 1 (Llama 3.1)"),
    "rope_scaling_high_freq_factor": ((4.0,), "Megatron's --use-rope-scaling fixes it at 4 (Llama 3.1)"),
    "rope_scaling_original_max_position_embeddings": (
        (8192,),
        "Megatron's --use-rope-scaling fixes it at 8192 (Llama 3.1)",
    ),
}
# config keys that describe the run's inputs, given to `mtk train`, never part of a preset
RUN_INPUTS = {"data_path", "mock_data", "data_cache_path", "retro_project"}

# Megatron arguments that describe the machine, not the model or its schedule: skipped, and listed
MACHINE: dict[str, tuple[str, ...]] = {
    "data, tokenizer and checkpoint paths (mtk prepare-data and mtk train take them)": (
        "--data-path", "--train-data-path", "--valid-data-path", "--test-data-path", "--data-args-path",
        "--per-split-data-args-path", "--data-cache-path", "--mock-data", "--vocab-file", "--merge-file",
        "--tokenizer-*", "--vocab-extra-ids", "--tiktoken-*", "--retro-project-dir", "--save", "--load",
        "--pretrained-checkpoint", "--tensorboard-dir", "--wandb-save-dir", "--ckpt-*", "--dist-ckpt-*",
        "--use-dist-ckpt", "--auto-detect-ckpt-format", "--use-checkpoint-args", "--no-load-*", "--no-save-*",
        "--finetune", "--exit-on-missing-checkpoint", "--async-save", "--non-persistent-*",
    ),
    "launcher and processes": (
        "--distributed-backend", "--distributed-timeout-minutes", "--local-rank", "--local_rank", "--num-workers",
        "--exit-*", "--use-mcore-models", "--use-legacy-models", "--transformer-impl", "--attention-backend",
        "--no-mmap-bin-files", "--mmap-bin-files", "--no-create-attention-mask-in-dataloader",
        "--no-data-sharding", "--dataloader-type", "--use-cpu-initialization", "--manual-gc*",
        "--empty-unused-memory-level", "--use-flash-attn", "--cuda-graph-*", "--enable-cuda-graph",
        "--external-cuda-graph", "--num-dataset-builder-threads", "--no-check-for-*",
    ),
    "logging, profiling and monitoring": (
        "--log-*", "--tensorboard-*", "--wandb-*", "--profile*", "--timing-log-*", "--logging-level",
        "--one-logger*", "--enable-one-logger", "--record-memory-history", "--memory-snapshot-path",
        "--straggler-*", "--no-log-*", "--check-for-*", "--barrier-with-l1-time", "--energy-monitor*",
        "--log-throughput", "--rerun-mode", "--result-rejected-tracker-filename",
    ),
    "kernels, fusions and overlap (the same model and schedule, run faster)": (
        "--sequence-parallel", "--overlap-*", "--tp-comm-*", "--cross-entropy-loss-fusion",
        "--cross-entropy-fusion-impl", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
        "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
        "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--fp8-param-gather",
        "--accumulate-allreduce-grads-in-fp32", "--use-fused-*", "--ddp-*", "--align-grad-reduce",
        "--align-param-gather", "--defer-embedding-wgrad-compute", "--num-distributed-optimizer-instances",
        "--no-async-tensor-model-parallel-allreduce", "--delay-wgrad-compute",
    ),
}  # fmt: skip

# Megatron arguments at the value mtk always uses: accepted without a setting; any other value is listed
IMPLIED: dict[str, tuple[str, Any, str]] = {
    "--rotary-percent": ("1.0", lambda words: float(words[0]) == 1.0, "mtk rotates the whole head"),
    "--optimizer": ("adam", lambda words: words == ["adam"], "mtk's optimizer is AdamW (Megatron's adam)"),
}


# ---- values ----------------------------------------------------------------------------------------


def _field(key: str) -> dataclasses.Field | None:
    section = cfg.section_of(key)
    if section is None:
        return None
    return next(item for item in dataclasses.fields(cfg.SECTIONS[section]) if item.name == key)


def has_key(key: str) -> bool:
    """Whether mtk's config has ``key`` (the agreed keys of other work may not exist yet)."""
    return cfg.section_of(key) is not None


def mtk_default(key: str) -> Any:
    item = _field(key)
    if item.default is not dataclasses.MISSING:
        return item.default
    return item.default_factory()


def _annotation(key: str) -> Any:
    return cfg.field_types(cfg.SECTIONS[cfg.section_of(key)])[key]


def _get(config: cfg.RunConfig, key: str) -> Any:
    return getattr(getattr(config, cfg.section_of(key)), key)


def _same(value: Any, default: Any) -> bool:
    return default is not NO_DEFAULT and value == default


def _number_text(value: float) -> str:
    """Shortest text that reads back as ``value``: 6e-05, 0.00015, 1024."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _words(value: Any) -> list[str]:
    if isinstance(value, list):
        return [word for item in value for word in _words(item)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [_number_text(value)]
    return [str(value)]


def _parse(key: str, words: list[str]) -> Any:
    """Megatron's text for ``key`` as its config value (by the field's type); ValueError says why not."""
    annotation = _annotation(key)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    base = args[0] if type(None) in typing.get_args(annotation) and len(args) == 1 else annotation
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return [_parse_one(item, word) for word in words]
    if len(words) != 1:
        raise ValueError(f"takes one value, found {len(words)}: {' '.join(words) or 'none'}")
    return _parse_one(base, words[0])


class _Unsupported(ValueError):
    """A value Megatron has and mtk has not (a choice): the argument is listed, the import goes on."""


def _parse_one(annotation: Any, word: str) -> Any:
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if word not in choices:
            raise _Unsupported(f"mtk takes {', '.join(map(str, choices))}")
        return word
    if annotation is int:
        try:
            return int(word)
        except ValueError:
            raise ValueError("is not a whole number") from None
    if annotation is float:
        try:
            value = float(word)
        except ValueError:
            raise ValueError("is not a number") from None
        if not math.isfinite(value):
            raise ValueError("is not a finite number")
        return value
    return word


def schedule_text(ramp: list[list[float]]) -> str:
    """``[[0, 16], [2.4e9, 320]]`` -> ``0:16 2.4B:320``, Megatron's --step-batch-size-schedule (tokens)."""

    def tokens(count: float) -> str:
        count = int(count)
        # a suffix where it is shorter and reads back exactly, as Megatron reads it: int(float(2.4) * 1e9)
        for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
            text = f"{count / scale:g}{suffix}"
            if count >= scale and len(text) < len(str(count)) and int(float(text[:-1]) * scale) == count:
                return text
        return str(count)

    return " ".join(f"{tokens(threshold)}:{int(batch)}" for threshold, batch in ramp)


# ---- reading a command's arguments -----------------------------------------------------------------


def _unquote(word: str) -> str:
    """'99,1,0' -> 99,1,0: quotes an array element carried into the argument (bash keeps them there)."""
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "'\"":
        return word[1:-1]
    return word


def _is_flag(word: str) -> bool:
    if not word.startswith("-") or word == "-":
        return False
    try:
        float(word)
        return False  # -1, -0.5: values
    except ValueError:
        return True


def _split_flags(arguments: list[str]) -> list[str]:
    """``"--fp8-format hybrid"``, one quoted array element, as the flag and its value (Megatron would
    refuse it; its intent is plain). ``--name=a b`` stays one argument."""
    words = []
    for word in arguments:
        head = word.split(maxsplit=1)[0] if word.strip() else word
        words += word.split() if _is_flag(word) and "=" not in head else [word]
    return words


class Given:
    """The arguments of one Megatron command: each flag with its words (the last time it is given)."""

    def __init__(self, arguments: list[str], family: str) -> None:
        self.family = family
        self.words: dict[str, list[str]] = {}
        self.position: dict[str, int] = {}
        self.stray: list[str] = []
        self.used: set[str] = set()
        self.problems: list[str] = []
        self.unknown: list[str] = []  # "--flag value: why" for arguments with no mtk setting
        self.defaults: list[str] = []  # Megatron's defaults written where mtk's differ
        self.notes: list[str] = []
        self.explicit: dict[str, tuple[str, Any]] = {}  # key -> (flag, value) set by the script
        current = None
        for index, word in enumerate(_split_flags(arguments)):
            if _is_flag(word):
                current, sep, value = word.partition("=")
                self.words[current] = [_unquote(value)] if sep else []
                self.position[current] = index
            elif current is None:
                self.stray.append(word)
            else:
                self.words[current].append(_unquote(word))

    def take(self, *flags: str) -> tuple[str, list[str]] | None:
        """The flag of ``flags`` given last, with its words; every one of them counts as read."""
        present = [flag for flag in flags if flag in self.words]
        self.used.update(present)
        if not present:
            return None
        flag = max(present, key=self.position.__getitem__)
        return flag, self.words[flag]

    def text(self, flag: str) -> str:
        return " ".join([flag, *self.words.get(flag, [])])

    def parse(self, key: str, flag: str, words: list[str]) -> Any:
        """``words`` of ``flag`` as ``key``'s value; None (and a problem, or an unknown entry) if they are not."""
        unresolved = [word for word in words if "${" in word or "$(" in word]
        if unresolved:
            self.problems.append(
                f"{self.text(flag)}: the script leaves {', '.join(unresolved)} undefined; give it a value there"
            )
            return None
        try:
            return _parse(key, words)
        except _Unsupported as err:
            self.unknown.append(f"{self.text(flag)} ({key}: {err})")
        except ValueError as err:
            self.problems.append(f"{self.text(flag)}: {' '.join(words)!r} {err}")
        return None

    def set(self, key: str, flag: str, value: Any, values: dict[str, Any]) -> None:
        if value is None:
            return
        if key in self.explicit and self.explicit[key][1] != value:
            self.problems.append(f"{self.explicit[key][0]} and {flag} both set {key}: keep one")
        self.explicit[key] = (flag, value)
        values[key] = value

    def default(self, key: str, megatron_default: Any, values: dict[str, Any], flag: str) -> None:
        """Left out of the script: Megatron's default, written down where mtk's differs."""
        if megatron_default is NO_DEFAULT or megatron_default is None or key in values:
            return
        if megatron_default != mtk_default(key):
            values[key] = megatron_default
            self.defaults.append(
                f"{key} = {megatron_default!r} (without {flag}; mtk's default is {mtk_default(key)!r})"
            )


# ---- the table's entries ---------------------------------------------------------------------------


class Entry(Protocol):
    """One Megatron argument (or a few that work together) and the config keys it sets."""

    keys: tuple[str, ...]
    flags: tuple[str, ...]
    late: bool  # read after the others: it depends on their values

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        """The arguments (each ``[flag, *words]``) that give Megatron ``config``'s values of ``keys``."""

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        """Read ``flags`` from ``given`` into ``values`` (config key -> value)."""


@dataclass(frozen=True)
class Value:
    """``--flag VALUE`` (or several values, for a list) <-> one config key."""

    key: str
    flag: str
    megatron_default: Any = NO_DEFAULT
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None  # what Megatron accepts, where mtk accepts others
    always: bool = False  # written even at Megatron's default (Megatron warns without it)
    late = False

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *self.aliases, *_renamed(self.flag))  # renamed: by some family's script

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        value = _get(config, self.key)
        if value is None or (not self.always and _same(value, self.megatron_default)):
            return []
        if self.choices is not None and value not in self.choices:
            notes.append(f"{self.key} = {value!r}: Megatron's {self.flag} takes {', '.join(self.choices)}")
            return []
        flag = _family(config.model.family).megatron_flag_names.get(self.flag, self.flag)
        return [[flag, *_words(value)]]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        taken = given.take(*self.flags)
        if taken is None:
            given.default(self.key, self.megatron_default, values, self.flag)
            return
        flag, words = taken
        given.set(self.key, flag, given.parse(self.key, flag, words), values)


@dataclass(frozen=True)
class Switch:
    """``--flag`` without a value <-> one config key: present, the key takes ``const``."""

    key: str
    flag: str
    const: Any
    megatron_default: Any
    late = False

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag,)

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        return [[self.flag]] if _get(config, self.key) == self.const != self.megatron_default else []

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        taken = given.take(self.flag)
        if taken is None:
            given.default(self.key, self.megatron_default, values, self.flag)
            return
        if taken[1]:
            given.problems.append(f"{self.flag} takes no value, found {' '.join(taken[1])!r}")
        given.set(self.key, self.flag, self.const, values)


@dataclass(frozen=True)
class Family:
    """The model family: which script runs it, and the switches that script needs to train it
    (pretrain_retro.py's --retro-add-retriever), from the family specs."""

    keys = ("family",)
    late = False

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(switch for spec in _families() for switch in spec.megatron_switches))

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        return [[switch] for switch in _family(config.model.family).megatron_switches]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        present = [switch for switch in self.flags if given.take(switch) is not None]
        spec = _family(given.family)
        family = spec.name
        if spec.megatron_without_switches and not set(spec.megatron_switches) <= set(present):
            family = spec.megatron_without_switches
            given.notes.append(
                f"{spec.megatron_script} without {' '.join(spec.megatron_switches)} trains a "
                f"{family.upper()}: family {family}"
            )
        for switch in present:
            if switch not in spec.megatron_switches:
                readers = ", ".join(s.megatron_script for s in _families() if switch in s.megatron_switches)
                given.unknown.append(f"{switch} (only {readers} reads it; this runs {spec.megatron_script})")
        values["family"] = family


@dataclass(frozen=True)
class QueryGroups:
    """--group-query-attention --num-query-groups N <-> num_query_groups (Megatron ignores N without GQA)."""

    keys = ("num_query_groups",)
    flags = ("--group-query-attention", "--num-query-groups")
    late = False

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        model = config.model
        if model.num_query_groups == model.num_attention_heads:
            return []
        return [["--group-query-attention"], ["--num-query-groups", str(model.num_query_groups)]]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        gqa = given.take("--group-query-attention")
        groups = given.take("--num-query-groups")
        if gqa is None:
            if groups is not None:
                given.notes.append(f"{given.text('--num-query-groups')}: ignored, as Megatron ignores it "
                                   "without --group-query-attention")  # fmt: skip
            return
        if gqa[1]:
            given.problems.append(f"--group-query-attention takes no value, found {' '.join(gqa[1])!r}")
        if groups is None:  # Megatron's default: one group
            given.set("num_query_groups", "--group-query-attention", 1, values)
        else:
            given.set("num_query_groups", groups[0], given.parse("num_query_groups", *groups), values)


@dataclass(frozen=True)
class FfnWidth(Value):
    """--ffn-hidden-size; left out, Megatron's width: 4 x hidden, with SwiGLU 2/3 of it rounded down to 64."""

    late = True

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        if given.take(*self.flags) is not None:
            return super().from_megatron(given, values)
        hidden = values.get("hidden_size", mtk_default("hidden_size"))
        megatron = int(4 * hidden * 2 / 3 / 64) * 64 if values.get("swiglu") else 4 * hidden
        model = {k: v for k, v in values.items() if cfg.section_of(k) == "model"}
        try:
            derived = cfg.ModelConfig(**model).ffn_hidden_size
        except (cfg.ConfigError, TypeError):
            derived = None
        if derived != megatron:
            values[self.key] = megatron
            given.defaults.append(
                f"ffn_hidden_size = {megatron} (Megatron's width without --ffn-hidden-size)"
            )


@dataclass(frozen=True)
class BatchSchedule:
    """--global-batch-size and --step-batch-size-schedule "0:16 2.4B:320 ..." (thresholds in tokens)
    <-> global_batch_size and batch_size_ramp; Megatron refuses both at once, so a ramp ends at the
    global batch size."""

    keys = ("global_batch_size", "batch_size_ramp")
    flags = ("--global-batch-size", "--step-batch-size-schedule")
    late = False

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        train = config.train
        if not train.batch_size_ramp:
            return [["--global-batch-size", str(train.global_batch_size)]]
        last = int(train.batch_size_ramp[-1][1])
        if last != train.global_batch_size:
            notes.append(f"global_batch_size = {train.global_batch_size} with a ramp that ends at {last}: "
                         "Megatron's batch after --step-batch-size-schedule is its last")  # fmt: skip
        return [["--step-batch-size-schedule", schedule_text(train.batch_size_ramp)]]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        schedule = given.take("--step-batch-size-schedule")
        batch = given.take("--global-batch-size")
        if schedule is not None:
            try:
                ramp = cfg.parse_step_batch_size_schedule(" ".join(schedule[1]))
            except cfg.ConfigError as err:
                given.problems.append(f"{given.text(schedule[0])}: {err}")
            else:
                given.set("batch_size_ramp", schedule[0], ramp, values)
                if batch is None:
                    given.set("global_batch_size", schedule[0], int(ramp[-1][1]), values)
        if batch is not None:
            given.set("global_batch_size", batch[0], given.parse("global_batch_size", *batch), values)


@dataclass(frozen=True)
class Sharding:
    """Megatron-FSDP: --use-megatron-fsdp (or --use-torch-fsdp2) --data-parallel-sharding-strategy S
    <-> data_parallel_sharding_strategy. Without FSDP Megatron ignores the strategy and runs DDP
    (no_shard); its distributed optimizer is --use-distributed-optimizer, an entry of its own."""

    keys = ("data_parallel_sharding_strategy",)
    flags = ("--data-parallel-sharding-strategy", "--use-megatron-fsdp", "--use-torch-fsdp2")
    late = False

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        strategy = config.parallel.data_parallel_sharding_strategy
        if strategy is None:
            return []
        fsdp = [] if strategy == "no_shard" else [["--use-megatron-fsdp"]]
        return [*fsdp, ["--data-parallel-sharding-strategy", strategy]]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        strategy = given.take("--data-parallel-sharding-strategy")
        fsdp = given.take("--use-megatron-fsdp", "--use-torch-fsdp2")
        key = "data_parallel_sharding_strategy"
        if strategy is None:
            if fsdp is not None:  # Megatron-FSDP's default, and what torch FSDP2 does: ZeRO-3
                given.set(key, fsdp[0], "optim_grads_params", values)
            return
        value = given.parse(key, *strategy)
        if fsdp is None and value not in (None, "no_shard"):
            given.notes.append(f"{given.text(strategy[0])}: ignored, as Megatron reads it only with "
                               "--use-megatron-fsdp")  # fmt: skip
        else:
            given.set(key, strategy[0], value, values)


@dataclass(frozen=True)
class Recompute:
    """--recompute-granularity (full: with --recompute-method uniform --recompute-num-layers 1, every
    layer, as mtk recomputes) and the older --recompute-activations (selective)."""

    keys = ("recompute_granularity",)
    flags = (
        "--recompute-granularity",
        "--recompute-activations",
        "--recompute-method",
        "--recompute-num-layers",
    )
    late = False

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        granularity = config.parallel.recompute_granularity
        if granularity is None:
            return []
        every_layer = [["--recompute-method", "uniform"], ["--recompute-num-layers", "1"]]
        return [["--recompute-granularity", granularity], *(every_layer if granularity == "full" else [])]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        key = "recompute_granularity"
        granularity = given.take("--recompute-granularity")
        if given.take("--recompute-activations") is not None:
            given.set(key, "--recompute-activations", "selective", values)
        if granularity is not None:
            given.set(key, granularity[0], given.parse(key, *granularity), values)
        method, layers = given.take("--recompute-method"), given.take("--recompute-num-layers")
        if method is None and layers is None:
            return
        shown = " ".join(given.text(taken[0]) for taken in (method, layers) if taken is not None)
        every_layer = (method is None or method[1] == ["uniform"]) and (layers is None or layers[1] == ["1"])
        if values.get(key) != "full":
            given.notes.append(
                f"{shown}: ignored, as Megatron reads them only with --recompute-granularity full"
            )
        elif not every_layer:
            given.unknown.append(f"{shown} (mtk's full recompute covers every layer)")


@dataclass(frozen=True)
class VirtualPipeline:
    """--num-virtual-stages-per-pipeline-rank (formerly --virtual-pipeline-model-parallel-size), or
    --num-layers-per-virtual-pipeline-stage N <-> virtual_pipeline_model_parallel_size."""

    keys = ("virtual_pipeline_model_parallel_size",)
    flags = (
        "--num-virtual-stages-per-pipeline-rank",
        "--virtual-pipeline-model-parallel-size",
        "--num-layers-per-virtual-pipeline-stage",
    )
    late = True  # the layers per stage need num_layers and the pipeline size

    def to_megatron(self, config: cfg.RunConfig, notes: list[str]) -> list[list[str]]:
        stages = config.parallel.virtual_pipeline_model_parallel_size
        return [] if stages is None else [["--num-virtual-stages-per-pipeline-rank", str(stages)]]

    def from_megatron(self, given: Given, values: dict[str, Any]) -> None:
        key = self.keys[0]
        stages = given.take(*self.flags[:2])
        layers = given.take(self.flags[2])
        if stages is not None:
            given.set(key, stages[0], given.parse(key, *stages), values)
            return
        if layers is None:
            return
        per_stage = given.parse("num_layers", *layers)
        if per_stage is None:
            return
        counted = (
            values.get("num_layers", mtk_default("num_layers"))
            + bool(values.get("account_for_embedding_in_pipeline_split"))
            + bool(values.get("account_for_loss_in_pipeline_split"))
        )
        pipeline = values.get("pipeline_model_parallel_size", 1)
        if per_stage < 1 or counted % (pipeline * per_stage):
            given.problems.append(f"{given.text(layers[0])}: {counted} layers over {pipeline} pipeline stages "
                                  "do not split into virtual stages of that many")  # fmt: skip
        elif counted // (pipeline * per_stage) > 1:
            given.set(key, layers[0], counted // (pipeline * per_stage), values)


def _same_name_entries() -> list[Entry]:
    """The entries of SAME_NAME: a config key and Megatron's flag of the same name."""
    entries: list[Entry] = []
    for key, default in SAME_NAME.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            entries.append(Switch(key, flag, const=not default, megatron_default=default))
        else:
            entries.append(Value(key, flag, default, **SAME_NAME_OPTIONS.get(key, {})))
    return entries


# the exceptions: renamed, negated, converted, and several flags for one key
EXCEPTIONS: list[Entry] = [
    Family(),
    FfnWidth("ffn_hidden_size", "--ffn-hidden-size"),
    QueryGroups(),
    Switch("add_bias_linear", "--disable-bias-linear", const=False, megatron_default=True),
    Switch("bert_binary_head", "--bert-no-binary-head", const=False, megatron_default=True),
    Value("retro_encoder_num_layers", "--retro-encoder-layers", 2),
    BatchSchedule(),
    Switch("precision", "--bf16", const="bf16", megatron_default="fp32"),
    Switch("precision", "--fp16", const="fp16", megatron_default="fp32"),
    Value("fp8", "--fp8-format", None),
    VirtualPipeline(),
    Sharding(),
    Recompute(),
]


def _field_order() -> dict[str, int]:
    names = [item.name for section in cfg.SECTIONS.values() for item in dataclasses.fields(section)]
    return {name: index for index, name in enumerate(names)}


def _table() -> list[Entry]:
    order = _field_order()
    entries = _same_name_entries() + EXCEPTIONS
    return sorted(entries, key=lambda entry: min(order.get(key, len(order)) for key in entry.keys))


TABLE: list[Entry] = _table()  # in config order: the export reads as model, data, train, parallel


def available(entry: Entry) -> bool:
    """Whether mtk's config has every key of ``entry`` (the table names agreed keys before they exist)."""
    return all(has_key(key) for key in entry.keys)


def unmapped_keys() -> list[str]:
    """Config keys neither in the table, nor mtk-only, nor run inputs: each needs a decision here."""
    mapped = {key for entry in TABLE for key in entry.keys} | set(MTK_ONLY) | RUN_INPUTS
    return [key for key in _field_order() if key not in mapped]


# ---- mtk -> Megatron --------------------------------------------------------------------------------


@dataclass
class MegatronCommand:
    script: str  # pretrain_gpt.py ...
    arguments: list[list[str]]  # [flag, *words] each
    not_expressible: list[str]  # "key = value: why", what Megatron cannot be told


def megatron_command(config: cfg.RunConfig) -> MegatronCommand:
    """The pretrain_*.py script and arguments that train ``config``'s model on ``config``'s schedule."""
    family = _family(config.model.family)
    script = _script(family)
    family.complete(config.model)
    notes: list[str] = []
    arguments = [
        argument for entry in TABLE if available(entry) for argument in entry.to_megatron(config, notes)
    ]
    for key, (behaves_as, why) in MTK_ONLY.items():
        if not has_key(key):
            continue
        value = _get(config, key)
        if (value not in behaves_as) if behaves_as is not None else value != mtk_default(key):
            notes.append(f"{key} = {value!r}: {why}")
    return MegatronCommand(script, arguments, notes)


def render_command(
    command: MegatronCommand, name: str, config: cfg.RunConfig, description: str = "", tokenizer: str = ""
) -> str:
    """``command`` as a bash snippet: comments saying what to add, then the launch, one argument a line."""
    parallel = config.parallel
    gpus = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    lines = [
        f"mtk preset {name} as Megatron-LM arguments" + (f": {description}" if description else ""),
        f"Run from a Megatron-LM checkout, with the machine's own flags added: torchrun's (a model replica "
        f"takes TP x PP x CP = {gpus} GPU{'s' if gpus > 1 else ''}), --save and --load DIR, "
        f"{_family(config.model.family).megatron_inputs}"
        + (f"; this preset's tokenizer: {tokenizer}" if tokenizer else "")
        + ".",
    ]
    if command.not_expressible:
        lines.append("Megatron-LM cannot express: " + "; ".join(command.not_expressible) + ".")
    comments = [f"# {part}" for line in lines for part in textwrap.wrap(line, 98, break_on_hyphens=False)]
    launch = f"torchrun --nproc-per-node ${{GPUS_PER_NODE:-8}} --nnodes ${{NUM_NODES:-1}} {command.script}"
    body = [f"    {shlex.join(argument)}" for argument in command.arguments]
    return "\n".join([*comments, " \\\n".join([launch, *body])]) + "\n"


# ---- Megatron -> mtk --------------------------------------------------------------------------------


@dataclass
class Imported:
    """A Megatron launch command read as an mtk preset, and everything it did not become."""

    script: str
    family: str
    values: dict[str, Any]  # config key -> value: the script's, and Megatron's defaults where mtk's differ
    config: cfg.RunConfig
    unknown: list[
        str
    ]  # "--flag words" (and why, where there is more to say): arguments mtk has no setting for
    skipped: dict[str, list[str]]  # why -> flags: the machine's settings, not the model's
    defaults: list[str]  # Megatron's defaults written down where mtk's differ
    notes: list[str]  # what was read differently from its text (an ignored flag, a condition)
    read: list[str]  # the flags that became settings (or, at the value mtk always uses, none needed)

    def sections(self) -> dict[str, dict[str, Any]]:
        return _sections(self.values)


def _sections(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config key -> value, as the sections of a preset, each in config order."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in cfg.SECTIONS}
    order = _field_order()
    for key in sorted(values, key=order.__getitem__):
        sections[cfg.section_of(key)][key] = values[key]
    return sections


def _machine_reason(flag: str) -> str | None:
    for reason, patterns in MACHINE.items():
        if any(fnmatch.fnmatchcase(flag, pattern) for pattern in patterns):
            return reason
    return None


def read_arguments(script: str, arguments: list[str], where: str = "arguments") -> Imported:
    """The preset that Megatron's ``script`` (pretrain_gpt.py ...) with ``arguments`` trains."""
    base = script.rsplit("/", 1)[-1]
    families = _families()
    family = next((spec.name for spec in families if spec.megatron_script == base), None)
    if family is None:
        scripts = dict.fromkeys(spec.megatron_script for spec in families if spec.megatron_script)
        raise MegatronError(
            f"{where}: runs {base}; mtk trains what {', '.join(scripts)} train "
            f"(families {', '.join(spec.name for spec in families if spec.megatron_script)})"
        )
    given = Given(arguments, family)
    values: dict[str, Any] = {}
    table = [entry for entry in TABLE if available(entry)]
    for entry in [e for e in table if not e.late] + [e for e in table if e.late]:
        entry.from_megatron(given, values)
    skipped: dict[str, list[str]] = {}
    for flag in sorted(given.words, key=given.position.__getitem__):
        if flag in given.used:
            continue
        missing = next((entry for entry in TABLE if flag in entry.flags and not available(entry)), None)
        if missing is not None:
            keys = ", ".join(key for key in missing.keys if not has_key(key))
            given.unknown.append(f"{given.text(flag)} (mtk has no {keys} setting yet)")
        elif flag in IMPLIED:
            expected, accepts, why = IMPLIED[flag]
            if not _accepts(accepts, given.words[flag]):
                given.unknown.append(f"{given.text(flag)} ({why}: {flag} {expected})")
        elif (reason := _machine_reason(flag)) is not None:
            skipped.setdefault(reason, []).append(flag)
        else:
            given.unknown.append(given.text(flag))
    trained = _family(values["family"])
    if trained.megatron_project and trained.megatron_project[0] in given.words:
        project, project_keys = trained.megatron_project
        fixed = [key for key in project_keys if key in given.explicit]
        given.notes.append(
            f"{trained.megatron_script} takes "
            + ", ".join(project_keys)
            + f" from {project}"
            + (f", over the script's {', '.join(fixed)}" if fixed else "")
            + f"; so does `mtk train {trained.train_inputs.split()[0]}`"
        )
    if given.stray:
        given.problems.append(f"words before the first flag: {' '.join(given.stray)}")
    if given.problems:
        raise MegatronError(f"{where}: " + "; ".join(given.problems))
    try:
        config = cfg.RunConfig.from_dict(_sections(values), where=where)
    except cfg.ConfigError as err:
        raise MegatronError(str(err)) from None
    trained.complete(config.model)
    unknown_flags = {item.split()[0] for item in given.unknown}
    read = [
        flag
        for flag in given.words
        if flag not in unknown_flags and not any(flag in f for f in skipped.values())
    ]
    return Imported(
        base, values["family"], values, config, given.unknown, skipped, given.defaults, given.notes, read
    )


def _accepts(accepts: Any, words: list[str]) -> bool:
    try:
        return bool(words) and accepts(words)
    except ValueError:
        return False


def import_script(text: str, where: str = "script") -> Imported:
    """The preset a Megatron-LM launch script trains: its pretrain_*.py command found and read."""
    found = find_command(text, is_script_word(PROGRAM), where=where)
    imported = read_arguments(found.program, found.arguments, where=f"{where}, line {found.line}")
    imported.notes = [*found.notes, *imported.notes]
    return imported


def imported_toml(imported: Imported, source: str) -> str:
    """The preset file of ``imported``: its settings, and in comments what did not become one."""
    comments = [f"Imported by `mtk presets import-megatron` from {source} (Megatron-LM {imported.script})."]

    def listing(title: str, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            comments.extend(
                textwrap.wrap(
                    f"{title}: {', '.join(items)}", 98, subsequent_indent="  ", break_on_hyphens=False
                )
            )

    listing("Not imported, mtk has no such setting", imported.unknown)
    for reason, flags in imported.skipped.items():
        listing(f"Skipped, {reason}", flags)
    listing("Megatron's defaults, where mtk's differ", imported.defaults)
    listing("Notes", imported.notes)
    description = f"Imported from {source} (Megatron-LM {imported.script})"
    return preset_toml(description, imported.sections(), comments)
