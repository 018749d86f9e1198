"""Per-row LoRA: a batch whose rows use different adapters of one base, in two products per layer.

peft's mixed batch (``model(..., adapter_names=[one per row])``) loops, in every adapted layer, over the
adapters present: it gathers each adapter's rows, runs that adapter's A and B on them and adds the result
back into those rows (index, two products, scale, cast, index-add per adapter per layer). Serving systems
(punica/S-LoRA's BGMV kernel, LoRAX, vLLM's multi-LoRA) instead run one base product for all rows and give
each row its own A and B. On a CPU, with the few adapters a batch holds, the cheapest form of that is two
plain products over the present adapters' matrices side by side::

    down = x · [A_1; A_2; ...]ᵀ        (rows, tokens, R)  R: the present adapters' ranks summed
    down = down * keep                  keep (rows, R): a row's own adapter's columns times its scaling, others 0
    out  = base(x) + down · [B_1, B_2, ...]ᵀ

Layers that read the same input (q/k/v of one attention, gate/up of one MLP: siblings of one parent with the
same input width) run their ``down`` products as one: the first sibling called multiplies the input by all
their A matrices side by side and scales it once, the others take their columns of that result while the same
input tensor (object and version) comes in. ``B`` is kept transposed and contiguous (the form the product
reads). A 32-row bfloat16 decode step of SmolLM2 with two adapters ran 4 such ``down`` products and 4 scalings
per decoder layer instead of 7 and 7 (benchmarks/RESULTS.md, session 10).

A batch whose rows all use one adapter (a lone adapter request, the commonest case) needs no ``keep``: where
the adapter's scalings are powers of two (LoRA's usual alpha / r), ``down`` is one product with the A matrices
already scaled, bit for bit ``(x · Aᵀ) · s`` (a scaling by 2^k is exact), so such a row gets the bits it gets
among other adapters' rows. The update is added in place into the base product's fresh result (``addmm_``: an
``addmm`` copies its input first). Per decoder layer a lone adapter row then runs 4 + 7 small products, no
scaling and no copy (before session 11: 4 products, 4 scalings, 7 ``addmm`` each with its copy). Merging the
adapter into the base weights while it is alone in flight would cost nothing per step but gives other bits
(``W + s·B·A`` rounds differently) than the same request beside other adapters' rows: not done.

A row's update is its own adapter's (the other columns are multiplied by exact zeros), a base row's is
zero; the sum equals peft's to float rounding (tests/test_lora_rows.py). The extra work is
``R * (in + out)`` per token, against ``in * out`` for the base product: a handful of adapters of rank 8–16
stays a few percent of the layer. (With dozens of adapters per batch a gather of each row's own A and B,
BGMV's form, would do less work; not built: a batch of 32 rows on one base rarely holds more than a few.)

What this handles: peft's plain ``Linear`` LoRA layers (an ``nn.Linear`` base, no DoRA or other variant,
no LoRA bias), any ranks and scalings, adapters that target different modules (a layer without a row's
adapter gives that row no update, as peft does). What keeps peft's own mixed-batch forward (the caller
asks :meth:`RowLora.supports`): DoRA and the other LoRA variants (aLoRA, ...), a LoRA bias, LoRA on an
embedding or convolution, ``modules_to_save`` and trainable tokens; and, per call, a merged layer or a
layer in training mode (dropout), which :func:`_rows_forward` hands to peft with ``adapter_names``.

The forward is swapped in on the adapted layers for one model call only (:meth:`RowLora.rows`, as
:mod:`tunesmith.methods.lora_addmm` does for one run): outside it the model is peft's, untouched.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.core.swaps import swap_forwards

BASE_ROW = "__base__"  # peft's name for "no adapter" in a mixed batch
_KEPT_STACKS = 8  # combinations of present adapters whose side-by-side matrices are kept


@dataclass(eq=False)
class _Group:
    """The ``down`` matrices of sibling layers that read one input (q/k/v, gate/up), stacked: one product for all."""

    down: torch.Tensor  # (sum of the members' R, in)
    owners: tuple[tuple[str, int, float], ...]  # the members' owners one after another (keep's columns)
    scaled: Optional[torch.Tensor] = None  # ``down`` with each row times its owner's scaling (see _scaled)


@dataclass(eq=False)
class _Stack:
    """One layer's present adapters side by side, and which adapter owns each column of ``down``."""

    down: torch.Tensor  # (R, in): the A matrices stacked
    up: torch.Tensor  # (R, out): the B matrices side by side, transposed, contiguous (the product's right side)
    owners: tuple[tuple[str, int, float], ...]  # (adapter, rank, scaling) in column order
    scaled: Optional[torch.Tensor] = None  # ``down`` with each row times its owner's scaling (see _scaled)
    group: Optional[_Group] = None  # siblings sharing this layer's input (None: it has none)
    columns: Optional[slice] = None  # this layer's columns of the group's ``down``


def _plain(layer: nn.Module, adapter: str) -> bool:
    """Whether ``adapter`` on peft's LoRA ``Linear`` ``layer`` is a plain product pair (no variant, no bias)."""
    return (adapter not in layer.lora_variant and not layer.use_dora.get(adapter, False)
            and layer.lora_B[adapter].bias is None)


class RowLora:
    """The per-row LoRA of one peft model (see the module's text); build once, use per call.

    Args:
        model: A peft model holding LoRA adapters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._walked_for: Optional[tuple] = None  # the adapter names loaded when the layers were listed
        self._layers: list[nn.Module] = []  # peft's LoRA Linear layers
        self._unsupported: set[str] = set()  # adapters only peft's mixed forward can serve
        self._stacks: dict[tuple, dict[int, Optional[_Stack]]] = {}  # present adapters + weight versions -> per layer
        self._siblings: dict[int, tuple] = {}  # layer id -> (parent's name, input width): layers that may share input
        self._weights: dict[str, list[torch.Tensor]] = {}  # adapter -> its A and B weights in every layer
        self._plan: Optional[tuple] = None  # during a call: (rows' adapters, {owners: keep (rows, R)})
        self._last_down: Optional[tuple] = None  # during a call: (group, input, its version, scaled down (rows, t, R))
        self._one_adapter = False  # during a call: every row uses one adapter (no base row)

    def supports(self, adapters: list[Optional[str]]) -> bool:
        """Whether rows with these adapters (None or ``"__base__"``: the base) can take the per-row path."""
        self._walk()
        return not self._unsupported.intersection(adapters)

    @contextlib.contextmanager
    def rows(self, adapters: list[Optional[str]]):
        """For one model call whose batch row i uses ``adapters[i]``: every LoRA layer adds each row's own update.

        Raises:
            ValueError: If :meth:`supports` says no for these adapters.
        """
        if not self.supports(adapters):
            raise ValueError(f"adapters {sorted(self._unsupported.intersection(adapters))} need peft's mixed-batch forward")
        names = [adapter or BASE_ROW for adapter in adapters]
        stacks = self._stacks_for(sorted(set(names) - {BASE_ROW}))
        self._plan = (names, {})
        self._one_adapter = len(set(names)) == 1 and names[0] != BASE_ROW
        restore = swap_forwards(self._layers, lambda layer: functools.partial(_rows_forward, layer, self,
                                                                               stacks.get(id(layer))))
        try:
            yield
        finally:
            restore()
            self._plan, self._last_down, self._one_adapter = None, None, False

    def down(self, stack: _Stack, x: torch.Tensor) -> torch.Tensor:
        """(rows, tokens, R): ``x`` times the layer's A matrices, each row's columns scaled by :meth:`keep`; from its
        group's product when a sibling already ran it on this very input."""
        group = stack.group
        if group is None:
            return self._scaled_down(stack, x)
        found = self._last_down  # one kept: siblings are called one after another, and a prefill's inputs are large
        if found is None or found[0] is not group or found[1] is not x or found[2] != x._version:
            found = self._last_down = (group, x, x._version, self._scaled_down(group, x))
        return found[3][..., stack.columns]

    def _scaled_down(self, stack, x: torch.Tensor) -> torch.Tensor:
        """(rows, tokens, R) of a _Stack or _Group: when every row uses one adapter and its scalings are powers of two,
        one product with the scaled A matrices (the same bits: scaling by 2^k is exact); else the product times
        :meth:`keep` (each row's own columns scaled, the others zeroed)."""
        if self._one_adapter and stack.scaled is not None:
            return F.linear(x.to(stack.scaled.dtype), stack.scaled)
        down = F.linear(x.to(stack.down.dtype), stack.down)
        return down.mul_(self.keep(stack, down)[:, None, :])

    def keep(self, stack: _Stack, like: torch.Tensor) -> torch.Tensor:
        """(rows, R): column j of row i is its adapter's scaling where that adapter owns column j, else 0."""
        names, made = self._plan
        found = made.get(stack.owners)  # stack: a _Stack or a _Group
        if found is None:
            columns = []
            for adapter, rank, scaling in stack.owners:
                columns += [[scaling if name == adapter else 0.0 for name in names]] * rank
            found = made[stack.owners] = torch.tensor(columns, dtype=like.dtype, device=like.device).t()
        return found

    def _walk(self) -> None:
        """List the LoRA layers and the adapters peft must serve, again whenever the loaded adapters change."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        loaded = tuple(getattr(self.model, "peft_config", {}))
        if loaded == self._walked_for:
            return
        self._layers, self._unsupported, self._stacks, self._siblings = [], set(), {}, {}
        self._weights = {}
        for name, module in self.model.named_modules():
            if type(module) is LoraLinear and type(module.base_layer) is nn.Linear:
                self._layers.append(module)
                for adapter in module.lora_A:
                    self._weights.setdefault(adapter, []).extend(
                        (module.lora_A[adapter].weight, module.lora_B[adapter].weight))
                self._siblings[id(module)] = (name.rpartition(".")[0], module.base_layer.in_features)
                self._unsupported.update(adapter for adapter in module.lora_A if not _plain(module, adapter))
            elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                self._unsupported.update(loaded)  # an embedding/conv LoRA, modules_to_save, trainable tokens
        self._walked_for = loaded

    def _stacks_for(self, present: list[str]) -> dict[int, Optional[_Stack]]:
        """Per layer (by id) the present adapters side by side (None: the layer holds none of them), kept per
        combination and rebuilt when an adapter's weights change (their version counters)."""
        # read every step: over the weights listed once (through peft's module dicts it took ~1.4 ms a step, busy)
        versions = sum(weight._version for name in present for weight in self._weights.get(name, ()))
        key = (tuple(present), versions)
        if key not in self._stacks:
            if len(self._stacks) >= _KEPT_STACKS:
                self._stacks.clear()
            stacks = {id(layer): _stack(layer, present) for layer in self._layers}
            _group(stacks, self._siblings)
            self._stacks[key] = stacks
        return self._stacks[key]


def _group(stacks: dict[int, Optional[_Stack]], siblings: dict[int, tuple]) -> None:
    """Give the stacks of layers with one parent and input width a shared :class:`_Group` (in place).

    Siblings of one width need not read one input (an attention's ``o_proj`` often has the width of its
    ``q_proj``): :meth:`RowLora.down` checks that the input is the same tensor before reusing a product."""
    members: dict[tuple, list[_Stack]] = {}
    for layer_id, stack in stacks.items():
        if stack is not None:
            members.setdefault((siblings[layer_id], stack.down.dtype), []).append(stack)
    for group_stacks in members.values():
        if len(group_stacks) < 2:
            continue
        owners = tuple(owner for stack in group_stacks for owner in stack.owners)
        down = torch.cat([stack.down for stack in group_stacks])
        group = _Group(down, owners, _scaled(down, owners))
        start = 0
        for stack in group_stacks:
            stack.group, stack.columns = group, slice(start, start + stack.down.shape[0])
            start += stack.down.shape[0]


def _stack(layer: nn.Module, present: list[str]) -> Optional[_Stack]:
    held = [name for name in present if name in layer.lora_A]
    if not held:
        return None
    downs = [layer.lora_A[name].weight for name in held]  # each (rank, in)
    ups = [layer.lora_B[name].weight for name in held]  # each (out, rank)
    owners = tuple((name, down.shape[0], float(layer.scaling[name])) for name, down in zip(held, downs))
    # in the base's dtype: peft keeps a bfloat16 base's adapters in float32 and casts each row's input up and its
    # update down, three more kernels per layer (a 32-row bfloat16 step's cost beside the bare model's); the update
    # then rounds to bfloat16 once more (tests/test_lora_rows.py holds it to peft's within bfloat16 tolerance)
    dtype = layer.base_layer.weight.dtype
    down = torch.cat(downs).to(dtype)
    return _Stack(down, torch.cat(ups, dim=1).t().to(dtype).contiguous(), owners, _scaled(down, owners))


def _scaled(down: torch.Tensor, owners: tuple[tuple[str, int, float], ...]) -> Optional[torch.Tensor]:
    """``down`` (R, in) with each adapter's rows times its scaling, where every scaling is a power of two (LoRA's
    usual alpha / r: 2, 1, 0.5): x · (sA)ᵀ is then bit for bit (x · Aᵀ) · s, so a batch of one adapter's rows skips
    the scaling's kernel and still gets the bits it gets among other adapters' rows. None where one is not."""
    if not all(scaling > 0 and math.frexp(scaling)[0] == 0.5 for _, _, scaling in owners):
        return None
    scalings = torch.tensor([scaling for _, rank, scaling in owners for _ in range(rank)], dtype=down.dtype,
                            device=down.device)
    return down * scalings[:, None]


def _rows_forward(layer: nn.Module, row_lora: RowLora, stack: Optional[_Stack], x: torch.Tensor, *args, **kwargs):
    """peft's LoRA ``Linear`` forward for a batch of rows each with its own adapter (see the module's text).

    Args:
        x: (rows, tokens, in).

    Returns:
        (rows, tokens, out) in the base product's dtype, as peft's mixed forward returns.
    """
    names = row_lora._plan[0]
    if args or kwargs or layer.merged or layer.training or x.dim() != 3 or x.shape[0] != len(names):
        return type(layer).forward(layer, x, *args, adapter_names=names, **kwargs)  # peft's own mixed forward
    result = layer.base_layer(x)  # (rows, tokens, out)
    if stack is None or layer.disable_adapters:
        return result
    down = row_lora.down(stack, x).reshape(-1, stack.up.shape[0])  # (rows * tokens, R), each row's own columns kept
    if result.dtype == stack.up.dtype:  # into the base product's fresh result: no copy of it (an ``addmm``'s)
        result = result.contiguous()
        result.view(-1, result.shape[-1]).addmm_(down, stack.up)
        return result
    return result + (down @ stack.up).view(result.shape).to(result.dtype)  # peft casts each update to the result's dtype
