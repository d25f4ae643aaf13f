"""demo-cloze: a four-way cloze set cut from the demo corpus's held-out documents.

    python -m nanogpt_core.eval.cloze --out FILE    # write it as JSON lines, for --data FILE

The offline `demo` profile has no HellaSwag file to read, so it scores checkpoints on this set
instead. It has HellaSwag's shape, so the same scorer runs on it unchanged, and it is always
reported as "demo-cloze": its numbers are not HellaSwag numbers and must never be compared
with them.

The documents are the demo's frozen held-out set (nanogpt_core.data.held_out: the 25
documents the demo shards held out for validation when it was frozen), which the demo
corpus never yields, so no checkpoint trained on the demo shards has seen them. Each document's text is cut into non-overlapping passages of
CONTEXT_WORDS + ENDING_WORDS words. A passage's first CONTEXT_WORDS words are the context;
the true ending is the passage's next ENDING_WORDS words, and the three others are the
endings of passages from other held-out documents, so they read as natural text but do not
follow. All endings have the same number of words, so length alone gives little away; none
crosses a blank line or runs past MAX_ENDING_TOKENS tokens, so even the micro profile's
64-position model has room for most of the context. A
fixed seed chooses the distractors, the true ending's slot and the order of the examples
(shuffled, so that any prefix, as taken by --limit, is a fair sample of the whole); the set
depends only on that frozen file, and every report carries its hash.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
from collections.abc import Iterable

from nanogpt_core.data.documents import Document
from nanogpt_core.data.held_out import held_out_documents as frozen_held_out_documents
from nanogpt_core.eval.examples import DEMO_CLOZE, EvalData, EvalDataError, Example, examples_sha256, write_examples
from nanogpt_core.tokenizer import get_tokenizer

CONTEXT_WORDS = 24
ENDING_WORDS = 8
# Leaves the context at least 40 of the micro profile's 64 positions.
MAX_ENDING_TOKENS = 24
N_ENDINGS = 4
SEED = 1234
WORD = re.compile(r"\S+")


def held_out_documents() -> list[Document]:
    return list(frozen_held_out_documents())


def cut_passages(text: str, context_words: int = CONTEXT_WORDS, ending_words: int = ENDING_WORDS,
                 max_ending_tokens: int = MAX_ENDING_TOKENS) -> list[tuple[str, str]]:
    """Non-overlapping (context, ending) pairs, in order; the text between words, newlines included, is kept.

    An ending may not cross a blank line (it would join a sentence to the next section's
    heading) nor run past `max_ending_tokens`; where one would, the window moves on a word.
    """
    encoder = get_tokenizer()
    words = list(WORD.finditer(text))
    size = context_words + ending_words
    passages = []
    start = 0
    while start + size <= len(words):
        ctx_last, ending_first, last = words[start + context_words - 1], words[start + context_words], \
            words[start + size - 1]
        ending = text[ending_first.start():last.end()]
        if "\n\n" in text[ctx_last.end():last.end()] or \
                len(encoder.encode_ordinary(" " + ending)) > max_ending_tokens:
            start += 1
            continue
        passages.append((text[words[start].start():ctx_last.end()], ending))
        start += size
    return passages


def build_cloze_examples(documents: Iterable[Document], *, seed: int = SEED) -> list[Example]:
    """Every passage of every document as an example with distractors from other documents."""
    passages = [(doc.id, k, ctx, ending) for doc in documents for k, (ctx, ending) in enumerate(cut_passages(doc.text))]
    if len({doc_id for doc_id, *_ in passages}) < 2:
        raise EvalDataError("the cloze set needs passages from at least two documents")
    rng = random.Random(seed)
    examples = []
    for doc_id, k, ctx, ending in passages:
        distractors: list[str] = []
        while len(distractors) < N_ENDINGS - 1:
            other_id, _, _, other = passages[rng.randrange(len(passages))]
            if other_id != doc_id and other != ending and other not in distractors:
                distractors.append(other)
        label = rng.randrange(N_ENDINGS)
        endings = distractors[:label] + [ending] + distractors[label:]
        examples.append(Example(ctx=ctx, endings=tuple(endings), label=label, id=f"{doc_id}#{k}"))
    rng.shuffle(examples)
    return examples


@functools.lru_cache(maxsize=1)
def demo_cloze_data() -> EvalData:
    """The demo-cloze set (built once per process)."""
    examples = build_cloze_examples(held_out_documents())
    return EvalData(benchmark=DEMO_CLOZE, examples=examples,
                    source="generated from the demo's frozen held-out documents")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.eval.cloze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    args = parser.parse_args(argv)
    data = demo_cloze_data()
    path = write_examples(args.out, data.examples, DEMO_CLOZE)
    print(f"{DEMO_CLOZE}: {len(data.examples)} examples -> {path} (sha256 of examples "
          f"{examples_sha256(data.examples)[:16]})")


if __name__ == "__main__":
    main()
