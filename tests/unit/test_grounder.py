"""Noun phrases of captions with the configured spaCy pipeline (en_core_web_sm)."""

import pytest

from serve_apps.engines.grounder import Grounder


@pytest.fixture(scope="module")
def grounder():
    g = Grounder()
    g.load()
    return g


@pytest.mark.parametrize(
    ("caption", "phrases"),
    [
        (
            "a man riding a red bicycle next to two dogs",
            ["a man", "a red bicycle", "two dogs"],
        ),
        (
            "A person sitting at a table with a laptop and coffee cup in a modern cafe",
            ["A person", "a table", "a laptop and coffee cup", "a modern cafe"],
        ),
        (
            "Three young boys are in a music room with guitars on the wall. "
            "One boy is holding a microphone while another is playing a piano.",
            [
                "Three young boys",
                "a music room",
                "guitars",
                "the wall",
                "One boy",
                "a microphone",
                "a piano",
            ],
        ),
        ("It is raining.", []),  # a pronoun names nothing to detect
        ("Two dogs play with a ball while two Dogs sleep.", ["Two dogs", "a ball"]),  # dedup
    ],
)
def test_noun_phrases_in_order_deduplicated(grounder, caption, phrases):
    found = grounder.phrases(caption)
    assert [p.text for p in found] == phrases
    for p in found:
        assert caption[p.start_char : p.end_char] == p.text
        assert p.root in p.text


def test_lowercase_follows_rex_omnis_data_engine_but_keeps_spans(grounder):
    lower = Grounder(lowercase=True)
    lower._nlp = grounder._nlp
    (first, *_) = lower.phrases("A person sitting at a table")
    assert first.text == "a person" and (first.start_char, first.end_char) == (0, 8)


def test_a_missing_pipeline_fails_at_load():
    with pytest.raises(OSError):
        Grounder("en_core_web_nonexistent").load()
