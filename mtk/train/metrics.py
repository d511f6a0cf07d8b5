"""Run metrics: ``metrics.jsonl`` (one object per log interval / evaluation), TensorBoard, console, plot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtk.checkpoint import RunDir
from mtk.manifest import atomic_output, atomic_write_text, open_nofollow, refuse_link

# Dense (non-sparse) peak TFLOP/s per device, by precision; FP8 is twice bf16 on Hopper.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def device_peak_tflops(precision: str, device: str) -> float | None:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(precision)
    return None


def memory_gib(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes every record to the run's ``metrics.jsonl`` and TensorBoard, and shows it on the console."""

    def __init__(
        self,
        run_dir: RunDir,
        tensorboard_dir: Path | None = None,
        peak_tflops: float | None = None,
        device: str = "cpu",
        show: Callable[[str], None] | None = None,
        enabled: bool = True,  # False on every data-parallel rank but the first
    ) -> None:
        self.path = run_dir.metrics
        self.peak, self.device, self.show, self.enabled = peak_tflops, device, show or print, enabled
        self.writer = None
        if enabled:
            refuse_link(self.path)  # before the first step, not at the first log line
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open_nofollow(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def forget_after(self, iteration: int) -> None:
        """Drop the records of iterations after ``iteration``, which a resumed run replays and logs
        again, so that every iteration has one record; also a torn last line."""
        if not self.enabled or not self.path.is_file():
            return
        records = read_metrics(self.path.parent)
        kept = [r for r in records if r.get("iteration", 0) <= iteration]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text != self.path.read_text(encoding="utf-8", errors="replace"):
            atomic_write_text(self.path, text)

    def log_train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record["memory_gib"] = memory_gib(self.device)
        if self.peak:
            record["mfu"] = record["tflops"] / self.peak
        self._append(record)
        if self.writer is not None:
            for key in (
                *(key for key in record if key.endswith("_loss")),
                "loss",
                "lr",
                "grad_norm",
                "loss_scale",
                "tokens_per_s",
                "tflops",
                "global_batch_size",
            ):
                self.writer.add_scalar(f"train/{key}", record[key], record["iteration"])
            self.writer.flush()
        mfu = f" | MFU {record['mfu']:.1%}" if "mfu" in record else ""
        self.show(
            f"iter {record['iteration']:>7} | samples {record['consumed_samples']:>9,} | tokens {record['consumed_tokens']:>12,}"
            f" | lr {record['lr']:.3e} | loss {record['loss']:.4f}{_terms(record)} | grad {record['grad_norm']:.3f}"
            f" | scale {record['loss_scale']:g}{_amax(record)} | {record['tokens_per_s']:,.0f} tok/s | {record['tflops']:.2f} TFLOP/s{mfu}"
            f" | mem {record['memory_gib']:.2f} GiB"
        )

    def log_eval(self, record: dict[str, Any] | None) -> None:
        if record is None or not self.enabled:
            return
        self._append(record)
        if self.writer is not None:
            self.writer.add_scalar(f"{record['split']}/loss", record["loss"], record["iteration"])
            self.writer.add_scalar(f"{record['split']}/ppl", record["ppl"], record["iteration"])
            self.writer.flush()
        self.show(
            f"{record['split']} at iter {record['iteration']}: loss {record['loss']:.4f}{_terms(record)} | ppl {record['ppl']:.2f}"
        )

    def message(self, text: str) -> None:
        if self.enabled:
            self.show(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of run directory ``root``; a torn last line (a write cut short by a kill) is left out.
    ValueError naming the line for anything else that is not a record with an iteration and a loss."""
    path = RunDir(root).metrics
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {root} an mtk run directory?)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record; remove the line or the file") from None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("iteration"), int)
            and isinstance(record.get("loss"), (int, float))
        ):
            raise ValueError(
                f"{path}:{number}: not a metrics record (an object with a whole 'iteration' and a numeric "
                "'loss'); remove the line or the file"
            )
        records.append(record)
    return records


def plot_loss(root: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Loss curve (train, and valid where evaluated) of run directory ``root`` as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(root)
    out = Path(out) if out is not None else RunDir(root).plot
    figure, axis = plt.subplots(figsize=(7, 4))
    train = [r for r in records if "split" not in r]
    axis.plot([r["iteration"] for r in train], [r["loss"] for r in train], label="train")
    for split in ("valid", "test"):
        points = [r for r in records if r.get("split") == split]
        if points:
            axis.plot([r["iteration"] for r in points], [r["loss"] for r in points], "o-", label=split)
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.set_title(Path(root).resolve().name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_output(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return out


def _terms(record: dict[str, Any]) -> str:
    """The loss terms of a family with several (``lm_loss``, ``sop_loss``) for a log line."""
    return "".join(
        f" | {key.replace('_', ' ')} {value:.4f}" for key, value in record.items() if key.endswith("_loss")
    )


def _amax(record: dict[str, Any]) -> str:
    """The FP8 linears' largest amax of the interval, and where, for a log line."""
    if "fp8_amax" not in record:
        return ""
    return f" | fp8 amax {record['fp8_amax']:.3g} ({record['fp8_amax_at']})"
