"""State trees: nested dicts, lists and tuples whose leaves are tensors and plain values (a
component's state_dict, the RNG state, a whole checkpoint). One walker and one bitwise comparator,
so that saving, loading, broadcasting and checking a state all agree on what the tree is.

A dict (or a dict subclass, such as a state_dict's OrderedDict) is rebuilt as a plain dict in
insertion order; a list or tuple keeps its type; anything else is a leaf.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch


def map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """The tree with every leaf replaced by fn(leaf). Leaves are visited depth first in dict
    insertion order and list order, so a caller that collects tensors in `fn` gets them in the
    same order every time (the checkpoint files depend on that order)."""
    if isinstance(tree, dict):
        return {k: map_leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(map_leaves(v, fn) for v in tree)
    return fn(tree)


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The tree with every tensor leaf replaced by fn(tensor), other leaves kept as they are.
    `fn` may return its argument to keep a tensor (a predicate is just an early return)."""
    return map_leaves(tree, lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def _child(path: str, key: Any) -> str:
    # String keys read as attributes (model.weight); others, such as the optimizer's integer
    # parameter ids, as subscripts (optimizer.state[0].exp_avg), so the two cannot be confused.
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's data as a flat uint8 tensor on the CPU: comparing these compares the bits, so
    -0.0 differs from 0.0, a NaN equals itself, and NaNs with different payloads differ."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _tensor_difference(a: torch.Tensor, b: torch.Tensor, path: str) -> str | None:
    where = path or "<root>"
    if a.dtype != b.dtype:
        return f"{where}: dtype {a.dtype} != {b.dtype}"
    if a.shape != b.shape:
        return f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.device.type == "meta" or b.device.type == "meta":
        # No data to compare (a structure file's placeholders): equal when both are placeholders.
        same = a.device.type == b.device.type
        return None if same else f"{where}: device {a.device.type} != {b.device.type}"
    if a.layout != b.layout:
        return f"{where}: layout {a.layout} != {b.layout}"
    if a.layout != torch.strided:  # sparse: no one buffer of raw bits; compare the dense bits
        return _tensor_difference(a.to_dense(), b.to_dense(), path)
    if a.is_quantized or b.is_quantized:  # torch.equal compares their integers and parameters
        return None if torch.equal(a.cpu(), b.cpu()) else f"{where}: quantized values differ"
    x, y = _raw_bytes(a), _raw_bytes(b)
    if torch.equal(x, y):
        return None
    # Name the first differing element, with its value and bits (the bits tell -0.0 from 0.0 and
    # one NaN from another, which the printed values do not).
    size = a.element_size()
    element = int((x != y).nonzero()[0, 0]) // size
    index = [int(i) for i in torch.unravel_index(torch.tensor(element), a.shape)]
    at = f"{where}[{', '.join(map(str, index))}]" if index else where

    def show(t: torch.Tensor, raw: torch.Tensor) -> str:
        bits = bytes(raw[element * size : (element + 1) * size].tolist())
        # Bytes are in memory order: print the most significant first, as a number is written.
        bits = bits[::-1] if sys.byteorder == "little" else bits
        return f"{t.detach().reshape(-1)[element].item()!r} (0x{bits.hex()})"

    return f"{at}: bits differ: {show(a, x)} vs {show(b, y)}"


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """None when the two trees are equal, tensors identical bit for bit (same dtype, same shape,
    same bytes; the device does not count); else one line naming the first path where they
    differ and how. `where` prefixes the paths.

    Lists and tuples compare as sequences (a list equals a tuple with the same items, as a tree
    that went through a serializer may turn one into the other); other leaves compare with ==.
    """
    here = where or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{here}: {type(a).__name__} vs {type(b).__name__}"
        return _tensor_difference(a, b, where)
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return f"{here}: {type(a).__name__} vs {type(b).__name__}"
        if a.keys() != b.keys():
            only_a = [k for k in a if k not in b]
            only_b = [k for k in b if k not in a]
            return f"keys differ at {here}: only in first {only_a}, only in second {only_b}"
        for k in a:
            found = first_difference(a[k], b[k], _child(where, k))
            if found is not None:
                return found
        return None
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        if not (isinstance(a, list | tuple) and isinstance(b, list | tuple)):
            return f"{here}: {type(a).__name__} vs {type(b).__name__}"
        if len(a) != len(b):
            return f"{here}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    return None if a == b else f"{here}: {a!r} != {b!r}"


def shape_misfit(saved: dict[str, tuple | None], live: dict[str, tuple | None]) -> str:
    """How a saved state's names and shapes (None: not a tensor) differ from a live one's, in
    one line: up to three missing and unexpected names and the first shape that differs; "" if
    they fit."""
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    shapes = [
        f"{k} {saved[k]} vs {live[k]}"
        for k in sorted(set(saved) & set(live))
        if live[k] is not None and saved[k] != live[k]
    ]
    parts = (
        f"missing {missing[:3]}" if missing else "",
        f"unexpected {unexpected[:3]}" if unexpected else "",
        f"shape {shapes[0]}" if shapes else "",
    )
    return "; ".join(part for part in parts if part)
