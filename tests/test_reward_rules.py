"""Rule verifiers and IFEval checks on hand-made passing and failing texts."""

from __future__ import annotations

import time

import pytest
from ttalign.reward_clients import ifeval_checks
from ttalign.reward_clients.limits import (
    MAX_CONSTRAINTS,
    MAX_INSTRUCTION_ID_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
    MAX_PATTERN_CHARS,
)
from ttalign.reward_clients.rules import InvalidConstraintsError, RuleVerifierReward

USER = [{"role": "user", "content": "Write something."}]

# (constraint, a text that satisfies it, a text that does not)
CASES = [
    ({"type": "word_count", "min": 2, "max": 4}, "three short words", "one"),
    ({"type": "word_count", "max": 3}, "a b c", "a b c d"),
    ({"type": "char_count", "min": 5, "max": 10}, "hello!", "hi"),
    ({"type": "char_count", "max": 5}, "short", "too long by far"),
    (
        {"type": "keywords", "required": ["Paris", "river"], "forbidden": ["London"]},
        "PARIS sits on a River.",
        "Paris, not London, has a river.",
    ),
    ({"type": "keywords", "required": ["seine"]}, "the Seine", "the Thames"),
    ({"type": "regex", "pattern": r"^\d{3}-\d{4}$"}, "555-1234", "call 555-1234 now"),
    ({"type": "regex", "pattern": r"sorry", "must_match": False}, "Sure!", "I'm sorry."),
    (
        {"type": "regex", "pattern": r"\*[^*\n]+\*", "min_count": 3},
        "*one*, *two* and *three*",
        "*one* and *two*",
    ),
    ({"type": "regex", "pattern": r"(?m)^- ", "max_count": 2}, "- a\n- b", "- a\n- b\n- c"),
    ({"type": "sentence_count", "min": 2, "max": 3}, "One. Two! Three?", "Just one sentence."),
    ({"type": "sentence_count", "max": 1}, "Dr Who is fine", "Hi. Bye."),
    ({"type": "paragraph_count", "min": 2}, "First.\n\nSecond.", "First.\nStill first."),
    ({"type": "paragraph_count", "max": 1}, "One block.\n  \n", "a\n \t\nb"),
    ({"type": "json"}, '{"a": [1, 2]}', "{'a': 1}"),
    ({"type": "json"}, '```json\n{"ok": true}\n```', "```json\n{nope}\n```"),
    ({"type": "case", "case": "lower"}, "all quiet here.", "Not quiet"),
    ({"type": "case", "case": "upper"}, "LOUD NOISES!", "Loud"),
    (
        {"type": "ifeval", "instruction_id": "punctuation:no_comma", "kwargs": {}},
        "No commas here.",
        "Commas, everywhere.",
    ),
    (
        {
            "type": "ifeval",
            "instruction_id": "length_constraints:number_sentences",
            "kwargs": {"relation": "less than", "num_sentences": 3},
        },
        "Dr. Smith went home. He slept.",
        "One. Two. Three. Four.",
    ),
    (
        {
            "type": "ifeval",
            "instruction_id": "change_case:capital_word_frequency",
            "kwargs": {"capital_relation": "at least", "capital_frequency": 2},
        },
        "THIS is VERY loud.",
        "This is quiet.",
    ),
]


@pytest.mark.parametrize(("constraint", "passing", "failing"), CASES)
async def test_every_constraint_kind_passes_and_fails(
    constraint: dict, passing: str, failing: str
) -> None:
    client = RuleVerifierReward().bind([constraint])
    assert await client.score(USER, [passing, failing]) == [1.0, 0.0]


async def test_score_is_the_fraction_satisfied() -> None:
    client = RuleVerifierReward().bind(
        [
            {"type": "word_count", "max": 3},
            {"type": "case", "case": "lower"},
            {"type": "keywords", "required": ["cat"]},
            {"type": "json"},
        ]
    )
    scores = await client.score(USER, ["a cat", "A Cat sat down", "[1, 2]"])
    assert scores == [0.75, 0.25, 0.5]


async def test_ifeval_checks_get_the_prompt() -> None:
    prompt = "Repeat this request word for word, then answer: what is 2+2?"
    kwargs = {"prompt_to_repeat": prompt}
    assert ifeval_checks.check_instruction(
        "combination:repeat_prompt", kwargs, prompt + " It is 4.", prompt
    )
    assert not ifeval_checks.check_instruction(
        "combination:repeat_prompt", kwargs, "It is 4.", prompt
    )


def test_loose_check_forgives_a_preamble_line() -> None:
    response = "Sure, here it is:\nno commas at all here"
    assert not ifeval_checks.check_instruction("punctuation:no_comma", {}, response)
    assert ifeval_checks.check_loose("punctuation:no_comma", {}, response)
    assert not ifeval_checks.check_loose("punctuation:no_comma", {}, "")


def test_every_ifeval_id_is_known() -> None:
    ids = ifeval_checks.instruction_ids()
    assert "length_constraints:number_sentences" in ids and len(ids) >= 25


@pytest.mark.parametrize(
    ("constraints", "param", "words"),
    [
        ([{"type": "word_count", "min": 5, "max": 2}], "constraints[0].max", "below min"),
        ([{"type": "word_count", "max": -1}], "constraints[0].max", "greater than"),
        ([{"type": "json"}, {"type": "colour"}], "constraints[1].type", "word_count"),
        ([{"type": "keywords", "required": [3]}], "constraints[0].required[0]", "string"),
        ([{"type": "case", "case": "title"}], "constraints[0].case", "lower"),
        ([{"type": "json", "extra": 1}], "constraints[0].extra", "not permitted"),
        ([{"type": "regex", "pattern": r"(a)\1"}], "constraints[0].pattern", "backreferences"),
        ([{"type": "regex", "pattern": "x(?=y)"}], "constraints[0].pattern", "RE2 cannot"),
        ([{"type": "regex", "pattern": "(unclosed"}], "constraints[0].pattern", "missing )"),
        ([{"type": "regex", "pattern": "x" * 600}], "constraints[0].pattern", "at most"),
        (
            [{"type": "regex", "pattern": "x", "min_count": 3, "max_count": 2}],
            "constraints[0].max_count",
            "below min_count",
        ),
        (
            [{"type": "regex", "pattern": "x", "must_match": False, "max_count": 2}],
            "constraints[0].max_count",
            "must_match",
        ),
        ([{"type": "sentence_count", "min": -1}], "constraints[0].min", "greater than"),
        (
            [{"type": "ifeval", "instruction_id": "made:up"}],
            "constraints[0].instruction_id",
            "made:up",
        ),
        (
            [{"type": "ifeval", "instruction_id": "punctuation:no_comma", "kwargs": {"x": 1}}],
            "constraints[0].kwargs.x",
            "not an argument",
        ),
    ],
)
def test_invalid_constraints_name_the_field(constraints: list, param: str, words: str) -> None:
    with pytest.raises(InvalidConstraintsError) as caught:
        RuleVerifierReward().bind(constraints)
    assert caught.value.param == param
    assert words in str(caught.value)


def test_rules_without_constraints_is_an_error() -> None:
    with pytest.raises(InvalidConstraintsError, match="sent none") as caught:
        RuleVerifierReward().bind([])
    assert caught.value.param == "constraints"


def test_partial_candidates_render_as_an_open_assistant_turn() -> None:
    from ttalign.reward_clients.backend import ScoringItem
    from ttalign.reward_clients.rendering import load_tokenizer, render_ids, render_text
    from ttalign.server.model_prep import prepare_embedded_model

    tokenizer = load_tokenizer(str(prepare_embedded_model()))
    conversation = ({"role": "user", "content": "Count to three."},)
    closed = render_text(tokenizer, ScoringItem(conversation, "One, two"))
    open_turn = render_text(tokenizer, ScoringItem(conversation, "One, two", partial=True))
    assert closed.rstrip().endswith("<|im_end|>")
    assert open_turn.endswith("One, two")
    assert closed.startswith(open_turn)
    assert render_ids(tokenizer, ScoringItem(conversation, "One, two", partial=True)) == (
        tokenizer.encode(open_turn, add_special_tokens=False)
    )


# --- linear time, caps and hostile input ------------------------------------------------


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(x+x+)+y", r"^(\w+\s?)*$", r"(a|aa)+b"])
async def test_regexes_run_in_linear_time(pattern: str) -> None:
    client = RuleVerifierReward().bind([{"type": "regex", "pattern": pattern}])
    hostile = ["a" * 65_536 + "!", "x" * 65_536, "word " * 13_000 + "!"]
    started = time.monotonic()
    await client.score(USER, hostile)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("constraints", "param", "words"),
    [
        ([{"type": "json"}] * (MAX_CONSTRAINTS + 1), "constraints", f"at most {MAX_CONSTRAINTS}"),
        (
            [{"type": "keywords", "required": [f"k{i}" for i in range(MAX_KEYWORDS + 1)]}],
            "constraints[0].required",
            "at most",
        ),
        (
            [{"type": "keywords", "forbidden": ["ok", "x" * (MAX_KEYWORD_CHARS + 1)]}],
            "constraints[0].forbidden[1]",
            "at most",
        ),
        ([{"type": "keywords", "required": [""]}], "constraints[0].required[0]", "at least"),
        (
            [{"type": "regex", "pattern": "x" * (MAX_PATTERN_CHARS + 1)}],
            "constraints[0].pattern",
            "at most",
        ),
        ([{"type": "regex", "pattern": r"\pL{200}"}], "constraints[0].pattern", "too large"),
        ([{"type": "regex", "pattern": "a\ud800"}], "constraints[0].pattern", "valid string"),
        (
            [{"type": "ifeval", "instruction_id": "x" * (MAX_INSTRUCTION_ID_CHARS + 1)}],
            "constraints[0].instruction_id",
            "at most",
        ),
    ],
)
def test_caps_are_400s_naming_the_field(constraints: list, param: str, words: str) -> None:
    with pytest.raises(InvalidConstraintsError) as caught:
        RuleVerifierReward().bind(constraints)
    assert caught.value.param == param
    assert words in str(caught.value)


def test_limits_that_fit_are_accepted() -> None:
    RuleVerifierReward().bind(
        [{"type": "keywords", "required": ["k" * MAX_KEYWORD_CHARS] * MAX_KEYWORDS}]
        + [{"type": "regex", "pattern": "y" * MAX_PATTERN_CHARS}] * (MAX_CONSTRAINTS - 1)
    )


async def test_lone_surrogates_and_deep_nesting_score_without_errors() -> None:
    client = RuleVerifierReward().bind(
        [
            {"type": "regex", "pattern": "b"},
            {"type": "keywords", "required": ["a"]},
            {"type": "json"},
            {"type": "case", "case": "lower"},
            {"type": "ifeval", "instruction_id": "detectable_format:json_format"},
            {
                "type": "ifeval",
                "instruction_id": "keywords:frequency",
                "kwargs": {"keyword": "b", "frequency": 1, "relation": "at least"},
            },
        ]
    )
    scores = await client.score(
        [{"role": "user", "content": "x\udc00"}], ["a\ud800b", "[" * 100_000, '["a\udfffb"]']
    )
    assert scores == [4 / 6, 0.0, 1.0]
