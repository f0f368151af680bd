"""The LLM evaluator's answer parsing and exact-match scoring against hand-written cases."""

import pytest

from bilora_diffusion.llm.evaluate import extract_answer, reference_answer, score


@pytest.mark.parametrize(
    "text,value",
    [
        ("so she has 72 left. #### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### $1,234.50", "1234.5"),
        ("#### -5", "-5"),
        ("#### -$5.", "-5"),
        ("#### 18.00", "18"),
        ("#### 7.\nQuestion: 12", "7"),
        ("The answer is: 42", "42"),
        ("first #### 3 then #### 4", "3"),
        ("12 apples", None),
        ("#### none", None),
    ],
)
def test_answers_are_parsed_robustly(text, value):
    got = extract_answer(text)
    assert (got is None and value is None) or str(got.normalize()) == value


def test_score_counts_exact_matches_by_value():
    result = score(
        ["#### 72", "#### 1,000.0", "it is 5", "#### -3"], ["a #### 72", "#### 1000", "5", "#### 3"]
    )
    assert (result.correct, result.total, result.unparsed) == (2, 4, 1)
    assert result.accuracy == 0.5 and reference_answer("5") == 5
