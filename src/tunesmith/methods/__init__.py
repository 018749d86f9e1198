"""Fine-tuning methods behind one contract (see :mod:`tunesmith.methods.base`).

Importing this package registers every built-in method.
"""

from tunesmith.methods import adapter, full, ia3, lora, partial, prefix, prompt, ptuning  # noqa: F401  (registers the methods)
from tunesmith.methods.base import MANIFEST, METHODS, Method, NotMergeable, count_parameters


def build_method(config) -> Method:
    """The method object for a recipe's ``method`` section."""
    return METHODS.get(config.kind)(config)


__all__ = ["MANIFEST", "METHODS", "Method", "NotMergeable", "build_method", "count_parameters"]
