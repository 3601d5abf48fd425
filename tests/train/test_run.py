"""Stopping, checkpoints and resume (issue 8's failure matrix for training)."""

import dataclasses
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testkit import WordTask

import tinylab.train.grpo
from tinylab import resume
from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig, train_grpo
from tinylab.train.records import NonFiniteError, StopTraining
from tinylab.train.run_folder import read_state

CONFIG = GRPOConfig(prompts_per_step=2, group_size=3, max_new_tokens=4, lr=0.05, steps=4, seed=3)


def _fresh():
    model, tok = tiny_model("llama", seed=0)
    return model, tok, apply_tinylora(model, u=4, n_tie="all")


def _cfg(path, **kw):
    return dataclasses.replace(CONFIG, checkpoint_dir=str(path), **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """v after an uninterrupted 4-step run, and after 2 steps."""
    model, tok, adapter = _fresh()
    at_2 = []
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path_factory.mktemp("ref")),
                     callbacks=[lambda log: at_2.append(adapter.vector()) if log.step == 2 else None])
    assert run.status == "finished"
    return run.vector, at_2[0], run.history


def _stop_at(step, exc=StopTraining):
    def callback(log):
        if log.step == step:
            raise exc("enough")
    return callback


def _resume_and_compare(folder, reference, task=None):
    model, tok, _ = _fresh()
    model2, tok2 = tiny_model("llama", seed=0)
    run = resume(folder, model2, tok2, task or WordTask())
    assert run.status == "finished" and run.step == 4
    torch.testing.assert_close(run.vector, reference[0], atol=1e-6, rtol=0)
    assert list(run.history["step"]) == [1, 2, 3, 4]
    return run


def test_stop_from_callback_checkpoints_and_resumes_exactly(tmp_path, reference):
    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[_stop_at(2)])
    assert run.status == "stopped" and run.step == 2 and "enough" in run.reason
    torch.testing.assert_close(run.vector, reference[1], atol=0, rtol=0)
    state = read_state(tmp_path)
    assert state["step"] == 2 and state["status"] == "stopped" and len(state["history"]) == 2
    tensors = load_file(str(tmp_path / "state.safetensors"))
    assert tensors["rng.torch"].dtype == torch.uint8
    assert set(tensors) == {"v", "rng.torch", "adam.exp_avg", "adam.exp_avg_sq"}
    from tinylab.adapter.file_format import load_adapter

    loaded = load_adapter(tiny_model("llama", seed=0)[0], tmp_path / "adapter.tlra")
    assert torch.equal(loaded.vector(), run.vector)
    resumed = _resume_and_compare(tmp_path, reference)
    # resumed history keeps the first two steps' records
    assert resumed.history["reward_mean"].iloc[:2].tolist() == reference[2]["reward_mean"].iloc[:2].tolist()


def test_a_history_written_before_a_field_existed_resumes_with_that_field_unmeasured(tmp_path, reference):
    """A run folder from before StepLog had `entropy` resumes: its steps read NaN (not measured), the new
    steps measure it, and the run ends where an uninterrupted one does."""
    model, tok, adapter = _fresh()
    train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[_stop_at(2)])
    state_file = tmp_path / "state.json"
    state = json.loads(state_file.read_text())
    for entry in state["history"]:
        del entry["entropy"]
    state_file.write_text(json.dumps(state))
    entropy = _resume_and_compare(tmp_path, reference).history["entropy"].tolist()
    assert all(math.isnan(x) for x in entropy[:2]) and all(0 < x < math.inf for x in entropy[2:])


def test_keyboard_interrupt_in_callback_stops_cleanly(tmp_path, reference):
    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[_stop_at(3, KeyboardInterrupt)])
    assert run.status == "interrupted" and run.step == 3
    assert read_state(tmp_path)["step"] == 3
    _resume_and_compare(tmp_path, reference)


def test_keyboard_interrupt_mid_step_rolls_back_that_step(tmp_path, reference, monkeypatch):
    real = tinylab.train.grpo.generate
    calls = []

    def interrupted_generate(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # during step 3, before its update
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(tinylab.train.grpo, "generate", interrupted_generate)
    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path))
    assert run.status == "interrupted" and run.step == 2
    torch.testing.assert_close(run.vector, reference[1], atol=0, rtol=0)
    monkeypatch.setattr(tinylab.train.grpo, "generate", real)
    _resume_and_compare(tmp_path, reference)


def test_run_stop_from_another_thread(tmp_path, reference):
    model, tok, adapter = _fresh()
    first_step = threading.Event()
    release = threading.Event()

    def wait_after_first(log):
        if log.step == 1:
            first_step.set()
            assert release.wait(30)

    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[wait_after_first], background=True)
    assert first_step.wait(60)
    assert run.running
    run.stop()  # from this (main) thread, while the loop thread is inside step 1's callback
    release.set()
    run.wait(60)
    assert run.status == "stopped" and run.step == 1 and "run.stop()" in run.reason
    assert read_state(tmp_path)["step"] == 1
    _resume_and_compare(tmp_path, reference)


def test_run_stop_via_on_start_handle(tmp_path):
    class StopAfterOne:
        def on_start(self, run):
            self.run = run

        def __call__(self, log):
            self.run.stop()

    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[StopAfterOne()])
    assert run.status == "stopped" and run.step == 1


def test_nan_reward_keeps_last_finite_state_and_resumes(tmp_path, reference):
    model, tok, adapter = _fresh()
    with pytest.raises(NonFiniteError, match="reward is not finite at step 3"):
        train_grpo(model, tok, adapter, WordTask(nan_on_call=3), _cfg(tmp_path))
    assert torch.isfinite(adapter.vector()).all()
    torch.testing.assert_close(adapter.vector(), reference[1], atol=0, rtol=0)
    state = read_state(tmp_path)
    assert state["step"] == 2 and state["status"] == "failed" and "NonFiniteError" in state["reason"]
    _resume_and_compare(tmp_path, reference)


def test_nan_loss_never_reaches_v_and_resumes(tmp_path, reference, monkeypatch):
    real = tinylab.train.grpo.policy_loss
    calls = []

    def nan_loss(*args, **kw):
        calls.append(1)
        loss, stats = real(*args, **kw)
        return (loss * math.nan if len(calls) == 2 else loss), stats

    monkeypatch.setattr(tinylab.train.grpo, "policy_loss", nan_loss)
    model, tok, adapter = _fresh()
    with pytest.raises(NonFiniteError, match="loss"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path))
    assert torch.isfinite(adapter.vector()).all()
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert torch.isfinite(saved["v"]).all() and torch.isfinite(saved["adam.exp_avg"]).all()
    assert read_state(tmp_path)["step"] == 1
    monkeypatch.setattr(tinylab.train.grpo, "policy_loss", real)
    _resume_and_compare(tmp_path, reference)


def test_nan_v_after_update_is_rolled_back(tmp_path, monkeypatch):
    model, tok, adapter = _fresh()
    real_step = torch.optim.Adam.step

    def poisoned(self, *a, **kw):
        out = real_step(self, *a, **kw)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    v0 = adapter.vector()
    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(NonFiniteError, match="v is not finite at step 1"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path))
    assert torch.equal(adapter.vector(), v0)


def test_exception_in_callback_is_raised_after_checkpoint(tmp_path, reference):
    model, tok, adapter = _fresh()
    def broken(log):
        raise RuntimeError("plot broke")

    with pytest.raises(RuntimeError, match="plot broke"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[broken])
    state = read_state(tmp_path)
    assert state["step"] == 1 and state["status"] == "failed"
    _resume_and_compare(tmp_path, reference)  # the failed run's checkpoint continues to the same v


def test_periodic_checkpoints(tmp_path):
    model, tok, adapter = _fresh()
    steps_seen = []

    def look(log):
        steps_seen.append(read_state(tmp_path)["step"] if (tmp_path / "state.json").exists() else None)

    train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path, checkpoint_every=2), callbacks=[look])
    assert steps_seen == [None, 2, 2, 4]


def test_unwritable_or_full_checkpoint_dir_fails_before_training(tmp_path, monkeypatch):
    model, tok, adapter = _fresh()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    v0 = adapter.vector()
    with pytest.raises(OSError, match="is not writable"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(blocker / "run"))
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="disk is full"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path / "full"))
    assert torch.equal(adapter.vector(), v0)


def test_existing_run_folder_is_not_overwritten(tmp_path):
    model, tok, adapter = _fresh()
    train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path, steps=1))
    with pytest.raises(ValueError, match="already holds a run; continue it with tinylab.resume"):
        train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path, steps=1))


def test_resume_checks_task_and_base_model(tmp_path):
    model, tok, adapter = _fresh()
    train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path, steps=1))
    other_task = WordTask()
    other_task.name = "other"
    fresh, tok2 = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="trained on task 'toy', not 'other'"):
        resume(tmp_path, fresh, tok2, other_task)
    different, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="other base weights"):
        resume(tmp_path, different, tok2, WordTask())
    with pytest.raises(ValueError, match=r"already has a TinyLoRA adapter: pass it as resume\(..., adapter=adapter\), or call adapter.remove"):
        resume(tmp_path, model, tok, WordTask())
    done = resume(tmp_path, model, tok, WordTask(), adapter=adapter)  # already at its last step
    assert done.status == "finished" and done.step == 1
    with pytest.raises(FileNotFoundError, match="no tinylab run checkpoint"):
        resume(tmp_path / "nothing", fresh, tok2, WordTask())


def test_checkpoint_json_is_plain_data(tmp_path):
    model, tok, adapter = _fresh()
    train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path, steps=1))
    state = json.loads(Path(tmp_path / "state.json").read_text())
    assert state["config"]["lr"] == 0.05 and state["adapter_config"]["u"] == 4
    assert isinstance(state["rng"]["python"][1], list) and len(state["rng"]["numpy"][1]) == 624


def test_run_exists_before_training_and_continues_after_a_stop(tmp_path, reference):
    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(), _cfg(tmp_path), callbacks=[_stop_at(2)], start=False)
    assert run.status == "created" and run.step == 0 and not run.logs
    run.train()
    assert run.status == "stopped" and run.step == 2
    run.callbacks.clear()
    run.train()  # continue in place, same Run
    assert run.status == "finished" and run.step == 4
    torch.testing.assert_close(run.vector, reference[0], atol=1e-6, rtol=0)
    assert read_state(tmp_path)["step"] == 4


def test_background_start_and_wait_reraises(tmp_path):
    model, tok, adapter = _fresh()
    run = train_grpo(model, tok, adapter, WordTask(nan_on_call=2), _cfg(tmp_path), start=False)
    run.start()
    with pytest.raises(NonFiniteError):
        run.wait(120)
    assert run.status == "failed" and run.step == 1


def _stop_after_one_then_resume(dtype, folder, resume_context, write_context, to=None):
    """Train 1 of 2 steps, stop, then resume in a fresh model; compare with an uninterrupted run."""
    import contextlib

    cfg = dataclasses.replace(CONFIG, steps=2, checkpoint_dir=str(folder / "stopped"))
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    full_run = train_grpo(model, tok, apply_tinylora(model, u=4, n_tie="all"), WordTask(),
                          dataclasses.replace(cfg, checkpoint_dir=str(folder / "full")))
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    with write_context or contextlib.nullcontext():
        train_grpo(model, tok, apply_tinylora(model, u=4, n_tie="all"), WordTask(), cfg, callbacks=[_stop_at(1)])
    fresh, tok = tiny_model("llama", seed=0, dtype=dtype)
    if to is not None:
        fresh.to(to)
    with resume_context or contextlib.nullcontext():
        run = resume(folder / "stopped", fresh, tok, WordTask())
    assert run.status == "finished" and run.step == 2 and list(run.history["step"]) == [1, 2]
    assert all(p.device == next(fresh.parameters()).device and p.dtype == torch.float32
               for p in run.adapter.parameters())
    assert all(t.device == p.device for p, s in zip(run.adapter.parameters(), run.optimizer.state.values())
               for t in (s["exp_avg"], s["exp_avg_sq"]))
    return run, full_run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_makes_every_tensor_on_the_model_device(dtype, gpu_stand_in, tmp_path):
    """A folder written with the default device resumes under the stand-in (and the other way):
    everything loaded is placed on the model's device explicitly, and the run ends where an
    uninterrupted one does."""
    run, full = _stop_after_one_then_resume(dtype, tmp_path / "a", gpu_stand_in(), None)
    torch.testing.assert_close(run.vector, full.vector, atol=0, rtol=0)
    run, full = _stop_after_one_then_resume(dtype, tmp_path / "b", None, gpu_stand_in())
    torch.testing.assert_close(run.vector, full.vector, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_run_folder_written_on_the_cpu_resumes_on_cuda(dtype, tmp_path):
    run, full = _stop_after_one_then_resume(dtype, tmp_path, None, None, to="cuda")
    assert next(run.adapter.parameters()).is_cuda
    # step 1 (from the folder) is the CPU run's; step 2 sampled on CUDA may pick other tokens, and
    # Adam moves each entry by about lr per step, so the two runs end within 2 lr of each other
    torch.testing.assert_close(run.vector, full.vector, atol=2 * CONFIG.lr, rtol=0)


def test_two_runs_started_in_the_same_second_get_their_own_folders(monkeypatch, tmp_path):
    # the default folder is named by the second and the process: a second run of the same kind and task in
    # that second (a notebook cell, a README block) must not find the first one's folder and refuse to start
    import datetime

    import tinylab.train.run_folder as run_folder

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 6, 5, 36, 32)

    monkeypatch.setattr(run_folder.datetime, "datetime", Frozen)
    monkeypatch.setenv("TINYLAB_CACHE", str(tmp_path))
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    config = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=3, steps=1)
    first = train_grpo(model, tok, adapter, WordTask(), config)
    second = train_grpo(model, tok, adapter, WordTask(), config)
    assert first.status == second.status == "finished"
    assert first.checkpoint_dir != second.checkpoint_dir
    assert first.checkpoint_dir.parent == second.checkpoint_dir.parent == tmp_path / "runs"
    assert second.checkpoint_dir.name == first.checkpoint_dir.name + "-2"
