"""Per-segment attributes: parameter groups as rows of the segment table
(ARCHITECTURE.md, principle 9).

Each segment of a FlatBuffer (one variable) has a learning-rate multiplier m (default
1) and weight decay on or off (default on). Segment s is updated exactly as the same
optimizer with learning rate m*lr would update it: the rate of the step (after its
schedule and Keras 2's decay) is multiplied by m before the rule's scalars are
computed from it, so every scalar that depends on the rate (Adam's bias-corrected
alpha, Ftrl's l2 term) and the decoupled weight decay p*wd*(m*lr) use m*lr. With decay
off the segment gets no weight decay, as Keras' `exclude_from_weight_decay` and a torch
parameter group with weight_decay=0.

The attributes belong to the optimizer, not the buffer: they are how an optimizer
treats each variable (Keras' exclusions and torch's param_groups are optimizer
settings), the gradient buffer and a second optimizer on the same parameters need
not share them, and they are saved with the optimizer's config and state. What the
optimizer is asked (`SegmentRequest`: per-segment lists, and Keras' exclusions by
segment index or name pattern) is resolved against the buffer when the optimizer is
built (`resolve`), into one (multiplier, decay) per segment (`SegmentTable`).

The executors see groups: the distinct (multiplier, decay) pairs, at most MAX_GROUPS,
and each segment's group (`SegmentTable.groups`). A step computes its scalars once per
group and every tile of work lies inside one group, so a step is still one launch.
"""

import math
import numbers
import re
from typing import NamedTuple

import numpy as np

from . import _kernels

MAX_GROUPS = _kernels.CONSTANTS["FO_MAX_GROUPS"]


class SegmentTable(NamedTuple):
    """One learning-rate multiplier and one weight-decay switch per segment."""

    multipliers: tuple
    decay: tuple

    @classmethod
    def default(cls, nsegments):
        return cls((1.0,) * nsegments, (True,) * nsegments)

    @property
    def is_default(self):
        return all(m == 1.0 for m in self.multipliers) and all(self.decay)

    def groups(self):
        """([(multiplier, decay)] distinct pairs in order of first appearance, and each
        segment's index into that list). Group 0 is segment 0's (or the default)."""
        pairs, segment_group = [], []
        for pair in zip(self.multipliers, self.decay):
            if pair not in pairs:
                pairs.append(pair)
            segment_group.append(pairs.index(pair))
        return pairs or [(1.0, True)], segment_group

    def to_dict(self):
        return {"lr_multipliers": list(self.multipliers), "decay": list(self.decay)}


def group_runs(offsets, segment_group):
    """(run starts + the total size, each run's group): maximal element ranges of one
    group, merging neighbouring segments of the same group, skipping empty ones. Work
    tiles split at run starts never straddle two groups."""
    starts, groups = [], []
    for s, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        if a == b:
            continue
        if not groups or groups[-1] != segment_group[s]:
            starts.append(a)
            groups.append(segment_group[s])
    if not starts:
        starts, groups = [0], [0]
    return np.array(starts + [offsets[-1]], dtype=np.int64), np.array(groups, dtype=np.int32)


def group_values(pairs):
    """The executors' group table: [multiplier, 1.0 or 0.0 (decay)] per group, flat."""
    return np.array([x for m, d in pairs for x in (m, 1.0 if d else 0.0)], dtype=np.float64)


class SegmentRequest:
    """What an optimizer was asked: per-segment lists (None: the default for every
    segment) and Keras' exclusions from weight decay (segment indices, and regular
    expressions searched in segment names). Immutable; checked on creation."""

    def __init__(self, lr_multipliers=None, decay=None, exclude_indices=(), exclude_names=()):
        self.lr_multipliers = _check_multipliers(lr_multipliers)
        self.decay = _check_decay(decay)
        self.exclude_indices = _check_indices(exclude_indices)
        self.exclude_names = _check_names(exclude_names)
        # Keras joins the names into one pattern and searches each variable's name.
        self._pattern = re.compile("|".join(sorted(set(self.exclude_names)))) \
            if self.exclude_names else None

    @property
    def is_default(self):
        return (self.lr_multipliers is None and self.decay is None
                and not self.exclude_indices and not self.exclude_names)

    def replace(self, **changes):
        fields = dict(lr_multipliers=self.lr_multipliers, decay=self.decay,
                      exclude_indices=self.exclude_indices, exclude_names=self.exclude_names)
        fields.update(changes)
        return SegmentRequest(**fields)

    def resolve(self, nsegments, names=None):
        """The SegmentTable for a buffer of `nsegments` segments named `names` (or
        None); ValueError when a list has another length, an index is out of range,
        names are asked for but the buffer has none, or there are too many groups."""
        for arg, values in (("lr_multipliers", self.lr_multipliers), ("decay", self.decay)):
            if values is not None and len(values) != nsegments:
                raise ValueError(f"`{arg}` has {len(values)} values but `params` have "
                                 f"{nsegments} segments: give one per segment")
        for i in self.exclude_indices:
            if i >= nsegments:
                raise ValueError(f"`var_list` names segment {i}, but `params` have "
                                 f"{nsegments} segments")
        if self._pattern is not None and names is None:
            raise ValueError("`var_names` are matched against segment names, but `params` "
                             "have none: create the FlatBuffer with names=..., or exclude "
                             "segments by index with var_list=[...]")
        table = SegmentTable(
            self.lr_multipliers or (1.0,) * nsegments,
            tuple((self.decay[s] if self.decay is not None else True)
                  and s not in self.exclude_indices
                  and not (self._pattern is not None and self._pattern.search(names[s]))
                  for s in range(nsegments)))
        count = len(table.groups()[0])
        if count > MAX_GROUPS:
            raise ValueError(f"the segment attributes form {count} distinct (lr multiplier, "
                             f"weight decay) groups; at most {MAX_GROUPS} are supported")
        return table

    # ------------------------------------------------------------------ config
    def to_config(self):
        """A JSON-able dict, or None for the default (so Keras configs stay as they are)."""
        if self.is_default:
            return None
        return {"lr_multipliers": None if self.lr_multipliers is None else list(self.lr_multipliers),
                "decay": None if self.decay is None else list(self.decay),
                "exclude_from_weight_decay": {"var_list": sorted(self.exclude_indices),
                                              "var_names": list(self.exclude_names)}}

    @classmethod
    def from_config(cls, config):
        """The inverse of to_config (None or a dict); errors name `segment_attributes`."""
        if config is None:
            return cls()
        if not isinstance(config, dict):
            raise TypeError(f"`segment_attributes` must be a dict from get_config() or None, "
                            f"got {type(config).__name__}")
        unknown = set(config) - {"lr_multipliers", "decay", "exclude_from_weight_decay"}
        if unknown:
            raise ValueError(f"`segment_attributes` has unknown keys {sorted(unknown)}")
        exclude = config.get("exclude_from_weight_decay") or {}
        if not isinstance(exclude, dict) or set(exclude) - {"var_list", "var_names"}:
            raise ValueError("`segment_attributes['exclude_from_weight_decay']` must be a dict "
                             "with 'var_list' and 'var_names'")
        return cls(config.get("lr_multipliers"), config.get("decay"),
                   exclude.get("var_list") or (), exclude.get("var_names") or ())


# ---------------------------------------------------------------- checks
def _sequence(name, values):
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"`{name}` must be a list with one value per segment, got "
                        f"{type(values).__name__}")
    return list(values.tolist() if isinstance(values, np.ndarray) else values)


def _check_multipliers(values):
    if values is None:
        return None
    out = []
    for i, m in enumerate(_sequence("lr_multipliers", values)):
        if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Real):
            raise TypeError(f"`lr_multipliers[{i}]` must be a number, got {type(m).__name__}")
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"`lr_multipliers[{i}]` must be finite and >= 0, got {m!r}")
        out.append(float(m))
    return tuple(out)


def _check_decay(values):
    if values is None:
        return None
    out = []
    for i, d in enumerate(_sequence("decay", values)):
        if not isinstance(d, (bool, np.bool_)):
            raise TypeError(f"`decay[{i}]` must be True or False, got {type(d).__name__}: {d!r}")
        out.append(bool(d))
    return tuple(out)


def _check_indices(values):
    out = set()
    for i, s in enumerate(_sequence("var_list", values)):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"`var_list[{i}]` must be a segment index (an int), got "
                            f"{type(s).__name__}")
        if s < 0:
            raise ValueError(f"`var_list[{i}]` must be a segment index >= 0, got {s}")
        out.add(int(s))
    return frozenset(out)


def _check_names(values):
    out = []
    for i, n in enumerate(_sequence("var_names", values)):
        if not isinstance(n, str):
            raise TypeError(f"`var_names[{i}]` must be a string, got {type(n).__name__}")
        try:
            re.compile(n)
        except re.error as e:
            raise ValueError(f"`var_names[{i}]` is not a valid regular expression: {e}") from e
        out.append(n)
    return tuple(out)
