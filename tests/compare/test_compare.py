"""``olive-int4 compare`` end to end on a tiny model, its numerics against hand-computed values, the Olive metric."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from onnx_helpers import initializers, load_onnx
from tiny_models import save_tiny_model

from olive_int4_pass.cli import main
from olive_int4_pass.compare.metrics import (
    QualityTotals,
    kl_divergence,
    perplexity,
    perplexity_change,
    token_nll,
    top1_agreement,
)
from olive_int4_pass.compare.scoring import token_windows
from olive_int4_pass.compare.variants import (
    QUANTIZED_PRESETS,
    STAMP,
    Variant,
    _quantize,
    build_variants,
    infer_label,
    size_on_disk,
)
from olive_int4_pass.genai.decoder import log_softmax
from olive_int4_pass.olive.metric import evaluate_quality

# Small enough to keep the module to well under a minute on 2 cores; the tiny model's context is 256 tokens.
FAST = ["--window", "64", "--max-tokens", "256", "--prompt-tokens", "16", "--decode-tokens", "8", "--quiet"]


# --- quality_metrics against hand-computed values ---


def test_log_softmax_by_hand():
    got = log_softmax(np.array([[0.0, math.log(3.0)], [5.0, 5.0]], np.float16))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.log([[0.25, 0.75], [0.5, 0.5]]), atol=1e-3)  # fp16 input: log(3) rounded
    big = log_softmax(np.array([1000.0, 1000.0 + math.log(3.0)]))  # no overflow: the max is subtracted first
    np.testing.assert_allclose(big, np.log([0.25, 0.75]), rtol=1e-6)


def test_nll_and_perplexity_by_hand():
    uniform4 = np.full((3, 4), math.log(0.25), np.float32)
    np.testing.assert_allclose(token_nll(uniform4, np.array([0, 3, 1])), [math.log(4)] * 3, rtol=1e-6)
    # Windows of 3 tokens at NLL ln 4 and 1 token at ln 2: exp((3 ln 4 + ln 2) / 4) = 2 ** (7 / 4).
    assert perplexity([3 * math.log(4), math.log(2)], [3, 1]) == pytest.approx(2 ** (7 / 4), rel=1e-12)
    with pytest.raises(ValueError, match="lie in"):
        token_nll(uniform4, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="positive token counts"):
        perplexity([1.0], [0])


def test_kl_divergence_by_hand():
    with np.errstate(divide="ignore"):
        p = np.log(np.array([[0.5, 0.5], [1.0, 0.0]]))  # log 0 = -inf: a token the reference rules out
    q = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3); p = (1, 0) vs (0.5, 0.5): ln 2 (the 0-probability term is 0).
    np.testing.assert_allclose(kl_divergence(p, q), [0.5 * math.log(4 / 3), math.log(2)], rtol=1e-12)
    assert kl_divergence(q, q).tolist() == [0.0, 0.0]
    # The variant gives 0 to a token the reference does not: infinitely surprised.
    assert kl_divergence(q, p)[1] == math.inf
    with pytest.raises(ValueError, match="differ in shape"):
        kl_divergence(p, q[:1])


def test_top1_agreement_and_totals_by_hand():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    var = np.array([[0.0, 5.0, 1.0], [0.0, 1.0, 2.0]])
    assert top1_agreement(ref, var).tolist() == [True, False]

    totals = QualityTotals()
    ref_lp, var_lp = log_softmax(ref), log_softmax(var)
    totals.add_window(var_lp, np.array([1, 2]), ref_lp)
    totals.add_window(var_lp[:1], np.array([0]), ref_lp[:1])
    nll = [-var_lp[0, 1] - var_lp[1, 2], -var_lp[0, 0]]
    assert totals.perplexity == pytest.approx(math.exp(sum(nll) / 3), rel=1e-6)
    assert totals.window_perplexities == pytest.approx([math.exp(nll[0] / 2), math.exp(nll[1])], rel=1e-6)
    kl = kl_divergence(ref_lp, var_lp)
    assert totals.kl_divergence == pytest.approx((kl[0] + kl[1] + kl[0]) / 3, rel=1e-9)
    assert totals.top1_agreement == pytest.approx(2 / 3)


def test_perplexity_change_and_its_error():
    rng = np.random.default_rng(0)
    ref = rng.exponential(2.0, 4096)
    assert perplexity_change(ref, ref) == (0.0, 0.0)
    change, two_se = perplexity_change(ref + 0.01, ref)  # the same shift everywhere: exact, no spread
    assert change == pytest.approx(math.exp(0.01) - 1) and two_se == pytest.approx(0.0, abs=1e-12)
    noisy = ref + 0.01 + rng.normal(0, 0.5, ref.size)
    change, two_se = perplexity_change(noisy, ref)
    assert two_se > 0 and abs(change - (math.exp(0.01) - 1)) < 2 * two_se
    _, two_se_short = perplexity_change(noisy[:512], ref[:512])
    assert two_se_short > 1.5 * two_se  # a quarter of the text: about twice the error
    assert math.isnan(perplexity_change(noisy[:200], ref[:200])[1])  # one chunk: no error estimate
    with pytest.raises(ValueError, match="equal"):
        perplexity_change(noisy[:10], ref[:11])


def test_token_windows():
    windows = token_windows(np.arange(10), 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(w) for w in token_windows(np.arange(9), 4)] == [4, 4]  # a 1-token tail predicts nothing
    assert [len(w) for w in token_windows(np.arange(100), 8, max_tokens=20)] == [8, 8, 4]
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(np.arange(1), 4)


# --- --calibration reaches every preset that calibrates ---


def test_calibration_file_reaches_every_calibrating_preset(builder_exports, tmp_path, monkeypatch):
    """``olive-int4 compare --calibration FILE``: int4-search calibrates without a quality preset, and used to be
    quantized on the built-in text regardless."""
    import olive_int4_pass.pipeline

    calls = []

    def fake_quantize_file(model_file, out, options, **kwargs):
        calls.append(options)
        Path(out).mkdir(parents=True)
        shutil.copy(model_file, Path(out) / "model.onnx")

    monkeypatch.setattr(olive_int4_pass.pipeline, "quantize_file", fake_quantize_file)
    source = Variant("fp32", builder_exports["fp32-cpu"], "given")
    text = str(tmp_path / "calibration.txt")
    Path(text).write_text("A calibration text of the user's own. " * 20, encoding="utf-8")
    for name in ("int4", "int4-search", "int4-compensated", "int4-balanced", "int4-max"):
        variant = _quantize(name, source, QUANTIZED_PRESETS[name], text, tmp_path / "work")
        recipe = json.loads((variant.package_dir / STAMP).read_text())["quantize"]["options"]
        options = calls.pop()
        assert options.calibration == recipe.get("calibration") == (text if name != "int4" else None), name
    # Without the option the calibrating presets use their own text: the recipe differs, so they are rebuilt.
    variant = _quantize("int4-search", source, QUANTIZED_PRESETS["int4-search"], None, tmp_path / "work")
    assert calls.pop().calibration == "default" and not variant.origin.endswith("(reused)")


# --- the command, end to end ---


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``olive-int4 compare HF_DIR`` with the default variants, run once for the module."""
    root = tmp_path_factory.mktemp("compare")
    hf = save_tiny_model(root / "hf", "qwen2")
    out = root / "report"
    result = subprocess.run(
        [sys.executable, "-m", "olive_int4_pass", "compare", str(hf), "-o", str(out), "--runs", "1", *FAST],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    return {"hf": hf, "out": out, "stdout": result.stdout, "rows": {v["name"]: v for v in report["variants"]}}


def test_table_and_figure_are_written(compared):
    out, stdout = compared["out"], compared["stdout"]
    for label, name in (("table", "report.md"), ("figure", "report.png"), ("data", "report.json")):
        assert f"{label}: {out / name}" in stdout
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.png").stat().st_size > 10_000  # four panels, not an empty canvas
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [r.split("|")[1].strip() for r in rows] == ["fp32 (ref)", "fp16", "int8", "int4"]
    assert "| fp32 (ref) |" in stdout  # the table is printed too


def test_numbers_are_finite_and_consistent(compared):
    rows = compared["rows"]
    assert list(rows) == ["fp32", "fp16", "int8", "int4"]
    for name, row in rows.items():
        for key in ("perplexity", "kl_divergence", "top1_agreement", "prefill_tokens_per_s", "decode_tokens_per_s"):
            assert math.isfinite(row[key]), (name, key)
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert 30e6 < row["peak_rss_bytes"] < 2e9, name  # a process that loaded onnxruntime-genai and a tiny model
        assert min(row["window_perplexities"]) <= row["perplexity"] <= max(row["window_perplexities"])
        assert len(row["window_perplexities"]) == 4  # 256 tokens in windows of 64
        assert row["size_bytes"] == size_on_disk(Path(compared["out"]) / "variants" / name / "model.onnx")
    size = {name: row["size_bytes"] for name, row in rows.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]
    # The reference against itself: exactly 0 and 1, through the same code path as every other variant.
    assert rows["fp32"]["is_reference"] and rows["fp32"]["kl_divergence"] == 0.0
    assert rows["fp32"]["top1_agreement"] == 1.0
    assert rows["fp32"]["perplexity_change"] == 0.0
    for row in rows.values():  # the change is the perplexities' ratio
        assert row["perplexity_change"] == pytest.approx(row["perplexity"] / rows["fp32"]["perplexity"] - 1, rel=1e-6)
    # Fewer bits, further from the reference (by orders of magnitude on this model).
    assert 0 < rows["fp16"]["kl_divergence"] < rows["int8"]["kl_divergence"] < rows["int4"]["kl_divergence"]
    assert rows["int4"]["top1_agreement"] < 1.0
    assert rows["fp16"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"], rel=1e-3)


def test_variants_are_reused_and_given_folders_used(compared, tmp_path):
    out, variants = compared["out"], compared["out"] / "variants"
    int4_mtime = (variants / "int4" / "model.onnx").stat().st_mtime_ns
    # A bare ONNX folder (no genai_config.json) borrows the FP32 package's side files.
    bare = tmp_path / "bare-int4"
    bare.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        (bare / name).write_bytes((variants / "int4" / name).read_bytes())
    argv = ["compare", str(compared["hf"]), "-o", str(out), "--variants", "fp32,int4,int4-max", "--runs", "0"]
    assert main([*argv, "--use", f"mine={bare}", *FAST]) == 0
    assert (variants / "int4" / "model.onnx").stat().st_mtime_ns == int4_mtime  # same recipe: not rebuilt
    rows = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert list(rows) == ["fp32", "int4", "int4-max", "mine"]
    assert rows["int4"]["origin"].endswith("(reused)") and rows["mine"]["origin"].startswith("given:")
    assert rows["mine"]["kl_divergence"] == rows["int4"]["kl_divergence"]  # same bytes, same numbers
    assert rows["int4-max"]["peak_rss_bytes"] is None  # --runs 0: no speed measurement
    assert rows["int4-max"]["kl_divergence"] > 0 and math.isfinite(rows["int4-max"]["perplexity"])
    assert infer_label(variants / "fp16" / "model.onnx") == "fp16" and infer_label(bare / "model.onnx") == "int4"


def test_clear_errors(compared, tmp_path, capsys):
    fp32 = str(compared["out"] / "variants" / "fp32")
    cases = [
        (["--variants", "fp32,int3"], "unknown variant 'int3'"),
        (["--variants", "fp16", "--use", f"fp32={fp32}"], "exported from a Hugging Face model"),
        (["--use", f"fp32={fp32}", "--variants", "fp32", "--reference", "fp16"], "reference 'fp16' is not one of"),
        (["--use", f"fp32={tmp_path / 'missing'}"], "does not exist"),
        (["--use", f"fp32={fp32}", "--window", "1"], "window must be an integer >= 2"),
    ]
    for args, message in cases:
        assert main(["compare", "-o", str(tmp_path / "out"), "--runs", "0", "--quiet", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_an_unknown_quantize_option_is_named(compared, tmp_path):
    with pytest.raises(ValueError, match=r"QuantizeOptions\(no_such_option=...\), which this version"):
        build_variants(
            None,
            ["int4-x"],
            tmp_path,
            given={"fp32": compared["out"] / "variants" / "fp32"},
            presets={"int4-x": {"no_such_option": 1}},
            progress=False,
        )


# --- the Olive metric ---


def test_olive_metric_matches_the_report(compared):
    variants = compared["out"] / "variants"
    got = evaluate_quality(variants / "int4", reference=variants / "fp32", window=64, max_tokens=256)
    row = compared["rows"]["int4"]
    for key in ("perplexity", "kl_divergence", "top1_agreement"):
        assert got[key] == pytest.approx(row[key], rel=1e-9), key
    assert got["reference_perplexity"] == pytest.approx(compared["rows"]["fp32"]["perplexity"], rel=1e-9)
    assert got["size_bytes"] == row["size_bytes"]
    same = evaluate_quality(variants / "fp32" / "model.onnx", reference=variants / "fp32", window=64, max_tokens=256)
    assert same["kl_divergence"] == 0.0 and same["top1_agreement"] == 1.0
    with pytest.raises(ValueError, match=r"genai_config\.json"):
        evaluate_quality(variants / "int4", reference=compared["hf"])


def test_olive_run_reports_quality(compared, tmp_path):
    variants = compared["out"] / "variants"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        input_model: {{type: ONNXModel, model_path: {variants / "fp32"}, onnx_file_name: model.onnx}}
        passes:
          int4: {{type: OnnxInt4RtnQuantization, accuracy_level: 4}}
        evaluators:
          quality:
            metrics:
              - name: quality
                type: custom
                sub_types:
                  - {{name: perplexity, priority: 1, higher_is_better: false}}
                  - {{name: kl_divergence, priority: 2, higher_is_better: false}}
                  - {{name: top1_agreement, priority: 3, higher_is_better: true}}
                user_config:
                  user_script: {Path(__file__).parents[2] / "recipes" / "quality_metric.py"}
                  evaluate_func: evaluate_quality
                  evaluate_func_kwargs: {{reference: {variants / "fp32"}, window: 64, max_tokens: 256}}
        evaluator: quality
        evaluate_input_model: false
        output_dir: {tmp_path / "out"}
        """)
    )
    # CI=1: Olive 0.13 skips its telemetry heartbeat (it waits ~10 s for it at exit without network).
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "CI": "1"}
    cmd = [sys.executable, "-m", "olive_int4_pass.olive.metric", "run", "--config", str(recipe)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    row = compared["rows"]["int4"]  # the pass writes the bytes the report's INT4 has
    assert metrics["quality-kl_divergence"]["value"] == pytest.approx(row["kl_divergence"], rel=1e-9)
    assert metrics["quality-top1_agreement"]["value"] == pytest.approx(row["top1_agreement"], rel=1e-9)
    assert metrics["quality-perplexity"]["value"] == pytest.approx(row["perplexity"], rel=1e-9)


# --- progress bars ---


def run_in_pty(cmd: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdin/stdout/stderr on a pseudo-terminal (as in a user's shell): exit code and output."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    # 40 rows x 120 columns: a new pseudo-terminal is 0 x 0, and tqdm draws a bar 0 columns wide.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_compare_shows_progress_bars_on_a_terminal(compared, tmp_path):
    """docs/compare.md: "with progress bars meanwhile" - tqdm's bars, drawn with carriage returns, on a terminal."""
    variants = compared["out"] / "variants"
    argv = ["compare", "-o", str(tmp_path / "out"), "--variants", "fp32,int4", "--runs", "0"]
    argv += ["--use", f"fp32={variants / 'fp32'}", "--use", f"int4={variants / 'int4'}"]
    argv += ["--window", "64", "--max-tokens", "256"]
    code, output = run_in_pty([sys.executable, "-m", "olive_int4_pass", *argv], tmp_path)
    assert code == 0, output[-3000:]
    assert re.search(r"accuracy: +100%\|[█ ]*\| 2/2", output), output[-3000:]  # the variants' bar, finished
    assert re.search(r"fp32: +\d+%\|.*window", output), output[-3000:]  # a bar over each variant's windows
    assert "\r" in output  # redrawn in place
    # --quiet: no bar, the table alone.
    code, quiet = run_in_pty([sys.executable, "-m", "olive_int4_pass", *argv, "--quiet"], tmp_path)
    assert code == 0 and "| fp32 (ref) |" in quiet and "%|" not in quiet, quiet[-3000:]
    # Off a terminal (a log file, CI): no bar either, as quantize draws its own only on a terminal.
    piped = subprocess.run(
        [sys.executable, "-m", "olive_int4_pass", *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert piped.returncode == 0 and "%|" not in piped.stderr + piped.stdout, piped.stderr[-3000:]


# --- int4-search: "the int4 size exactly" ---


@pytest.mark.parametrize("variant", ["int4-search", "int4-compensated"])
def test_int4_search_is_the_int4_size_exactly(builder_exports, tmp_path, variant):
    """docs/compare.md and docs/quality.md: int4-search and int4-compensated cost no byte over int4. Sizes from the
    file system."""
    from olive_int4_pass.options import QuantizeOptions
    from olive_int4_pass.pipeline import quantize_file

    src = builder_exports["fp32-cpu"] / "model.onnx"
    out = {}
    for name in ("int4", variant):
        out[name] = quantize_file(src, tmp_path / name, QuantizeOptions(**QUANTIZED_PRESETS[name]), progress=False)
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "int4" / file).stat().st_size == (tmp_path / variant / file).stat().st_size, file
    plain, searched = (initializers(load_onnx(out[name])) for name in ("int4", variant))
    assert {k: (v.dtype, v.shape) for k, v in plain.items()} == {k: (v.dtype, v.shape) for k, v in searched.items()}
    changed = [k for k in plain if k.endswith("_scales") and not np.array_equal(plain[k], searched[k])]
    assert changed  # it did search: same bytes on disk, other scales
