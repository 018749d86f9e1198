"""Run llama.cpp's ``convert_hf_to_gguf.py`` (installed by :mod:`tunesmith.export.convert`) in its own process.

Usage: ``python gguf_convert_runner.py CONVERTER_DIR PRE_TOKENIZER -- <convert_hf_to_gguf.py arguments>``.

The converter names a byte-level pre-tokenizer by hashing how the tokenizer splits a probe text, so
it knows the published vocabularies only; for any other (a tokenizer trained for a small model) it
stops with "BPE pre-tokenizer was not recognized". There, and only there, this runner answers with
``PRE_TOKENIZER``, the name tunesmith reads from the tokenizer's own pre-tokenizer description
(``-`` when it has none). Some families (Gemma) read the vocabulary only from sentencepiece's
``tokenizer.model``, which a tokenizer saved by transformers 5 need not include; without that file
the runner reads ``tokenizer.json`` as the converter does for Llama (sentencepiece-style when it
falls back to bytes, else byte-level). llama.cpp runs a Gemma 3 file with five sliding-window layers to
each full one unless the file lists its layers (``gemma3.attention.sliding_window_pattern``, which
llama.cpp reads), and the converter does not write that list for Gemma 3 (it does for Gemma 3n): the
runner adds it from the config's ``layer_types``, so a model whose layers differ (any other count or
order) runs in llama.cpp as in transformers. Everything else is the converter's own code, from its own ``gguf-py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    converter, pre_tokenizer, separator, *arguments = sys.argv[1:]
    assert separator == "--"
    converter = Path(converter)
    sys.path[:0] = [str(converter / "gguf-py"), str(converter)]
    from conversion.base import TextModel

    recognised = TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:
            if pre_tokenizer == "-":
                raise
            return pre_tokenizer

    import conversion
    import gguf

    def model_class(name: str, mmproj: bool = False):
        found = known_class(name, mmproj)
        if mmproj:
            return found
        overrides = {"set_vocab": vocab_from_tokenizer_json, "model_arch": found.model_arch}
        if found.model_arch == gguf.MODEL_ARCH.GEMMA3:
            overrides["set_gguf_parameters"] = parameters_with_layer_pattern
        return type(found.__name__, (found,), overrides)

    def parameters_with_layer_pattern(self) -> None:
        super(type(self), self).set_gguf_parameters()
        layer_types = self.hparams.get("layer_types")
        if layer_types and self.hparams.get("sliding_window"):
            self.gguf_writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])

    def vocab_from_tokenizer_json(self) -> None:
        try:
            return super(type(self), self).set_vocab()
        except (FileNotFoundError, ValueError):  # "tokenizer.model" is missing (checked before anything is written)
            if (self.dir_model / "tokenizer.model").is_file() or not (self.dir_model / "tokenizer.json").is_file():
                raise
        spec = json.loads((self.dir_model / "tokenizer.json").read_text(encoding="utf-8"))
        return self._set_vocab_llama_hf() if spec["model"].get("byte_fallback") else self._set_vocab_gpt2()

    # scoped: this process runs one conversion and exits
    known_class = conversion.get_model_class
    conversion.get_model_class = model_class
    TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), *arguments]
    import convert_hf_to_gguf

    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
