"""Olive pass ``OnnxInt4RtnQuantization``: the MatMulNBits rewrite as one step of an Olive workflow."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

from olive.common.config_utils import validate_config
from olive.data.config import DataConfig
from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from olive_int4_pass.olive.common import plugin_version_param
from olive_int4_pass.options import EMBEDDING_CHOICES, LM_HEAD_CHOICES, QUALITY_PRESETS, QuantizeOptions
from olive_int4_pass.pipeline import DATA_NAME, MODEL_NAME, quantize_file
from olive_int4_pass.plan.calibration import DEFAULT_TEXT, token_ids_from_batches

logger = logging.getLogger(__name__)


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
        return {
            "block_size": PassConfigParam(
                type_=int,
                default_value=32,
                description="Values per quantization block along K: a power of two >= 16. Default 32.",
            ),
            "bits": PassConfigParam(
                type_=int,
                default_value=4,
                description="Bits per weight: 4 (default) or 8.",
            ),
            "is_symmetric": PassConfigParam(
                type_=bool,
                default_value=None,
                description=(
                    "Symmetric (signed scale, no zero points; the reference's layout and the default) or asymmetric"
                    " (uint4 with packed zero points). Unset: symmetric, or asymmetric under a quality preset."
                ),
            ),
            "accuracy_level": PassConfigParam(
                type_=int,
                default_value=None,
                description=(
                    "MatMulNBits accuracy_level attribute (0-4). Unset (default) omits it as the builder does for"
                    " CUDA; 4 (int8 compute) is what the builder writes for CPU."
                ),
            ),
            "nodes_to_include": PassConfigParam(
                type_=list[str],
                default_value=None,
                description="Only quantize nodes whose name matches one of these exact names or glob patterns.",
            ),
            "nodes_to_exclude": PassConfigParam(
                type_=list[str],
                default_value=None,
                description="Never quantize nodes whose name matches one of these exact names or glob patterns.",
            ),
            "lm_head": PassConfigParam(
                type_=str,
                default_value="quantize",
                description=(
                    f"The final projection (MatMul producing a graph output): one of {LM_HEAD_CHOICES}."
                    " 'quantize' like the others (default), 'int8' at 8 bits, 'float' left unquantized."
                ),
            ),
            "tied_embeddings": PassConfigParam(
                type_=bool,
                default_value=True,
                description=(
                    "When the embedding Gather reads Transpose(W) of the quantized lm_head weight W (tied"
                    " embeddings), feed it the same packed tensor through GatherBlockQuantized, as the genai builder"
                    " does, instead of keeping a float copy."
                ),
            ),
            "embedding": PassConfigParam(
                type_=str,
                default_value="float",
                description=(
                    f"An embedding table not shared with a quantized lm_head: one of {EMBEDDING_CHOICES}. 'float'"
                    " (default) matches the published layout; 'int4'/'int8' store it as GatherBlockQuantized."
                ),
            ),
            "quality": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    f"Opt-in quality preset, one of {sorted(QUALITY_PRESETS)}: 'balanced' = calibrated,"
                    " importance-weighted scale search, asymmetric (zero points), 8-bit tensors where they cost the"
                    " most, the model at most +3 % bytes over plain INT4; 'max' = the same with the lm_head at 8 bits,"
                    " the 8-bit weights picked by their layer's KL measured on the float model (sensitivity"
                    " 'measured'), at most +13.5 %. Unset (default): plain RTN, byte-identical to the reference."
                ),
            ),
            "calibration": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    "Calibration text file (or 'default' for a built-in passage), run through the float model (it"
                    " needs tokenizer.json and genai_config.json beside it) to weigh input channels."
                ),
            ),
            "data_config": PassConfigParam(
                type_=Union[DataConfig, dict],  # noqa: UP007 - Olive's own passes declare it so
                default_value=None,
                description=(
                    "Olive data config to calibrate on instead of a text: the input_ids of its batches (each sample"
                    " run as its own sequence; tokens whose attention_mask is 0 are dropped), up to"
                    " calibration_tokens. Setting it calibrates, as calibration does; the weights change only with"
                    " quality, scale_search or mixed_precision_budget. Not together with calibration."
                ),
            ),
            "calibration_tokens": PassConfigParam(
                type_=int, default_value=2048, description="At most this many calibration tokens are used."
            ),
            "scale_search": PassConfigParam(
                type_=bool,
                default_value=None,
                description="Search each block's scale (and clip) for the least importance-weighted error.",
            ),
            "mixed_precision_budget": PassConfigParam(
                type_=float,
                default_value=None,
                description=(
                    "Let the quantized weights grow by this fraction (0.15 = +15 %) to store the tensors with the"
                    " largest measured error per byte at 8 bits."
                ),
            ),
            "sensitivity": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    "How mixed precision ranks the weights (unset: 'error', or the quality preset's): 'error' = each"
                    " weight's importance-weighted relative"
                    " error; 'measured' = each transformer layer's KL at the logits when its weights are quantized,"
                    " measured on the float model (one onnxruntime run per layer), shared by relative error."
                ),
            ),
            "sensitivity_tokens": PassConfigParam(
                type_=int,
                default_value=256,
                description="Calibration tokens each 'measured' sensitivity run uses (the first ones).",
            ),
            "fuse_bias": PassConfigParam(
                type_=bool,
                default_value=False,
                description=(
                    "Fold Add(MatMul(X, W), b) into MatMulNBits' bias input. Off by default: the builder keeps the"
                    " Add, and not every execution provider's MatMulNBits accepts a bias."
                ),
            ),
            "save_as_external_data": PassConfigParam(
                type_=bool,
                default_value=True,
                description=(
                    "Write weights to an external data file (default, valid beyond protobuf's 2 GB limit). Models"
                    " above 1 GB of weights are always saved with external data."
                ),
            ),
            "external_data_name": PassConfigParam(
                type_=str,
                default_value=DATA_NAME,
                description=f"Name of the external data file. Default {DATA_NAME}.",
            ),
            "size_threshold": PassConfigParam(
                type_=int,
                default_value=1024,
                description="Tensors of at least this many bytes go to the external data file.",
            ),
            "all_tensors_to_one_file": PassConfigParam(
                type_=bool,
                default_value=True,
                description="Must be true: all external tensors are written to one file.",
            ),
            "plugin_version": plugin_version_param(),
        }

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise TypeError(f"{type(self).__name__} needs an ONNX model, got {type(model).__name__}")
        if not config.all_tensors_to_one_file:
            raise ValueError("all_tensors_to_one_file=false is not supported: weights go to one external file")
        if config.data_config is not None and config.calibration is not None:
            raise ValueError(
                f"calibration ({config.calibration}) and data_config were both given: calibrate on one of them"
            )
        options = _options_from(config)
        calibration_ids = None
        if config.data_config is not None:
            calibration_ids = calibration_ids_from_data_config(config.data_config, options.calibration_tokens)
            if not (options.scale_search or options.mixed_precision_budget):
                logger.warning(
                    "data_config only measures (quantization_report.json's weighted errors): set quality,"
                    " scale_search or mixed_precision_budget to use it for the weights."
                )
        output_dir = Path(output_model_path)
        output_dir = output_dir.parent if output_dir.suffix == ".onnx" else output_dir
        model_file = quantize_file(
            model.model_path,
            output_dir,
            options,
            model_name=MODEL_NAME,
            external_data_name=config.external_data_name if config.save_as_external_data else None,
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


def _options_from(config: type[BasePassConfig]) -> QuantizeOptions:
    return QuantizeOptions(
        block_size=config.block_size,
        bits=config.bits,
        is_symmetric=config.is_symmetric,
        accuracy_level=config.accuracy_level,
        nodes_to_include=config.nodes_to_include,
        nodes_to_exclude=config.nodes_to_exclude,
        lm_head=config.lm_head,
        fuse_bias=config.fuse_bias,
        tied_embeddings=config.tied_embeddings,
        embedding=config.embedding,
        quality=config.quality,
        # A data_config is the calibration source: "default" stands for it (the ids replace the built-in text).
        calibration=DEFAULT_TEXT if config.data_config is not None else config.calibration,
        calibration_tokens=config.calibration_tokens,
        scale_search=config.scale_search,
        mixed_precision_budget=config.mixed_precision_budget,
        sensitivity=config.sensitivity,
        sensitivity_tokens=config.sensitivity_tokens,
    )
