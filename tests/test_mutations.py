"""A mutation check: each realistic bug below, planted one at a time, fails a fast test.

Every case first runs its target tests on the code as it is (they must pass), then plants
its bug with pytest's monkeypatch (undone when the case ends, so nothing leaks into the
next case) and runs them again: every one must fail with an AssertionError. A bug is
planted in the module that defines the function and in every module of this repository
that imported it by name (`from x import f`), as an edited source file would be seen.

When a bug is fixed, add it here with the fast test that now catches it.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import datasets
import masking_generator
import metrics
import modeling_pmad
import protocols
import protoflow
import utils
import test_datasets
import test_masking_generator
import test_metrics
import test_modeling_pmad
import test_protoflow
import test_protocols
import test_training
from conftest import fake_two_rank_world

ROOT = Path(__file__).resolve().parents[1]


def plant(monkeypatch: pytest.MonkeyPatch, module, name: str, bug: Callable) -> None:
    """Replace module.<name> by `bug` there and wherever this repository's loaded modules
    (tests included) hold the same object."""
    original = getattr(module, name)
    for mod in list(sys.modules.values()):
        path = getattr(mod, "__file__", None)
        if not path or not path.startswith(str(ROOT)):
            continue
        for key, value in list(vars(mod).items()):
            if value is original:
                monkeypatch.setattr(mod, key, bug)


# ----------------------------------------------------------------------------- the bugs
def dropped_abnormality_map(mp: pytest.MonkeyPatch) -> None:
    """PMAD's score map without ProtoFlow's abnormality map (CE alone)."""
    original = protocols.pmad_maps
    plant(mp, protocols, "pmad_maps", lambda scores, abnormality, *a, **k: original(
        scores, torch.ones_like(abnormality), *a, **k))


def anomalous_at_the_threshold(mp: pytest.MonkeyPatch) -> None:
    """`>=` for `>` in ProtoFlow's anomalous call."""
    plant(mp, protoflow, "is_anomalous", lambda scores, threshold: scores >= threshold)


def no_gradient_clipping(mp: pytest.MonkeyPatch) -> None:
    """clip_grad_norm_(params, inf): the norm is measured, nothing is clipped."""
    original = torch.nn.utils.clip_grad_norm_
    mp.setattr(torch.nn.utils, "clip_grad_norm_",
               lambda params, max_norm, *a, **k: original(params, math.inf, *a, **k))


def relative_position_without_offset(mp: pytest.MonkeyPatch) -> None:
    """BEiT's index without the + (G - 1) offsets: negative distances wrap around the
    bias table silently instead of raising."""
    def index(grid_size):
        out = original(grid_size)
        gh, gw = grid_size
        out[1:, 1:] -= (gh - 1) * (2 * gw - 1) + (gw - 1)
        return out

    original = modeling_pmad.relative_position_index
    plant(mp, modeling_pmad, "relative_position_index", index)


def masked_count_rounded(mp: pytest.MonkeyPatch) -> None:
    """round(L * r) for the paper's int(L * r) (59 patches at 0.3 instead of 58)."""
    plant(mp, masking_generator, "num_masked", lambda ratio, num_patches: round(
        num_patches * ratio))


def normalisation_swapped(mp: pytest.MonkeyPatch) -> None:
    """(std, mean) for (mean, std)."""
    original = datasets.normalization
    plant(mp, datasets, "normalization", lambda *a, **k: tuple(reversed(original(*a, **k))))


class _NoAllReduce:
    """torch.distributed as masking_generator sees it, with all_reduce doing nothing."""

    def __getattr__(self, name: str):
        if name == "all_reduce":
            return lambda *a, **k: None
        return getattr(torch.distributed, name)


def dynamic_statistics_not_all_reduced(mp: pytest.MonkeyPatch) -> None:
    """DynamicMaskingState.update adds this rank's batch only."""
    mp.setattr(masking_generator, "dist", _NoAllReduce())


def loss_not_all_reduced(mp: pytest.MonkeyPatch) -> None:
    """utils.all_reduce_sum returns this rank's value."""
    plant(mp, utils, "all_reduce_sum", lambda tensor: tensor)


def proposals_of_the_likeliest_patches(mp: pytest.MonkeyPatch) -> None:
    """The log-likelihood's sign flipped: proposals mask the likeliest patches first."""
    original = protoflow.proposals_from_log_likelihood
    plant(mp, protoflow, "proposals_from_log_likelihood",
          lambda logp, *a, **k: original(-logp, *a, **k))


def dynamic_weights_uniform(mp: pytest.MonkeyPatch) -> None:
    """The dynamic statistics never reach the masks (uniform class weights)."""
    mp.setattr(masking_generator.DynamicMaskingState, "class_weights",
               lambda self: torch.ones(len(self.class_names), self.num_patches))


def aupro_without_its_limit(mp: pytest.MonkeyPatch) -> None:
    """AUPRO integrated over the whole FPR range instead of up to fpr_limit (0.3)."""
    original = metrics._aupro
    plant(mp, metrics, "_aupro", lambda ranked, fpr_limit, name: original(ranked, 1.0, name))


def _in_two_rank_world(test: Callable[[list], None]) -> Callable[[], None]:
    def run() -> None:
        with pytest.MonkeyPatch.context() as mp:
            test(fake_two_rank_world(mp))
    run.__name__ = test.__name__
    return run


MUTATIONS: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], list[Callable[[], None]]]] = {
    "dropped abnormality map": (dropped_abnormality_map, [
        test_protocols.test_pmad_map_of_a_2x2_patch_case_by_hand,
        test_protocols.test_weighted_log_map_of_a_2x2_patch_case_by_hand]),
    ">= for > in the anomalous call": (anomalous_at_the_threshold, [
        test_protoflow.test_anomalous_call_is_strict_at_the_threshold,
        test_protocols.test_a_score_equal_to_the_threshold_is_called_normal]),
    "no gradient clipping": (no_gradient_clipping, [
        test_training.test_a_huge_gradient_is_clipped_to_clip_grad]),
    "relative-position offset": (relative_position_without_offset, [
        test_modeling_pmad.test_relative_position_index_formula]),
    "masked count": (masked_count_rounded, [
        test_masking_generator.test_class_ratios_and_num_masked]),
    "normalisation swap": (normalisation_swapped, [
        test_datasets.test_normalization_follows_the_flag]),
    "skipped all-reduce of the dynamic statistics": (dynamic_statistics_not_all_reduced, [
        _in_two_rank_world(
            test_masking_generator.test_dynamic_state_update_adds_the_other_ranks_batch)]),
    "skipped all-reduce of the loss": (loss_not_all_reduced, [
        _in_two_rank_world(test_training.test_loss_all_ranks_is_the_sum_over_ranks)]),
    "log-likelihood sign in the proposals": (proposals_of_the_likeliest_patches, [
        test_protoflow.test_test_ranks_follow_the_planted_anomaly,
        test_protocols.test_pmad_map_of_a_2x2_patch_case_by_hand]),
    "dynamic weights not used": (dynamic_weights_uniform, [
        test_masking_generator.test_dynamic_weights_change_the_masks_from_dynamic_start]),
    "AUPRO integration limit": (aupro_without_its_limit, [
        test_metrics.test_pixel_aupro_interpolates_inside_a_tie_group]),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_planted_bug_fails_a_fast_test(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mutate, targets = MUTATIONS[name]
    for test in targets:
        test()  # the code as it is passes
    mutate(monkeypatch)
    passed = []
    for test in targets:
        try:
            test()
        except AssertionError:
            continue
        passed.append(test.__name__)
    assert not passed, f"planted bug '{name}' passes {passed}"


def test_plant_reaches_names_imported_elsewhere() -> None:
    """The planting itself: a by-name import (the test module's `normalization`) sees the
    bug, and the monkeypatch undoes it."""
    with pytest.MonkeyPatch.context() as mp:
        normalisation_swapped(mp)
        assert test_datasets.normalization(False) == ((0.5,) * 3, (0.5,) * 3)
        assert test_datasets.normalization(True)[0] == (0.229, 0.224, 0.225)
        assert datasets.normalization is test_datasets.normalization
    assert test_datasets.normalization(True)[0] == (0.485, 0.456, 0.406)
    assert datasets.normalization is test_datasets.normalization
