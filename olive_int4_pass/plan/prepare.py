"""Calibration orchestration for the quality options: tokens in, statistics and 8-bit choices into the weight plan.

Order: check the calibration ids (bad input fails before any model run), measure each candidate's input E[x^2] on
the float model, then, with a budget, rank the candidates and choose which go to 8 bits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir

from olive_int4_pass.kernels.gptq import spans
from olive_int4_pass.options import AUTO_COMPENSATION_TOKENS, MIN_COMPENSATION_TOKENS, QuantizeOptions
from olive_int4_pass.plan.activation_store import ActivationStore, keeps_blocks, widths_of
from olive_int4_pass.plan.calibration import (
    _sequences,
    check_calibration_ids,
    input_second_moments,
    load_calibration_text,
    model_vocab_size,
    tokenize,
)
from olive_int4_pass.plan.candidates import Candidate, WeightKey
from olive_int4_pass.plan.sensitivity import ImpactProbe, LayeredImpactProbe
from olive_int4_pass.plan.weight_plan import QualityPlan

logger = logging.getLogger(__name__)


def prepare_quality_plan(
    quality: QualityPlan,
    candidates: dict[WeightKey, Candidate],
    model: ir.Model,
    model_path: Path,
    calibration_ids: Sequence[Sequence[int]] | None = None,
) -> float | None:
    """Calibrate on the candidates' inputs, then pick 8-bit tensors if asked. Returns the calibration seconds."""
    opts = quality.options
    if calibration_ids is not None:  # checked first: bad input fails fast
        vocab_size = model_vocab_size(model, model_path.parent)
        calibration_ids = check_calibration_ids(calibration_ids, opts.calibration_tokens, vocab_size)
    activations = {c.activation for c in candidates.values() if c.activation}
    if not activations:
        return None
    start = time.perf_counter()
    if calibration_ids is not None:
        token_ids = calibration_ids
        num_tokens = sum(map(len, calibration_ids))
    else:
        token_ids = tokenize(load_calibration_text(opts.calibration), model_path.parent, opts.calibration_tokens)
        num_tokens = len(token_ids)
    keep = None
    cap = opts.compensation_max_inputs
    compensated = [c for c in candidates.values() if c.activation and (cap is None or c.k <= cap)]
    runs = _runs(compensated, opts, num_tokens)
    if opts.rounding == "compensated" or (opts.rounding == "auto" and _auto_compensates(compensated, num_tokens, runs)):
        quality.activations = _activation_store(compensated, num_tokens, runs)
        quality.compensation_users.update(c.activation for c in compensated)
        keep = quality.activations.add
    try:
        quality.importance = input_second_moments(model_path, activations, token_ids, keep=keep)
    except BaseException:
        quality.close()  # the kept inputs go with the failed run
        raise
    seconds = time.perf_counter() - start
    quality.seconds["calibration"] = seconds
    logger.info("Calibrated %d MatMul inputs on %d tokens in %.1f s.", len(activations), num_tokens, seconds)
    if opts.mixed_precision_budget and opts.bits < 8:
        chosen = {c.name for c in candidates.values()}
        fixed = sum(  # what the model stores besides the quantized weights: the budget is on the whole model
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None and v.name not in chosen
        )
        probe = None
        if opts.sensitivity == "measured":
            start = time.perf_counter()
            probe = impact_probe(candidates, opts.sensitivity_tokens, model_path, token_ids, opts.sensitivity_depth)
            quality.seconds["sensitivity"] = time.perf_counter() - start
        quality.choose_bits(candidates, opts.bits, fixed, probe)
    return seconds


def _runs(candidates: list[Candidate], opts: QuantizeOptions, num_tokens: int) -> dict[str, list] | None:
    """The compensated inputs that keep their runs' blocks of ``H`` (``compensation_span``) rather than their rows,
    because the blocks take less disk, with those runs."""
    if opts.compensation_span is None:
        return None
    runs = {}
    for c in candidates:
        row_bytes = 2 if c.source.dtype == ir.DataType.FLOAT16 else 4  # the activations' dtype is the weights'
        its = spans(c.k, opts.block_size, opts.compensation_span)
        if keeps_blocks(c.k, its, num_tokens, row_bytes):
            runs[c.activation] = its
    return runs


def _auto_compensates(candidates: list[Candidate], num_tokens: int, runs: dict | None = None) -> bool:
    """``rounding='auto'``: compensate with enough calibration tokens and temporary disk; the log says which."""
    if not candidates:
        return False
    if num_tokens < AUTO_COMPENSATION_TOKENS:
        logger.info(
            "Rounding to nearest: %d calibration tokens; rounding='auto' compensates from %d on (with fewer it"
            " measured worse on a real model; pass a longer text and raise calibration_tokens, docs/quality.md).",
            num_tokens,
            AUTO_COMPENSATION_TOKENS,
        )
        return False
    try:
        ActivationStore.check_space(widths_of((c.activation, c.k) for c in candidates), num_tokens, runs=runs)
    except ValueError as e:
        logger.warning("Rounding to nearest instead of compensated (rounding='auto'): %s", e)
        return False
    logger.info("Compensated rounding (rounding='auto'): %d calibration tokens.", num_tokens)
    return True


def _activation_store(candidates: list[Candidate], num_tokens: int, runs: dict | None = None) -> ActivationStore:
    """Where calibration keeps the inputs of the weights to compensate; refuses too few tokens or too little disk."""
    if num_tokens < MIN_COMPENSATION_TOKENS:
        raise ValueError(
            f"rounding='compensated' needs at least {MIN_COMPENSATION_TOKENS} calibration tokens; the calibration"
            f" data gave {num_tokens}"
        )
    widths = widths_of((c.activation, c.k) for c in candidates)
    widest = max(widths.values(), default=0)
    if num_tokens < widest:  # measured on Qwen2.5-1.5B: 4,096 tokens beat 2,048 (docs/results.md)
        logger.warning(
            "Compensated rounding: %d calibration tokens for inputs up to %d wide: their second moments have rank at"
            " most %d and damping fills in the rest. More tokens, up to the widest input, measured better (raise"
            " calibration_tokens with a longer text or data_config).",
            num_tokens,
            widest,
            num_tokens,
        )
    needed = ActivationStore.check_space(widths, num_tokens, runs=runs)
    store = ActivationStore(widths, runs=runs, tokens=num_tokens)
    blocks = len(runs or {})
    logger.info(
        "Compensated rounding: keeping %.2f GB of calibration statistics in %s (%d inputs as their blocks of H, %d"
        " as rows)",
        needed / 1e9,
        store.folder,
        blocks,
        len(widths) - blocks,
    )
    return store


def impact_probe(
    candidates: dict[WeightKey, Candidate], tokens: int, model_path: Path, token_ids: Sequence, depth: int = 0
) -> ImpactProbe | LayeredImpactProbe:
    """The float model on the first ``tokens`` calibration tokens, its candidate weights as inputs; probes carried
    to the logits after ``depth`` layers (0: run to the logits)."""
    from olive_int4_pass.genai.layers import NotCuttable

    sample = list(_sequences(token_ids)[0][:tokens])

    def stored(cand: Candidate):  # the weight as the graph stores it (W, or W^T for a transposed MatMul)
        return lambda: cand.weight().T if cand.transposed else cand.weight()

    loaders = {cand.name: stored(cand) for cand in candidates.values()}
    try:
        return LayeredImpactProbe(model_path, loaders, sample, depth or None)
    except NotCuttable as e:
        logger.info(
            "Measuring sensitivity on the whole model at once (%s cannot be cut into layers: %s)", model_path, e
        )
        return ImpactProbe(model_path, {name: load() for name, load in loaders.items()}, sample)
