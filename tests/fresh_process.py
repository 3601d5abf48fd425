"""Tests that run in a fresh process: their bounds (peak memory, CPU time) must see only what the
code under test does, never what other tests left in a shared pytest worker.

Mark a test `@pytest.mark.fresh_process` (or a module: `pytestmark = pytest.mark.fresh_process`)
and this plugin (loaded by tests/conftest.py) runs it alone, with pytest, in a child process forked
from a server that has only imported `PRELOAD` (multiprocessing's "forkserver": a new interpreter,
started once per pytest process). The child holds nothing of any other test: one test, one child,
its fixtures set up and torn down there. Its reports (outcome, failure, captured output) come back
to this process's pytest. The imports are paid once, in the server, not once per test.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

PRELOAD = ["torch", "hypothesis", "pytest", "tinylab",
           # what tiny_model loads on first use (transformers imports model and tokenizer code lazily)
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.gemma.modeling_gemma"]
_CONTEXT = multiprocessing.get_context("forkserver")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("fresh_process") is None:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in run_fresh(item):
        item.ihook.pytest_runtest_logreport(report=report)
    # the item ran in the child; here, tear down what the next item does not share (as pytest's own
    # protocol does after each item), so a folder set up for earlier tests is not left on the stack
    item.session._setupstate.teardown_exact(nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def run_fresh(item) -> list[pytest.TestReport]:
    """Run `item` alone in a fresh child process; its setup, call and teardown reports."""
    config = item.config
    args = [item.nodeid, "-q", "-p", "no:cacheprovider", "--rootdir", str(config.rootpath)]
    args += ["-c", str(config.inipath)] if config.inipath else []
    args += ["-s"] if config.getoption("capture") == "no" else []
    _CONTEXT.set_forkserver_preload(PRELOAD)  # used when the server starts (the first call)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=_CONTEXT) as pool:
            code, data, output = pool.submit(_child, args, dict(os.environ), os.getcwd()).result()
    except BrokenProcessPool as err:
        code, data, output = None, [], f"the child process died: {err}"
    reports = [config.hook.pytest_report_from_serializable(config=config, data=d) for d in data]
    if not any(r.when == "call" or r.failed or r.skipped for r in reports):  # died, or not collected
        reports.append(pytest.TestReport(item.nodeid, item.location, {}, "failed",
                                  f"in a fresh process: pytest exit code {code}, no result\n{output}", "call"))
    return reports


class _Collector:
    """In the child: the test's reports, serialized for the parent."""

    def __init__(self):
        self.data, self.config = [], None

    def pytest_configure(self, config):
        self.config = config

    def pytest_runtest_logreport(self, report):
        self.data.append(self.config.hook.pytest_report_to_serializable(config=self.config, report=report))


def _child(args: list[str], environ: dict, cwd: str) -> tuple[int, list[dict], str]:
    # the worker's environment now (the server kept the one it started with); of the plugins
    # installed, only hypothesis's is needed (loading every entry point costs ~1 s per child);
    # this plugin is left out: here the test runs as usual
    os.environ.clear()
    os.environ.update(environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    os.chdir(cwd)
    collector = _Collector()
    with tempfile.TemporaryFile("w+") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        code = pytest.main([*args, "-p", "_hypothesis_pytestplugin", "-p", "no:fresh_process"], plugins=[collector])
        out.seek(0)
        return int(code), collector.data, out.read()
