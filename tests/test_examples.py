"""The examples in examples/ run as a user runs them, against a real server on the
tiny demo, and do what they say: a streamed Generate, token ids in their TokenIds
wrapper, a cancelled stream the server frees, a deadline, and an error's
ErrorInfo reason and BadRequest field.

The Node.js example installs its locked dependencies (npm ci, into
examples/node/node_modules) once per package-lock.json; it is skipped only when
node or npm is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from npm import have_npm, npm_ci

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples/node"

# What every example prints, one line per part of the walk-through.
EXPECTED = [
    r"generate: 8 tokens in \d+ messages, finish (FINISH_REASON_)?LENGTH, text .*",
    r"input_ids: 4 prompt tokens, 4 generated",
    r"cancel: \w+ after 3 messages, server running_requests 0",
    r"deadline: DEADLINE_EXCEEDED after \d+ messages",
    r"error: NOT_FOUND reason ADAPTER_NOT_FOUND adapter_id no-such-adapter",
    r"error: INVALID_ARGUMENT reason INVALID_REQUEST fields params.temperature",
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def run_example(cmd: list[str], target: str, cwd: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPOOL_")}
    done = subprocess.run(
        [*cmd, target], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def check_output(lines: list[str]) -> None:
    assert len(lines) == len(EXPECTED), lines
    for line, pattern in zip(lines, EXPECTED, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.parametrize("script", ["client.py", "stubs.py"])
def test_python_example(server, script):
    lines = run_example([sys.executable, script], server.target, ROOT / "examples/python")
    check_output(lines)
    if script == "stubs.py":  # the raw stream reports the code it ended with
        assert lines[2].startswith("cancel: CANCELLED")


@pytest.mark.skipif(not have_npm(), reason="the Node.js example needs node and npm on PATH")
def test_node_example(server):
    assert (npm_ci(NODE_DIR) / "@grpc/grpc-js/package.json").is_file()
    lines = run_example(["node", "client.js"], server.target, NODE_DIR)
    check_output(lines)
    assert lines[2].startswith("cancel: CANCELLED")
