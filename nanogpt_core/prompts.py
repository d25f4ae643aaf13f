"""The one instruction prompt template, shared by fine-tuning and by the server's chat endpoint.

Alpaca-style:

    ### Instruction:
    {instruction}

    ### Input:            <- only when there is context
    {context}

    ### Response:
    {response}<|endoftext|>

Fed to the model as `prompt_token_ids(prompt)`: a leading `<|endoftext|>`, then the prompt.
Training masks everything up to and including "### Response:\\n" out of the loss; the model
learns to write the response and to end it with `<|endoftext|>`. The server renders a chat
with the same function, so what the model sees at inference is exactly what it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Mapping

from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

INSTRUCTION_HEADER = "### Instruction:\n"
INPUT_HEADER = "### Input:\n"
RESPONSE_HEADER = "### Response:\n"
END_OF_TEXT = "<|endoftext|>"


def build_prompt(instruction: str, context: str = "") -> str:
    """The prompt up to and including the response header; the response follows directly."""
    prompt = INSTRUCTION_HEADER + instruction.strip() + "\n\n"
    if context.strip():
        prompt += INPUT_HEADER + context.strip() + "\n\n"
    return prompt + RESPONSE_HEADER


def prompt_token_ids(prompt: str) -> list[int]:
    """The tokens a prompt is fed to the model as, in training and at inference alike.

    `<|endoftext|>` comes first, as before every pretraining document, so the model sees the
    start of a fresh text; the prompt is encoded on its own, so training and serving agree
    token for token on where the response begins.
    """
    return [EOT_TOKEN] + get_tokenizer().encode_ordinary(prompt)


def chat_to_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """Render an OpenAI-style chat as one instruction prompt.

    The template is single-turn, as the instruction data is: the last user message is the
    instruction, and any system message and earlier turns become the input context, in order.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("messages must contain at least one user message")
    return build_prompt(messages[last_user].get("content") or "", render_history(messages[:last_user]))


def render_history(messages: Sequence[Mapping[str, str]]) -> str:
    """Earlier turns as the input context: one "Role: text" line per turn, system text as is.

    Instruction data with several turns renders its history with this too, so a multi-turn
    training example reads exactly like the same conversation sent to the chat endpoint.
    """
    lines = []
    for message in messages:
        role, content = message.get("role", "user"), (message.get("content") or "").strip()
        if content:
            lines.append(content if role == "system" else f"{role.capitalize()}: {content}")
    return "\n".join(lines)
