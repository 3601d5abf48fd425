"""A package's submodules are its attributes once named, and only then imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tinylab
from tinylab.basics.submodules import submodules_on_demand


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_submodule_is_imported_when_first_named_and_not_before():
    out = _fresh("import sys, tinylab\n"
                 "before = 'tinylab.interop.lm_eval_harness' in sys.modules\n"
                 "module = tinylab.interop.lm_eval_harness\n"
                 "print(before, module.__name__, 'tinylab.interop.lm_eval_harness' in sys.modules,"
                 " tinylab.widgets.__name__)")
    assert out == "False tinylab.interop.lm_eval_harness True tinylab.widgets"


def test_a_name_that_is_no_submodule_is_the_usual_attribute_error():
    with pytest.raises(AttributeError, match="module 'tinylab.model' has no attribute 'no_such_thing'"):
        tinylab.model.no_such_thing  # noqa: B018
    assert not hasattr(tinylab.analysis, "_private_probe")  # private names are never looked up as modules
    assert hasattr(tinylab.model, "generation")


def test_the_hook_looks_in_its_own_package():
    hook = submodules_on_demand("tinylab.tasks")
    assert hook("base").__name__ == "tinylab.tasks.base"
    with pytest.raises(AttributeError, match="'tinylab.tasks' has no attribute 'generation'"):
        hook("generation")  # a module of another folder
