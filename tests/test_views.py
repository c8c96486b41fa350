"""The plan of views (the config's `views`): its stream numbers, its per-view recipes, its checks, how files and
overrides state it."""
import dataclasses

import pytest
import yaml

from dogo.core.errors import ConfigError
from dogo.engine import config as config_mod
from dogo.engine.config.loading import build_file
from dogo.engine.config.resolve import resolve
from dogo.pipelines.views import plan_of, two_view_plan, view_plan

SIMCLR = ["objective.name=simclr", "device=cpu"]
MULTI = "views={global: {count: 2, view_recipe: {0: {blur_p: 1.0}, 1: {blur_p: 0.1, solarize_p: 0.2}}}, " \
        "local: {count: 3, size: 16, recipe: {crop_scale: [0.05, 0.4], blur_p: 0.5}}}"


def _resolved(*overrides):
    """Built and resolved, not checked (the checks are tested on their own)."""
    return resolve(build_file(None, [*SIMCLR, "data.image_size=32", *overrides]))


def test_the_default_plan_numbers_views_as_the_two_view_code():
    """Two views per set: 0, 1 for one set, 0..3 for DoGo's two (its pairs (0, 1) and (2, 3)); every view's recipe
    is augment itself."""
    cfg = _resolved()
    for sets, streams in ((1, [0, 1]), (2, [0, 1, 2, 3])):
        plan = view_plan(cfg, sets)
        (group,) = plan.groups
        assert [v.stream for v in group.views] == streams and group.size == 32
        assert all(v.recipe == cfg.augment for v in group.views) and group.recipe == cfg.augment
        assert (plan.crops, plan.large) == (2, 2)
        assert [plan.view_number(s, 0, k) for s in range(sets) for k in range(2)] == streams
    assert view_plan(cfg, 2) == two_view_plan(32, cfg.augment, sets=2)


@pytest.mark.parametrize("sets", [1, 2])
def test_local_crops_keep_the_large_crops_streams(sets):
    two = view_plan(_resolved(), sets)
    multi = view_plan(_resolved(MULTI), sets)
    assert [v.stream for v in multi.groups[0].views] == [v.stream for v in two.groups[0].views]
    local = multi.groups[1]
    assert [v.stream for v in local.views] == list(range(2 * sets, 5 * sets))  # after every set's large crops
    assert (multi.crops, multi.large, local.size, local.count) == (5, 2, 16, 3)
    for g, group in enumerate(multi.groups):
        assert [v.stream for v in group.views] == [multi.view_number(s, g, k) for s in range(sets)
                                                   for k in range(group.count)]
    streams = [v.stream for group in multi.groups for v in group.views]
    assert sorted(streams) == list(range(5 * sets))  # every view its own stream


def test_overrides_resolve_per_view_and_the_group_recipe_is_their_union():
    cfg = _resolved(MULTI)
    plan = view_plan(cfg, 2)
    large, local = plan.groups
    blur = [v.recipe.blur_p for v in large.views]
    assert blur == [1.0, 0.1, 1.0, 0.1]  # per view, in both sets
    assert [v.recipe.solarize_p for v in large.views] == [0.0, 0.2, 0.0, 0.2]
    assert all(v.recipe.crop_scale == cfg.augment.crop_scale for v in large.views)
    assert all(v.recipe.crop_scale == (0.05, 0.4) and v.recipe.blur_p == 0.5 for v in local.views)
    assert large.recipe.blur_p == 1.0 and large.recipe.solarize_p == 0.2  # the union: each stage some view takes
    assert local.recipe == dataclasses.replace(cfg.augment, blur_p=0.5)
    # only what an override sets differs from augment
    changed = {f.name for f in dataclasses.fields(cfg.augment)
               if getattr(large.views[1].recipe, f.name) != getattr(cfg.augment, f.name)}
    assert changed == {"blur_p", "solarize_p"}


@pytest.mark.parametrize("override, message", [
    ("views={global: {count: 1}}", r"views.global.count=1: the large crops are paired by every method: at least 2"),
    ("views={global: {count: 2}, local: {count: 0, size: 16}}", r"views.local.count=0: .*at least 1"),
    ("views={global: {count: 2, size: 16}}", r"views.global.size=16 differs from data.image_size=32"),
    ("views={global: {count: 2}, local: {count: 4, size: 32}}",
     r"views.local.size=32 is not below views.global.size=32: one forward per size"),
    ("views={global: {count: 2}, local: {count: 4, size: 4}}", r"views.local.size=4 is too small"),
    ("views={global: {count: 2}, local: {count: 4, size: 16, recipe: {crop_scale: [0.5, 0.1]}}}",
     r"views.local.recipe.crop_scale must satisfy 0 < min <= max <= 1"),
    ("views={global: {count: 2, view_recipe: {1: {blur_p: 1.5}}}}",
     r"views.global.view_recipe.1.blur_p is a probability"),
    ("views={global: {count: 2, view_recipe: {2: {blur_p: 1.0}}}}",
     r"views.global.view_recipe.2: views are numbered 0 to 1"),
    ("views={'global crops': {count: 2}}", r"'global crops' is not a usable group name"),
    ("views={global: {cuont: 2}}", r"unknown key 'views.global.cuont'; did you mean 'views.global.count'"),
    ("views={}", r"views: expected a non-empty mapping"),
])
def test_each_bad_plan_is_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, [*SIMCLR, "data.image_size=32", override])


def test_a_method_of_two_crops_alone_refuses_local_crops():
    """Alone, SimSiam, VICReg, Barlow Twins and MoCo take the two large crops only (as solo-learn's): more crops
    would cost their forward and teach nothing, so they are refused, not ignored. Under DoGo or DisCo the KL or the
    distillation uses them; SimCLR and BYOL use them alone."""
    for method in ("vicreg", "simsiam", "barlowtwins", "mocov2"):
        with pytest.raises(ConfigError, match=f"objective.name={method}: {method} uses the two large crops only"):
            config_mod.load(None, ["device=cpu", "data.image_size=32", f"objective.name={method}", MULTI])
    for method in ("simclr", "byol"):
        config_mod.load(None, ["device=cpu", "data.image_size=32", f"objective.name={method}", MULTI])
    two_peers = "peers={a: {ssl: vicreg}, b: {ssl: simclr}}"
    config_mod.load(None, ["device=cpu", "data.image_size=32", "objective.name=dogo", two_peers, MULTI])
    # two large crops with recipes of their own are two crops still
    config_mod.load(None, ["device=cpu", "data.image_size=32", "objective.name=vicreg",
                           "views.global.view_recipe={1: {solarize_p: 0.2}}"])


def test_views_in_a_base_file_are_replaced_not_merged(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"views": {"global": {"count": 2}, "local": {"count": 6, "size": 16}}}))
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"base": "base.yaml", "views": {"global": {"count": 2, "recipe": {"blur_p": 0.0}}}}))
    cfg = build_file(top, SIMCLR)
    assert list(cfg.views) == ["global"] and cfg.views["global"].recipe.blur_p == 0.0
    assert list(build_file(base).views) == ["global", "local"]


def test_a_plan_round_trips_through_the_written_config(tmp_path):
    """The run's config.yaml states only the overrides a plan sets, and loads back to the same plan."""
    cfg = _resolved(MULTI)
    text = config_mod.dump_text(cfg)
    written = yaml.safe_load(text)["views"]
    assert written["global"]["recipe"] == {} and written["local"]["view_recipe"] == {}
    assert written["global"]["view_recipe"] == {"0": {"blur_p": 1.0}, "1": {"blur_p": 0.1, "solarize_p": 0.2}}
    again = config_mod.stored(yaml.safe_load(text))
    assert again.views == cfg.views
    assert plan_of(again.augment, again.views, 32, 2) == view_plan(cfg, 2)


def test_a_vit_takes_several_sizes_through_timm_dynamic_size():
    pytest.importorskip("timm")
    vit = ["peers={v: {arch: 'timm:vit_tiny_patch16_224', arch_args: {patch_size: 4}}}"]
    assert "dynamic_img_size" not in _resolved(*vit).peers["v"].arch_args  # one size: nothing to add
    assert _resolved(*vit, MULTI).peers["v"].arch_args == {"patch_size": 4, "dynamic_img_size": True}
    with pytest.raises(ConfigError, match="dynamic_img_size=false: .* views come in 2 sizes"):
        config_mod.load(None, [*SIMCLR, "data.image_size=32", MULTI,
                               "peers={v: {arch: 'timm:vit_tiny_patch16_224', arch_args: {dynamic_img_size: false}}}"])
