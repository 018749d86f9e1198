"""Tool-calling conversations and reasoning traces: how they render and which tokens are trained."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import ModelSection
from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import IGNORE_INDEX, encode_example
from tunesmith.data.encoded import load_examples
from tunesmith.data.formats import Example
from tunesmith.data.templates import resolve_template
from tunesmith.models.loading import load_tokenizer


@pytest.fixture
def tokenizer(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama, ModelSection(name=tiny_llama))
    resolve_template(tokenizer, "chatml")
    return tokenizer


def trained_and_context(tokenizer, encoded) -> tuple[str, str]:
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    context = [t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX]
    return tokenizer.decode(trained), tokenizer.decode(context)


# Glaive's tool-calling data as LLaMA-Factory ships it (glaive_toolcall_en_demo.json, 300 records), written here
# with every quirk of the real file: a JSON array of ShareGPT records; ``tools`` a JSON *string* of bare
# definitions ({name, description, parameters}, no {"type": "function"} wrapper), "[]" in 109 of the 300 records;
# a ``function_call`` turn whose value is a JSON string {name, arguments} with ``arguments`` an object (in all
# 211 calls); an ``observation`` turn holding the tool's JSON answer; human first, gpt last, in every record.
GLAIVE_RECORDS = [
    {"conversations": [
        {"from": "human", "value": "Hi, I have some ingredients and I want to cook something. Can you help me find a recipe?"},
        {"from": "gpt", "value": "Of course! I can help you with that. Please tell me what ingredients you have."},
        {"from": "human", "value": "I have chicken, bell peppers, and rice."},
        {"from": "function_call", "value": json.dumps(
            {"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}})},
        {"from": "observation", "value": json.dumps(
            {"recipes": [{"name": "Chicken and Bell Pepper Stir Fry", "ingredients": ["chicken", "bell peppers", "rice"]}]})},
        {"from": "gpt", "value": "I found a recipe for you: Chicken and Bell Pepper Stir Fry."},
        {"from": "human", "value": "Can you order the ingredients for me?"},
        {"from": "gpt", "value": "I'm sorry, but I can't order ingredients."}],
     "tools": json.dumps([{"name": "search_recipes", "description": "Search for recipes based on ingredients",
                           "parameters": {"type": "object", "properties": {"ingredients": {
                               "type": "array", "items": {"type": "string"},
                               "description": "The ingredients to search for"}}, "required": ["ingredients"]}}])},
    {"conversations": [{"from": "human", "value": "Tell me a joke."},
                       {"from": "gpt", "value": "Why did the tomato blush? It saw the salad dressing."}],
     "tools": "[]"},
]


def test_glaive_tool_calls_are_trained_definitions_and_results_are_context(tokenizer, tmp_path):
    path = tmp_path / "glaive_toolcall.json"
    path.write_text(json.dumps(GLAIVE_RECORDS, indent=1))
    examples, data_format = load_examples(str(path))
    example = examples[0]
    assert data_format == "sharegpt" and example.tools[0]["function"]["name"] == "search_recipes"
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user", "assistant", "tool", "assistant",
                                                     "user", "assistant"]
    assert example.messages[3]["tool_calls"][0]["function"]["arguments"] == {
        "ingredients": ["chicken", "bell peppers", "rice"]}
    assert examples[1].tools == () and len(examples[1].messages) == 2  # "[]": a plain conversation
    trained, context = trained_and_context(tokenizer, encode_example(example, tokenizer, 4096))
    squash = lambda text: text.replace(" ", "")  # noqa: E731  (the tiny vocabulary spells words in pieces)
    assert squash('<tool_call>\n{"name": "search_recipes"') in squash(trained)  # the call is learnt
    assert squash("Of course! I can help you with that.") in squash(trained)
    assert squash('"description": "Search for recipes based on ingredients"') in squash(context)  # definitions
    assert squash("<tool_response>") in squash(context) and squash("<tool_response>") not in squash(trained)
    assert squash("Chicken and Bell Pepper Stir Fry") in squash(context)  # the tool's answer is context...
    assert squash("I found a recipe for you") in squash(trained)  # ...the reply built on it is learnt
    plain_trained, plain_context = trained_and_context(tokenizer, encode_example(examples[1], tokenizer, 512))
    assert "<tools>" not in plain_context and squash("saw the salad dressing") in squash(plain_trained)


TOOL_TEMPLATE = (  # a template that renders tools itself, as Qwen's and Llama 3's do
    "{% if tools %}{{ 'TOOLS:' }}{% for tool in tools %}{{ tool['function']['name'] + ';' }}{% endfor %}"
    "{{ '\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}"
    "{{ 'A: CALL ' + m['tool_calls'][0]['function']['name'] + '\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'tool' %}{{ 'RESULT: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'U: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def test_a_template_that_renders_tools_gets_them_as_they_are(tokenizer):
    tokenizer.chat_template = TOOL_TEMPLATE
    example = Example(messages=({"role": "user", "content": "Weather?"},
                                {"role": "assistant", "content": "",
                                 "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {}}}]},
                                {"role": "tool", "content": "sunny"},
                                {"role": "assistant", "content": "It is sunny."}),
                      tools=({"type": "function", "function": {"name": "weather"}},))
    encoded = encode_example(example, tokenizer, 512)
    trained, context = trained_and_context(tokenizer, encoded)
    assert tokenizer.decode(encoded.input_ids).startswith("TOOLS:weather;")  # the template's own rendering
    assert "CALL weather" in trained and "sunny." in trained
    assert "RESULT: sunny" in context and "TOOLS" in context


def test_a_malformed_function_call_names_the_row(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "oops"}]}]')
    with pytest.raises(TunesmithError, match=r"record 1, conversations\[1\]: a function_call turn must be JSON"):
        load_examples(str(path))


THINKING = Example(messages=({"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "<think>two and two</think> It is 4."}))


@pytest.mark.parametrize("mode, in_text, trained_has_trace", [("keep", True, True), ("strip", False, False),
                                                              ("mask", True, False)])
def test_reasoning_traces_kept_stripped_or_masked(tokenizer, mode, in_text, trained_has_trace):
    encoded = encode_example(THINKING, tokenizer, 512, reasoning=mode)
    trained, _ = trained_and_context(tokenizer, encoded)
    assert ("two and two" in tokenizer.decode(encoded.input_ids)) == in_text
    assert ("two and two" in trained) == trained_has_trace
    assert "It is 4." in trained and "<|im_end|>" in trained  # the answer and its end marker always train
