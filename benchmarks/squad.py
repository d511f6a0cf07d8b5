"""The T5 recipe end to end at CPU scale on the real SQuAD v1.1 files: pretrain a small T5 with span
corruption, fine-tune it on the training set, answer and score the whole dev set.

    python benchmarks/squad.py --train-file train-v1.1.json --dev-file dev-v1.1.json [--out bench-squad]
    python benchmarks/squad.py --train-file ... --dev-file ... --quick   # minutes: proves the pipeline

Steps, each an `mtk` command run as a user runs it (timed; the commands go in the report):
corpus (the bundled mtk/assets/sample.jsonl plus every training paragraph as unlabelled text; no dev
text), `mtk tokenizer train` (uncased WordPiece), `mtk prepare-data --split-sentences
--vocab-extra-ids 100`, `mtk train` (t5-tiny scaled up with --set), `mtk eval-squad` (fine-tunes, then
answers the dev questions greedily; its answering rate is the generation speed), then `mtk eval-squad
--no-finetune --answer-from-context` (the same model, each answer kept a run of its context). Writes
OUT/report.json and OUT/report.md. The target is the SQuAD paper's sliding-window baseline on dev
(Rajpurkar et al. 2016, Table 2: 13.2% exact match, 20.2% F1). A step whose output is already there is skipped
(delete OUT to start over; eval-squad itself resumes). Not a test.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = {"exact_match": 13.2, "f1": 20.2}  # sliding window, SQuAD v1.1 dev (Rajpurkar et al. 2016)
# t5-tiny (2+2 layers, hidden 64) scaled up and made Google's T5 v1.0 (relative positions, RMSNorm, no
# biases, ReLU, T5's initialisation, no dropout for a run this short); 0.5-0.6 s per step of 32 on 2 cores
# (docs/bert-t5-squad.md has the results); the encoder length is --seq-length
MODEL = {"num_layers": 3, "decoder_num_layers": 3, "hidden_size": 128, "num_attention_heads": 4,
         "ffn_hidden_size": 512, "decoder_seq_length": 64, "max_position_embeddings": 512,
         "position_embedding_type": "relative", "normalization": "RMSNorm", "add_bias_linear": "false",
         "relu": "true", "init_method": "t5", "hidden_dropout": 0, "attention_dropout": 0}  # fmt: skip
QUICK = {"num_layers": 2, "decoder_num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 256}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-file", type=Path, required=True, help="train-v1.1.json")
    parser.add_argument("--dev-file", type=Path, required=True, help="dev-v1.1.json")
    parser.add_argument("--out", type=Path, default=Path("bench-squad"))
    parser.add_argument("--quick", action="store_true", help="A tiny model, few steps, 200 dev questions.")
    parser.add_argument("--vocab-size", type=int, default=None, help="WordPiece vocabulary (8000).")
    parser.add_argument("--seq-length", type=int, default=256, help="Encoder tokens.")
    parser.add_argument("--pretrain-iters", type=int, default=None, help="Span-corruption steps of 32 (400).")
    parser.add_argument(
        "--finetune-iters", type=int, default=None, help="SQuAD steps of 32 questions (5000)."
    )
    parser.add_argument("--dev-limit", type=int, default=None, help="Score only the first N dev questions.")
    parser.add_argument(
        "--corpus-paragraphs", type=int, default=None, help="Training paragraphs pretrained on."
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Model overrides.")
    args = parser.parse_args()
    quick = args.quick
    vocab = args.vocab_size or (2000 if quick else 8000)
    pretrain_iters = args.pretrain_iters or (20 if quick else 400)
    finetune_iters = args.finetune_iters or (20 if quick else 5000)
    dev_limit = args.dev_limit or (200 if quick else None)
    paragraphs = args.corpus_paragraphs or (500 if quick else None)
    model = {**MODEL, **(QUICK if quick else {})}
    model.update(dict(item.split("=", 1) for item in args.set))

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []
    report_file = out / "report.json"
    earlier = (
        {s["step"]: s for s in json.loads(report_file.read_text())["steps"]} if report_file.is_file() else {}
    )

    def mtk(name: str, *command: str | Path, done: Path) -> None:
        """Run ``mtk COMMAND`` unless ``done`` exists; its command line and seconds go in the report."""
        line = ["mtk", *map(str, command)]
        step = {"step": name, "command": shlex.join(line)}
        if done.exists():  # done by an earlier run of the benchmark: its time
            step["seconds"] = earlier.get(name, {}).get("seconds")
        else:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "stages.main", *line[1:]], cwd=ROOT, check=True)
            step["seconds"] = round(time.perf_counter() - start, 1)
        steps.append(step)
        print(f"== {name}: {step['seconds']} s", flush=True)

    corpus = out / "corpus.jsonl"
    count = write_corpus(args.train_file, corpus, paragraphs)
    dev = (
        args.dev_file if dev_limit is None else dev_subset(args.dev_file, out / "dev-subset.json", dev_limit)
    )
    mtk("tokenizer", "tokenizer", "train", corpus, "--kind", "wordpiece", "--vocab-size", vocab, "-o", out / "tok",
        done=out / "tok" / "vocab.txt")  # fmt: skip
    data = out / "data" / "corpus"
    mtk("prepare-data", "prepare-data", corpus, "-o", data, "-t", out / "tok", "--split-sentences",
        "--vocab-extra-ids", "100", "--workers", "2", done=Path(f"{data}_text_sentence.idx"))  # fmt: skip
    overrides = [arg for key, value in model.items() for arg in ("--set", f"{key}={value}")]
    mtk("pretrain", "train", "--preset", "t5-tiny", "--data", f"{data}_text_sentence", "--seq-length",
        args.seq_length, *overrides, "--train-iters", pretrain_iters, "--micro-batch-size", 16,
        "--global-batch-size", 32, "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", min(100, pretrain_iters // 10),
        "--eval-interval", 500, "--num-workers", 0, "--save", out / "t5",
        done=out / "t5" / "latest_checkpointed_iteration.txt")  # fmt: skip
    squad = out / "t5-squad"
    mtk("finetune + answer", "eval-squad", "--load", out / "t5", "--train-file", args.train_file.resolve(),
        "--dev-file", Path(dev).resolve(), "--finetune-iters", finetune_iters, "--lr", "1e-3",
        "--micro-batch-size", 16, "--global-batch-size", 32, "--eval-batch-size", 64, "--max-answer-tokens", 24,
        "--out", squad, done=squad / "squad" / "metrics.json")  # fmt: skip
    spans = out / "from-context"
    mtk("answer from context", "eval-squad", "--load", squad, "--no-finetune", "--dev-file", Path(dev).resolve(),
        "--answer-from-context", "--eval-batch-size", 64, "--max-answer-tokens", 24, "--out", spans,
        done=spans / "squad" / "metrics.json")  # fmt: skip
    metrics = json.loads((squad / "squad" / "metrics.json").read_text())
    from_context = json.loads((spans / "squad" / "metrics.json").read_text())
    report = {
        "model": {"preset": "t5-tiny", "seq_length": args.seq_length, **model, "vocab_size": vocab},
        "pretrain_iters": pretrain_iters,
        "finetune_iters": finetune_iters,
        "corpus_paragraphs": count,
        "dev_questions": metrics["questions"],
        "results": {key: value for key, value in metrics.items() if key != "articles"},
        "results_from_context": {key: value for key, value in from_context.items() if key != "articles"},
        "baseline": BASELINE,
        "beats_baseline": {
            name: result["exact_match"] > BASELINE["exact_match"] and result["f1"] > BASELINE["f1"]
            for name, result in (("free", metrics), ("from_context", from_context))
        },  # fmt: skip
        "steps": steps,
        "articles": metrics["articles"],
    }
    report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


def write_corpus(train_file: Path, path: Path, limit: int | None) -> int:
    """The bundled corpus, then each distinct training paragraph (up to ``limit``) as a JSONL text."""
    paragraphs = [p["context"] for a in json.loads(train_file.read_text(encoding="utf-8"))["data"]
                  for p in a["paragraphs"]][:limit]  # fmt: skip
    sample = (ROOT / "mtk" / "assets" / "sample.jsonl").read_text(encoding="utf-8")
    lines = "".join(
        json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in dict.fromkeys(paragraphs)
    )
    path.write_text(sample.rstrip("\n") + "\n" + lines, encoding="utf-8")
    return len(paragraphs)


def dev_subset(dev_file: Path, path: Path, limit: int) -> Path:
    """``dev_file`` cut to its first ``limit`` questions (whole articles and paragraphs kept in order)."""
    squad = json.loads(dev_file.read_text(encoding="utf-8"))
    left, articles = limit, []
    for article in squad["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if left > 0:
                paragraphs.append({**paragraph, "qas": paragraph["qas"][:left]})
                left -= len(paragraphs[-1]["qas"])
        if paragraphs:
            articles.append({**article, "paragraphs": paragraphs})
    path.write_text(json.dumps({**squad, "data": articles}, ensure_ascii=False), encoding="utf-8")
    return path


def markdown(report: dict) -> str:
    results, spans, base = report["results"], report["results_from_context"], report["baseline"]

    def rate(result: dict) -> str:
        value = result["questions_per_second"]
        return f"{value:,.1f}" if value else "(resumed)"

    lines = [
        f"# SQuAD v1.1 dev, T5 at CPU scale ({report['dev_questions']:,} questions)",
        "",
        "| | exact match | F1 | questions/s |",
        "|---|---|---|---|",
        f"| this run, free answers | {results['exact_match']:.2f} | {results['f1']:.2f} | {rate(results)} |",
        f"| this run, answers from the context | {spans['exact_match']:.2f} | {spans['f1']:.2f} | {rate(spans)} |",
        f"| sliding-window baseline (Rajpurkar et al. 2016) | {base['exact_match']} | {base['f1']} | |",
        "",
        f"Model: {json.dumps(report['model'])}; {report['pretrain_iters']} pretraining and "
        f"{report['finetune_iters']} fine-tuning steps of 32; {results['truncated_contexts']:,} contexts truncated "
        f"({results['answers_cut']:,} past every gold answer).",
        "",
        "| step | seconds | command |",
        "|---|---|---|",
        *(f"| {s['step']} | {s['seconds']} | `{s['command']}` |" for s in report["steps"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
