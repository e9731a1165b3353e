"""Every ``promptsam`` command and option has help text, and bad counts are refused by the flags."""

from __future__ import annotations

import argparse

import pytest

from cli.main import build_parser, main


def _walk(parser: argparse.ArgumentParser, path: str = "promptsam"):
    """Yield ``(command path, parser, one-line help of the command or None)`` over the whole tree."""
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                for sub_path, sub, sub_help in _walk(child, f"{path} {name}"):
                    yield sub_path, sub, helps.get(name) if sub is child else sub_help


def test_every_command_and_option_has_help_without_backticks():
    commands = list(_walk(build_parser()))
    names = {path for path, _, _ in commands}
    # The plugin packages' commands are part of the tree too.
    assert {"promptsam train", "promptsam simulate", "promptsam deploy certs", "promptsam report",
            "promptsam bench round", "promptsam bench dp"} <= names
    problems = []
    for path, parser, line in commands:
        if not parser.description:
            problems.append(f"{path}: no description")
        if path != "promptsam" and not line:
            problems.append(f"{path}: no one-line help in its parent's list")
        texts = [parser.description or "", line or ""]
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{path} {name}: no help")
            texts.append(action.help or "")
        if any("``" in t for t in texts):
            problems.append(f"{path}: help shows raw ``backticks``")
    assert problems == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "-5"], "argument --steps: must be an integer >= 1, got -5"),
    (["train", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["train", "--lr=-1e-3"], "argument --lr: must be a number > 0"),
    (["train", "--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["evaluate", "--checkpoint", "m.pt", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["predict", "x.png", "--checkpoint", "m.pt", "--threshold", "1.5"], "argument --threshold: must be a number in [0, 1]"),
    (["bench", "step", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["bench", "round", "--rounds", "0"], "argument --rounds: must be an integer >= 1"),
    (["deploy", "superlink", "--certs", "c", "--port", "0"], "argument --port: must be a port number"),
])
def test_flags_refuse_counts_that_make_no_sense(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
