"""Models as the plain callables that data augmentation takes (:mod:`tunesmith.data.prepare.augment`).

Augmentation itself only knows a :data:`~tunesmith.data.prepare.augment.Translator` or
:data:`~tunesmith.data.prepare.augment.Rewriter`; these build one from a causal LM (prompted through
its chat template, as :func:`tunesmith.inference.generate` does) or a seq2seq model. They sit above
both ``data`` and ``inference`` so neither imports the other's upper floor.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.core.errors import TunesmithError
from tunesmith.data.prepare.augment import Rewriter, Translator
from tunesmith.inference.generate import generate, load_for_inference
from tunesmith.models import resolve_model_path

TRANSLATE_PROMPT = "Translate the following text from {source} to {target}. Answer with the translation only.\n\n{text}"
PARAPHRASE_PROMPT = "Paraphrase the following text, keeping its meaning. Answer with the paraphrase only.\n\n{text}"


def causal_lm_translator(model, tokenizer, max_new_tokens: int = 256, batch_size: int = 8) -> Translator:
    """A translator that prompts an instruction-following causal LM (greedy decoding)."""
    def translate(texts: list[str], source: str, target: str) -> list[str]:
        conversations = [[{"role": "user", "content": TRANSLATE_PROMPT.format(source=source, target=target, text=t)}]
                         for t in texts]
        return generate(model, tokenizer, conversations, max_new_tokens, batch_size=batch_size)

    return translate


def causal_lm_paraphraser(model, tokenizer, max_new_tokens: int = 256, batch_size: int = 8,
                          temperature: float = 0.0) -> Rewriter:
    """A rewriter that prompts an instruction-following causal LM to paraphrase."""
    def paraphrase(texts: list[str]) -> list[str]:
        conversations = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(text=t)}] for t in texts]
        return generate(model, tokenizer, conversations, max_new_tokens, temperature, batch_size)

    return paraphrase


def seq2seq_rewriter(model, tokenizer, max_new_tokens: int = 256, batch_size: int = 8, prefix: str = "") -> Rewriter:
    """A rewriter from a seq2seq model (a one-direction translation model such as Marian, or a
    paraphraser); ``prefix`` is prepended to each input (``paraphrase: `` for T5-style models)."""
    import torch

    device = next(model.parameters()).device

    @torch.no_grad()
    def rewrite(texts: list[str]) -> list[str]:
        outputs: list[str] = []
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer([prefix + t for t in texts[start : start + batch_size]], return_tensors="pt",
                               padding=True, truncation=True).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
            outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        return outputs

    return rewrite


def load_rewrite_model(name: str, cache: Path, device: str = "cpu", trust_remote_code: bool = False):
    """``(kind, model, tokenizer)``: kind is ``seq2seq`` for encoder-decoder models, else ``causal``.

    Raises:
        TunesmithError: If the model cannot be found or loaded.
    """
    from transformers import AutoConfig

    path = resolve_model_path(name, cache)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise TunesmithError(f"could not read the configuration of model '{name}': {str(error).splitlines()[0]}") from None
    if getattr(config, "is_encoder_decoder", False):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=trust_remote_code).to(device).eval()
        return "seq2seq", model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model, tokenizer = load_for_inference(name, device=device, trust_remote_code=trust_remote_code)
    return "causal", model, tokenizer
