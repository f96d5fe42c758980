"""Olive pass ``OnnxInt4RtnQuantization``: the MatMulNBits rewrite as one step of an Olive workflow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Union

from olive.common.config_utils import validate_config
from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config
from olive.passes.pass_config import BasePassConfig, PassConfigParam, PassParamDefault
from olive.search.search_parameter import SearchParameter, SpecialParamValue
from pydantic import model_validator

from olive_int4_pass import options as schema
from olive_int4_pass.olive.common import fails_loudly, plugin_version_param
from olive_int4_pass.options import PRESET_OWN_TEXT_TOKENS, QuantizeOptions
from olive_int4_pass.pipeline import DATA_NAME, MODEL_NAME, quantize_file
from olive_int4_pass.plan.calibration import DEFAULT_TEXT, token_ids_from_batches

logger = logging.getLogger(__name__)

_UNRESOLVED = (SearchParameter, PassParamDefault, SpecialParamValue)
_CHECKED = (*(f.name for f in schema.fields()), "data_config", "calibration")


class OnnxInt4RtnQuantization(Pass):
    """Quantize MatMul/Gemm weights block-wise (round to nearest) into com.microsoft::MatMulNBits.

    Defaults reproduce the onnxruntime-genai model builder's ``-p int4`` bytes: block 32, symmetric, 4 bits,
    every MatMul with a constant weight (``lm_head`` included), an untied embedding left in float and a tied one
    sharing the lm_head's packed tensor. Graph input and output names are kept. Output: ``model.onnx`` +
    ``model.onnx.data``.

    Calibration (for ``quality``, ``scale_search``, ``mixed_precision_budget``) runs the float model on a text
    (``calibration``: a file or ``default``) or on the ``input_ids`` of an Olive ``data_config``'s batches (padding
    dropped where an ``attention_mask`` says so), up to ``calibration_tokens`` tokens.
    """

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        config = {field.name: _param(field) for field in schema.fields()}
        config["data_config"] = PassConfigParam(
            type_=Union[DataConfig, dict],  # noqa: UP007 - Olive's own passes declare it so
            default_value=None,
            description=(
                "Olive data config to calibrate on instead of a text: the input_ids of its batches (each sample"
                " run as its own sequence; tokens whose attention_mask is 0 are dropped), up to"
                " calibration_tokens. Setting it calibrates, as calibration does; the weights change only with"
                " quality, scale_search, mixed_precision_budget or rounding. Not together with calibration."
            ),
        )
        external = get_external_data_config()
        # Our defaults: weights in one external file named as the builder names it (valid beyond 2 GB).
        external["save_as_external_data"].default_value = True
        external["external_data_name"].default_value = DATA_NAME
        external["all_tensors_to_one_file"].description = "Must be true: every external tensor goes to one file."
        external["convert_attribute"].description = "Must be false: tensors in attributes stay in the model file."
        config.update(external)
        config["plugin_version"] = plugin_version_param()
        return config

    @classmethod
    def _validators(cls) -> dict[str, Callable]:
        # Runs when Olive reads the workflow, before any pass: a bad option fails the run before an export has
        # spent minutes (a pydantic ValidationError is a ValueError, which Olive reports and exits non-zero on).
        return {"validate_quantize_options": model_validator(mode="after")(_validate_config)}

    @fails_loudly
    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise TypeError(f"{type(self).__name__} needs an ONNX model, got {type(model).__name__}")
        options = _options_from(config)
        calibration_ids = None
        if config.data_config is not None:
            calibration_ids = calibration_ids_from_data_config(config.data_config, options.calibration_tokens)
            if not (
                options.scale_search or options.mixed_precision_budget or options.rounding in ("compensated", "auto")
            ):
                logger.warning(
                    "data_config only measures (quantization_report.json's weighted errors): set quality,"
                    " scale_search, mixed_precision_budget or rounding to use it for the weights."
                )
        output_dir = Path(output_model_path)
        output_dir = output_dir.parent if output_dir.suffix == ".onnx" else output_dir
        model_file = quantize_file(
            model.model_path,
            output_dir,
            options,
            model_name=MODEL_NAME,
            external_data_name=(config.external_data_name or DATA_NAME) if config.save_as_external_data else None,
            size_threshold=config.size_threshold,
            calibration_ids=calibration_ids,
        )
        return ONNXModelHandler(
            model_path=str(output_dir), onnx_file_name=model_file.name, model_attributes=model.model_attributes
        )


def calibration_ids_from_data_config(data_config: DataConfig | dict, max_tokens: int) -> list[list[int]]:
    """The calibration samples of an Olive data config: each sample's ``input_ids`` without padding, up to
    ``max_tokens`` tokens in all (see :func:`olive_int4_pass.plan.calibration.token_ids_from_batches`).

    Any failure is raised as ``ValueError``/``TypeError``, which Olive always re-raises; another error (say, a
    ``KeyError`` in the user's ``load_dataset``) may be logged as a failed pass while the run goes on.
    """
    data_config = validate_config(data_config, DataConfig)
    try:
        batches = data_config.to_data_container().create_dataloader()
        samples = token_ids_from_batches(batches, max_tokens)
    except (ValueError, TypeError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"data_config {data_config.name!r}: {e}") from e
    except Exception as e:
        raise ValueError(f"data_config {data_config.name!r}: reading the calibration data failed: {e!r}") from e
    logger.info(
        "Calibration data from data_config %r: %d samples, %d tokens.",
        data_config.name,
        len(samples),
        sum(map(len, samples)),
    )
    return samples


def _param(field) -> PassConfigParam:
    """An option of the schema as an Olive pass parameter."""
    kind = schema.value_type(field)
    description = field.metadata["help"]
    if field.metadata["choices"]:
        description += f" One of {list(field.metadata['choices'])}."
    return PassConfigParam(
        type_=list[str] if kind is list else kind, default_value=field.default, description=description
    )


def _options_from(config) -> QuantizeOptions:
    """The pass config's options; a data_config is the calibration source ("default" stands for it, so options that
    need calibration accept it) and the user's own data (a preset takes up to 16,384 of its tokens)."""
    if getattr(config, "data_config", None) is None:
        return QuantizeOptions.from_mapping(config)
    values = {f.name: getattr(config, f.name, f.default) for f in schema.fields()}
    values["calibration"] = DEFAULT_TEXT
    if values["quality"] and values["calibration_tokens"] is None:
        values["calibration_tokens"] = PRESET_OWN_TEXT_TOKENS
    return QuantizeOptions.from_mapping(values)


def _validate_config(config):
    if any(isinstance(getattr(config, name, None), _UNRESOLVED) for name in _CHECKED):
        return config  # a search space, not one configuration: each point is validated when it is made
    if config.data_config is not None and config.calibration is not None:
        raise ValueError(
            f"calibration ({config.calibration}) and data_config were both given: calibrate on one of them"
        )
    if not config.all_tensors_to_one_file:
        raise ValueError("all_tensors_to_one_file=false is not supported: weights go to one external file")
    if config.convert_attribute:
        raise ValueError("convert_attribute=true is not supported: tensors in attributes stay in the model file")
    _options_from(config)  # ValueError/TypeError naming the option
    return config


def olive_only_table() -> str:
    """The pass parameters that are not quantization options (data_config, external data, plugin_version), as a
    Markdown table for docs/options.md."""
    spec = AcceleratorSpec(accelerator_type="cpu", execution_provider="CPUExecutionProvider")
    options = {f.name for f in schema.fields()}
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    for name, param in OnnxInt4RtnQuantization.default_config(spec).items():
        if name in options:
            continue
        default = "unset" if param.default_value is None else str(param.default_value)
        if isinstance(param.default_value, bool):
            default = default.lower()
        rows.append(f"| `{name}` | {default} | {param.description} |")
    return "\n".join(rows) + "\n"
