"""Replacing a module's ``forward`` for a while, and telling whether a forward is another's instruction for instruction.

The training levers (fused RMSNorm, fused SiLU·up, LoRA's ``addmm`` update) and per-row LoRA in serving all
swap their own forward into existing modules of a transformers/peft model, only where the module's own forward
is exactly the one they reproduce, and put it back afterwards. The new forward is an instance attribute that
shadows the class's; taking it away (rather than assigning the old one back) leaves the module as it was.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable

CODE_PARTS = ("co_code", "co_consts", "co_names", "co_varnames")  # what makes two functions the same instructions


def swap_forwards(modules: Iterable[Any], forward_for: Callable[[Any], Callable]) -> Callable[[], None]:
    """Give each of ``modules`` the forward ``forward_for(module)``; return what gives them their own back."""
    swapped = list(modules)
    for module in swapped:
        module.forward = forward_for(module)  # an instance attribute, removed by the returned function

    def restore() -> None:
        for module in swapped:
            module.__dict__.pop("forward", None)

    return restore


def bound(function: Callable) -> Callable[[Any], Callable]:
    """``swap_forwards``' ``forward_for`` that gives every module ``function`` bound to it (``function(module, ...)``).

    A bound method of one shared function, not a ``functools.partial`` per module: torch.compile guards on the
    forward it finds, so with one function it compiles a decoder layer once, not once per layer up to dynamo's
    recompile limit (SmolLM2 compiled 8 of its 30 layers that way and ran the rest eagerly)."""
    return lambda module: types.MethodType(function, module)


def same_code(function: Any, reference: Callable) -> bool:
    """Whether ``function`` runs ``reference``'s bytecode with its constants and names (a subclass that only
    renames the class passes; one that changes a line, or a forward that is not plain Python, does not)."""
    mine, theirs = getattr(function, "__code__", None), reference.__code__
    return mine is not None and all(getattr(mine, part) == getattr(theirs, part) for part in CODE_PARTS)
