"""The `lorapool` command line: --version, help text and shown defaults on every
option of every subcommand, --json wherever the output is a table."""

from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from lorapool.client import cli

ROOT = Path(__file__).resolve().parents[1]


def parsers(parser: argparse.ArgumentParser, path: str):
    """parser and every parser below it (sub-subcommands), with their command paths."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, f"{path} {name}")


def command_parser(name: str) -> argparse.ArgumentParser:
    module = cli._import_command(name, cli.COMMANDS[name][0])
    if module is None:
        pytest.skip(f"lorapool {name} needs a module that is not installed")
    return cli.command_parser(name, module)


def shown(default) -> str:
    return "''" if default == "" else str(default)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    missing, hidden = [], []
    for path, parser in parsers(command_parser(name), f"lorapool {name}"):
        text = " ".join(parser.format_help().split())  # formats every help string
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{path} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(flag)
                continue
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not (choice.help or "").strip():
                        missing.append(f"{path} {choice.dest}")
                continue
            if action.default is None or action.default == argparse.SUPPRESS:
                continue
            line = " ".join(formatter._expand_help(action).split())
            if shown(action.default) not in line or line not in text:
                hidden.append(f"{flag} (default {action.default!r}): {line!r}")
    assert not missing, f"options without help: {missing}"
    assert not hidden, f"defaults not shown in --help: {hidden}"


def test_help_shows_defaults_once_and_never_a_key(monkeypatch):
    monkeypatch.setenv("LORAPOOL_API_KEY", "secret-inference-key")
    for name in ("generate", "bench"):
        text = command_parser(name).format_help()
        assert "secret-inference-key" not in text
        assert "(default: 120.0)" in text  # --timeout
    text = " ".join(command_parser("bench").format_help().split())
    assert "(default: 32:128)" in text and "(default: (32" not in text
    # the key still reaches the client from the environment
    from lorapool.client.commands import connection_kwargs

    args = command_parser("stats").parse_args([])
    assert connection_kwargs(args)["api_key"] == "secret-inference-key"
    args = command_parser("stats").parse_args(["--api-key", "from-flag"])
    assert connection_kwargs(args)["api_key"] == "from-flag"


def test_bench_ranges_still_parse_from_their_shown_defaults():
    args = command_parser("bench").parse_args([])
    assert args.prompt_tokens == (32, 128) and args.max_new_tokens == (32, 128)
    args = command_parser("bench").parse_args(["--max-new-tokens", "7"])
    assert args.max_new_tokens == (7, 7)


def test_version_is_the_distribution_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorapool {importlib.metadata.version('lorapool')}"


def test_version_falls_back_to_pyproject(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert cli.version() == pyproject["project"]["version"]


@pytest.mark.parametrize(
    "argv",
    [
        ["adapters", "list", "--json"],
        ["adapters", "--json", "list"],
        ["adapters", "load", "x", "--json"],
        ["adapters", "unload", "x", "--json"],
        ["stats", "--json"],
        ["generate", "x", "--json"],
        ["complete", "x", "--json"],
        ["tokenize", "x", "--json"],
        ["info", "--json"],
    ],
    ids=" ".join,
)
def test_tabular_client_commands_take_json(argv):
    """Output that is a table (adapters, stats) or a stream has --json; bench's
    --json takes a path (tests/test_client_bench.py runs them against a server)."""
    args = command_parser(argv[0]).parse_args(argv[1:])
    assert args.json is True
    bench = command_parser("bench").parse_args(["--json", "-"])
    assert bench.json == "-"
