"""Tool-calling conversations: tool definitions, the assistant's calls and the tools' answers.

A conversation holds them in Hugging Face's chat layout: ``tools`` (JSON-schema function
definitions), assistant turns with ``tool_calls`` and ``tool`` turns with the results. A chat
template that renders tools itself (it reads ``tools`` and ``tool_calls``) gets them as they are,
so training sees exactly what the model's own template writes. Other templates (SmolLM2's, the
built-in ones) get the Hermes/Qwen2.5 text rendering: the tools listed in the system turn inside
``<tools>``, each call as ``<tool_call>{json}</tool_call>`` in the assistant turn, each result as a
user turn inside ``<tool_response>``. Either way the calls are assistant tokens (trained) and the
definitions and results are context (masked).
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
                  "</tools>\n\nFor each function call, return a json object with function name and arguments "
                  "within <tool_call></tool_call> XML tags.")


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes ``tools`` and ``tool_calls`` itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template and "tool_calls" in template


def has_tool_turns(messages) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def for_template(tokenizer, messages: list[dict[str, Any]], tools: tuple[dict, ...]) -> tuple[list[dict], dict]:
    """The messages and ``apply_chat_template`` keyword arguments that render ``tools`` with this template."""
    if not tools and not has_tool_turns(messages):
        return list(messages), {}
    if renders_tools(tokenizer):
        return list(messages), {"tools": list(tools)} if tools else {}
    return as_text(messages, tools), {}


def as_text(messages: list[dict[str, Any]], tools: tuple[dict, ...]) -> list[dict[str, str]]:
    """The Hermes/Qwen2.5 text rendering of a tool conversation, for templates that know no tools."""
    rendered: list[dict[str, str]] = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps(call.get('function', call), ensure_ascii=False)}\n"
                              "</tool_call>" for call in message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message.get("content") else calls
            rendered.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    if tools:
        listing = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{listing}"}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered


def parse_tools(value: Any, where: str) -> tuple[dict, ...]:
    """A record's ``tools``: a JSON list (or its text) of function definitions, each wrapped as HF's chat layout.

    Raises:
        ValueError: If it is neither a list nor JSON text of a list (the caller names the record).
    """
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    if not isinstance(value, list):
        raise ValueError(f"{where}: field 'tools' must be a list of function definitions (or its JSON text)")
    return tuple(tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in value)


def parse_call(value: str, where: str) -> dict:
    """A ShareGPT ``function_call`` turn (``{"name": ..., "arguments": ...}``) as an HF tool call."""
    call = json.loads(value)
    if not isinstance(call, dict) or "name" not in call:
        raise ValueError(f"{where}: a function_call turn must be a JSON object with a 'name'")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}
