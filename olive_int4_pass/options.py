"""User-facing quantization options, validated once and shared by the rewrite rules, the CLI and the Olive pass."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

from olive_int4_pass.kernels.rtn import validate_bits, validate_block_size

LM_HEAD_CHOICES = ("quantize", "int8", "float")
EMBEDDING_CHOICES = ("float", "int4", "int8")
SENSITIVITY_CHOICES = ("error", "measured")
# Named quality presets: option values applied where the user left the option unset. Both calibrate on the built-in
# text by default; the budget is the whole model's growth over plain INT4, an lm_head at 8 bits included. Measured
# on a real 1.5B model (README, 9,955 tokens): see "Measured on a real model".
QUALITY_PRESETS = {
    "balanced": {"scale_search": True, "mixed_precision_budget": 0.03, "sensitivity": "error", "is_symmetric": False},
    "max": {
        "scale_search": True,
        "mixed_precision_budget": 0.135,
        "lm_head": "int8",
        "sensitivity": "measured",
        "is_symmetric": False,
    },
}


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how.

    ``lm_head`` decides the final projection (a MatMul/Gemm whose output is a graph output): ``quantize`` like
    every other MatMul, ``int8`` at 8 bits, or ``float`` to leave it untouched. ``fuse_bias`` folds
    ``Add(MatMul(X, W), b)`` into MatMulNBits' bias input; it is off by default because the genai builder keeps
    the Add (same graph as the reference) and not every execution provider's MatMulNBits takes a bias.

    ``tied_embeddings``: when the embedding ``Gather`` reads ``Transpose(W)`` of a quantized lm_head weight ``W``,
    feed it the same packed tensor through ``GatherBlockQuantized`` (the builder's layout) instead of keeping a
    float copy. ``embedding`` quantizes an untied (or float-lm_head) embedding table itself: ``float`` (default,
    the published layout), ``int4`` or ``int8``.

    Quality (opt-in; the default output stays byte-identical to the reference RTN): ``calibration`` is a text
    file (or ``"default"``, a built-in passage) run through the float model to measure each MatMul input's
    per-channel second moment; ``scale_search`` picks each block's scale (and clip) to minimise the error weighted
    by those moments; ``mixed_precision_budget`` lets the whole model grow by that fraction (0.15 = +15 %) to store
    the tensors with the largest error per byte at 8 bits, ranked by ``sensitivity``: ``error`` (each weight's
    importance-weighted relative error) or ``measured`` (each layer's KL at the logits on the float model, see
    :mod:`olive_int4_pass.plan.sensitivity`). ``quality`` names a preset of these (see ``QUALITY_PRESETS``):
    ``balanced`` (asymmetric, search, +3 % in all) or ``max`` (asymmetric, search, the lm_head at 8 bits, measured
    sensitivity, +13.5 % in all); explicit options override the preset (``max`` leaves an ``lm_head`` of
    ``float`` or ``int8`` as it is, ``is_symmetric=True`` stays symmetric).
    """

    block_size: int = 32
    bits: int = 4
    is_symmetric: bool | None = None  # True unless a preset says otherwise
    accuracy_level: int | None = None
    nodes_to_include: Sequence[str] | None = None
    nodes_to_exclude: Sequence[str] | None = None
    lm_head: str = "quantize"
    fuse_bias: bool = False
    tied_embeddings: bool = True
    embedding: str = "float"
    quality: str | None = None
    calibration: str | None = None
    calibration_tokens: int = 2048
    scale_search: bool | None = None
    mixed_precision_budget: float | None = None
    sensitivity: str | None = None  # "error" unless a preset says otherwise
    sensitivity_tokens: int = 256

    def __post_init__(self) -> None:
        validate_block_size(self.block_size)
        validate_bits(self.bits)
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4 or unset, got {self.accuracy_level!r}")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise ValueError(f"lm_head must be one of {LM_HEAD_CHOICES}, got {self.lm_head!r}")
        if self.embedding not in EMBEDDING_CHOICES:
            raise ValueError(f"embedding must be one of {EMBEDDING_CHOICES}, got {self.embedding!r}")
        self._resolve_quality()
        if not isinstance(self.is_symmetric, bool):
            raise TypeError(f"is_symmetric must be a bool, got {self.is_symmetric!r}")
        for field in ("nodes_to_include", "nodes_to_exclude"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{field} must be a list of node names or glob patterns, got {value!r}")
            object.__setattr__(self, field, tuple(value))

    def _resolve_quality(self) -> None:
        if self.quality is not None:
            if self.quality not in QUALITY_PRESETS:
                raise ValueError(f"quality must be one of {sorted(QUALITY_PRESETS)} or unset, got {self.quality!r}")
            for field, value in QUALITY_PRESETS[self.quality].items():
                unset = "quantize" if field == "lm_head" else None  # an explicit lm_head int8/float stays
                if getattr(self, field) == unset:
                    object.__setattr__(self, field, value)
            if self.calibration is None:
                object.__setattr__(self, "calibration", "default")
        object.__setattr__(self, "scale_search", bool(self.scale_search))
        if self.sensitivity is None:
            object.__setattr__(self, "sensitivity", "error")
        if self.is_symmetric is None:
            object.__setattr__(self, "is_symmetric", True)
        budget = self.mixed_precision_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
            raise ValueError(f"mixed_precision_budget must be a fraction >= 0 (0.15 = +15 %), got {budget!r}")
        if (self.scale_search or budget) and self.calibration is None:
            raise ValueError("scale_search and mixed_precision_budget need calibration (a text file or 'default')")
        if self.sensitivity not in SENSITIVITY_CHOICES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_CHOICES}, got {self.sensitivity!r}")
        if isinstance(self.sensitivity_tokens, bool) or not isinstance(self.sensitivity_tokens, int):
            raise TypeError(f"sensitivity_tokens must be an int, got {self.sensitivity_tokens!r}")
        if self.sensitivity_tokens < 16:
            raise ValueError(f"sensitivity_tokens must be >= 16, got {self.sensitivity_tokens}")
        if self.sensitivity == "measured" and not budget:
            raise ValueError("sensitivity='measured' ranks weights for mixed precision: set mixed_precision_budget")
        if self.calibration_tokens < 16:
            raise ValueError(f"calibration_tokens must be >= 16, got {self.calibration_tokens}")

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def selects(self, node_name: str) -> tuple[bool, str]:
        """Whether the user's include/exclude lists let ``node_name`` be quantized, and why not."""
        if self.nodes_to_exclude and _matches(node_name, self.nodes_to_exclude):
            return False, "excluded by nodes_to_exclude"
        if self.nodes_to_include and not _matches(node_name, self.nodes_to_include):
            return False, "not in nodes_to_include"
        return True, ""


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)
