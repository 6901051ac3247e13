"""The Gemma chat template: turns of `user` and `model`; a system message is prepended to the first
turn after it (Gemma has no system role); the prompt ends by opening the model's turn."""
from __future__ import annotations

from typing import Mapping, Sequence


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    if not messages:
        raise ValueError("chat: messages is empty")
    system = None
    out = ["<bos>"]
    first = True
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"chat: message {i} must be a dict with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(content, str):
            raise ValueError(f"chat: message {i} content must be a string")
        if role == "system":
            if i != 0:
                raise ValueError("chat: a system message must come first")
            system = content
            continue
        if role == "assistant":
            role = "model"
        if role not in ("user", "model"):
            raise ValueError(f"chat: message {i} has unknown role '{m['role']}' (user, assistant/model, system)")
        prefix = system + "\n\n" if (first and system is not None) else ""
        first = False
        out.append(f"<start_of_turn>{role}\n{prefix}{content.strip()}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)
