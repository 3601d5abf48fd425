"""What a benchmark printed, kept as `benchmarks/results/NAME.txt` with when, where and how it ran.

    def main():
        parser = argparse.ArgumentParser(...)
        add_results_option(parser, "adapter")  # --results NAME (default adapter); --results none: no file
        ...

    if __name__ == "__main__":
        with results_file(results_name("adapter")):  # what main() prints goes to the screen and the file
            main()

`results_name` reads `--results NAME` from the command line before `main()` parses it: no file for
`--help`, and none for a smoke run (`--quick`) unless `--results` names one, so a smoke run never
replaces a measured result.

The file holds header lines, then the printed text as it was printed:

    # results of benchmarks/adapter.py (written by benchmarks/results_file.py)
    # date: 2026-12-04 10:11:12 UTC, run took 123 s
    # commit: 0123456789abcdef0123456789abcdef01234567 +dirty (uncommitted changes outside benchmarks/results/)
    # machine: Linux x86_64 (AMD EPYC), 2 cores (2 usable), torch 2.13.0 with 1 thread(s), load average 1.52 at start, 2.01 at end
    # command: OMP_NUM_THREADS=1 python benchmarks/adapter.py --threads 1

While the run goes, the text streams into `NAME.txt.partial`; the finished file replaces `NAME.txt`
only when the block ends without an exception, so an interrupted run keeps the last whole result
(and leaves its partial text beside it). Standard error (progress bars, warnings) is not kept.
Only the standard library here: the writer works whatever the benchmark imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RESULTS", "add_results_option", "header", "results_file", "results_name"]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# environment variables that change what a benchmark measures, written into the command line
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TINYLAB_QUICK", "TINYLAB_GSM8K",
                "TINYLAB_CACHE")


def add_results_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--results NAME`: write `benchmarks/results/NAME.txt` (default `default`); `--results none`: no file."""
    parser.add_argument("--results", default=default, metavar="NAME",
                        help=f"write what is printed to benchmarks/results/NAME.txt (default {default}); "
                             "'none': no file")


def results_name(default: str, argv: list[str] | None = None, smoke: tuple[str, ...] = ("--quick",)) -> str | None:
    """The NAME of `--results NAME` in `argv` (default: the command line), else `default`; None (no file)
    for `--help` and, unless `--results` is given, for a smoke run (any flag in `smoke`)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--results", default=None)
    given = parser.parse_known_args(argv)[0].results
    if given is not None:
        return given
    return None if any(flag in argv for flag in smoke) else default


class _Tee:
    """A text stream that writes to the terminal's stream and to a file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno, ...: the terminal's
        return getattr(self.stream, name)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _commit() -> str:
    head = _git("rev-parse", "HEAD")
    if head is None:
        return "unknown (not a git checkout, or git is missing)"
    changes = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return head + (" +dirty (uncommitted changes outside benchmarks/results/)" if changes else " (clean)")


def _command() -> str:
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path.cwd().resolve())
    settings = [f"{k}={shlex.quote(os.environ[k])}" for k in _ENVIRONMENT if k in os.environ]
    return " ".join([*settings, "python", shlex.join([str(script), *sys.argv[1:]])])


def _cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo, else what `platform` knows): ratios of one
    machine's runs can differ from another kind of processor's."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "processor unknown"


def _machine(load_start: float) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = sys.modules.get("torch")
    threads = f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)" if torch else "torch not imported"
    return (f"{platform.system()} {platform.machine()} ({_cpu_name()}), {os.cpu_count()} cores ({usable} usable), {threads}, "
            f"load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")


def header(script: str, started: float, load_start: float, commit: str, command: str) -> str:
    """The header lines of a results file (each starts with '# '); `commit` and `command` as they were
    when the run started (a benchmark may set environment variables of its own)."""
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
    return "\n".join([
        f"# results of {script} (written by benchmarks/results_file.py)",
        f"# date: {date}, run took {time.time() - started:.0f} s",
        f"# commit: {commit}",
        f"# machine: {_machine(load_start)}",
        f"# command: {command}",
    ]) + "\n"


@contextlib.contextmanager
def results_file(name: str | None, folder: str | os.PathLike = RESULTS) -> Iterator[Path | None]:
    """Tee standard output into `folder/NAME.txt` (see the module docstring); `name` None or 'none': no file.

    Yields the path the file will have (None when no file is written)."""
    if name is None or name.lower() == "none":
        yield None
        return
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name={name!r}: a results file name is a plain word such as 'adapter' or "
                         "'demo_cpu-seed0' (no folders, not empty, not starting with '.')")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, partial = folder / f"{name}.txt", folder / f"{name}.txt.partial"
    started, load_start, commit, command = time.time(), os.getloadavg()[0], _commit(), _command()
    script = Path(sys.argv[0]).name
    script = f"benchmarks/{script}" if script.endswith(".py") else script
    try:
        with open(partial, "w") as out, contextlib.redirect_stdout(_Tee(sys.stdout, out)):
            yield final
    except BaseException:
        if partial.stat().st_size == 0:  # failed before printing anything (e.g. a bad argument): no trace
            partial.unlink()
        raise
    body = partial.read_text()
    tmp = folder / f".{name}.txt.tmp"
    tmp.write_text(header(script, started, load_start, commit, command) + body)
    os.replace(tmp, final)
    partial.unlink()
    print(f"[results written to {final.relative_to(REPO) if final.is_relative_to(REPO) else final}]", flush=True)
