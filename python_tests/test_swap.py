"""The one patching mechanism (evoprune_ext/swap.py) and `unpatch` restoring every object it swapped."""

import pytest
import torch
from torch import nn

from evoprune_ext import patch, unpatch
from evoprune_ext.swap import is_swapped, restore, swap


class Loud:
    def forward(self, x):
        return super().forward(x) * self._evoprune


def test_swap_changes_one_object_and_restore_undoes_it():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    x = torch.ones(1, 2)
    want = a(x)
    swap(a, Loud, 3.0, layer=5)
    assert isinstance(a, nn.Linear) and type(a).__name__ == "EvoPruneLinear" and type(b) is nn.Linear
    assert is_swapped(a) and not is_swapped(b) and a._evoprune_layer == 5
    torch.testing.assert_close(a(x), want * 3)
    swap(b, Loud, 1.0)
    assert type(b) is type(a)  # one class per (mixin, base) pair
    restore(a)
    assert type(a) is nn.Linear and not is_swapped(a) and not hasattr(a, "_evoprune_layer")
    torch.testing.assert_close(a(x), want)


def test_unpatch_restores_every_class_of_a_qwen_model():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    tower = transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel(
        Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                            temporal_patch_size=2, out_hidden_size=24, deepstack_visual_indexes=[0])
    )
    classes = {name: type(module) for name, module in tower.named_modules()}
    patch(tower, keep_ratio=0.5)
    assert type(tower) is not classes[""] and tower.evoprune_state.layers == [1]
    unpatch(tower)
    assert {name: type(module) for name, module in tower.named_modules()} == classes
    assert not any(is_swapped(module) or hasattr(module, "evoprune_state") for module in tower.modules())
