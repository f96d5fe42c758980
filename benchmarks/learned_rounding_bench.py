"""Learned rounding (AutoRound-class) against each decoder layer's output, measured beside GPTQ at the same bytes.

    python benchmarks/learned_rounding_bench.py HF_DIR --calibration calib.txt --eval eval.txt --out OUT
    python benchmarks/learned_rounding_bench.py HF_DIR ... --layers 4 --no-eval     # the first layers' losses only

An experiment, not package code: it works on the Hugging Face model in torch (the package quantizes ONNX graphs,
which have no gradient). All variants are symmetric block-32 INT4 at exactly the int4 size, every decoder MatMul
and the lm_head (tied: the shared table):

- ``gptq``: the package's searched scales (``search_scales`` under ``E[x^2]``), then our GPTQ in torch (act-order,
  damping ``--damp`` of mean diag H, the whole input at once) from the float model's inputs;
- ``learned``: per decoder layer, from GPTQ's pre-rounding values ``c`` and scales ``s``, learns a rounding offset
  ``v`` in [-0.5, 0.5] per weight and a factor ``a`` in [0.8, 1.2] per block, ``W = s a clamp(round(c / (s a) + v))``
  (``v = 0, a = 1`` is GPTQ exactly), by signed gradient descent with a linearly decaying step (AutoRound's
  optimiser), on the mean squared error between the layer with rounded weights fed the rounded layers' output and
  the float layer fed the float model's hidden states (``--loss norm``: each output channel's error over its
  ``E[y^2]``). A layer keeps the learned weights only where that loss falls over the whole calibration pool; the
  lm_head keeps GPTQ's;
- ``rtn``: the reference round to nearest (symmetric, the builder's ``-p int4``), for the "of RTN's" ratios.

Scoring (skipped with ``--no-eval``): ``--eval-windows`` windows of ``--eval-window`` tokens of the eval text,
each scored on its own against the float model: perplexity change, KL and top-1 agreement with ``olive_int4_pass
.compare.metrics`` (± = two standard errors, paired, in 128-token chunks), and ``learned`` paired against
``gptq``. Per layer it prints the seconds of GPTQ and of learning and the pool loss of each. The float model's
log-probabilities go to ``OUT/ref_logprobs.npy`` (float32; 6 GB for 10 windows of a 152k vocabulary). Peak RSS
is about twice the float model. Slow on a CPU: measured 15 s per SmolLM2-135M layer and 4-11 minutes per
Qwen2.5-1.5B layer for 60 steps of 512 tokens on 2 cores. Each finished layer is saved under ``OUT/state``; the
same command resumes after the last one (other settings are refused), and reuses ``OUT/ref_logprobs.npy``.
Each variant's per-token scores go to ``OUT/scores_<variant>.npz`` (nll, kl, top1), to pair runs afterwards.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from olive_int4_pass.compare.metrics import kl_divergence, perplexity_change, top1_agreement
from olive_int4_pass.kernels.scale_search import search_scales

BLOCK = 32
QMIN, QMAX = -8, 7  # symmetric 4-bit levels: MatMulNBits stores level + 8 with zero point 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}  # same input, same H
INPUT_OWNERS = tuple(n for n in LINEARS if n not in SHARED_INPUT)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


# ---- numerics -------------------------------------------------------------------------------------------------


def expand(per_block: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, n_blocks]`` -> ``[N, K]``: each block's value on its 32 input rows."""
    return per_block.repeat_interleave(BLOCK, dim=1)[:, :k]


def safe(scales: torch.Tensor) -> torch.Tensor:
    """A divisor for the levels: an all-zero block's scale is 0, its levels anything (they dequantize to 0)."""
    return torch.where(scales == 0, torch.ones_like(scales), scales)


def searched_scales(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The package's symmetric searched scales of ``w[N, K]`` (torch layout), ``[N, n_blocks]`` float32."""
    result = search_scales(w.T.contiguous().numpy(), importance.numpy(), block_size=BLOCK, bits=4, symmetric=True)
    return torch.from_numpy(result.scales.astype(np.float32))


def gptq(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, damp: float, rows: int = 128):
    """GPTQ with fixed block scales and act-order: (levels [N, K] float, pre-rounding values c [N, K])."""
    k = w.shape[1]
    w = w.clone()
    h = h.clone().double()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean_diag = torch.diagonal(h).mean()
    perm = torch.argsort(torch.diagonal(h), descending=True)
    inv = torch.argsort(perm)
    w, s = w[:, perm], safe(expand(scales, k))[:, perm]
    h = h[perm][:, perm]
    for attempt in range(6):
        try:
            damped = h + (damp * 10**attempt) * mean_diag * torch.eye(k, dtype=h.dtype)
            u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).float()
            break
        except torch.linalg.LinAlgError:
            log(f"  H not positive definite at damping {damp * 10**attempt}: damping more")
    else:
        raise ValueError("H could not be factorised")
    levels, centres = torch.zeros_like(w), torch.zeros_like(w)
    for i1 in range(0, k, rows):
        i2 = min(i1 + rows, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col, sj = w1[:, j], s[:, i1 + j]
            q = torch.clamp(torch.round(col / sj), QMIN, QMAX)
            centres[:, i1 + j], levels[:, i1 + j] = col, q
            e = (col - q * sj) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return levels[:, inv], centres[:, inv]


def dequantize(stored: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    levels, scales = stored
    return expand(scales, levels.shape[1]) * levels.float()


def rtn_symmetric(w: torch.Tensor) -> torch.Tensor:
    """The reference round to nearest (symmetric, block 32: the builder's ``-p int4``), dequantized."""
    n, k = w.shape
    pad = (-k) % BLOCK
    b = torch.nn.functional.pad(w, (0, pad)).view(n, -1, BLOCK)
    # The value of largest magnitude, with its sign, over -8: the signed scale onnxruntime writes.
    peak = b.gather(-1, b.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = peak / -8
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    x = b * inv[..., None]
    q = torch.clamp(torch.sign(x) * torch.floor(x.abs() + 0.5) + 8, 0, 15)  # roundf: half away from zero
    return ((q - 8) * scale[..., None]).view(n, -1)[:, :k]


class Learned(torch.nn.Module):
    """One weight's learnable rounding: ``s a clamp(round(c / (s a) + v))`` with a straight-through round."""

    def __init__(self, centres: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.c, self.s, self.k = centres, scales, centres.shape[1]
        self.v = torch.nn.Parameter(torch.zeros_like(centres))
        self.a = torch.nn.Parameter(torch.ones_like(scales))

    def levels(self) -> torch.Tensor:
        x = self.c / safe(expand(self.s * self.a, self.k)) + self.v
        return torch.clamp(x + (torch.round(x) - x).detach(), QMIN, QMAX)

    def weight(self) -> torch.Tensor:
        return expand(self.s * self.a, self.k) * self.levels()

    @torch.no_grad()
    def step(self, lr_v: float, lr_a: float) -> None:  # signSGD, then back into the allowed box
        self.v -= lr_v * torch.sign(self.v.grad)
        self.a -= lr_a * torch.sign(self.a.grad)
        self.v.clamp_(-0.5, 0.5)
        self.a.clamp_(0.8, 1.2)
        self.v.grad = self.a.grad = None


# ---- the model, layer by layer --------------------------------------------------------------------------------


def windows(tokenizer, text: str, length: int, count: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(count, len(ids) // length)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[: n * length]).view(n, length)


class _Captured(Exception):
    pass


def layer_inputs(model, ids: torch.Tensor):
    """Hidden states entering layer 0 for every calibration window, and the keyword arguments a layer takes."""
    captured = {}

    def grab(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    layer0 = model.model.layers[0]
    hook = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    xs = []
    with torch.no_grad():
        for row in ids:
            try:
                model(row[None], use_cache=False)
            except _Captured:
                xs.append(captured["x"].clone())
    hook.remove()
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return torch.cat(xs), kwargs


def forward(layer, x: torch.Tensor, kwargs, params: dict | None = None) -> torch.Tensor:
    """The decoder layer on ``x``, with ``params`` (name -> weight) in place of its own where given."""
    out = torch.func.functional_call(layer, params or {}, (x,), dict(kwargs))
    return out[0] if isinstance(out, tuple) else out


def run_layer(layer, x: torch.Tensor, kwargs, batch: int, params: dict | None = None) -> torch.Tensor:
    return torch.cat([forward(layer, x[i : i + batch], kwargs, params) for i in range(0, len(x), batch)])


def second_moments(layer, x: torch.Tensor, kwargs) -> dict[str, torch.Tensor]:
    """``sum x x^T`` of each linear's input over the pool (float64), and the token count under ``"n"``."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name in INPUT_OWNERS:
        module = _linear(layer, name)

        def add(mod, args, out, name=name):
            a = args[0].reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (a.T @ a).double()  # float32 products of one window, summed in float64

        hooks.append(module.register_forward_hook(add))
    with torch.no_grad():
        run_layer(layer, x, kwargs, 1)
    for hook in hooks:
        hook.remove()
    for name, owner in SHARED_INPUT.items():
        sums[name] = sums[owner]
    sums["n"] = torch.tensor(x.shape[0] * x.shape[1])
    return sums


def _linear(layer, name: str):
    return getattr(layer.self_attn if name in LINEARS[:4] else layer.mlp, name)


def _path(name: str) -> str:
    return f"{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}.weight"


def quantize_gptq(w: torch.Tensor, h: torch.Tensor, n_tokens: int, damp: float):
    importance = (torch.diagonal(h) / n_tokens).float()
    scales = searched_scales(w, importance)
    levels, centres = gptq(w, h, scales, damp)
    return levels, centres, scales


def learn_layer(layer, kwargs, xq, yf, parts: dict[str, Learned], args) -> tuple[float, float, bool]:
    """Learn ``parts`` against ``yf``; returns (pool loss of GPTQ, of learned, learned kept)."""
    weights = {}
    if args.loss == "norm":
        weights["norm"] = 1.0 / yf.pow(2).mean(dim=(0, 1)).clamp_min(1e-12)

    def loss_of(out, target):
        sq = (out - target).pow(2)
        return (sq * weights["norm"]).mean() if "norm" in weights else sq.mean()

    def pool_loss() -> float:
        with torch.no_grad():
            params = {_path(n): p.weight() for n, p in parts.items()}
            total = 0.0
            for i in range(0, len(xq), args.batch):
                out = forward(layer, xq[i : i + args.batch], kwargs, params)
                total += float(loss_of(out, yf[i : i + args.batch])) * len(out)
            return total / len(xq)

    if args.steps == 0:  # GPTQ only
        return math.nan, math.nan, False
    before = pool_loss()
    gen = torch.Generator().manual_seed(0)
    lr = args.lr if args.lr else 1.0 / args.steps
    for step in range(args.steps):
        decay = 1.0 - step / args.steps
        pick = torch.randperm(len(xq), generator=gen)[: args.batch]
        params = {_path(n): p.weight() for n, p in parts.items()}
        loss_of(forward(layer, xq[pick], kwargs, params), yf[pick]).backward()
        for p in parts.values():
            p.step(lr * decay, lr * decay / 10)
    after = pool_loss()
    return before, after, after < before


def settings(args) -> dict:
    """What a saved layer depends on: a resumed run must match it."""
    keys = ("model", "calibration", "tokens", "window", "steps", "batch", "lr", "loss", "damp")
    return {k: str(getattr(args, k)) for k in keys}


def save(path: Path, obj) -> None:
    """Write-then-rename, so that a killed run leaves the previous checkpoint whole."""
    tmp = path.with_suffix(".part")
    torch.save(obj, tmp)
    tmp.replace(path)


def quantize_model(model, tokenizer, args):
    """Returns {param name: dequantized weight} for ``gptq`` and ``learned``, and per-layer logs."""
    text = Path(args.calibration).read_text(encoding="utf-8")
    ids = windows(tokenizer, text, args.window, args.tokens // args.window)
    log(f"calibration: {ids.numel()} tokens in {len(ids)} windows of {args.window}")
    xf, kwargs = layer_inputs(model, ids)
    xq = xf.clone()
    gptq_w, learned_w = {}, {}
    state = Path(args.out) / "state"
    first = 0
    if (state / "stream.pt").exists():
        saved = torch.load(state / "stream.pt")
        if saved["settings"] != settings(args):
            raise ValueError(f"{state} holds a run with other settings {saved['settings']}; use another --out")
        first, xf, xq = saved["next"], saved["xf"], saved["xq"]
        for i in range(first):
            done = torch.load(state / f"layer_{i:03d}.pt")
            gptq_w.update(done["gptq"])
            learned_w.update(done["learned"])
        log(f"resumed from {state}: layers 0-{first - 1} done")
    state.mkdir(parents=True, exist_ok=True)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if args.layers is not None and i >= args.layers:
            break
        if i < first:
            continue
        t0 = time.time()
        sums = second_moments(layer, xf, kwargs)
        with torch.no_grad():
            yf = run_layer(layer, xf, kwargs, args.batch)
        parts = {}
        for name in LINEARS:
            w = _linear(layer, name).weight.detach().float()
            levels, centres, scales = quantize_gptq(w, sums[name], int(sums["n"]), args.damp)
            parts[name] = Learned(centres, scales)
            gptq_w[f"model.layers.{i}.{_path(name)}"] = (levels.to(torch.int8), scales)
        del sums
        t1 = time.time()
        for p in layer.parameters():
            p.requires_grad_(False)
        before, after, kept = learn_layer(layer, kwargs, xq, yf, parts, args)
        t2 = time.time()
        chosen = {}
        for name, p in parts.items():
            key = f"model.layers.{i}.{_path(name)}"
            with torch.no_grad():
                learned_w[key] = (p.levels().to(torch.int8), p.s * p.a) if kept else gptq_w[key]
            chosen[_path(name)] = dequantize(learned_w[key])
        with torch.no_grad():
            xq = run_layer(layer, xq, kwargs, args.batch, chosen)
        xf = yf
        keys = [f"model.layers.{i}.{_path(name)}" for name in LINEARS]
        save(
            state / f"layer_{i:03d}.pt",
            {"gptq": {k: gptq_w[k] for k in keys}, "learned": {k: learned_w[k] for k in keys}},
        )
        save(state / "stream.pt", {"settings": settings(args), "next": i + 1, "xf": xf, "xq": xq})
        change = (after / before - 1) * 100 if before > 0 else math.nan
        log(
            f"layer {i}: GPTQ {t1 - t0:.0f} s, learning {t2 - t1:.0f} s; pool loss GPTQ {before:.4g} -> learned "
            f"{after:.4g} ({change:+.1f} %): {'learned' if kept else 'GPTQ kept'}; peak RSS {peak_rss_gb():.1f} GB"
        )
    if args.layers is None:
        t0 = time.time()
        with torch.no_grad():
            final = model.model.norm(xf).reshape(-1, xf.shape[-1]).double()
        h = final.T @ final
        w = model.lm_head.weight.detach().float()
        levels, _, scales = quantize_gptq(w, h, final.shape[0], args.damp)
        gptq_w["lm_head.weight"] = learned_w["lm_head.weight"] = (levels.to(torch.int8), scales)
        log(f"lm_head: GPTQ {time.time() - t0:.0f} s")
    return gptq_w, learned_w


# ---- scoring --------------------------------------------------------------------------------------------------


def score(model, ids: torch.Tensor, ref_path: Path, make_ref: bool):
    """Per-token NLL, KL and top-1 against the stored float log-probabilities (written when ``make_ref``)."""
    vocab = model.config.vocab_size
    n = ids.shape[1] - 1
    write_path = ref_path.with_suffix(".part") if make_ref else ref_path
    ref = np.lib.format.open_memmap(
        write_path, mode="w+" if make_ref else "r", dtype=np.float32, shape=(len(ids), n, vocab)
    )
    if ref.shape != (len(ids), n, vocab):
        raise ValueError(f"{ref_path} holds shape {ref.shape}, not {(len(ids), n, vocab)}: delete it")
    nll, kl, top1 = [], [], []
    with torch.no_grad():
        for w, row in enumerate(ids):
            logits = model(row[None], use_cache=False).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).numpy()
            if make_ref:
                ref[w] = lp
            r = ref[w]
            nll.append(-lp[np.arange(n), row[1:].numpy()].astype(np.float64))
            kl.append(kl_divergence(r, lp))
            top1.append(top1_agreement(r, lp))
    if make_ref:
        ref.flush()
        del ref
        write_path.replace(ref_path)
    return np.concatenate(nll), np.concatenate(kl), np.concatenate(top1)


def stored_scores(model, ids: torch.Tensor, ref_path: Path):
    """The float model's own scores, read from ``ref_path`` instead of running it again."""
    n = ids.shape[1] - 1
    ref = np.load(ref_path, mmap_mode="r")
    if ref.shape != (len(ids), n, model.config.vocab_size):
        raise ValueError(f"{ref_path} holds shape {ref.shape}, not {(len(ids), n, model.config.vocab_size)}: delete it")
    nll = [-ref[w][np.arange(n), row[1:].numpy()].astype(np.float64) for w, row in enumerate(ids)]
    return np.concatenate(nll), np.zeros(len(ids) * n), np.ones(len(ids) * n)


def param_of(model, key: str) -> torch.nn.Parameter:
    """A parameter by name; ``lm_head.weight`` is the embedding's when the two are tied."""
    return model.lm_head.weight if key == "lm_head.weight" else model.get_parameter(key)


def set_weights(model, weights: dict) -> None:
    with torch.no_grad():
        for key, value in weights.items():
            param_of(model, key).copy_(value if isinstance(value, torch.Tensor) else dequantize(value))


def paired(a: np.ndarray, b: np.ndarray, chunk: int = 128) -> tuple[float, float]:
    d = a - b
    m = d.size // chunk
    means = d[: m * chunk].reshape(m, chunk).mean(axis=1)
    return float(d.mean()), 2 * float(means.std(ddof=1)) / math.sqrt(m)


def evaluate(model, tokenizer, gptq_w, learned_w, args) -> None:
    text = Path(args.eval).read_text(encoding="utf-8")
    ids = windows(tokenizer, text, args.eval_window, args.eval_windows)
    ref_path = Path(args.out) / "ref_logprobs.npy"
    results = {}
    # fp32 first, then RTN in place from the float weights; GPTQ and learned overwrite every quantized weight. No
    # float copy is kept: with one, the 1.5B model's scoring ran out of 24 GB.
    for name, weights in (("fp32", None), ("rtn", "rtn"), ("gptq", gptq_w), ("learned", learned_w)):
        t0 = time.time()
        if weights == "rtn":
            with torch.no_grad():
                for key in gptq_w:
                    param = param_of(model, key)
                    param.copy_(rtn_symmetric(param))
        elif weights is not None:
            set_weights(model, weights)
        if weights is None and ref_path.exists():  # a finished earlier run's float scores (same text and windows)
            results[name] = stored_scores(model, ids, ref_path)
        else:
            results[name] = score(model, ids, ref_path, make_ref=weights is None)
        np.savez(
            Path(args.out) / f"scores_{name}.npz", nll=results[name][0], kl=results[name][1], top1=results[name][2]
        )
        log(f"scored {name} on {ids.shape[0]} x {ids.shape[1]} tokens in {time.time() - t0:.0f} s")
    ref_nll = results["fp32"][0]
    rtn_change, _ = perplexity_change(results["rtn"][0], ref_nll)
    rtn_kl = results["rtn"][1].mean()
    print(f"\n{ref_nll.size} scored positions\n")
    print("| variant | perplexity | ppl vs fp32 | KL vs fp32 | top-1 | of RTN's loss / KL |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (nll, kl, top1) in results.items():
        change, two_se = perplexity_change(nll, ref_nll)
        ratio = "–" if name == "fp32" else f"{change / rtn_change:.2f} / {kl.mean() / rtn_kl:.2f}"
        print(
            f"| {name} | {math.exp(nll.mean()):.4f} | {change * 100:+.2f} % ± {two_se * 100:.2f} | "
            f"{kl.mean():.4f} | {top1.mean() * 100:.1f} % | {ratio} |"
        )
    d_nll, se_nll = paired(results["learned"][0], results["gptq"][0])
    d_kl, se_kl = paired(results["learned"][1], results["gptq"][1])
    print(f"\nlearned - gptq, paired: NLL {d_nll:+.4f} ± {se_nll:.4f} nats/token, KL {d_kl:+.4f} ± {se_kl:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face model folder (float weights)")
    parser.add_argument("--calibration", required=True, help="calibration text file")
    parser.add_argument("--eval", help="evaluation text file (required unless --no-eval)")
    parser.add_argument("--out", default="learned_rounding_out", help="folder for the float log-probabilities")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    parser.add_argument("--window", type=int, default=256, help="calibration window length")
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per layer (0: GPTQ only)")
    parser.add_argument("--batch", type=int, default=2, help="windows per step")
    parser.add_argument("--lr", type=float, default=0.0, help="first step (default 1 / steps); scales get a tenth")
    parser.add_argument("--loss", choices=("mse", "norm"), default="mse", help="plain MSE or per-channel 1/E[y^2]")
    parser.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, a fraction of mean diag H")
    parser.add_argument("--layers", type=int, help="learn only the first N layers (implies --no-eval)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval-window", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=10)
    parser.add_argument("--no-eval", action="store_true", help="quantize and print the layer losses only")
    args = parser.parse_args(argv)
    if not args.no_eval and args.layers is None and not args.eval:
        parser.error("--eval is required unless --no-eval or --layers")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Path(args.out).mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    gptq_w, learned_w = quantize_model(model, tokenizer, args)
    if args.no_eval or args.layers is not None:
        return 0
    evaluate(model, tokenizer, gptq_w, learned_w, args)
    log(f"peak RSS {peak_rss_gb():.1f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
