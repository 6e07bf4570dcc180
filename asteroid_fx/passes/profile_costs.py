"""profile_costs: LayerGraph + DeviceProfiles -> LayerGraph whose costs for the profiled device
kinds are the profiles' (measured on the device, or calibrated from one that was).

Expects profiles of this very graph (same fingerprint: a ProfileError says how one differs),
complete, at most one per device kind, each for a kind the graph has costs for. Profiles may be
given as DeviceProfile values or as paths to profile files.
Guarantees: a new LayerGraph (the input is not changed) in which, for every profiled kind, layer
i's Cost is ``profile.layer_cost(i)`` (source "measured" or "calibrated", times monotone in rows,
as inside a stage too big for the cache, which a planner's stages are)
and other kinds keep their analytic costs; ``saved_bytes_per_row`` becomes the largest per-row
activation bytes the profiles measured with saved-tensor hooks, each tensor in the first layer that
saves it, as ``annotate_costs`` attributes them (``DeviceProfile.layer_saved_bytes_per_row``: a
boundary tensor both layer i - 1 and layer i save counts in layer i - 1; from a profile that does
not say which saved storages are boundary values, each layer's bytes as measured alone); nothing
else changes.
Not carried: the per-stage call overhead (``profile.overhead``) and the warmer cache of a stage
small enough to keep its data there. A LayerGraph's stage time is a sum over layers, so through it
a stage's prediction is short by that constant (tens of microseconds on a CPU) and a small
stage's is long; ``DeviceProfile.stage_time`` has both.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from asteroid_fx.ir.layer_graph import LayerGraph
from asteroid_fx.ir.profile import DeviceProfile, ProfileError, check_matches, load


def profile_costs(lg: LayerGraph, profiles: Iterable[DeviceProfile | str | os.PathLike[str]], *,
                  max_layers: int | None, model: str | None = None) -> LayerGraph:
    by_kind: dict[str, DeviceProfile] = {}
    for item in profiles:
        origin = str(item) if not isinstance(item, DeviceProfile) else f"profile of {item.kind}"
        p = item if isinstance(item, DeviceProfile) else load(item)
        if not p.complete:
            raise ProfileError(f"{origin}: partial profile; finish it (run the same `asteroid profile` "
                               "command again) before compiling with it")
        check_matches(p, lg, max_layers, model=model, origin=origin)
        if p.kind in by_kind:
            raise ProfileError(f"{origin}: a second profile for device kind {p.kind!r}; give one per kind")
        if p.kind not in lg.kinds:
            raise ProfileError(f"{origin}: profile is for device kind {p.kind!r}, but the cluster has kinds "
                               f"{', '.join(lg.kinds) or '(none)'}; measure with --kind set to one of them "
                               "or leave this profile out")
        by_kind[p.kind] = p
    if not by_kind:
        return lg
    layers = []
    saved_by_kind = [p.layer_saved_bytes_per_row(0, len(lg)) for p in by_kind.values()]
    for i, layer in enumerate(lg.layers):
        costs = tuple((k, by_kind[k].layer_cost(i) if k in by_kind else c) for k, c in layer.costs)
        saved = max(per_layer[i] for per_layer in saved_by_kind)
        layers.append(dataclasses.replace(layer, costs=costs, saved_bytes_per_row=saved))
    return dataclasses.replace(lg, layers=tuple(layers))
