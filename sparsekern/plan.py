"""The Plan: a small, serializable description of what a pruned model may skip.

A plan knows nothing of torch modules beyond names and sizes. It has one part per kind of pruning
(docs/design.md#the-plan):

* ``channels``: for each *dependency group* of coupled channels (see :mod:`sparsekern.graph`), the sorted
  indices of the channels that are kept. A group is named after its first producer in topological order
  (for example ``"layer1.0.conv1"``); ``members`` records every layer whose channels belong to it.
* ``removed_blocks``: residual blocks replaced by their shortcut (depth pruning, TAS).
* ``dynamic``: per-sample gated layers (SANP; compiled by :mod:`sparsekern.dynamic`), one :class:`DynamicLayer`
  per layer name; ``lowrank``: per-matrix rank keep-sets (FLOP; compiled by :mod:`sparsekern.lowrank`), one
  :class:`LowRankKeep` per layer name. Their semantics are defined in those modules.

Plans are validated against the dependency groups of a concrete model with :meth:`Plan.validate`, which
raises :class:`PlanError` naming the group or layer and what would fix it.

Every part entry (:class:`GroupKeep`, :class:`DynamicLayer`, :class:`LowRankKeep`) is a frozen dataclass with
``to_dict()`` / ``from_dict(name, data)`` (its JSON form inside :meth:`Plan.to_dict`) and ``check(name)``
(its own consistency, called by :meth:`Plan.validate`). ``from_dict`` refuses unknown keys and wrong types
with a :class:`PlanError` naming the layer and the key. This module imports nothing from sparsekern at
module level but :mod:`sparsekern.utils` (and no torch): every other module may import it.
"""
from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Iterable

from sparsekern.utils import closest

PLAN_FORMAT = "sparsekern.plan"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be applied to a model; the message names the group or layer and a fix."""


@dataclass(frozen=True)
class GroupKeep:
    """The kept channels of one dependency group.

    Attributes:
        size: number of channels in the group (before pruning).
        keep: sorted, unique indices in ``[0, size)`` of the channels that are kept.
        members: names of the layers whose channels belong to the group (informational; used in errors).
        scores: optional importance per channel (length ``size``), used by channel rounding to pick the
            channels to add back; higher is more important.
    """

    size: int
    keep: tuple[int, ...]
    members: tuple[str, ...] = ()
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", tuple(int(i) for i in self.keep))
        object.__setattr__(self, "members", tuple(self.members))
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))

    @property
    def n_keep(self) -> int:
        return len(self.keep)

    def check(self, name: str) -> None:
        """Raise :class:`PlanError` unless ``keep`` is a non-empty sorted unique subset of ``range(size)``."""
        if self.size <= 0:
            raise PlanError(f"group {name!r}: size must be positive, got {self.size}")
        if not self.keep:
            raise PlanError(
                f"group {name!r} (members {list(self.members)[:4]}): the keep-set is empty, which would "
                f"remove the layer entirely; keep at least one of its {self.size} channels"
            )
        if list(self.keep) != sorted(set(self.keep)):
            raise PlanError(f"group {name!r}: keep indices must be sorted and unique, got {list(self.keep)[:16]}")
        if self.keep[0] < 0 or self.keep[-1] >= self.size:
            raise PlanError(
                f"group {name!r}: keep indices must lie in [0, {self.size}), got min {self.keep[0]}, "
                f"max {self.keep[-1]}"
            )
        if self.scores is not None and len(self.scores) != self.size:
            raise PlanError(f"group {name!r}: {len(self.scores)} scores for {self.size} channels")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"size", "keep", "members"}`` and ``"scores"`` when there are scores."""
        return {"size": self.size, "keep": list(self.keep), "members": list(self.members),
                **({"scores": list(self.scores)} if self.scores is not None else {})}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "GroupKeep":
        """The entry of group ``name`` from its JSON form (not checked: :meth:`check` does that)."""
        return cls(int(data["size"]), tuple(data["keep"]), tuple(data.get("members", ())), data.get("scores"))


class _JsonView(Mapping):
    """Read-only mapping view of an entry's JSON form (``entry["keep"]`` is ``entry.to_dict()["keep"]``), so
    that code written against the plain-dict format of plan parts keeps reading them; equal to a mapping
    with the same JSON form. Subclasses are frozen dataclasses defining ``to_dict``."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The entry's JSON form."""

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Any:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    __hash__ = None  # type: ignore[assignment]  # equal to dicts, so not hashable


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ints(v: Any) -> Any:
    """A list or tuple becomes a tuple (JSON has no tuples), its integer-like items (numpy ints) Python ints;
    anything else is left as it is for ``check`` to refuse."""
    if not isinstance(v, (list, tuple)):
        return v
    return tuple(int(i) if hasattr(i, "__index__") and not isinstance(i, bool) else i for i in v)


def _floats(v: Any) -> Any:
    """A list or tuple of real numbers becomes a tuple of floats; anything else is left for ``check``."""
    if not isinstance(v, (list, tuple)):
        return v
    return tuple(float(i) if isinstance(i, Real) and not isinstance(i, bool) else i for i in v)


def _keys(what: str, data: Any, allowed: tuple[str, ...], required: tuple[str, ...], hint: str) -> None:
    """Refuse a JSON entry that is not a mapping, has keys outside ``allowed`` or lacks ``required`` ones."""
    if not isinstance(data, Mapping):
        raise PlanError(f"{what}: the spec must be a mapping, got {data!r}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise PlanError(f"{what}: unknown key {unknown[0]!r} (a spec has the keys {list(allowed)}); the plan was "
                        "written by another version of sparsekern or edited by hand")
    missing = [k for k in required if k not in data]
    if missing:
        raise PlanError(f"{what}: the spec lacks {missing} ({hint})")


@dataclass(frozen=True, eq=False)
class DynamicLayer(_JsonView):
    """One entry of a plan's dynamic part: a per-sample gated layer (semantics in :mod:`sparsekern.dynamic`).

    Attributes:
        granularity: output channels per gate logit, or None for a consumer (a layer without a gate).
        in_from: the gated layer whose out mask is this layer's in mask, or None.
        relu, in_channels, out_channels, kernel_size, stride: the layer's conv, checked against the model's
            layer when given (None: not checked).
        gate: the gate's architecture as JSON (e.g. SANP's ``{"kind": "spm", "hidden": 16, ...}``), checked
            against the model's gate when that gate describes itself (a ``spec()`` method); its weights live
            in the model, not in the plan. None: not recorded.
        never_on, always_on: calibration classes of a gated layer's output channels
            (:func:`sparsekern.dynamic.calibrate`): the sorted indices that were off, respectively on, for every
            calibration sample; the other channels switch. None: not calibrated (both are None or both are
            set, disjoint, for gated layers only). They are in the JSON form only when set.
    """

    granularity: int | None
    in_from: str | None
    relu: bool | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    kernel_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    gate: Mapping[str, Any] | None = None
    never_on: tuple[int, ...] | None = None
    always_on: tuple[int, ...] | None = None

    KEYS = ("granularity", "in_from", "relu", "in_channels", "out_channels", "kernel_size", "stride", "gate",
            "never_on", "always_on")

    def __post_init__(self) -> None:
        for key in ("kernel_size", "stride", "never_on", "always_on"):
            object.__setattr__(self, key, _ints(getattr(self, key)))
        if isinstance(self.gate, Mapping):
            object.__setattr__(self, "gate", json.loads(json.dumps(dict(self.gate))))  # a private JSON copy

    @property
    def gated(self) -> bool:
        return self.granularity is not None

    def check(self, name: str) -> None:
        """Raise :class:`PlanError` naming the layer unless every field has its type and a gated layer has
        a positive granularity; a layer needs a gate or an in mask (or both)."""
        what = f"dynamic layer {name!r}"
        g = self.granularity
        if g is not None and (not _is_int(g) or g < 1):
            raise PlanError(f"{what}: granularity must be a positive int or null, got {g!r}")
        if self.in_from is not None and not isinstance(self.in_from, str):
            raise PlanError(f"{what}: in_from must be a layer name or null, got {self.in_from!r}")
        if g is None and self.in_from is None:
            raise PlanError(f"{what} has neither a gate (granularity) nor an in mask (in_from)")
        if self.relu is not None and not isinstance(self.relu, bool):
            raise PlanError(f"{what}: relu must be true, false or null, got {self.relu!r}")
        for key in ("in_channels", "out_channels"):
            v = getattr(self, key)
            if v is not None and (not _is_int(v) or v < 1):
                raise PlanError(f"{what}: {key} must be a positive int or null, got {v!r}")
        for key in ("kernel_size", "stride"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, tuple) and v and all(_is_int(i) and i >= 1 for i in v)):
                raise PlanError(f"{what}: {key} must be a list of positive ints or null, got {v!r}")
        if self.gate is not None and not isinstance(self.gate, Mapping):
            raise PlanError(f"{what}: gate must be a JSON object (the gate's architecture) or null, got {self.gate!r}")
        self._check_classes(what)

    def _check_classes(self, what: str) -> None:
        """The calibration classes: both or neither, gated layers only, sorted unique ints >= 0 (and below
        ``out_channels`` when known), disjoint."""
        never, always = self.never_on, self.always_on
        if never is None and always is None:
            return
        if never is None or always is None:
            raise PlanError(f"{what}: never_on and always_on are recorded together (by sparsekern.dynamic.calibrate); "
                            f"got only {'never_on' if always is None else 'always_on'}")
        if not self.gated:
            raise PlanError(f"{what}: a consumer (no gate) has no output classes; drop never_on / always_on")
        for key, v in (("never_on", never), ("always_on", always)):
            ok = isinstance(v, tuple) and all(_is_int(i) and i >= 0 for i in v) and list(v) == sorted(set(v))
            if not ok:
                raise PlanError(f"{what}: {key} must be sorted unique channel indices >= 0, got {v!r}")
            if v and self.out_channels is not None and v[-1] >= self.out_channels:
                raise PlanError(f"{what}: {key} names channel {v[-1]}, the layer has {self.out_channels} outputs")
        both = sorted(set(never) & set(always))
        if both:
            raise PlanError(f"{what}: channels {both[:8]} are both never_on and always_on; recalibrate the plan")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every key of :attr:`KEYS`, null where not recorded, except the calibration classes,
        present only when recorded (plans written before calibration existed read back unchanged)."""
        return {"granularity": self.granularity, "in_from": self.in_from, "relu": self.relu,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": None if self.kernel_size is None else list(self.kernel_size),
                "stride": None if self.stride is None else list(self.stride),
                "gate": None if self.gate is None else json.loads(json.dumps(dict(self.gate))),
                **({} if self.never_on is None else {"never_on": list(self.never_on)}),
                **({} if self.always_on is None else {"always_on": list(self.always_on)})}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "DynamicLayer":
        """Layer ``name``'s entry from its JSON form; :class:`PlanError` names the layer and the offending key
        (unknown, missing ``granularity`` / ``in_from``, or of the wrong type)."""
        if isinstance(data, DynamicLayer):
            data.check(name)
            return data
        _keys(f"dynamic layer {name!r}", data, cls.KEYS, ("granularity", "in_from"),
              "granularity: int or null for a consumer; in_from: the gated layer whose out mask it reads, or null")
        entry = cls(**{k: data[k] for k in cls.KEYS if k in data})
        entry.check(name)
        return entry


@dataclass(frozen=True, eq=False)
class LowRankKeep(_JsonView):
    """One entry of a plan's low-rank part: the kept components of a factorized layer (semantics in
    :mod:`sparsekern.lowrank`). JSON form ``{"in", "out", "rank", "keep", "scale"}``.

    Attributes:
        keep: sorted, unique indices in ``[0, rank)`` of the kept rank components (may be empty).
        scale: the gate value of each kept component (same length as ``keep``), or None for all ones.
        rank, in_features, out_features (JSON ``"rank"``, ``"in"``, ``"out"``): the layer's sizes, checked
            against the model's layer when given (None: not checked).
    """

    keep: tuple[int, ...]
    scale: tuple[float, ...] | None = None
    rank: int | None = None
    in_features: int | None = None
    out_features: int | None = None

    KEYS = ("in", "out", "rank", "keep", "scale")

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", _ints(self.keep))
        object.__setattr__(self, "scale", _floats(self.scale))

    @property
    def n_keep(self) -> int:
        return len(self.keep)

    def check(self, name: str) -> None:
        """Raise :class:`PlanError` naming the layer unless ``keep`` is a sorted unique list of ints (in
        ``[0, rank)`` when ``rank`` is given), ``scale`` one number per kept component, and the sizes ints."""
        what = f"plan.lowrank[{name!r}]"
        for key, v, low in (("rank", self.rank, 0), ("in", self.in_features, 1), ("out", self.out_features, 1)):
            if v is not None and (not _is_int(v) or v < low):
                raise PlanError(f"{what}: {key!r} must be an int >= {low} or null, got {v!r}")
        keep = self.keep
        if not (isinstance(keep, tuple) and all(_is_int(k) for k in keep)):
            raise PlanError(f"{what}: 'keep' must be a list of ints (kept component indices), got {keep!r}")
        if list(keep) != sorted(set(keep)):
            raise PlanError(f"{what}: 'keep' must be sorted and unique, got {list(keep)[:16]}")
        if keep and (keep[0] < 0 or (self.rank is not None and keep[-1] >= self.rank)):
            raise PlanError(f"{what}: 'keep' indices must lie in [0, {self.rank}), got min {keep[0]}, "
                            f"max {keep[-1]}")
        if self.scale is not None:
            if not (isinstance(self.scale, tuple) and all(_is_number(v) for v in self.scale)):
                raise PlanError(f"{what}: 'scale' must be a list of numbers or null, got {self.scale!r}")
            if len(self.scale) != len(keep):
                raise PlanError(f"{what}: {len(self.scale)} scales for {len(keep)} kept components")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every key of :attr:`KEYS`, null where not recorded."""
        return {"in": self.in_features, "out": self.out_features, "rank": self.rank, "keep": list(self.keep),
                "scale": None if self.scale is None else list(self.scale)}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "LowRankKeep":
        """Layer ``name``'s entry from its JSON form; :class:`PlanError` names the layer and the offending key
        (unknown, missing ``keep``, or of the wrong type)."""
        if isinstance(data, LowRankKeep):
            data.check(name)
            return data
        if not isinstance(data, Mapping) or "keep" not in data:
            raise PlanError(f"plan.lowrank[{name!r}] must be a dict with 'keep' (kept component indices), "
                            f"got {data!r}")
        _keys(f"plan.lowrank[{name!r}]", data, cls.KEYS, ("keep",), "the kept component indices")
        entry = cls(keep=data["keep"], scale=data.get("scale"), rank=data.get("rank"), in_features=data.get("in"),
                    out_features=data.get("out"))
        entry.check(name)
        return entry


@dataclass(frozen=True)
class GroupSpec:
    """What a model says about one of its dependency groups (produced by :mod:`sparsekern.graph`).

    Attributes:
        size: number of channels.
        members: layer names whose channels belong to the group.
        pinned: channel index -> reason it must be kept (model input/output, an op that cannot be sliced).
    """

    size: int
    members: tuple[str, ...]
    pinned: Mapping[int, str] = field(default_factory=dict)


@dataclass
class Plan:
    """What to skip. See the module docstring for the parts.

    Build one from masks with :meth:`from_channel_masks`, from ``torch.nn.utils.prune`` masks with
    :meth:`from_torch_prune` (or weight-shaped masks, :meth:`from_weight_masks`), or from explicit keep-sets
    with :meth:`from_keep_sets`; serialize with :meth:`to_json` / :meth:`from_json` or ``sk.save``.
    """

    channels: dict[str, GroupKeep] = field(default_factory=dict)
    removed_blocks: tuple[str, ...] = ()
    #: layer name -> :class:`DynamicLayer`. Entries may also be given in their JSON form (a dict); they are
    #: parsed when the plan is validated, serialized or compiled (:meth:`dynamic_layers`).
    dynamic: dict[str, DynamicLayer] = field(default_factory=dict)
    #: layer name -> :class:`LowRankKeep` (or its JSON form, like ``dynamic``; see :meth:`lowrank_layers`).
    lowrank: dict[str, LowRankKeep] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_channel_masks(
        cls,
        model: Any,
        masks: Mapping[str, Any],
        example_inputs: Any,
        *,
        conflict: str = "error",
        meta: Mapping[str, Any] | None = None,
    ) -> "Plan":
        """Build a plan from boolean keep masks over layers' output channels.

        Args:
            model: the ``nn.Module`` the masks refer to.
            masks: layer (or group) name -> keep mask of length ``out_channels`` (bool tensor, array or list;
                True = keep). A mask on one member of a dependency group applies to the whole group.
            example_inputs: a tensor or tuple of tensors to trace the model with.
            conflict: what to do when two masks in one group disagree: ``"error"`` (default), ``"union"``
                (keep a channel if any mask keeps it) or ``"intersection"`` (keep only if all keep it).
            meta: free-form JSON-serializable information recorded in the plan (method, budget, ...).
        """
        from sparsekern.graph import trace_channels  # the only place that reads the model's dataflow

        graph = trace_channels(model, example_inputs)
        plan = graph.plan_from_masks(masks, conflict=conflict)
        if meta:
            plan.meta.update(meta)
        return plan

    @classmethod
    def from_torch_prune(
        cls, model: Any, example_inputs: Any, *, constants: str = "warn", meta: Mapping[str, Any] | None = None
    ) -> "Plan":
        """Build a plan from the ``weight_mask`` buffers that ``torch.nn.utils.prune`` left on ``model``.

        Structured masks along output channels (``prune.ln_structured(layer, "weight", amount, n, dim=0)``) and
        unstructured ones alike: an output channel whose weight row (``weight[c]``) is entirely masked is
        removed, every other channel is kept. The rules, shared with :meth:`from_weight_masks`:

        * only the layers that create a group's channels (its producers: convs and linears) decide; masks on
          other layers (norms, depthwise convs) remove nothing, they stay baked into the weights;
        * a group with several producers (a residual stream) keeps the **union** of what they keep: a
          channel goes only when every producer's row is masked (a producer without a mask keeps all), since
          the sum is zero only then;
        * pinned channels (model outputs, channels that reach an op that cannot be sliced) are kept whatever
          the masks say (listed in ``meta["kept_pinned"]``); a grouped conv or GroupNorm whose groups would keep
          different counts is refused with a :class:`PlanError` naming the layer;
        * a removed channel must be zero in the pruned model for the compiled model to equal it: a bias or
          BatchNorm shift that gives it a constant, or a LayerNorm/GroupNorm over it, makes the two differ
          (the plan drops constants, docs/design.md#semantics). ``constants="warn"`` (default) warns naming
          those layers, ``"error"`` raises :class:`PlanError`, ``"ignore"`` says nothing. Prune the BatchNorm
          (weight and bias) with the conv to make such channels exactly zero.

        ``model`` is not modified. ``sparsekern.compile(model, plan, example_inputs)`` compiles the pruned
        model as it is (reparametrisation included: compile works on
        :func:`sparsekern.masks.remove_torch_prune`'s copy, with the masks baked into the weights).

        Args:
            model: an ``nn.Module`` pruned with ``torch.nn.utils.prune`` (any layers, any methods).
            example_inputs: a tensor or tuple of tensors to trace the model with.
            constants: ``"warn"``, ``"error"`` or ``"ignore"`` (see above).
            meta: free-form JSON-serializable information recorded in the plan.
        """
        from sparsekern.masks import plan_from_torch_prune

        plan = plan_from_torch_prune(model, example_inputs, constants=constants)
        plan.meta.update(meta or {})
        return plan

    @classmethod
    def from_weight_masks(
        cls, model: Any, masks: Mapping[str, Any], example_inputs: Any, *, constants: str = "warn",
        meta: Mapping[str, Any] | None = None,
    ) -> "Plan":
        """Build a plan from weight-shaped masks: ``{layer name: mask}``, each mask of the shape of that
        layer's ``weight`` (bool or 0/1; 1 = kept). Output channels whose row ``mask[c]`` is all zero are
        removed, by the rules of :meth:`from_torch_prune`.

        The plan removes whole channels only; the other zeros of an unstructured mask are not applied to
        ``model``. Compile ``sparsekern.masks.apply_weight_masks(model, masks)`` (a masked copy) to get the
        model the masks describe, smaller.

        Raises:
            PlanError: naming the layer and the fix, for a name that is not a layer of ``model``, a mask whose
                shape is not the layer's weight shape, or values other than 0/1.
        """
        from sparsekern.masks import plan_from_weight_masks

        plan = plan_from_weight_masks(model, masks, example_inputs, constants=constants)
        plan.meta.update(meta or {})
        return plan

    @classmethod
    def from_keep_sets(
        cls, groups: Mapping[str, GroupSpec], keep: Mapping[str, Iterable[int]], **parts: Any
    ) -> "Plan":
        """Build a plan from group name -> kept indices, filling sizes and members from ``groups``."""
        channels = {}
        for name, indices in keep.items():
            if name not in groups:
                raise PlanError(_unknown_group_message(name, groups))
            spec = groups[name]
            channels[name] = GroupKeep(spec.size, tuple(sorted(int(i) for i in indices)), spec.members)
        plan = cls(channels=channels, **parts)
        plan.validate(groups)
        return plan

    # ---------------------------------------------------------------- validation
    def validate(self, groups: Mapping[str, GroupSpec] | None = None) -> "Plan":
        """Check the plan's internal consistency and, if ``groups`` is given, that it fits that model.

        Against a model, each group must exist with the same size, keep its pinned channels and, when the
        plan records the group's members, have exactly those member layers (same names and sizes are not
        enough: the layers must be coupled the same way). Raises :class:`PlanError` naming the offending
        group and the fix. Returns ``self``.
        """
        if self.version != PLAN_VERSION:
            raise PlanError(
                f"plan version {self.version} is not supported by this sparsekern (expects {PLAN_VERSION}); "
                "re-create the plan with this version"
            )
        for name, g in self.channels.items():
            g.check(name)
        self.dynamic_layers()
        self.lowrank_layers()
        if groups is None:
            return self
        for name, g in self.channels.items():
            if name not in groups:
                raise PlanError(_unknown_group_message(name, groups))
            spec = groups[name]
            if g.size != spec.size:
                raise PlanError(
                    f"group {name!r}: the plan has {g.size} channels but the model has {spec.size} "
                    f"(members {list(spec.members)[:4]}); the plan was made for a different model"
                )
            if g.members and set(g.members) != set(spec.members):
                missing = sorted(set(spec.members) - set(g.members))
                extra = sorted(set(g.members) - set(spec.members))
                raise PlanError(
                    f"group {name!r}: the plan was made for a model in which the group's layers are "
                    f"{_short(g.members)}, but in this model they are {_short(spec.members)} (in this model "
                    f"only: {_short(missing)}; in the plan only: {_short(extra)}). The model is wired "
                    "differently or is another architecture with the same layer names: build the plan on "
                    "this model"
                )
            kept = set(g.keep)
            lost = sorted(c for c in spec.pinned if c not in kept)
            if lost:
                c = lost[0]
                raise PlanError(
                    f"group {name!r} (members {list(spec.members)[:4]}): channel {c} cannot be pruned because "
                    f"{spec.pinned[c]}; keep channels {lost[:8]}{'...' if len(lost) > 8 else ''}"
                )
        return self

    # ---------------------------------------------------------------- queries
    def dynamic_layers(self) -> dict[str, DynamicLayer]:
        """The dynamic part as checked :class:`DynamicLayer` s (entries given as dicts are parsed).

        Raises:
            PlanError: naming the layer, for a malformed entry, or one whose in mask comes from a layer that
                is not a gated layer of the plan.
        """
        if not isinstance(self.dynamic, Mapping):
            raise PlanError(f"the plan's dynamic part must map layer names to specs, got {type(self.dynamic).__name__}")
        out = {name: DynamicLayer.from_dict(name, spec) for name, spec in self.dynamic.items()}
        for name, layer in out.items():
            if layer.in_from is not None:
                src = out.get(layer.in_from)
                if src is None or not src.gated:
                    raise PlanError(f"dynamic layer {name!r} reads its in mask from {layer.in_from!r}, which is "
                                    "not a gated layer of the plan")
        return out

    def lowrank_layers(self) -> dict[str, LowRankKeep]:
        """The low-rank part as checked :class:`LowRankKeep` s (entries given as dicts are parsed); raises
        :class:`PlanError` naming the layer of a malformed entry."""
        if not isinstance(self.lowrank, Mapping):
            raise PlanError(f"the plan's lowrank part must map layer names to specs, got {type(self.lowrank).__name__}")
        return {name: LowRankKeep.from_dict(name, spec) for name, spec in self.lowrank.items()}

    def keep_of(self, group: str, size: int) -> tuple[int, ...]:
        """Kept indices of ``group``; every channel when the plan leaves the group alone."""
        g = self.channels.get(group)
        return tuple(range(size)) if g is None else g.keep

    def summary(self) -> str:
        """One line per pruned group (name, kept/size), per gated layer and per low-rank layer."""
        lines = [f"Plan v{self.version}: {len(self.channels)} channel groups"]
        for name, g in self.channels.items():
            if g.n_keep < g.size:
                lines.append(f"  {name:<40s} {g.n_keep:>5d}/{g.size:<5d} kept")
        if self.removed_blocks:
            lines.append(f"  removed blocks: {', '.join(self.removed_blocks)}")
        for name, spec in self.dynamic.items():
            source = spec.get("in_from") if isinstance(spec, Mapping) else None
            g = spec.get("granularity") if isinstance(spec, Mapping) else None
            lines.append(f"  {name:<40s} gated per sample (G={g}){f', input mask from {source}' if source else ''}")
        for name, spec in self.lowrank.items():
            if isinstance(spec, Mapping) and "keep" in spec:
                rank = spec.get("rank")
                lines.append(f"  {name:<40s} rank {len(spec['keep']):>5d}/{'?' if rank is None else rank}")
        return "\n".join(lines)

    def with_channels(self, channels: Mapping[str, GroupKeep]) -> "Plan":
        """A copy of this plan with ``channels`` replaced."""
        return Plan(
            channels=dict(channels),
            removed_blocks=self.removed_blocks,
            dynamic=dict(self.dynamic),
            lowrank=dict(self.lowrank),
            meta=dict(self.meta),
            version=self.version,
        )

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "channels": {name: g.to_dict() for name, g in self.channels.items()},
            "removed_blocks": list(self.removed_blocks),
            "dynamic": {name: layer.to_dict() for name, layer in self.dynamic_layers().items()},
            "lowrank": {name: entry.to_dict() for name, entry in self.lowrank_layers().items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a sparsekern plan (expected 'format': {PLAN_FORMAT!r})")
        for part in ("dynamic", "lowrank"):
            if not isinstance(data.get(part, {}), Mapping):
                raise PlanError(f"malformed plan: its {part!r} part must map layer names to specs, got "
                                f"{type(data[part]).__name__}")
        dynamic = {name: DynamicLayer.from_dict(name, spec) for name, spec in data.get("dynamic", {}).items()}
        lowrank = {name: LowRankKeep.from_dict(name, spec) for name, spec in data.get("lowrank", {}).items()}
        try:
            channels = {name: GroupKeep.from_dict(name, g) for name, g in data["channels"].items()}
            plan = cls(
                channels=channels,
                removed_blocks=tuple(data.get("removed_blocks", ())),
                dynamic=dynamic,
                lowrank=lowrank,
                meta=dict(data.get("meta", {})),
                version=int(data["version"]),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan: {e!r}") from e
        return plan.validate()

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Plan":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _unknown_group_message(name: str, groups: Mapping[str, GroupSpec]) -> str:
    owner = [g for g, spec in groups.items() if name in spec.members]
    if owner:
        return f"{name!r} is a member of group {owner[0]!r}; key the plan by the group name {owner[0]!r}"
    return f"the model has no dependency group {name!r}; closest group names: {closest(name, groups)}"


def _short(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")

