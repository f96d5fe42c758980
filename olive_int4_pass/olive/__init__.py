"""Olive glue: the passes (``OnnxInt4RtnQuantization``, ``GenAIModelExport``, ``GenAIPackaging``), their
registration with Olive (:mod:`.registration`, import-light: the start-up hook loads it in every process) and the
quality metric for Olive workflows (:mod:`.metric`). The only modules that import Olive."""
