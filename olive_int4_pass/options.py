"""The option schema: every quantization option declared once, with its type, default, choices and help.

:class:`QuantizeOptions` is the one place an option is written. The Olive pass's parameters
(:mod:`olive_int4_pass.olive.quantize_pass`), the ``olive-int4 quantize`` arguments (:mod:`olive_int4_pass.cli`)
and the options table in ``docs/options.md`` (:func:`markdown_table`) are all derived from its fields.

An option left at ``None`` is *unset*: a ``quality`` preset fills it, else it takes the documented default. An
option set explicitly always wins over the preset.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import typing
from collections.abc import Sequence
from typing import Any

from olive_int4_pass.kernels.rtn import validate_bits, validate_block_size

LM_HEAD_CHOICES = ("quantize", "int8", "float")
EMBEDDING_CHOICES = ("float", "int4", "int8")
SENSITIVITY_CHOICES = ("error", "measured")
ROUNDING_CHOICES = ("nearest", "compensated", "auto")
ROTATION_CHOICES = ("none", "residual")
# Compensated rounding estimates each MatMul input's K x K second moments: fewer tokens than this leave them too
# rank-deficient to be worth inverting (GPTQ's own default is 128 samples x 2,048 tokens).
MIN_COMPENSATION_TOKENS = 256
# rounding='auto' compensates from this many calibration tokens on: with 4,096 it measured better or equal under both
# presets on both real models, with the built-in 2,048 it made one model worse (docs/results.md).
AUTO_COMPENSATION_TOKENS = 4096
# calibration_tokens when unset. A quality preset calibrating on the user's own text (a file or an Olive data_config)
# takes up to PRESET_OWN_TEXT_TOKENS: 16,384 beat 4,096 under both presets on Qwen2.5-1.5B (its 8,960-wide inputs)
# and equalled it on SmolLM2-135M (docs/results.md);
# the built-in text has about 2,500.
DEFAULT_CALIBRATION_TOKENS = 2048
PRESET_OWN_TEXT_TOKENS = 16384
# compensation_damping when unset, per input: the damping stands in for what too few tokens leave unknown of H. With
# 1-4 calibration tokens per compensated input channel 0.1 beat 0.01 on both real models; with 21-28 (SmolLM2-135M,
# 16,384 tokens) 0.01 beat 0.1 under every setting, and with 16 (Qwen2.5-1.5B, runs of 1,024) they were equal
# (docs/results.md).
DAMPING = 0.1
LOW_DAMPING = 0.01
LOW_DAMPING_TOKENS_PER_CHANNEL = 16
# Named quality presets: option values applied where the user left the option unset. Both calibrate on the built-in
# text by default; the budget is the whole model's growth over plain INT4, an lm_head at 8 bits included. Measured
# on a real 1.5B model: docs/results.md.
QUALITY_PRESETS: dict[str, dict[str, Any]] = {
    "balanced": {
        "scale_search": True,
        "mixed_precision_budget": 0.03,
        "sensitivity": "error",
        "is_symmetric": False,
        "rounding": "auto",
        "compensation_span": 1024,
    },
    "max": {
        "scale_search": True,
        "mixed_precision_budget": 0.135,
        "lm_head": "int8",
        "sensitivity": "measured",
        "sensitivity_depth": 8,
        "is_symmetric": False,
        "rounding": "auto",
        "compensation_span": 1024,
    },
}
# What an unset option resolves to when no preset sets it.
_UNSET_DEFAULTS = {
    "is_symmetric": True,
    "lm_head": "quantize",
    "scale_search": False,
    "sensitivity": "error",
    "sensitivity_depth": 0,
    "rounding": "nearest",
}
DEFAULT_CALIBRATION = "default"


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    flags: Sequence[str] | None = None,
    shown_default: str | None = None,
) -> Any:
    """A :class:`QuantizeOptions` field and its documentation.

    ``flags``: command-line spellings when the derived ``--field-name`` does not fit (a boolean takes two: the
    true and the false spelling; a list takes one, repeated). ``shown_default``: the default as the docs state it,
    for options whose ``None`` means "from the preset, else ...".
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flags": flags}
    metadata["shown_default"] = shown_default
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how. The defaults give the onnxruntime-genai builder's ``-p int4`` bytes."""

    block_size: int = option(
        32,
        "Values per quantization block along K: a power of two from 16 to 256 (the range onnxruntime's MatMulNBits"
        " kernel runs). K that is not a multiple is padded as onnxruntime does.",
        choices=(16, 32, 64, 128, 256),
    )
    bits: int = option(4, "Bits per weight: 4, or 8 (MatMulNBits bits=8).", choices=(4, 8))
    is_symmetric: bool | None = option(
        None,
        "Symmetric: signed scale = value of largest magnitude / -8, levels stored +8, no zero points (the"
        " reference's layout). Asymmetric (false): uint4 with packed zero points. Unset: symmetric, or what the"
        " quality preset says (asymmetric for both presets).",
        flags=("--symmetric", "--asymmetric"),
        shown_default="symmetric",
    )
    accuracy_level: int | None = option(
        None,
        "MatMulNBits accuracy_level attribute. Unset omits it, as the builder does for CUDA; 4 (int8 compute) is what"
        " the builder writes for CPU.",
        choices=(0, 1, 2, 3, 4),
    )
    nodes_to_include: Sequence[str] | None = option(
        None, "Only quantize nodes whose name matches one of these exact names or glob patterns.", flags=("--include",)
    )
    nodes_to_exclude: Sequence[str] | None = option(
        None, "Never quantize nodes whose name matches one of these exact names or glob patterns.", flags=("--exclude",)
    )
    lm_head: str | None = option(
        None,
        "The final projection (a MatMul/Gemm producing a graph output): 'quantize' like every other MatMul, 'int8'"
        " at 8 bits, or 'float' left unquantized. Unset: 'quantize', or 'int8' under quality 'max'.",
        choices=LM_HEAD_CHOICES,
        shown_default="quantize",
    )
    fuse_bias: bool = option(
        False,
        "Fold Add(MatMul(X, W), b) into MatMulNBits' bias input. Off by default: the builder keeps the Add, and not"
        " every execution provider's MatMulNBits takes a bias (the CPU one is verified).",
    )
    tied_embeddings: bool = option(
        True,
        "When the embedding Gather reads Transpose(W) of the quantized lm_head weight W (tied embeddings), feed it the"
        " same packed tensor through GatherBlockQuantized, as the builder does, instead of keeping a float copy.",
    )
    embedding: str = option(
        "float",
        "An embedding table not shared with a quantized lm_head: 'float' (the published layout), 'int4' or 'int8'"
        " (GatherBlockQuantized).",
        choices=EMBEDDING_CHOICES,
    )
    quality: str | None = option(
        None,
        "Opt-in quality preset. 'balanced': calibrated importance-weighted scale search, asymmetric, 8-bit tensors"
        " where they cost the most, the model at most +3 % bytes over plain INT4. 'max': the same with the lm_head"
        " at 8 bits and the 8-bit weights ranked by measured sensitivity (sensitivity_depth 8), at most +13.5 %."
        f" Both round with rounding 'auto' (compensated from {AUTO_COMPENSATION_TOKENS:,} calibration tokens on)."
        " Unset: plain RTN, byte-identical to the reference. Options set explicitly override the preset.",
        choices=tuple(QUALITY_PRESETS),
    )
    calibration: str | None = option(
        None,
        "Calibration text file, or 'default' (built in: 2,048 tokens of prose and Python code), run through the float"
        " model to weigh each MatMul input channel by its E[x^2]. Needs tokenizer.json and genai_config.json beside"
        " the model. Unset: 'default' under a quality preset, else no calibration.",
    )
    calibration_tokens: int | None = option(
        None,
        "At most this many calibration tokens are used (at least 16). Unset: 2,048, or 16,384 under a quality preset"
        " that calibrates on your own text (a file or an Olive data_config): more tokens measured better under both"
        " presets, at a calibration time that grows with them.",
        shown_default="2,048 (16,384: preset, own text)",
    )
    scale_search: bool | None = option(
        None,
        "Search each block's scale (and clip) for the least importance-weighted error; rounding stays to nearest."
        " Symmetric: shrunk ranges and the flipped sign, the winner refitted by least squares; asymmetric: the range"
        " over 12-16 steps, each refitted. Unset: off, or on under a quality preset.",
        shown_default="off",
    )
    mixed_precision_budget: float | None = option(
        None,
        "Allowed growth of the whole model's weights over plain symmetric INT4 (0.03 = +3 %), spent on 8-bit tensors"
        " with the largest measured error per byte; zero points and an lm_head at int8 are paid for first.",
    )
    sensitivity: str | None = option(
        None,
        "How mixed precision ranks weights: 'error' = each weight's importance-weighted relative error; 'measured' ="
        " each transformer layer's KL at the logits with that layer quantized as it will be written (compensated, when"
        " compensating), measured on the float model and shared among its weights by relative error. Unset: 'error',"
        " or the preset's.",
        choices=SENSITIVITY_CHOICES,
        shown_default="error",
    )
    sensitivity_tokens: int = option(256, "Calibration tokens each 'measured' sensitivity run scores (at least 16).")
    sensitivity_depth: int | None = option(
        None,
        "Layers each 'measured' sensitivity probe runs exactly after its own start and again before the logits; in"
        " between, its change to the residual stream is carried, scaled with the stream's size, so the probes' cost"
        " grows linearly with the model's depth instead of quadratically. 0: every probe runs through every later"
        " layer. Unset: the preset's, else 0.",
        shown_default="0",
    )
    rounding: str | None = option(
        None,
        "'nearest': every value to its nearest level (the reference). 'compensated': error-compensated rounding"
        " (GPTQ): each input row's rounding error is pushed onto the rows not yet rounded, through the inverse of the"
        " input's second moments E[x x^T] from calibration; the same format and size. Needs calibration (at least"
        f" {MIN_COMPENSATION_TOKENS} tokens) and temporary disk for the calibration inputs (with compensation_span:"
        " for their blocks of E[x x^T], 4 KB per input channel whatever the tokens). 'auto': compensated when"
        f" calibration gives at least {AUTO_COMPENSATION_TOKENS:,} tokens and the temporary disk holds what it keeps,"
        " else nearest; the log says which. Unset: 'nearest', or 'auto' under a quality preset.",
        choices=ROUNDING_CHOICES,
        shown_default="nearest",
    )
    compensation_damping: float | None = option(
        None,
        "Compensated rounding: added to E[x x^T]'s diagonal as a fraction of its mean (GPTQ's percdamp), raised"
        " tenfold while the matrix is singular. Unset: per input, 0.01 when calibration gives at least"
        f" {LOW_DAMPING_TOKENS_PER_CHANNEL} tokens per input channel compensated together (the weight's K, or its"
        f" compensation_span runs), else 0.1: with few tokens per channel 0.1 measured better on both real models,"
        " with many 0.01 (docs/results.md).",
        shown_default=f"0.1 (0.01 from {LOW_DAMPING_TOKENS_PER_CHANNEL} tokens per channel)",
    )
    act_order: bool = option(
        True,
        "Compensated rounding: round input rows in decreasing E[x_k^2] (GPTQ's act-order). The 32-value blocks stay"
        " as stored, their scales fixed from the float weight first. On by default: it measured better on real"
        " models (docs/quality.md).",
    )
    compensation_max_inputs: int | None = option(
        None,
        "Compensated rounding: weights with more input channels (K) than this are rounded to nearest. The inverse of"
        " E[x x^T] costs K^3: about 4 min on 2 cores for a 7B down projection's 18,944 inputs, against seconds"
        " for K = 3,584 (compensation_span is the cheaper way to bound it). Unset: every weight is compensated.",
    )
    compensation_span: int | None = option(
        None,
        "Compensated rounding: at most this many input channels are compensated together. A weight with more is"
        " split into equal runs of whole blocks, each rounded against its own diagonal block of E[x x^T] (no error"
        " passes between runs): the updates cost K x span x N instead of K^2 x N, the inverse K x span^2 instead of"
        " K^3. Calibration then keeps only those blocks (K x span floats) instead of the inputs, so more"
        " calibration tokens need no more disk. Unset: the whole weight at once, or 1,024 under a quality preset.",
        shown_default="whole weight",
    )
    compensation_block_rows: int = option(
        128, "Compensated rounding: rows rounded between two updates of the rest (a multiple of block_size)."
    )
    compensation_sweeps: int = option(
        0,
        "Compensated rounding: coordinate-descent sweeps over the levels after GPTQ. Each visits every input row and"
        " moves each of its levels one step where that lowers the output error under the same damped E[x x^T] (GPTQ"
        " decides a row once, against the rows not rounded yet). The same format and size; each sweep costs about"
        " what GPTQ's updates cost. 0: GPTQ's levels as they are.",
    )
    rotation: str = option(
        "none",
        "'residual': before quantizing, rotate the decoder's residual stream by a seeded random orthogonal matrix"
        " (random signs, a random orthogonal factor and a Walsh-Hadamard transform) folded into the weights: the RMS"
        " norms' weights move into the MatMuls they feed, readers become Q^T W, writers and the embedding W Q. The"
        " float model computes the same function; outliers are spread over every block. For rounding='compensated':"
        " it measured better on SmolLM2-135M and worse on Qwen2.5-Coder-1.5B (docs/quality.md), so no preset uses"
        " it; check it on your model with olive-int4 compare. A tied embedding stays tied, with one extra hidden x"
        " hidden MatMul before the lm_head (paid from a size budget). Needs a genai-builder decoder with RMS norms;"
        " the rotated float model is written to the temporary disk first. 'none': the weights as they are.",
        choices=ROTATION_CHOICES,
    )
    rotation_seed: int = option(0, "The seed of rotation='residual''s random matrix.")

    def __post_init__(self) -> None:
        _check_types(self)
        validate_block_size(self.block_size)
        validate_bits(self.bits)
        for field in fields():
            choices = field.metadata["choices"]
            value = getattr(self, field.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{field.name} must be one of {list(choices)} or unset, got {value!r}")
        self._resolve_quality()
        for field in ("nodes_to_include", "nodes_to_exclude"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, tuple(value))

    def _resolve_quality(self) -> None:
        preset = QUALITY_PRESETS.get(self.quality, {}) if self.quality else {}
        for name, value in {**_UNSET_DEFAULTS, **preset}.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.quality and self.calibration is None:
            object.__setattr__(self, "calibration", DEFAULT_CALIBRATION)
        if self.calibration_tokens is None:
            own_text = self.quality and self.calibration not in (None, DEFAULT_CALIBRATION)
            object.__setattr__(
                self, "calibration_tokens", PRESET_OWN_TEXT_TOKENS if own_text else DEFAULT_CALIBRATION_TOKENS
            )
        budget = self.mixed_precision_budget
        if budget is not None and not (math.isfinite(budget) and budget >= 0):
            raise ValueError(f"mixed_precision_budget must be a finite fraction >= 0 (0.15 = +15 %), got {budget!r}")
        if (self.scale_search or budget) and self.calibration is None:
            raise ValueError("scale_search and mixed_precision_budget need calibration (a text file or 'default')")
        for name in ("calibration_tokens", "sensitivity_tokens"):
            if getattr(self, name) < 16:
                raise ValueError(f"{name} must be >= 16, got {getattr(self, name)}")
        if self.sensitivity_depth < 0:
            raise ValueError(f"sensitivity_depth must be a number of layers >= 0, got {self.sensitivity_depth}")
        if self.rounding in ("compensated", "auto") and self.calibration is None:
            raise ValueError(f"rounding={self.rounding!r} needs calibration (a text file or 'default')")
        if self.rounding == "compensated" and self.calibration_tokens < MIN_COMPENSATION_TOKENS:
            raise ValueError(
                f"rounding='compensated' needs at least {MIN_COMPENSATION_TOKENS} calibration tokens,"
                f" calibration_tokens is {self.calibration_tokens}"
            )
        damping = self.compensation_damping
        if damping is not None and not (math.isfinite(damping) and 0 < damping <= 1):
            raise ValueError(f"compensation_damping must be in (0, 1], got {damping!r}")
        cap = self.compensation_max_inputs
        if cap is not None and cap < 1:
            raise ValueError(f"compensation_max_inputs must be a positive number of input channels, got {cap}")
        span = self.compensation_span
        if span is not None and (span < self.block_size or span % self.block_size):
            raise ValueError(f"compensation_span must be a multiple of block_size ({self.block_size}), got {span}")
        if self.compensation_sweeps < 0:
            raise ValueError(f"compensation_sweeps must be at least 0, got {self.compensation_sweeps}")
        rows = self.compensation_block_rows
        if rows < self.block_size or rows % self.block_size:
            raise ValueError(
                f"compensation_block_rows must be a multiple of block_size ({self.block_size}), got {rows}"
            )
        if self.sensitivity == "measured" and not budget:
            raise ValueError("sensitivity='measured' ranks weights for mixed precision: set mixed_precision_budget")

    @classmethod
    def from_mapping(cls, values: typing.Mapping[str, Any]) -> QuantizeOptions:
        """Options from any mapping or object holding (at least) the option names, e.g. an Olive pass config."""
        get = values.get if isinstance(values, typing.Mapping) else lambda name, default: getattr(values, name, default)
        return cls(**{f.name: get(f.name, f.default) for f in fields()})

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def damping_for(self, tokens: int, channels: int) -> float:
        """The damping of an input compensated in runs of at most ``channels`` input channels from ``tokens``
        calibration tokens: the option when set, else the rule documented at ``compensation_damping``."""
        if self.compensation_damping is not None:
            return self.compensation_damping
        return LOW_DAMPING if tokens >= LOW_DAMPING_TOKENS_PER_CHANNEL * channels else DAMPING

    def selects(self, node_name: str) -> tuple[bool, str]:
        """Whether the user's include/exclude lists let ``node_name`` be quantized, and why not."""
        if self.nodes_to_exclude and _matches(node_name, self.nodes_to_exclude):
            return False, "excluded by nodes_to_exclude"
        if self.nodes_to_include and not _matches(node_name, self.nodes_to_include):
            return False, "not in nodes_to_include"
        return True, ""


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(QuantizeOptions)


def value_type(field: dataclasses.Field) -> type:
    """The field's value type without ``None``: ``int``, ``bool``, ``float``, ``str`` or ``list`` (of str)."""
    hint = typing.get_type_hints(QuantizeOptions)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(args[0]) or args[0]
    return list if base in (Sequence, list, tuple) else base


def cli_flags(field: dataclasses.Field) -> tuple[str, ...]:
    """The command-line spelling(s): ``--block-size``; a boolean's true and false flags."""
    if field.metadata["flags"]:
        return tuple(field.metadata["flags"])
    flag = "--" + field.name.replace("_", "-")
    if value_type(field) is bool:
        return (flag, "--no-" + field.name.replace("_", "-"))
    return (flag,)


def shown_default(field: dataclasses.Field) -> str:
    if field.metadata["shown_default"]:
        return field.metadata["shown_default"]
    if field.default is None:
        return "unset"
    return str(field.default).lower() if isinstance(field.default, bool) else str(field.default)


def markdown_table() -> str:
    """The options table of ``docs/options.md``: option, command-line flag, default, choices, meaning."""
    rows = ["| option | command line | default | values | meaning |", "|---|---|---|---|---|"]
    for field in fields():
        kind = value_type(field)
        choices = field.metadata["choices"]
        if choices:
            values = ", ".join(f"`{c}`" for c in choices)
        else:
            values = {bool: "true / false", list: "list of names or globs", float: "number", int: "integer"}.get(
                kind, "text"
            )
        flags = " / ".join(f"`{f}`" for f in cli_flags(field))
        help_text = field.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{field.name}` | {flags} | {shown_default(field)} | {values} | {help_text} |")
    return "\n".join(rows) + "\n"


def _check_types(options: QuantizeOptions) -> None:
    for field in fields():
        value = getattr(options, field.name)
        if value is None:
            continue
        kind = value_type(field)
        if kind is list:
            ok = (
                not isinstance(value, (str, bytes))
                and isinstance(value, Sequence)
                and all(isinstance(v, str) for v in value)
            )
            what = "a list of node names or glob patterns"
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            what = "a number"
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            what = "an int"
        else:
            ok = isinstance(value, kind)
            what = f"a {kind.__name__}"
        if not ok:
            raise TypeError(f"{field.name} must be {what}, got {value!r}")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


TABLE_BEGIN = "<!-- options table: generated by `python -m olive_int4_pass.options docs/options.md`; do not edit -->"
TABLE_END = "<!-- end of options table -->"


def render_docs(text: str) -> str:
    """``text`` (docs/options.md) with the generated tables between the markers replaced by fresh ones."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError("the options page lacks the generated-table markers")
    from olive_int4_pass.olive.quantize_pass import olive_only_table  # imports Olive: only for the docs

    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    tables = f"{markdown_table()}\nOnly in Olive workflows (the Olive pass's own parameters):\n\n{olive_only_table()}"
    return f"{head}{TABLE_BEGIN}\n{tables}{TABLE_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    page = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/options.md")
    page.write_text(render_docs(page.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {page}")
