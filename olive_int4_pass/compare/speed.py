"""Prefill / decode speed and peak memory of an onnxruntime-genai package, measured in a fresh process per package.

A child process per package keeps one variant's memory from inflating the next one's peak. The child
(``python -m olive_int4_pass.compare.speed``) runs one warm-up generation, then ``runs`` timed ones, greedy,
forcing ``decode_tokens`` new tokens (``min_length``), and reports its own peak resident set size (``VmHWM`` of
``/proc/self/status``). ``ru_maxrss`` is only the fallback (non-Linux, from ``os.wait4``): Linux carries the
*parent's* peak across fork + exec into the child's ``ru_maxrss``, which then reads the same for every variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass
class SpeedResult:
    """Medians over the timed runs; ``peak_rss_bytes`` covers the whole child process (load, warm-up, runs)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int | None
    prefill_runs: list[float]
    decode_runs: list[float]


def measure_speed(
    package_dir: str | os.PathLike,
    prompt_ids: Sequence[int],
    decode_tokens: int,
    runs: int = 3,
    *,
    timeout_s: float = 3600.0,
) -> SpeedResult:
    """Run the worker on ``package_dir`` (on CPU whatever provider it names) and collect its numbers."""
    if runs < 1 or decode_tokens < 2 or len(prompt_ids) < 1:
        raise ValueError(
            f"need runs >= 1, decode_tokens >= 2 and a prompt, got {runs}, {decode_tokens}, {len(prompt_ids)}"
        )
    with tempfile.TemporaryDirectory(prefix="olive-int4-speed.") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"prompt_ids": [int(i) for i in prompt_ids]}), encoding="utf-8")
        cmd = [sys.executable, "-m", "olive_int4_pass.compare.speed", str(package_dir), str(request), str(result)]
        cmd += ["--decode-tokens", str(decode_tokens), "--runs", str(runs)]
        log = Path(tmp) / "log.txt"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            status, peak_kib = _wait(proc, timeout_s)
        if status != 0 or not result.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise ValueError(f"speed measurement of {package_dir} failed (exit status {status}):\n{tail}")
        data = json.loads(result.read_text(encoding="utf-8"))
    return SpeedResult(
        prefill_tokens_per_s=statistics.median(data["prefill"]),
        decode_tokens_per_s=statistics.median(data["decode"]),
        peak_rss_bytes=data.get("peak_rss_bytes") or (_maxrss_bytes(peak_kib) if peak_kib else None),
        prefill_runs=data["prefill"],
        decode_runs=data["decode"],
    )


def _maxrss_bytes(value: int) -> int:
    return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB elsewhere


def _peak_rss_self() -> int | None:
    """This process's own peak resident set (Linux), unaffected by the parent's memory before exec."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def _wait(proc: subprocess.Popen, timeout_s: float) -> tuple[int, int]:
    """Exit status and ``ru_maxrss`` of the child (0 where ``os.wait4`` does not exist, e.g. Windows)."""
    if not hasattr(os, "wait4"):
        try:
            return proc.wait(timeout=timeout_s), 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ValueError(f"speed measurement took longer than {timeout_s:.0f} s; killed it") from None
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from reaping it again
            return proc.returncode, usage.ru_maxrss
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ValueError(f"speed measurement took longer than {timeout_s:.0f} s; killed it")
        time.sleep(0.05)


def _generate_once(og, model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation."""
    params = og.GeneratorParams(model)
    total = len(prompt) + decode_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)  # the prefill forward pass
    prefill_s = time.perf_counter() - start
    generator.generate_next_token()  # picks the first new token from the prefill's logits: no forward pass
    start = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()  # one decode forward pass each
        steps += 1
    decode_s = time.perf_counter() - start
    if steps == 0:
        raise RuntimeError("the generator stopped after the first token")
    return len(prompt) / prefill_s, steps / decode_s


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m olive_int4_pass.compare.speed", description=__doc__)
    parser.add_argument("package_dir")
    parser.add_argument("request", help="JSON file with prompt_ids")
    parser.add_argument("result", help="JSON file to write prefill/decode tokens per second into")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    import onnxruntime_genai as og

    prompt = json.loads(Path(args.request).read_text(encoding="utf-8"))["prompt_ids"]
    config = og.Config(args.package_dir)
    config.clear_providers()  # CPU, whatever the package was built for (fp16 GQA runs on CPU)
    model = og.Model(config)
    _generate_once(og, model, prompt, args.decode_tokens)  # warm-up: allocations, kernel selection
    prefill, decode = [], []
    for _ in range(args.runs):
        p, d = _generate_once(og, model, prompt, args.decode_tokens)
        prefill.append(p)
        decode.append(d)
    result = {"prefill": prefill, "decode": decode, "peak_rss_bytes": _peak_rss_self()}
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
