"""The `lorapool` command. Each subcommand lives in the module that owns the idea;
this file only wires them into one argparse tree (imports stay lazy so that
`lorapool generate` does not import torch)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

# subcommand -> module exposing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "serve": ("lorapool.server.transport.cli", "start the gRPC server"),
    "serve-ray": ("lorapool.server.ray.cli", "serve on Ray Serve: N engine replicas, one port"),
    "make-demo": ("lorapool.demo.cli", "write a random-init model and PEFT adapters"),
    "generate": ("lorapool.client.commands", "stream a generation to stdout"),
    "complete": ("lorapool.client.commands", "one-shot completion"),
    "tokenize": ("lorapool.client.commands", "token ids of a text or chat, as generate sees them"),
    "adapters": ("lorapool.client.commands", "list | load | unload adapters"),
    "stats": ("lorapool.client.commands", "pool and scheduler statistics"),
    "info": ("lorapool.client.commands", "the served model, its limits and its pool"),
    "bench": ("lorapool.client.bench", "load generator with a ghz-style report"),
}


# Subcommands from these packages need the `server` extra; the modules it brings
# (import names) are probed before such a subcommand is imported, since some are
# imported lazily deep inside.
SERVER_PACKAGES = ("lorapool.server.", "lorapool.demo.", "lorapool.memory.")
SERVER_EXTRA_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
    "xxhash",
    "numpy",
    "grpc_reflection",
    "prometheus_client",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the default is None
    (the help says what leaving it out means); an empty string shows as ''."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default is None or "%(default)" in help_text:
            return help_text
        if action.default == "":
            return help_text + " (default: '')"
        return super()._get_help_string(action)


def version() -> str:
    """The installed distribution's version; in a source tree without one, the
    version in pyproject.toml."""
    try:
        return importlib.metadata.version("lorapool")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def command_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, its flags added by `module`."""
    parser = argparse.ArgumentParser(
        prog=f"lorapool {name}", description=COMMANDS[name][1], formatter_class=HelpFormatter
    )
    module.add_arguments(parser, name)
    return parser


def _import_command(name: str, module_path: str):
    """The subcommand's module; None, after one line naming what to install, when
    a third-party module it needs is missing (a missing lorapool module re-raises)."""
    server_side = module_path.startswith(SERVER_PACKAGES)
    try:
        if server_side:
            for dep in SERVER_EXTRA_MODULES:
                if importlib.util.find_spec(dep) is None:
                    raise ModuleNotFoundError(f"No module named {dep!r}", name=dep)
        return importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "lorapool":
            raise
        extra = "'lorapool[server]'" if server_side else "lorapool"
        print(
            f"lorapool {name}: Python module {missing!r} is not installed; "
            f"install it with: pip install {extra}",
            file=sys.stderr,
        )
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lorapool", description=__doc__.splitlines()[0])
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits
        return 2
    name = argv[0]
    module = _import_command(name, COMMANDS[name][0])
    if module is None:
        return 2
    args = command_parser(name, module).parse_args(argv[1:])
    args.command = name
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
