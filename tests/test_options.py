"""One option schema: the Olive pass parameters, the CLI arguments and docs/options.md all come from QuantizeOptions."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from olive.hardware.accelerator import AcceleratorSpec

from olive_int4_pass import options as schema
from olive_int4_pass.cli import build_parser, options_from_args
from olive_int4_pass.olive.quantize_pass import OnnxInt4RtnQuantization
from olive_int4_pass.options import QuantizeOptions

ROOT = Path(__file__).resolve().parents[1]
SPEC = AcceleratorSpec(accelerator_type="cpu", execution_provider="CPUExecutionProvider")
# A value other than the default for every option, and how to say it on the command line.
NON_DEFAULT = {
    "block_size": (64, ["--block-size", "64"]),
    "bits": (8, ["--bits", "8"]),
    "is_symmetric": (False, ["--asymmetric"]),
    "accuracy_level": (4, ["--accuracy-level", "4"]),
    "nodes_to_include": (("a/*", "b"), ["--include", "a/*", "--include", "b"]),
    "nodes_to_exclude": (("c",), ["--exclude", "c"]),
    "lm_head": ("float", ["--lm-head", "float"]),
    "fuse_bias": (True, ["--fuse-bias"]),
    "tied_embeddings": (False, ["--no-tied-embeddings"]),
    "embedding": ("int8", ["--embedding", "int8"]),
    "quality": ("balanced", ["--quality", "balanced"]),
    "calibration": ("notes.txt", ["--calibration", "notes.txt"]),
    "calibration_tokens": (512, ["--calibration-tokens", "512"]),
    "scale_search": (True, ["--scale-search"]),
    "mixed_precision_budget": (0.05, ["--mixed-precision-budget", "0.05"]),
    "sensitivity": ("measured", ["--sensitivity", "measured"]),
    "sensitivity_tokens": (64, ["--sensitivity-tokens", "64"]),
    "sensitivity_depth": (4, ["--sensitivity-depth", "4"]),
    "rounding": ("compensated", ["--rounding", "compensated"]),
    "compensation_damping": (0.05, ["--compensation-damping", "0.05"]),
    "act_order": (False, ["--no-act-order"]),
    "compensation_block_rows": (256, ["--compensation-block-rows", "256"]),
    "compensation_sweeps": (2, ["--compensation-sweeps", "2"]),
    "compensation_max_inputs": (4096, ["--compensation-max-inputs", "4096"]),
    "compensation_span": (4096, ["--compensation-span", "4096"]),
    "rotation": ("residual", ["--rotation", "residual"]),
    "rotation_seed": (5, ["--rotation-seed", "5"]),
}


def test_every_option_is_covered_here():
    assert set(NON_DEFAULT) == {f.name for f in schema.fields()}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_option_reaches_the_cli(name):
    value, argv = NON_DEFAULT[name]
    extra = [] if name in ("calibration", "quality") else ["--calibration", "default"]
    extra += ["--mixed-precision-budget", "0.1"] if name == "sensitivity" else []
    args = build_parser().parse_args(["quantize", "in.onnx", "out", *argv, *extra])
    options = options_from_args(args)
    assert getattr(options, name) == value
    default = QuantizeOptions(calibration="default")
    assert getattr(default, name) != value  # the CLI changed it: not the default by accident


def test_olive_pass_parameters_come_from_the_schema():
    params = OnnxInt4RtnQuantization.default_config(SPEC)
    for field in schema.fields():
        assert params[field.name].default_value == field.default, field.name
        assert field.metadata["help"] in params[field.name].description
    # Olive's own external-data parameters, ours only in their defaults.
    assert {"data_config", "save_as_external_data", "external_data_name", "size_threshold", "plugin_version"} <= set(
        params
    )
    assert params["save_as_external_data"].default_value is True
    assert params["external_data_name"].default_value == "model.onnx.data"


def test_olive_config_gives_the_same_options_as_the_cli():
    values = {name: list(v) if isinstance(v, tuple) else v for name, (v, _) in NON_DEFAULT.items()}
    values.update(quality=None, sensitivity="error", calibration="default")
    config = OnnxInt4RtnQuantization.generate_config(SPEC, values, {}, True)
    from olive_int4_pass.olive.quantize_pass import _options_from

    argv = [
        arg
        for name, (_, a) in NON_DEFAULT.items()
        if name not in ("quality", "sensitivity", "calibration")
        for arg in a
    ]
    cli = options_from_args(build_parser().parse_args(["quantize", "i", "o", *argv, "--calibration", "default"]))
    assert _options_from(config) == cli


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"block_size": 512}, "block_size must be one of"),
        ({"bits": 3}, "bits must be one of"),
        ({"lm_head": "int4"}, "lm_head must be one of"),
        ({"scale_search": True}, "need calibration"),
        ({"mixed_precision_budget": float("nan"), "calibration": "default"}, "finite"),
        ({"all_tensors_to_one_file": False}, "all_tensors_to_one_file"),
    ],
)
def test_bad_options_fail_when_olive_reads_the_config(config, message):
    with pytest.raises(ValueError, match=message):
        OnnxInt4RtnQuantization.generate_config(SPEC, config, {}, True)


def test_a_bad_option_fails_the_workflow_before_the_export_runs(tmp_path, monkeypatch):
    from olive.workflows import run as olive_run

    import olive_int4_pass.olive.export_pass as export_pass

    calls = []
    monkeypatch.setattr(export_pass, "export_hf_model", lambda *a, **k: calls.append(a))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')
    workflow = {
        "input_model": {"type": "HfModel", "model_path": str(tmp_path / "hf")},
        "passes": {
            "export": {"type": "GenAIModelExport"},
            "int4": {"type": "OnnxInt4RtnQuantization", "block_size": 512},
        },
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "log_severity_level": 3,
    }
    with pytest.raises(ValueError, match="block_size must be one of"):
        olive_run(workflow)
    assert calls == []  # nothing exported
    assert not list(tmp_path.rglob("*.onnx"))  # and no model anywhere


def test_an_explicit_lm_head_wins_over_the_max_preset():
    # "quantize" used to count as unset, so quality=max turned an explicit lm_head: quantize into int8.
    assert QuantizeOptions(quality="max").lm_head == "int8"
    assert QuantizeOptions(quality="max", lm_head="quantize").lm_head == "quantize"
    args = build_parser().parse_args(["quantize", "i", "o", "--quality", "max", "--lm-head", "quantize"])
    assert options_from_args(args).lm_head == "quantize"
    config = OnnxInt4RtnQuantization.generate_config(SPEC, {"quality": "max", "lm_head": "quantize"}, {}, True)
    from olive_int4_pass.olive.quantize_pass import _options_from

    assert _options_from(config).lm_head == "quantize"


def test_presets_fill_only_unset_options():
    balanced = QuantizeOptions(quality="balanced")
    assert (balanced.is_symmetric, balanced.scale_search, balanced.calibration) == (False, True, "default")
    assert QuantizeOptions(quality="balanced", is_symmetric=True).is_symmetric is True
    assert QuantizeOptions(quality="balanced", scale_search=False).scale_search is False
    assert QuantizeOptions(quality="max", sensitivity="error").sensitivity == "error"
    assert QuantizeOptions(quality="max").sensitivity_depth == 8
    assert QuantizeOptions(quality="max", sensitivity_depth=0).sensitivity_depth == 0  # 0 overrides: to the logits
    plain = QuantizeOptions()
    assert (plain.is_symmetric, plain.lm_head, plain.scale_search, plain.calibration) == (True, "quantize", False, None)
    # Resolved options are a fixed point: replacing a field keeps the others as resolved.
    assert dataclasses.replace(balanced, block_size=64).is_symmetric is False


def test_docs_table_matches_the_schema():
    page = ROOT / "docs" / "options.md"
    text = page.read_text(encoding="utf-8")
    assert schema.render_docs(text) == text, "docs/options.md is stale: run python -m olive_int4_pass.options"
    for field in schema.fields():
        assert f"| `{field.name}` |" in text


def test_no_option_name_is_listed_by_hand_in_the_cli_or_the_pass():
    # The CLI and the Olive pass derive their option lists; a hand-kept list would name every option again.
    for module in ("cli.py", "olive/quantize_pass.py"):
        source = (ROOT / "olive_int4_pass" / module).read_text(encoding="utf-8")
        named = [f.name for f in schema.fields() if f'"{f.name}"' in source or f"{f.name}=" in source]
        assert len(named) <= 3, (module, named)  # a few are used by name (calibration, data_config checks)


def test_genai_compare_and_cli_modules_do_not_import_olive():
    code = (
        "import sys, olive_int4_pass.cli, olive_int4_pass.pipeline, olive_int4_pass.compare.run,"
        " olive_int4_pass.compare.variants, olive_int4_pass.genai.export, olive_int4_pass.genai.packaging,"
        " olive_int4_pass.genai.chat; print('olive' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_only_public_onnxscript_api():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "olive_int4_pass").rglob("*.py")
        if "onnxscript.rewriter._" in p.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_a_preset_on_your_own_text_takes_more_calibration_tokens():
    from olive_int4_pass.options import DEFAULT_CALIBRATION_TOKENS, PRESET_OWN_TEXT_TOKENS

    assert QuantizeOptions().calibration_tokens == DEFAULT_CALIBRATION_TOKENS == 2048
    assert QuantizeOptions(quality="balanced").calibration_tokens == 2048  # the built-in text (about 2,500 tokens)
    assert QuantizeOptions(calibration="my.txt").calibration_tokens == 2048  # no preset: calibration only measures
    assert QuantizeOptions(quality="max", calibration="my.txt").calibration_tokens == PRESET_OWN_TEXT_TOKENS == 16384
    assert QuantizeOptions(quality="max", calibration="my.txt", calibration_tokens=4096).calibration_tokens == 4096
    from olive_int4_pass.olive.quantize_pass import _options_from

    def olive(values):
        return _options_from(OnnxInt4RtnQuantization.generate_config(SPEC, values, {}, True)).calibration_tokens

    dc = {"data_config": {"name": "d", "type": "HuggingfaceContainer"}}
    assert olive({"quality": "balanced", **dc}) == 16384  # an Olive data_config is the user's own text
    assert olive({"quality": "balanced", "calibration_tokens": 1024, **dc}) == 1024
    assert olive({"scale_search": True, **dc}) == 2048
    assert olive({"quality": "balanced"}) == 2048


def test_unset_damping_is_chosen_by_tokens_per_channel():
    unset = QuantizeOptions(rounding="compensated", calibration="default")
    assert unset.compensation_damping is None
    per_channel = schema.LOW_DAMPING_TOKENS_PER_CHANNEL
    assert unset.damping_for(per_channel * 1024, 1024) == schema.LOW_DAMPING == 0.01
    assert unset.damping_for(per_channel * 1024 - 1, 1024) == schema.DAMPING == 0.1
    explicit = QuantizeOptions(rounding="compensated", calibration="default", compensation_damping=0.3)
    assert explicit.damping_for(10**6, 64) == explicit.damping_for(16, 8960) == 0.3
