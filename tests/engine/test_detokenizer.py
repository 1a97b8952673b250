"""Incremental detokenization: deltas concatenate to the final text; no split characters, no partial stops."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mace.engine.detokenizer import IncrementalDetokenizer
from mace.model.tiny import build_tokenizer

TOKENIZER = build_tokenizer()


def stream(text: str, stop: tuple[str, ...] = (), step: int = 1) -> tuple[list[str], IncrementalDetokenizer]:
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(TOKENIZER, stop)
    deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.finish())
    return deltas, detok


def test_multibyte_characters_are_never_split() -> None:
    deltas, _ = stream("né 🙂 漢字")
    assert "".join(deltas) == "né 🙂 漢字"
    assert all("\ufffd" not in d for d in deltas)
    assert "🙂" in deltas  # four byte-tokens released together, once complete


def test_stop_string_is_cut_and_never_partly_emitted() -> None:
    deltas, detok = stream("hello STOP world", stop=("STOP",))
    assert "".join(deltas) == "hello "
    assert detok.stopped_by == "STOP"
    assert not any("S" in d for d in deltas)


def test_incomplete_trailing_bytes_are_flushed_at_the_end() -> None:
    ids = TOKENIZER.encode("é", add_special_tokens=False)[:1]  # half of a two-byte character
    detok = IncrementalDetokenizer(TOKENIZER)
    assert detok.add(ids) == ""
    assert detok.finish() == TOKENIZER.decode(ids)


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
    stop=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=4),
                  max_size=2),
    step=st.integers(1, 5),
)
def test_deltas_equal_text_up_to_first_stop(text: str, stop: list[str], step: int) -> None:
    assume("<|" not in text)  # special-token markup is skipped when decoding, by design
    deltas, _ = stream(text, tuple(stop), step)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    assert "".join(deltas) == text[:cut]
