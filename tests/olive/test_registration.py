"""``type: OnnxInt4RtnQuantization`` works in every way Olive runs passes, with no extra flag (subprocesses)."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx import helper
from onnx_helpers import attrs, load_onnx, make_model, tensor_info

import olive_int4_pass

OLIVE = [sys.executable, "-m", "olive"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("olive_in") / "model.onnx"
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/model/mm"),
        helper.make_node("MatMul", ["h", "W2"], ["logits"], name="/lm_head/MatMul"),
    ]
    inits = {
        "W1": rng.standard_normal((64, 64)).astype(np.float32),
        "W2": rng.standard_normal((64, 96)).astype(np.float32),
    }
    make_model(
        nodes, [tensor_info("x", np.float32, [1, 64])], [tensor_info("logits", np.float32, [1, 96])], inits, path
    )
    return path


def run(cmd, cwd, env=None, **kwargs):
    # CI=1: Olive skips telemetry, which otherwise waits ~10 s for the network at exit.
    env = {**(env or os.environ), "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "CI": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def workflow(model_path, output_dir, **pass_config) -> dict:
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model_path)},
        "passes": {"int4": {"type": "OnnxInt4RtnQuantization", **pass_config}},
        "output_dir": str(output_dir),
        "log_severity_level": 1,
    }


def quantized_nodes(folder: Path) -> dict[str, dict]:
    model = load_onnx(folder / "model.onnx")
    return {n.name: attrs(n) for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_startup_hook_imports_nothing_heavy(tmp_path):
    code = (
        "import sys; print(sorted(m for m in ('olive', 'numpy', 'torch', 'onnx') if m in sys.modules));"
        "print([type(f).__module__ for f in sys.meta_path if type(f).__name__ == '_Finder'])"
    )
    result = run([sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    heavy, finders = result.stdout.splitlines()
    assert heavy == "[]"
    assert finders == "['olive_int4_pass.olive.registration']"


def test_register_works_where_pth_files_are_not_processed(model_path, tmp_path):
    """``python -S`` skips site, so the start-up hook never runs: without ``register()`` Olive does not know our
    pass type; with it, a workflow runs. (site-packages and the checkout are put on PYTHONPATH by hand.)"""
    import site

    code = textwrap.dedent(
        """
        import json, sys
        assert "site" not in sys.modules and not any(type(f).__name__ == "_Finder" for f in sys.meta_path)
        if sys.argv[2] == "register":
            import olive_int4_pass
            olive_int4_pass.register()
        from olive.workflows import run
        run(json.loads(sys.argv[1]))
        """
    )
    paths = [*site.getsitepackages(), str(Path(olive_int4_pass.__file__).parents[1])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    for mode in ("plain", "register"):
        config = json.dumps(workflow(model_path, tmp_path / mode))
        result = run([sys.executable, "-S", "-c", code, config, mode], tmp_path, env=env)
        if mode == "plain":
            assert result.returncode != 0 and "onnxint4rtnquantization' not found" in result.stderr.lower()
            assert not (tmp_path / mode / "model.onnx").exists()
        else:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert quantized_nodes(tmp_path / mode)["/model/mm_Q4"]["bits"] == 4


def test_olive_run_yaml_with_no_extra_flag(model_path, tmp_path):
    config = tmp_path / "int4.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            input_model:
              type: ONNXModel
              model_path: {model_path}
            passes:
              int4:
                type: OnnxInt4RtnQuantization
                accuracy_level: 4
                lm_head: int8
            output_dir: out
            """
        )
    )
    result = run([*OLIVE, "run", "--config", str(config)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nodes = quantized_nodes(tmp_path / "out")
    assert nodes["/model/mm_Q4"] == {"K": 64, "N": 64, "accuracy_level": 4, "bits": 4, "block_size": 32}
    assert nodes["/lm_head/MatMul_Q8"]["bits"] == 8


def test_python_api_and_a_failing_run_in_one_process(model_path, tmp_path):
    # olive.workflows.run(dict) works; a bad option raises a typed error out of Olive (no silent exit 0).
    code = textwrap.dedent(
        """
        import json, sys
        from olive.workflows import run
        run(json.loads(sys.argv[1]))
        try:
            run(json.loads(sys.argv[2]))
        except ValueError as e:
            print("RAISED:", e)
        """
    )
    good = json.dumps(workflow(model_path, tmp_path / "good", block_size=64))
    bad = json.dumps(workflow(model_path, tmp_path / "bad", block_size=48))
    result = run([sys.executable, "-c", code, good, bad], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert quantized_nodes(tmp_path / "good")["/model/mm_Q4"]["block_size"] == 64
    assert "RAISED:" in result.stdout and "power of two >= 16" in result.stdout
    assert not (tmp_path / "bad" / "model.onnx").exists()


def test_olive_run_exits_non_zero_on_a_bad_model(tmp_path):
    src = tmp_path / "in" / "model.onnx"
    w = np.ones((64, 32), np.float32)
    w[0, 0] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    make_model(nodes, [tensor_info("x", np.float32, [1, 64])], [tensor_info("y", np.float32, [1, 32])], {"W": w}, src)
    config = tmp_path / "bad.json"
    config.write_text(json.dumps(workflow(src, tmp_path / "out")))
    result = run([*OLIVE, "run", "--config", str(config)], tmp_path)
    assert result.returncode != 0
    assert "non-finite" in result.stdout + result.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_run_pass_and_a_user_package_config(model_path, tmp_path):
    result = run(
        [*OLIVE, "run-pass", "--pass-name", "OnnxInt4RtnQuantization", "-m", str(model_path), "-o", "rp"], tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(quantized_nodes(tmp_path / "rp")) == 2

    # A user's own package config replaces Olive's wholesale: our pass type still resolves alongside theirs.
    user_config = tmp_path / "my_olive_config.json"
    user_config.write_text(
        json.dumps(
            {
                "passes": {
                    "OnnxPeepholeOptimizer": {
                        "module_path": "olive.passes.onnx.peephole_optimizer.OnnxPeepholeOptimizer"
                    }
                }
            }
        )
    )
    config = tmp_path / "wf.json"
    config.write_text(json.dumps(workflow(model_path, tmp_path / "pc", bits=8)))
    result = run([*OLIVE, "run", "--config", str(config), "--package-config", str(user_config)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {a["bits"] for a in quantized_nodes(tmp_path / "pc").values()} == {8}


def test_plugin_version_is_part_of_the_pass_config():
    from olive.hardware.accelerator import DEFAULT_CPU_ACCELERATOR

    from olive_int4_pass.olive.quantize_pass import OnnxInt4RtnQuantization

    params = OnnxInt4RtnQuantization.default_config(DEFAULT_CPU_ACCELERATOR)
    assert params["plugin_version"].default_value == olive_int4_pass.__version__
    assert params["save_as_external_data"].default_value is True


def test_a_new_plugin_version_is_not_served_from_olives_cache(model_path, tmp_path):
    """Three runs over one cache_dir: the same config is served from Olive's cache, another plugin_version is not.

    The reference is Olive's own engine log: "Loaded model from cache: <id>" for a hit, "Pass int4:... finished"
    for a run, and the output model id it derives from the pass config.
    """
    code = textwrap.dedent(
        """
        import json, sys
        from olive.workflows import run
        for label, config in json.loads(sys.argv[1]):
            print(f"=== {label}", flush=True)
            run(config)
        """
    )
    cache = tmp_path / "cache"

    def config(out, **pass_config):
        return {**workflow(model_path, tmp_path / out, **pass_config), "cache_dir": str(cache)}

    runs = [
        ("first", config("a")),
        ("again", config("b")),
        ("upgraded", config("c", plugin_version="99.0.0")),
    ]
    result = run([sys.executable, "-c", code, json.dumps(runs)], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = dict(part.split("\n", 1) for part in result.stdout.split("=== ")[1:])

    def ran(log):
        return re.search(r"Pass int4:onnxint4rtnquantization finished", log, re.IGNORECASE) is not None

    hit = "Loaded model from cache: "
    assert ran(logs["first"]) and hit not in logs["first"]
    assert hit in logs["again"] and not ran(logs["again"])  # the cache does work
    assert ran(logs["upgraded"]) and hit not in logs["upgraded"]
    # Olive's run records: the first run's output id (the one the second run loaded) and a new one.
    cached_id = logs["again"].split(hit)[1].split()[0]
    run_ids = {p.name for p in (cache / "default_workflow" / "runs").iterdir()}
    assert cached_id in run_ids and len(run_ids) == 2, run_ids
    for out in ("a", "b", "c"):
        assert quantized_nodes(tmp_path / out)["/model/mm_Q4"]["bits"] == 4


def test_every_quantize_option_is_a_pass_parameter_and_reaches_the_options():
    import dataclasses

    from olive.hardware.accelerator import DEFAULT_CPU_ACCELERATOR

    from olive_int4_pass.olive.quantize_pass import OnnxInt4RtnQuantization, _options_from
    from olive_int4_pass.options import QuantizeOptions

    params = OnnxInt4RtnQuantization.default_config(DEFAULT_CPU_ACCELERATOR)
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    assert fields <= set(params), fields - set(params)
    values = {name: p.default_value for name, p in params.items()}
    values.update(quality="balanced", sensitivity="measured", sensitivity_tokens=64)
    config = OnnxInt4RtnQuantization.generate_config(DEFAULT_CPU_ACCELERATOR, values)
    options = _options_from(config)
    assert (options.sensitivity, options.sensitivity_tokens, options.mixed_precision_budget) == ("measured", 64, 0.03)
