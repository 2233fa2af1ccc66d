"""External weights -> our autoencoders: the registry of weight *sources* and the strict key mapping
every converter uses.

A source names a kind of released checkpoint and the converter that turns a LOCAL copy of it into
one of our models, e.g. ``ivvae-official`` (the ``.pth`` files of ali-vilab/iv-vae) or
``diffusers:AutoencoderKL`` (a diffusers folder of an SD VAE). Each converter lives next to the
family it fills and registers itself here, as families register their configs; ``ldm convert``
(``launch/convert.py``) is glue over `convert`.

A source fills its own family exactly. Other families can start from it through an *initialiser*
registered by the target family (``register_initialiser("cmvae", "kl2d", fn)``: the cross-modal
VAE's first stage inflated from a converted SD VAE), so ``convert("diffusers:AutoencoderKL", path,
"cmvae-z4")`` converts to ``kl2d`` first and then initialises a ``cmvae-z4`` from it.

`KeyMap` makes every conversion strict: every source tensor is used or dropped by name with a
reason, every parameter of the target is filled, shapes must agree; otherwise one error lists all
that is wrong (never a silent partial load). What the user can fix (a wrong file, folder or target)
is an `ldm.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from autoencoders.base import FAMILIES, REGISTRY, Autoencoder, load_pretrained
from autoencoders.pretrained import load_diffusers, normalisation
from ldm.errors import MissingInput, UserError, checking

_SHOW = 12  # list at most this many keys per kind of problem


@dataclass
class Conversion:
    """A converted model, the registered name whose architecture it has (None for a config built
    from the source alone) and notes on what was checked or dropped (printed by ``ldm convert``)."""

    model: Autoencoder
    name: str | None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    name: str
    family: str  # the family this source fills exactly
    reads: str  # what --path must be
    convert: Callable[[Path, str], Conversion]  # (local path, target name or family) -> Conversion


SOURCES: dict[str, Source] = {}
# (target family, base family) -> fn(converted base model, target name or family) -> (model, note)
INITIALISERS: dict[tuple[str, str], Callable[[Autoencoder, str], tuple[Autoencoder, str]]] = {}


def register_source(name: str, family: str, reads: str) -> Callable:
    def deco(fn: Callable[[Path, str], Conversion]) -> Callable[[Path, str], Conversion]:
        if name in SOURCES:
            raise ValueError(f"weight source {name!r} registered twice")
        SOURCES[name] = Source(name, family, reads, fn)
        return fn
    return deco


def register_initialiser(family: str, base_family: str) -> Callable:
    def deco(fn: Callable[[Autoencoder, str], tuple[Autoencoder, str]]) -> Callable:
        INITIALISERS[(family, base_family)] = fn
        return fn
    return deco


def family_of(target: str) -> str:
    """The family of ``target``: a registered name or a family name."""
    if target in REGISTRY:
        return REGISTRY[target][0].family
    if target in FAMILIES:
        return target
    raise UserError(f"unknown target {target!r}: give a registered autoencoder (`ldm list`) or a family "
                   f"({sorted(FAMILIES)})")


def targets(source: str) -> list[str]:
    """Families a source can fill: its own and those with an initialiser from it."""
    own = SOURCES[source].family
    return [own] + sorted(f for f, b in INITIALISERS if b == own)


def convert(source: str, path: str | Path, target: str) -> Conversion:
    """Convert the local checkpoint ``path`` of ``source`` into ``target`` (a registered name, which
    the source must match, or a family name, which builds the config the source implies)."""
    if source not in SOURCES:
        raise UserError(f"unknown weight source {source!r}; known: {sorted(SOURCES)}")
    src, path = SOURCES[source], Path(path)
    if not path.exists():
        raise MissingInput(f"{source}: no such file or folder {path}")
    family = family_of(target)
    if family == src.family:
        return src.convert(path, target)
    if (family, src.family) not in INITIALISERS:
        _check_not_a_base(target, src.family, f"convert to --target {src.family} and give that folder")
        raise UserError(f"{source} fills {src.family!r} (and by initialisation {targets(source)[1:] or 'nothing else'}); "
                         f"target {target!r} is a {family!r}")
    base = src.convert(path, src.family)
    return initialise(base.model, target, [f"{src.family} (converted first): {n}" for n in base.notes])


def initialise(base: Autoencoder, target: str, notes: list[str] = ()) -> Conversion:
    """``target`` (a registered name or family) started from the model ``base`` of another family
    through the target family's registered initialiser (e.g. IV-VAE's video VAE inflated from an
    image VAE, Sec. 3.3)."""
    family = family_of(target)
    init = INITIALISERS.get((family, base.family))
    if init is None:
        _check_not_a_base(target, base.family, "give this folder as it is")
        known = sorted(f"{b} -> {f}" for f, b in INITIALISERS)
        raise UserError(f"no initialiser of a {family!r} from a {base.family!r}; known: {', '.join(known)}")
    with checking(f"--target {target}"):  # the base does not fit the target's layout
        model, note = init(base, target)
    return Conversion(model, target if target in REGISTRY else None, [*notes, note])


def _check_not_a_base(target: str, base_family: str, how: str) -> None:
    """A family that trains on a frozen ``base_family`` model (Hi-VAE on a kl2d) is not converted from
    one: the base goes to ``ldm train-ae --base-checkpoint``; `UserError` saying so."""
    family = family_of(target)
    if FAMILIES[family].base_family == base_family:
        name = target if target in REGISTRY else f"{family}-NAME"
        raise UserError(f"{family} is not converted from a {base_family}: it trains on one as its frozen base; "
                        f"{how} to `ldm train-ae --autoencoder {name} --base-checkpoint DIR --stage 1`")


SAVED = "saved"  # ``ldm convert --source saved``: our own save_pretrained folder, initialising another family


def convert_saved(path: str | Path, target: str) -> Conversion:
    """Start ``target`` from a model we saved (``save_pretrained`` folder, e.g. the image VAE a
    ``kl2d`` run trained) through the target family's initialiser: the step between two recipes
    whose second trains another family (IV-VAE's image VAE -> video VAE)."""
    base = load_pretrained(path)
    if family_of(target) == base.family and (base.family, base.family) not in INITIALISERS:
        raise UserError(f"{path} already holds a {base.family!r}; give it to --init / --checkpoint directly")
    return initialise(base, target, [f"{base.family} loaded from {path}"])


# ------------------------------------------------------------------------------------------
# Targets: a registered name is checked against what the source implies
# ------------------------------------------------------------------------------------------
SOURCE_STATS = ("latent_scale", "latent_shift")  # config fields that come from the weights, not the layout


def arch_diff(ours: Any, theirs: Any, ignore: tuple[str, ...] = SOURCE_STATS) -> dict[str, tuple[Any, Any]]:
    """Config fields (other than ``ignore``) where two configs of one class differ: ``{field: (ours, theirs)}``."""
    return {f.name: (getattr(ours, f.name), getattr(theirs, f.name)) for f in dataclasses.fields(ours)
            if f.name not in ignore and getattr(ours, f.name) != getattr(theirs, f.name)}


def resolve_target(target: str, family: str, implied: Any, source: str,
                   keep: tuple[str, ...] = ()) -> tuple[str | None, Any]:
    """(name, config) for ``target``: the family name gives ``implied`` (the config the source
    describes); a registered name must have exactly that architecture, else a ValueError names the
    differing fields. ``keep``: further fields of a registered config the source does not decide
    (e.g. memory knobs) that are taken from the registry."""
    if target == family:
        return None, implied
    if target not in REGISTRY or REGISTRY[target][0].family != family:
        raise UserError(f"{source} fills {family!r}: --target must be {family!r} or one of its registered "
                         f"names {sorted(n for n, (c, _) in REGISTRY.items() if c.family == family)}, got {target!r}")
    registered = REGISTRY[target][1]
    diff = arch_diff(registered, implied, SOURCE_STATS + keep)
    if diff:
        fields = ", ".join(f"{k}: {a!r} (theirs {b!r})" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise UserError(f"{source} does not have the architecture of {target}: {fields}; convert to "
                         f"--target {family} to keep the source's own configuration")
    return target, dataclasses.replace(implied, **{k: getattr(registered, k) for k in keep})


def open_diffusers(class_name: str, path: Path, target: str, family: str,
                   config_from: Callable[[Any, tuple[float, ...], tuple[float, ...]], Any]) -> tuple[Any, str | None, Any]:
    """The diffusers ``class_name`` model in the local folder ``path`` (eval mode), and the registered
    name and config of ``target`` in ``family``: the config it implies (``config_from(its config,
    scale, shift)``), checked against a registered ``target`` (`resolve_target`)."""
    with checking(f"diffusers:{class_name} --path"):
        source = load_diffusers(class_name, path).eval()
    scale, shift = normalisation(class_name, source)
    name, config = resolve_target(target, family, config_from(source.config, scale, shift), f"diffusers:{class_name}")
    return source, name, config


def registered_target(state: Mapping[str, Tensor], target: str, cls: type, fill: Callable[[KeyMap, Any], None],
                      source: str) -> str:
    """The registered name an official checkpoint (tensors only, no config) converts into:
    ``target`` itself when it is a registered ``cls``, or for the family name the one registered
    ``cls`` whose parameters ``fill(keymap, model)`` maps from ``state`` without a problem (each
    candidate built on the meta device)."""
    names = sorted(n for n, (c, _) in REGISTRY.items() if c is cls)
    if target != cls.family:
        if target not in names:
            raise UserError(f"{source}: --target must be {cls.family!r} or one of {names}, got {target!r}")
        return target

    def fits(name: str) -> bool:
        with torch.device("meta"):
            model = cls(REGISTRY[name][1])
        km = KeyMap(state, name)
        try:
            fill(km, model)
        except ValueError:
            return False
        return not km.problems(model)

    found = [n for n in names if fits(n)]
    if len(found) != 1:
        raise UserError(f"{source}: the checkpoint's tensors match {found or 'none'} of the registered {cls.family} "
                         f"models {names}; pass --target NAME to see what differs")
    return found[0]


# ------------------------------------------------------------------------------------------
# Strict key mapping
# ------------------------------------------------------------------------------------------
class ParamMapper:
    """Fills a model's parameters, found by the module objects a converter walks (``param(conv.weight,
    tensor)``), into a `KeyMap` under their names: the base of the family converters' mappers."""

    def __init__(self, km: "KeyMap", model: torch.nn.Module):
        self.km = km
        self.names = {p: n for n, p in model.named_parameters()}

    def param(self, ours: torch.nn.Parameter, tensor: Tensor) -> None:
        self.km.put(self.names[ours], tensor)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"[{shown}{f', ... and {len(keys) - _SHOW} more' if len(keys) > _SHOW else ''}]"


class KeyMap:
    """Build our state dict from a source state dict, accounting for every key.

    ``take(key)`` reads a source tensor (a missing one is recorded), ``put(ours, tensor)`` sets one of
    our tensors, ``drop(key, reason)`` skips a source tensor knowingly; `load_into` then raises ONE
    ValueError listing missing, unused, unfilled and wrongly shaped tensors, or loads strictly.
    """

    def __init__(self, source: Mapping[str, Tensor], what: str):
        self.source, self.what = source, what
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.dropped: dict[str, str] = {}
        self.out: dict[str, Tensor] = {}
        self._placeholder = torch.empty(0)

    def has(self, key: str) -> bool:
        return key in self.source

    def take(self, key: str) -> Tensor:
        if key not in self.source:
            self.missing.append(key)
            return self._placeholder
        self.used.add(key)
        return self.source[key]

    def put(self, ours: str, tensor: Tensor) -> None:
        if ours in self.out:
            raise ValueError(f"{self.what}: {ours} filled twice (a bug in the converter)")
        self.out[ours] = tensor

    def drop(self, key: str, reason: str) -> None:
        if key not in self.source:
            self.missing.append(key)
        self.dropped[key] = reason

    def drop_prefix(self, prefix: str, reason: str) -> int:
        """Drop every source tensor under ``prefix`` (e.g. a training-only loss module); returns how many."""
        keys = [k for k in self.source if k.startswith(prefix)]
        for k in keys:
            self.dropped[k] = reason
        return len(keys)

    def problems(self, model: torch.nn.Module) -> list[str]:
        expected = model.state_dict()
        unused = sorted(set(self.source) - self.used - set(self.dropped))
        unfilled = sorted(set(expected) - set(self.out))
        extra = sorted(set(self.out) - set(expected))
        wrong = [f"{k} {tuple(v.shape)} (ours {tuple(expected[k].shape)})" for k, v in self.out.items()
                 if k in expected and v.numel() and v.shape != expected[k].shape]
        out = []
        for label, keys in (("missing from the checkpoint", sorted(set(self.missing))),
                            ("in the checkpoint but not used", unused), ("of ours left unfilled", unfilled),
                            ("mapped to no tensor of ours", extra), ("with the wrong shape", wrong)):
            if keys:
                out.append(f"{len(keys)} tensor(s) {label}: {_listing(keys)}")
        return out

    def load_into(self, model: torch.nn.Module) -> None:
        problems = self.problems(model)
        if problems:
            raise UserError(f"cannot convert {self.what}:\n  " + "\n  ".join(problems))
        expected = model.state_dict()
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in self.out.items()}, strict=True)

    def dropped_summary(self) -> str:
        """One line per reason: how many source tensors were dropped for it."""
        counts: dict[str, int] = {}
        for reason in self.dropped.values():
            counts[reason] = counts.get(reason, 0) + 1
        return "; ".join(f"dropped {n} tensor(s): {r}" for r, n in counts.items())


def compare(pairs: list[tuple[str, Tensor, Tensor]], what: str) -> str:
    """A note with the largest differences ``ours - source`` of each ``(label, ours, source)``; a
    ValueError if any exceeds float tolerance (1e-3 of the source's largest value, at least 1e-3):
    a converter that runs the source model checks its result with this before writing anything."""
    diffs = {label: (a - b).abs().max().item() for label, a, b in pairs}
    limit = {label: 1e-3 * max(1.0, b.abs().max().item()) for label, _, b in pairs}
    bad = {k: v for k, v in diffs.items() if not v <= limit[k]}
    if bad:
        raise UserError(f"{what}: the converted model does not reproduce the source ({bad}); its configuration "
                         "has something this family does not hold")
    return "max |ours - source| on a random input: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
