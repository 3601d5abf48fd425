"""Experiment tracking (tinylab.train.tracking): what a run logs to Trackio, TensorBoard and W&B, read back
from their files offline, equals the run's own history; the loop's numbers do not change."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import testkit
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig, train_grpo
from tinylab.train.records import StopTraining
from tinylab.train.sft import SFTConfig, train_sft
from tinylab.train.tracking import TRL_NAMES, Tracking, step_metrics


class WordTask(testkit.WordTask):
    """testkit's word task (distinct characters rewarded: every group has spread, so v moves), shorter replies."""

    name = "words"
    max_new_tokens = 4


CONFIG = GRPOConfig(prompts_per_step=2, group_size=3, max_new_tokens=4, lr=0.05, steps=2, seed=0, clip=0.2)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def _train(tiny, tmp_path, train=train_grpo, callbacks=(), **fields):
    model, tok = tiny
    adapter = apply_tinylora(model, u=3, n_tie="all", seed=0)
    config = CONFIG if train is train_grpo else SFTConfig.from_grpo(CONFIG)
    config = dataclasses.replace(config, checkpoint_dir=str(tmp_path / "run"), **fields)
    try:
        run = train(model, tok, adapter, WordTask(), config, callbacks=callbacks)
    finally:
        adapter.remove()
    return run


def _expected(run) -> list[dict]:
    """Per step, the values the history holds under the names the trackers should carry."""
    rows = []
    for entry in run.logs:
        row = {f"train/{name}": float(getattr(entry, field)) for field, name in TRL_NAMES.items()}
        row.update({f"train/{field}": float(getattr(entry, field)) for field in ("v_norm", "format_rate",
                                                                                   "correct_rate", "step_time")})
        rows.append({k: v for k, v in row.items() if not math.isnan(v)})
    return rows


# --- TensorBoard


def _tensorboard_scalars(folder: Path):
    """{tag: {step: value}} of the event files in `folder`, and the accumulator (for the config text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


def test_tensorboard_holds_the_histories_values_under_trls_names(tiny, tmp_path):
    run = _train(tiny, tmp_path, report_to="tensorboard", project="proj", run_name="tb", tracking_dir=str(tmp_path))
    folder = tmp_path / "proj" / "tb"
    scalars, acc = _tensorboard_scalars(folder)
    expected = _expected(run)
    assert {"train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/completions/mean_length",
            "train/completions/max_length", "train/clip_ratio/region_mean", "train/loss", "train/grad_norm",
            "train/v_norm"} <= set(scalars)
    assert "train/kl" not in scalars  # kl=0: not measured, left out as TRL leaves it out
    for step, row in enumerate(expected, start=1):
        for key, value in row.items():
            assert scalars[key][step] == np.float32(value), key  # TensorBoard stores float32
    v = run.vector
    assert [scalars[f"train/v/{i}"][2] for i in range(3)] == [np.float32(x) for x in v.tolist()]
    assert any(x != 0 for x in v.tolist())  # v moved: the logged entries are the trained ones
    config = json.loads(acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
                        .removeprefix("```json\n").removesuffix("\n```"))
    assert config["config/lr"] == CONFIG.lr and config["params"] == 3 and config["kind"] == "grpo"


def test_logging_leaves_the_loops_numbers_unchanged(tiny, tmp_path):
    quiet = _train(tiny, tmp_path / "a")
    logged = _train(tiny, tmp_path / "b", report_to="tensorboard", tracking_dir=str(tmp_path / "tb"))
    assert torch.equal(quiet.vector, logged.vector)
    assert [e.reward_mean for e in quiet.logs] == [e.reward_mean for e in logged.logs]
    assert (tmp_path / "tb" / "tinylab" / "run").is_dir()  # no run_name: the checkpoint folder's name


def test_sft_logs_its_loss_under_the_same_names(tiny, tmp_path):
    run = _train(tiny, tmp_path, train=train_sft, report_to="tensorboard", run_name="sft",
                 tracking_dir=str(tmp_path))
    scalars, _ = _tensorboard_scalars(tmp_path / "tinylab" / "sft")
    assert [scalars["train/loss"][s] for s in (1, 2)] == [np.float32(e.loss) for e in run.logs]
    assert "train/reward" not in scalars  # SFT samples nothing: no reward to log


def test_a_failed_or_stopped_run_closes_its_writer_with_the_steps_done(tiny, tmp_path):
    tracker = Tracking("tensorboard", name="stopped", directory=str(tmp_path))

    def stop_after_first(entry):
        raise StopTraining("enough")

    run = _train(tiny, tmp_path, callbacks=[tracker, stop_after_first])
    assert run.status == "stopped" and tracker.writer is None
    scalars, _ = _tensorboard_scalars(tmp_path / "tinylab" / "stopped")
    assert scalars["train/reward"] == {1: np.float32(run.logs[0].reward_mean)}

    tracker = Tracking("tensorboard", name="failed", directory=str(tmp_path))

    def fail(entry):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _train(tiny, tmp_path / "f", callbacks=[tracker, fail])
    assert tracker.writer is None
    assert 1 in _tensorboard_scalars(tmp_path / "tinylab" / "failed")[0]["train/reward"]


# --- Trackio


def test_trackio_holds_the_histories_values_and_the_held_out_scores(tiny, tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    tracker = Tracking("trackio", project="tinylab-test", name="trackio-run", group="g")
    with tracker:  # kept open after training for the held-out scores
        run = _train(tiny, tmp_path, callbacks=[tracker])
        run_id = tracker.writer.id
        tracker.log_scores({"strict": 0.25, "flexible": 0.5, "formatted": float("nan")})
    assert tracker.writer is None
    logs = SQLiteStorage.get_logs("tinylab-test", run_id=run_id)
    steps = [row for row in logs if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row, expected in zip(steps, _expected(run), strict=True):
        assert {k: row[k] for k in expected} == expected
    assert [steps[-1][f"train/v/{i}"] for i in range(3)] == run.vector.tolist()
    (scores,) = [row for row in logs if "eval/strict" in row]
    assert (scores["eval/strict"], scores["eval/flexible"], scores["step"]) == (0.25, 0.5, 2)
    assert "eval/formatted" not in scores  # NaN = not measured
    config = SQLiteStorage.get_run_config("tinylab-test", "trackio-run")
    assert (config["config/lr"], config["kind"], config["_Group"]) == (CONFIG.lr, "grpo", "g")
    # trackio wrote into the session's temporary folder (tests/conftest.py), never into ~/.cache
    assert SQLiteStorage.get_project_db_path("tinylab-test").parent == Path(os.environ["TRACKIO_DIR"])


def test_trackio_refuses_a_folder_other_than_the_one_it_was_imported_with(tmp_path):
    import trackio  # noqa: F401  (once imported, its folder is fixed)

    with pytest.raises(ValueError, match=r"tracking_dir=.*TRACKIO_DIR"):
        Tracking("trackio", directory=str(tmp_path))
    assert Tracking("trackio", directory=os.environ["TRACKIO_DIR"]).writer is None  # its own folder is fine


def test_tracking_dir_points_trackio_at_it_when_trackio_is_not_imported_yet(tmp_path):
    """In a fresh process (here, trackio is imported already): the folder is set before trackio reads it."""
    import subprocess

    code = ("import sys, tinylab; from tinylab.train.tracking import Tracking; assert 'trackio' not in sys.modules; "
            f"Tracking('trackio', directory={str(tmp_path)!r}); import trackio.utils; print(trackio.utils.TRACKIO_DIR)")
    env = {k: v for k, v in os.environ.items() if k != "TRACKIO_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip().splitlines()[-1]) == tmp_path.resolve()


# --- W&B offline


def _wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a LevelDB-style log of 32 KiB blocks after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _wandb_run(folder: Path):
    """(the run record, [history rows]) of the one offline W&B run under `folder`."""
    import wandb

    wandb.teardown()  # run.finish() may return before W&B's service process has written the run's file
    (path,) = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, meta = [], None
    for record in _wandb_records(Path(path)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "run":
            meta = record.run
    return meta, history


def test_wandb_offline_holds_the_histories_values(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # (not WANDB_SILENT: with it, wandb 0.31's finish() returns before the run's file is written)
    run = _train(tiny, tmp_path, report_to="wandb", project="proj", run_name="wb", run_group="g",
                 tracking_dir=str(tmp_path / "wandb-root"))
    meta, history = _wandb_run(tmp_path / "wandb-root")
    assert (meta.project, meta.display_name, meta.run_group) == ("proj", "wb", "g")
    config = {item.key: json.loads(item.value_json) for item in meta.config.update}
    assert config["config/lr"] == CONFIG.lr
    for row, expected in zip(history, _expected(run), strict=True):
        assert {k: row[k] for k in expected} == expected
    assert [row["train/global_step"] for row in history] == [1, 2]


# --- sweeps


def test_a_sweep_logs_one_run_per_point_in_one_group_with_its_held_out_scores(tmp_path):
    from tinylab.experiments.sweeps import budget_sweep
    from tinylab.train.presets import preset

    training = dataclasses.replace(preset("tiny-cpu").training, tracking_dir=str(tmp_path / "tb"), project="sweeps")
    rows = budget_sweep("tiny-cpu", budgets=[1], seeds=[0], n_eval=2, training=training, out=tmp_path / "sweep-a",
                        report_to="tensorboard")
    group = tmp_path / "tb" / "sweeps" / "sweep-a"  # the group: the out folder's name
    assert sorted(p.name for p in group.iterdir()) == ["grpo-00001-seed0", "sft-00001-seed0"]
    for row in rows.to_dict("records"):
        scalars, _ = _tensorboard_scalars(group / f"{row['method'].lower()}-00001-seed0")
        assert sorted(scalars["train/v_norm"]) == [1, 2]
        for measure in ("strict", "flexible", "formatted", "mean_length"):
            assert scalars[f"eval/{measure}"] == {2: np.float32(row[measure])}
    # tracking is not a sweep setting: the same folder, now without tracking, trains nothing again
    again = budget_sweep("tiny-cpu", budgets=[1], seeds=[0], n_eval=2, training=training, out=tmp_path / "sweep-a")
    assert list(again["vector"]) == list(rows["vector"])


# --- errors


@pytest.mark.parametrize("make", [GRPOConfig, SFTConfig])
def test_report_to_is_checked_naming_the_bad_value_and_the_allowed_ones(make):
    with pytest.raises(ValueError, match="report_to='mlflow'.*'trackio', 'tensorboard', 'wandb'"):
        make(report_to="mlflow")
    with pytest.raises(ValueError, match="project=''"):
        make(project="")
    assert make(report_to="wandb", run_name="x").report_to == "wandb"


@pytest.mark.parametrize("report_to, extra", [("trackio", "track"), ("tensorboard", "track"), ("wandb", "wandb")])
def test_a_missing_package_names_the_extra_to_install_before_any_step(tiny, tmp_path, monkeypatch, report_to, extra):
    monkeypatch.setitem(sys.modules, report_to, None)  # `import <package>` raises ImportError
    with pytest.raises(ImportError, match=rf'report_to=.{report_to}. needs .*pip install "tinylab\[{extra}\]"'):
        _train(tiny, tmp_path, report_to=report_to)
    assert not (tmp_path / "run" / "state.json").exists()  # refused before the run started


def test_step_metrics_leave_out_what_a_step_did_not_measure():
    from tinylab.train.records import step_log

    entry = step_log(3, "sft", loss=1.5, v_norm=0.25, completion_len=4.0, completion_len_max=6)
    metrics = step_metrics(entry, torch.tensor([0.5, -1.0, 2.0]), vector_entries=2)
    assert metrics == {"train/global_step": 3.0, "train/loss": 1.5, "train/completions/mean_length": 4.0,
                       "train/completions/max_length": 6.0, "train/v_norm": 0.25, "train/v/0": 0.5, "train/v/1": -1.0}


# --- the TRL backend


@pytest.mark.parametrize("report_to", ["tensorboard", "trackio", "wandb"])
def test_trl_logs_the_same_names_to_the_same_place(tiny, tmp_path, monkeypatch, report_to):
    from tinylab.interop.trl_bridge import grpo_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    model, tok = tiny
    adapter = apply_tinylora(model, u=3, n_tie="all", seed=0)
    config = dataclasses.replace(CONFIG, steps=1, group_size=2, report_to=report_to, project="both",
                                 run_name=f"trl-{report_to}", run_group="g", tracking_dir=str(tmp_path))
    if report_to == "trackio":
        config = dataclasses.replace(config, tracking_dir=os.environ["TRACKIO_DIR"])
    try:
        trainer = grpo_trainer(model, tok, adapter, WordTask(), config, output_dir=str(tmp_path / "out"))
        assert trainer.args.report_to == [report_to] and trainer.args.run_name == f"trl-{report_to}"
        trainer.train()
    finally:
        adapter.remove()
    (entry,) = trainer.tinylab_logs.logs
    if report_to == "tensorboard":
        scalars, _ = _tensorboard_scalars(tmp_path / "both" / "g" / "trl-tensorboard")  # where train_grpo writes
        logged = {key: values[1] for key, values in scalars.items()}
        assert logged["train/reward"] == np.float32(entry.reward_mean)
    elif report_to == "wandb":  # TRL's callback logged into the run tinylab opened: project, name, group
        meta, history = _wandb_run(tmp_path)
        assert (meta.project, meta.display_name, meta.run_group) == ("both", "trl-wandb", "g")
        (logged,) = [row for row in history if "train/reward" in row]
        assert logged["train/reward"] == pytest.approx(entry.reward_mean)
    else:
        from trackio.sqlite_storage import SQLiteStorage

        (logged,) = [row for row in SQLiteStorage.get_logs("both", "trl-trackio") if "train/reward" in row]
        assert logged["train/reward"] == pytest.approx(entry.reward_mean)
    # TRL's names for the quantities tinylab logs under the same keys
    assert {"train/reward", "train/reward_std", "train/frac_reward_zero_std", "train/completions/mean_length",
            "train/completions/max_length", "train/clip_ratio/region_mean", "train/loss", "train/grad_norm"} <= set(logged)
