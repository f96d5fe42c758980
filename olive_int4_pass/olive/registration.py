"""Make Olive resolve our pass types (``type: OnnxInt4RtnQuantization``) without any flag.

Olive 0.13 resolves pass types only from its bundled ``olive_config.json`` (``--package-config`` replaces that
file wholesale) and has no plugin entry point. The installed ``olive_int4_pass.pth`` calls :func:`install` at
interpreter start: it only adds a meta-path finder (no olive, numpy or torch import). When Olive itself imports
``olive.package_config``, the finder patches ``OlivePackageConfig`` so every configuration - the default one,
the one ``olive run`` re-parses from the default path, and a user's own ``--package-config`` - also knows our
passes. A pass type the user's config defines itself keeps the user's definition.

The same finder guards ``olive.engine.engine``: Olive copies the final model into the workflow's ``output_dir``
after the passes ran, so an ``output_dir`` that holds the input model would have the input overwritten by the
output. A workflow with one of our passes refuses that before anything runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_PACKAGE_CONFIG = "olive.package_config"
_ENGINE = "olive.engine.engine"

# Entries in the format of olive_config.json's "passes".
PASSES: dict[str, dict] = {
    "OnnxInt4RtnQuantization": {
        "module_path": "olive_int4_pass.olive.quantize_pass.OnnxInt4RtnQuantization",
        "supported_providers": ["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"],
        "supported_accelerators": ["cpu", "gpu"],
        "supported_precisions": ["int4", "int8"],
        "supported_algorithms": ["rtn"],
    },
    "GenAIModelExport": {
        "module_path": "olive_int4_pass.olive.export_pass.GenAIModelExport",
        "supported_providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
        "supported_accelerators": ["cpu", "gpu"],
        "supported_precisions": ["fp16", "fp32"],
        "supported_algorithms": [],
    },
    "GenAIPackaging": {
        "module_path": "olive_int4_pass.olive.packaging_pass.GenAIPackaging",
        "supported_providers": ["CPUExecutionProvider", "CUDAExecutionProvider"],
        "supported_accelerators": ["cpu", "gpu"],
        "supported_precisions": ["*"],
        "supported_algorithms": [],
    },
}
_PATCHED = "_olive_int4_pass_patched"


def install() -> None:
    """Patch Olive now if it is imported, else as soon as it is. Idempotent and cheap."""
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch_package_config(module) -> None:
    cls = module.OlivePackageConfig
    if getattr(cls, _PATCHED, False):
        return
    from olive.passes import PassModuleConfig

    ours = {name.lower(): PassModuleConfig(**entry) for name, entry in PASSES.items()}
    original_get = cls.get_pass_module_config
    original_is_onnx = cls.is_onnx_module
    original_load = cls.load_default_config

    def get_pass_module_config(self, pass_type: str):
        try:
            return original_get(self, pass_type)
        except ValueError:
            key = pass_type.rsplit(".", 1)[-1].lower()
            if key not in ours:
                raise
            self.passes[key] = ours[key]
            return ours[key]

    def is_onnx_module(self, pass_type: str) -> bool:
        key = pass_type.rsplit(".", 1)[-1].lower()
        return key in ours or original_is_onnx(self, pass_type)

    def load_default_config():
        config = original_load()
        for key, entry in ours.items():
            config.passes.setdefault(key, entry)
        return config

    cls.get_pass_module_config = get_pass_module_config
    cls.is_onnx_module = is_onnx_module
    cls.load_default_config = staticmethod(load_default_config)
    setattr(cls, _PATCHED, True)


def _patch_engine(module) -> None:
    cls = module.Engine
    if getattr(cls, _PATCHED, False):
        return
    import inspect

    original_run = cls.run
    signature = inspect.signature(original_run)

    def run(self, *args, **kwargs):
        if not _uses_our_passes(self):
            return original_run(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        input_model = bound.arguments.get("input_model_config")
        _refuse_output_over_input(input_model, bound.arguments.get("output_dir"))
        _check_hf_config(input_model)
        output = original_run(self, *args, **kwargs)
        if output is not None and hasattr(output, "has_output_model") and not output.has_output_model():
            # Olive logged a failure and would exit 0: a workflow of ours fails loudly instead.
            raise ValueError("the workflow produced no output model: the log above says which pass failed and why")
        return output

    run.__wrapped__ = original_run
    cls.run = run
    setattr(cls, _PATCHED, True)


def _uses_our_passes(engine) -> bool:
    ours = {name.lower() for name in PASSES}
    configs = getattr(engine, "input_passes_configs", None) or {}
    return any(str(c.type).rsplit(".", 1)[-1].lower() in ours for entries in configs.values() for c in entries)


def _refuse_output_over_input(input_model_config, output_dir) -> None:
    """ValueError when ``output_dir`` is the input model's folder (Olive would copy the output over the input)."""
    from pathlib import Path

    config = getattr(input_model_config, "config", None) or {}
    model_path = config.get("model_path") if isinstance(config, dict) else None
    if not model_path or not isinstance(model_path, (str, Path)) or not Path(model_path).exists():
        return  # a hub id or a resource Olive resolves itself: no local folder to protect
    model_path = Path(model_path).resolve()
    input_dir = model_path if model_path.is_dir() else model_path.parent
    out = (Path(output_dir) if output_dir else Path.cwd()).resolve()
    out = out.parent if out.suffix and not out.is_dir() else out
    if out == input_dir:
        raise ValueError(
            f"output_dir {out} is the folder of the input model {model_path}: Olive copies the output model there"
            " after the passes and would overwrite the input. Choose another output_dir."
        )


def _check_hf_config(input_model_config) -> None:
    """A local Hugging Face folder's config.json must be JSON: Olive reads it before any pass and, when it cannot,
    logs the error and exits 0."""
    import json
    from pathlib import Path

    config = getattr(input_model_config, "config", None) or {}
    if str(getattr(input_model_config, "type", "")).lower() != "hfmodel" or not isinstance(config, dict):
        return
    model_path = config.get("model_path")
    if not isinstance(model_path, (str, Path)) or not Path(model_path).is_dir():
        return
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_path} is not a Hugging Face model folder: it has no config.json")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid JSON file: {e}") from e


_PATCHES = {_PACKAGE_CONFIG: _patch_package_config, _ENGINE: _patch_engine}
