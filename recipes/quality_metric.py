"""Olive ``user_script`` for the quality metric: Olive loads evaluate functions from a script file, not a module name.

In a recipe: ``user_config: {user_script: recipes/quality_metric.py, evaluate_func: evaluate_quality,
evaluate_func_kwargs: {reference: PATH_TO_FP32_PACKAGE}}`` (see docs/compare.md, "As an Olive metric").
"""

from olive_int4_pass.olive.metric import evaluate_quality

__all__ = ["evaluate_quality"]
