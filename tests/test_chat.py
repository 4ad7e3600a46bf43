"""Chat input end to end, on real gRPC servers of the tiny demo: a conversation is
rendered with the model's chat template exactly as transformers renders it (the
same ids, so the same greedy tokens as sending those ids, and transformers' own
greedy continuation), through Generate, Complete and Tokenize, the Python clients
and the CLI. Every refusal is INVALID_ARGUMENT (or FAILED_PRECONDITION without a
tokenizer) with its ErrorInfo reason and the field at fault, and leaves the server
serving and its pool idle."""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import pytest
import torch
from helpers import assert_idle

from lorapool.client import AsyncLoraPoolClient, LoraPoolClient, LoraPoolClientError, cli
from lorapool.client.requests import chat_to_proto
from lorapool.convert import bad_request, error_info
from lorapool.v1 import lorapool_pb2 as pb
from lorapool.v1 import lorapool_pb2_grpc as pb_grpc

CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Where does the river go?"},
    {"role": "assistant", "content": "To the sea, past the old harbour."},
    {"role": "tool", "content": '{"tide": "high"}'},
    {"role": "user", "content": "And then?"},
]
NEW_TOKENS = 12
# Llama 2's rule, as its template states it: a template may refuse a conversation.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def wire_chat(messages=CHAT) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(**m) for m in messages])


def greedy(n: int = NEW_TOKENS) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=n, ignore_eos=True)


def stream_tokens(stub, request, timeout: float = 60) -> list[int]:
    return [t for reply in stub.Generate(request, timeout=timeout) for t in reply.token_ids]


def assert_refused(exc: grpc.RpcError, code: str, reason: str, field: str, *words: str) -> None:
    """The status, the ErrorInfo reason and field, the BadRequest violation, and the
    words a person needs in the message."""
    assert exc.code() == grpc.StatusCode[code], exc.details()
    info = error_info(exc.trailing_metadata())
    assert info.reason == reason, (info, exc.details())
    assert info.metadata["field"] == field, info
    (violation,) = bad_request(exc.trailing_metadata()).field_violations
    assert violation.field == field
    for word in words:
        assert word in exc.details(), exc.details()
    assert "Traceback" not in exc.details()


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine={"pool_mib": 16, "max_new_tokens_limit": 64})


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.LoraPoolServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_demo.model_dir))


@pytest.fixture(scope="module")
def chat_ids(tokenizer) -> list[int]:
    """transformers' ids for CHAT with the generation prompt: the oracle."""
    return list(
        tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    )


def tokenizer_copy(tiny_demo, root, chat_template: str | None):
    """The demo's tokenizer files in a folder of their own, with another template
    (None: none at all), for --tokenizer."""
    root.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_demo.model_dir / name, root / name)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def other_servers(start_server, tiny_demo, tmp_path_factory):
    """Servers whose tokenizer has no chat template, one whose template refuses
    conversations whose roles do not alternate, and one with no tokenizer at all."""
    root = tmp_path_factory.mktemp("chat-tokenizers")
    bare = root / "bare-model"
    shutil.copytree(tiny_demo.model_dir, bare)
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()
    engine = {"pool_mib": 8, "max_new_tokens_limit": 64}
    kinds = {
        "no template": {"tokenizer_dir": str(tokenizer_copy(tiny_demo, root / "none", None))},
        "alternating": {
            "tokenizer_dir": str(
                tokenizer_copy(tiny_demo, root / "alternating", ALTERNATING_TEMPLATE)
            )
        },
        "no tokenizer": {"model_dir": str(bare)},
    }
    servers = {name: start_server(engine={**engine, **extra}) for name, extra in kinds.items()}
    channels = {name: grpc.insecure_channel(s.target) for name, s in servers.items()}
    yield {name: pb_grpc.LoraPoolServiceStub(c) for name, c in channels.items()}
    for channel in channels.values():
        channel.close()


# -- the rendering ---------------------------------------------------------------------------


def test_the_demo_template_is_chatml(tokenizer, chat_ids):
    text = tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n"
        "<|im_start|>user\nWhere does the river go?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokens = tokenizer.convert_ids_to_tokens(chat_ids)
    assert tokens.count("<|im_start|>") == len(CHAT) + 1  # one special token per turn
    assert tokens.count("<|im_end|>") == len(CHAT)


def test_tokenize_renders_a_chat_as_transformers_does(stub, chat_ids):
    reply = stub.Tokenize(pb.TokenizeRequest(chat=wire_chat(), return_tokens=True), timeout=30)
    assert list(reply.token_ids) == chat_ids
    assert reply.tokens[0] == "<|im_start|>" and len(reply.tokens) == len(chat_ids)
    plain = stub.Tokenize(pb.TokenizeRequest(text="And then?"), timeout=30)
    assert list(plain.token_ids) != chat_ids  # text is still text


def test_generate_with_a_chat_equals_its_ids_and_transformers(stub, tiny_demo, chat_ids):
    from transformers import AutoModelForCausalLM

    by_chat = pb.GenerateRequest(chat=wire_chat(), params=greedy())
    by_ids = pb.GenerateRequest(input_ids=pb.TokenIds(ids=chat_ids), params=greedy())
    replies = list(stub.Generate(by_chat, timeout=60))
    tokens = [t for r in replies for t in r.token_ids]
    assert len(tokens) == NEW_TOKENS
    assert tokens == stream_tokens(stub, by_ids)
    assert replies[-1].usage.prompt_tokens == len(chat_ids)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_demo.model_dir), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([chat_ids]),
            attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert out[0, len(chat_ids) :].tolist() == tokens


def test_complete_with_a_chat_and_an_adapter(stub, chat_ids):
    def complete(**fields):
        request = pb.CompleteRequest(adapter_id="adapter-003", params=greedy(), **fields)
        return stub.Complete(request, timeout=60)

    by_chat = complete(chat=wire_chat())
    assert list(by_chat.token_ids) == list(complete(input_ids=pb.TokenIds(ids=chat_ids)).token_ids)
    assert by_chat.usage.prompt_tokens == len(chat_ids)
    base = stub.Complete(pb.CompleteRequest(chat=wire_chat(), params=greedy()), timeout=60)
    assert list(base.token_ids) != list(by_chat.token_ids)  # the adapter applies
    assert_idle(stub)


# -- refusals --------------------------------------------------------------------------------

LONG_CHAT = [{"role": "user", "content": "river stone light " * 8}] * 200  # ~4000 tokens

REFUSALS = {
    # name: (chat, reason, field, words the message must hold)
    "no messages": ([], "INVALID_REQUEST", "chat.messages", ["no messages"]),
    "unknown role": (
        [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}],
        "INVALID_REQUEST",
        "chat.messages[1].role",
        ["'robot'", "system, user, assistant, tool"],
    ),
    "empty role": (
        [{"role": "", "content": "hi"}],
        "INVALID_REQUEST",
        "chat.messages[0].role",
        ["chat.messages[0].role"],
    ),
    "rendered prompt too long": (
        LONG_CHAT,
        "INVALID_REQUEST",
        "params.max_new_tokens",
        ["exceeds the context of 2048 tokens"],
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
@pytest.mark.parametrize("method", ["Generate", "Complete"])
def test_bad_chats_are_refused_with_reason_and_field(stub, name, method):
    messages, reason, field, words = REFUSALS[name]
    request = getattr(pb, f"{method}Request")(chat=wire_chat(messages), params=greedy(4))
    request.chat.SetInParent()  # an empty chat still selects chat
    with pytest.raises(grpc.RpcError) as exc:
        if method == "Generate":
            stream_tokens(stub, request)
        else:
            stub.Complete(request, timeout=30)
    assert_refused(exc.value, "INVALID_ARGUMENT", reason, field, *words)
    assert_idle(stub)


def test_tokenize_takes_text_or_chat_not_both(stub):
    request = pb.TokenizeRequest(text="river", chat=wire_chat())
    with pytest.raises(grpc.RpcError) as exc:
        stub.Tokenize(request, timeout=30)
    assert_refused(exc.value, "INVALID_ARGUMENT", "INVALID_REQUEST", "chat", "not both")
    empty = pb.TokenizeRequest()
    empty.chat.SetInParent()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Tokenize(empty, timeout=30)
    assert_refused(exc.value, "INVALID_ARGUMENT", "INVALID_REQUEST", "chat.messages")
    with pytest.raises(grpc.RpcError) as exc:
        stub.Tokenize(pb.TokenizeRequest(chat=wire_chat([{"role": "bot", "content": ""}])))
    assert_refused(exc.value, "INVALID_ARGUMENT", "INVALID_REQUEST", "chat.messages[0].role")


def test_a_tokenizer_without_a_template_refuses_chats(other_servers):
    stub = other_servers["no template"]
    for call in (
        lambda: stream_tokens(stub, pb.GenerateRequest(chat=wire_chat(), params=greedy(2))),
        lambda: stub.Tokenize(pb.TokenizeRequest(chat=wire_chat()), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert_refused(
            exc.value, "INVALID_ARGUMENT", "NO_CHAT_TEMPLATE", "chat", "no chat template"
        )
    reply = stub.Complete(pb.CompleteRequest(prompt="river", params=greedy(2)), timeout=30)
    assert len(reply.token_ids) == 2  # prompts still work
    assert_idle(stub)


def test_a_template_that_raises_refuses_with_its_message(other_servers, tiny_demo):
    stub = other_servers["alternating"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for call in (
        lambda: stream_tokens(stub, pb.GenerateRequest(chat=wire_chat(bad), params=greedy(2))),
        lambda: stub.Tokenize(pb.TokenizeRequest(chat=wire_chat(bad)), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call()
        assert_refused(
            exc.value, "INVALID_ARGUMENT", "INVALID_REQUEST", "chat", "roles must alternate"
        )
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    good.append({"role": "user", "content": "c"})
    ids = stub.Tokenize(pb.TokenizeRequest(chat=wire_chat(good)), timeout=30).token_ids
    reply = stub.Complete(pb.CompleteRequest(chat=wire_chat(good), params=greedy(3)), timeout=30)
    assert reply.usage.prompt_tokens == len(ids) and len(reply.token_ids) == 3
    assert_idle(stub)


def test_without_a_tokenizer_a_chat_is_a_failed_precondition(other_servers):
    stub = other_servers["no tokenizer"]
    with pytest.raises(grpc.RpcError) as exc:
        stream_tokens(stub, pb.GenerateRequest(chat=wire_chat(), params=greedy(2)))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(exc.value.trailing_metadata()).reason == "NO_TOKENIZER"
    assert "--tokenizer" in exc.value.details()
    assert (
        len(
            stream_tokens(
                stub, pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6]), params=greedy(2))
            )
        )
        == 2
    )
    assert_idle(stub)


def test_a_chat_that_is_not_utf8_is_undecodable(server, stub):
    """proto3 strings are UTF-8: such bytes never reach the chat template."""
    good = pb.GenerateRequest(chat=wire_chat([{"role": "user", "content": "X"}]))
    raw = good.SerializeToString().replace(b"X", b"\xff")
    with grpc.insecure_channel(server.target) as channel:
        generate = channel.unary_stream("/lorapool.v1.LoraPoolService/Generate")
        with pytest.raises(grpc.RpcError) as exc:
            list(generate(raw, timeout=30))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(exc.value.trailing_metadata()).reason == "UNDECODABLE_REQUEST"
    assert_idle(stub)


# -- the engine: length first, the walk off the event loop ----------------------------------


class Untouchable:
    """A conversation of a billion messages that fails the test if anything reads one."""

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i):
        raise AssertionError("a message was read")

    def __iter__(self):
        raise AssertionError("the messages were walked")


async def test_a_huge_chat_is_refused_by_its_length_alone(make_engine):
    from lorapool.errors import InvalidRequest
    from lorapool.types import GenerationRequest

    engine = await make_engine(pool_mib=8)
    request = GenerationRequest(request_id="", chat=Untouchable())
    with pytest.raises(InvalidRequest) as exc:
        async for _ in engine.generate(request):
            pass
    assert exc.value.field == "chat.messages" and "1000000000 messages" in str(exc.value)
    with pytest.raises(InvalidRequest):
        await engine.tokenize("", chat=Untouchable())


async def test_a_chat_is_checked_and_rendered_off_the_event_loop(make_engine, monkeypatch):
    import lorapool.server.engine.engine as engine_module
    from lorapool.types import GenerationRequest, SamplingParams

    engine = await make_engine(pool_mib=8)
    threads = []
    render = engine_module.chat_template_ids

    def recording(tokenizer, messages):
        threads.append(threading.current_thread())
        return render(tokenizer, messages)

    monkeypatch.setattr(engine_module, "chat_template_ids", recording)
    request = GenerationRequest(
        request_id="", chat=CHAT, params=SamplingParams(max_new_tokens=2, ignore_eos=True)
    )
    events = [e async for e in engine.generate(request)]
    assert sum(len(e.token_ids) for e in events) == 2
    assert threads and threading.current_thread() not in threads


# -- the Python clients ----------------------------------------------------------------------


def test_the_client_sends_chats(server, chat_ids):
    with LoraPoolClient(server.target, timeout=60) as client:
        assert client.tokenize(chat=CHAT).token_ids == chat_ids
        expected = client.complete(input_ids=chat_ids, max_new_tokens=6, ignore_eos=True)
        done = client.complete(chat=CHAT, max_new_tokens=6, ignore_eos=True)
        assert done.token_ids == expected.token_ids and done.usage.prompt_tokens == len(chat_ids)
        streamed = client.generate(chat=wire_chat().messages, max_new_tokens=6, ignore_eos=True)
        assert [t for e in streamed for t in e.token_ids] == expected.token_ids
        assert client.tokenize(chat=wire_chat()).token_ids == chat_ids  # a Chat message too

        with pytest.raises(LoraPoolClientError) as caught:
            client.complete(chat=[{"role": "narrator", "content": "x"}], max_new_tokens=1)
        assert caught.value.reason == "INVALID_REQUEST"
        ((field, _),) = caught.value.field_violations
        assert field == "chat.messages[0].role"


async def test_the_async_client_sends_chats(server, chat_ids):
    async with AsyncLoraPoolClient(server.target, timeout=60) as client:
        assert (await client.tokenize(chat=CHAT)).token_ids == chat_ids
        events = [e async for e in client.generate(chat=CHAT, max_new_tokens=4, ignore_eos=True)]
        done = await client.complete(input_ids=chat_ids, max_new_tokens=4, ignore_eos=True)
        assert [t for e in events for t in e.token_ids] == done.token_ids


def test_the_client_refuses_what_it_cannot_send():
    with pytest.raises(TypeError, match="list of messages"):
        chat_to_proto("Hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        chat_to_proto([{"role": "user", "content": "hi", "name": "ann"}])
    with pytest.raises(TypeError, match=r"chat\[0\]"):
        chat_to_proto([("user", "hi")])  # type: ignore[list-item]
    with LoraPoolClient("127.0.0.1:1") as client:  # nothing is sent
        with pytest.raises(ValueError, match="exactly one"):
            client.complete("hi", chat=CHAT)
        with pytest.raises(ValueError, match="exactly one"):
            client.tokenize("hi", chat=CHAT)


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_chat_and_system(server, capsys, tokenizer):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    base = ["--target", server.target, "--max-new-tokens", "5", "--ignore-eos", "--json"]
    chat = ["--chat", "Hi there", "--system", "Be brief."]
    assert cli.main(["complete", *base, *chat]) == 0
    done = json.loads(capsys.readouterr().out)
    with LoraPoolClient(server.target, timeout=60) as client:
        expected = client.complete(input_ids=ids["input_ids"], max_new_tokens=5, ignore_eos=True)
    assert done["token_ids"] == expected.token_ids
    assert done["usage"]["prompt_tokens"] == len(ids["input_ids"])

    assert cli.main(["generate", *base, *chat]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [t for line in lines for t in line["token_ids"]] == expected.token_ids

    assert cli.main(["generate", *base[:2], "--chat", "Hi", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # plain text, streamed


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--system", "Be brief.", "Hi"], "--system goes with --chat"),
        (["--chat", "Hi", "a prompt"], "one of a prompt, --input-ids or --chat"),
        (["--chat", "Hi", "--input-ids", "1 2"], "one of a prompt, --input-ids or --chat"),
    ],
)
def test_cli_chat_usage_errors(capsys, argv, words):
    assert cli.main(["complete", "--target", "127.0.0.1:1", *argv]) == 2
    assert words in capsys.readouterr().err
