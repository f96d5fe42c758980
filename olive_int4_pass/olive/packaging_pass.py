"""Olive pass ``GenAIPackaging``: lay an INT4 model out as a published onnxruntime-genai package folder.

The folder itself is written by :func:`olive_int4_pass.genai.packaging.build_package`. Olive flattens a single
ONNX model into ``output_dir``, so the pass returns a composite model marked ``no_flatten``, whose folder Olive
copies as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import CompositeModelHandler, ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from olive_int4_pass.genai.files import GENAI_CONFIG, MODEL_NAME, GenAIConfig
from olive_int4_pass.genai.packaging import build_package
from olive_int4_pass.olive.common import fails_loudly, plugin_version_param


class GenAIPackaging(Pass):
    """Write the onnxruntime-genai package folder (e.g. ``gpu/gpu-int4-rtn-block-32/``) and check that it runs.

    Input: an ONNX model whose ``additional_files`` hold the export's ``genai_config.json`` and tokenizer files
    (``GenAIModelExport`` then ``OnnxInt4RtnQuantization``). Output: a composite model whose folder holds just
    the package folder, which Olive copies into ``output_dir`` without flattening.
    """

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "execution_provider": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    "'cuda' (gpu/ folder, cuda provider options) or 'cpu' (cpu_and_mobile/ folder, no provider)."
                    " Unset: what the export's genai_config.json names."
                ),
            ),
            "package_dir": PassConfigParam(
                type_=str,
                default_value=None,
                description=(
                    "Package folder under output_dir. Unset: the published name from the model's MatMulNBits,"
                    " e.g. gpu/gpu-int4-rtn-block-32 or cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4."
                ),
            ),
            "search": PassConfigParam(
                type_=dict[str, Any],
                default_value=None,
                description="genai_config.json search options overriding the model's generation_config.json.",
            ),
            "context_length": PassConfigParam(
                type_=int,
                default_value=None,
                description="model.context_length (and the search max_length cap). Unset: the model's maximum.",
            ),
            "chat_template_file": PassConfigParam(
                type_=bool,
                default_value=False,
                description="Also keep chat_template.jinja (the template is inline in tokenizer_config.json).",
            ),
            "verify": PassConfigParam(
                type_=bool,
                default_value=True,
                description=(
                    "Load the package with onnxruntime-genai and generate two tokens before publishing it (on CPU"
                    " when its provider is unavailable here). A failure fails the pass."
                ),
            ),
            "plugin_version": plugin_version_param(),
        }

    @fails_loudly
    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> CompositeModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise TypeError(f"{type(self).__name__} needs an ONNX model, got {type(model).__name__}")
        attributes = dict(model.model_attributes or {})
        side_files = {Path(f).name: f for f in attributes.pop("additional_files", None) or []}
        execution_provider = config.execution_provider or _provider_of(side_files)
        output_root = Path(output_model_path)
        output_root = output_root.with_suffix("") if output_root.suffix == ".onnx" else output_root
        package = build_package(
            model.model_path,
            side_files,
            output_root,
            execution_provider,
            package_dir=config.package_dir,
            search=config.search,
            context_length=config.context_length,
            chat_template_file=config.chat_template_file,
            verify=config.verify,
        )
        # Olive copies the input's additional_files next to the output model; the package already holds what
        # it needs, so keep the output root clean.
        model.model_attributes = {**(model.model_attributes or {}), "additional_files": []}
        component = ONNXModelHandler(model_path=str(package), onnx_file_name=MODEL_NAME)
        attributes.update(no_flatten=True, genai_package_dir=package.relative_to(output_root).as_posix())
        return CompositeModelHandler(
            [component], [package.name], model_path=str(output_root), model_attributes=attributes
        )


def _provider_of(side_files: Mapping[str, str]) -> str:
    if GENAI_CONFIG not in side_files:
        raise ValueError(f"{GENAI_CONFIG} is missing from the model's additional files; export with GenAIModelExport")
    providers = GenAIConfig.read(side_files[GENAI_CONFIG]).providers
    return "cuda" if "cuda" in providers else "cpu"
