"""IncrementalDetokenizer on the demo's byte-level tokenizer: streamed text never
holds a broken character and never shows text a stop string later takes back."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorapool.server.engine.detok import IncrementalDetokenizer

MULTIBYTE = "naïve café 東京 😀"
ALPHABET = "ab cdé\nï東京タワー😀🎉ñ.,"


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_demo.model_dir)


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    return ids


def stream(tokenizer, ids: list[int], stop: list[str] | None = None) -> tuple[list[str], bool]:
    """Feed ids one at a time as the engine does; returns the pieces streamed and
    whether a stop string ended the stream."""
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for i, token in enumerate(ids):
        detok.add([token])
        cut = detok.find_stop() if detok.stop else None
        final = cut is not None or i == len(ids) - 1
        pieces.append(detok.take(final=final, cut=cut))
        if cut is not None:
            return pieces, True
    return pieces, False


def test_multibyte_characters_are_never_split(tokenizer):
    ids = encode(tokenizer, MULTIBYTE)
    # The text really has characters spread over several tokens.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    pieces, stopped = stream(tokenizer, ids)
    assert not stopped
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40))
def test_any_text_streams_back_exactly(tokenizer, text):
    ids = encode(tokenizer, text)
    pieces, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("café", "naïve "),
        ("東京", "naïve café "),
        ("😀", "naïve café 東京 "),
        ("ïve", "na"),
        ("nowhere", MULTIBYTE),
    ],
)
def test_stop_string_is_held_back_and_cut(tokenizer, stop, expected):
    ids = encode(tokenizer, MULTIBYTE)
    pieces, stopped = stream(tokenizer, ids, [stop])
    assert stopped == (stop in MULTIBYTE)
    assert "".join(pieces) == expected
    assert stop not in "".join(pieces)
    assert all("\ufffd" not in p for p in pieces)


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = encode(tokenizer, MULTIBYTE)
    pieces, stopped = stream(tokenizer, ids, ["😀", "fé 東"])
    assert stopped
    assert "".join(pieces) == "naïve ca"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), text=st.text(alphabet=ALPHABET, min_size=2, max_size=40))
def test_stop_anywhere_streams_exactly_the_text_before_it(tokenizer, data, text):
    start = data.draw(st.integers(0, len(text) - 1))
    end = data.draw(st.integers(start + 1, min(len(text), start + 5)))
    stop = text[start:end]
    ids = encode(tokenizer, text)
    pieces, stopped = stream(tokenizer, ids, [stop])
    assert stopped
    # Streaming only appends, so the whole never went past the stop string.
    assert "".join(pieces) == text[: text.find(stop)]
    assert all("\ufffd" not in p for p in pieces)
