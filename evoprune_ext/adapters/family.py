"""What an adapter says about a multimodal LLM family (`Family`): how to recognize its inner model, and the mixins
that make its processor emit one placeholder per unit the pruned tower keeps and its model pack and position
those units where that differs from the unpruned layout. Its tower is found and patched on its own (a
`ViTTower` or `PackedTower` of `adapters/`)."""

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Family"]


@dataclass(frozen=True)
class Family:
    name: str
    model: type  # the family's inner model class (holds the tower and the language model): how it is recognized
    processor: type  # the processor class whose placeholders `processor_mixin` recounts
    processor_mixin: type
    model_mixin: type | None = None  # mixed into the inner model where pruned features are packed differently
    # check_layers(config, layers, depth): raises ValueError if the model cannot read the tower pruned at `layers`.
    check_layers: Callable | None = None
