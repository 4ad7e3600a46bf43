"""Client subcommands of `lorapool`: generate, complete, tokenize, adapters, stats, info.

Output is for people by default (streamed text, aligned tables) and for programs
with --json. A failed call prints one line with the status code to stderr and
exits 1, so scripts can tell a bad request from a broken server.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from lorapool.client.channel import DEFAULT_TARGET, read_pem
from lorapool.client.client import LoraPoolClient
from lorapool.client.errors import LoraPoolClientError
from lorapool.types import AdapterInfo

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


# -- flags shared with `lorapool bench` ------------------------------------------------------


def add_connection_arguments(parser: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("LORAPOOL_TARGET", DEFAULT_TARGET),
        help="server address host:port (env LORAPOOL_TARGET, default %(default)s)",
    )
    group.add_argument(
        "--api-key",
        help="sent as x-api-key and bearer token (default: env LORAPOOL_API_KEY)",
    )
    group.add_argument("--timeout", type=float, default=timeout, help="deadline per call (s)")
    group.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    group.add_argument("--tls-ca", metavar="PEM", help="use TLS trusting this CA bundle")
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="use TLS presenting this client certificate (mutual TLS; needs --tls-key)",
    )
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LoraPoolClient / AsyncLoraPoolClient keyword arguments from the flags. The
    PEM files are read here, so a missing one is a usage error before any call."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return {
        "api_key": args.api_key or os.environ.get("LORAPOOL_API_KEY"),
        "tls": args.tls,
        "root_certificates": read_pem(args.tls_ca or None),
        "tls_cert": read_pem(args.tls_cert or None),
        "tls_key": read_pem(args.tls_key or None),
        "timeout": args.timeout,
    }


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (unset flags take the server's defaults)")
    group.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, help="0 = greedy (the server's default)")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass (1.0 = no cut)")
    group.add_argument("--top-k", type=int, help="sample from the k likeliest (0 = no cut)")
    group.add_argument("--seed", type=int, help="reproducible sampling; 0 is a seed")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument(
        "--stop-token-id", action="append", type=int, default=[], help="stop token (repeatable)"
    )
    group.add_argument("--ignore-eos", action="store_true", help="generate exactly max tokens")
    group.add_argument("--repetition-penalty", type=float, help="1.0 = no penalty")
    group.add_argument("--logprobs", type=int, help="top alternatives per token (0 = none)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only the flags given, so the server's documented defaults apply to the rest."""
    values = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop or None,
        "stop_token_ids": args.stop_token_id or None,
        "ignore_eos": args.ignore_eos or None,
        "repetition_penalty": args.repetition_penalty,
        "logprobs": args.logprobs,
    }
    return {k: v for k, v in values.items() if v is not None}


def parse_ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(",", " ").split()]


# -- argparse wiring -------------------------------------------------------------------------


# What the positional text of a command is called, in its help and its errors.
TEXT_INPUT = {"generate": "prompt", "complete": "prompt", "tokenize": "text"}


def add_input_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """A request's input: text (positional), token ids where the RPC takes them,
    or a one-turn chat rendered with the model's chat template."""
    what = TEXT_INPUT[name]
    parser.add_argument(
        "prompt", nargs="?", metavar=what, help=f"the {what}; '-' or omitted reads stdin"
    )
    if name != "tokenize":
        parser.add_argument("--input-ids", type=parse_ids, help="token ids instead of a prompt")
    parser.add_argument(
        "--chat",
        metavar="MESSAGE",
        help=f"instead of a {what}: MESSAGE as the user's turn of a chat, rendered with "
        "the model's chat template ('-' reads stdin)",
    )
    parser.add_argument(
        "--system",
        metavar="TEXT",
        help="with --chat: a system turn before the user's (default: none)",
    )


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_connection_arguments(parser)
    if name in ("generate", "complete"):
        add_input_arguments(parser, name)
        parser.add_argument("--adapter", default="", help="adapter id; '' = the base model")
        parser.add_argument(
            "--priority", type=int, default=0, help="higher runs first, is preempted last"
        )
        parser.add_argument(
            "--request-id", default="", help="id in the server's logs; '' = the client picks one"
        )
        add_sampling_arguments(parser)
        what = "one JSON object per streamed message" if name == "generate" else "JSON"
        parser.add_argument("--json", action="store_true", help=f"print {what}")
    elif name == "adapters":
        actions = parser.add_subparsers(dest="action", required=True, help="what to do")
        sub = {"formatter_class": parser.formatter_class}
        actions.add_parser("list", help="every adapter the server knows", **sub)
        load = actions.add_parser("load", help="fetch an adapter and make it servable", **sub)
        load.add_argument("adapter_id", help="id to serve it under")
        load.add_argument(
            "source",
            nargs="?",
            default="",
            help="path, file://, hf://org/repo[@rev], ...; '' = the sources the server has",
        )
        load.add_argument("--pin", action="store_true", help="keep it on the device")
        unload = actions.add_parser("unload", help="forget an adapter and free its memory", **sub)
        unload.add_argument("adapter_id", help="id of the adapter")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        for action in actions.choices.values():  # --json also after the action
            action.add_argument(
                "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
            )
    elif name == "tokenize":
        add_input_arguments(parser, name)
        parser.add_argument(
            "--tokens", action="store_true", help="also print each token's text beside its id"
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="print JSON {token_ids, tokens} (tokens empty without --tokens)",
        )
    elif name in ("stats", "info"):
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    else:
        raise ValueError(f"no client command {name!r}")


def run(args: argparse.Namespace) -> int:
    handlers: dict[str, Callable[[LoraPoolClient, argparse.Namespace], int]] = {
        "generate": _generate,
        "complete": _complete,
        "tokenize": _tokenize,
        "adapters": _adapters,
        "stats": _stats,
        "info": _info,
    }
    try:
        with LoraPoolClient(args.target, **connection_kwargs(args)) as client:
            return handlers[args.command](client, args)
    except LoraPoolClientError as err:
        print(f"lorapool {args.command}: {err}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except (ValueError, OSError) as err:
        print(f"lorapool {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


# -- generation ------------------------------------------------------------------------------


def _input(args: argparse.Namespace) -> dict[str, Any]:
    """The request's input from the flags add_input_arguments added: one of
    {"prompt": text}, {"input_ids": ids} or {"chat": messages}."""
    what = TEXT_INPUT[args.command]
    input_ids = getattr(args, "input_ids", None)  # tokenize has no --input-ids
    takes_ids = hasattr(args, "input_ids")
    others = "--input-ids or --chat" if takes_ids else "--chat"
    given = [args.prompt is not None, input_ids is not None, args.chat is not None]
    if sum(given) > 1:
        choices = f"a {what}, --input-ids or --chat" if takes_ids else f"a {what} or --chat"
        raise ValueError(f"give one of {choices}")
    if args.system is not None and args.chat is None:
        raise ValueError("--system goes with --chat")
    if input_ids is not None:
        return {"input_ids": input_ids}
    if args.chat is not None:
        chat = [{"role": "user", "content": _text(args.chat, "--chat", others)}]
        if args.system is not None:
            chat.insert(0, {"role": "system", "content": args.system})
        return {"chat": chat}
    return {"prompt": _text(args.prompt, what, others)}


def _text(value: str | None, what: str, others: str) -> str:
    """value, or stdin when it is '-' or missing."""
    if value is not None and value != "-":
        return value
    if sys.stdin.isatty():
        raise ValueError(f"no {what}: pass one, pipe it on stdin, or use {others}")
    return sys.stdin.read()


def _request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **_input(args),
        "adapter_id": args.adapter,
        "priority": args.priority,
        "request_id": args.request_id,
        **sampling_kwargs(args),
    }


def to_jsonable(value: Any) -> Any:
    """Dataclasses to dicts with enums as their names: a finish reason is "LENGTH",
    never 1 (FinishReason stays an IntEnum, so code comparing it to ints works)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def _generate(client: LoraPoolClient, args: argparse.Namespace) -> int:
    out = sys.stdout
    ends_with_newline = True
    for event in client.generate(**_request_kwargs(args)):
        if args.json:
            out.write(json.dumps(to_jsonable(event)) + "\n")
        elif event.text:
            out.write(event.text)
            ends_with_newline = event.text.endswith("\n")
        out.flush()
    if not args.json and not ends_with_newline:
        out.write("\n")
    return 0


def _complete(client: LoraPoolClient, args: argparse.Namespace) -> int:
    result = client.complete(**_request_kwargs(args))
    if args.json:
        print(json.dumps(to_jsonable(result)))
    else:
        print(result.text)
    return 0


# -- administration --------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _ago(unix_s: float) -> str:
    if not unix_s:
        return "never"
    return f"{max(0.0, time.time() - unix_s):.0f}s ago"


def adapters_table(adapters: list[AdapterInfo]) -> str:
    headers = [
        "ADAPTER", "STATE", "RANK", "PAGES", "BYTES", "PINNED",
        "RUNNING", "SERVED", "LAST USED", "LOAD MS", "SOURCE",
    ]  # fmt: skip
    rows = [
        [
            a.adapter_id,
            a.state.name,
            str(a.rank),
            str(a.pages),
            str(a.bytes),
            "yes" if a.pinned else "",
            str(a.running_requests),
            str(a.requests_served),
            _ago(a.last_used),
            f"{a.load_ms:.0f}",
            a.source,
        ]
        for a in adapters
    ]
    return _table(headers, rows)


def _adapters(client: LoraPoolClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        adapters = client.list_adapters()
    elif args.action == "load":
        adapters = [client.load_adapter(args.adapter_id, args.source, pin=args.pin)]
    else:
        client.unload_adapter(args.adapter_id)
        if args.json:
            print(json.dumps({"adapter_id": args.adapter_id, "unloaded": True}))
        else:
            print(f"unloaded {args.adapter_id}")
        return 0
    if args.json:
        print(json.dumps(to_jsonable(adapters if args.action == "list" else adapters[0])))
    else:
        print(adapters_table(adapters))
    return 0


def _fields(values: dict[str, Any], notes: dict[str, str]) -> str:
    """One aligned `key  value  (note)` line per field, as stats and info print them."""
    width = max(len(k) for k in values)
    lines = []
    for key, value in values.items():
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        note = f"  ({notes[key]})" if key in notes else ""
        lines.append(f"{key.ljust(width)}  {shown}{note}".rstrip())
    return "\n".join(lines)


def _bytes(n: int) -> str:
    """n bytes in binary units: 65536 -> '64.0 KiB'."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _stats(client: LoraPoolClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        print(json.dumps(to_jsonable(stats)))
        return 0
    values = dataclasses.asdict(stats)
    total = stats.total_pages or 1
    notes = {
        key: f"{100.0 * value / total:.1f}%"
        for key, value in values.items()
        if key.endswith("_pages") and key != "total_pages"
    }
    print(_fields(values, notes))
    return 0


def _info(client: LoraPoolClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    if args.json:
        print(json.dumps(to_jsonable(info)))
        return 0
    notes = {
        "page_bytes": _bytes(info.page_bytes),
        "total_pages": f"a pool of {_bytes(info.total_pages * info.page_bytes)}",
    }
    if info.eos_token_id < 0:
        notes["eos_token_id"] = "none"
    print(_fields(dataclasses.asdict(info), notes))
    return 0


# -- tokenizer -------------------------------------------------------------------------------


def _tokenize(client: LoraPoolClient, args: argparse.Namespace) -> int:
    """Ids on one line by default, so they can be passed on as --input-ids; with
    --tokens an ID/TOKEN table, each token quoted as a JSON string (spaces and
    control characters stay visible)."""
    given = _input(args)
    result = client.tokenize(given.get("prompt"), chat=given.get("chat"), return_tokens=args.tokens)
    if args.json:
        print(json.dumps(to_jsonable(result)))
    elif args.tokens:
        rows = [
            [str(token_id), json.dumps(token, ensure_ascii=False)]
            for token_id, token in zip(result.token_ids, result.tokens, strict=True)
        ]
        print(_table(["ID", "TOKEN"], rows))
    else:
        print(" ".join(map(str, result.token_ids)))
    return 0
