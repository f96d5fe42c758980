"""The one code path behind the Olive pass and the command line: plan, calibrate, rewrite, then save atomically.

``quantize_model`` rewrites an in-memory ``onnx_ir`` model (packed weights stay lazy); ``quantize_file`` adds the
input checks, the atomic save and ``quantization_report.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from olive_int4_pass.genai.files import GENAI_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG
from olive_int4_pass.model_io import (
    DATA_NAME,
    MODEL_NAME,
    InvalidModelError,
    external_locations,
    load_checked,
    refuse_overwriting_input,
    resolve_input,
    save_atomically,
)
from olive_int4_pass.options import DEFAULT_CALIBRATION, QuantizeOptions
from olive_int4_pass.plan.candidates import plan_graph
from olive_int4_pass.plan.scratch import make_folder
from olive_int4_pass.plan.weight_plan import QualityPlan
from olive_int4_pass.report import REPORT_NAME, QuantizationReport, log_report, log_worst
from olive_int4_pass.rewrite.embedding_rules import embedding_rules
from olive_int4_pass.rewrite.matmul_rules import quantization_rules
from olive_int4_pass.rewrite.rotation import rotate_residual_stream
from olive_int4_pass.rewrite.state import MS_DOMAIN, QuantizationState

__all__ = ["DATA_NAME", "MODEL_NAME", "REPORT_NAME", "InvalidModelError", "quantize_file", "quantize_model"]

logger = logging.getLogger(__name__)


def quantize_model(
    model: ir.Model,
    options: QuantizeOptions,
    model_path: Path | None = None,
    *,
    calibration_ids: Sequence[Sequence[int]] | None = None,
) -> QuantizationReport:
    """Rewrite ``model`` in place. Packed weights are lazy: they are computed when the model is saved.

    Calibrated options run the float model from ``model_path`` (its tokenizer.json and genai_config.json beside it).
    ``calibration_ids``: pre-tokenized calibration samples (one token-id sequence each, run separately) used
    instead of the calibration text; giving them calibrates. ``options.calibration`` must then be unset or
    ``"default"`` (which a quality preset implies), never a text file.
    """
    if calibration_ids is not None and options.calibration not in (None, DEFAULT_CALIBRATION):
        raise ValueError(
            f"calibration_ids and a calibration text ({options.calibration}) were both given: use one of them"
        )
    planning = plan_graph(model.graph, options)
    quality = QualityPlan(options)
    try:
        calibration_seconds = None
        if options.calibrated or calibration_ids is not None:
            if model_path is None:
                raise ValueError("calibrated quantization needs the model's file path")
            from olive_int4_pass.plan.prepare import prepare_quality_plan

            calibration_seconds = prepare_quality_plan(quality, planning.candidates, model, model_path, calibration_ids)
        options = quality.options  # the plan may have re-planned to fit the budget (symmetric, lm_head kept at 4 bits)
        state = QuantizationState(options, model.graph, planning, quality)
        # Embeddings last: a tied table shares the tensor its lm_head MatMul got.
        for rule_set in [*quantization_rules(state), embedding_rules(state)]:
            rule_set.apply_to_model(model)
        if state.quantized:
            model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
        removed = state.remove_replaced_weights()
        _largest_first(model.graph, state)
        report = QuantizationReport(
            dict(state.quantized), dict(state.skipped), removed, *state.byte_counts(), list(state.tied_decisions)
        )
        report.weight_errors = quality.errors  # filled while the model is saved
        report.calibration_seconds = calibration_seconds
        report.seconds = dict(quality.seconds)  # calibrated runs only: plain INT4 reports stay byte-identical
        report.write_seconds = quality.write_seconds  # filled while the model is saved
        report.measured_kl = dict(quality.group_kl)
    except BaseException:
        quality.close()  # the kept inputs, searched scales and compensations under way go with the failed run
        raise
    report.release = quality.close
    log_report(report)
    return report


def quantize_file(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: QuantizeOptions | None = None,
    *,
    model_name: str = MODEL_NAME,
    external_data_name: str | None = DATA_NAME,
    size_threshold: int = 1024,
    progress: bool | None = None,
    calibration_ids: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Quantize the ONNX model at ``input_path`` into ``output_dir/model_name`` (+ external data).

    The output appears only when complete: it is written to a temporary folder next to ``output_dir`` and moved
    into place at the end. The input is never modified. ``external_data_name=None`` writes a single file when
    the model fits protobuf's 2 GB limit. ``progress=None`` shows a progress bar only on a terminal.
    ``calibration_ids``: pre-tokenized calibration samples instead of a text (see :func:`quantize_model`).
    """
    options = options or QuantizeOptions()
    input_path = resolve_input(Path(input_path))
    output_dir = Path(output_dir)
    refuse_overwriting_input(input_path, output_dir, model_name, external_data_name)
    model = load_checked(input_path)
    # What an earlier run left in output_dir and this one may not bring: its report, the data its model read.
    inputs = {input_path.resolve(), *(p.resolve() for p in input_path.parent.iterdir() if p.is_file())}
    earlier = {REPORT_NAME, *external_locations(output_dir / model_name)}
    replaces = {name for name in earlier if (output_dir / name).resolve() not in inputs}
    rotated = None
    try:
        if options.rotation == "residual":
            if options.rounding == "nearest":
                logger.warning(
                    "rotation='residual' with rounding to nearest: on SmolLM2-135M this lost +333% perplexity"
                    " against +34% unrotated (docs/quality.md); rotation is meant for rounding='compensated'"
                )
            rotated = _rotated_copy(model, input_path, options.rotation_seed, progress)
            input_path = rotated / input_path.name
            model = load_checked(input_path)
        report = quantize_model(model, options, input_path, calibration_ids=calibration_ids)
        if report.num_quantized == 0:
            logger.warning("No MatMul in %s could be quantized; writing the model unchanged.", input_path)

        def write_report(folder: Path) -> None:
            report.write(folder)
            log_worst(report)

        try:
            return save_atomically(
                model,
                output_dir,
                model_name=model_name,
                external_data_name=external_data_name,
                size_threshold=size_threshold,
                progress=progress,
                before_publish=write_report if report.num_quantized else None,
                replaces=replaces,
            )
        finally:
            if report.release is not None:
                report.release()
    finally:
        if rotated is not None:
            shutil.rmtree(rotated, ignore_errors=True)


def _rotated_copy(model: ir.Model, input_path: Path, seed: int, progress: bool | None) -> Path:
    """The float model with its residual stream rotated (``rotation: residual``), written to a temporary folder with
    the files calibration reads beside it; the caller removes the folder."""
    summary = rotate_residual_stream(model, seed)  # checks the whole graph before it changes anything
    logger.info(
        "rotation: residual stream of width %d rotated (seed %d): %d readers, %d writers, %d norms folded%s",
        summary.size,
        seed,
        summary.readers,
        summary.writers,
        summary.norms,
        "; the tied embedding kept, with one extra MatMul before the lm_head" if summary.tied else "",
    )
    folder = make_folder("olive-int4-rotated-")
    try:
        for name in (GENAI_CONFIG, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
            if (input_path.parent / name).is_file():
                shutil.copyfile(input_path.parent / name, folder / name)
        save_atomically(model, folder, model_name=input_path.name, external_data_name=DATA_NAME, progress=progress)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _largest_first(graph: ir.Graph, state: QuantizationState) -> None:
    """Reorder the initializers (the order ``ir.save`` writes them in): the largest quantized weight's packed tensor
    first and its scales (and zero points) last.

    Packed tensors are computed while being written. Started first, the biggest one (the lm_head) is quantized and
    written while the second writer gets through the rest, instead of running alone at the end; its scales, which
    wait for that computation, come last so that they hold up no writer.
    """
    if not state.cache:
        return
    largest = max(state.cache.values(), key=lambda q: q.layout.k * q.layout.n)
    last = {v.name for v in (largest.scales, largest.zero_points) if v is not None}
    names = list(graph.initializers)
    order = [largest.packed.name] + [n for n in names if n != largest.packed.name and n not in last]
    for name in order[1:] + [n for n in names if n in last]:  # re-adding a value moves it to the end
        graph.initializers[name] = graph.initializers.pop(name)
