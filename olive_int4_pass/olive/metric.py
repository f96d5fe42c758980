"""Quality of a model against a reference as an Olive ``type: custom`` metric (``evaluate_func``).

Olive 0.13 calls ``evaluate_func(model, device, execution_providers, **evaluate_func_kwargs)`` and reads the
returned dict by the metric's ``sub_types`` names. It loads ``evaluate_func`` from a ``user_script`` *file*
(``import_module_from_file``), not from a module name, so a recipe points ``user_script`` at a one-line file that
re-exports :func:`evaluate_quality` (``recipes/quality_metric.py``).

Olive 0.13 cannot run *any* ``type: custom`` metric as shipped (pydantic-v2 serialization bugs: the workflow
config fails to serialize, then the metric's ``user_config`` loses ``evaluate_func`` on the way to the evaluator).
:func:`fix_olive_custom_metrics` repairs that in the current process; ``python -m olive_int4_pass.olive.metric
run --config RECIPE`` is ``olive`` with the repair applied.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from olive_int4_pass.compare.variants import onnx_file_of, size_on_disk
from olive_int4_pass.genai.files import GENAI_CONFIG, GenAIConfig

SUB_TYPES = ("perplexity", "kl_divergence", "top1_agreement", "reference_perplexity", "size_bytes")


def evaluate_quality(
    model: Any,
    device: Any = None,
    execution_providers: Any = None,
    *,
    reference: str | os.PathLike,
    text_file: str | os.PathLike | None = None,
    window: int = 1024,
    max_tokens: int = 4096,
) -> dict[str, float]:
    """Perplexity, KL(reference || model) and top-1 agreement of ``model`` on a text, on onnxruntime's CPU provider.

    ``model``: an Olive ONNX model handler (or a composite one, e.g. ``GenAIPackaging``'s output), or a path to a
    package / ONNX folder or ``.onnx`` file. ``reference``: an onnxruntime-genai package folder of the same model at
    higher precision (e.g. the builder's ``-p fp32 -e cpu`` export); its tokenizer tokenizes the text and its
    genai_config.json describes the decoder when ``model`` has none beside it. ``text_file``: UTF-8 text (default:
    the built-in passage ``olive-int4 compare`` uses). ``device`` / ``execution_providers`` are Olive's and unused:
    scoring always runs on CPU. The reference is re-scored on every call.
    """
    from olive_int4_pass.compare.run import load_text
    from olive_int4_pass.compare.scoring import ReferenceStore, score_model, token_windows
    from olive_int4_pass.genai.decoder import tokenize

    ref_dir = Path(reference)
    if not (ref_dir / GENAI_CONFIG).is_file():
        raise ValueError(
            f"reference must be an onnxruntime-genai package folder (with {GENAI_CONFIG}), got {ref_dir}; export"
            " one with: python -m onnxruntime_genai.models.builder -i HF_DIR -o REF_DIR -p fp32 -e cpu"
        )
    if not isinstance(window, int) or not isinstance(max_tokens, int) or window < 2 or max_tokens < 2:
        raise ValueError(f"window and max_tokens must be integers >= 2, got {window!r} and {max_tokens!r}")
    ref_config = GenAIConfig.read(ref_dir)
    model_file = _model_file(model)
    # A bare ONNX model is described by the reference's genai_config.json (same model, other precision).
    config_dir = model_file.parent if (model_file.parent / GENAI_CONFIG).is_file() else ref_dir

    text, _ = load_text(text_file)
    context = ref_config.context_length
    windows = token_windows(tokenize(text, ref_dir), min(window, context) if context else window, max_tokens)
    with tempfile.TemporaryDirectory(prefix="olive-int4-metric.") as scratch:
        store = ReferenceStore(windows, scratch)
        try:
            ref_totals = score_model(
                ref_config.decoder_path, windows, store, config_dir=ref_dir, write_reference=True, progress=False
            )
            totals = score_model(model_file, windows, store, config_dir=config_dir, progress=False)
        finally:
            store.close()
    return {
        "perplexity": totals.perplexity,
        "kl_divergence": totals.kl_divergence,
        "top1_agreement": totals.top1_agreement,
        "reference_perplexity": ref_totals.perplexity,
        "size_bytes": float(size_on_disk(model_file)),
    }


def _model_file(model: Any) -> Path:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_file():
            return path
        if path.is_dir():
            return onnx_file_of(path)
        raise ValueError(f"model {path} does not exist")
    components = getattr(model, "model_components", None)
    if components is not None:  # CompositeModelHandler, e.g. GenAIPackaging's package folder
        onnx_parts = [m for m in components if str(getattr(m, "model_path", "")).endswith(".onnx")]
        if len(onnx_parts) != 1:
            raise ValueError(f"expected one ONNX component in the composite model, found {len(onnx_parts)}")
        return Path(onnx_parts[0].model_path)
    path = getattr(model, "model_path", None)
    if path and str(path).endswith(".onnx") and Path(path).is_file():
        return Path(path)
    raise TypeError(
        f"evaluate_quality scores ONNX decoders; got {type(model).__name__} ({path}). For an Olive workflow whose"
        " input is a Hugging Face model, set evaluate_input_model: false"
    )


def fix_olive_custom_metrics() -> None:
    """Make Olive 0.13's ``type: custom`` metrics work in this process (idempotent; no-op once Olive is fixed).

    Three pydantic-v2 bugs in ``olive.evaluator.metric`` / ``olive.common.config_utils``: ``Metric.backend`` is
    ``None`` for custom metrics and its serializer calls ``None.model_dump()``; so does ``SubMetric.metric_config``'s;
    and fields typed ``ConfigBase`` (the metric's ``user_config``) are dumped as the base class, dropping
    ``user_script`` / ``evaluate_func``, while Olive round-trips its configs through ``model_dump``.

    A fourth shows once the evaluator config is dumped whole (pydantic >= 2.14): Olive's resource finder tries every
    dict with a ``type`` key as a resource path, and the evaluator's ``type: None`` reaches
    ``CaseInsensitiveEnum._missing_``, which calls ``None.lower()`` (an ``AttributeError`` the finder does not
    catch, where a ``ValueError`` means "not a resource"). Non-strings now miss the enum with a ``ValueError``.
    """
    from olive.common.config_utils import CaseInsensitiveEnum, ConfigBase
    from olive.evaluator.metric import Metric, SubMetric

    if getattr(ConfigBase, "_olive_int4_custom_metric_fix", False):
        return

    def serialize_backend(self, backend):
        return backend if backend is None or isinstance(backend, str) else backend.model_dump()

    def serialize_metric_config(self, metric_config):
        return None if metric_config is None else metric_config.model_dump()

    # pydantic compiled the original functions into every schema that nests Metric: swap their code in place.
    Metric.serialize_backend.__code__ = serialize_backend.__code__
    SubMetric.serialize_metric_config.__code__ = serialize_metric_config.__code__
    original_dump = ConfigBase.model_dump

    def model_dump(self, **kwargs):
        kwargs.setdefault("serialize_as_any", True)  # pydantic-v1 behaviour, which Olive's configs were built for
        return original_dump(self, **kwargs)

    ConfigBase.model_dump = model_dump

    missing = CaseInsensitiveEnum._missing_.__func__

    def case_insensitive_missing(cls, value):
        return missing(cls, value) if isinstance(value, str) else None  # None: Enum raises ValueError

    CaseInsensitiveEnum._missing_ = classmethod(case_insensitive_missing)
    ConfigBase._olive_int4_custom_metric_fix = True


def main(argv: list[str] | None = None) -> None:
    """``olive`` (e.g. ``run --config RECIPE``) with :func:`fix_olive_custom_metrics` applied first."""
    fix_olive_custom_metrics()
    from olive.cli.launcher import main as olive_main

    olive_main(argv, called_as_console_script=False)


if __name__ == "__main__":
    main()
