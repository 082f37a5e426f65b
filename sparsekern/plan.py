"""The Plan: a small, serializable description of what a pruned model may skip.

A plan knows nothing of torch modules beyond names and sizes. It has one part per kind of pruning
(docs/design.md#the-plan):

* ``channels``: for each *dependency group* of coupled channels (see :mod:`sparsekern.graph`), the sorted
  indices of the channels that are kept. A group is named after its first producer in topological order
  (for example ``"layer1.0.conv1"``); ``members`` records every layer whose channels belong to it.
* ``removed_blocks``: residual blocks replaced by their shortcut (depth pruning, TAS).
* ``dynamic``: per-sample gated layers (SANP; compiled by :mod:`sparsekern.dynamic`); ``lowrank``: per-matrix
  rank keep-sets (FLOP; compiled by :mod:`sparsekern.lowrank`). Their formats are defined there.

Plans are validated against the dependency groups of a concrete model with :meth:`Plan.validate`, which
raises :class:`PlanError` naming the group or layer and what would fix it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

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

    Build one from masks with :meth:`from_channel_masks`, or from explicit keep-sets with
    :meth:`from_keep_sets`; serialize with :meth:`to_json` / :meth:`from_json` or ``sk.save``.
    """

    channels: dict[str, GroupKeep] = field(default_factory=dict)
    removed_blocks: tuple[str, ...] = ()
    dynamic: dict[str, Any] = field(default_factory=dict)
    lowrank: dict[str, Any] = field(default_factory=dict)
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
                lines.append(f"  {name:<40s} rank {len(spec['keep']):>5d}/{spec.get('rank', '?')}")
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
            "channels": {
                name: {
                    "size": g.size,
                    "keep": list(g.keep),
                    "members": list(g.members),
                    **({"scores": list(g.scores)} if g.scores is not None else {}),
                }
                for name, g in self.channels.items()
            },
            "removed_blocks": list(self.removed_blocks),
            "dynamic": self.dynamic,
            "lowrank": self.lowrank,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a sparsekern plan (expected 'format': {PLAN_FORMAT!r})")
        try:
            channels = {
                name: GroupKeep(int(g["size"]), tuple(g["keep"]), tuple(g.get("members", ())), g.get("scores"))
                for name, g in data["channels"].items()
            }
            plan = cls(
                channels=channels,
                removed_blocks=tuple(data.get("removed_blocks", ())),
                dynamic=dict(data.get("dynamic", {})),
                lowrank=dict(data.get("lowrank", {})),
                meta=dict(data.get("meta", {})),
                version=int(data["version"]),
            )
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
    close = sorted(groups, key=lambda g: _distance(g, name))[:3]
    return f"the model has no dependency group {name!r}; closest group names: {close}"


def _short(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def _distance(a: str, b: str) -> int:
    """Levenshtein distance (for 'did you mean' hints)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
