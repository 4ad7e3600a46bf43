"""The demo tokenizer: byte-level BPE trained on a small built-in corpus (padded with
pseudo-words for large vocabularies), saved so that transformers loads it as a fast
tokenizer, with a ChatML chat template (the format of SmolLM2 and Qwen2) so that chat
requests work on the demo model too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorapool.demo.common import write_json

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turn markers
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0 to 4

# ChatML, as SmolLM2-Instruct writes it (without its default system prompt): every
# turn is `<|im_start|>role\ncontent<|im_end|>\n`, and the generation prompt opens the
# assistant's turn. Each marker is one special token, as in the real tokenizers.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Deterministic training text: varied English prose, dialogue, numbers, code and a
# little non-ASCII so that multi-byte UTF-8 merges exist.
CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman who
told stories to anyone who would listen. Every morning he walked down to the harbour,
checked his nets, and watched the gulls circle above the boats.
"Where are you going?" asked the girl. "To the market," he replied, "and then home."
She laughed, picked up her basket, and followed him along the narrow stone path.
A server that hosts many adapters of one base model must decide which adapters stay
in memory, which are evicted, and how requests for different adapters share a batch.
Latency matters: the first token should arrive quickly, and the following tokens
should stream at a steady pace. Throughput matters too, because hardware is costly.
In 1969, people first walked on the Moon. In 2024, the price was $3.50 per unit, up
12% from the year before; the total came to 1,234,567 units across 89 regions.
def greet(name: str) -> str:
    return f"Hello, {name}!"

for i in range(10):
    print(i, i * i, i ** 3)

if (x > 0 && y < 100) { return x + y; } else { return -1; }
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
The weather today is mild and cloudy, with a chance of rain in the afternoon. Winds
from the west at ten to fifteen miles per hour. Tomorrow will be sunny and warmer.
Scientists study the stars, the oceans, the forests and the tiny cells inside us.
Music, painting, poetry and dance are ways in which people share what they feel.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
Please remember to save your work often, back up your files, and test your code.
Questions? Answers! Lists: apples, oranges, pears; brackets [a], {b}, (c), <d>.
A naïve café owner in Zürich served crème brûlée and a piña colada to a façade
designer. Tokyo is 東京, Beijing is 北京, and hello is こんにちは or 你好 or 안녕하세요.
Greek: αβγδε, Russian: Привет мир, Arabic: مرحبا, Hindi: नमस्ते, emoji: 😀 🚀 ❤️ 👍.
The committee met on Tuesday to review the budget, approve the new schedule, and
discuss the plans for the library, the park, and the bridge over the river.
Good software is simple, clear, and well tested; it fails loudly and recovers well.
"""


# The pre-tokenizer split of Qwen2's tokenizer. transformers 5 loads any model of
# type qwen2 with its own Qwen2Tokenizer class, which rebuilds the normalizer (NFC)
# and pre-tokenizer from this pattern whatever tokenizer.json says; training the
# qwen2 demo tokenizer the same way keeps tokenizer.json and AutoTokenizer in step.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab_size: int, arch: str = "llama") -> Any:
    """Train a byte-level BPE tokenizer on CORPUS.

    Byte-level pre-tokenization and decoding make decode(encode(s)) == s for any
    string (for qwen2: any NFC-normalized string, as with the real Qwen2 tokenizer);
    the template post-processor prepends <s> like Llama tokenizers do.
    """
    from tokenizers import processors

    tokenizer = _untrained(arch)
    text = CORPUS.splitlines(keepends=True)
    _train(tokenizer, text, vocab_size)
    if tokenizer.get_vocab_size() < vocab_size:
        # Fill a large vocabulary too: ids the tokenizer cannot decode would make
        # most generated tokens print as nothing. English still merges first.
        _train(tokenizer, text * 20 + _filler_text(40 * vocab_size), vocab_size)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B:1",
        special_tokens=[(BOS, bos_id)],
    )
    return tokenizer


def _untrained(arch: str) -> Any:
    """An empty BPE model with the byte-level pre-tokenizer and decoder of `arch`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    if arch == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _train(tokenizer: Any, text: list[str], vocab_size: int) -> None:
    from tokenizers import pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text, trainer=trainer)


_ONSETS = "- b c d f g h j k l m n p r s t v w z br ch st tr sh th pl gr".split()
_VOWELS = "a e i o u ai ea ou y".split()
_CODAS = "- - - n r s t l m ck ng st".split()


def _filler_text(n_chars: int) -> list[str]:
    """Deterministic lines of pronounceable pseudo-words, about n_chars long."""
    import random

    rng = random.Random(0)

    def syllable() -> str:
        parts = (rng.choice(_ONSETS), rng.choice(_VOWELS), rng.choice(_CODAS))
        return "".join(p for p in parts if p != "-")

    lines, total = [], 0
    while total < n_chars:
        words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(12)]
        line = " ".join(words).capitalize() + ".\n"
        lines.append(line)
        total += len(line)
    return lines


def write_tokenizer(model_dir: Path, vocab_size: int, arch: str = "llama") -> dict[str, int]:
    """Save tokenizer.json and a config transformers loads as a fast tokenizer.

    Returns the special token ids, for the model and generation configs.
    """
    tokenizer = build_tokenizer(vocab_size, arch)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    ids = {
        name: tokenizer.token_to_id(tok)
        for name, tok in zip(("bos", "eos", "pad"), (BOS, EOS, PAD), strict=True)
    }
    write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,  # else Qwen2Tokenizer adds <|endoftext|> past the vocab
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
            "padding_side": "left",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(
        model_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
    )
    return ids
