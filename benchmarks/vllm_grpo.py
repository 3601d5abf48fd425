"""TRL's GRPO generating with colocated vLLM on the CPU, through tinylab's bridge: a check that can fail.

Runs in the vLLM environment (`make vllm`), on the embedded SmolLM2-135M-Instruct in float32:
`tinylab.interop.trl_bridge.grpo_trainer(..., use_vllm=True, vllm_mode="colocate")` with one shared 13-number
vector (PEFT's TinyLoRA under TRL), then checks, each a failure (exit 1) when it does not hold:

1. the colocated engine runs the model's dtype (float32; TRL alone would give bf16);
2. the bridge's sync as TRL calls it (`trainer.vllm_generation.sync_weights()`), with a vector set
   by hand: vLLM's greedy tokens equal the PEFT model's on --prompts (6) prompts;
3. --steps (2) GRPO steps change the vector;
4. the trained adapter pushed again (`tinylab.interop.vllm_sync.push_weights`): vLLM's greedy tokens equal
   the adapted tinylab model's, which differ from the base model's on some prompts; then the
   vector set to zero and pushed: vLLM's tokens equal the base model's;
5. after every sync above, the base weights are bit-exact (torch.equal with a copy taken first).

Recorded beside it: TRL's own merge -> push -> unmerge iterator run --passes (5) times on the
same model (nothing pushed), and the largest drift it leaves in W (W is restored afterwards).
Output printed and written to benchmarks/results/vllm_grpo.txt (`--results NAME`;
benchmarks/results_file.py) with date, commit, machine and command. Run: .venv-vllm/bin/python benchmarks/vllm_grpo.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM's log lines off the results file
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from results_file import add_results_option, results_file, results_name  # noqa: E402
from vllm_serving import Report, replies  # noqa: E402

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach"]


class DistinctLetters:
    """A task (tinylab's Task protocol) whose reward always spreads within a group: distinct characters / 10."""

    name = "distinct"
    max_new_tokens = 8

    def examples(self, split="train", n=None, seed=0):
        from tinylab.tasks.base import Example

        return [Example([{"role": "user", "content": f"Say {w}."}], w, f"{w}.") for w in WORDS][:n]

    def reward(self, completions, answers=None, **kwargs):
        from tinylab.tasks.base import completion_text

        return [len(set(completion_text(c))) / 10 for c in completions]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--passes", type=int, default=5)
    add_results_option(parser, "vllm_grpo")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(1)
    return Report().run(run, args)


def expect(report, what: str, ok: bool) -> None:
    report(f"  {what}: {'yes' if ok else 'NO'}")
    if not ok:
        report.failures.append(what)


def run(args, report) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from tinylab import GRPOConfig, apply_tinylora, load_model
    from tinylab.interop.trl_bridge import grpo_trainer
    from tinylab.interop.vllm_sync import merged_weights, push_weights
    from tinylab.model.batch import prompt_rows
    from tinylab.model.generation import generate

    model, tok = load_model(device="cpu", dtype="float32")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def bit_exact(m) -> bool:
        now = {n.replace(".base_layer", "").replace(".base.", ".").removeprefix("base_model.model."): p
               for n, p in m.named_parameters()}
        return all(torch.equal(base[n], now[n]) for n in base)

    prompts = [[{"role": "user", "content": f"Name a fruit that starts with {c}."}] for c in "abcdefgh"]
    prompts = prompts[:args.prompts]
    rows = [TokensPrompt(prompt_token_ids=r) for r in prompt_rows(tok, prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)

    def ours(m):
        return replies(generate(m, tok, prompts, max_new_tokens=args.new_tokens, temperature=0.0))

    base_tokens = ours(model)
    adapter = apply_tinylora(model, u=13, n_tie="all")
    config = GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=8, lr=0.05, steps=args.steps, seed=0)
    start = time.perf_counter()
    trainer = grpo_trainer(model, tok, adapter, DistinctLetters(), config,
                           output_dir=tempfile.mkdtemp(prefix="tinylab-vllm-grpo-"),
                           use_vllm=True, vllm_mode="colocate")
    report(f"trainer with colocated vLLM built in {time.perf_counter() - start:.1f} s "
           f"(u=13, n_tie='all', PEFT TinyLoRA; GRPO {config.prompts_per_step} prompts x {config.group_size})")
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts: the checks below are the output
    generation = trainer.vllm_generation
    llm = generation.llm

    def served():
        return [list(o.outputs[0].token_ids) for o in llm.generate(rows, greedy, use_tqdm=False)]

    report("checks:")
    expect(report, f"engine dtype {llm.llm_engine.model_config.dtype} == the model's {next(model.parameters()).dtype}",
           llm.llm_engine.model_config.dtype == next(model.parameters()).dtype)
    peft = generation.model
    v = next(p for n, p in peft.named_parameters() if "tinylora_v" in n)
    with torch.no_grad():
        v.copy_(0.5 * torch.nn.functional.normalize(torch.randn(v.shape, generator=torch.Generator().manual_seed(0)),
                                                    dim=0))
    generation.sync_weights()  # the bridge's sync, as TRL calls it before a generation
    same = sum(a == b for a, b in zip(served(), ours(peft)))
    expect(report, f"after the bridge's sync_weights with |v| = 0.5: vLLM == PEFT model on {same} of {len(rows)}",
           same == len(rows))
    expect(report, "base weights bit-exact after that sync", bit_exact(peft))
    drift = trl_drift(generation, peft, args.passes)
    with torch.no_grad():
        v.zero_()
        for name, p in peft.named_parameters():  # W back from the copy after TRL's own passes
            key = name.replace(".base_layer", "").removeprefix("base_model.model.")
            if key in base:
                p.copy_(base[key])
    start = time.perf_counter()
    trainer.train()
    report(f"{args.steps} GRPO steps in {time.perf_counter() - start:.1f} s (vLLM synced and generating each step)")
    trained = trainer.tinylab_adapter
    vector = trained.vector()
    expect(report, f"the vector changed (|v| = {float(vector.norm()):.4f})", bool(vector.abs().sum() > 0))
    push_weights(llm, merged_weights(model))
    adapted = ours(model)
    same = sum(a == b for a, b in zip(served(), adapted))
    changed = sum(a != b for a, b in zip(adapted, base_tokens))
    expect(report, f"trained vector pushed: vLLM == tinylab's adapted model on {same} of {len(rows)} "
           f"(adapted differs from the base on {changed})", same == len(rows) and changed > 0)
    trained.set_vector(torch.zeros_like(vector))
    push_weights(llm, merged_weights(model))
    same = sum(a == b for a, b in zip(served(), base_tokens))
    expect(report, f"vector set to zero and pushed: vLLM == base model on {same} of {len(rows)}", same == len(rows))
    trained.remove()
    expect(report, f"base weights bit-exact after {args.steps} training syncs and 3 more", bit_exact(model))
    report("recorded, not checked:")
    report(f"  TRL's own merge -> push -> unmerge (VLLMGeneration._iter_named_params, {args.passes} passes, "
           f"|v| = 0.5, float32): largest |W - W0| = {drift:.3g}; the bridge's sync: W untouched")


def trl_drift(generation, peft, passes: int) -> float:
    """Largest |W - W0| over the base weights after TRL's own iterator ran `passes` times."""
    from trl.generation.vllm_generation import VLLMGeneration

    before = {n: p.detach().clone() for n, p in peft.named_parameters() if "tinylora_" not in n}
    for _ in range(passes):
        for _ in VLLMGeneration._iter_named_params(generation):
            pass
    return max(float((p - before[n]).abs().max()) for n, p in peft.named_parameters() if n in before)


if __name__ == "__main__":
    with results_file(results_name("vllm_grpo")):  # written also when a check fails (main returns 1)
        code = main(sys.argv)
    sys.exit(code)
