"""The bridge to Megatron-LM scripts: one table both ways, a bash reader, and every preset's round trip.

Megatron's behaviour the tests hold the code to (its defaults, which flag is negated, how a schedule
reads) is written here from Megatron-LM's megatron/training/arguments.py, not read from mtk's table.
"""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from mtk import config as cfg
from mtk import megatron
from mtk.megatron import MegatronError, import_script, megatron_command, read_arguments, render_command
from mtk.presets import load_preset, preset_names, preset_toml
from mtk.shell_script import ScriptError, find_command, is_script_word

PRETRAIN = is_script_word(r"pretrain_\w+\.py")
# the least a Megatron GPT command gives (Megatron requires these)
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3"]  # fmt: skip


def run(script: str) -> megatron.Imported:
    return import_script(textwrap.dedent(script))


def gpt(*arguments: str) -> megatron.Imported:
    return read_arguments("pretrain_gpt.py", [*SHAPE, *arguments])


# ---- the bash reader --------------------------------------------------------------------------------


def test_arrays_variables_defaults_and_continuations():
    found = find_command(
        textwrap.dedent("""\
        #!/bin/bash
        LAYERS=4   # a comment
        WIDTH=${WIDTH:-256}
        HEADS=${HEADS:="8"}
        NAME="my run"
        MODEL=(
            --num-layers $LAYERS   # inline comment inside the array
            --hidden-size ${WIDTH}
            "--num-attention-heads $HEADS"
        )
        MODEL+=(--name "$NAME")
        EXTRA="--seed 7 \\
            --lr 0.1"
        EXTRA+=" --bf16"
        WORLD=$((2 * 4))
        torchrun --nproc-per-node $WORLD pretrain_gpt.py \\
            ${MODEL[@]} \\
            "${MODEL[@]}" \\
            $EXTRA 2>&1 | tee log.txt
        """),
        PRETRAIN,
    )
    assert found.program == "pretrain_gpt.py" and found.prefix == ["torchrun", "--nproc-per-node", "8"]
    unquoted = [
        "--num-layers",
        "4",
        "--hidden-size",
        "256",
        "--num-attention-heads",
        "8",
        "--name",
        "my",
        "run",
    ]
    quoted = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads 8", "--name", "my run"]
    assert found.arguments == [*unquoted, *quoted, "--seed", "7", "--lr", "0.1", "--bf16"]
    assert found.unresolved == [] and found.line == 16


def test_conditions_loops_and_what_cannot_be_known():
    found = find_command(
        textwrap.dedent("""\
        DTYPE="fp8"
        CKPT=$1
        if [[ "$DTYPE" == "fp8" && -n "$DTYPE" ]]; then
            ARGS=(--fp8-format hybrid)
        elif [ "$DTYPE" = "bf16" ]; then
            ARGS=(--bf16)
        else
            ARGS=()
        fi
        if [ ! -f "$SCRIPT" ]; then
            exit 1
        fi
        if [ 3 -gt 2 ] || false; then ARGS+=(--three); fi
        for SEED in 11 12; do
            ARGS+=(--seed $SEED)
        done
        cat > /dev/null <<EOF
        python pretrain_bert.py --not-this-one
        EOF
        bash -c "python pretrain_t5.py ${ARGS[*]} --save $CKPT --stamp $(date)"
        """),
        PRETRAIN,
    )
    assert found.program == "pretrain_t5.py"
    assert found.arguments == ["--fp8-format", "hybrid", "--three", "--seed", "11", "--save", "${1}", "--stamp",
                               "$(date)"]  # fmt: skip
    assert found.unresolved == ["1", "SCRIPT", "$(date)"]
    assert any("could not evaluate" in note and "-f" in note for note in found.notes)
    assert any("followed once" in note for note in found.notes)


def test_a_script_without_the_command_or_with_a_broken_quote_is_refused():
    with pytest.raises(ScriptError, match="no command runs a pretrain_"):
        find_command("torchrun train.py --lr 1\n", PRETRAIN)
    with pytest.raises(ScriptError, match="line 2: a double quote is never closed"):
        find_command('A=1\nB="--lr 1\n', PRETRAIN)


# ---- reading Megatron's arguments --------------------------------------------------------------------


def test_switches_negations_and_conversions():
    imported = gpt(
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--rotary-base", "500000", "--bf16", "--fp8-format", "hybrid",
        "--use-distributed-optimizer", "--split", "'99,1,0'", "--group-query-attention", "--num-query-groups", "2",
        "--lr=2e-4", "--weight-decay", "1e-2", "--weight-decay", "0.1",
    )  # fmt: skip
    model, train = imported.config.model, imported.config.train
    assert (model.add_bias_linear, model.untie_embeddings_and_output_weights, model.swiglu) == (
        False,
        True,
        True,
    )
    assert (model.normalization, model.position_embedding_type, model.rotary_base) == (
        "RMSNorm",
        "rope",
        500000,
    )
    assert model.num_query_groups == 2
    assert (train.precision, train.fp8, train.lr, train.weight_decay) == ("bf16", "hybrid", 2e-4, 0.1)
    assert imported.config.parallel.use_distributed_optimizer is True
    assert imported.config.data.split == "99,1,0"
    # Megatron's SwiGLU width without --ffn-hidden-size: 2/3 of 4h, rounded down to a multiple of 64
    assert model.ffn_hidden_size == int(4 * 64 * 2 / 3 / 64) * 64 == 128
    assert (
        read_arguments("pretrain_bert.py", [*SHAPE, "--bert-no-binary-head"]).config.model.bert_binary_head
        is False
    )


def test_query_groups_need_group_query_attention_as_in_megatron():
    assert gpt("--group-query-attention").config.model.num_query_groups == 1  # Megatron's default
    ignored = gpt("--num-query-groups", "2")
    assert ignored.config.model.num_query_groups == 4 and "ignored" in ignored.notes[0]


def test_batch_schedules():
    ramp = gpt("--step-batch-size-schedule", "0:16 2.4B:320 12B:1536")
    assert ramp.config.train.batch_size_ramp == [[0, 16], [2_400_000_000, 320], [12_000_000_000, 1536]]
    assert ramp.config.train.global_batch_size == 8  # the script's, given too
    alone = read_arguments(
        "pretrain_gpt.py", [*SHAPE[:-4], "--lr", "1", "--step-batch-size-schedule", "0:4 1M:16"]
    )
    assert alone.config.train.global_batch_size == 16  # the schedule's last batch
    assert (
        megatron.schedule_text([[0, 16], [2.4e9, 320], [12e9, 1536], [1234, 2]])
        == "0:16 2.4B:320 12B:1536 1234:2"
    )
    if megatron.has_key("rampup_batch_size"):
        assert gpt("--rampup-batch-size", "2", "2", "1000").config.train.rampup_batch_size == [2, 2, 1000]


def test_family_and_t5_names():
    t5 = read_arguments(
        "pretrain_t5.py",
        ["--encoder-num-layers", "3", "--decoder-num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--encoder-seq-length", "96", "--decoder-seq-length", "32", "--max-position-embeddings", "128"],
    )  # fmt: skip
    model = t5.config.model
    assert (model.family, model.num_layers, model.decoder_num_layers, model.seq_length) == ("t5", 3, 2, 96)
    assert read_arguments("pretrain_retro.py", [*SHAPE, "--retro-add-retriever"]).family == "retro"
    plain = read_arguments("pretrain_retro.py", SHAPE)
    assert plain.family == "gpt" and "trains a GPT" in plain.notes[0]
    with pytest.raises(MegatronError, match="pretrain_mamba.py"):
        read_arguments("pretrain_mamba.py", SHAPE)


def test_layouts():
    per_stage = (
        "--num-layers",
        "8",
        "--pipeline-model-parallel-size",
        "2",
        "--num-layers-per-virtual-pipeline-stage",
    )
    assert (
        gpt(*per_stage, "2").config.parallel.virtual_pipeline_model_parallel_size == 2
    )  # 8 / 2 ranks / 2 layers
    with pytest.raises(MegatronError, match="do not split into virtual stages"):
        gpt(*per_stage, "3")
    older = gpt("--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2")
    assert older.config.parallel.virtual_pipeline_model_parallel_size == 2
    assert gpt("--use-megatron-fsdp").config.parallel.data_parallel_sharding_strategy == "optim_grads_params"
    assert gpt("--recompute-activations").config.parallel.recompute_granularity == "selective"
    full = gpt(
        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"
    )
    assert full.config.parallel.recompute_granularity == "full"
    assert full.unknown == [
        "--recompute-method block --recompute-num-layers 2 (mtk's full recompute covers every layer)"
    ]


def test_unknown_arguments_are_listed_and_machine_ones_skipped():
    imported = gpt(
        "--decoupled-lr", "5e-4", "--calculate-per-token-loss", "--rotary-percent", "0.5", "--optimizer", "adam",
        "--data-path", "${1}", "--vocab-file", "v.json", "--save", "/ckpt", "--tensorboard-dir", "tb",
        "--distributed-backend", "nccl", "--log-throughput", "--wandb-project", "p", "--sequence-parallel",
        "--overlap-grad-reduce", "--log-interval", "5",
    )  # fmt: skip
    assert imported.unknown[:2] == ["--decoupled-lr 5e-4", "--calculate-per-token-loss"]
    assert imported.unknown[2].startswith("--rotary-percent 0.5 (mtk rotates the whole head")
    skipped = {flag for flags in imported.skipped.values() for flag in flags}
    assert skipped == {"--data-path", "--vocab-file", "--save", "--tensorboard-dir", "--distributed-backend",
                       "--log-throughput", "--wandb-project", "--sequence-parallel", "--overlap-grad-reduce"}  # fmt: skip
    assert imported.config.train.log_interval == 5  # a mapped key, though it starts like a logging flag
    assert "--optimizer" in imported.read and "--log-interval" in imported.read


def test_a_value_mtk_lacks_is_listed_and_a_broken_one_refused():
    imported = gpt("--position-embedding-type", "yarn")
    assert imported.unknown[0].startswith(
        "--position-embedding-type yarn (position_embedding_type: mtk takes"
    )
    assert imported.config.model.position_embedding_type == megatron.mtk_default("position_embedding_type")
    with pytest.raises(
        MegatronError, match=r"--num-layers \$\{LAYERS\}: the script leaves \$\{LAYERS\} undefined"
    ):
        run("python pretrain_gpt.py --num-layers $LAYERS --hidden-size 64")
    with pytest.raises(MegatronError, match="'four' is not a whole number"):
        gpt("--num-layers", "four")
    with pytest.raises(MegatronError, match="--bf16 and --fp16 both set precision"):
        gpt("--bf16", "--fp16")
    with pytest.raises(MegatronError, match="--swiglu takes no value"):
        gpt("--swiglu", "yes")


def test_a_flag_left_out_means_megatrons_default():
    """Megatron's defaults (arguments.py), whatever mtk's own defaults are today."""
    megatrons = {"lr_decay_style": "linear", "eval_iters": 100, "eval_interval": 0, "split": "969,30,1",
                 "weight_decay": 0.01, "adam_beta2": 0.999, "hidden_dropout": 0.1, "init_method_std": 0.02,
                 "normalization": "LayerNorm", "rotary_base": 10000, "add_bias_linear": True, "precision": "fp32",
                 "fp8_amax_compute_algo": "most_recent", "log_interval": 100, "seed": 1234}  # fmt: skip
    imported = gpt()
    for key, value in megatrons.items():
        assert getattr(getattr(imported.config, cfg.section_of(key)), key) == value, key
    assert all(item.split()[0] in megatrons or item.startswith("ffn") for item in imported.defaults)


# ---- the table ---------------------------------------------------------------------------------------


def test_every_config_key_is_mapped_or_named_as_megatron_lacking():
    """A new config key needs a decision in mtk/megatron.py: its Megatron flag, or why there is none."""
    assert megatron.unmapped_keys() == []


def test_one_entry_per_flag_and_same_names_derived_from_the_keys():
    flags = [flag for entry in megatron.TABLE for flag in entry.flags]
    assert len(flags) == len(set(flags))
    for entry in megatron.TABLE:
        if entry.keys[0] in megatron.SAME_NAME:
            assert entry.flags[0] == "--" + entry.keys[0].replace("_", "-")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_megatron_arguments(name):
    """show --megatron, then import: the same config, but for what the export says Megatron cannot express."""
    preset = load_preset(name)
    command = megatron_command(preset.config)
    text = render_command(command, name, preset.config, preset.description, preset.tokenizer)
    imported = import_script(text, where=name)
    before, after = preset.config.to_dict(), imported.config.to_dict()
    differ = {
        key for section in before for key in before[section] if before[section][key] != after[section][key]
    }
    assert differ == {note.split(" = ")[0] for note in command.not_expressible}, text
    assert imported.unknown == [] and imported.skipped == {}
    assert text.splitlines()[-1].startswith("    --") and not text.splitlines()[-1].endswith("\\")


VARIANTS = [
    {"data_parallel_sharding_strategy": "no_shard"},
    {"data_parallel_sharding_strategy": "optim_grads"},
    {"data_parallel_sharding_strategy": "optim_grads_params", "recompute_granularity": "full"},
    {"recompute_granularity": "selective", "grad_reduce_in_bf16": True, "openai_gelu": True},
    {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2, "num_layers": 8},
    {"rampup_batch_size": [2, 2, 1000], "precision": "fp16", "initial_loss_scale": 65536.0, "hysteresis": 4},
    {"lr_decay_style": "WSD", "lr_wsd_decay_style": "cosine", "lr_wsd_decay_iters": 100, "train_iters": 1000},
    {
        "use_rope_scaling": True,
        "rope_scaling_factor": 32.0,
        "position_embedding_type": "rope",
        "apply_layernorm_1p": True,
    },
    {
        "first_last_layers_bf16": True,
        "fp8": "e4m3",
        "fp8_recipe": "tensorwise",
        "fp8_margin": 1,
        "precision": "bf16",
    },
    {
        "batch_size_ramp": [[0, 2], [1e6, 8]],
        "global_batch_size": 8,
        "eval_interval": 0,
        "lr_warmup_samples": 0,
    },
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda overrides: ",".join(overrides))
def test_settings_beyond_the_presets_round_trip(overrides):
    overrides = {key: value for key, value in overrides.items() if megatron.has_key(key)}
    config = cfg.apply_overrides(load_preset("gpt-tiny").sections, overrides)
    imported = import_script(render_command(megatron_command(config), "variant", config))
    assert imported.config == config and imported.unknown == []


def test_what_megatron_cannot_express_is_named():
    config = load_preset("bert-tiny").config
    config.model.post_norm = True
    config.train.fp8_recipe = "rowwise"
    notes = megatron_command(config).not_expressible
    assert any(note.startswith("post_norm = True") for note in notes)
    assert any(note.startswith("fp8_recipe = 'rowwise'") for note in notes)
    assert "--fp8-recipe" not in [argument[0] for argument in megatron_command(config).arguments]


# ---- preset files ------------------------------------------------------------------------------------


def test_a_preset_file_is_loaded_by_its_path(tmp_path):
    sections = {"model": {"family": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                          "normalization": "RMSNorm", "swiglu": True, "init_method_std": 6e-05},
                "train": {"batch_size_ramp": [[0, 4], [2_400_000_000, 8]], "lr": 0.00015}}  # fmt: skip
    path = tmp_path / "mine.toml"
    path.write_text(preset_toml('A "quoted" description', sections, ["a comment"]))
    preset = load_preset(str(path))
    assert (preset.name, preset.description, preset.sections["model"]) == ("mine", 'A "quoted" description',
                                                                           sections["model"])  # fmt: skip
    assert preset.config.train.lr == 0.00015 and preset.config.train.batch_size_ramp[1] == [2.4e9, 8]
    with pytest.raises(cfg.ConfigError, match="missing.toml: cannot be read"):
        load_preset(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(cfg.ConfigError, match="bad.toml: not valid TOML"):
        load_preset(str(tmp_path / "bad.toml"))


def test_imported_preset_file_names_what_it_left_out(tmp_path):
    imported = gpt("--decoupled-lr", "5e-4", "--save", "/ckpt")
    text = megatron.imported_toml(imported, "train.sh")
    assert "# Not imported, mtk has no such setting: --decoupled-lr 5e-4" in text
    assert "--save" in next(line for line in text.splitlines() if line.startswith("# Skipped"))
    (tmp_path / "x.toml").write_text(text)
    assert load_preset(str(tmp_path / "x.toml")).config == imported.config
    assert [f.name for f in dataclasses.fields(imported.config)] == list(cfg.SECTIONS)
