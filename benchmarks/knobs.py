"""How long one KnobPanel slider move takes on the embedded model, against one forward of the batch.

    .venv/bin/python benchmarks/knobs.py [ADAPTER.tlra] [--prompts 4] [--repeats 5] [--threads 2]

The adapter: a saved one (e.g. `benchmarks/demo_cpu.py --save DIR` writes DIR/seed0.tlra), else
the demonstration's shape (u = 13 shared by all 210 modules) with seeded values of the size a
trained vector has. The panel gets `--prompts` held-out prompts of capitals_answer for its greedy
replies and the same examples (their reference replies, target="solution", as the gold) for its bars. One slider update is
what the panel does after a move: set v, then `tinylab.analysis.readout.Reader` (the base and trained sides
were read once when the panel was built): one forward of prompt + gold per batch with eager
attention, which gives the gold log-probs, the heads' activity on the prompts, the replies' first tokens as
far as they agree with the gold, and the prefill from which the rest of the greedy replies (the
panel's default `max_new_tokens`) are decoded with the KV cache; the
head map (`heads.attention_shift` of that activity against the cached base); the redraw.
Printed: the median update time over `--repeats` moves (the goal of issue 19 is <= 2 s), its
parts, one forward of the teacher-forced batch (the same prompts), and the ratio; each as wall
time and as process CPU time (the machine is shared: the wall time counts the other processes too;
with `--threads 1` the CPU time is what the wall time would be on an idle core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402
from tinylab.widgets.knobs import KnobPanel  # noqa: E402, TID251 (a script on top times the panel)

import tinylab  # noqa: E402
from tinylab.analysis.heads import attention_shift  # noqa: E402
from tinylab.tasks import get as get_task  # noqa: E402


def _median_seconds(call, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of `call` (CPU time: what the call costs on a shared
    machine, where wall time also counts the other processes; on one thread it is the unloaded wall time)."""
    wall, cpu = [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _both(seconds: tuple[float, float]) -> str:
    return f"{seconds[0]:.3f} s wall, {seconds[1]:.3f} s CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="an adapter file (default: seeded values)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    add_results_option(parser, "knobs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = tinylab.load_model()
    if args.adapter:
        adapter = tinylab.load_adapter(model, args.adapter)
    else:
        adapter = tinylab.apply_tinylora(model, u=13, n_tie="all")
        g = torch.Generator().manual_seed(0)
        adapter.set_vector(0.02 * torch.randn(adapter.num_params, generator=g))
    task = get_task("capitals_answer")
    examples = task.examples("test", args.prompts, seed=0)
    panel = KnobPanel(model, tokenizer, adapter, examples, examples, task=task, target="solution")
    trained = panel.trained

    moves = iter(range(10**6))

    def move() -> None:  # alternate between the trained value and half of it
        k = next(moves)
        panel.sliders[0].value = float(trained[0]) * (0.5 if k % 2 == 0 else 1.0)

    move()  # one untimed move (first eager-attention switch)
    update = _median_seconds(move, args.repeats)
    batch = panel.gold.batches[0]

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    forward()
    one_forward = _median_seconds(forward, args.repeats)
    readout = _median_seconds(panel.reader, args.repeats)
    read = list(panel.reader.from_gold)  # per batch: reply tokens read from the gold forward
    decoded = max(panel.max_new_tokens - 1 - min(read), 0)  # decoding steps of the slowest batch
    panel.reader.max_new_tokens = 1  # the forward part alone: the first reply token comes from its logits
    first_token = _median_seconds(panel.reader, args.repeats)
    panel.reader.max_new_tokens = panel.max_new_tokens
    per_token = tuple((a - b) / max(decoded, 1) for a, b in zip(readout, first_token))
    now = panel.reader()
    head_map = _median_seconds(lambda: attention_shift(panel.base.activity, now.activity), args.repeats)
    draw = _median_seconds(panel.draw, args.repeats)
    panel.reset()

    print(f"embedded model, u={adapter.config.u} x {adapter.num_groups} group(s), {len(examples)} prompts, "
          f"{args.threads} thread(s), median of {args.repeats}; the machine is shared, so the CPU time of "
          "this process is the fair measure (wall time also counts the other processes)")
    print(f"one slider update: {_both(update)} (goal <= 2 s)")
    print(f"  parts: readout (one forward of prompt + gold per batch, shared: {panel.reader.shared}, then "
          f"greedy replies of up to {panel.max_new_tokens} new tokens from its prefill) {_both(readout)}; "
          f"head map against the cached base (attention_shift) {_both(head_map)}; redrawing the widgets "
          f"{_both(draw)}")
    print(f"  of the readout: with max_new_tokens=1 (the forward and the first token) {_both(first_token)}; "
          f"reply tokens read from the forward (the greedy reply agrees with the gold so far), per batch: {read}; "
          f"{decoded} decoding step(s) after it, each {_both(per_token)}")
    print(f"one forward of the same batch ({tuple(batch.input_ids.shape)} tokens): {_both(one_forward)}")
    print(f"ratio update / forward: {update[0] / one_forward[0]:.1f}x wall, {update[1] / one_forward[1]:.1f}x CPU")


if __name__ == "__main__":
    with results_file(results_name("knobs")):
        main()
