"""ModelWatch: what a module tree's graphs baked in, and every way it can change since."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dcfx.watch import ModelWatch
from tests.fixtures import example_call, tiny_unet


class Processor:
    """A plain (non-module) object held by a module, as diffusers' attention processors are."""

    def __init__(self, scale: float) -> None:
        self.scale = scale


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.register_buffer("offset", torch.zeros(2))
        self.factor = None
        self.adapters = {"a": 1.0}
        self.active = ["a"]
        self.processor = Processor(0.5)
        self.table = np.arange(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * (self.factor or 1.0) + self.offset[None, :, None, None]


@pytest.fixture
def block() -> tuple[nn.Module, ModelWatch]:
    model = nn.Sequential(Block(), Block())
    watch = ModelWatch(model)
    watch.record()
    return model, watch


def changed(watch: ModelWatch) -> str:
    changes = watch.changes()
    assert changes is not None, "the change was not seen"
    return str(changes)


def test_nothing_recorded_nothing_changed():
    model = nn.Linear(2, 2)
    watch = ModelWatch(model)
    model.weight.data.zero_()
    assert watch.changes() is None
    watch.record()
    assert watch.changes() is None


def test_an_unchanged_model_is_unchanged_after_running_it():
    unet = tiny_unet()
    watch = ModelWatch(unet)
    watch.record()
    with torch.no_grad():
        unet(**example_call(unet))
    assert watch.changes() is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m[0], "factor", 1.3), "0.factor: None -> 1.3"),
        (lambda m: setattr(m[1], "new_flag", True), "1.new_flag: set to True"),
        (lambda m: delattr(m[0], "factor"), "0.factor: deleted"),
        (lambda m: m[0].adapters.update(a=0.3), "0.adapters: {'a': 1.0} -> {'a': 0.3}"),
        (lambda m: m[0].active.append("b"), "0.active: ['a'] -> ['a', 'b']"),
        (lambda m: setattr(m[0].processor, "scale", 0.7), "0.processor: Processor attribute(s) ['scale'] changed"),
        (lambda m: setattr(m[0], "processor", Processor(0.5)), "0.processor: Processor replaced by Processor"),
        (lambda m: m[0].register_forward_hook(lambda *a: None), "0._forward_hooks: "),
    ],
    ids=["attribute", "new-attribute", "deleted", "dict-in-place", "list-in-place", "object-attr", "object", "hook"],
)
def test_plain_state_changes_are_seen_and_named(block, change, message):
    model, watch = block
    change(model)
    assert message in changed(watch)


def test_the_training_flag_does_not_count(block):
    model, watch = block
    model.train(not model.training)
    assert watch.changes() is None
    model[0].factor = 2.0
    assert str(watch.changes()) == "0.factor: None -> 2.0"


def test_tensor_changes_are_seen_and_told_apart(block):
    model, watch = block
    with torch.no_grad():
        model[0].conv.weight.add_(1.0)
    changes = watch.changes()
    assert changes is not None and changes.only_written
    assert "0.conv.weight: parameter written in place" in str(changes)
    watch.record()

    model[1].offset.copy_(torch.ones(2))  # a buffer, written in place
    assert watch.changes().only_written
    watch.record()

    model.double()  # .data swapped to new storage: moved, not just written
    changes = watch.changes()
    assert not changes.only_written
    assert "parameter moved (torch.float32, cpu -> torch.float64, cpu)" in str(changes)
    assert "offset: buffer replaced by another tensor at 2 places (0.offset, 1.offset)" in str(changes)
    watch.record()

    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert "parameter replaced by another tensor" in changed(watch)
    watch.record()

    model.load_state_dict(model.state_dict())  # in place, the same values: still a write
    assert watch.changes().only_written


def test_structure_changes_are_seen(block):
    model, watch = block
    model[0].extra = nn.Linear(2, 2)
    assert "0.extra: 1 module(s) added" in changed(watch)
    watch.record()
    model[0].extra = nn.Linear(2, 2)
    assert "0.extra: Linear replaced by Linear" in changed(watch)
    watch.record()
    del model[0].extra
    assert "0.extra: Linear removed" in changed(watch)


def test_values_whose_equality_is_not_a_bool_compare_by_identity(block):
    model, watch = block
    assert watch.changes() is None  # the numpy array attribute neither raises nor differs
    model[0].table = np.arange(3)
    assert "0.table" in changed(watch)


def test_many_changes_of_one_kind_are_grouped(block):
    model, watch = block
    for b in model:
        b.factor = 2.0
    text = changed(watch)
    assert text == "factor: None -> 2.0 at 2 places (0.factor, 1.factor)"
