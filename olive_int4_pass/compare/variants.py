"""Build or reuse the variants ``olive-int4 compare`` measures: FP32 / FP16 exports, INT8 / INT4 (and presets).

FP32 = the onnxruntime-genai builder's ``-p fp32 -e cpu``, FP16 = its ``-p fp16 -e cuda`` (run on CPU with the
providers cleared), both through ``GenAIModelExport``'s ``export_hf_model``. INT8 / INT4 / quality presets = our
pass on the FP32 export with ``accuracy_level`` 4 (CPU int8 compute), with the FP32 package's genai_config.json
and tokenizer files beside them. Existing ONNX or package folders can stand for any variant. Built variants are
cached in the work folder under a recipe stamp: a rerun with the same recipe reuses them, a different recipe
rebuilds.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from olive_int4_pass.genai.files import GENAI_CONFIG, GenAIConfig, link_or_copy, publish_folder, read_json, staged

logger = logging.getLogger(__name__)

FLOAT_VARIANTS: dict[str, tuple[str, str]] = {"fp32": ("fp32", "cpu"), "fp16": ("fp16", "cuda")}
# Variant name -> QuantizeOptions keyword arguments, applied to the FP32 export. A parameter of build_variants, so
# presets the core grows (QuantizeOptions(quality=...)) or a user's own are picked up by name.
QUANTIZED_PRESETS: dict[str, dict[str, Any]] = {
    "int8": {"bits": 8, "accuracy_level": 4},
    "int4": {"accuracy_level": 4},
    "int4-search": {"accuracy_level": 4, "calibration": "default", "scale_search": True},  # same size as int4
    # the same size again: searched scales, then error-compensated rounding (GPTQ) around them
    "int4-compensated": {
        "accuracy_level": 4,
        "calibration": "default",
        "scale_search": True,
        "rounding": "compensated",
    },
    "int4-balanced": {"accuracy_level": 4, "quality": "balanced"},
    "int4-max": {"accuracy_level": 4, "quality": "max"},
}
DEFAULT_VARIANTS = ("fp32", "fp16", "int8", "int4")
# Best precision first: the default reference is the first of these present.
PRECISION_ORDER = (
    "fp32",
    "bf16",
    "fp16",
    "int8",
    "int4-max",
    "int4-balanced",
    "int4-compensated",
    "int4-search",
    "int4",
)
STAMP = "compare-variant.json"
SIDE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model to measure: an onnxruntime-genai package folder and where it came from."""

    name: str
    package_dir: Path
    origin: str

    @property
    def model_file(self) -> Path:
        return GenAIConfig.read(self.package_dir).decoder_path


def build_variants(
    model: str | None,
    names: Sequence[str] | None,
    work_dir: str | os.PathLike,
    *,
    given: Mapping[str, str | os.PathLike] | None = None,
    presets: Mapping[str, Mapping[str, Any]] = QUANTIZED_PRESETS,
    calibration: str | None = None,
    progress: bool | None = None,
) -> list[Variant]:
    """The variants ``names`` (``None``: the defaults that can be had) plus every ``given`` one, in that order.

    ``model``: a Hugging Face folder or hub id (for the builder's FP32/FP16 exports), or ``None`` when ``given``
    supplies what is needed. ``given``: variant name -> existing package folder or ONNX folder.
    """
    from tqdm.auto import tqdm

    work_dir, given = Path(work_dir), {k: Path(v) for k, v in (given or {}).items()}
    for name, path in given.items():
        if not path.is_dir():
            raise ValueError(f"the folder given for variant {name!r} does not exist: {path}")
    explicit = names is not None
    wanted = _wanted(list(names) if explicit else list(DEFAULT_VARIANTS), given)
    unknown = [n for n in wanted if n not in given and n not in FLOAT_VARIANTS and n not in presets]
    if unknown:
        raise ValueError(_why_not(unknown[0], model, presets))
    unbuildable = [n for n in wanted if not _buildable(n, model, given, presets)]
    if unbuildable and explicit:
        raise ValueError(_why_not(unbuildable[0], model, presets))
    for name in unbuildable:
        logger.warning("Leaving out %s: %s", name, _why_not(name, model, presets))
    wanted = [n for n in wanted if n not in unbuildable]
    if not wanted:
        raise ValueError("nothing to compare: give a Hugging Face model, or existing folders with --use NAME=DIR")

    # The FP32 export is the source of every quantized variant, measured or not; packages come before bare ONNX
    # folders (which borrow a package's genai_config.json) and quantized variants (which need the FP32 package).
    needed = wanted + (
        ["fp32"] if "fp32" not in wanted and any(n in presets and n not in given for n in wanted) else []
    )

    def rank(name: str) -> int:
        if name in given:
            return 0 if (given[name] / GENAI_CONFIG).is_file() else 2
        return 1 if name in FLOAT_VARIANTS else 3

    built: dict[str, Variant] = {}
    for name in tqdm(sorted(needed, key=rank), desc="variants", unit="variant", disable=_disable(progress)):
        if name in given:
            built[name] = _given_variant(name, given[name], work_dir, built)
        elif name in FLOAT_VARIANTS:
            built[name] = _export(name, model, work_dir)
        else:
            built[name] = _quantize(name, built["fp32"], presets[name], calibration, work_dir)
    return [built[n] for n in wanted]


def default_reference(variants: Sequence[Variant]) -> Variant:
    """The best-precision variant: the first of fp32, bf16, fp16, int8, ... present, else the largest on disk."""
    by_name = {v.name: v for v in variants}
    for name in PRECISION_ORDER:
        if name in by_name:
            return by_name[name]
    return max(variants, key=lambda v: size_on_disk(v.model_file))


def size_on_disk(model_file: str | os.PathLike) -> int:
    """Bytes of the ONNX file plus every external data file its initializers point at."""
    import onnx

    model_file = Path(model_file)
    proto = onnx.load(str(model_file), load_external_data=False)
    locations = {
        entry.value
        for tensor in _initializers(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return model_file.stat().st_size + sum((model_file.parent / loc).stat().st_size for loc in locations)


def infer_label(model_file: str | os.PathLike) -> str:
    """fp32 / fp16 / bf16 from the logits' dtype, or int4 / int8 from the MatMulNBits most nodes use."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    bits = collections.Counter(
        next((a.i for a in node.attribute if a.name == "bits"), 4)
        for node in proto.graph.node
        if node.op_type == "MatMulNBits"
    )
    if bits:
        return f"int{bits.most_common(1)[0][0]}"
    dtypes = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    for output in proto.graph.output:
        if output.name == "logits":
            return dtypes.get(output.type.tensor_type.elem_type, "model")
    return "model"


def onnx_file_of(folder: Path) -> Path:
    """The decoder file of a package folder (genai_config.json), or the single .onnx file of an ONNX folder."""
    if (folder / GENAI_CONFIG).is_file():
        return GenAIConfig.read(folder).decoder_path
    candidates = sorted(folder.glob("*.onnx"))
    if len(candidates) != 1:
        raise ValueError(f"{folder} must be an onnxruntime-genai package or hold exactly one .onnx file")
    return candidates[0]


def _wanted(names: list[str], given: Mapping[str, Path]) -> list[str]:
    for name in names:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"variant names are letters, digits and -_. only, got {name!r}")
    return list(dict.fromkeys([*names, *given]))


def _buildable(name: str, model: str | None, given: Mapping[str, Path], presets: Mapping) -> bool:
    if name in given:
        return True
    if name in FLOAT_VARIANTS:
        return model is not None
    return name in presets and (model is not None or "fp32" in given)


def _why_not(name: str, model: str | None, presets: Mapping) -> str:
    if name in FLOAT_VARIANTS:
        return f"variant {name!r} is exported from a Hugging Face model: give MODEL, or an existing folder with --use"
    if name in presets:
        return f"variant {name!r} is quantized from the FP32 export: give MODEL (Hugging Face) or --use fp32=DIR"
    known = sorted({*FLOAT_VARIANTS, *presets})
    return f"unknown variant {name!r}: build one of {known}, or give a folder for it with --use {name}=DIR"


def _export(name: str, model: str | None, work_dir: Path) -> Variant:
    precision, provider = FLOAT_VARIANTS[name]
    recipe = {"builder": {"model": _model_key(model), "precision": precision, "execution_provider": provider}}
    origin = f"onnxruntime-genai builder -p {precision} -e {provider}"
    target = work_dir / name
    if _reusable(target, recipe):
        return Variant(name, target, origin + " (reused)")

    def make(out: Path, _scratch: Path) -> None:
        # GenAIModelExport's function, in a child process: the builder holds the whole float model in memory, and
        # this process goes on to score and time the variants. It also ships the model's own tokenizer files (the
        # builder's transformers-5 re-save can tokenize differently) and downloads a hub id.
        code = (
            "import sys; from olive_int4_pass.genai.export import export_hf_model, resolve_hf_dir;"
            " export_hf_model(resolve_hf_dir(sys.argv[1]), sys.argv[2], execution_provider=sys.argv[3],"
            " precision=sys.argv[4])"
        )
        source = str(Path(model).resolve()) if Path(model).is_dir() else model
        result = subprocess.run(
            [sys.executable, "-c", code, source, str(out), provider, precision], capture_output=True, text=True
        )
        if result.returncode != 0 or not (out / GENAI_CONFIG).is_file():
            tail = (result.stdout[-1500:] + result.stderr[-1500:]).strip()
            raise ValueError(f"the onnxruntime-genai builder could not export {model} at {precision}:\n{tail}")

    _publish(target, recipe, make)
    return Variant(name, target, origin)


def _quantize(
    name: str, source: Variant, kwargs: Mapping[str, Any], calibration: str | None, work_dir: Path
) -> Variant:
    from olive_int4_pass.options import QuantizeOptions
    from olive_int4_pass.pipeline import quantize_file

    kwargs = dict(kwargs)
    known = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"variant {name!r} needs QuantizeOptions({', '.join(f'{k}=...' for k in unknown)}), which this version of"
            " olive_int4_pass does not have; leave it out of --variants"
        )
    options = QuantizeOptions(**kwargs)  # validates values: ValueError/TypeError with the option's name
    if calibration is not None and options.calibrated:  # a quality preset or not (int4-search calibrates too)
        kwargs["calibration"] = calibration
        options = QuantizeOptions(**kwargs)
    recipe = {"quantize": {"source": str(source.package_dir.resolve()), "options": _jsonable(kwargs)}}
    origin = f"olive-int4 quantize {_describe(kwargs)} on {source.name}"
    target = work_dir / name
    if _reusable(target, recipe, newer_than=source.model_file):
        return Variant(name, target, origin + " (reused)")

    def make(out: Path, _scratch: Path) -> None:
        quantize_file(source.model_file, out, options, model_name=source.model_file.name, progress=False)
        _copy_side_files(source.package_dir, out)

    _publish(target, recipe, make)
    return Variant(name, target, origin)


def _given_variant(name: str, folder: Path, work_dir: Path, built: Mapping[str, Variant]) -> Variant:
    """A package folder as is; a bare ONNX folder gets a package view (links + a package's side files)."""
    if (folder / GENAI_CONFIG).is_file():
        return Variant(name, folder, f"given: {folder}")
    model_file = onnx_file_of(folder)
    source = built.get("fp32") or next(iter(built.values()), None)
    side_source = source.package_dir if source else None
    if side_source is None:
        raise ValueError(
            f"{folder} holds no {GENAI_CONFIG}: give a package folder first (e.g. --use fp32=DIR or MODEL) to"
            f" borrow its {GENAI_CONFIG} and tokenizer from"
        )
    view = work_dir / name
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and path.name.startswith(model_file.name):  # model.onnx and model.onnx.data
            link_or_copy(path, view / path.name)
    _copy_side_files(side_source, view)
    config_path = view / GENAI_CONFIG
    config = read_json(config_path)
    config["model"]["decoder"]["filename"] = model_file.name
    config_path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return Variant(name, view, f"given: {folder} ({GENAI_CONFIG} from {side_source.name})")


def _publish(target: Path, recipe: dict, make) -> None:
    """Build into a temporary folder beside ``target`` and swap it in, stamped with its recipe, when complete."""
    with staged(target) as scratch:
        make(scratch / "out", scratch)
        (scratch / "out" / STAMP).write_text(json.dumps(recipe, indent=2), encoding="utf-8")
        publish_folder(scratch / "out", target)


def _reusable(target: Path, recipe: dict, newer_than: Path | None = None) -> bool:
    stamp = target / STAMP
    if not stamp.is_file() or not (target / GENAI_CONFIG).is_file():
        return False
    try:
        same = json.loads(stamp.read_text(encoding="utf-8")) == json.loads(json.dumps(recipe))
    except ValueError:
        return False
    return same and (newer_than is None or stamp.stat().st_mtime >= newer_than.stat().st_mtime)


def _copy_side_files(source: Path, dest: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.suffix in SIDE_SUFFIXES and path.name != STAMP and not (dest / path.name).exists():
            shutil.copy2(path, dest / path.name)


def _model_key(model: str | None) -> str | None:
    return str(Path(model).resolve()) if model and Path(model).is_dir() else model


def _describe(kwargs: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items()) or "(defaults)"


def _jsonable(kwargs: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(kwargs), default=str))


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node or attr.g.initializer:
                yield from _initializers(attr.g)


def _disable(progress: bool | None) -> bool | None:
    return (not progress) if progress is not None else None
