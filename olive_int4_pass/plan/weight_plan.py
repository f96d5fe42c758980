"""How each weight is quantized: round to nearest by default; with calibration, importance-weighted scales and
8 bits for the tensors whose measured error costs the most per byte. Also records per-weight quantization error.

The plan is made before the model is written: candidates come from :mod:`olive_int4_pass.plan.candidates`,
activation statistics from :mod:`olive_int4_pass.plan.calibration`, sensitivities from one pass over the weights.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from olive_int4_pass.kernels import streaming_rtn
from olive_int4_pass.kernels.gptq import Compensation, compensated_quantize_spans, spans
from olive_int4_pass.kernels.layout import quantized_bytes
from olive_int4_pass.kernels.rtn import QuantizedWeight, dequantize_blockwise, quantize_blockwise
from olive_int4_pass.kernels.scale_search import SearchResult, search_scales
from olive_int4_pass.options import LOW_DAMPING_TOKENS_PER_CHANNEL, QuantizeOptions
from olive_int4_pass.plan.activation_store import ActivationStore
from olive_int4_pass.plan.candidates import ROTATION_MIX_WEIGHT, Candidate, WeightKey
from olive_int4_pass.plan.compensation_ahead import CompensationAhead
from olive_int4_pass.plan.search_store import SearchStore
from olive_int4_pass.plan.sensitivity import ImpactProbe, group_by_layer, measure_groups

logger = logging.getLogger(__name__)

_ERROR_SAMPLE_ROWS = 256


class QualityPlan:
    """Per-weight decisions (bits, searched scales) and the measured errors; thread-safe for ``ir.save``."""

    def __init__(self, options: QuantizeOptions) -> None:
        self.options = options
        self.importance: dict[str, np.ndarray] = {}
        self.bits: dict[WeightKey, int] = {}
        self.searched = SearchStore()  # {(key, bits): SearchResult}, on disk until the write
        self.errors: dict[str, dict] = {}
        self.group_kl: dict[str, float] = {}  # measured sensitivity, when asked for
        self.seconds: dict[str, float] = {}  # where planning time went: calibration, sensitivity, search
        self.write_seconds: dict[str, float] = {}  # and, while writing, compensated rounding
        self.activations: ActivationStore | None = None  # calibration inputs, for compensated rounding
        self.ahead: CompensationAhead | None = None  # compensations started beside the search
        self._lock = threading.Lock()
        # One compensated rounding at a time (see _compensate_timed).
        self._compensating = threading.Lock()
        # The factored H of each input, kept while weights that read it are still to be rounded (q/k/v share one,
        # gate/up another): {activation: {run: Factor}}, and how many weights of each are left.
        self._factors: dict[str, dict] = {}
        self.compensation_users: collections.Counter[str] = collections.Counter()
        self._dampings_said: set[float] = set()  # each damping the rule chose is logged once

    def quantize(self, key: WeightKey, candidate: Candidate, bits: int) -> QuantizedWeight:
        """Quantize one weight as planned and record its error."""
        opts = self.options
        importance = self.importance.get(candidate.activation) if candidate.activation else None
        cols = _sample_columns(candidate.n)
        search = None
        dtype = candidate.source.dtype.numpy()
        output_error = None
        if self.compensates(candidate):
            weight = candidate.weight()
            q = self.ahead.take((key, bits)) if self.ahead is not None else None
            if q is None:
                if opts.scale_search:
                    search = self.searched.get((key, bits)) or self._search(weight, importance, bits)
                q = self._compensate_timed(weight, candidate, bits, search, "compensation")
            sample = np.asarray(weight[:, cols], np.float32)
            output_error = functools.partial(self.activations.output_error, candidate.activation)
        elif not opts.scale_search and streaming_rtn.applies(
            dtype, candidate.k, candidate.n, opts.block_size, bits, opts.is_symmetric
        ):
            # Round to nearest, streamed: the float weight is read band by band and never held whole.
            q, sample = streaming_rtn.quantize_source(
                candidate.source,
                candidate.transposed,
                block_size=opts.block_size,
                bits=bits,
                name=candidate.name,
                sample_cols=cols,
            )
        else:
            weight = candidate.weight()
            if opts.scale_search:
                search = self.searched.get((key, bits)) or self._search(weight, importance, bits)
            q = self._quantize_with(weight, candidate.name, bits, search)
            sample = np.asarray(weight[:, cols], np.float32)
        stats = _error_stats(cols, sample, q, importance, output_error)
        stats.update(bits=bits, nodes=list(candidate.nodes), scale_search=opts.scale_search)
        stats["rounding"] = "compensated" if output_error is not None else "nearest"
        with self._lock:
            self.errors[candidate.name] = stats
        return q

    def _compensate_timed(
        self, weight: np.ndarray, candidate: Candidate, bits: int, search: SearchResult | None, what: str
    ) -> QuantizedWeight:
        """:meth:`_compensate` one weight at a time (it already keeps the cores busy, and two 7B down projections
        at once would hold two 1.4 GB ``H``), its seconds added to ``write_seconds[what]``."""
        with self._compensating:
            start = time.perf_counter()
            q = self._compensate(weight, candidate.activation, candidate.name, bits, search)
            with self._lock:
                self.write_seconds[what] = self.write_seconds.get(what, 0.0) + time.perf_counter() - start
        return q

    def _quantize_with(self, weight: np.ndarray, name: str, bits: int, search: SearchResult | None) -> QuantizedWeight:
        """Round ``weight`` with the searched scales (and zero points), or to nearest without a search."""
        return quantize_blockwise(
            weight,
            block_size=self.options.block_size,
            bits=bits,
            symmetric=self.options.is_symmetric,
            name=name,
            scales=None if search is None else search.scales,
            zero_points=None if search is None else search.zero_points,
        )

    def close(self) -> None:
        """Drop what only the write needed (the kept calibration inputs, the searched scales)."""
        if self.ahead is not None:  # first: it reads the kept inputs
            self.ahead.close()
        self.searched.close()
        if self.activations is not None:
            self.activations.close()

    def compensates(self, candidate: Candidate) -> bool:
        """Whether ``candidate`` is rounded with error compensation (its calibration inputs were kept)."""
        return self.activations is not None and candidate.activation in self.activations

    def _compensate(
        self, weight: np.ndarray, activation: str, name: str, bits: int, search: SearchResult | None
    ) -> QuantizedWeight:
        """Error-compensated rounding; the searched scales (if any) are fixed first, then compensated around.

        ``H`` is formed from the kept inputs, already in act-order, and factorised in place by the kernel, once per
        input: the weights that read the same input (q/k/v, gate/up) are rounded against the same factor.
        """
        opts = self.options
        store = self.activations
        order = store.act_order(activation) if opts.act_order else None
        factors = self._factors.setdefault(activation, {})
        shared = bool(factors)
        damping = self._damping(weight.shape[0], store.tokens(activation), name)
        q, info = compensated_quantize_spans(
            weight,
            lambda orders: store.second_moment_blocks(activation, orders),
            order=order,
            span=opts.compensation_span,
            block_size=opts.block_size,
            bits=bits,
            symmetric=opts.is_symmetric,
            compensation=Compensation(damping, opts.act_order, opts.compensation_block_rows, opts.compensation_sweeps),
            scales=None if search is None else search.scales,
            zero_points=None if search is None else search.zero_points,
            factors=factors,
            name=name,
        )
        self.compensation_users[activation] -= 1
        if self.compensation_users[activation] <= 0:  # its last weight: the factors go
            del self._factors[activation]
        if shared:  # said once per input, by the weight that factored it
            return q
        if info.retries:
            logger.warning(
                "%s: the input's second moments were singular; damped by %g x mean(diag) instead of %g",
                name,
                info.damp,
                damping,
            )
        if info.dead_channels:
            logger.info("%s: %d input channels were zero on every calibration token", name, info.dead_channels)
        return q

    def _damping(self, k: int, tokens: int, name: str) -> float:
        """The damping of a K-input weight (``options.damping_for`` its widest run); a rule's choice is logged once."""
        opts = self.options
        channels = max(r1 - r0 for r0, r1 in spans(k, opts.block_size, opts.compensation_span))
        damping = opts.damping_for(tokens, channels)
        with self._lock:
            first = opts.compensation_damping is None and damping not in self._dampings_said
            self._dampings_said.add(damping)
        if first:
            logger.info(
                "Compensated rounding: damping %g x mean(diag H) where calibration gives %s %d tokens per input"
                " channel compensated together (first: %s, %d tokens for runs of %d channels)",
                damping,
                "at least" if tokens >= LOW_DAMPING_TOKENS_PER_CHANNEL * channels else "fewer than",
                LOW_DAMPING_TOKENS_PER_CHANNEL,
                name,
                tokens,
                channels,
            )
        return damping

    def _search(self, weight: np.ndarray, importance: np.ndarray | None, bits: int) -> SearchResult:
        opts = self.options
        return search_scales(weight, importance, block_size=opts.block_size, bits=bits, symmetric=opts.is_symmetric)

    def choose_bits(
        self,
        candidates: dict[WeightKey, Candidate],
        default_bits: int,
        fixed_bytes: int = 0,
        probe: ImpactProbe | None = None,
    ) -> None:
        """Measure each candidate at ``default_bits`` and move the costliest-per-byte ones to 8 bits.

        ``fixed_bytes``: the model's other weights (float embedding, norms, biases), which the budget counts too:
        a budget of 0.03 lets the whole model grow by 3 %. With a ``probe`` (``sensitivity="measured"``) the
        cost is each layer's measured KL at the logits, shared among its weights by their relative errors.
        """
        self._fit_budget(candidates, default_bits, fixed_bytes)
        opts = self.options
        sensitivity: dict[WeightKey, float] = {}
        start = time.perf_counter()
        for key, cand in candidates.items():
            importance = self.importance.get(cand.activation) if cand.activation else None
            if opts.scale_search:
                result = self._search(cand.weight(), importance, default_bits)
                self.searched[(key, default_bits)] = result
                self._compensate_ahead(key, cand, default_bits, result)
                error = result.weighted_error
            else:  # the RTN error only
                result = search_scales(
                    cand.weight(),
                    importance,
                    block_size=opts.block_size,
                    grid=(1.0,),
                    refit_steps=0,
                    bits=default_bits,
                    symmetric=opts.is_symmetric,
                )
                error = result.rtn_weighted_error
            sensitivity[key] = error / max(result.weighted_energy, 1e-30)
        self.seconds["search"] = self.seconds.get("search", 0.0) + time.perf_counter() - start
        if probe is not None:
            start = time.perf_counter()
            sensitivity = self._measured(candidates, sensitivity, default_bits, probe)
            self.seconds["sensitivity"] = self.seconds.get("sensitivity", 0.0) + time.perf_counter() - start

        def size(c: Candidate, bits: int, symmetric: bool = opts.is_symmetric) -> int:
            return quantized_bytes(c.k, c.n, opts.block_size, bits, c.source.dtype.itemsize, symmetric)

        # The budget is growth over the plain symmetric INT4 model (the reference layout): zero points, and the
        # tensors the options already put at 8 bits (lm_head: int8), are paid for out of it first.
        plain = {key: _plain(c, size(c, default_bits, True)) for key, c in candidates.items()}
        sizes = {key: size(c, default_bits) for key, c in candidates.items()}
        extra = {key: size(c, 8) - sizes[key] for key, c in candidates.items()}
        imposed = {key for key, c in candidates.items() if self._imposed(c, key)}
        prepaid = sum(extra[key] for key in imposed) + sum(sizes.values()) - sum(plain.values())
        upgraded = choose_upgrades(
            {k: v for k, v in sensitivity.items() if k not in imposed},
            plain,
            opts.mixed_precision_budget,
            extra,
            fixed_bytes,
            prepaid=prepaid,
        )
        for key in upgraded:
            self.bits[key] = 8
            if self.ahead is not None:
                self.ahead.discard((key, default_bits))
        if upgraded:
            names = ", ".join(sorted(candidates[k].name for k in upgraded))
            added = sum(extra[k] for k in upgraded)
            logger.info("Mixed precision: %d weights at 8 bits (+%.1f MB): %s", len(upgraded), added / 1e6, names)

    def _compensate_ahead(self, key: WeightKey, cand: Candidate, bits: int, search: SearchResult) -> None:
        """Start ``cand``'s compensated rounding at ``bits`` now, beside the searches still to come (see
        :mod:`.compensation_ahead`); not for a weight the options put at 8 bits."""
        if not self.compensates(cand) or self._imposed(cand, key):
            return
        if self.ahead is None:
            self.ahead = CompensationAhead()
        weight = cand.weight
        self.ahead.submit(
            (key, bits), lambda: self._compensate_timed(weight(), cand, bits, search, "compensation beside the search")
        )

    def _probed(self, key: WeightKey, cand: Candidate, bits: int) -> QuantizedWeight:
        """``cand`` at ``bits`` as the write will round it, for the sensitivity probe: compensated where it will be
        (the background's result, waited for and left for the write), else with its searched scales."""
        search = self.searched.get((key, bits))
        if not self.compensates(cand):
            return self._quantize_with(cand.weight(), cand.name, bits, search)
        q = self.ahead.peek((key, bits)) if self.ahead is not None else None
        if q is None:  # not kept beside the search: rounded now (and again by the write)
            q = self._compensate_timed(cand.weight(), cand, bits, search, "compensation for the sensitivity probe")
        return q

    def _imposed(self, candidate: Candidate, key: WeightKey) -> bool:
        """Put at 8 bits by the options (lm_head: int8) and kept there by the budget."""
        return candidate.min_bits >= 8 and self.bits.get(key, 8) >= 8

    def _fit_budget(self, candidates: dict[WeightKey, Candidate], default_bits: int, fixed_bytes: int) -> None:
        """Make the budget a hard cap: zero points that alone exceed it are dropped (the model goes symmetric), then
        imposed 8-bit tensors (an lm_head at int8) that do not fit are kept at ``default_bits``; the log says so."""
        opts = self.options

        def size(c: Candidate, bits: int, symmetric: bool) -> int:
            return quantized_bytes(c.k, c.n, opts.block_size, bits, c.source.dtype.itemsize, symmetric)

        plain = sum(_plain(c, size(c, default_bits, True)) for c in candidates.values())
        allowance = (opts.mixed_precision_budget or 0.0) * (plain + fixed_bytes)
        spent = sum(size(c, default_bits, opts.is_symmetric) for c in candidates.values()) - plain
        if not opts.is_symmetric and spent > allowance:
            logger.warning(
                "Budget: zero points alone add %.2f MB, more than the %.2f MB allowed (+%.1f %%): quantizing"
                " symmetric instead",
                spent / 1e6,
                allowance / 1e6,
                100 * (opts.mixed_precision_budget or 0.0),
            )
            self.options = opts = dataclasses.replace(opts, is_symmetric=True)
            spent = sum(size(c, default_bits, True) for c in candidates.values()) - plain
        if spent > allowance:  # only rotation's extra MatMul is left: it cannot go, the function needs it
            logger.warning(
                "Budget: the MatMul rotation='residual' adds before the tied lm_head alone takes %.2f MB, more than"
                " the %.2f MB allowed (+%.1f %%): the model exceeds its budget by the difference",
                spent / 1e6,
                allowance / 1e6,
                100 * (opts.mixed_precision_budget or 0.0),
            )
        imposed = sorted(
            (key for key, c in candidates.items() if c.min_bits >= 8),
            key=lambda k: size(candidates[k], 8, opts.is_symmetric),
        )
        for key in imposed:  # the smallest first: keep as many imposed 8-bit tensors as fit
            c = candidates[key]
            extra = size(c, 8, opts.is_symmetric) - size(c, default_bits, opts.is_symmetric)
            if spent + extra <= allowance:
                spent += extra
                continue
            self.bits[key] = default_bits
            logger.warning(
                "Budget: %s at 8 bits would add %.2f MB, more than the %.2f MB left of the budget (+%.1f %%): kept"
                " at %d bits",
                c.name,
                extra / 1e6,
                max(allowance - spent, 0.0) / 1e6,
                100 * (opts.mixed_precision_budget or 0.0),
                default_bits,
            )

    def _measured(
        self, candidates: dict[WeightKey, Candidate], relative: dict[WeightKey, float], bits: int, probe: ImpactProbe
    ) -> dict[WeightKey, float]:
        """Each layer's measured KL, shared among its weights in proportion to their relative errors."""

        def replacement(key: WeightKey) -> tuple[str, np.ndarray]:
            cand = candidates[key]
            q = self._probed(key, cand, bits)
            return cand.name, dequantize_blockwise(q, cand.source.dtype.numpy(), transposed=cand.transposed)

        groups = group_by_layer({k: c.nodes for k, c in candidates.items()}, {k: c.name for k, c in candidates.items()})
        # Weights the options already put at 8 bits are not ranked: probing them (a 7B lm_head: 1 GB) buys nothing.
        imposed = {g for g, keys in groups.items() if all(self._imposed(candidates[k], k) for k in keys)}
        if imposed:
            logger.info("Measured sensitivity: not probing %s (already at 8 bits)", ", ".join(sorted(imposed)))
        groups_all, groups = groups, {g: keys for g, keys in groups.items() if g not in imposed}
        if hasattr(probe, "measure"):  # the layer-by-layer probe measures every group in one sweep
            kl = probe.measure(groups, {k: c.name for k, c in candidates.items()}, replacement)
        else:
            kl = measure_groups(probe, groups, replacement)
        worst = sorted(kl.items(), key=lambda kv: -kv[1])[:5]
        logger.info("Measured KL by group (largest): %s", ", ".join(f"{g} {v:.2e}" for g, v in worst))
        self.group_kl = kl
        sensitivity = {k: 0.0 for g in imposed for k in groups_all[g]}
        for group, keys in groups.items():
            total = sum(relative[k] for k in keys)
            for k in keys:
                sensitivity[k] = kl[group] * (relative[k] / total if total > 0 else 1.0 / len(keys))
        return sensitivity


def choose_upgrades(
    sensitivity: dict,
    sizes: dict,
    budget: float | None,
    extra: dict | None = None,
    fixed_bytes: int = 0,
    *,
    prepaid: float = 0.0,
) -> list:
    """Greedy knapsack: highest relative error per extra byte first, while the extra bytes fit the budget.

    ``sizes``: each tensor's bytes in the plain model the budget is relative to; ``extra``: what 8 bits add to
    it (default: as many bytes again); ``budget``: the allowed growth of the model, whose bytes are ``sizes`` plus
    ``fixed_bytes`` (0.15 = 15 %);
    ``prepaid``: growth already spent (tensors the options put at 8 bits).
    """
    if not budget:
        return []
    extra = extra if extra is not None else dict(sizes)
    allowance = budget * (sum(sizes.values()) + fixed_bytes)
    chosen, spent = [], float(prepaid)
    if spent > allowance:
        logger.info("Mixed precision: zero points and imposed 8-bit tensors already exceed the budget")
    for key in sorted(sensitivity, key=lambda k: sensitivity[k] / max(extra[k], 1), reverse=True):
        if extra[key] > 0 and spent + extra[key] <= allowance:
            chosen.append(key)
            spent += extra[key]
    return chosen


def _sample_columns(n: int) -> np.ndarray:
    """Evenly spaced output channels on which the error is measured."""
    return np.unique(np.linspace(0, n - 1, min(_ERROR_SAMPLE_ROWS, n)).astype(int))


def _error_stats(
    cols: np.ndarray,
    w: np.ndarray,
    q: QuantizedWeight,
    importance: np.ndarray | None,
    output_error: Callable[[np.ndarray, np.ndarray], tuple[float, float]] | None = None,
) -> dict:
    """Relative error of the dequantized weight (and importance-weighted) on output channels ``cols``; with
    ``output_error(e, w)`` (the MatMul output's squared error and energy on the calibration inputs), also the
    relative error of the MatMul's output.

    ``w`` is the float weight's float32 ``W[:, cols]``.
    """
    sample = QuantizedWeight(
        q.packed[cols],
        q.scales[cols],
        None if q.zero_points is None else q.zero_points[cols],
        q.k,
        len(cols),
        q.block_size,
        q.bits,
    )
    e = dequantize_blockwise(sample) - w
    diff2 = e**2
    stats = {"relative_error": float(np.sqrt(diff2.sum() / max(float((w**2).sum()), 1e-30)))}
    if importance is not None:
        imp = np.asarray(importance, np.float32)[:, None]
        stats["weighted_relative_error"] = float(np.sqrt((imp * diff2).sum() / max(float((imp * w**2).sum()), 1e-30)))
    if output_error is not None:
        error, energy = output_error(e, w)
        stats["output_relative_error"] = float(np.sqrt(max(error, 0.0) / max(energy, 1e-30)))
    return stats


def _plain(candidate: Candidate, plain_bytes: int) -> int:
    """``candidate``'s bytes in the plain INT4 model budgets are relative to: none for the MatMul rotation adds."""
    return 0 if candidate.name == ROTATION_MIX_WEIGHT else plain_bytes
