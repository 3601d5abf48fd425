"""Every command the README and docs/ show is one that runs: parsed by the command's own parser.

Shell commands are read from ```bash blocks, the commands a reader copies (continued lines joined,
comments dropped, `&&`, `;`, `|` and `&` split; inline code is prose: docs/errors.md shows wrong
commands on purpose); ```python blocks must compile. Each command goes to the checker of its program:
tinylab's own argument parser (then the preset, its overrides and the TRL fields are checked as
`tinylab train` checks them, and for a launch on several processes whether a step's completions
split evenly over them), accelerate's and torchrun's launch parsers, TRL's `vllm-serve` parser, the
Makefile's targets, pyproject's extras, the files a command names. A program without a checker
fails the test: a new kind of command in the docs gets a checker here.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block; an indented fence (inside a list) counts too."""
    blocks, lang, lines, indent = [], None, [], 0
    for line in text.splitlines():
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines, indent = stripped[3:].strip(), [], len(line) - len(line.lstrip())
        elif lang is not None and stripped == "```":
            blocks.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line[indent:] if line[:indent].strip() == "" else line)
    return blocks


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as argument lists (environment assignments kept in front)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = []
        for token in [*lexer, ";"]:
            if token in {";", "&", "&&", "|", "||"}:
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(token)
    return commands


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for lang, code in _blocks(text):
            if lang in SHELL:
                found += [(f"{path.name}: {' '.join(c)}", c) for c in _commands(code)]
    return found


def doc_python_blocks() -> list[tuple[str, str]]:
    return [(f"{path.name} block {i}", code) for path in DOCS
            for i, (lang, code) in enumerate(_blocks(path.read_text())) if lang == "python"]


# ---------------------------------------------------------------------------------------------
# Checkers: one per program


def _check_tinylab(argv: list[str], world: int = 1) -> None:
    from tinylab import tasks
    from tinylab.cli import parse_args, parse_trl
    from tinylab.interop.trl_bridge import check_trl_fields, trl_args
    from tinylab.train.presets import parse_overrides, preset

    args = parse_args(argv)
    if args.command != "train":
        return
    p = preset(args.preset, **parse_overrides(args.overrides))
    trl = dict(parse_trl(pair) for pair in args.trl)
    if args.backend == "tinylab":
        assert world == 1 and not trl, "--backend tinylab runs in one process, without --trl"
        return
    check_trl_fields(trl)
    if ":" not in p.task:  # a registered task (the docs' own task files are placeholders)
        tasks.get(p.task, **p.task_options)
    trl_args(p.training, "unused", world_size=world, **trl)  # a step's completions split over `world`


def _module_command(argv: list[str], world: int) -> None:
    """A launcher's `-m module args`: tinylab's command line under `world` processes."""
    assert argv[:1] == ["tinylab.cli"], f"launches {argv[:1]}: only tinylab.cli is checked"
    _check_tinylab(argv[1:], world)


def _check_accelerate(argv: list[str]) -> None:
    from accelerate.commands.launch import launch_command_parser

    assert argv[0] == "launch", argv
    args = launch_command_parser().parse_args(argv[1:])
    assert args.module, "accelerate launch -m tinylab.cli ..."
    world = args.num_processes
    if world is None:
        world = yaml.safe_load((REPO / args.config_file).read_text())["num_processes"]
    _module_command([args.training_script, *args.training_script_args], int(world))


def _check_torchrun(argv: list[str]) -> None:
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    assert args.module, "torchrun -m tinylab.cli ..."
    _module_command([args.training_script, *args.training_script_args], int(args.nproc_per_node))


def _check_trl(argv: list[str]) -> None:
    assert argv[0] == "vllm-serve", f"trl {argv[0]}: only vllm-serve is checked"
    from trl.scripts.vllm_serve import make_parser

    make_parser().parse_args_and_config(argv[1:])


def _check_make(argv: list[str]) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    assert argv and set(argv) <= targets, f"make {argv}: the Makefile's targets are {sorted(targets)}"


def _check_pip(argv: list[str]) -> None:
    assert argv[0] == "install", argv
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    words = iter(argv[1:])
    for word in words:
        if word in {"-r", "--requirement"}:
            assert (REPO / next(words)).is_file()
        elif word in {"-e", "--editable"} or word.startswith("."):
            spec = word if word.startswith(".") else next(words)
            wanted = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert wanted, f"pip install {spec}: expected . or .[extra,...]"
            assert set(filter(None, (wanted.group(1) or "").split(","))) <= set(extras), spec


def _check_python(argv: list[str]) -> None:
    assert argv[0] == "-m", f"python {argv}: only `python -m module` is checked"
    if argv[1] == "tinylab.cli":
        _check_tinylab(argv[2:])
    else:
        assert importlib.util.find_spec(argv[1]) is not None, f"no module {argv[1]}"


def _check_conda(argv: list[str]) -> None:
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    if argv[:2] == ["env", "create"]:
        assert argv[2:] == ["-f", "environment.yml"], argv
    else:
        assert argv == ["activate", environment["name"]], argv


CHECKERS = {
    "tinylab": _check_tinylab, ".venv/bin/tinylab": _check_tinylab, "accelerate": _check_accelerate,
    "torchrun": _check_torchrun, "trl": _check_trl, "make": _check_make, "pip": _check_pip,
    ".venv/bin/pip": _check_pip, "python": _check_python, ".venv/bin/python": _check_python, "conda": _check_conda,
}


@pytest.mark.parametrize("where, command", doc_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_command_parses(where, command):
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):  # VAR=value before the program
        command = command[1:]
    assert command[0] in CHECKERS, f"{where}: no checker for {command[0]!r} in tests/test_docs_commands.py"
    try:
        CHECKERS[command[0]](command[1:])
    except SystemExit as exit_:  # argparse's usage error
        pytest.fail(f"{where}: the parser refused it (exit {exit_.code})")


@pytest.mark.parametrize("where, code", doc_python_blocks(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_python_block_compiles(where, code):
    compile(code, where, "exec")


def test_the_checks_catch_an_uneven_split_and_a_bad_option():
    """The 7-process example the docs once had: 256 completions per step do not split over 7."""
    seven = ("CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 accelerate launch --config_file configs/multi-gpu.yaml "
             "--num_processes 7 -m tinylab.cli train --preset paper-gsm8k-shared --backend trl --out runs/paper "
             "--trl use_vllm=true --trl vllm_mode=server")
    with pytest.raises(ValueError, match="cannot be split over world_size=7"):
        test_doc_command_parses("example", _commands(seven)[0])
    for bad in ("tinylab train --preset cpu-demo --outt DIR", "tinylab train --preset cpu-dmo", "make labb",
                "tinylab train --preset cpu-demo stpes=3"):
        with pytest.raises((pytest.fail.Exception, AssertionError, ValueError, TypeError)):
            test_doc_command_parses("example", _commands(bad)[0])
    assert len(doc_commands()) >= 10
