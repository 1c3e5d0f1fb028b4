"""The chat template: conversations -> token ids plus a per-token loss mask, for fine-tuning and for generation.

Template, with no whitespace added anywhere (so what you see is exactly what the model sees):

    <|bos|> then, per message, <|{role}|> + content + <|end|>;  for generation, a trailing <|assistant|>.

Role markers and `<|end|>` are reserved ids placed by this renderer; message content goes through
`Tokenizer.encode`, which never yields a reserved id, so a user who types "<|assistant|>" gets ordinary text tokens
and cannot forge a turn (the same guarantee nanochat's renderer gives).

The loss mask is True exactly on assistant content and on the `<|end|>` closing an assistant turn: the model learns
to answer and to stop, never to imitate the user or the system prompt. The `<|assistant|>` marker itself is not
trained on because at inference the prompt supplies it.

Message rules (`validate_messages`): a list of {"role", "content"} dicts; roles are system, user, assistant; at most
one system message and only first; content is a string (may be empty). Other keys in a message (e.g. "name") are
ignored by design, so OpenAI-style exports load unchanged. Consecutive turns of one role are allowed. A trailing user
turn after the last assistant turn is allowed but, having no assistant reply, carries no loss.

`CHAT_TEMPLATE_JINJA` is the same template for a Hugging Face `tokenizer_config.json`. Trade-off: Hugging Face
tokenizes the rendered *text*, where a literal "<|assistant|>" inside content does become the control token; the
Python renderer here is the source of truth for training and serving.
"""

from __future__ import annotations

from typing import Any

from gptforge.tokenizer.bpe import BOS, EOS, Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"

CHAT_TEMPLATE_JINJA = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A conversation that breaks the message rules. `reason` is a short stable code used to count skipped
    records (not_a_list, empty, bad_message, unknown_role, bad_content, system_not_first, no_assistant_turn)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_messages(messages: Any, require_assistant: bool = True) -> None:
    """Raise ChatFormatError naming the first problem (with the message index), or return None."""
    if not isinstance(messages, list):
        got = type(messages).__name__
        raise ChatFormatError("not_a_list", f"messages must be a list of {{role, content}} objects, got {got}")
    if not messages:
        raise ChatFormatError("empty", "messages is an empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError("bad_message", f"messages[{i}] must be an object, got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ChatFormatError("bad_message", f"messages[{i}] lacks {missing} (keys: {sorted(m)})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatFormatError(
                "unknown_role", f"messages[{i}] has unknown role {role!r}; valid roles: {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise ChatFormatError(
                "bad_content", f"messages[{i}] ({role}) content must be a string, got {type(content).__name__}"
            )
        if role == "system" and i != 0:
            raise ChatFormatError("system_not_first", f"messages[{i}] is a system message; only messages[0] may be")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise ChatFormatError("no_assistant_turn", f"no assistant turn to learn from (roles: {roles})")


def render_chat(
    tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """ids and loss mask (same length). With add_generation_prompt the ids end with `<|assistant|>` and the mask is
    all False (a prompt, not a training example). Validates structure only; `require_assistant` is the loader's job."""
    validate_messages(messages, require_assistant=False)
    sp = tok.special_ids
    end = sp[END]
    ids, mask = [sp[BOS]], [False]
    for m in messages:
        content = tok.encode(m["content"])
        learn = m["role"] == "assistant" and not add_generation_prompt
        ids.append(sp[f"<|{m['role']}|>"])
        mask.append(False)
        ids += content
        mask += [learn] * len(content)
        ids.append(end)
        mask.append(learn)
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        mask.append(False)
    return ids, mask


def chat_prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt for generating the next assistant turn."""
    return render_chat(tok, messages, add_generation_prompt=True)[0]


def stop_ids(tok: Tokenizer) -> set[int]:
    """Ids that end a generated assistant turn: `<|end|>` (the trained stop) and `<|eos|>` (a base model's)."""
    return {tok.special_ids[END], tok.special_ids[EOS]}
