"""benchmarks/results_file.py: what a benchmark prints goes to the screen and to benchmarks/results/NAME.txt,
under header lines saying when, at which commit, on what machine and by which command it ran."""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("results_file", REPO / "benchmarks" / "results_file.py")
results_file_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_file_module)
results_file, results_name = results_file_module.results_file, results_file_module.results_name
add_results_option = results_file_module.add_results_option


def test_printed_text_goes_to_the_screen_and_under_the_header(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/adapter.py", "--threads", "1"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("TINYLAB_CACHE", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TINYLAB_QUICK", "TINYLAB_GSM8K"):
        monkeypatch.delenv(name, raising=False)  # the command line names only what this test set
    with results_file("adapter", folder=tmp_path) as path:
        os.environ["TINYLAB_CACHE"] = "/tmp/cold"  # set by the benchmark itself: not part of the command
        print("ratio adapted / base: 1.013")
        print("goal 1.03", flush=True)
        assert (tmp_path / "adapter.txt.partial").exists() and not path.exists()
    assert path == tmp_path / "adapter.txt" and not (tmp_path / "adapter.txt.partial").exists()
    screen = capsys.readouterr().out
    assert screen.startswith("ratio adapted / base: 1.013\ngoal 1.03\n") and str(path) in screen
    lines = path.read_text().splitlines()
    assert lines[0] == "# results of benchmarks/adapter.py (written by benchmarks/results_file.py)"
    assert re.fullmatch(r"# date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, run took \d+ s", lines[1])
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    head = done.stdout.strip() if done.returncode == 0 else None
    commit = rf"{head} (\(clean\)|\+dirty \(uncommitted changes outside benchmarks/results/\))" if head else "unknown.*"
    assert re.fullmatch(f"# commit: {commit}", lines[2])
    assert re.fullmatch(rf"# machine: \S+ \S+ \(.+\), {os.cpu_count()} cores \(\d+ usable\), (torch \S+ with \d+ thread\(s\)|torch not imported), "
                        r"load average \d+\.\d\d at start, \d+\.\d\d at end", lines[3])
    assert lines[4] == "# command: OMP_NUM_THREADS=1 python benchmarks/adapter.py --threads 1"
    assert lines[5:] == ["ratio adapted / base: 1.013", "goal 1.03"]


def test_an_interrupted_run_keeps_the_last_whole_file_and_its_partial_text(tmp_path):
    (tmp_path / "bank.txt").write_text("the last whole run\n")
    with pytest.raises(KeyboardInterrupt), results_file("bank", folder=tmp_path):
        print("round 0 done")
        raise KeyboardInterrupt
    assert (tmp_path / "bank.txt").read_text() == "the last whole run\n"
    assert (tmp_path / "bank.txt.partial").read_text() == "round 0 done\n"


def test_none_writes_no_file_and_bad_names_are_refused(tmp_path, capsys):
    for name in (None, "none", "None"):
        with results_file(name, folder=tmp_path) as path:
            print("smoke")
        assert path is None
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == "smoke\n" * 3
    for bad in ("", "../adapter", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="a results file name is a plain word"), results_file(bad, folder=tmp_path):
            pass


def test_the_option_names_the_file_and_a_smoke_run_or_help_writes_none():
    parser = argparse.ArgumentParser()
    add_results_option(parser, "knobs")
    assert parser.parse_args([]).results == "knobs"
    assert parser.parse_args(["--results", "knobs-one-thread"]).results == "knobs-one-thread"
    assert results_name("knobs", ["--threads", "1"]) == "knobs"
    assert results_name("knobs", ["--threads", "1", "--results", "knobs-one-thread"]) == "knobs-one-thread"
    assert results_name("demo_cpu", ["--quick"]) is None and results_name("knobs", ["--help"]) is None
    assert results_name("demo_cpu", ["--quick", "--results", "demo_cpu-smoke"]) == "demo_cpu-smoke"


def test_a_run_that_fails_before_printing_leaves_nothing(tmp_path):
    with pytest.raises(SystemExit), results_file("knobs", folder=tmp_path):
        raise SystemExit(2)  # argparse refusing an argument
    assert list(tmp_path.iterdir()) == []


def test_every_benchmark_writes_its_results_file_and_make_runs_it():
    # each script under benchmarks/ (a file run as __main__; modules the scripts share aside) opens a results
    # file around what it prints
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py")
                     if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M) and p.name != "results_file.py")
    assert len(scripts) >= 10
    lacking = [p.name for p in scripts
               if not all(call in p.read_text() for call in ("results_file(", "results_name(", "add_results_option("))]
    assert not lacking, f"these benchmarks write no results file: {lacking}"
    makefile = (REPO / "Makefile").read_text()
    recipes = {target: makefile.split(f"\n{target}:")[1].split("\n\n")[0] for target in ("bench", "capitals-bench", "vllm")}
    assert "capitals-bench" in recipes["bench"]  # make bench runs the capitals protocol too
    skipped = [p.name for p in scripts if f"$(BENCH)/{p.name}" not in recipes["bench"] + recipes["capitals-bench"]
               and f"benchmarks/{p.name}" not in recipes["vllm"]]  # the vLLM checks run in their own venv
    assert not skipped, f"neither make bench nor make vllm runs {skipped}"


def test_every_results_file_says_when_where_and_how_it_ran():
    # the header lines results_file writes (hand-assembled files of earlier runs carry the same four)
    files = sorted((REPO / "benchmarks" / "results").glob("*.txt"))
    assert files
    lacking = {p.name: [key for key in ("date", "commit", "machine", "command")
                        if not any(line.startswith(f"# {key}: ") for line in p.read_text().splitlines()[:8])]
               for p in files}
    assert not {name: keys for name, keys in lacking.items() if keys}, lacking


def test_seeds_run_side_by_side_leave_the_results_file_to_the_parent(tmp_path, monkeypatch):
    # knowledge.py / demo_cpu.py --jobs 2 start one child per seed with the parent's arguments: a child that
    # also wrote the parent's results file would race it for NAME.txt.partial (and remove it under the parent)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import capitals_protocol

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        out = command[command.index("--outcomes") + 1]
        capitals_protocol.save(out, {"args": {}, "strata": {}, "seeds": [{"seed": int(command[command.index("--seeds") + 1])}]})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(capitals_protocol.subprocess, "run", fake_run)
    parts = capitals_protocol.parallel("benchmarks/knowledge.py", ["--split", "test", "--results", "knowledge_test"],
                                       [0, 1], 2)
    assert [p["seeds"][0]["seed"] for p in parts] == [0, 1]
    for command in commands:
        assert str(results_name("knowledge", command[2:])).lower() == "none", command  # None or "none": no file
