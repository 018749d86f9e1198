"""Data: reading files, formats, chat templates, tokenisation with loss masks, splits."""

from tunesmith.data.dataset import EncodedData, encode_data, load_examples
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample, encode_example, render_prompt
from tunesmith.data.formats import FORMATS, Example, FormatOptions
from tunesmith.data.templates import TEMPLATES, resolve_template

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "EncodedExample",
    "Example",
    "FormatOptions",
    "EncodedData",
    "encode_example",
    "load_examples",
    "encode_data",
    "render_prompt",
    "resolve_template",
]
