"""An Ollama ``Modelfile`` beside a GGUF file: the chat template (as a Go template) and the stop token.

Ollama templates are Go ``text/template`` text, not Jinja, so the tokenizer's chat template is
rendered once with marker strings in place of each role's content; the text around each marker
becomes the prefix and suffix of that role in the Go template.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.core.errors import TunesmithError
from tunesmith.export.check import PROBE_CONVERSATIONS

MARKER = "\u2063{role}\u2063"


def role_pieces(tokenizer) -> dict[str, tuple[str, str]]:
    """``{role: (prefix, suffix)}`` for system, user and assistant turns, and ``bos``: the text before all.

    The assistant prefix is the generation prompt.

    Raises:
        TunesmithError: If the template renders roles in a way a prefix/suffix pair cannot express.
    """
    def render(roles, generation_prompt=False):
        messages = [{"role": role, "content": MARKER.format(role=role)} for role in roles]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def split(text, role):
        marker = MARKER.format(role=role)
        return text.index(marker), text.index(marker) + len(marker)

    text = render(("system", "user", "assistant"))
    without, prompt = render(("system", "user")), render(("system", "user"), True)
    generation = prompt[len(without):]
    bos = tokenizer.bos_token if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else ""
    (system_start, system_end), (user_start, user_end) = split(text, "system"), split(text, "user")
    assistant_start, assistant_end = split(text, "assistant")
    assistant_suffix = text[assistant_end:]
    # what lies between an assistant turn and the next user turn is the assistant suffix + the user prefix
    again = render(("user", "assistant", "user"))
    between = again[split(again, "assistant")[1]:again.rindex(MARKER.format(role="user"))]
    user_prefix = between[len(assistant_suffix):]
    # a template may write a default system message when the conversation has none (SmolLM2 does)
    alone = render(("user",))
    before_user = alone[len(bos):split(alone, "user")[0]]
    between_system_user, between_user_assistant = text[system_end:user_start], text[user_end:assistant_start]
    if not (prompt.startswith(without) and between_user_assistant.endswith(generation) and between.startswith(
            assistant_suffix) and between_system_user.endswith(user_prefix) and before_user.endswith(user_prefix)):
        raise TunesmithError("the chat template cannot be written as an Ollama template (its turns are not a fixed "
                             "prefix and suffix per role); export without --ollama")
    return {"bos": (bos, ""), "default_system": (before_user[:len(before_user) - len(user_prefix)], ""),
            "system": (text[len(bos):system_start], between_system_user[:len(between_system_user) - len(user_prefix)]),
            "user": (user_prefix, between_user_assistant[:len(between_user_assistant) - len(generation)]),
            "assistant": (generation, assistant_suffix)}


def render_with_pieces(pieces: dict[str, tuple[str, str]], messages: list[dict[str, str]]) -> str:
    """What the Go template renders for ``messages`` followed by the generation prompt (a mirror, to check it)."""
    turns = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages)
    default = pieces["default_system"][0] if messages[0]["role"] != "system" else ""
    return pieces["bos"][0] + default + turns + pieces["assistant"][0]


def go_template(pieces: dict[str, tuple[str, str]]) -> str:
    """The Go template that renders a conversation as the chat template does."""
    def quoted(text: str) -> str:
        return text.replace("{{", '{{ "{{" }}')

    body = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{quoted(pieces[role][0])}{{{{ .Content }}}}'
        f"{quoted(pieces[role][1])}" for i, role in enumerate(("system", "user", "assistant")))
    default = pieces["default_system"][0]
    default = f'{{{{ if ne (index .Messages 0).Role "system" }}}}{quoted(default)}{{{{ end }}}}' if default else ""
    return (f"{quoted(pieces['bos'][0])}{default}{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}"
            f"{quoted(pieces['assistant'][0])}")


def write_modelfile(folder: Path, gguf_name: str, tokenizer, end_of_turn_id: int) -> Path:
    """Write ``folder/Modelfile`` for ``ollama create NAME -f Modelfile``.

    Raises:
        TunesmithError: If the derived template does not reproduce the chat template on the probe conversations.
    """

    pieces = role_pieces(tokenizer)
    for conversation in PROBE_CONVERSATIONS:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if render_with_pieces(pieces, conversation) != expected:
            raise TunesmithError("the Ollama template derived from the chat template renders the probe conversations "
                                 "differently; export without --ollama")
    template = go_template(pieces)
    stop = tokenizer.convert_ids_to_tokens(end_of_turn_id)
    text = (f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{template}"""\n'
            f'PARAMETER stop "{stop}"\n'
            "PARAMETER temperature 0\n")
    path = folder / "Modelfile"
    path.write_text(text)
    return path
