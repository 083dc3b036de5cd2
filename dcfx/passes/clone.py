"""The capture's copy of a U-Net: new module objects, the same tensors, every forward bound to the copy.

Captures run on a copy of the module tree (``structural_clone``): ``torch.export`` swaps the
parameters in the traced modules' dicts for fake tensors until it is done, and the capture
sets eval mode and, for a LoRA scale, the adapters' ``scaling``; on a copy, none of that
touches the modules that other threads read meanwhile. The parameters and buffers are the
same objects, so the graphs share the model's weights.

A module's behaviour is not only its class: its instance dict may hold a ``forward`` of its
own (a bound method put back by ``DeepCacheSDHelper.disable()``, accelerate's
``add_hook_to_module`` partial, diffusers' hook registry, a user's closure), hooks, and
objects that refer to the module. A plain ``copy.copy`` keeps those pointing at the original
modules, and the trace would leave the copy. ``rebind`` rewrites every reference to a module
of the tree, wherever it sits in those values (bound methods, ``functools.partial``, closure
cells, default arguments, containers, attributes of plain objects), to the module's copy, and
copies only what it changes. What it cannot reach (globals, objects it cannot copy) is caught
after the trace by ``dcfx.passes.capture`` (``check_trace_stayed_inside``).

Example:
    >>> unet.up_blocks[0].forward = functools.partial(type(unet.up_blocks[0]).forward, unet.up_blocks[0])
    >>> copy = structural_clone(unet)
    >>> copy.up_blocks[0].forward.args[0] is copy.up_blocks[0]
    True
    >>> copy.up_blocks[0].resnets[0].conv1.weight is unet.up_blocks[0].resnets[0].conv1.weight
    True
"""

from __future__ import annotations

import copy
import enum
import functools
import types
import weakref
from typing import Any

import torch
from torch import nn

# Values that hold no module reference worth following.
_LEAVES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.Tensor,
    torch.dtype,
    torch.device,
    torch.Size,
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
    enum.Enum,
)
# A bound on how deep ``reaches`` follows references (hook chains, objects holding objects).
_MAX_DEPTH = 32
# The module dict entries that ``structural_clone`` rebuilds itself.
_STRUCTURE = frozenset({"_modules", "_parameters", "_buffers"})


def structural_clone(module: nn.Module) -> nn.Module:
    """Returns a copy of ``module``'s tree whose modules are new objects holding the same tensors.

    Every module appears once in the copy, however many paths lead to it. Each copy's dict is
    the original's with its containers copied (the forward, or the capture, may write to
    them) and every reference to a module of the tree, however nested, bound to that module's
    copy (``rebind``).
    """
    originals = {id(m): m for m in module.modules()}
    clones = {key: copy.copy(m) for key, m in originals.items()}
    rebinder = Rebinder(clones)
    for key, new in clones.items():
        old = originals[key]
        state = new.__dict__
        for name, value in old.__dict__.items():
            if name == "_modules":
                state[name] = {k: None if v is None else clones[id(v)] for k, v in value.items()}
            elif name in _STRUCTURE:
                state[name] = copy.copy(value)  # the same tensors; torch.export swaps entries of the copy
            else:
                bound = rebinder.rebind(value)
                if bound is value and isinstance(value, (dict, list, set)):
                    bound = copy.copy(value)  # a container the forward (or the capture) may write to
                state[name] = bound
    return clones[id(module)]


class Rebinder:
    """Rewrites references to the modules in ``clones`` (``id(original) -> copy``) inside values.

    ``rebind(value)`` returns ``value`` itself when nothing reachable from it refers to such a
    module, else a copy with every such reference replaced. It works in two passes, as
    ``copy.deepcopy`` does for cycles: first which objects reach a module of the tree (over
    the whole object graph, cycles included: a hook whose bound ``pre_forward`` leads back to
    the hook), then copies of exactly those, each registered before its contents are filled
    in, so shared objects stay shared and cycles close on the copies.
    """

    def __init__(self, clones: dict[int, nn.Module]) -> None:
        self.clones = clones
        self._reaches: dict[int, bool] = {}  # final: every object reachable from these was explored
        self._copies: dict[int, Any] = {}
        self._keep: list[Any] = []  # the objects behind the ids above stay alive while this is used

    def rebind(self, value: Any) -> Any:
        """Returns ``value`` with every reference to an original module replaced by its copy."""
        if isinstance(value, nn.Module):
            return self.clones.get(id(value), value)  # a module outside the tree is left alone
        if isinstance(value, _LEAVES) or not self.reaches(value):
            return value
        key = id(value)
        if key not in self._copies:
            try:
                self._copy(value)
            except (TypeError, ValueError, AttributeError, copy.Error):
                self._copies[key] = value  # an object that cannot be copied: left (the trace check catches a use)
        return self._copies[key]

    def reaches(self, root: Any) -> bool:
        """Returns whether a module of the tree is reachable from ``root``."""
        if isinstance(root, nn.Module):
            return id(root) in self.clones
        if isinstance(root, _LEAVES):
            return False
        status = self._reaches
        if id(root) in status:
            return status[id(root)]
        found: dict[int, list[Any]] = {}  # the objects first seen from this root -> their children
        stack = [(root, 0)]
        while stack:
            value, depth = stack.pop()
            if id(value) in found or id(value) in status:
                continue
            children = [c for c in _children(value) if not isinstance(c, _LEAVES)] if depth < _MAX_DEPTH else []
            found[id(value)] = children
            self._keep.append(value)
            stack.extend((c, depth + 1) for c in children if not isinstance(c, nn.Module))
        parents: dict[int, list[int]] = {}
        reached = []
        for key, children in found.items():
            for child in children:
                if isinstance(child, nn.Module):
                    if id(child) in self.clones:
                        reached.append(key)
                elif id(child) in found:
                    parents.setdefault(id(child), []).append(key)
                elif status.get(id(child)):
                    reached.append(key)
        result = dict.fromkeys(found, False)
        while reached:
            key = reached.pop()
            if not result[key]:
                result[key] = True
                reached.extend(parents.get(key, ()))
        status.update(result)
        return status[id(root)]

    def _copy(self, value: Any) -> None:
        key, sub = id(value), self.rebind
        if isinstance(value, types.MethodType):
            self._copies[key] = types.MethodType(sub(value.__func__), sub(value.__self__))
        elif isinstance(value, functools.partial):
            new = type(value)(sub(value.func), *sub(value.args), **sub(value.keywords))
            self._copies[key] = new
            vars(new).update(sub(vars(value)))  # update_wrapper's __wrapped__, __name__, ...
        elif isinstance(value, types.FunctionType):
            cells = tuple(types.CellType() for _ in value.__closure__ or ())
            new = types.FunctionType(
                value.__code__, value.__globals__, value.__name__, sub(value.__defaults__), cells or None
            )
            self._copies[key] = new
            for cell, old in zip(cells, value.__closure__ or (), strict=True):
                contents = _cell_contents(old)
                if contents is not _EMPTY:
                    cell.cell_contents = sub(contents)
            new.__kwdefaults__ = sub(value.__kwdefaults__)
            new.__qualname__, new.__module__, new.__doc__ = value.__qualname__, value.__module__, value.__doc__
            vars(new).update(sub(vars(value)))
        elif isinstance(value, weakref.ReferenceType):
            self._copies[key] = weakref.ref(sub(value()))
        elif isinstance(value, dict):
            new = self._copies[key] = copy.copy(value)
            for k, v in value.items():
                if self.reaches(v):
                    dict.__setitem__(new, k, sub(v))  # subclasses that refuse item writes (FrozenDict) too
        elif isinstance(value, list):
            new = self._copies[key] = copy.copy(value)
            for i, v in enumerate(value):
                if self.reaches(v):
                    list.__setitem__(new, i, sub(v))
        elif isinstance(value, (tuple, set, frozenset)):
            items = [sub(v) for v in value]
            named = isinstance(value, tuple) and hasattr(value, "_fields")
            self._copies[key] = type(value)(*items) if named else type(value)(items)
        else:
            new = self._copies[key] = copy.copy(value)
            for k, v in vars(value).items():
                if self.reaches(v):
                    vars(new)[k] = sub(v)


def _children(value: Any) -> list[Any]:
    """Returns the values ``value`` refers to that a call through it may use."""
    if isinstance(value, types.MethodType):
        return [value.__func__, value.__self__]
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values(), *vars(value).values()]
    if isinstance(value, types.FunctionType):
        cells = [c for c in map(_cell_contents, value.__closure__ or ()) if c is not _EMPTY]
        return [*cells, *(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values(), *vars(value).values()]
    if isinstance(value, weakref.ReferenceType):
        target = value()
        return [] if target is None else [target]
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "__dict__"):
        return list(vars(value).values())
    return []


_EMPTY = object()


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return _EMPTY
