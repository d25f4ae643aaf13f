"""Whether a chat model's reply is acceptable: the rule the report card judges replies by.

A reply to a prompt is acceptable when all of these hold (docs/TRAINING.md has the rule with
examples):

1. **It ended.** The model stopped on its own (`<|endoftext|>`) within the token limit; a
   reply cut off by the limit is unfinished.
2. **It is not empty**: it has at least one word (code in a fenced block counts as content).
3. **It does not loop**: no word, and no run of up to four words, repeats three or more times
   back to back ("I am am am", "I am I am I am").
4. **It is English**: outside fenced code, at least half of its words, and at least one, are in
   an English dictionary (pyspellchecker's, about 160,000 words), so subword gibberish fails
   while a name or a typo does not.
5. **It is a reply, not a fragment or an echo**: more than one word, or a single word that is
   not a function word ("I", "the", "and" alone are fragments); and not the prompt repeated.
6. **It responds in kind**: a greeting ("Hi", "Good morning", "How are you?") is answered with
   a greeting or a courtesy ("Hello", "I am doing well", "Thank you"); a question is answered
   with at least one statement, not only with questions; any other prompt takes any reply
   that passes 1-5.
7. **It responds to this prompt**: judged over a set of prompts (`judge_replies`), a reply the
   model gives word for word to three or more different prompts is canned ("Check." to
   everything), not a response, and every one of those is rejected.

The rule is deliberately mechanical: it cannot tell a true answer from a false one, but it
separates a model that converses from one that stutters, which is what the demo must show.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass

GREETING_OPENERS = (
    "hello", "hi", "hey", "hiya", "howdy", "greetings", "good morning", "good afternoon", "good evening",
    "good day", "what's up", "whats up", "sup", "how are you", "how do you do", "how is it going",
    "how's it going", "how are things", "nice to meet you", "pleased to meet you", "yo",
)
# Words that make a reply to a greeting a greeting or a courtesy in return.
GREETING_REPLY_WORDS = frozenset({
    "hello", "hi", "hey", "hiya", "howdy", "greetings", "welcome", "morning", "afternoon", "evening",
    "good", "fine", "well", "great", "ok", "okay", "thanks", "thank", "nice", "pleasure", "pleased", "glad",
    "doing", "much", "same", "bye",
})
QUESTION_STARTERS = frozenset({
    "what", "who", "whom", "whose", "where", "when", "why", "how", "which", "is", "are", "am", "do", "does",
    "did", "can", "could", "will", "would", "should", "shall", "may", "might", "have", "has", "was", "were",
})
# One of these alone is a fragment, not a reply.
FUNCTION_WORDS = frozenset({
    "i", "a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "with", "from", "is",
    "am", "are", "was", "were", "be", "it", "you", "he", "she", "we", "they", "me", "my", "your", "his", "her",
    "its", "our", "their", "this", "that", "these", "those", "as", "if", "so", "than", "then", "not",
})
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
FENCED_CODE = re.compile(r"```.*?(?:```|$)", re.DOTALL)
MAX_REPEATED_RUN = 4  # the longest run of words checked for back-to-back repetition
REPEATS_THAT_LOOP = 3
MIN_ENGLISH_SHARE = 0.5
CANNED_AT = 3  # the same reply to this many different prompts is canned


@dataclass(frozen=True)
class Verdict:
    acceptable: bool
    reason: str  # why not, or "responds in kind"
    prompt_kind: str  # greeting | question | statement


def prompt_kind(prompt: str) -> str:
    """greeting, question or statement: what a reply must respond to."""
    text = " ".join(prompt.lower().split())
    words = WORD.findall(text)
    if any(text == opener or text.startswith(opener + " ") or text.startswith(opener + ",")
           or text.startswith(opener + "!") or text.startswith(opener + "?") or text.startswith(opener + ".")
           for opener in GREETING_OPENERS):
        return "greeting"
    if text.endswith("?") or (words and words[0] in QUESTION_STARTERS):
        return "question"
    return "statement"


def judge_reply(prompt: str, reply: str, *, finished: bool = True) -> Verdict:
    """Whether `reply` is an acceptable answer to `prompt` under the rule above.

    `finished` is whether the model ended the reply itself rather than hitting the token limit.
    """
    kind = prompt_kind(prompt)

    def verdict(reason: str | None) -> Verdict:
        return Verdict(acceptable=reason is None, reason=reason or "responds in kind", prompt_kind=kind)

    if not finished:
        return verdict("unfinished: the reply ran to the token limit")
    had_code = bool(FENCED_CODE.search(reply))
    prose = FENCED_CODE.sub(" ", reply)
    words = [w.lower() for w in WORD.findall(prose)]
    if not words and not had_code:
        return verdict("empty: no words")
    loop = repeated_run(WORD.findall(reply.lower()))
    if loop:
        return verdict(f"loops: {loop!r} repeats {REPEATS_THAT_LOOP} or more times in a row")
    if words:
        known = sum(1 for w in words if is_english_word(w))
        if known == 0 or known / len(words) < MIN_ENGLISH_SHARE:
            return verdict(f"not English: {known} of {len(words)} words are in the dictionary")
    if not had_code and len(words) == 1 and words[0].split("'")[0] in FUNCTION_WORDS:
        return verdict(f"a fragment: {words[0]!r} alone")  # "I's" is no more a reply than "I"
    if _normalized(reply) == _normalized(prompt):
        return verdict("echoes the prompt")
    if kind == "greeting" and not set(words) & GREETING_REPLY_WORDS:
        return verdict("not a greeting in return")
    if kind == "question" and not had_code and not _has_statement(prose):
        return verdict("answers a question with only questions")
    return verdict(None)


def judge_replies(exchanges: list[tuple[str, str, bool]]) -> list[Verdict]:
    """Each (prompt, reply, finished) judged by `judge_reply`, and canned replies (rule 7) rejected."""
    verdicts = [judge_reply(prompt, reply, finished=finished) for prompt, reply, finished in exchanges]
    counts = Counter(_normalized(reply) for _, reply, _ in exchanges)
    judged = []
    for (_, reply, _), verdict in zip(exchanges, verdicts):
        times = counts[_normalized(reply)]
        if verdict.acceptable and times >= CANNED_AT:
            verdict = Verdict(False, f"canned: the same reply to {times} different prompts", verdict.prompt_kind)
        judged.append(verdict)
    return judged


def repeated_run(words: list[str]) -> str | None:
    """The first run of 1..MAX_REPEATED_RUN words that occurs REPEATS_THAT_LOOP times back to back, or None."""
    for size in range(1, MAX_REPEATED_RUN + 1):
        for start in range(len(words) - size * REPEATS_THAT_LOOP + 1):
            run = words[start:start + size]
            if all(words[start + k * size:start + (k + 1) * size] == run for k in range(1, REPEATS_THAT_LOOP)):
                return " ".join(run)
    return None


@functools.lru_cache(maxsize=1)
def _dictionary():
    from spellchecker import SpellChecker

    return SpellChecker(language="en", distance=1)


def is_english_word(word: str) -> bool:
    return word.lower() in _dictionary()


def _has_statement(text: str) -> bool:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if WORD.search(s)]
    return any(not s.endswith("?") for s in sentences)


def _normalized(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))
