"""The one way EvoPrune patches anything (towers, their layers, models, processors), as ToMe does: swap the
object's class for a subclass that mixes in what changes, and hang the patch's state on it; restoring gives the
class back and drops every `_evoprune*` attribute. Only the object changes, never its class, so other instances
of the same class are untouched, and patching twice cannot stack (the patch remembers the original class)."""

__all__ = ["is_swapped", "restore", "swap"]

_classes: dict[tuple[type, type], type] = {}


def swap(obj, mixin: type, state, **attributes) -> None:
    """Give `obj` the class mixin + its class (made once per pair), the state as `obj._evoprune`, and each
    keyword as `obj._evoprune_<name>`."""
    base = type(obj)
    if (mixin, base) not in _classes:
        _classes[mixin, base] = type(f"EvoPrune{base.__name__}", (mixin, base), {"_evoprune_base": base})
    obj.__class__ = _classes[mixin, base]
    obj._evoprune = state
    for name, value in attributes.items():
        setattr(obj, f"_evoprune_{name}", value)


def is_swapped(obj) -> bool:
    return "_evoprune" in vars(obj)


def restore(obj) -> None:
    """Undo `swap`: the class back, every `_evoprune*` attribute gone."""
    obj.__class__ = obj._evoprune_base
    for name in [name for name in vars(obj) if name.startswith("_evoprune")]:
        delattr(obj, name)
