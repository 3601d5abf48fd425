"""TinyLoRA adapter vs the base model and PEFT's TinyLoRA on the embedded SmolLM2-135M-Instruct.

Prints ratios measured in this run (all 7 linear maps of every block adapted, 210 modules):

- forward time, adapted / base: a prefill of B x L tokens (default 8 x 128) and, separately, a
  1-token decode step on a KV cache of L tokens; goal <= 1.03. "base" and "ours" are one model
  object, timed with the adapter removed and attached again (the same weights in the same memory),
  PEFT TinyLoRA on its own copy. Rounds are interleaved (base, ours, PEFT, and the base timed again
  as a control, in a seeded random order each round) and the medians of the per-round ratios are
  reported, so load from other processes hits all alike; the control's ratio to the base shows how
  far this run's noise alone moves a ratio. An untimed 2-token forward after each switch builds
  what a re-attached adapter keeps (its update rows, built again after each change of v); that
  one-off cost is printed on its own.
- first attach with a cold SVD cache (an empty TINYLAB_CACHE: SVDs computed and written), the
  same with a warm disk cache (memory caches cleared), re-attach with another budget; PEFT's
  `get_peft_model` with the same 7 targets. Goals: first attach <= 3 s, re-attach <= 0.5 s.
- file size for 13 parameters: `save_adapter` (fp32 and bf16) vs PEFT's `save_pretrained`.

Run: .venv/bin/python benchmarks/adapter.py [--rounds 12] [--decode-rounds 60] [--batch 8] [--seq 128]
     [--threads N] [--device auto|cpu|cuda|cuda:1|mps] [--dtype auto|float32|bfloat16|float16]
`--device` / `--dtype` go to `tinylab.load_model` (auto: CUDA, then MPS, else the CPU; bf16 on a GPU
that runs it, else fp32); both models and the inputs live there, and GPU timings synchronize the
device. The device and dtype are printed first: quote them with the ratios.
The load average is printed before and after: on a shared 2-core machine, compare runs with care.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from peft import TinyLoraConfig, get_peft_model  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

import tinylab.adapter.svd as svd_engine  # noqa: E402
from tinylab.adapter.attach import apply_tinylora  # noqa: E402
from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig  # noqa: E402
from tinylab.adapter.file_format import save_adapter  # noqa: E402
from tinylab.model.device import resolve_device, resolve_dtype  # noqa: E402
from tinylab.model.kv_cache import cache_argument, new_cache  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402

THIRTEEN = TinyLoRAConfig(u=13, n_tie="all")  # 13 params: one u=13 vector shared by all 210 maps
OTHER_BUDGET = TinyLoRAConfig(u=1, n_tie=1)  # 210 params: one scalar per module
PEFT_THIRTEEN = dict(r=2, u=13, weight_tying=1.0, target_modules=list(DEFAULT_TARGETS))


DEVICE = torch.device("cpu")  # set in main


def _sync() -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously), so a clock sees it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    elif DEVICE.type == "mps":
        torch.mps.synchronize()


def _clock(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _clocks(fn) -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time (all threads) is less sensitive to other processes' load."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def _goal(value: float, goal: float) -> str:
    return f"goal <= {goal:g}: {'met' if value <= goal else 'NOT MET'}"


def bench_attach(ours, peft_model_copy) -> tuple[object, object, dict]:
    """Attach timings; returns (our 13-param adapter, PEFT model, results)."""
    res = {}
    cold_cache = tempfile.mkdtemp(prefix="tinylab-bench-cache-")
    os.environ["TINYLAB_CACHE"] = cold_cache  # the model is loaded already; only the SVD cache moves
    svd_engine.clear_memory_cache()
    holder = {}
    res["cold"] = _clocks(lambda: holder.update(a=apply_tinylora(ours, THIRTEEN)))
    holder["a"].remove()
    svd_engine.clear_memory_cache()
    res["warm_disk"] = _clocks(lambda: holder.update(a=apply_tinylora(ours, THIRTEEN)))
    res["reattach"] = _clocks(lambda: (holder["a"].remove(), holder.update(a=apply_tinylora(ours, OTHER_BUDGET))))
    holder["a"].remove()
    adapter = apply_tinylora(ours, THIRTEEN)
    res["peft"] = _clocks(
        lambda: holder.update(p=get_peft_model(peft_model_copy, TinyLoraConfig(**PEFT_THIRTEEN))))
    return adapter, holder["p"], res


class Switch:
    """One model timed as "base" (adapter removed) or "ours" (the same 13-param adapter attached)."""

    def __init__(self, model, adapter):
        self.model, self.adapter, self.v = model, adapter, adapter.vector()

    def as_base(self):
        self.adapter.remove()
        return self.model

    def as_ours(self):
        if not self.adapter.attached:
            self.adapter = apply_tinylora(self.model, THIRTEEN)  # factors from the memory cache
            self.adapter.set_vector(self.v)
        return self.model


def _order(names: list[str], i: int) -> list[str]:
    """A seeded random order per round: a fixed rotation would always put the same arm after the same
    neighbour (and after the same adapter switch)."""
    order = list(names)
    random.Random(i).shuffle(order)
    return order


def bench_prefill(models: dict, ids: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """models: name -> function returning the model ready to time (switching the adapter if needed)."""
    times = {k: [] for k in models}
    for i in range(rounds + 1):
        for k in _order(list(models), i):
            m = models[k]()
            with torch.inference_mode():
                m(ids[:1, :2])  # after a switch: the kept rows are built here (timed in bench_first_forward)
                t = _clock(lambda m=m: m(ids))
            if i >= 1:  # the first round warms up
                times[k].append(t)
    return times


def bench_decode(models: dict, ids: torch.Tensor, rounds: int, per_switch: int = 5) -> dict[str, list[float]]:
    """One new token per sequence on a KV cache of ids.shape[1] tokens; the cache is cropped back each
    step. Each round times `per_switch` steps per model (the adapter switches between them)."""
    step = ids[:, -1:]  # [B, 1]
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long, device=ids.device)  # [B, L + 1]
    caches = {k: new_cache() for k in models}
    for k, get in models.items():
        with torch.inference_mode():
            get()(ids, use_cache=True, **{cache_argument(get()): caches[k]})
    times = {k: [] for k in models}
    for i in range(rounds // per_switch + 1):
        for k in _order(list(models), i):
            m, c = models[k](), caches[k]
            with torch.inference_mode():
                for j in range(per_switch + 1):
                    t = _clock(lambda m=m, c=c: m(step, attention_mask=mask, use_cache=True, **{cache_argument(m): c}))
                    c.crop(-1)  # back to the prompt: every step sees the same cache length
                    if i >= 1 and j >= 1:  # the first round and the first step after a switch warm up
                        times[k].append(t)
    return times


def bench_first_forward(switch: Switch, ids: torch.Tensor, reps: int = 7) -> float:
    """Extra seconds of the first no-grad forward after attaching: each module builds its kept rows
    (as it does again after each change of v). A 2-token forward, timed first and again, medians."""
    first, again = [], []
    for _ in range(reps):
        switch.as_base()
        m = switch.as_ours()
        with torch.inference_mode():
            first.append(_clock(lambda m=m: m(ids[:1, :2])))
            again.append(_clock(lambda m=m: m(ids[:1, :2])))
    return statistics.median(first) - statistics.median(again)


def bench_files(adapter, peft_model) -> dict:
    out = {}
    folder = Path(tempfile.mkdtemp(prefix="tinylab-bench-files-"))
    for dtype in ("fp32", "bf16"):
        out[f"ours_{dtype}"] = save_adapter(adapter, folder / f"a13-{dtype}.tinylora", dtype=dtype).stat().st_size
    peft_model.save_pretrained(folder / "peft")
    out["peft_weights"] = (folder / "peft" / "adapter_model.safetensors").stat().st_size
    out["peft_config"] = (folder / "peft" / "adapter_config.json").stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved prefill rounds")
    parser.add_argument("--decode-rounds", type=int, default=60, help="interleaved decode-step rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a loaded machine")
    parser.add_argument("--device", default="auto", help="where the models run (tinylab.load_model's device)")
    parser.add_argument("--dtype", default="auto", help="the models' weight dtype (tinylab.load_model's dtype)")
    add_results_option(parser, "adapter")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, DEVICE)

    print(f"torch {torch.__version__}, device {DEVICE}, dtype {dtype}, {torch.get_num_threads()} threads, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    ours, _ = load_model(device=DEVICE, dtype=dtype)
    theirs, _ = load_model(device=DEVICE, dtype=dtype)

    adapter, peft_model, att = bench_attach(ours, theirs)
    n_modules = len(adapter.modules)
    print(f"\n[attach] SmolLM2 on {DEVICE} in {dtype}, {n_modules} modules, r=2, 13 params")
    for key, label, goal in (("cold", "first attach, cold SVD cache ", 3.0),
                             ("warm_disk", "first attach, warm disk cache", None),
                             ("reattach", "re-attach, another budget    ", 0.5),
                             ("peft", "PEFT get_peft_model          ", None)):
        wall, cpu = att[key]
        print(f"  {label}: {wall:7.3f} s wall, {cpu:7.3f} s CPU" + (f"  ({_goal(wall, goal)})" if goal else ""))
    print(f"  PEFT / ours, cold            : {att['peft'][0] / att['cold'][0]:.1f}x wall, "
          f"{att['peft'][1] / att['cold'][1]:.1f}x CPU")

    g = torch.Generator().manual_seed(0)
    adapter.set_vector(torch.randn(adapter.num_params, generator=g) * 0.05)
    with torch.no_grad():
        for v in peft_model.base_model.tinylora_v["default"].values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    switch = Switch(ours, adapter)
    # "base again" is the base timed as a fourth arm: its ratio to "base" is this run's noise floor
    models = {"base": switch.as_base, "ours": switch.as_ours, "peft": lambda: peft_model, "base again": switch.as_base}
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), generator=g).to(DEVICE)  # [B, L]

    for label, times in (
        (f"prefill {args.batch} x {args.seq} tokens, {args.rounds} rounds", bench_prefill(models, ids, args.rounds)),
        (f"decode step, 1 new token x {args.batch} on a {args.seq}-token cache, {args.decode_rounds} rounds",
         bench_decode(models, ids, args.decode_rounds)),
    ):
        ours_base = _median_ratio(times["ours"], times["base"])
        fastest = {k: min(v) for k, v in times.items()}
        print(f"\n[forward] {label} (base median {statistics.median(times['base']) * 1000:.1f} ms)")
        print("                        median of per-round ratios | ratio of fastest rounds")
        print(f"  adapted / base      : {ours_base:.3f} | {fastest['ours'] / fastest['base']:.3f}"
              f"  ({_goal(ours_base, 1.03)})")
        print(f"  PEFT TinyLoRA / base: {_median_ratio(times['peft'], times['base']):.3f} | "
              f"{fastest['peft'] / fastest['base']:.3f}")
        print(f"  ours / PEFT         : {_median_ratio(times['ours'], times['peft']):.3f} | "
              f"{fastest['ours'] / fastest['peft']:.3f}")
        print(f"  base again / base   : {_median_ratio(times['base again'], times['base']):.3f} | "
              f"{fastest['base again'] / fastest['base']:.3f}  (the same model twice: this run's noise)")

    extra = bench_first_forward(switch, ids)
    print(f"\n[forward] first no-grad forward after attaching (kept rows built): +{extra * 1000:.1f} ms"
          f" (the timed forwards above come after it)")

    switch.as_ours()
    files = bench_files(switch.adapter, peft_model)
    peft_total = files["peft_weights"] + files["peft_config"]
    print("\n[file size] 13 params")
    print(f"  save_adapter fp32: {files['ours_fp32']} bytes, bf16: {files['ours_bf16']} bytes")
    print(f"  PEFT save_pretrained: {files['peft_weights']} + {files['peft_config']} (config) bytes"
          f" = {peft_total / files['ours_fp32']:.0f}x our fp32 file")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    with results_file(results_name("adapter")):
        main()
