"""`lorapool tokenize` and `lorapool info` against real servers on the tiny demo:
the ids are transformers' (for text and for a chat through its template) and run
as --input-ids exactly as the text does, the model facts are the checkpoint's, a
readable default and --json for each, and the same connection flags (address,
mutual TLS, API key) as every other client command."""

from __future__ import annotations

import io
import json
import sys

import pytest
from pki import write_pki

from lorapool.client import cli

TEXT = "The river and the stone"
API_KEY = "cli-commands-key"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine={"max_new_tokens_limit": 64, "pool_mib": 8})


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_demo.model_dir))


def lorapool(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lorapool ARGV`."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- tokenize --------------------------------------------------------------------------------


def test_tokenize_prints_the_ids_generation_reads(server, tokenizer, capsys):
    code, out, err = lorapool(capsys, "tokenize", "--target", server.target, TEXT)
    assert code == 0, err
    ids = list(tokenizer(TEXT)["input_ids"])
    assert out == " ".join(map(str, ids)) + "\n"
    # passed on as --input-ids, they complete exactly as the text does
    complete = ["complete", "--target", server.target, "--max-new-tokens", "6", "--ignore-eos"]
    code, by_text, err = lorapool(capsys, *complete, "--json", TEXT)
    assert code == 0, err
    code, by_ids, err = lorapool(capsys, *complete, "--json", "--input-ids", out)
    assert code == 0, err
    by_text, by_ids = json.loads(by_text), json.loads(by_ids)
    assert by_ids["token_ids"] == by_text["token_ids"] and len(by_ids["token_ids"]) == 6
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == len(ids)


def test_tokenize_tokens_as_a_table_and_as_json(server, tokenizer, capsys):
    text = 'river\n  "stone"\tlight'  # newline, runs of spaces, quotes and a tab
    ids = list(tokenizer(text)["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    code, out, err = lorapool(capsys, "tokenize", "--target", server.target, "--tokens", text)
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "TOKEN"] and len(lines) == len(ids)
    rows = [line.split(None, 1) for line in lines]
    assert [(int(i), json.loads(token)) for i, token in rows] == list(zip(ids, tokens, strict=True))

    code, out, _ = lorapool(capsys, "tokenize", "--target", server.target, "--json", text)
    assert json.loads(out) == {"token_ids": ids, "tokens": []}
    code, out, _ = lorapool(
        capsys, "tokenize", "--target", server.target, "--json", "--tokens", text
    )
    assert json.loads(out) == {"token_ids": ids, "tokens": tokens}


def test_tokenize_a_chat_renders_the_chat_template(server, tokenizer, capsys):
    chat = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Where does the river go?"},
    ]
    want = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    argv = ["tokenize", "--target", server.target, "--json"]
    code, out, err = lorapool(
        capsys, *argv, "--chat", chat[1]["content"], "--system", chat[0]["content"]
    )
    assert code == 0, err
    assert json.loads(out)["token_ids"] == list(want["input_ids"])
    code, out, _ = lorapool(capsys, *argv, "--chat", chat[1]["content"])
    alone = tokenizer.apply_chat_template(chat[1:], add_generation_prompt=True, tokenize=True)
    assert json.loads(out)["token_ids"] == list(alone["input_ids"])


@pytest.mark.parametrize("argv", [[], ["-"]], ids=["omitted", "dash"])
def test_tokenize_reads_stdin(server, tokenizer, capsys, monkeypatch, argv):
    piped = "a line from a pipe\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    code, out, err = lorapool(capsys, "tokenize", "--target", server.target, "--json", *argv)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == list(tokenizer(piped)["input_ids"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["river", "--chat", "stone"], "give one of a text or --chat"),
        (["river", "--system", "be brief"], "--system goes with --chat"),
    ],
    ids=["text and chat", "system without chat"],
)
def test_tokenize_usage_errors_exit_2_in_one_line(server, capsys, argv, message):
    code, out, err = lorapool(capsys, "tokenize", "--target", server.target, *argv)
    assert (code, out, err) == (2, "", f"lorapool tokenize: {message}\n")


def test_tokenize_takes_no_input_ids(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["tokenize", "--input-ids", "1 2"])
    assert done.value.code == 2
    assert "unrecognized arguments: --input-ids" in capsys.readouterr().err


def test_a_refused_tokenize_exits_1_with_the_status(server, capsys):
    text = "x" * 10**6  # longer than the context can ever hold
    code, out, err = lorapool(capsys, "tokenize", "--target", server.target, text)
    assert (code, out) == (1, "")
    assert err.startswith("lorapool tokenize: INVALID_ARGUMENT: text of 1000000 characters")
    assert err.rstrip().endswith("[INVALID_REQUEST]") and err.count("\n") == 1


# -- info ------------------------------------------------------------------------------------


def test_info_reports_the_checkpoint_and_the_server_limits(server, tiny_demo, capsys):
    config = json.loads((tiny_demo.model_dir / "config.json").read_text())
    code, out, err = lorapool(capsys, "info", "--target", server.target, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["vocab_size"] == config["vocab_size"]
    assert info["hidden_size"] == config["hidden_size"]
    assert info["num_layers"] == config["num_hidden_layers"]
    assert info["max_new_tokens_limit"] == 64
    assert info["device"] == "cpu" and info["page_bytes"] > 0
    assert 0 < info["total_pages"] * info["page_bytes"] <= 8 * 2**20  # --pool-mib 8

    code, out, err = lorapool(capsys, "info", "--target", server.target)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(info)  # every field, in order
    shown = {line.split()[0]: line.split()[1:] for line in lines}
    for key in ("vocab_size", "max_model_len", "num_layers", "total_pages", "block_size"):
        assert shown[key][0] == str(info[key]), key
    pool_mib = info["total_pages"] * info["page_bytes"] / 2**20
    assert shown["total_pages"][1:] == ["(a", "pool", "of", f"{pool_mib:.1f}", "MiB)"]


# -- connection flags ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(start_server, tmp_path_factory):
    """A server that requires a client certificate from its CA and an API key."""
    pki = write_pki(tmp_path_factory.mktemp("pki"))
    server = start_server(
        engine={"max_new_tokens_limit": 64},
        api_key=API_KEY,
        tls_cert=str(pki["server"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca"]),
    )
    return server, pki


@pytest.mark.parametrize("command", [["info"], ["tokenize", "river"]], ids=" ".join)
def test_connection_flags_are_those_of_every_client_command(guarded, capsys, monkeypatch, command):
    server, pki = guarded
    target = ["--target", server.target, "--timeout", "10"]
    mtls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"])]
    mtls += ["--tls-key", str(pki["client_key"])]
    argv = [*command, "--json", *target, *mtls]
    monkeypatch.delenv("LORAPOOL_API_KEY", raising=False)

    code, out, err = lorapool(capsys, *argv)
    assert (code, out) == (1, "") and "UNAUTHENTICATED" in err
    code, out, err = lorapool(capsys, *argv, "--api-key", API_KEY)
    assert code == 0, err
    served = json.loads(out)
    monkeypatch.setenv("LORAPOOL_API_KEY", API_KEY)
    code, out, err = lorapool(capsys, *argv)
    assert code == 0 and json.loads(out) == served, err
    monkeypatch.setenv("LORAPOOL_TARGET", server.target)  # the address from the environment
    code, out, err = lorapool(capsys, *command, "--json", *mtls)
    assert code == 0 and json.loads(out) == served, err

    code, _, err = lorapool(capsys, *command, *target, "--tls-ca", str(pki["ca"]))
    assert code == 1 and "UNAVAILABLE" in err  # no client certificate: no handshake
    code, _, err = lorapool(capsys, *argv[:-2])  # --tls-cert without --tls-key
    assert (code, err) == (2, f"lorapool {command[0]}: --tls-cert and --tls-key go together\n")
