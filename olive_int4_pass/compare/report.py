"""The comparison's outputs: a Markdown table (and what each column means), a PNG figure, the raw numbers as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class VariantResult:
    """Everything measured for one variant; speed fields are ``None`` when speed was not measured."""

    name: str
    origin: str
    size_bytes: int
    perplexity: float
    window_perplexities: list[float]
    kl_divergence: float
    top1_agreement: float
    is_reference: bool = False
    peak_rss_bytes: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    perplexity_change: float | None = None  # vs the reference, on the same positions
    perplexity_change_2se: float | None = None


COLUMNS = {
    "variant": "name; (ref) marks the reference the KL and top-1 columns compare against",
    "size": "model.onnx + its external data on disk",
    "vs ref": "size relative to the reference",
    "peak RSS": "peak resident memory of a process that loads the model and generates (onnxruntime-genai, CPU)",
    "prefill tok/s": "prompt tokens per second of the first forward pass (median of the runs)",
    "decode tok/s": "new tokens per second after the prompt, greedy (median of the runs)",
    "perplexity": "exp(mean next-token NLL) over all windows; lower is better",
    "ppl vs ref": "perplexity / the reference's − 1, ± two standard errors of the paired per-token NLL difference"
    " (in 128-token chunks): a gap between two variants well inside their ± is one this text cannot settle",
    "ppl min–max": "perplexity of the best and worst single window: how much a short text moves it",
    "KL vs ref": "mean KL(p_ref || p_variant) of next-token distributions, nats per token; 0 = identical",
    "top-1 vs ref": "fraction of positions where the variant's most likely next token is the reference's",
}


def markdown(results: Sequence[VariantResult], meta: Mapping[str, Any]) -> str:
    """The report: a settings header, the table, and a legend of the columns."""
    ref = next(r for r in results if r.is_reference)
    lines = [f"# {meta.get('title', 'FP32 / FP16 / INT8 / INT4 comparison')}", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "title"]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for r in results:
        window_ppl = f"{min(r.window_perplexities):.3f}–{max(r.window_perplexities):.3f}"
        cells = [
            f"{r.name} (ref)" if r.is_reference else r.name,
            human_bytes(r.size_bytes),
            f"×{r.size_bytes / ref.size_bytes:.2f}",
            human_bytes(r.peak_rss_bytes) if r.peak_rss_bytes is not None else "–",
            _rate(r.prefill_tokens_per_s),
            _rate(r.decode_tokens_per_s),
            f"{r.perplexity:.3f}",
            _change(r.perplexity_change, r.perplexity_change_2se),
            window_ppl,
            _kl(r.kl_divergence),
            f"{r.top1_agreement:.2%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns:", ""] + [f"- **{name}**: {meaning}" for name, meaning in COLUMNS.items()]
    lines += ["", "Variants:", ""] + [f"- **{r.name}**: {r.origin}" for r in results]
    return "\n".join(lines) + "\n"


def _change(change: float | None, two_se: float | None) -> str:
    if change is None:
        return "–"
    spread = "" if two_se is None or math.isnan(two_se) else f" ± {two_se:.2%}"
    return f"{change:+.2%}{spread}"


def write_json(path: str | os.PathLike, results: Sequence[VariantResult], meta: Mapping[str, Any]) -> Path:
    path = Path(path)
    data = {"meta": dict(meta), "variants": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def plot(path: str | os.PathLike, results: Sequence[VariantResult], title: str = "") -> Path:
    """Four panels: size, speed, KL / top-1 against the reference, perplexity against size."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    names = [r.name for r in results]
    palette = [c for c in plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]]
    palette = [c for c in palette if len(set(c)) > 1]  # the greys belong to the prefill bars
    colors = [palette[i % len(palette)] for i in range(len(results))]
    x = range(len(results))
    fig, ((ax_size, ax_speed), (ax_kl, ax_ppl)) = plt.subplots(2, 2, figsize=(12, 8.5))

    sizes_gb = [r.size_bytes / 1e9 for r in results]
    ax_size.bar(x, sizes_gb, color=colors)
    ax_size.set_title("size on disk (GB)")
    _label_bars(ax_size, sizes_gb, "{:.2f}".format)

    if all(r.decode_tokens_per_s is not None for r in results):
        width = 0.4
        prefill = [r.prefill_tokens_per_s for r in results]
        decode = [r.decode_tokens_per_s for r in results]
        ax_speed.bar([i - width / 2 for i in x], prefill, width, color="C7")
        ax_speed.bar([i + width / 2 for i in x], decode, width, color=colors)
        ax_speed.set_yscale("log")
        _label_bars(ax_speed, decode, _rate, offset=width / 2)
    else:
        ax_speed.text(0.5, 0.5, "speed not measured", ha="center", va="center", transform=ax_speed.transAxes)
    ax_speed.set_title("tokens/s, CPU median: prefill (grey), decode (colour)")

    kl = [r.kl_divergence for r in results]
    ax_kl.bar(x, kl, color=colors)
    ax_kl.set_title("KL vs reference (nats/token); labels: top-1 agreement")
    _label_bars(ax_kl, kl, None, texts=[f"{r.top1_agreement:.1%}" for r in results])

    # Close points (variants of one size) get their labels on alternating sides, in order of perplexity.
    by_ppl = sorted(range(len(results)), key=lambda i: results[i].perplexity)
    for rank, i in enumerate(by_ppl):
        r = results[i]
        ax_ppl.scatter(r.size_bytes / 1e9, r.perplexity, color=colors[i], s=50)
        offset, align = ((6, -3), "left") if rank % 2 == 0 else ((-6, -3), "right")
        ax_ppl.annotate(
            r.name, (r.size_bytes / 1e9, r.perplexity), textcoords="offset points", xytext=offset, ha=align, fontsize=8
        )
    ax_ppl.set_xlabel("size on disk (GB)")
    ax_ppl.set_title("perplexity vs size (lower left is better)")
    ax_ppl.margins(x=0.3)

    for ax in (ax_size, ax_speed, ax_kl):
        ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _kl(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.2e}"  # random/tiny models: 1e-7 is not 0


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _label_bars(ax, values, fmt=None, *, offset: float = 0.0, texts: Sequence[str] | None = None) -> None:
    for i, value in enumerate(values):
        if value is None or not math.isfinite(value):
            continue
        text = texts[i] if texts is not None else fmt(value)
        ax.annotate(text, (i + offset, value), ha="center", va="bottom", fontsize=8)
