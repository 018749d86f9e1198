"""Chat templates: the tokenizer's own when it has one, otherwise a named built-in.

The template chosen for training is stored on the tokenizer (``tokenizer.chat_template``) and saved
with the result, so generation, chat and evaluation render prompts exactly as training did.
"""

from __future__ import annotations

from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry

TEMPLATES: Registry[str] = Registry("chat template")

# ChatML, as used by SmolLM2, Qwen and others.
TEMPLATES.register("chatml")(
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Works with any tokenizer: plain-text role markers, and the tokenizer's own EOS ends each
# assistant turn so generation stops there even when the vocabulary has no special chat tokens.
TEMPLATES.register("simple")(
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'User: ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# The Alpaca prompt layout, one instruction-response pair per turn.
TEMPLATES.register("alpaca")(
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

FALLBACK_TEMPLATE = "simple"


def resolve_template(tokenizer, name: str) -> str:
    """Set and return the chat template the run uses.

    Args:
        tokenizer: A Hugging Face tokenizer; its ``chat_template`` is set to the result.
        name: ``auto`` (the tokenizer's own, else the ``simple`` built-in) or a built-in name.

    Returns:
        The name of the template in use (``tokenizer`` for the tokenizer's own).
    """
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        name = FALLBACK_TEMPLATE
    if name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise TunesmithError("data.template is 'tokenizer' but this tokenizer has no chat template")
        return name
    tokenizer.chat_template = TEMPLATES.get(name)
    return name
