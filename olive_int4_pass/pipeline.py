"""Quantize an ONNX model file: load lazily, check the input, apply the rewrite rules, publish atomically.

This is the one code path behind the Olive pass and the command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from onnxscript.rewriter._basics import MatchingTracer

from olive_int4_pass.options import QuantizeOptions
from olive_int4_pass.plan.calibration import DEFAULT_TEXT
from olive_int4_pass.plan.sensitivity import ImpactProbe
from olive_int4_pass.rewrite.embedding_rules import embedding_rules
from olive_int4_pass.rewrite.matmul_rules import MS_DOMAIN, QuantizationState, quantization_rules

logger = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
REPORT_NAME = "quantization_report.json"
_PROTOBUF_LIMIT = 2**31 - 1
_SAVE_WORKERS = 2


class InvalidModelError(ValueError):
    """The input is not a model we can quantize (missing, not ONNX, broken external data, bad weights)."""


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
    measured_kl: dict[str, float] = dataclasses.field(default_factory=dict)  # sensitivity="measured", by group

    def to_json(self) -> dict:
        worst = sorted(self.weight_errors.items(), key=lambda kv: -kv[1].get("relative_error", 0))
        return {
            "quantized_nodes": self.quantized,
            "skipped_nodes": self.skipped,
            "float_bytes": self.float_bytes,
            "quantized_bytes": self.quantized_bytes,
            "tied_embeddings": self.tied_decisions,
            "calibration_seconds": self.calibration_seconds,
            "weights_worst_first": dict(worst),
            "measured_kl_by_group": dict(sorted(self.measured_kl.items(), key=lambda kv: -kv[1])),
        }

    @property
    def num_quantized(self) -> int:
        return len(self.quantized)


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
    state = QuantizationState(options, model.graph)
    if calibration_ids is not None and options.calibration not in (None, DEFAULT_TEXT):
        raise ValueError(
            f"calibration_ids and a calibration text ({options.calibration}) were both given: use one of them"
        )
    if options.calibrated or calibration_ids is not None:
        if model_path is None:
            raise ValueError("calibrated quantization needs the model's file path")
        _prepare_quality_plan(state, model, model_path, calibration_ids)
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
    report.weight_errors = state.quality.errors  # filled while the model is saved
    report.calibration_seconds = getattr(state, "calibration_seconds", None)
    report.measured_kl = dict(state.quality.group_kl)
    _log_report(report)
    return report


def _largest_first(graph: ir.Graph, state: QuantizationState) -> None:
    """Reorder the initializers (the order ``ir.save`` writes them in): the largest quantized weight's packed tensor
    first and its scales (and zero points) last.

    Packed tensors are computed while being written. Started first, the biggest one (the lm_head) is quantized and
    written while the second writer gets through the rest, instead of running alone at the end; its scales, which
    wait for that computation, come last so that they hold up no writer.
    """
    if not state.cache:
        return
    largest = max(state.cache.values(), key=lambda q: q.k * q.n)
    last = {v.name for v in (largest.scales, largest.zero_points) if v is not None}
    names = list(graph.initializers)
    order = [largest.packed.name] + [n for n in names if n != largest.packed.name and n not in last]
    for name in order[1:] + [n for n in names if n in last]:  # re-adding a value moves it to the end
        graph.initializers[name] = graph.initializers.pop(name)


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
    input_path = _resolve_input(Path(input_path))
    output_dir = Path(output_dir)
    _refuse_overwriting_input(input_path, output_dir, model_name, external_data_name)
    model = load_checked(input_path)
    report = quantize_model(model, options, input_path, calibration_ids=calibration_ids)
    if report.num_quantized == 0:
        logger.warning("No MatMul in %s could be quantized; writing the model unchanged.", input_path)

    def write_report(folder: Path) -> None:
        (folder / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=1))
        _log_worst(report)

    return save_atomically(
        model,
        output_dir,
        model_name=model_name,
        external_data_name=external_data_name,
        size_threshold=size_threshold,
        progress=progress,
        before_publish=write_report if report.num_quantized else None,
    )


def load_checked(path: Path) -> ir.Model:
    """Load an ONNX model without reading its external data, after checking that data is all there."""
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
        raise InvalidModelError(f"{path} is not a readable ONNX model: {e}") from e
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InvalidModelError(f"{path} holds no ONNX graph")
    _check_external_data(model, path.parent)
    return model


def save_atomically(
    model: ir.Model,
    output_dir: Path,
    *,
    model_name: str = MODEL_NAME,
    external_data_name: str | None = DATA_NAME,
    size_threshold: int = 1024,
    progress: bool | None = None,
    before_publish=None,
) -> Path:
    """Save ``model`` into ``output_dir`` so that an interrupted run leaves nothing half-written there.

    ``before_publish(folder)`` may add files (e.g. a report) to the temporary folder before it is published.
    """
    if external_data_name is None and _initializer_bytes(model) > _PROTOBUF_LIMIT // 2:
        logger.info("Model too large for a single protobuf file; saving weights to %s", DATA_NAME)
        external_data_name = DATA_NAME
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        try:
            _save(model, tmp / model_name, external_data_name, size_threshold, progress)
        except Exception as e:
            # Packed weights are computed during the save, so a bad weight surfaces here wrapped by onnx_ir
            # (SerdeError): re-raise our own typed error so callers (and Olive) see it as such.
            cause = _typed_cause(e)
            if cause is None or cause is e:
                raise
            raise type(cause)(str(cause)) from e
        if before_publish is not None:
            before_publish(tmp)
        output_dir.mkdir(parents=True, exist_ok=True)
        # Data first, graph last: a model.onnx present means its data is complete.
        for name in sorted(os.listdir(tmp), key=lambda n: n == model_name):
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir / model_name


def _save(model: ir.Model, path: Path, external_data_name: str | None, size_threshold: int, progress) -> None:
    with _progress_bar(model, progress) as callback:
        if external_data_name:
            # Two writers: one tensor is quantized while the previous one is written (or the embedding copied).
            ir.save(
                model,
                path,
                external_data=external_data_name,
                size_threshold_bytes=size_threshold,
                callback=callback,
                max_workers=_SAVE_WORKERS,
            )
        else:
            for tensor in _initializer_tensors(model):
                callback(tensor, None)
            ir.save(model, path)


def _typed_cause(error: BaseException) -> BaseException | None:
    while error is not None:
        if isinstance(error, (ValueError, TypeError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _resolve_input(path: Path) -> Path:
    if not path.exists():
        raise InvalidModelError(f"input model {path} does not exist")
    if path.is_dir():
        candidates = sorted(path.glob("*.onnx"))
        if len(candidates) != 1:
            raise InvalidModelError(f"{path} must hold exactly one .onnx file, found {len(candidates)}")
        path = candidates[0]
    return path


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    for tensor in _initializer_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.base_dir or base_dir) / tensor.location
        if not data_path.is_file():
            raise InvalidModelError(f"external data file {data_path} of tensor {tensor.name!r} is missing")
        size = data_path.stat().st_size
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if size < end:
            raise InvalidModelError(
                f"external data file {data_path} is truncated: tensor {tensor.name!r} needs bytes up to {end}, "
                f"the file has {size}"
            )


def _refuse_overwriting_input(input_path: Path, output_dir: Path, model_name: str, data_name: str | None) -> None:
    inputs = {input_path.resolve(), *(p.resolve() for p in input_path.parent.glob("*.data"))}
    targets = {(output_dir / model_name).resolve()} | ({(output_dir / data_name).resolve()} if data_name else set())
    clash = inputs & targets
    if clash:
        raise InvalidModelError(f"output would overwrite the input file(s) {sorted(map(str, clash))}")


def _initializer_tensors(model: ir.Model):
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            yield value.const_value


def _initializer_bytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in _initializer_tensors(model))


class _progress_bar:
    """A tqdm bar over the bytes written by ``ir.save`` (packed weights are computed during the save)."""

    def __init__(self, model: ir.Model, enabled: bool | None) -> None:
        from tqdm.auto import tqdm

        disable = (not enabled) if enabled is not None else None  # None: only on a terminal
        self._bar = tqdm(
            total=_initializer_bytes(model), unit="B", unit_scale=True, desc="quantize+write", disable=disable
        )
        self._last: ir.TensorProtocol | None = None

    def __enter__(self):
        return self._callback

    def _callback(self, tensor: ir.TensorProtocol, _info) -> None:
        # Called before each tensor is written: account for the previous one.
        if self._last is not None:
            self._bar.update(self._last.nbytes)
        self._last = tensor
        self._bar.set_postfix_str(str(tensor.name)[-40:], refresh=False)

    def __exit__(self, *exc) -> None:
        if self._last is not None and exc[0] is None:
            self._bar.update(self._last.nbytes)
        self._bar.close()


def _prepare_quality_plan(
    state: QuantizationState,
    model: ir.Model,
    model_path: Path,
    calibration_ids: Sequence[Sequence[int]] | None = None,
) -> None:
    """Dry-run the rules to list candidates, calibrate on their inputs, then pick 8-bit tensors if asked."""
    from olive_int4_pass.plan.calibration import (
        check_calibration_ids,
        input_second_moments,
        load_calibration_text,
        model_vocab_size,
        tokenize,
    )

    if calibration_ids is not None:  # checked before the dry run: bad input fails fast
        vocab_size = model_vocab_size(model, model_path.parent)
        calibration_ids = check_calibration_ids(calibration_ids, state.options.calibration_tokens, vocab_size)
    tracer = MatchingTracer()  # with a tracer the rules only match: nothing is rewritten
    for rule_set in quantization_rules(state):
        rule_set.apply_to_model(model, tracer=tracer)
    state.forget_rewrites()  # the dry run still called the rewrite functions: drop what they built
    opts = state.options
    activations = {c.activation for c in state.candidates.values() if c.activation}
    if not activations:
        return
    start = time.perf_counter()
    if calibration_ids is not None:
        token_ids = calibration_ids
        num_tokens = sum(map(len, calibration_ids))
    else:
        token_ids = tokenize(load_calibration_text(opts.calibration), model_path.parent, opts.calibration_tokens)
        num_tokens = len(token_ids)
    state.quality.importance = input_second_moments(model_path, activations, token_ids)
    state.calibration_seconds = time.perf_counter() - start
    logger.info(
        "Calibrated %d MatMul inputs on %d tokens in %.1f s.",
        len(activations),
        num_tokens,
        state.calibration_seconds,
    )
    if opts.mixed_precision_budget and opts.bits < 8:
        chosen = {c.name for c in state.candidates.values()}
        fixed = sum(  # what the model stores besides the quantized weights: the budget is on the whole model
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None and v.name not in chosen
        )
        probe = None
        if opts.sensitivity == "measured":
            probe = _impact_probe(state, model_path, token_ids)
        state.quality.choose_bits(state.candidates, opts.bits, fixed, probe)


def _impact_probe(state: QuantizationState, model_path: Path, token_ids: Sequence) -> ImpactProbe:
    """The float model on the first ``sensitivity_tokens`` calibration tokens, its candidate weights as inputs."""
    from olive_int4_pass.plan.calibration import _sequences

    sample = list(_sequences(token_ids)[0][: state.options.sensitivity_tokens])
    weights = {}
    for cand in state.candidates.values():
        w = cand.weight()
        weights[cand.name] = w.T if cand.transposed else w
    return ImpactProbe(model_path, weights, sample)


def _log_worst(report: QuantizationReport, count: int = 5) -> None:
    worst = sorted(report.weight_errors.items(), key=lambda kv: -kv[1].get("relative_error", 0))[:count]
    for name, stats in worst:
        weighted = stats.get("weighted_relative_error")
        extra = f", importance-weighted {weighted:.4f}" if weighted is not None else ""
        logger.info("Largest error: %s (%d bits): relative %.4f%s", name, stats["bits"], stats["relative_error"], extra)


def _log_report(report: QuantizationReport) -> None:
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
