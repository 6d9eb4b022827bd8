"""Which modules of a backbone get experts.

Resolves ``target_modules`` (names, a regex, or a preset name), the preset detected from the
backbone, and ``exclude_modules`` into the exact list of module paths to wrap, before any
module is touched, so that a pattern that matches nothing fails with the closest names
instead of leaving a half-injected model.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn
from torch.nn.utils import parametrize

from loraxir.backbones import (
    Preset,
    detect_preset,
    get_preset,
    is_added_by_loraxir,
    list_presets,
)
from loraxir.errors import TargetModulesError
from loraxir.guidance import runs_dam_block
from loraxir.layers import LAYER_TYPES, LoraIRLayer
from loraxir.validation import full_match


def resolve_preset(
    backbone: nn.Module, preset: str | None, target_modules: str | list[str] | None
) -> Preset | None:
    """The preset to use: the named one, else one detected from the backbone, else None.

    ``target_modules`` given as a preset name counts as naming that preset.
    """
    if isinstance(target_modules, str) and target_modules in list_presets():
        return get_preset(target_modules)
    if preset is not None:
        return get_preset(preset)
    return detect_preset(backbone)


def matches(pattern: str | list[str] | None, path: str) -> bool:
    """Does module ``path`` match a regex (full match) or a list of names (path or suffix)?"""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return full_match(pattern, path)
    return any(path == name or path.endswith("." + name) for name in pattern)


def _supported(module: nn.Module) -> bool:
    """Can experts wrap ``module``? (grouped transposed convolutions have no expert form)"""
    if type(module) not in LAYER_TYPES:
        return False
    return not isinstance(module, nn.ConvTranspose2d) or module.groups == 1


def resolve_targets(
    backbone: nn.Module,
    target_modules: str | list[str] | None,
    exclude_modules: str | list[str] | None,
    preset: str | None,
    count_wrapped: bool = False,
) -> list[str]:
    """Dotted paths of the modules to wrap, in module order.

    Raises :class:`TargetModulesError` when nothing of a supported type matches, listing
    the closest module names; a matched module of an unsupported type is an error only
    when it was named explicitly (a regex may sweep over norms and activations). Layers
    that already carry experts are skipped, or with ``count_wrapped`` counted as the layers
    they wrap (what a second adapter on the same layers would target).
    """
    named = target_modules  # the user's own names: a preset's list may suit some variants only
    chosen = resolve_preset(backbone, preset, target_modules)
    if target_modules is None or (chosen is not None and target_modules == chosen.name):
        if chosen is None:
            raise TargetModulesError(
                f"No target_modules given and no preset matches a {type(backbone).__name__}. "
                f"Pass target_modules (names or a regex) or preset= one of {list_presets()}, or "
                "register a preset with loraxir.register_preset."
            )
        target_modules = chosen.target_modules
        exclude = [exclude_modules, chosen.exclude_modules]
    else:
        exclude = [exclude_modules]
    targets = []
    paths = []
    passed_by = []  # layers a regex matched that experts cannot attach to, and why
    wrapped = []  # expert layers already there: their base layers are not targets again
    for path, module in backbone.named_modules():
        wanted = matches(target_modules, path) and not any(matches(e, path) for e in exclude)
        if isinstance(module, LoraIRLayer):
            wrapped.append(path)
            if count_wrapped and wanted:
                targets.append(path)
            continue
        if not path or is_added_by_loraxir(path):
            continue
        if any(path.startswith(f"{t}.") for t in [*targets, *wrapped]):
            continue
        paths.append(path)
        if not wanted:
            continue
        if _supported(module):
            targets.append(path)
            continue
        inner = " Name its inner layers instead." if any(module.children()) else ""
        reason = _refusal(path, module) or (
            f"Target {path!r} is a {type(module).__name__}; experts attach to "
            f"{', '.join(t.__name__ for t in LAYER_TYPES)}.{inner}"
        )
        if isinstance(target_modules, list):
            raise TargetModulesError(reason)
        passed_by.append(reason)
    if not targets:
        if any(isinstance(m, LoraIRLayer) for m in backbone.modules()):
            raise TargetModulesError(
                f"The {type(backbone).__name__} already carries loraxir experts, so "
                f"target_modules={target_modules!r} found nothing left to wrap. Grow the existing "
                "model instead (model.add_degradation(name)), or take the plain network back "
                "first (model.unload(), or model.merge_and_unload(degradation=...) to keep one "
                "expert folded in)."
            )
        if passed_by:
            more = f" ({len(passed_by) - 1} more layers like it.)" if len(passed_by) > 1 else ""
            raise TargetModulesError(
                f"target_modules={target_modules!r} matched only layers that experts cannot "
                f"attach to. {passed_by[0]}{more}"
            )
        wanted = target_modules if isinstance(target_modules, list) else [target_modules]
        close = sorted(
            {c for w in wanted for c in difflib.get_close_matches(w, paths, n=5, cutoff=0.3)}
        )
        supported = [p for p in paths if _supported(backbone.get_submodule(p))][:10]
        raise TargetModulesError(
            f"target_modules={target_modules!r} matched no Linear/Conv2d/ConvTranspose2d module "
            f"of the {type(backbone).__name__}. Closest module names: {close or supported}. "
            "Names match a module path or its last components; a string is a regex that must "
            "match the whole dotted path."
        )
    _check_every_name_matches(backbone, named, "target_modules")
    _check_every_name_matches(backbone, exclude_modules, "exclude_modules")
    check_wrappable(backbone, targets)
    return targets


def _check_every_name_matches(
    backbone: nn.Module, names: str | list[str] | None, argument: str
) -> None:
    """A name in a list that matches no module is a typo: the others would be wrapped (or
    excluded) without it, silently. A regex may match nothing on some networks."""
    if not isinstance(names, list):
        return
    paths = [path for path, _ in backbone.named_modules() if path]
    unmatched = [name for name in names if not any(matches([name], p) for p in paths)]
    if unmatched:
        close = sorted(
            {c for name in unmatched for c in difflib.get_close_matches(name, paths, n=3)}
        )
        raise TargetModulesError(
            f"{argument} names {unmatched}, which match no module of the "
            f"{type(backbone).__name__} (closest: {close or 'none'}). Correct or remove them; "
            "a name matches a module path or its last components."
        )


def _refusal(path: str, module: nn.Module) -> str | None:
    """Why experts cannot attach to ``module``, a layer of a supported kind that
    :func:`_supported` refused (``None`` for modules of other kinds: blocks, norms)."""
    if type(module) in LAYER_TYPES:
        return (
            f"Target {path!r} is a ConvTranspose2d with groups={module.groups}; experts "
            "attach to ConvTranspose2d with groups=1 only. Leave it out (exclude_modules="
            f"[{path!r}])."
        )
    if parametrize.is_parametrized(module):
        return (
            f"Target {path!r} has parametrizations (torch.nn.utils.parametrizations' "
            "weight_norm or spectral_norm, or your own): its experts would compute from "
            "the stored weight, not the parametrized one. Remove them first "
            f"(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')), or "
            f"leave it out (exclude_modules=[{path!r}])."
        )
    if isinstance(module, tuple(LAYER_TYPES)):
        parent = next(t for t in LAYER_TYPES if isinstance(module, t)).__name__
        return (
            f"Target {path!r} is a {type(module).__name__}, a subclass of {parent}; experts "
            f"attach to plain {', '.join(t.__name__ for t in LAYER_TYPES)} only, because a "
            "subclass's forward may compute something else (weight standardisation, 'same' "
            f"padding). Leave it out (exclude_modules=[{path!r}]) or build that layer as a "
            f"plain nn.{parent}."
        )
    return None


def check_wrappable(backbone: nn.Module, targets: list[str]) -> None:
    """Refuse targets whose expert layer would compute something other than the network:
    experts run the layer's operation on its weight themselves, so hooks on it (old-style
    ``weight_norm``/``spectral_norm``, which recompute the weight before each call) would
    be skipped; a module used at two paths would get experts at one of them only; and
    layers sharing one weight would fold each other's experts into it when merged."""
    # Where each module sits: (parent, attribute) slots. A block reused in a loop
    # (ModuleList([b, b])) holds its layer in one slot, which the expert layer replaces
    # for every use; a layer placed in two slots would be replaced in one of them only.
    uses: dict[int, dict[tuple[int, str], str]] = {}
    for parent_path, parent in backbone.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():  # named_children() drops repeats
            if child is None:
                continue
            path = f"{parent_path}.{name}" if parent_path else name
            uses.setdefault(id(child), {}).setdefault((id(parent), name), path)
    weights: dict[int, str] = {}
    for path in targets:
        module = backbone.get_submodule(path)
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        if runs_dam_block(module):
            raise TargetModulesError(
                f"Target {path!r} is also a DAM point: its block runs as a hook of the layer, "
                "which the experts would skip. Place the DAM block at the module around it, "
                f"or leave the layer out (exclude_modules=[{path!r}])."
            )
        if hooks:
            names = sorted({type(hook).__name__ for hook in hooks})
            raise TargetModulesError(
                f"Target {path!r} has forward hooks ({', '.join(names)}): weight_norm or "
                "spectral_norm (torch.nn.utils), or hooks of your own. Its experts compute the "
                "layer from its weight and would skip them. Remove them first (e.g. "
                f"torch.nn.utils.remove_weight_norm), or leave it out (exclude_modules=[{path!r}])."
            )
        if len(uses[id(module)]) > 1:
            raise TargetModulesError(
                f"Target {path!r} is one module placed at {list(uses[id(module)].values())}: "
                "experts would attach at one of them only. Give each use its own layer "
                f"(copy.deepcopy), or leave it out (exclude_modules=[{path!r}])."
            )
        if not isinstance(module.weight, torch.Tensor) or not module.weight.is_floating_point():
            held = "no weight" if module.weight is None else f"a {module.weight.dtype} weight"
            raise TargetModulesError(
                f"Target {path!r} holds {held}; experts add a float update to a layer's float "
                "weight. Dequantize the layer (or give it a weight) first, or leave it out "
                f"(exclude_modules=[{path!r}])."
            )
        weight = id(module.weight)
        if weight in weights:
            raise TargetModulesError(
                f"Targets {weights[weight]!r} and {path!r} share one weight tensor: merging "
                "would fold each one's experts into the other. Give them their own weights, "
                f"or leave one out (exclude_modules=[{path!r}])."
            )
        weights[weight] = path
