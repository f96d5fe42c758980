"""What one run did, as logged and as written to ``quantization_report.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from pathlib import Path

logger = logging.getLogger(__name__)

REPORT_NAME = "quantization_report.json"


@dataclasses.dataclass
class QuantizationReport:
    """What one run did: counts by bit width, skipped nodes with reasons, removed float weights."""

    quantized: dict[str, int]
    skipped: dict[str, str]
    removed_weights: list[str]
    float_bytes: int = 0
    quantized_bytes: int = 0
    tied_decisions: list[str] = dataclasses.field(default_factory=list)
    weight_errors: dict[str, dict] = dataclasses.field(default_factory=dict)
    calibration_seconds: float | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # calibration, sensitivity, search
    write_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # compensation; filled while saving
    measured_kl: dict[str, float] = dataclasses.field(default_factory=dict)  # sensitivity="measured", by group
    # Frees what only writing the model needs (compensated rounding's kept calibration inputs); not reported.
    release: typing.Callable[[], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        worst = sorted(self.weight_errors.items(), key=lambda kv: -kv[1].get("relative_error", 0))
        return {
            "quantized_nodes": self.quantized,
            "skipped_nodes": self.skipped,
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "tied_embeddings": self.tied_decisions,
            "calibration_seconds": self.calibration_seconds,
            "seconds_before_writing": {k: round(v, 3) for k, v in self.seconds.items()},
            **(
                {"seconds_while_writing": {k: round(v, 3) for k, v in self.write_seconds.items()}}
                if self.write_seconds
                else {}
            ),
            "weights_worst_first": dict(worst),
            "measured_kl_by_group": dict(sorted(self.measured_kl.items(), key=lambda kv: -kv[1])),
        }

    @property
    def num_quantized(self) -> int:
        return len(self.quantized)

    def write(self, folder: Path) -> Path:
        """``quantization_report.json`` in ``folder`` (strict JSON: a non-finite number is written as null)."""
        path = folder / REPORT_NAME
        path.write_text(json.dumps(_finite(self.to_json()), indent=1, allow_nan=False))
        return path


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def log_worst(report: QuantizationReport, count: int = 5) -> None:
    worst = sorted(report.weight_errors.items(), key=lambda kv: -kv[1].get("relative_error", 0))[:count]
    for name, stats in worst:
        weighted = stats.get("weighted_relative_error")
        extra = f", importance-weighted {weighted:.4f}" if weighted is not None else ""
        logger.info("Largest error: %s (%d bits): relative %.4f%s", name, stats["bits"], stats["relative_error"], extra)


def log_report(report: QuantizationReport) -> None:
    by_bits: dict[int, int] = {}
    for bits in report.quantized.values():
        by_bits[bits] = by_bits.get(bits, 0) + 1
    summary = ", ".join(f"{count} at {bits} bits" for bits, count in sorted(by_bits.items())) or "none"
    logger.info("Quantized nodes: %s; removed %d float weights.", summary, len(report.removed_weights))
    if report.float_bytes:
        logger.info(
            "Weights: %.1f MB float -> %.1f MB quantized (x%.2f smaller).",
            report.float_bytes / 1e6,
            report.quantized_bytes / 1e6,
            report.float_bytes / max(1, report.quantized_bytes),
        )
    for decision in report.tied_decisions:
        logger.info("Tied embedding: %s", decision)
    for name, reason in sorted(report.skipped.items()):
        logger.info("Skipped %s: %s", name, reason)
