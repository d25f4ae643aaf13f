"""GPT-2's tokenizer as transformers reads it, rebuilt from the project's verified rank file,
with a chat template that renders the fine-tuning prompt."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from nanogpt_core.atomic_file import write_text_atomically
from nanogpt_core.hf.files import CHAT_TEMPLATE_FILE, HFFormatError, write_json
from nanogpt_core.prompts import END_OF_TEXT
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

# The project's prompt (nanogpt_core.prompts.chat_to_prompt, after a leading <|endoftext|>) in
# Jinja, so that `apply_chat_template` feeds the model exactly the tokens it was fine-tuned on.
# The prompt always ends with the response header, so add_generation_prompt changes nothing.
CHAT_TEMPLATE = r"""{%- if not messages -%}
    {{- raise_exception('messages must not be empty') -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1, context='') -%}
{%- for message in messages -%}
    {%- if message.get('role') == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- if ns.last_user < 0 -%}
    {{- raise_exception('messages must contain at least one user message') -}}
{%- endif -%}
{%- for message in messages[:ns.last_user] -%}
    {%- set role = message.get('role', 'user') -%}
    {%- set content = (message.get('content') or '') | trim -%}
    {%- if content -%}
        {%- set line = content if role == 'system' else (role | capitalize) ~ ': ' ~ content -%}
        {%- set ns.context = ns.context ~ ('\n' if ns.context else '') ~ line -%}
    {%- endif -%}
{%- endfor -%}
{{- '<|endoftext|>### Instruction:\n' ~ ((messages[ns.last_user].get('content') or '') | trim) ~ '\n\n' -}}
{%- if ns.context | trim -%}
    {{- '### Input:\n' ~ (ns.context | trim) ~ '\n\n' -}}
{%- endif -%}
{{- '### Response:\n' -}}
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters, which vocab.json and merges.txt are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def gpt2_ranks() -> dict[bytes, int]:
    """Every ordinary token's bytes and rank (= id), from the Encoding built on the verified rank file."""
    encoding = get_tokenizer()
    return {encoding.decode_single_token_bytes(rank): rank for rank in range(EOT_TOKEN)}


def _bpe_split(ranks: Mapping[bytes, int], token: bytes, below: int) -> list[bytes]:
    """`token` byte-pair encoded with only the merges ranked below `below`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's token -> id map and merges.txt's pairs, in priority order, from tiktoken ranks.

    tiktoken merges whichever adjacent pair forms the lowest-ranked token; a merges list
    gives each token the one pair it is made from. Encoding a token with only the merges
    ranked below it stops exactly one merge short of the token, at that pair.
    """
    to_unicode = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise HFFormatError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((text(parts[0]), text(parts[1])))
    vocab[END_OF_TEXT] = EOT_TOKEN
    return vocab, merges


def write_tokenizer_files(folder: Path, model_max_length: int) -> None:
    """GPT-2's tokenizer (TOKENIZER_FILES) in both the slow (vocab.json, merges.txt) and fast
    (tokenizer.json) forms, built from the verified rank file."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = vocab_and_merges(gpt2_ranks())
    write_json(folder / "vocab.json", vocab, indent=None)
    write_text_atomically(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    tokenizer.save(str(folder / "tokenizer.json"))

    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decoding must give back the text exactly
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(EOT_TOKEN): {"content": END_OF_TEXT, "lstrip": False, "normalized": False,
                                                  "rstrip": False, "single_word": False, "special": True}},
        # Newer transformers read chat_template.jinja first; older ones and other tools read this.
        "chat_template": CHAT_TEMPLATE,
    })
    write_text_atomically(folder / CHAT_TEMPLATE_FILE, CHAT_TEMPLATE)
