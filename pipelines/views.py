"""The plan of views a step makes of each image (the config's `views`), resolved into what the loaders and the peers
read: groups of one size, each view with its parameter stream and its own recipe.

A step's batch holds, per group g, one tensor of `sets * count_g * b` rows ordered [set][view][image]: `sets` is the
number of distinct sets of views the objective hands out (DoGo gives each of its two peers its own; otherwise 1), and
a peer's crops of a group are one contiguous slice of it. The stream of view k of group g in set s is

    view_number(s, g, k) = sets * first(g) + s * count(g) + k,   first(g) = views of the groups before g,

so the default plan (one group of two) numbers its views 2s + k, as the two-view code did, and a plan that adds
local crops keeps the large crops' streams: a multi-crop run sees the same global views as the two-crop run of the
same seed. A view's own recipe changes only what its parameters are compared with, never the uniforms drawn.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dogo.engine.config.resolve import group_size, view_recipe
from dogo.engine.config.schema import AugmentConfig, ViewGroup

PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


@dataclass(frozen=True)
class ViewSpec:
    stream: int  # the `view` part of the parameter stream key (params.stream_keys)
    recipe: AugmentConfig  # augment with the group's, then the view's overrides


@dataclass(frozen=True)
class PlanGroup:
    name: str
    size: int  # side, px
    count: int  # views of each image per set
    sets: int
    views: tuple[ViewSpec, ...]  # sets * count, ordered [set][view]: the rows of the group's batch tensor
    # the union of the views' recipes: each probability the largest of any view's, so that a recipe for the whole
    # group (recipe.device.DeviceRecipe) runs every stage one of its views may take
    recipe: AugmentConfig


@dataclass(frozen=True)
class ViewPlan:
    groups: tuple[PlanGroup, ...]
    sets: int

    @property
    def crops(self) -> int:
        """Views per image in one set: what one peer embeds of each image."""
        return sum(g.count for g in self.groups)

    @property
    def large(self) -> int:
        """The first group's views per image in one set: the large (global) crops."""
        return self.groups[0].count

    def view_number(self, s: int, g: int, k: int) -> int:
        """The stream number of view k of group g in set s."""
        return stream_number(self.sets, sum(group.count for group in self.groups[:g]), self.groups[g].count, s, k)

    def of_set(self, groups: list[torch.Tensor], s: int) -> list[torch.Tensor]:
        """Set s's rows of each group tensor (count_g * b rows each, largest group first): slices, no copy."""
        out = []
        for group, x in zip(self.groups, groups):
            rows = x.shape[0] // self.sets
            out.append(x[s * rows:(s + 1) * rows])
        return out


def stream_number(sets: int, first: int, count: int, s: int, k: int) -> int:
    """View k of set s in a group of `count` views per set after `first` views of earlier groups: group-major, so
    that a later group never moves an earlier group's streams."""
    return sets * first + s * count + k


def plan_of(augment: AugmentConfig, views: dict[str, ViewGroup], image_size: int, sets: int) -> ViewPlan:
    """The plan of a config's `augment` and `views` for `sets` sets of views (the config is resolved and checked)."""
    groups, first = [], 0
    for name, group in views.items():
        recipes = [view_recipe(augment, group, k) for k in range(group.count)]
        specs = tuple(ViewSpec(stream_number(sets, first, group.count, s, k), recipes[k])
                      for s in range(sets) for k in range(group.count))
        union = dataclasses.replace(augment, **{p: max(getattr(r, p) for r in recipes) for p in PROBABILITIES})
        groups.append(PlanGroup(name, group_size(group, image_size), group.count, sets, specs, union))
        first += group.count
    return ViewPlan(tuple(groups), sets)


def view_plan(cfg, sets: int) -> ViewPlan:
    """The plan of a resolved Config."""
    return plan_of(cfg.augment, cfg.views, cfg.data.image_size, sets)


def two_view_plan(image_size: int, recipe: AugmentConfig, sets: int = 1) -> ViewPlan:
    """The default plan, two views of image_size per set, for loaders built outside a run (benchmarks, tests)."""
    return plan_of(recipe, {"global": ViewGroup()}, image_size, sets)
