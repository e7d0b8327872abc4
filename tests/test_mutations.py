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
import engine
import masking_generator
import metrics
import modeling_pmad
import protocols
import protoflow
import utils
import test_datasets
import test_engine
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


def pmad_map_not_smoothed(mp: pytest.MonkeyPatch) -> None:
    """PMAD's map returned without its Gaussian blur (sigma ignored)."""
    original = protocols.pmad_maps
    plant(mp, protocols, "pmad_maps", lambda scores, abnormality, grid, sigma, *a, **k:
          original(scores, abnormality, grid, 0.0, *a, **k))


def baseline_maps_not_smoothed(mp: pytest.MonkeyPatch) -> None:
    """The baselines' maps returned without their Gaussian blur (sigma ignored)."""
    original = protocols.baseline_maps
    plant(mp, protocols, "baseline_maps", lambda data, abnormality, token_scores, grid,
          sigma: original(data, abnormality, token_scores, grid, 0.0))


def pixel_metrics_smoothed_once(mp: pytest.MonkeyPatch) -> None:
    """The paper protocol's pixel metrics on PMAD's map without the second smoothing
    (the pixel maps evaluate_maps is given are ignored)."""
    original = protocols.evaluate_maps
    plant(mp, protocols, "evaluate_maps", lambda data, maps, pixel_maps=None, scores=None:
          original(data, maps, None, scores))


def mask_seeds_ignore_the_seed(mp: pytest.MonkeyPatch) -> None:
    """Every --seed gives the images the random test masks of seed 0."""
    original = protocols.mask_seeds
    plant(mp, protocols, "mask_seeds", lambda image_ids, seed: original(image_ids, 0))


def aspect_range_widened(mp: pytest.MonkeyPatch) -> None:
    """Block aspect ratios drawn from [0.15, 6.7] instead of BEiT's [0.3, 1/0.3]."""
    mp.setattr(masking_generator, "LOG_ASPECT", (math.log(0.15), math.log(6.7)))


def prototypes_of_class_0(mp: pytest.MonkeyPatch) -> None:
    """prototypes[0] for prototypes[k]: a mixed batch is scored against class 0's bank."""
    original = protoflow.patch_log_likelihood
    plant(mp, protoflow, "patch_log_likelihood",
          lambda encoder, flow, images, prototypes, *a, **k: original(
              encoder, flow, images, [prototypes[0]] * len(prototypes), *a, **k))


def loss_weights_ignored(mp: pytest.MonkeyPatch) -> None:
    """train_step's loss as weighted_mean(ce, None): the rank weights never reach it."""
    original = engine.weighted_mean
    plant(mp, engine, "weighted_mean", lambda values, weights: original(values, None))


def patch_losses_scattered_reversed(mp: pytest.MonkeyPatch) -> None:
    """scatter_masked's index path writes values.flip(0): each masked patch gets another's
    loss."""
    original = engine.scatter_masked
    plant(mp, engine, "scatter_masked", lambda values, masks, index=None: original(
        values if index is None else values.flip(0), masks, index))


def mlm_acc_against_the_next_patch(mp: pytest.MonkeyPatch) -> None:
    """train_step's accuracy compares the predictions with the next patch's token
    (index + 1); the loss's targets stay right."""
    original = engine.masked_tokens

    def targets(tokens, masks, index=None):
        if sys._getframe(1).f_code.co_name != "train_step":
            return original(tokens, masks, index)
        index = masks.reshape(-1).nonzero()[:, 0] if index is None else index
        return original(tokens, masks, (index + 1) % tokens.numel())

    plant(mp, engine, "masked_tokens", targets)


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
    "PMAD map not smoothed": (pmad_map_not_smoothed, [
        test_protocols.test_clean_maps_are_gaussian_smoothed_with_sigma,
        test_protocols.test_paper_protocol_smooths_twice_for_the_pixel_metrics]),
    "baseline maps not smoothed": (baseline_maps_not_smoothed, [
        test_protocols.test_clean_maps_are_gaussian_smoothed_with_sigma]),
    "pixel metrics without the second smoothing": (pixel_metrics_smoothed_once, [
        test_protocols.test_paper_protocol_smooths_twice_for_the_pixel_metrics]),
    "mask seeds ignore --seed": (mask_seeds_ignore_the_seed, [
        test_protocols.test_mask_seeds_depend_on_the_seed_and_the_image_alone]),
    "block aspect range widened": (aspect_range_widened, [
        test_masking_generator.test_block_aspect_ratio_spans_exactly_0_3_to_1_over_0_3,
        test_masking_generator.test_block_log_aspect_is_uniform_on_ln_0_3_to_ln_1_over_0_3]),
    "mixed batch scored against class 0's prototypes": (prototypes_of_class_0, [
        test_protoflow.test_mixed_batch_scores_each_image_against_its_own_class]),
    "loss weights ignored": (loss_weights_ignored, [
        test_engine.test_train_step_loss_uses_the_rank_weights]),
    "patch losses scattered reversed": (patch_losses_scattered_reversed, [
        test_engine.test_train_step_patch_losses_sit_at_their_patches]),
    "mlm_acc against a wrong target": (mlm_acc_against_the_next_patch, [
        test_engine.test_train_step_mlm_acc_counts_exact_token_predictions]),
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
