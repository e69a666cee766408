"""IFEval constraints: every argument required and validated, so every check is deterministic."""

from __future__ import annotations

import json
import time

import pytest
from ttalign.reward_clients import ifeval_checks
from ttalign.reward_clients.limits import (
    MAX_IFEVAL_COUNT,
    MAX_IFEVAL_KWARGS,
    MAX_IFEVAL_TEXT_CHARS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORDS,
)
from ttalign.reward_clients.rules import InvalidConstraintsError, RuleVerifierReward

from tests.conftest import SHARED_EVAL

USER = [{"role": "user", "content": "Write something."}]
DEV_ROWS = [
    json.loads(line) for line in (SHARED_EVAL / "ifeval_dev.jsonl").read_text().split("\n") if line
]


def ifeval(instruction_id: str, **kwargs: object) -> dict:
    return {"type": "ifeval", "instruction_id": instruction_id, "kwargs": kwargs}


def dev_constraints(row: dict) -> list[dict]:
    return [
        ifeval(instruction_id, **kwargs)
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True)
    ]


def test_every_instruction_of_the_dev_set_validates() -> None:
    ids = set()
    for row in DEV_ROWS:
        bound = RuleVerifierReward().bind(dev_constraints(row))
        ids.update(c.instruction_id for c in bound.constraints)
    assert len(ids) == 25  # all of IFEval's instructions occur in the dev set


def test_published_null_padded_kwargs_are_accepted() -> None:
    padded = ifeval(
        "length_constraints:number_words", num_words=50, relation="at least", keyword=None
    )
    RuleVerifierReward().bind([padded])


def one_of_each_instruction() -> list[dict]:
    seen: dict[str, dict] = {}
    for row in DEV_ROWS:
        for constraint in dev_constraints(row):
            seen.setdefault(constraint["instruction_id"], constraint)
    return [seen[key] for key in sorted(seen)]


CANDIDATES = [
    "die the",  # langdetect, unseeded, answers "af" or "en" at random for this one
    "Hello there. *A highlight* and [placeholder].\n\nSECTION 1 text\n\nP.S. bye, friend",
    '{"answer": "YES"}',
]


@pytest.mark.parametrize("constraint", one_of_each_instruction(), ids=lambda c: c["instruction_id"])
async def test_the_same_candidate_always_gets_the_same_score(constraint: dict) -> None:
    scores = set()
    for _ in range(20):
        client = RuleVerifierReward().bind([constraint])
        scores.add(tuple(await client.score(USER, CANDIDATES)))
    assert len(scores) == 1


async def test_language_detection_is_deterministic() -> None:
    # Unseeded, langdetect calls this English about 11 times in 12 and Afrikaans otherwise.
    verdicts = {
        ifeval_checks.check_instruction("language:response_language", {"language": "en"}, "the die")
        for _ in range(50)
    }
    assert len(verdicts) == 1


def _rejected(constraint: dict) -> InvalidConstraintsError:
    with pytest.raises(InvalidConstraintsError) as caught:
        RuleVerifierReward().bind([constraint])
    return caught.value


@pytest.mark.parametrize(
    ("constraint", "param", "words"),
    [
        (
            ifeval("length_constraints:number_words", relation="at least"),
            "constraints[0].kwargs.num_words",
            "requires 'num_words'",
        ),
        (
            ifeval("keywords:frequency", keyword="cat", relation="at least", frequency=None),
            "constraints[0].kwargs.frequency",
            "random",
        ),
        (
            ifeval("punctuation:no_comma", num_words=3),
            "constraints[0].kwargs.num_words",
            "not an argument",
        ),
        (
            ifeval("length_constraints:number_words", num_words=-1, relation="at least"),
            "constraints[0].kwargs.num_words",
            "greater than or equal",
        ),
        (
            ifeval("length_constraints:number_words", num_words="ten", relation="at least"),
            "constraints[0].kwargs.num_words",
            "integer",
        ),
        (
            ifeval("length_constraints:number_words", num_words=10, relation="more than"),
            "constraints[0].kwargs.relation",
            "less than",
        ),
        (
            ifeval(
                "keywords:letter_frequency", letter="ab", let_frequency=2, let_relation="at least"
            ),
            "constraints[0].kwargs.letter",
            "at most 1 character",
        ),
        (
            ifeval("keywords:existence", keywords=[]),
            "constraints[0].kwargs.keywords",
            "at least 1",
        ),
        (
            ifeval("language:response_language", language="xx"),
            "constraints[0].kwargs.language",
            "language codes",
        ),
        (
            ifeval(
                "length_constraints:nth_paragraph_first_word",
                num_paragraphs=2,
                nth_paragraph=3,
                first_word="so",
            ),
            "constraints[0].kwargs.nth_paragraph",
            "above num_paragraphs",
        ),
        (
            ifeval("keywords:frequency", keyword="(?=cat)", frequency=1, relation="at least"),
            "constraints[0].kwargs.keyword",
            "RE2 cannot compile",
        ),
        (
            ifeval(
                "keywords:forbidden_words", forbidden_words=["ok", "x" * (MAX_KEYWORD_CHARS + 1)]
            ),
            "constraints[0].kwargs.forbidden_words[1]",
            "at most",
        ),
        (
            ifeval("keywords:existence", keywords=[f"k{i}" for i in range(MAX_KEYWORDS + 1)]),
            "constraints[0].kwargs.keywords",
            "at most",
        ),
        (
            ifeval("combination:repeat_prompt", prompt_to_repeat="x" * (MAX_IFEVAL_TEXT_CHARS + 1)),
            "constraints[0].kwargs.prompt_to_repeat",
            "at most",
        ),
        (
            ifeval(
                "length_constraints:number_words",
                num_words=MAX_IFEVAL_COUNT + 1,
                relation="at least",
            ),
            "constraints[0].kwargs.num_words",
            "less than or equal",
        ),
        (
            ifeval("punctuation:no_comma", **{f"k{i}": None for i in range(MAX_IFEVAL_KWARGS + 1)}),
            "constraints[0].kwargs",
            "at most",
        ),
    ],
)
def test_bad_kwargs_are_400s_naming_the_argument(constraint: dict, param: str, words: str) -> None:
    error = _rejected(constraint)
    assert error.param == param
    assert words in str(error)


def test_ifeval_checks_run_in_linear_time() -> None:
    # IFEval's own r"\[.*?\]" takes minutes on this under Python's backtracking re.
    started = time.monotonic()
    assert not ifeval_checks.check_instruction(
        "detectable_content:number_placeholders", {"num_placeholders": 1}, "[" * 65536
    )
    assert not ifeval_checks.check_loose(
        "detectable_content:postscript", {"postscript_marker": "P.S."}, " " * 65536 + "x"
    )
    assert time.monotonic() - started < 2.0


def test_letter_frequency_counts_the_character_asked_for() -> None:
    # IFEval's own data asks for "#" and "!", which its builder swaps for a random letter.
    kwargs = {"letter": "#", "let_frequency": 4, "let_relation": "at least"}
    assert ifeval_checks.check_instruction("keywords:letter_frequency", kwargs, "#a #b #c #d")
    assert not ifeval_checks.check_instruction("keywords:letter_frequency", kwargs, "#a #b #c")


def test_a_json_reply_nested_too_deep_is_not_json() -> None:
    assert not ifeval_checks.check_instruction("detectable_format:json_format", {}, "[" * 100_000)


async def test_a_pattern_that_breaks_inside_ifeval_is_a_400_at_scoring() -> None:
    # \p{Lu} compiles, but IFEval lowercases the marker into \p{lu}, which does not.
    marker = ifeval("detectable_content:postscript", postscript_marker=r"\p{Lu}")
    client = RuleVerifierReward().bind([{"type": "json"}, marker])
    with pytest.raises(InvalidConstraintsError) as caught:
        await client.score(USER, ["P.S. hi"])
    assert caught.value.param == "constraints[1].kwargs"


def test_the_names_ttalign_replaces_in_if_verifiable_still_exist() -> None:
    # In a fresh interpreter: once the checkers load, the replaced names exist whatever the
    # release, so only an unpatched import shows whether a new release dropped one.
    import subprocess
    import sys

    probe = (
        "from ttalign.reward_clients.ifeval_checks import missing_patch_targets as m; print(m())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"


def test_a_release_without_a_replaced_name_is_refused(monkeypatch) -> None:
    from ttalign.reward_clients import ifeval_checks

    monkeypatch.setitem(
        ifeval_checks.PATCHED_NAMES,
        "if_verifiable.ifeval.instructions",
        ("re", "a_name_no_release_has"),
    )
    ifeval_checks._registry.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="a_name_no_release_has"):
            ifeval_checks.preload()
    finally:
        monkeypatch.undo()
        ifeval_checks._registry.cache_clear()
        ifeval_checks.preload()
