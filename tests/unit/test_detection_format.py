"""Rex-Omni's format: prompts, coordinate bins, the output parser on real Rex-Omni output
(and malformed output), and the llguidance grammar that makes parsing unable to fail."""

import random

import pytest

from serve_apps.engines.detection import (
    build_prompt,
    detection_grammar,
    from_bin,
    parse_prediction,
    predictions_for_task,
    to_bin,
)
from serve_apps.vision_checks import check_category

# Real Rex-Omni outputs, from the output cells of IDEA-Research/Rex-Omni's tutorials
# (@478e44f): tutorials/detection_example/_full_notebook.ipynb (a 1440x810 cafe photo)
# and tutorials/ocr_example/_full_tutorial.ipynb (OCR, polygons).
CAFE = (
    "<|object_ref_start|>man<|object_ref_end|><|box_start|><23><294><106><525>,<80><286><146>"
    "<515>,<69><363><357><936>,<251><327><457><781>,<308><212><362><461>,<512><252><612><551>,"
    "<763><270><842><467><|box_end|>, <|object_ref_start|>woman<|object_ref_end|><|box_start|>"
    "<396><253><446><376>,<586><360><745><820>,<591><228><645><374>,<699><233><738><417>,<880>"
    "<293><953><514><|box_end|>, <|object_ref_start|>yellow flower<|object_ref_end|><|box_start|>"
    "<441><439><594><588><|box_end|>, <|object_ref_start|>sofa<|object_ref_end|><|box_start|>"
    "<643><453><999><977><|box_end|>, <|object_ref_start|>robot-shape light<|object_ref_end|>"
    "<|box_start|><128><95><218><259>,<771><96><876><254><|box_end|>, <|object_ref_start|>"
    "blanket<|object_ref_end|><|box_start|><828><560><962><947><|box_end|>, <|object_ref_start|>"
    "microwave<|object_ref_end|><|box_start|><351><307><400><368><|box_end|>, "
    "<|object_ref_start|>laptop<|object_ref_end|><|box_start|><126><343><166><388><|box_end|>, "
    "<|object_ref_start|>cup<|object_ref_end|><|box_start|><575><358><592><384>,<613><545><637>"
    "<602>,<840><364><854><387>,<883><359><895><375><|box_end|>, <|object_ref_start|>white chair"
    "<|object_ref_end|><|box_start|><386><418><434><577>,<454><419><498><510>,<524><420><582>"
    "<584>,<624><416><673><563><|box_end|>, <|object_ref_start|>lamp<|object_ref_end|>"
    "<|box_start|><358><1><399><131>,<488><2><530><130>,<620><2><664><132><|box_end|><|im_end|>"
)
CAFE_CATEGORIES = [
    "man",
    "woman",
    "yellow flower",
    "sofa",
    "robot-shape light",
    "blanket",
    "microwave",
    "laptop",
    "cup",
    "white chair",
    "lamp",
]
OCR = (
    "<|object_ref_start|>See you soon!<|object_ref_end|><|box_start|><120><640><313><631><317>"
    "<683><122><697><|box_end|>, <|object_ref_start|>Diane<|object_ref_end|><|box_start|><113>"
    "<713><202><710><206><751><115><753><|box_end|><|im_end|>"
)


def box(bins, w, h):
    x0, y0, x1, y1 = bins
    return [x0 / 999 * w, y0 / 999 * h, x1 / 999 * w, y1 / 999 * h]


# ------------------------------------------------------------------ prompts and bins
def test_prompts_are_rex_omnis():
    assert build_prompt("detection", ["person", "red car"]) == (
        "Detect person, red car. Output the bounding box coordinates in [x0, y0, x1, y1] format."
    )
    assert build_prompt("pointing", ["cup"]) == "Point to cup."


def test_bins_round_trip_within_one_bin():
    rng = random.Random(0)
    for _ in range(2000):
        size = rng.randint(1, 4000)
        value = rng.uniform(0, size)
        assert 0 <= to_bin(value, size) <= 999
        assert abs(from_bin(to_bin(value, size), size) - value) <= size / 999 + 1e-9
    assert to_bin(-5, 100) == 0 and to_bin(500, 100) == 999


# ------------------------------------------------------------------ parser, real output
def test_parses_the_real_detection_output():
    out = parse_prediction(CAFE, 1440, 810)
    assert list(out) == CAFE_CATEGORIES
    assert [len(v) for v in out.values()] == [7, 5, 1, 1, 2, 1, 1, 1, 4, 4, 3]
    assert all(s["type"] == "box" for shapes in out.values() for s in shapes)
    assert out["man"][0]["coords"] == pytest.approx(box([23, 294, 106, 525], 1440, 810))
    assert out["lamp"][2]["coords"] == pytest.approx(box([620, 2, 664, 132], 1440, 810))
    assert out["sofa"][0]["coords"][2] == pytest.approx(1440.0)  # bin 999 is the edge


def test_parses_real_ocr_polygons():
    out = parse_prediction(OCR, 1000, 500)
    assert list(out) == ["See you soon!", "Diane"]
    (poly,) = out["Diane"]
    assert poly["type"] == "polygon"
    corners = [(113, 713), (202, 710), (206, 751), (115, 753)]
    assert [pytest.approx(c) for c in poly["coords"]] == [
        [x / 999 * 1000, y / 999 * 500] for x, y in corners
    ]


def test_parses_points_and_the_parsers_docstring_example():
    points = (
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|><100><200>,<300><400><|box_end|>"
    )
    assert parse_prediction(points, 999, 999) == {
        "dog": [
            {"type": "point", "coords": [100.0, 200.0]},
            {"type": "point", "coords": [300.0, 400.0]},
        ]
    }
    # Upstream's own example separates boxes with ", ": the split on "," still works.
    example = (
        "<|object_ref_start|>person<|object_ref_end|><|box_start|><0><35><980><987>, "
        "<646><0><999><940><|box_end|>"
    )
    assert [s["coords"] for s in parse_prediction(example, 999, 999)["person"]] == [
        [0.0, 35.0, 980.0, 987.0],
        [646.0, 0.0, 999.0, 940.0],
    ]


# ------------------------------------------------------------------ parser, malformed
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            # cut off by max_tokens inside the first item's 4th box: 3 coordinates
            CAFE[: CAFE.index("<251><327><457>") + len("<251><327><457>")],
            {"man": [[23, 294, 106, 525], [80, 286, 146, 515], [69, 363, 357, 936]]},
            id="truncated-mid-box",
        ),
        pytest.param(
            # ... after 2 coordinates: that reads as a point (predictions_for_task drops
            # it from a detection answer)
            CAFE[: CAFE.index("<251><327>") + len("<251><327>")],
            {"man": [[23, 294, 106, 525], [80, 286, 146, 515], [69, 363, 357, 936], [251, 327]]},
            id="truncated-after-two-coordinates",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><1><2><3><4>",
            {"cat": [[1, 2, 3, 4]]},
            id="missing-box-end",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><1><2><3>,<5><6><7><8><9>,"
            "<10><11><12><13><|box_end|>",
            {"cat": [[10, 11, 12, 13]]},
            id="odd-coordinate-counts-dropped",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|>None<|box_end|>",
            {"cat": []},
            id="none-is-an-empty-category",
        ),
        pytest.param(
            "<|object_ref_start|> cat <|object_ref_end|><|box_start|><1><2><3><4><|box_end|>, "
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><5><6><7><8><|box_end|>",
            {"cat": [[1, 2, 3, 4], [5, 6, 7, 8]]},
            id="repeated-category-collects-both",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>"
            "<|im_end|><|object_ref_start|>dog<|object_ref_end|><|box_start|><5><6><7><8><|box_end|>",
            {"cat": [[1, 2, 3, 4]]},
            id="text-after-end-of-turn-ignored",
        ),
        pytest.param(
            "<|object_ref_start|>a<b<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>",
            {},
            id="phrase-with-angle-bracket-unreadable",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|box_start|><1><2><3><4><|box_end|>",
            {},
            id="missing-object-ref-end",
        ),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><9><8><3><4>,"
            "<5><5><5><9>,<1><2><3><2><|box_end|>",
            {"cat": [[3, 4, 9, 8]]},
            id="inverted-corners-swapped-zero-area-dropped",
        ),
        pytest.param("I cannot see any cats here.", {}, id="prose"),
        pytest.param("", {}, id="empty"),
        pytest.param(
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|><1><2><x><4>,<5><6><|box_end|>",
            {"cat": [[5, 6]]},
            id="non-numeric-coordinate",
        ),
    ],
)
def test_malformed_output_never_raises_and_keeps_what_is_well_formed(text, expected):
    out = parse_prediction(text, 999, 999)
    assert {k: [s["coords"] for s in v] for k, v in out.items()} == {
        k: [[float(c) for c in coords] for coords in v] for k, v in expected.items()
    }


def test_predictions_for_task_keeps_asked_categories_and_the_tasks_shape():
    parsed = parse_prediction(
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|><1><2><3><4>,<5><6><|box_end|>, "
        "<|object_ref_start|>owl<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>",
        999,
        999,
    )
    out = predictions_for_task(parsed, "detection", ["cat", "dog"])
    assert out == {"cat": [{"type": "box", "coords": [1.0, 2.0, 3.0, 4.0]}], "dog": []}
    assert predictions_for_task(parsed, "pointing", ["cat"]) == {
        "cat": [{"type": "point", "coords": [5.0, 6.0]}]
    }


def test_categories_the_format_cannot_carry_are_named():
    assert check_category("red car") is None
    assert check_category("a<b") and check_category("x, y") and check_category("  ")
    with pytest.raises(ValueError, match="category"):
        detection_grammar(["ok", "not,ok"], "detection", frozenset())


# ------------------------------------------------------------------ grammar
@pytest.fixture(scope="module")
def vl_compiler(smoke_vl_dir):
    from transformers import AutoTokenizer

    from serve_apps.engines.constraints import ConstraintCompiler

    tokenizer = AutoTokenizer.from_pretrained(smoke_vl_dir)
    compiler = ConstraintCompiler.for_hf_tokenizer(tokenizer)
    specials = frozenset(
        str(t.content)
        for i, t in tokenizer.added_tokens_decoder.items()
        if compiler.is_special_token(i)
    )
    return tokenizer, compiler, specials


def _matcher(compiler, grammar):
    from serve_apps.engines.base import Constraint

    return compiler.matcher(Constraint("grammar", grammar))


def _accepts(tokenizer, matcher, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_the_coordinate_tokens_are_named_as_tokens(vl_compiler):
    tokenizer, _, specials = vl_compiler
    # llguidance treats Rex-Omni's added coordinate tokens as special: a quoted "<12>"
    # would never match the token the model writes.
    assert {"<0>", "<999>", "<|object_ref_start|>", "<|box_end|>"} <= specials
    assert tokenizer("<12><999>", add_special_tokens=False).input_ids == [
        tokenizer.convert_tokens_to_ids("<12>"),
        tokenizer.convert_tokens_to_ids("<999>"),
    ]


def test_the_grammar_accepts_real_rex_omni_output(vl_compiler):
    tokenizer, compiler, specials = vl_compiler
    matcher = _matcher(compiler, detection_grammar(CAFE_CATEGORIES, "detection", specials))
    assert _accepts(tokenizer, matcher, CAFE.removesuffix("<|im_end|>"))
    assert matcher.is_stopped()  # every category answered: only the end can follow


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "<|object_ref_start|>dog<|object_ref_end|><|box_start|>None<|box_end|>", id="not-asked"
        ),
        pytest.param(
            "<|object_ref_start|>car<|object_ref_end|><|box_start|>None<|box_end|>, "
            "<|object_ref_start|>person<|object_ref_end|><|box_start|>None<|box_end|>",
            id="out-of-order",
        ),
        pytest.param(
            "<|object_ref_start|>person<|object_ref_end|><|box_start|><1><2><|box_end|>",
            id="point-in-detection",
        ),
        pytest.param(
            "<|object_ref_start|>person<|object_ref_end|><|box_start|><1><2><3><4>,<5><6><7><8>,"
            "<1><2><3><4><|box_end|>",
            id="over-max-shapes",
        ),
        pytest.param(
            "<|object_ref_start|>person<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>, "
            "<|object_ref_start|>person<|object_ref_end|><|box_start|>None<|box_end|>",
            id="category-twice",
        ),
        pytest.param("person: <1><2><3><4>", id="prose"),
    ],
)
def test_the_grammar_rejects_what_the_request_did_not_ask_for(vl_compiler, text):
    tokenizer, compiler, specials = vl_compiler
    grammar = detection_grammar(["person", "car"], "detection", specials, max_shapes=2)
    assert not _accepts(tokenizer, _matcher(compiler, grammar), text)


@pytest.mark.parametrize("task", ["detection", "pointing"])
def test_any_text_the_grammar_allows_parses_into_the_asked_shapes(vl_compiler, task):
    """Random walks through the grammar (a random allowed token at every step, as a model
    with arbitrary weights would pick): every complete output parses into asked
    categories only, each with shapes of the task's type, within the bound."""
    import llguidance
    import llguidance.torch as llt
    import torch

    tokenizer, compiler, specials = vl_compiler
    categories = ["person", "red car", 'a "quoted" lamp']
    grammar = detection_grammar(categories, task, specials, max_shapes=3)
    rng = random.Random(7)
    executor = llguidance.LLExecutor()
    shifts = torch.arange(32, dtype=torch.int32)
    for _ in range(25):
        matcher = _matcher(compiler, grammar)
        ids: list[int] = []
        while not matcher.is_stopped() and len(ids) < 400:
            bitmask = llt.allocate_token_bitmask(1, compiler.vocab_size)
            llt.fill_next_token_bitmask_par(executor, [(matcher, 0)], bitmask)
            allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(-1)
            choices = allowed.nonzero().view(-1).tolist()
            eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
            if matcher.is_accepting() and eos in choices and rng.random() < 0.3:
                break
            token = rng.choice([c for c in choices if c != eos] or [eos])
            assert matcher.consume_token(token)
            ids.append(token)
        assert matcher.is_accepting()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parsed = parse_prediction(text, 640, 480)
        assert parsed and set(parsed) <= set(categories), text
        assert list(parsed) == [c for c in categories if c in parsed]  # asked order
        for shapes in parsed.values():
            assert len(shapes) <= 3
            for s in shapes:
                assert s["type"] == {"detection": "box", "pointing": "point"}[task]
                assert all(0 <= v <= 640 for v in s["coords"])


def test_coordinates_as_strings_for_a_tokenizer_without_coordinate_tokens(smoke_llm_dir):
    """A model without Rex-Omni's tokens (here the text smoke model) gets them as strings,
    spelled in its ordinary tokens; the grammar still holds."""
    from transformers import AutoTokenizer

    from serve_apps.engines.constraints import ConstraintCompiler

    tokenizer = AutoTokenizer.from_pretrained(smoke_llm_dir)
    compiler = ConstraintCompiler.for_hf_tokenizer(tokenizer)
    specials = frozenset(
        str(t.content)
        for i, t in tokenizer.added_tokens_decoder.items()
        if compiler.is_special_token(i)
    )
    assert "<12>" not in specials
    grammar = detection_grammar(["cat"], "pointing", specials)
    text = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><12><999><|box_end|>"
    assert _accepts(tokenizer, _matcher(compiler, grammar), text)
