"""The quickstart: prepare the bundled corpus, train a tiny GPT on CPU, show the loss falling and a sample.

The bundled corpus is the Python Language Reference (``mtk/assets/sample.jsonl``, PSF License), and
``mtk/assets/tokenizer`` is a 4096-token GPT-2 style BPE trained on it with ``mtk tokenizer train``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mtk.config import apply_overrides
from mtk.presets import load_preset

# A little wider and deeper than gpt-tiny: about two minutes on two CPU cores, and text that looks learned.
QUICKSTART_MODEL = {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4, "seq_length": 128}


@dataclass
class QuickstartResult:
    run_dir: Path
    data_prefix: str
    first_loss: float
    last_loss: float
    sample: str


def asset(name: str) -> Path:
    return Path(str(resources.files("mtk") / "assets" / name))


def run_quickstart(
    out: Path, train_iters: int = 300, show: Callable[[str], None] = print, workers: int = 1
) -> QuickstartResult:
    from mtk.data.prepare import prepare_data
    from mtk.data.tokenizer import load_tokenizer
    from mtk.generate import generate, load_run
    from mtk.train.loop import TrainOptions
    from mtk.train.run import run_training

    tokenizer = load_tokenizer(str(asset("tokenizer")))
    show(f"1/3 preparing the bundled corpus with the bundled {tokenizer.vocab_size}-token BPE tokenizer")
    prepared = prepare_data(
        [str(asset("sample.jsonl"))],
        str(out / "data" / "sample"),
        tokenizer,
        append_eod=True,
        workers=workers,
    )
    prefix = prepared.outputs["text"]
    show(
        f"    {prepared.stats.documents} documents, {prepared.stats.tokens['text']:,} tokens -> {prefix}.bin/.idx"
    )
    overrides = {
        **QUICKSTART_MODEL,
        "train_iters": train_iters,
        "micro_batch_size": 16,
        "global_batch_size": 16,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "lr_warmup_iters": 20,
        "log_interval": 25,
        "eval_interval": 100,
        "eval_iters": 2,
        "split": "95,4,1",
        "data_path": prefix,
    }
    config = apply_overrides(load_preset("gpt-tiny").sections, overrides)
    run_dir = out / "run"
    show(
        f"2/3 training gpt-tiny ({config.model.num_layers} layers, hidden {config.model.hidden_size}) for {train_iters} iterations on CPU"
    )
    state = run_training(config, TrainOptions(save=run_dir, num_workers=0, device="cpu"), show=show)
    model, tok = load_run(run_dir)
    prompt = "The assert statement"
    ids = generate(model, tok.encode(prompt), 40, temperature=0.7, top_k=40, eod=tok.eod, seed=0)
    sample = prompt + tok.decode([i for i in ids if i != tok.eod])
    show("3/3 a sample from the trained model:")
    return QuickstartResult(
        run_dir, prefix, state.losses[0], sum(state.losses[-10:]) / len(state.losses[-10:]), sample
    )
