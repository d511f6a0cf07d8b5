"""Megatron-LM's seed recipes, imported from launch scripts, are mtk's shipped presets; the CLI both ways.

The scripts below are written for these tests in the shell style of Megatron-LM's examples (arrays,
strings continued with `\\`, defaults, conditionals), with each recipe's published settings:
examples/gpt3/train_gpt3_175b_distributed.sh, examples/bert/train_bert_340m_distributed.sh,
examples/t5/train_t5_220m_distributed.sh, examples/llama/train_llama3_8b_h100_fp8.sh and
examples/retro/train_retro_2b_distributed.sh (removed from Megatron-LM in 2026). What an imported
script may differ in from the preset is listed, with the reason, in DIFFERENCES.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from mtk.megatron import IMPLIED, PROGRAM, TABLE, import_script
from mtk.presets import load_preset
from mtk.shell_script import find_command, is_script_word
from tests.conftest import invoke

GPT3_175B = r"""
#!/bin/bash
# GPT-3 175B with Megatron-LM's recipe: 128 GPUs or more
export CUDA_DEVICE_MAX_CONNECTIONS=1
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-16}
CHECKPOINTS=$1; TB_DIR=$2; VOCAB=$3; MERGES=$4; DATA=$5

LAUNCH=(--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --master_addr ${MASTER_ADDR:-localhost} --master_port 6000)
MODEL=(
    --num-layers 96
    --hidden-size 12288
    --num-attention-heads 96
    --seq-length 2048
    --max-position-embeddings 2048
    --attention-backend auto   # flash, fused, unfused or local
)
SCHEDULE=(
    --micro-batch-size 1
    --global-batch-size 1536
    --step-batch-size-schedule "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"
    --train-iters 500000
    --lr 6.0e-5 --min-lr 6.0e-6 --lr-decay-style cosine
    --lr-decay-iters 430000
    --lr-warmup-fraction .001
)
OPTIMIZER=(--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.006 --fp16)
LAYOUT=(--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16)
DATA_ARGS=(--data-path "$DATA" --vocab-file "$VOCAB" --merge-file "$MERGES" --split 949,50,1)
OUTPUT=(
    --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10
    --save "$CHECKPOINTS" --load "$CHECKPOINTS" --tensorboard-dir "$TB_DIR"
)
torchrun "${LAUNCH[@]}" pretrain_gpt.py "${MODEL[@]}" "${SCHEDULE[@]}" "${OPTIMIZER[@]}" \
    "${LAYOUT[@]}" "${DATA_ARGS[@]}" "${OUTPUT[@]}"
"""

BERT_340M = r"""
#!/bin/bash
# BERT-Large, 340M parameters
CKPT=${1:?give the checkpoint folder}
TENSORBOARD=${2:-tensorboard/bert}
VOCAB_TXT=$3
PREFIX=$4
TORCHRUN="torchrun --nproc_per_node 8 --nnodes 1 --master_addr localhost --master_port 29500"

ARCH=(
    --num-layers 24 --hidden-size 1024 --num-attention-heads 16
    --seq-length 512 --max-position-embeddings 512
    --attention-backend auto
)
OPTIM=(
    --micro-batch-size 4
    --global-batch-size 32
    --train-iters 1000000
    --weight-decay 1e-2
    --clip-grad 1.0
    --fp16
    --lr 0.0001
    --lr-decay-iters 990000
    --lr-decay-style linear
    --min-lr 1.0e-5
    --weight-decay 1e-2     # given twice, as published
    --lr-warmup-fraction .01
    --clip-grad 1.0
)
PARALLEL=(--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16)
INPUTS=(--data-path $PREFIX --vocab-file $VOCAB_TXT --split 949,50,1)
LOGS=(--log-interval 100 --save-interval 10000 --eval-interval 1000 --save $CKPT --load $CKPT --eval-iters 10
      --tensorboard-dir $TENSORBOARD)
$TORCHRUN pretrain_bert.py ${ARCH[@]} ${OPTIM[@]} ${PARALLEL[@]} ${INPUTS[@]} ${LOGS[@]}
"""

T5_220M = r"""
#!/bin/bash
# T5 base (220M): 12 + 12 layers, span corruption
CHECKPOINT_PATH=$1
TENSORBOARD_DIR=$2
VOCAB_FILE=$3   # bert-large-cased-vocab.txt
DATA_PATH=$4

DISTRIBUTED="
    --nproc_per_node 8 \
    --nnodes 1 \
    --node_rank 0
"
MODEL_AND_TRAINING="
    --encoder-num-layers 12 \
    --decoder-num-layers 12 \
    --hidden-size 768 \
    --num-attention-heads 12 \
    --kv-channels 64 \
    --ffn-hidden-size 3072 \
    --encoder-seq-length 512 \
    --decoder-seq-length 128 \
    --max-position-embeddings 512 \
    --micro-batch-size 64 \
    --global-batch-size 512 \
    --lr 0.0001 \
    --train-iters 1000000 \
    --lr-decay-iters 1000000 \
    --lr-decay-style linear \
    --min-lr 0.00001 \
    --weight-decay 1e-2 \
    --lr-warmup-fraction .01 \
    --clip-grad 1.0 \
    --bf16 \
    --vocab-extra-ids 100 \
    --init-method-std 0.015 \
    --transformer-impl transformer_engine \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --attention-backend auto \
"
DATA="--data-path $DATA_PATH --vocab-file $VOCAB_FILE --tokenizer-type BertWordPieceCase --split 99982,9,9"
OUTPUT="--log-interval 100 --tensorboard-dir ${TENSORBOARD_DIR} --save-interval 500 --eval-interval 1000 --eval-iters 10"

torchrun $DISTRIBUTED pretrain_t5.py \
    $MODEL_AND_TRAINING \
    $DATA \
    $OUTPUT \
    --distributed-backend nccl \
    --save $CHECKPOINT_PATH \
    --load $CHECKPOINT_PATH
"""

LLAMA3_8B_FP8 = r"""
#!/bin/bash
# Llama 3 8B in FP8 on one node of H100s; mock data unless a tokenizer and data are given
CHECKPOINT_PATH=${1:-"checkpoints/llama3_8b_fp8"}
TENSORBOARD_LOGS_PATH=${2:-"tensorboard_logs/llama3_8b_fp8"}
TOKENIZER_ARG=${3:-"MOCK"}
DATA_ARG=${4:-"MOCK"}
mkdir -p "$(dirname "$CHECKPOINT_PATH")"

TP_SIZE=1
CP_SIZE=1
DTYPE="fp8"
SEQ_LENGTH=8192
CACHE="${PWD}/benchmark_cache_llama3_8b_fp8"

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 14336
    --num-attention-heads 32
    --group-query-attention
    --num-query-groups 8
    --kv-channels 128
    --seq-length $SEQ_LENGTH
    --max-position-embeddings $SEQ_LENGTH
    --position-embedding-type rope
    --rotary-base 1000000
    --rotary-percent 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --swiglu
    --normalization RMSNorm
    --init-method-std 0.0134
    --attention-backend fused
    --apply-layernorm-1p
    --untie-embeddings-and-output-weights
    --disable-bias-linear
)
TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 128
    --train-samples 1953125000
    --lr-decay-samples 1949218748
    --lr-warmup-samples 3906252
    --lr 0.00015
    --min-lr 0.00001
    --decoupled-lr 5.0e-4
    --decoupled-min-lr 4.5e-5
    --lr-decay-style cosine
    --clip-grad 1.0
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --bf16
    --grad-reduce-in-bf16
    --cross-entropy-loss-fusion
    --calculate-per-token-loss
    --manual-gc
    --empty-unused-memory-level 1
    --exit-duration-in-mins 235
)
DTYPE_ARGS=()
if [[ "$DTYPE" == "fp8" ]]; then
    DTYPE_ARGS+=("--fp8-format hybrid" "--fp8-amax-history-len 1024" "--fp8-amax-compute-algo max" "--fp8-param-gather")
fi
PARALLEL_ARGS=(--tensor-model-parallel-size $TP_SIZE --context-parallel-size $CP_SIZE --sequence-parallel)
TRAINING_ARGS+=(--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather)

DATA_ARGS=()
if [[ "$TOKENIZER_ARG" == "MOCK" ]] || [[ "$DATA_ARG" == "MOCK" ]]; then
    DATA_ARGS+=("--mock-data" "--tokenizer-type NullTokenizer" "--vocab-size 128256" "--data-cache-path ${CACHE}"
                "--tiktoken-pattern v2" "--split '99,1,0'" "--no-create-attention-mask-in-dataloader"
                "--no-mmap-bin-files" "--num-workers 1")
else
    DATA_ARGS+=("--data-path $DATA_ARG" "--tokenizer-type HuggingFaceTokenizer" "--tokenizer-model $TOKENIZER_ARG"
                "--split '99,1,0'" "--vocab-size 128256")
fi
LOGGING_ARGS=(
    --log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput
    --profile --profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist
    --distributed-timeout-minutes 60
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
)
if [ ! -f "pretrain_gpt.py" ]; then
    echo "run me from a Megatron-LM checkout"; exit 1
fi
torchrun --nproc_per_node 8 --nnodes 1 pretrain_gpt.py ${MODEL_ARGS[@]} ${TRAINING_ARGS[@]} ${DTYPE_ARGS[@]} \
    ${PARALLEL_ARGS[@]} ${DATA_ARGS[@]} ${LOGGING_ARGS[@]}
"""

RETRO_2B = r"""
#!/bin/bash
# RETRO 2B: a GPT with chunked cross-attention to neighbours from a preprocessed retrieval project
CHECKPOINT_PATH=$1
TENSORBOARD_LOGS_PATH=$2
RETRO_PROJECT_DIR=${3:-/path/to/retro/project}
ADD_RETRIEVER=1   # 0: plain GPT on the same data

RETRO_MODEL_ARGS=(--num-layers 32 --hidden-size 2048 --num-attention-heads 32)  # seq length from the project
DATA_ARGS=(--split 98,2,0)
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 8 --pipeline-model-parallel-size 1)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 100 --save-interval 10000 --eval-interval 1000
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH --eval-iters 10 --tensorboard-dir $TENSORBOARD_LOGS_PATH
)
TRAINING_ARGS=" \
    --retro-project-dir ${RETRO_PROJECT_DIR} \
    --transformer-impl transformer_engine \
    --num-workers 8 \
    --micro-batch-size 4 \
    --lr-decay-samples 166400000 \
    --lr-warmup-samples 162761 \
    --lr 6.0e-4 \
    --min-lr 6.0e-5 \
    --lr-decay-style cosine \
    --clip-grad 1.0 \
    --weight-decay 0.1 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --init-method-std 0.023 \
    --log-params-norm \
    --log-num-zeros-in-grad \
    --bf16 \
    --no-data-sharding \
"
if [ "$ADD_RETRIEVER" = "1" ]; then
    TRAINING_ARGS+=" --retro-add-retriever"
fi
torchrun --nproc_per_node 8 --nnodes 1 pretrain_retro.py ${RETRO_MODEL_ARGS[@]} ${TRAINING_ARGS} \
    ${MODEL_PARALLEL_ARGS[@]} ${DATA_ARGS[@]} ${EVAL_AND_LOGGING_ARGS[@]}
"""

VOCABULARY = "Megatron reads the vocabulary from the tokenizer files, which a script names but does not hold"
RETRO_PROJECT = (
    "pretrain_retro.py takes it from --retro-project-dir; the preset pins the preprocessing's value"
)
# config key -> why the imported script may differ from the preset there (docs/megatron.md)
DIFFERENCES = {
    "gpt3-175b": {"vocab_size": VOCABULARY},
    "bert-340m": {
        "vocab_size": VOCABULARY,
        "tensor_model_parallel_size": "the published script's TP 8 x PP 16 is the GPT-3 script's: 24 layers do not "
        "split into 16 stages; the recipe's table says TP 1, PP 1",
        "pipeline_model_parallel_size": "as tensor_model_parallel_size",
    },
    "t5-220m": {"vocab_size": VOCABULARY + " (bert-large-cased's 28996 + 100 --vocab-extra-ids)"},
    "llama3-8b": {
        "context_parallel_size": "the script sets CP_SIZE=1; the published throughput row (8 GPUs, CP 2) is the "
        "preset's layout",
        "train_samples": "the script is a throughput run of 1.95B samples; the preset leaves the run length to "
        "--train-iters/--train-samples",
        "lr_decay_samples": "as train_samples",
        "lr_warmup_samples": "as train_samples",
        "split": "the script's mock-data split 99,1,0; the preset keeps the split default for real data",
        "log_interval": "the benchmark logs every step; the preset keeps mtk's default",
        "save_interval": "as log_interval",
        "eval_interval": "as log_interval",
        "eval_iters": "as log_interval",
        "grad_reduce_in_bf16": "the script reduces gradients in bf16 for speed; the preset keeps fp32 reduction",
    },
    "retro-2b": {
        "seq_length": RETRO_PROJECT,
        "max_position_embeddings": RETRO_PROJECT,
        "global_batch_size": RETRO_PROJECT,
        "train_samples": RETRO_PROJECT,
        "eval_interval": RETRO_PROJECT + " (the script's 1000 is overridden)",
        "eval_iters": RETRO_PROJECT + " (the script's 10 is overridden)",
        "vocab_size": VOCABULARY,
    },
}
SCRIPTS = {"gpt3-175b": GPT3_175B, "bert-340m": BERT_340M, "t5-220m": T5_220M, "llama3-8b": LLAMA3_8B_FP8,
           "retro-2b": RETRO_2B}  # fmt: skip


def _flat(config) -> dict:
    return {key: value for section in config.to_dict().values() for key, value in section.items()}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_importing_the_recipes_script_gives_the_preset(name):
    imported = import_script(textwrap.dedent(SCRIPTS[name]).lstrip(), where=name)
    preset, script = _flat(load_preset(name).config), _flat(imported.config)
    differ = {key: (preset[key], script[key]) for key in preset if preset[key] != script[key]}
    undocumented = {key: values for key, values in differ.items() if key not in DIFFERENCES[name]}
    assert undocumented == {}, f"{name}: (preset, script) differ in {undocumented}"
    # nothing silently dropped: every flag was read by the table (or is at the value mtk always uses),
    # or is listed as unknown or skipped
    found = find_command(SCRIPTS[name], is_script_word(PROGRAM))
    given = {word.split()[0] for word in found.arguments if word.startswith("--")}
    listed = {item.split()[0] for item in imported.unknown}
    skipped = {flag for group in imported.skipped.values() for flag in group}
    assert given == set(imported.read) | listed | skipped
    assert all(any(flag in entry.flags for entry in TABLE) or flag in IMPLIED for flag in imported.read)


def test_recipe_scripts_list_what_mtk_does_not_take():
    llama = import_script(LLAMA3_8B_FP8)
    assert {item.split()[0] for item in llama.unknown} >= {"--decoupled-lr", "--decoupled-min-lr"}
    machine = {flag for group in llama.skipped.values() for flag in group}
    assert {"--mock-data", "--tokenizer-type", "--data-cache-path", "--save", "--tensorboard-dir", "--profile",
            "--sequence-parallel", "--fp8-param-gather", "--distributed-timeout-minutes"} <= machine  # fmt: skip
    assert "--data-path" not in machine  # the mock-data branch of the script's condition was taken
    retro = import_script(RETRO_2B)
    assert retro.family == "retro" and any("--retro-project-dir" in note for note in retro.notes)


def test_show_megatron_then_import_then_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = invoke("presets", "show", "llama-tiny", "--megatron")
    assert "pretrain_gpt.py \\\n    --num-layers 2 \\\n" in shown.output and "--swiglu \\\n" in shown.output
    (tmp_path / "tiny.sh").write_text(shown.output)
    result = invoke("presets", "import-megatron", "tiny.sh", "-o", "tiny.toml")
    assert "train it: mtk train --preset ./tiny.toml" in result.output
    assert load_preset("./tiny.toml").config == load_preset("llama-tiny").config
    again = invoke("presets", "import-megatron", "tiny.sh", "-o", "tiny.toml", code=2)
    assert "--force" in again.output
    invoke("train", "--preset", "./tiny.toml", "--mock-data", "--train-iters", "1", "--seq-length", "32",
           "--device", "cpu", "--num-workers", "0", "--eval-interval", "0", "--save", "run")  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["swiglu"] is True and config["model"]["num_query_groups"] == 2


def test_import_reports_unknown_and_skipped_arguments(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("torchrun pretrain_bert.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
                      "--seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --lr 1e-4 \\\n"
                      "  --moe-router-topk 2 --save /ckpt --wandb-project p --bert-no-binary-head\n")  # fmt: skip
    result = invoke("presets", "import-megatron", script, "-o", tmp_path / "bert.toml")
    assert "not imported (mtk has no such setting):\n  --moe-router-topk 2" in result.output
    assert "--save" in result.output and "--wandb-project" in result.output
    text = (tmp_path / "bert.toml").read_text()
    assert "# Not imported, mtk has no such setting: --moe-router-topk 2" in text
    preset = load_preset(str(tmp_path / "bert.toml"))
    assert preset.config.model.family == "bert" and preset.config.model.bert_binary_head is False
    broken = tmp_path / "broken.sh"
    broken.write_text("python pretrain_gpt.py --num-layers $LAYERS\n")
    failed = invoke("presets", "import-megatron", broken, "-o", tmp_path / "b.toml", code=2)
    assert "LAYERS" in failed.output and not (tmp_path / "b.toml").exists()
