"""The reply rule the report card judges a chat model by (nanogpt_core.reply_quality)."""

from __future__ import annotations

import pytest

from nanogpt_core.reply_quality import judge_replies, judge_reply, prompt_kind, repeated_run


@pytest.mark.parametrize("prompt, kind", [
    ("Hi", "greeting"), ("Hello!", "greeting"), ("good morning", "greeting"), ("How are you?", "greeting"),
    ("What's up?", "greeting"), ("Who is your father", "question"), ("can you write a filter in Python?", "question"),
    ("Which is better Windows or macOS?", "question"), ("interest rates", "statement"),
    ("You are never nice", "statement"), ("history of the high school", "statement"),
])
def test_prompts_are_greetings_questions_or_statements(prompt: str, kind: str) -> None:
    assert prompt_kind(prompt) == kind


@pytest.mark.parametrize("prompt, reply", [
    ("Hi", "Hello"),
    ("Hello", "Hi, how are you?"),
    ("How are you?", "I am doing well, thank you."),
    ("What's up?", "Not too much."),
    ("Who is your father", "A human."),
    ("Which country produces the most coffee in the world?", "Brazil"),
    ("Are you glad", "Yes."),
    ("can you do async in JavaScript?", "Sure:\n\n```\nasync function f() { await g(); }\n```"),
    ("You are never nice", "I try to be as nice as I can."),
    ("interest rates", "that all depends on the actions of the central bank."),
    ("I PLAY Cricket", "Which position do you like to play?"),
])
def test_replies_that_converse_are_acceptable(prompt: str, reply: str) -> None:
    verdict = judge_reply(prompt, reply)
    assert verdict.acceptable, verdict.reason


@pytest.mark.parametrize("prompt, reply, finished, reason", [
    # what the old demo model answered, greedy
    ("Hello", "I", True, "a fragment: 'i'"),
    ("What is your name?", "I am am am am am am am am", False, "unfinished"),
    ("What is your name?", "I am am am", True, "loops: 'am'"),
    ("Tell me a joke", "I am I am I am a robot.", True, "loops: 'i am'"),
    ("Who is your father", "", True, "empty"),
    ("Who is your father", "  ...  ", True, "empty"),
    ("Who is your father", "xqzt blorf vexu", True, "not English: 0 of 3"),
    ("You are never nice", "I", True, "a fragment: 'i'"),
    ("let me ask you a question", "I's", True, "a fragment: \"i's\""),
    ("You are never nice", "You are never nice.", True, "echoes the prompt"),
    ("Hi", "The printer is not printing.", True, "not a greeting in return"),
    ("Who is your father", "Why do you ask?", True, "answers a question with only questions"),
])
def test_replies_that_do_not_converse_are_rejected_with_the_reason(prompt: str, reply: str, finished: bool,
                                                                   reason: str) -> None:
    verdict = judge_reply(prompt, reply, finished=finished)
    assert not verdict.acceptable
    assert verdict.reason.startswith(reason), verdict.reason


def test_a_loop_is_a_run_of_up_to_four_words_three_times_in_a_row() -> None:
    assert repeated_run("the cat sat the cat sat the cat sat".split()) == "the cat sat"
    assert repeated_run("very very good".split()) is None  # twice is emphasis, not a loop
    assert repeated_run("a b c d e a b c d e a b c d e".split()) is None  # five words: longer than checked


def test_the_same_reply_to_three_different_prompts_is_canned_not_a_response() -> None:
    # what a weakly fine-tuned demo model answered: each reply alone passes the rule
    exchanges = [("Who is your father", "Try.", True), ("interest rates", "Try.", True),
                 ("How can I use your product?", "Try.", True), ("You are never nice", "Check.", True),
                 ("who is spider man", "Check.", True), ("we are on the same wavelength", "Try the check.", True)]
    verdicts = judge_replies(exchanges)
    assert [v.acceptable for v in verdicts] == [False, False, False, True, True, True]
    assert verdicts[0].reason == "canned: the same reply to 3 different prompts"
