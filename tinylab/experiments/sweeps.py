"""The paper's central experiment: held-out score against trained parameters, for RL and SFT.

    from tinylab.experiments.sweeps import budget_sweep, method_differences

    results = budget_sweep("cpu-demo", budgets=[1, 13, 840], seeds=[0, 1, 2], n_eval=129, workers=2,
                           out="sweep-out")
    per_budget = method_differences(results)   # GRPO vs SFT, paired per seed

Each point (method, budget, seed) places `budget` numbers with `plan_budget(model, budget,
strategy)`, seeds the projections and the run with `seed`, trains from v = 0 with the preset's
GRPO config (or the matching `SFTConfig.from_grpo`: same steps, prompts per step, lr), and scores
greedy replies on the same `n_eval` held-out prompts, keeping each prompt's outcomes so two
methods can be compared pair by pair.

`workers > 1` runs points side by side in separate processes, spawned, each loading the preset's
model once and running torch on `threads` threads (on a 2-core machine: two points on one thread
each). A script that asks for workers needs the `if __name__ == "__main__":` guard that spawned
processes need; a notebook does not. With `out`, every point writes its run folder (vector and
history, kept if it is interrupted), its adapter file and its row in `results.jsonl` (rewritten
atomically) as it finishes; calling again with the same settings skips the finished points, so an interrupted sweep resumes where it stopped.

`report_to="trackio" | "tensorboard" | "wandb"` logs every point as its own run (named by the
point, e.g. `grpo-00013-seed0`) in one group per sweep (Trackio and W&B group; TensorBoard
subfolder `<project>/<group>/`), with each point's held-out rates as `eval/strict`,
`eval/flexible`, `eval/formatted` and `eval/mean_length` at its last step (`tinylab.train.tracking`).
Where the runs go and under which project come from `training` (`tracking_dir`, `project`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from tinylab.basics.atomic import write_bytes_atomic
from tinylab.basics.checks import check_choice, check_int
from tinylab.evaluation.paired_stats import paired
from tinylab.measures.replies import MEASURES
from tinylab.train.tracking import REPORT_TO, TRACKING_FIELDS, Tracking

__all__ = ["SweepPoint", "budget_sweep", "method_differences", "run_point"]

METHODS = ("GRPO", "SFT")
_WORKER: dict = {}  # in a worker process: the preset's model, tokenizer and task, loaded once


class SweepPoint(NamedTuple):
    method: str  # "GRPO" or "SFT"
    budget: int  # trained numbers asked of plan_budget
    seed: int  # the projections' seed and the run's

    @property
    def name(self) -> str:
        return f"{self.method.lower()}-{self.budget:05d}-seed{self.seed}"


def run_point(model, tokenizer, task, point: SweepPoint, training, *, n_eval: int, strategy: str = "tiled",
              out: str | os.PathLike | None = None) -> dict:
    """Train one adapter for `point` from v = 0, score it on `n_eval` held-out prompts, detach it.

    `training` is a GRPOConfig (SFT uses `SFTConfig.from_grpo` of it). Returns one row: the point,
    the adapter's real parameter count, steps run, the three rates, per-prompt outcomes
    (`strict_outcomes`, `flexible_outcomes`, `formatted_outcomes`), timings and the trained `vector`.
    With `training.report_to`, the run is logged under the point's name in `training.run_group`,
    and the held-out rates after it (`eval/...`).
    """
    from tinylab.adapter.attach import apply_tinylora
    from tinylab.adapter.file_format import save_adapter
    from tinylab.adapter.planner import plan_budget
    from tinylab.evaluation.report import evaluate
    from tinylab.train.grpo import train_grpo
    from tinylab.train.sft import SFTConfig, train_sft

    plan = plan_budget(model, point.budget, strategy=strategy)
    run_dir = None if out is None else _fresh_run_dir(Path(out) / "runs" / point.name)
    training = dataclasses.replace(training, seed=point.seed, checkpoint_dir=run_dir, run_name=point.name)
    tracker = Tracking.from_config(training) if training.report_to != "none" else None
    adapter = apply_tinylora(model, dataclasses.replace(plan.config, seed=point.seed))
    try:
        start = time.perf_counter()
        callbacks = [tracker] if tracker is not None else []
        with tracker if tracker is not None else contextlib.nullcontext():  # open until the scores are logged
            if point.method == "GRPO":
                run = train_grpo(model, tokenizer, adapter, task, training, callbacks=callbacks)
            else:
                run = train_sft(model, tokenizer, adapter, task, SFTConfig.from_grpo(training), callbacks=callbacks)
            train_seconds = time.perf_counter() - start
            report = evaluate(model, tokenizer, task, n=n_eval, adapter=adapter, progress=False)
            if tracker is not None:
                tracker.log_scores(dict(strict=report.strict, flexible=report.flexible, formatted=report.formatted,
                                        mean_length=report.mean_length), step=run.step)
        vector = adapter.vector().tolist()
        if out is not None:
            save_adapter(adapter, Path(out) / f"{point.name}.tlra")
    finally:
        adapter.remove()
    row = dict(point._asdict(), params=report.params, steps=run.step, status=run.status,
               strict=report.strict, flexible=report.flexible, formatted=report.formatted,
               mean_length=report.mean_length, train_seconds=train_seconds, eval_seconds=report.seconds,
               vector=vector)
    for measure, column in MEASURES.items():
        row[f"{measure}_outcomes"] = [bool(x) for x in report.table[column]]
    return row


def _fresh_run_dir(folder: Path) -> str:
    """`folder`, after moving the run folder of an earlier, unfinished attempt aside (kept, not deleted)."""
    if folder.exists():
        attempt = 1
        while folder.with_name(f"{folder.name}.interrupted-{attempt}").exists():
            attempt += 1
        folder.rename(folder.with_name(f"{folder.name}.interrupted-{attempt}"))
    return str(folder)


def _load_worker(preset_name: str, threads: int | None) -> None:
    import torch

    from tinylab.model.loading import load_model
    from tinylab.tasks import get as get_task
    from tinylab.train.presets import preset

    if threads is not None:
        torch.set_num_threads(threads)
    p = preset(preset_name)
    model, tokenizer = load_model(p.model)
    _WORKER.update(model=model, tokenizer=tokenizer, task=get_task(p.task, **p.task_options))


def _worker_point(point: SweepPoint, training, n_eval: int, strategy: str, out) -> dict:
    return run_point(_WORKER["model"], _WORKER["tokenizer"], _WORKER["task"], point, training,
                     n_eval=n_eval, strategy=strategy, out=out)


def _settings_file(out: Path, settings: dict) -> None:
    """Write the sweep's settings, or check that an existing folder holds a sweep with the same ones."""
    path = out / "sweep.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds a sweep with other settings ({', '.join(changed)}: "
                             f"{ {k: before.get(k) for k in changed} } there, "
                             f"{ {k: settings.get(k) for k in changed} } now); pass another `out` folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(settings, indent=1).encode())


def _finished(out: Path) -> dict[SweepPoint, dict]:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {SweepPoint(r["method"], r["budget"], r["seed"]): r for r in rows}


def budget_sweep(preset: str, budgets: Sequence[int], seeds: Sequence[int], *, training=None,
                 methods: Iterable[str] = METHODS, n_eval: int = 129, strategy: str = "tiled", workers: int = 1,
                 threads: int | None = None, out: str | os.PathLike | None = None, model=None, tokenizer=None,
                 on_row: Callable[[dict], None] | None = None, report_to: str | None = None,
                 group: str | None = None) -> pd.DataFrame:
    """Every (method, budget, seed) point of `preset`'s model and task; one row per point (see `run_point`).

    `training`: the GRPOConfig (default: the preset's). `workers=1` runs here, on `model` and
    `tokenizer` if given (else the preset's model is loaded); more workers load it once each.
    `on_row(row)` is called as each point finishes (in finishing order); the returned frame is in
    point order: budgets, then seeds, then methods. `report_to` (default: `training.report_to`) logs
    each point as a run in `group` (default: `training.run_group`, else the `out` folder's name, else
    `<preset>-sweep-<time>`); the tracking fields are not sweep settings (a resumed sweep may change them).
    """
    from tinylab.train.presets import preset as get_preset

    p = get_preset(preset)
    training = p.training if training is None else training
    report_to = training.report_to if report_to is None else check_choice("report_to", report_to, REPORT_TO)
    if report_to != "none":
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        group = group or training.run_group or (Path(out).name if out is not None else f"{preset}-sweep-{stamp}")
    training = dataclasses.replace(training, report_to=report_to, run_group=group if report_to != "none" else None)
    methods = tuple(check_choice("methods", m, METHODS) for m in methods)
    budgets = [check_int("budgets", b, low=1) for b in budgets]
    seeds = [check_int("seeds", s) for s in seeds]
    check_int("n_eval", n_eval, low=1)
    check_int("workers", workers, low=1)
    if not budgets or not seeds or not methods:
        raise ValueError(f"a sweep needs at least one budget, seed and method; got budgets={budgets}, "
                         f"seeds={seeds}, methods={list(methods)}")
    points = [SweepPoint(m, b, s) for b in budgets for s in seeds for m in methods]
    on_disk: dict[SweepPoint, dict] = {}  # every finished point in `out`, also those this call does not ask for
    if out is not None:
        out = Path(out)
        settings = {k: v for k, v in dataclasses.asdict(training).items() if k not in TRACKING_FIELDS}
        _settings_file(out, dict(preset=preset, training=settings, n_eval=n_eval, strategy=strategy))
        on_disk = _finished(out)
    done = {pt: row for pt, row in on_disk.items() if pt in points}

    def finish(row: dict) -> None:
        point = SweepPoint(row["method"], row["budget"], row["seed"])
        done[point] = on_disk[point] = row
        if out is not None:
            # the whole file again, atomically: an interrupted write leaves the previous rows, never half a line
            write_bytes_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in on_disk.values()).encode())
        if on_row is not None:
            on_row(row)

    todo = [pt for pt in points if pt not in done]
    if workers == 1:
        if model is None:
            _load_worker(preset, threads)
            model, tokenizer, task = _WORKER["model"], _WORKER["tokenizer"], _WORKER["task"]
        else:
            from tinylab.tasks import get as get_task

            task = get_task(p.task, **p.task_options)
        for pt in todo:
            finish(run_point(model, tokenizer, task, pt, training, n_eval=n_eval, strategy=strategy, out=out))
    elif todo:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_load_worker,
                                 initargs=(preset, threads)) as pool:
            futures = [pool.submit(_worker_point, pt, training, n_eval, strategy, out) for pt in todo]
            for future in as_completed(futures):
                finish(future.result())
    return pd.DataFrame([done[pt] for pt in points])


def method_differences(results: pd.DataFrame, *, a: str = "GRPO", b: str = "SFT",
                       measure: str = "strict") -> pd.DataFrame:
    """Per budget and seed, `a` minus `b` on `measure`, paired over the same held-out prompts.

    One row per (budget, seed) with `tinylab.paired`'s fields (`diff`, `low`, `high`, `p_value`,
    `gained`, `lost`, `n`, `beyond_noise`); `before` is `b`'s rate and `after` is `a`'s.
    """
    check_choice("measure", measure, tuple(MEASURES))
    column = f"{measure}_outcomes"
    rows = []
    for (budget, run_seed), part in results.groupby(["budget", "seed"]):
        by_method = {m: r for m, r in zip(part["method"], part[column])}
        if a not in by_method or b not in by_method:
            continue
        d = paired(by_method[b], by_method[a])
        rows.append(dict(budget=budget, params=int(part["params"].iloc[0]), seed=run_seed,
                         **dataclasses.asdict(d), beyond_noise=d.beyond_noise))
    if not rows:
        raise ValueError(f"no (budget, seed) has both {a!r} and {b!r} rows; methods present: "
                         f"{sorted(set(results['method']))}")
    return pd.DataFrame(rows)
