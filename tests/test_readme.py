"""The README's code runs: every Python block, in order, in quick sizes; every `tinylab.X` it names exists.

Quick sizes: the blocks run as written, in one namespace (like a notebook), except that
`tinylab.load_model()` gives a tiny random Llama and the calls that take sizes (training steps,
examples, prompts) are capped, so a block that names something missing or calls it wrongly fails
here in seconds.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import tinylab
from tinylab.model.tiny import tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


class _QuickTinylab:
    """`tinylab` with a tiny model and capped sizes; everything else is the real module."""

    def __getattr__(self, name):
        return getattr(tinylab, name)

    @staticmethod
    def load_model(*args, **kwargs):
        return tiny_model("llama", seed=0)

    @staticmethod
    def GRPOConfig(**fields):  # noqa: N802 - stands in for the class
        return tinylab.GRPOConfig(**{**fields, "steps": 1, "prompts_per_step": 2, "group_size": 2,
                                     "max_new_tokens": 4})

    @staticmethod
    def module_importance(*args, **kwargs):
        return tinylab.module_importance(*args, **{**kwargs, "n_prompts": 2, "n_samples": 2, "max_new_tokens": 4})

    @staticmethod
    def evaluate(*args, **kwargs):
        return tinylab.evaluate(*args, **{**kwargs, "n": 3, "max_new_tokens": 4})

    @staticmethod
    def compare(*args, **kwargs):
        return tinylab.compare(*args, **{**kwargs, "n": 3, "max_new_tokens": 4})

    @staticmethod
    def head_effects(model, tokenizer, adapter, prompts, **kwargs):
        return tinylab.head_effects(model, tokenizer, adapter, prompts[:2], **{**kwargs, "confirm": 1,
                                                                              "max_new_tokens": 4})


def test_every_python_block_of_the_readme_runs_in_quick_sizes(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 3, "the README's Python examples were not found"
    monkeypatch.chdir(tmp_path)  # files the examples save land here
    namespace = {"tinylab": _QuickTinylab()}
    for k, block in enumerate(blocks):
        code = re.sub(r"^import tinylab(?: as \w+)?$", "", block, flags=re.M)
        try:
            exec(compile(code, f"README.md python block {k + 1}", "exec"), namespace)  # noqa: S102
        except Exception as err:
            pytest.fail(f"README python block {k + 1} failed: {type(err).__name__}: {err}\n{block}")


def _resolve(dotted: str):
    """`dotted` as attributes from the imported package, as a reader's `tinylab.X.Y` after `import tinylab`."""
    obj = tinylab
    for name in dotted.split(".")[1:]:
        obj = getattr(obj, name)
    return obj


@pytest.mark.fresh_process  # a process that has imported tinylab and nothing of it the tests import
def test_every_tinylab_name_in_the_readme_docs_and_notebooks_resolves_after_import_tinylab():
    texts = [README.read_text()] + [p.read_text() for p in sorted((README.parent / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((README.parent / "notebooks").glob("*.ipynb"))]
    names = sorted({m.rstrip(".") for text in texts for m in re.findall(r"\btinylab(?:\.[A-Za-z_]\w*)+", text)})
    assert {"tinylab.load_model", "tinylab.interop.lm_eval_harness"} <= set(names)
    missing = []
    for name in names:
        try:
            _resolve(name)
        except AttributeError as err:
            missing.append(f"{name} ({err})")
    assert not missing, f"names in README.md / docs/ / notebooks that do not exist: {missing}"


def test_every_name_a_notebook_takes_from_tinylab_exists():
    folder = README.parent / "notebooks"
    missing = []
    for nb in sorted(folder.glob("*.ipynb")):
        for module, names in re.findall(r"from (tinylab[\w.]*) import ([\w, ]+)", nb.read_text()):
            for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                try:
                    getattr(importlib.import_module(module), name)
                except (AttributeError, ModuleNotFoundError) as err:
                    missing.append(f"{nb.name}: {module}.{name} ({err})")
    assert not missing, missing
