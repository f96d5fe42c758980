"""Make Olive resolve our pass types (``type: OnnxInt4RtnQuantization``) without any flag.

Olive 0.13 resolves pass types only from its bundled ``olive_config.json`` (``--package-config`` replaces that
file wholesale) and has no plugin entry point. The installed ``olive_int4_pass.pth`` calls :func:`install` at
interpreter start: it only adds a meta-path finder (no olive, numpy or torch import). When Olive itself imports
``olive.package_config``, the finder patches ``OlivePackageConfig`` so every configuration - the default one,
the one ``olive run`` re-parses from the default path, and a user's own ``--package-config`` - also knows our
passes. A pass type the user's config defines itself keeps the user's definition.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "olive.package_config"

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
    module = sys.modules.get(_TARGET)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _patch(module) -> None:
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
