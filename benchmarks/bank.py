"""AdapterBank on the embedded SmolLM2-135M-Instruct: a different 13-number adapter in every row.

Prints, from one run (all 7 linear maps of every block adapted, 210 modules, u = 13, n_tie = "all"):

- throughput (tokens/s) of a batch of --rows (64) rows with --rows distinct adapters through the
  bank, against the same batch with one adapter attached the normal way (`apply_tinylora`):
  prefill of --chunk x --seq (8 x 128) tokens, the round's chunk of 8 rows (8 distinct adapters,
  the chunks rotate over the 64 rows round by round), and greedy decoding of --new-tokens (32)
  tokens for all --rows rows at once (--rows distinct adapters) on a KV cache of a
  --decode-prompt (16) token prompt. Goal: bank / one adapter >= 0.9. The anchor: the same mixed
  batch through PEFT's LoRA `adapter_names=` on --peft-adapters (64) adapters written by
  `export_lora` (when fewer than --rows, rows cycle over them; the output says so). Rounds are
  interleaved in a seeded random order after a short warm-up; medians are reported. A check
  beside the timing: the bank's and PEFT's greedy tokens agree row by row.
- memory of --files (10,000) adapters in the bank (the table's bytes) against as many PEFT LoRA
  checkpoints on disk (the size of one `export_lora` folder x the count: one is written, not all);
- the time to add --files `.tlra` files to a bank (written first, untimed).

Run: .venv/bin/python benchmarks/bank.py [--rounds 2] [--rows 64] [--peft-adapters 64] [--files 10000]
     [--threads N]. The load average is printed: on a shared 2-core machine compare runs with care.
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
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab import AdapterBank, TinyLoRAConfig, apply_tinylora, export_lora, load_model, save_adapter  # noqa: E402
from tinylab.model.kv_cache import cache_argument, new_cache  # noqa: E402

THIRTEEN = TinyLoRAConfig(u=13, n_tie="all")


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, extra: dict) -> float:
    """Seconds of one forward of the prompts [b, T]."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1, **extra)
    return time.perf_counter() - start


@torch.inference_mode()
def decode(model, ids: torch.Tensor, new_tokens: int, extra: dict) -> tuple[float, torch.Tensor]:
    """Greedy decoding of `new_tokens` for every row at once: (seconds of the decode steps, tokens [B, L])."""
    B, P = ids.shape
    cache, cache_kw = new_cache(), cache_argument(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kw: cache}, **extra)
    token = out.logits[:, -1].argmax(-1)  # [B]
    tokens = [token]
    mask = torch.ones(B, P, dtype=torch.long, device=ids.device)  # [B, P]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask[:, :1]], dim=1)  # [B, P + steps so far + 1]
        out = model(input_ids=token[:, None], attention_mask=mask, use_cache=True, **{cache_kw: cache}, **extra)
        token = out.logits[:, -1].argmax(-1)  # [B]
        tokens.append(token)
    return time.perf_counter() - start, torch.stack(tokens, 1)


def _median(xs):
    return statistics.median(xs)


def build(args, model, tmp: Path):
    """The bank with --rows random adapters, a handle holding the first, and --peft-adapters LoRA exports."""
    bank = AdapterBank(model, THIRTEEN)
    g = torch.Generator().manual_seed(0)
    for i in range(args.rows):
        bank.add(f"user{i}", 0.3 * torch.randn(13, generator=g))
    handle = apply_tinylora(model, THIRTEEN)
    t0 = time.perf_counter()
    for name in bank.names[:args.peft_adapters]:
        handle.set_vector(bank.vector(name))
        export_lora(handle, tmp / "lora" / name)
    export_s = time.perf_counter() - t0
    handle.remove()
    return bank, export_s


def load_peft(args, tmp: Path, names: list[str]):
    from peft import PeftModel

    base, _ = load_model()
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(base, str(tmp / "lora" / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(tmp / "lora" / name), adapter_name=name)
    peft_model.eval()
    return peft_model, time.perf_counter() - t0


def bench_throughput(args, model, bank, peft_model):
    """Per round and arm: one prefill of --chunk x --seq (the round's chunk of rows: 8 distinct adapters)
    and greedy decoding of --new-tokens for all --rows rows (--rows distinct adapters). tokens/s lists."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 40000, (args.rows, args.seq), generator=g)  # [B, T]
    short = torch.randint(0, 40000, (args.rows, args.decode_prompt), generator=g)  # [B, P]
    names = bank.names
    peft_names = [names[b % args.peft_adapters] for b in range(args.rows)]
    vector = bank.vector(names[0])
    arms = ["bank", "one adapter", "PEFT LoRA"]
    pre = {a: [] for a in arms}
    dec = {a: [] for a in arms}
    for rnd in range(args.rounds + 1):  # round 0: a short warm-up, untimed
        order = list(arms)
        random.Random(rnd).shuffle(order)
        lo = (rnd * args.chunk) % args.rows
        rows = slice(lo, lo + args.chunk)
        seq, new = (4, 2) if rnd == 0 else (args.seq, args.new_tokens)
        for arm in order:
            if arm == "one adapter":
                attached = apply_tinylora(model, THIRTEEN)
                attached.set_vector(vector)
                p = prefill(model, prompts[rows, :seq], {})
                d, _ = decode(model, short, new, {})
                attached.remove()
            elif arm == "bank":
                with bank.rows(names[rows]):
                    p = prefill(model, prompts[rows, :seq], {})
                with bank.rows(names):
                    d, _ = decode(model, short, new, {})
            else:
                p = prefill(peft_model, prompts[rows, :seq], {"adapter_names": peft_names[rows]})
                d, _ = decode(peft_model, short, new, {"adapter_names": peft_names})
            if rnd:
                pre[arm].append(args.chunk * seq / p)
                dec[arm].append(args.rows * (new - 1) / d)
        print(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''} done", flush=True)
    return pre, dec


def check_same_replies(args, model, bank, peft_model):
    """The bank's and PEFT's greedy tokens for the first rows (a correctness check beside the timing)."""
    g = torch.Generator().manual_seed(2)
    n = min(args.rows, args.peft_adapters, 8)
    short = torch.randint(0, 40000, (n, args.decode_prompt), generator=g)  # [n, P]
    with bank.rows(bank.names[:n]):
        _, ours = decode(model, short, 8, {})
    _, theirs = decode(peft_model, short, 8, {"adapter_names": bank.names[:n]})
    return int((ours == theirs).all(1).sum()), n


def bench_files(args, model, tmp: Path):
    """Write --files .tlra files (untimed), then time adding them all to a new bank; bytes of the table."""
    folder = tmp / "files"
    folder.mkdir()
    handle = apply_tinylora(model, THIRTEEN)
    g = torch.Generator().manual_seed(3)
    values = torch.randn(args.files, 13, generator=g)
    for i in range(args.files):
        handle.set_vector(values[i])
        save_adapter(handle, folder / f"user{i:05d}.tlra")
    lora_one = export_lora(handle, tmp / "one_lora")
    lora_one_padded = export_lora(handle, tmp / "one_lora_r8", pad_to=8)
    handle.remove()
    bank = AdapterBank(model, THIRTEEN)
    files = sorted(folder.glob("*.tlra"))
    start = time.perf_counter()
    for f in files:
        bank.add(f.stem, f)
    add_s = time.perf_counter() - start
    size = lambda p: sum(f.stat().st_size for f in Path(p).iterdir())  # noqa: E731
    return {"add_s": add_s, "n": len(bank), "table_bytes": bank.table.numel() * bank.table.element_size(),
            "allocated_bytes": bank.allocated_bytes, "tlra_bytes": files[0].stat().st_size,
            "lora_bytes": size(lora_one), "lora_r8_bytes": size(lora_one_padded)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--peft-adapters", type=int, default=64)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None)
    add_results_option(ap, "bank")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.peft_adapters = min(args.peft_adapters, args.rows)
    print(f"load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    model, _ = load_model()
    with tempfile.TemporaryDirectory(prefix="tinylab-bank-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        bank, export_s = build(args, model, tmp)
        print(f"bank of {len(bank)} adapters built in {time.perf_counter() - t0:.1f} s "
              f"(export_lora x {args.peft_adapters}: {export_s:.1f} s)")
        peft_model, peft_s = load_peft(args, tmp, bank.names[:args.peft_adapters])
        print(f"PEFT: {args.peft_adapters} LoRA adapters loaded in {peft_s:.1f} s"
              + ("" if args.peft_adapters == args.rows else f" (fewer than {args.rows} rows: rows cycle over them)"))
        same, n = check_same_replies(args, model, bank, peft_model)
        print(f"check: bank and PEFT LoRA give the same 8 greedy tokens on {same}/{n} rows")
        pre, dec = bench_throughput(args, model, bank, peft_model)
        del peft_model
        files = bench_files(args, model, tmp)
    print(f"\nthroughput, tokens/s (median of {args.rounds} rounds): prefill {args.chunk} x {args.seq} ({args.chunk} "
          f"distinct adapters), decode {args.new_tokens} tokens x {args.rows} rows ({args.rows} distinct adapters)")
    print(f"{'':14s}{'prefill':>10s}{'decode':>10s}")
    for arm in pre:
        print(f"{arm:14s}{_median(pre[arm]):10.0f}{_median(dec[arm]):10.1f}")
    ratio_p = _median([a / b for a, b in zip(pre["bank"], pre["one adapter"])])
    ratio_d = _median([a / b for a, b in zip(dec["bank"], dec["one adapter"])])
    goal = lambda x: "met" if x >= 0.9 else "NOT MET"  # noqa: E731
    print(f"bank / one adapter:  prefill {ratio_p:.3f}, decode {ratio_d:.3f} (goal >= 0.9: prefill {goal(ratio_p)}, "
          f"decode {goal(ratio_d)})")
    print(f"bank / PEFT LoRA adapter_names:  prefill "
          f"{_median([a / b for a, b in zip(pre['bank'], pre['PEFT LoRA'])]):.2f}, decode "
          f"{_median([a / b for a, b in zip(dec['bank'], dec['PEFT LoRA'])]):.2f}")
    print(f"\n{files['n']} adapters of 13 numbers: bank table {files['table_bytes']:,} bytes "
          f"({files['allocated_bytes']:,} allocated); one .tlra file {files['tlra_bytes']} bytes")
    print(f"PEFT LoRA checkpoints on disk: one is {files['lora_bytes']:,} bytes (rank 2), "
          f"{files['lora_r8_bytes']:,} (padded to rank 8 for vLLM); x {files['n']:,} = "
          f"{files['n'] * files['lora_bytes']:,} / {files['n'] * files['lora_r8_bytes']:,} bytes (size of one "
          f"x {files['n']:,}, not written): {files['n'] * files['lora_bytes'] / files['table_bytes']:,.0f}x / "
          f"{files['n'] * files['lora_r8_bytes'] / files['table_bytes']:,.0f}x the bank's table")
    print(f"adding {files['n']:,} .tlra files to a bank: {files['add_s']:.2f} s "
          f"({1e6 * files['add_s'] / files['n']:.0f} us a file)")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    with results_file(results_name("bank")):
        main()
