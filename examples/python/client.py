"""lorapool's Python client (`pip install lorapool`): a streamed Generate, token
ids as input, cancelling a stream, a deadline, and an error's machine-readable
reason and field.

    python examples/python/client.py [host:port]   (default: $LORAPOOL_TARGET or localhost:50051)

A server with an API key: set LORAPOOL_API_KEY. The adapter used is adapter-001,
one of the demo adapters `lorapool serve` offers without --model. The same calls
with the generated stubs alone (other Python code bases): stubs.py beside this file.
"""

from __future__ import annotations

import os
import sys
import time

import grpc

from lorapool.client import LoraPoolClient, LoraPoolClientError, SamplingParams

TARGET = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORAPOOL_TARGET", "localhost:50051")
ADAPTER = os.environ.get("LORAPOOL_ADAPTER", "adapter-001")
LONG = SamplingParams(max_new_tokens=2000, ignore_eos=True)  # longer than the tests below wait


def main() -> None:
    # timeout: the default deadline of every call, in seconds (per call: timeout=...)
    with LoraPoolClient(TARGET, api_key=os.environ.get("LORAPOOL_API_KEY"), timeout=60) as client:
        # 1. A streamed generation: one TokenEvent per step, the last with finish_reason.
        events = list(
            client.generate(
                "Once upon a time",
                adapter_id=ADAPTER,
                sampling=SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.0),
            )
        )
        tokens = [t for e in events for t in e.token_ids]
        text = "".join(e.text for e in events)
        last = events[-1]
        print(
            f"generate: {len(tokens)} tokens in {len(events)} messages, "
            f"finish {last.finish_reason.name}, text {text!r}"
        )

        # 2. Token ids as input: the client wraps them in the TokenIds message
        #    ({"input_ids": {"ids": [...]}} on the wire).
        reply = client.complete(input_ids=[5, 6, 7, 8], max_new_tokens=4, ignore_eos=True)
        print(
            f"input_ids: {reply.usage.prompt_tokens} prompt tokens, {len(reply.token_ids)} generated"
        )

        # 3. Cancellation: closing the stream (or leaving the loop and dropping it)
        #    cancels the call, and the server frees the request.
        stream = client.generate(input_ids=[5, 6, 7], sampling=LONG)
        received = [next(stream) for _ in range(3)]
        stream.close()
        running = client.stats().running_requests
        for _ in range(50):
            if running == 0:
                break
            time.sleep(0.1)
            running = client.stats().running_requests
        print(f"cancel: closed after {len(received)} messages, server running_requests {running}")

        # 4. A deadline: 250 ms for a generation that needs longer.
        received = []
        try:
            for event in client.generate(input_ids=[5, 6, 7], sampling=LONG, timeout=0.25):
                received.append(event)
        except LoraPoolClientError as err:
            assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, err
            print(f"deadline: {err.code.name} after {len(received)} messages")

        # 5. Errors: the status code says what kind, `reason` (google.rpc.ErrorInfo)
        #    says which, `metadata` and `field_violations` (google.rpc.BadRequest)
        #    say about what.
        try:
            list(client.generate("hi", adapter_id="no-such-adapter"))
        except LoraPoolClientError as err:
            adapter = err.metadata.get("adapter_id")
            print(f"error: {err.code.name} reason {err.reason} adapter_id {adapter}")
        try:
            client.complete("hi", temperature=-1.0)
        except LoraPoolClientError as err:
            fields = ",".join(field for field, _why in err.field_violations)
            print(f"error: {err.code.name} reason {err.reason} fields {fields}")


if __name__ == "__main__":
    main()
