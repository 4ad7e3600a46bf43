"""The same walk-through as client.py with the generated stubs alone (grpcio,
grpcio-status and the `lorapool.v1` modules, or stubs generated from
protos/lorapool/v1/lorapool.proto): the messages as the wire has them, and the
error details decoded from the grpc-status-details-bin trailer.

    python examples/python/stubs.py [host:port]   (default: $LORAPOOL_TARGET or localhost:50051)
"""

from __future__ import annotations

import os
import sys
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

TARGET = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LORAPOOL_TARGET", "localhost:50051")
ADAPTER = os.environ.get("LORAPOOL_ADAPTER", "adapter-001")
KEY = os.environ.get("LORAPOOL_API_KEY")
METADATA = (("x-api-key", KEY),) if KEY else ()
LONG = pb.SamplingParams(max_new_tokens=2000, ignore_eos=True)


def details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest's fields of a failed call (empty when the
    server sent none, e.g. for a deadline that expired on the client)."""
    info, fields = error_details_pb2.ErrorInfo(), []
    status = rpc_status.from_call(err)  # decodes grpc-status-details-bin
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return info, fields


def main() -> None:
    with grpc.insecure_channel(TARGET) as channel:
        stub = pb_grpc.LoraPoolServiceStub(channel)

        # 1. A streamed generation
        request = pb.GenerateRequest(
            prompt="Once upon a time",
            adapter_id=ADAPTER,
            params=pb.SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.0),
        )
        replies = list(stub.Generate(request, timeout=60, metadata=METADATA))
        tokens = [t for r in replies for t in r.token_ids]
        finish = pb.FinishReason.Name(replies[-1].finish_reason)
        text = "".join(r.text for r in replies)
        print(
            f"generate: {len(tokens)} tokens in {len(replies)} messages, finish {finish}, "
            f"text {text!r}"
        )

        # 2. Token ids as input: input_ids is a TokenIds message (a oneof cannot hold
        #    a repeated field).
        ids = pb.CompleteRequest(
            input_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
            params=pb.SamplingParams(max_new_tokens=4, ignore_eos=True),
        )
        reply = stub.Complete(ids, timeout=60, metadata=METADATA)
        print(
            f"input_ids: {reply.usage.prompt_tokens} prompt tokens, {len(reply.token_ids)} generated"
        )

        # 3. Cancellation: call.cancel() ends the stream; the server frees the request.
        long = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]), params=LONG)
        call = stub.Generate(long, timeout=60, metadata=METADATA)
        received = [next(call) for _ in range(3)]
        call.cancel()
        code = call.code()
        stats = pb.GetStatsRequest()
        running = stub.GetStats(stats, timeout=10, metadata=METADATA).running_requests
        for _ in range(50):
            if running == 0:
                break
            time.sleep(0.1)
            running = stub.GetStats(stats, timeout=10, metadata=METADATA).running_requests
        print(
            f"cancel: {code.name} after {len(received)} messages, server running_requests {running}"
        )

        # 4. A deadline (timeout, in seconds)
        received = []
        try:
            for r in stub.Generate(long, timeout=0.25, metadata=METADATA):
                received.append(r)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
            print(f"deadline: {err.code().name} after {len(received)} messages")

        # 5. Errors: code, ErrorInfo reason and metadata, BadRequest field
        try:
            missing = pb.GenerateRequest(prompt="hi", adapter_id="no-such-adapter")
            list(stub.Generate(missing, timeout=60, metadata=METADATA))
        except grpc.RpcError as err:
            info, _ = details(err)
            adapter = info.metadata["adapter_id"]
            print(f"error: {err.code().name} reason {info.reason} adapter_id {adapter}")
        try:
            bad = pb.CompleteRequest(prompt="hi", params=pb.SamplingParams(temperature=-1.0))
            stub.Complete(bad, timeout=60, metadata=METADATA)
        except grpc.RpcError as err:
            info, fields = details(err)
            print(f"error: {err.code().name} reason {info.reason} fields {','.join(fields)}")


if __name__ == "__main__":
    main()
