"""Mutual TLS on `lorapool serve`: with --tls-client-ca the server serves only
clients presenting a certificate signed by that CA; a client without one, or with
one from another CA, fails its handshake. A half-given TLS configuration fails
start-up in one line instead of serving plaintext. Certificates are made on the
fly (tests/pki.py); the clients are the project's Python client and CLI."""

from __future__ import annotations

import argparse
import json

import grpc
import pytest
from conftest import ServerThread
from pki import write_pki

from lorapool.client import LoraPoolClient, LoraPoolClientError
from lorapool.client import cli as client_cli
from lorapool.server.transport import cli as serve_cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """Another authority with its own client certificate, unknown to the server."""
    return write_pki(tmp_path_factory.mktemp("stranger"), label="stranger")


def serve_args(tiny_demo, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser, "serve")
    model = ["--model", str(tiny_demo.model_dir), "--adapters", str(tiny_demo.adapters_dir)]
    return parser.parse_args([*model, "--port", "0", "--metrics-port", "0", *flags])


@pytest.fixture(scope="module")
def mtls_server(tiny_demo, pki):
    """`lorapool serve --tls-cert --tls-key --tls-client-ca` as its flags configure it."""
    args = serve_args(
        tiny_demo,
        "--tls-cert", str(pki["server"]),
        "--tls-key", str(pki["server_key"]),
        "--tls-client-ca", str(pki["ca"]),
    )  # fmt: skip
    config = serve_cli.config_from_args(args)
    assert config.tls_client_ca == str(pki["ca"])
    server = ServerThread(config)
    yield server
    server.close()


def test_a_client_with_a_certificate_from_the_ca_is_served(mtls_server, pki):
    mtls = {"root_certificates": pki["ca"], "tls_cert": pki["client"], "tls_key": pki["client_key"]}
    with LoraPoolClient(mtls_server.target, timeout=60, **mtls) as client:
        assert client.health() == "SERVING"
        reply = client.complete(
            "river", adapter_id="adapter-001", max_new_tokens=3, ignore_eos=True
        )
        assert len(reply.token_ids) == 3
        # PEM bytes work as well as paths
        as_bytes = {k: v.read_bytes() for k, v in mtls.items()}
    with LoraPoolClient(mtls_server.target, timeout=60, **as_bytes) as client:
        assert [e.token_ids for e in client.generate(input_ids=[5, 6, 7], max_new_tokens=2)]


def test_a_client_without_a_certificate_is_refused(mtls_server, pki):
    with LoraPoolClient(
        mtls_server.target, root_certificates=pki["ca"], timeout=10, retries=0
    ) as c:
        with pytest.raises(LoraPoolClientError) as err:
            c.complete("river", max_new_tokens=1)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake failed


def test_a_certificate_from_another_ca_is_refused(mtls_server, pki, stranger):
    foreign = {"tls_cert": stranger["client"], "tls_key": stranger["client_key"]}
    with LoraPoolClient(
        mtls_server.target, root_certificates=pki["ca"], timeout=10, retries=0, **foreign
    ) as client:
        with pytest.raises(LoraPoolClientError) as err:
            client.health()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_is_refused(mtls_server):
    with LoraPoolClient(mtls_server.target, timeout=10, retries=0) as client:
        with pytest.raises(LoraPoolClientError) as err:
            client.health()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_cli_presents_its_certificate(mtls_server, pki, capsys):
    argv = [
        "complete", "--target", mtls_server.target, "--tls-ca", str(pki["ca"]),
        "--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"]),
        "river", "--max-new-tokens", "2", "--ignore-eos", "--json",
    ]  # fmt: skip
    assert client_cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "LENGTH"
    assert client_cli.main([*argv[:4], *argv[8:], "--timeout", "5"]) != 0  # CA only: refused
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_half_given_tls_fails_start_up_in_one_line(tiny_demo, pki, capsys):
    cert, key, ca = str(pki["server"]), str(pki["server_key"]), str(pki["ca"])
    cases = [
        (("--tls-client-ca", ca), "--tls-client-ca needs TLS"),
        (("--tls-cert", cert, "--tls-client-ca", ca), "both --tls-cert and --tls-key"),
        (("--tls-key", key), "both --tls-cert and --tls-key"),
        (("--tls-cert", cert, "--tls-key", key, "--tls-client-ca", ca + ".missing"), "cannot read"),
    ]
    for flags, words in cases:
        assert serve_cli.run(serve_args(tiny_demo, "--log-level", "WARNING", *flags)) == 2
        err = capsys.readouterr().err
        assert err.startswith("lorapool serve: ") and words in err, (flags, err)
        assert err.count("\n") == 1
