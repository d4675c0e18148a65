"""The one chat format of FlashLM: a plain-text template a base model can follow, as Jinja and as a function.

``System: …\\nUser: …\\nAssistant: …\\nUser: …\\nAssistant:``. The server and ``flashlm chat`` render
prompts with `chat_prompt`; an exported tokenizer carries `CHAT_TEMPLATE` as its ``chat_template``, so
``apply_chat_template`` in `transformers` gives the same prompt. Both come from the one Jinja string below.

The template starts with ``bos_token``, as Gemma's and Llama's do: `transformers` tokenizes a rendered chat
with ``add_special_tokens=False``, so the ids of ``apply_chat_template(..., tokenize=True)`` are then exactly
the server's (``<bos>`` + the prompt), with one ``<bos>``. `chat_prompt` renders it with an empty
``bos_token``: the text the server encodes after its ``<bos>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

ROLE_PREFIX = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = f"\n{ROLE_PREFIX['user']}:"  # generation stops when the model starts the next user turn

# One line, so Jinja's trim_blocks / lstrip_blocks (transformers sets both) change nothing.
CHAT_TEMPLATE = (
    "{% set roles = {" + ", ".join(f"'{role}': '{prefix}'" for role, prefix in ROLE_PREFIX.items()) + "} %}"
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in roles %}"
    "{{ raise_exception('chat roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ roles[message['role']] + ': ' + message['content'] | trim }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n" + ROLE_PREFIX["assistant"] + ":' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise ValueError(message)


@lru_cache(maxsize=1)
def _compiled() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True, bos_token: str = "") -> str:
    """`CHAT_TEMPLATE` applied to [{"role", "content"}, ...], as `transformers` applies it."""
    return _compiled().render(messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token)


def chat_prompt(messages: Sequence[dict]) -> str:
    """Render [{"role", "content"}, ...] as "System: …\\nUser: …\\nAssistant: …\\n…User: …\\nAssistant:"
    (contents stripped of surrounding whitespace; no ``<bos>``: the caller's encoder adds it)."""
    return render_chat(messages, add_generation_prompt=True)


__all__ = ["CHAT_STOP", "CHAT_TEMPLATE", "ROLE_PREFIX", "chat_prompt", "render_chat"]
