"""CLAD's training settings in isolation: its phases (batches, which epoch each keeps) and the GAS radius statistic."""

import numpy as np
import pytest

from core.errors import CladError
from stages.heads.clad import CladSettings
from stages.heads.clad_train import phase_batches


def _kept(select: str, **kw) -> dict[str, bool]:
    return {ph.name: ph.select_best for ph, _ in phase_batches(CladSettings(keep_epoch=select, **kw))}


def test_keep_epoch_probe_keeps_each_phases_best_probe_epoch():
    assert _kept("probe") == {"contrastive": True, "finetune": True}


def test_keep_epoch_paper_fine_tunes_the_best_contrastive_model_and_keeps_the_last_fine_tuned_one():
    assert _kept("paper") == {"contrastive": True, "finetune": False}


def test_keep_epoch_last_keeps_every_phases_last_epoch():
    assert _kept("last") == {"contrastive": False, "finetune": False}


def test_phases_carry_their_own_batch_sizes_and_the_contrastive_phase_can_be_left_out():
    t = CladSettings(batch_contrastive=300, batch_finetune=700, epochs_contrastive=2, epochs_finetune=3)
    assert [(ph.name, ph.epochs, b) for ph, b in phase_batches(t)] == [("contrastive", 2, 300), ("finetune", 3, 700)]
    assert [ph.name for ph, _ in phase_batches(CladSettings(use_contrastive=False))] == ["finetune"]
    assert [ph.select_by for ph, _ in phase_batches(t)] == ["probe_pixel", "probe_pixel"]


def test_an_unknown_keep_epoch_word_is_refused_in_one_line():
    with pytest.raises(CladError, match="train.clad.keep_epoch = 'best': must be one of probe, paper, last"):
        CladSettings(keep_epoch="best")


def test_image_max_statistic_is_the_median_of_each_images_largest_distance():
    from stages.heads.clad_shell import image_max_statistic

    per_image = [np.array([1.0, 5.0, 2.0]), np.array([3.0]), np.array([0.5, 9.0]), np.array([4.0, 4.0])]
    assert image_max_statistic(per_image) == 4.5  # maxima 5, 3, 9, 4 -> median 4.5
    with pytest.raises(CladError, match="train.clad.gas_nn_stat = 'mean': must be one of median, image_max"):
        CladSettings(gas_nn_stat="mean")
