"""``olive-int4 compare``: build or reuse FP32 / FP16 / INT8 / INT4 variants of a model; report size, speed, accuracy.

Accuracy (onnxruntime, CPU): perplexity over independent windows of a text, and KL divergence / top-1 agreement of
every position's next-token distribution against the best-precision variant. Speed and peak memory
(onnxruntime-genai, CPU, one process per variant): prefill and decode tokens per second, median of several runs.
Outputs: ``report.md`` (table), ``report.png`` (figure), ``report.json`` (raw numbers) in the output folder.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from olive_int4_pass.compare.metrics import perplexity_change
from olive_int4_pass.compare.report import VariantResult, markdown, plot, write_json
from olive_int4_pass.compare.variants import (
    QUANTIZED_PRESETS,
    Variant,
    build_variants,
    default_reference,
    size_on_disk,
)
from olive_int4_pass.genai.files import GenAIConfig

DEFAULT_TEXT = "default passage (olive_int4_pass/data/default_passage.txt)"


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """How to measure. ``runs=0`` skips the speed / memory measurement."""

    window: int = 1024
    max_tokens: int = 4096
    prompt_tokens: int = 128
    decode_tokens: int = 64
    runs: int = 3

    def __post_init__(self) -> None:
        for name in ("window", "max_tokens", "prompt_tokens", "decode_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        if not isinstance(self.runs, int) or self.runs < 0:
            raise ValueError(f"runs must be an integer >= 0, got {self.runs!r}")


@dataclasses.dataclass
class CompareResult:
    results: list[VariantResult]
    markdown_path: Path
    figure_path: Path
    json_path: Path


def default_text() -> str:
    return importlib.resources.files("olive_int4_pass").joinpath("data/default_passage.txt").read_text("utf-8")


def compare(
    model: str | None,
    output_dir: str | os.PathLike,
    *,
    variants: Sequence[str] | None = None,
    given: Mapping[str, str | os.PathLike] | None = None,
    reference: str | None = None,
    text_file: str | os.PathLike | None = None,
    settings: CompareSettings | None = None,
    presets: Mapping[str, Mapping[str, Any]] = QUANTIZED_PRESETS,
    calibration: str | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> CompareResult:
    """Build/reuse the variants, measure them, and write report.md / report.png / report.json into ``output_dir``.

    ``model``: Hugging Face folder or hub id (``None`` if ``given`` has what is needed). ``variants``: names to
    measure (``None``: fp32, fp16, int8, int4 where they can be had); names in ``presets`` are quantized from the
    FP32 export with those ``QuantizeOptions``. ``given``: name -> existing package / ONNX folder to use as is.
    """
    from tqdm.auto import tqdm

    from olive_int4_pass.compare.scoring import ReferenceStore, score_model, token_windows
    from olive_int4_pass.compare.speed import measure_speed
    from olive_int4_pass.genai.decoder import tokenize

    settings = settings or CompareSettings()
    output_dir = Path(output_dir)
    text, text_name = load_text(text_file)
    work = Path(work_dir) if work_dir is not None else output_dir / "variants"
    built = build_variants(
        model, variants, work, given=given, presets=presets, calibration=calibration, progress=progress
    )
    ref = _pick_reference(built, reference)

    context = GenAIConfig.read(ref.package_dir).context_length
    window = min(settings.window, context) if context else settings.window
    windows = token_windows(tokenize(text, ref.package_dir), window, settings.max_tokens)
    n_scored = sum(len(w) - 1 for w in windows)
    prompt_len = settings.prompt_tokens
    if context and settings.runs:  # the generation must fit the context (and the KV buffer genai allocates for it)
        if settings.decode_tokens >= context:
            raise ValueError(f"decode_tokens ({settings.decode_tokens}) must be below the context ({context})")
        prompt_len = min(prompt_len, context - settings.decode_tokens)
    prompt = [int(i) for w in windows for i in w][:prompt_len]

    output_dir.mkdir(parents=True, exist_ok=True)
    store = ReferenceStore(windows, output_dir)
    try:
        ordered = [ref] + [v for v in built if v is not ref]  # the reference first: it fills the store
        scores = {}
        for v in tqdm(ordered, desc="accuracy", unit="variant", disable=_disable(progress)):
            scores[v.name] = score_model(
                v.model_file,
                windows,
                store,
                config_dir=v.package_dir,
                write_reference=v is ref,
                progress=progress,
                desc=v.name,
            )
    finally:
        store.close()

    speeds = {}
    if settings.runs:
        for v in tqdm(built, desc="speed", unit="variant", disable=_disable(progress)):
            speeds[v.name] = measure_speed(v.package_dir, prompt, settings.decode_tokens, settings.runs)

    results = [_result(v, v is ref, scores[v.name], speeds.get(v.name), scores[ref.name]) for v in built]
    meta = _meta(model, ref, text_name, windows, window, n_scored, settings, len(prompt))
    md = output_dir / "report.md"
    md.write_text(markdown(results, meta), encoding="utf-8")
    png = plot(output_dir / "report.png", results, title=meta["title"])
    js = write_json(output_dir / "report.json", results, meta)
    return CompareResult(results, md, png, js)


def _pick_reference(variants: Sequence[Variant], name: str | None) -> Variant:
    if name is None:
        return default_reference(variants)
    for v in variants:
        if v.name == name:
            return v
    raise ValueError(f"reference {name!r} is not one of the variants {[v.name for v in variants]}")


def load_text(text_file: str | os.PathLike | None) -> tuple[str, str]:
    """The text to score and a name for it: the file's contents, or the built-in passage for ``None``."""
    if text_file is None:
        return default_text(), DEFAULT_TEXT
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the text file {path}: {e}") from e
    if not text.strip():
        raise ValueError(f"the text file {path} is empty: there is nothing to score")
    return text, str(path)


def _result(variant: Variant, is_ref: bool, totals, speed, ref_totals) -> VariantResult:
    change, two_se = perplexity_change(totals.nll, ref_totals.nll)
    return VariantResult(
        name=variant.name,
        origin=variant.origin,
        size_bytes=size_on_disk(variant.model_file),
        perplexity=totals.perplexity,
        window_perplexities=totals.window_perplexities,
        kl_divergence=totals.kl_divergence,
        top1_agreement=totals.top1_agreement,
        is_reference=is_ref,
        peak_rss_bytes=speed.peak_rss_bytes if speed else None,
        prefill_tokens_per_s=speed.prefill_tokens_per_s if speed else None,
        decode_tokens_per_s=speed.decode_tokens_per_s if speed else None,
        perplexity_change=change,
        perplexity_change_2se=two_se,
    )


def _meta(model, ref, text_name, windows, window, n_scored, settings: CompareSettings, prompt_len: int) -> dict:
    import onnxruntime
    import onnxruntime_genai

    title = f"{Path(model).name if model else ref.package_dir.name}: size, speed and accuracy by precision"
    speed = (
        f"prompt {prompt_len} tokens, {settings.decode_tokens} new tokens, greedy, median of {settings.runs} runs"
        " after one warm-up, CPU"
        if settings.runs
        else "not measured"
    )
    return {
        "title": title,
        "model": model or "(given folders)",
        "text": f"{text_name}: {n_scored} scored positions in {len(windows)} independent window(s) of <= {window}"
        " tokens",
        "reference": f"{ref.name} (KL and top-1 columns compare against it)",
        "speed": speed,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, {platform.system()} {platform.release()}",
        "software": f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}",
    }


def _disable(progress: bool | None) -> bool | None:
    return (not progress) if progress is not None else None
