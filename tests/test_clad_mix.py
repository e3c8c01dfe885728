"""CLAD's score mix (``stages.heads.clad_mix``): the coefficients, the per-class choice,
how an image is scored, and a trained run that chooses on its probe and scores
the same after being saved and loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stages.heads.clad_choice import choose_per_class, choose_weight, mean_ranks, mix_coefficients, reference
from stages.heads.clad_mix import ScoreMix, mixed_scores
from stages.heads.clad_model import CladModel
from stages.search import MemoryBank
from tests.conftest import clad

TINY_CLAD = ["epochs_contrastive=1", "epochs_finetune=1", "batch_contrastive=1200", "batch_finetune=2000",
             "gas_steps=1", "gas_project_every=1"]


def test_weight_zero_keeps_s_itself_and_a_blend_is_in_units_of_held_out_normals():
    assert mix_coefficients(0.0, (2.0, 4.0), (1.0, 0.5)) == (1.0, 0.0, 0.0)
    a, b, c = mix_coefficients(0.5, (2.0, 4.0), (1.0, 0.5))
    assert (a, b, c) == (0.125, 1.0, -1.25)
    assert a * 2.0 + b * 1.0 + c == 0.0  # a normal patch of mean s and mean d scores 0
    assert a * 6.0 + b * 1.5 + c == pytest.approx(0.5 * 1 + 0.5 * 1)  # one std above in both
    a, b, c = mix_coefficients(1.0, (2.0, 4.0), (1.0, 0.5))
    assert (a, b, c) == (0.0, 2.0, -2.0)


def test_the_best_probe_metric_wins_and_ties_go_to_the_discriminator():
    assert choose_weight({0.0: 0.90, 0.5: 0.93, 1.0: 0.92}) == 0.5
    assert choose_weight({0.0: 0.90, 0.5: 0.92, 1.0: 0.92}) == 0.5
    assert choose_weight({0.0: 0.90, 0.5: 0.90, 1.0: 0.90}) == 0.0
    assert choose_weight({0.0: 0.80, 0.5: 0.81, 1.0: 0.95}) == 1.0
    assert reference(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, 1.2909944))


def test_classes_with_enough_held_out_images_choose_alone_and_the_others_together():
    def m(held, p0, p5, p1):
        return {"held": held, "pixel": {0.0: p0, 0.5: p5, 1.0: p1}}

    measured = {0: m(10, 0.90, 0.92, 0.95), 1: m(11, 0.95, 0.96, 0.90),  # own: d, blend
                2: m(2, 0.80, 0.70, 0.70), 3: m(2, 0.80, 0.95, 0.70), 4: m(1, 0.80, 0.80, 0.99)}
    # pooled means: w=0 0.800, w=0.5 0.817, w=1 0.797 -> the blend for classes 2-4 (5 held-out images)
    assert choose_per_class(measured, "probe", 5) == {0: (1.0, "own"), 1: (0.5, "own"), 2: (0.5, "pooled"),
                                             3: (0.5, "pooled"), 4: (0.5, "pooled")}
    del measured[4]  # 4 held-out images between them: too few, they keep s
    assert choose_per_class(measured, "probe", 5)[2] == (0.0, "too few")
    forced = {k: {"held": m["held"], "pixel": {1.0: m["pixel"][1.0]}} for k, m in measured.items()}
    assert choose_per_class(forced, "distance", 5) == {k: (1.0, "forced") for k in measured}
    # candidates are any keys, in order of preference: (weight, space) pairs with two spaces
    two = {k: {"held": m["held"], "pixel": {(0.0, 0): m["pixel"][0.0], (1.0, 0): m["pixel"][1.0],
                                            (1.0, 1): m["pixel"][1.0]}} for k, m in measured.items()}
    got = choose_per_class(two, "probe", 5)
    assert got[0] == ((1.0, 0), "own")  # d ties across the spaces: the first (final) space
    assert got[1] == ((0.0, 0), "own")
    assert choose_per_class({}, "probe", 5) == {}


def test_pooled_by_rank_each_class_votes_once_whatever_its_metrics_scale():
    assert mean_ranks([{0.0: 0.9, 0.5: 0.8, 1.0: 0.7}, {0.0: 0.5, 0.5: 0.6, 1.0: 0.6}]) == {
        0.0: 2.0, 0.5: 1.75, 1.0: 2.25}  # the second class's tie shares ranks 1 and 2: 1.5 each

    def m(p0, p5, p1):
        return {"held": 1, "pixel": {0.0: p0, 0.5: p5, 1.0: p1}}

    # the seven-class model's five small classes (docs/RESULTS.md, round 8): speckle's probe sees
    # nothing (chance is 0.325) and its spread of 0.115 decides the mean; by rank the blend wins
    measured = {0: m(0.8958, 0.9244, 0.9437), 1: m(0.9591, 0.9637, 0.9557), 2: m(0.3327, 0.2671, 0.2179),
                3: m(0.9536, 0.9579, 0.9522), 4: m(0.6421, 0.6307, 0.6649)}
    assert mean_ranks([x["pixel"] for x in measured.values()]) == pytest.approx({0.0: 2.0, 0.5: 1.8, 1.0: 2.2})
    assert choose_per_class(measured, "probe", 5, "mean")[0] == (0.0, "pooled")
    assert choose_per_class(measured, "probe", 5, "rank") == {k: (0.5, "pooled") for k in measured}
    # ties in mean rank go to the smaller weight: all three, then the blend and d
    assert choose_per_class({0: m(0.9, 0.8, 0.7), 1: m(0.7, 0.8, 0.9), 2: m(0.5, 0.5, 0.5),
                    3: m(0.5, 0.5, 0.5), 4: m(0.5, 0.5, 0.5)}, "probe", 5, "rank")[0] == (0.0, "pooled")
    assert choose_per_class({0: m(0.5, 0.9, 0.8), 1: m(0.5, 0.8, 0.9), 2: m(0.5, 0.5, 0.5),
                    3: m(0.5, 0.5, 0.5), 4: m(0.5, 0.5, 0.5)}, "probe", 5, "rank")[0] == (0.5, "pooled")


def test_each_image_is_scored_by_its_classs_coefficients_and_bank():
    torch.manual_seed(0)
    model = CladModel(6, 2, (8, 4), 10).eval()
    maps = torch.randn(5, 9, 6)
    with torch.no_grad():
        z = model.adaptor(maps.reshape(-1, 6)).reshape(5, 9, -1)
        logits = model.disc(z.reshape(-1, 4))[0].reshape(5, 9, -1)
    cls = torch.softmax(logits[..., :2], -1).mean(1).argmax(1)
    k = int(cls[0])  # the class of image 0 gets a bank; the other keeps s
    bank_rows = torch.randn(30, 4).numpy()
    mix = ScoreMix(np.array([1.0, 1.0]), np.zeros(2), np.zeros(2), np.arange(3))
    mix.a[k], mix.b[k], mix.c[k] = 0.25, 2.0, -1.0
    got = mixed_scores(model, mix, {k: MemoryBank(bank_rows)}, maps, chunk=18)  # two images per call
    s = model.score_images(maps)
    d = torch.cdist(z.reshape(-1, 4).double(), torch.from_numpy(bank_rows).double()).min(1).values.reshape(5, 9)
    for i in range(5):
        want = 0.25 * s[i] + 2.0 * d[i].float() - 1.0 if int(cls[i]) == k else s[i]
        assert torch.allclose(got[i], want, atol=1e-5), i
    assert mix.mixed == [k]


def test_a_d_space_changes_d_alone_for_its_classes_and_travels_with_the_checkpoint():
    """With a second space set for some classes, their images' d is measured after it (the image's
    class decides, as for the bank), s is not touched, the banks follow the class, and a checkpoint
    restores space and classes; without one, d is measured after the adaptor."""
    from stages.heads.clad import CladHead
    from stages.heads.clad_bank import embed
    from stages.heads.clad_mix import model_parts
    from stages.heads.clad_model import Adaptor
    from stages.heads.clad_settings import CladSettings

    torch.manual_seed(0)
    t = CladSettings(adaptor_dims=(8, 4), disc_hidden=10)
    model = CladModel(6, 2, (8, 4), 10).eval()
    maps, rows = torch.randn(6, 9, 6), torch.randn(20, 6)
    maps[:3] += 2  # two groups of images that the random discriminator assigns to the two classes
    maps[3:] -= 2
    s_before = model.score_images(maps)
    z_before = model_parts(model, maps)[0]
    cls = model_parts(model, maps)[2]
    assert set(cls.tolist()) == {0, 1}, "the hand-built case needs images of both classes"
    space = Adaptor(6, (8, 4)).eval()
    model.set_space(space, [1])  # class 1 measures d after the second adaptor, class 0 after the adaptor
    assert not any(p.requires_grad for p in model.space.parameters())
    assert model.space_classes.tolist() == [0, 1]
    with torch.no_grad():
        in_space = space(maps.reshape(-1, 6)).reshape(6, 9, 4)
        z = model_parts(model, maps)[0]
        for i, k in enumerate(cls.tolist()):
            assert torch.allclose(z[i], in_space[i] if k == 1 else z_before[i]), (i, k)
        assert torch.equal(model.score_images(maps), s_before)  # s is the adaptor's, as before
        assert np.allclose(embed(model, rows, torch.device("cpu"), 1), space(rows).numpy(), atol=1e-6)
        assert np.allclose(embed(model, rows, torch.device("cpu"), 0), model.adaptor(rows).numpy(), atol=1e-6)
    mix = ScoreMix(np.zeros(2), np.ones(2), np.zeros(2), np.arange(3))  # d alone, both classes
    banks = {k: MemoryBank(embed(model, rows, torch.device("cpu"), k)) for k in (0, 1)}
    got = mixed_scores(model, mix, banks, maps)
    for i, k in enumerate(cls.tolist()):
        d = torch.cdist(z[i].double(), torch.from_numpy(banks[k].rows).double()).min(1).values
        assert torch.allclose(got[i].double(), d, atol=1e-5), i
    meta = {"head": "clad", "embed_dim": 6, "n_labels": 2, "class_names": ["a", "b"]}
    loaded = CladHead.from_checkpoint(CladHead(model, t, meta, torch.device("cpu"), mix, banks).checkpoint(),
                                      torch.device("cpu"))
    assert torch.equal(loaded.model.space.net[0].weight, space.net[0].weight)
    assert loaded.model.space_classes.tolist() == [0, 1]
    assert torch.allclose(mixed_scores(loaded.model, loaded.mix, banks, maps), got)
    model.set_space(None)
    assert not any(k.startswith("space") for k in model.state_dict())
    assert torch.allclose(model_parts(model, maps)[0], z_before)


def test_a_run_measures_d_in_the_contrastive_phases_adaptor(extracted):
    """score_mix_space = contrastive: every class's d is measured after best_contrastive.pt's
    adaptor (the final adaptor was moved by fine-tuning), and a loaded run keeps it."""
    from stages.heads import load_trained_head
    from stages.heads.clad_mix import model_parts

    run = "mix_space"
    sets = [a for s in [*TINY_CLAD, "score_mix=distance", "score_mix_space=contrastive"] for a in ("--set", s)]
    res = clad("train", str(extracted), "--run", run, "--head", "clad", *sets)
    assert "d in the adaptor space of the contrastive phase" in res.stderr + res.stdout
    summary = json.loads((extracted / "runs" / run / "train.json").read_text())
    assert {c["space"] for c in summary["score_mix"]} == {"contrastive"}
    assert all(set(c["probe_pixel"]) == {"1.0@contrastive"} for c in summary["score_mix"])
    ckpts = extracted / "runs" / run / "checkpoints"
    phase1 = torch.load(ckpts / "best_contrastive.pt", map_location="cpu", weights_only=True)["model"]
    head, _ = load_trained_head(ckpts / "final.pt", torch.device("cpu"))
    kept = head.model.state_dict()
    adaptor = {k: v for k, v in phase1.items() if k.startswith("adaptor.")}
    assert adaptor
    for k, v in adaptor.items():
        assert torch.equal(kept["space." + k[len("adaptor."):]], v), k
    assert not torch.equal(kept["adaptor.net.0.weight"], kept["space.net.0.weight"])  # fine-tuning moved it
    assert head.model.space_classes.tolist() == [1] * len(head.meta["class_names"])
    maps = torch.randn(2, 16, int(head.meta["embed_dim"]))
    with torch.no_grad():
        want = head.model.space(maps.reshape(-1, maps.shape[-1])).reshape(2, 16, -1)
        assert torch.allclose(model_parts(head.model, maps)[0], want)
    # the banks a loaded run rebuilds from the cache are its classes' rows in that space
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from stages.heads.knn import bank_rows

    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    for k in head.mix.mixed:
        images = np.zeros(len(cache.image_ids), bool)
        images[head.mix.bank_images] = True
        rows = torch.from_numpy(bank_rows(cache, images & (cache.image_class == k))[0])
        if k in head.mix.kept:  # the profile's coreset (round 10): its kept rows
            rows = rows[head.mix.kept[k]]
        with torch.no_grad():
            assert torch.allclose(torch.from_numpy(head.banks[k].rows), head.model.space(rows), atol=1e-5)


def test_a_run_chooses_per_class_on_its_probe_and_scores_alike_after_loading(extracted):
    from stages.heads import load_trained_head

    run = "mix_probe"  # as the fast profile: weights and spaces chosen on the probe
    sets = [a for s in [*TINY_CLAD, "score_mix=probe", "score_mix_min_images=1", "score_mix_space=probe"]
            for a in ("--set", s)]
    res = clad("train", str(extracted), "--run", run, "--head", "clad", *sets)
    summary = json.loads((extracted / "runs" / run / "train.json").read_text())
    choices = {c["class"]: c for c in summary["score_mix"]}
    assert set(choices) == {"washer", "weave"}
    for c in choices.values():
        assert list(c["probe_pixel"]) == ["0.0", "0.5", "1.0", "0.5@contrastive", "1.0@contrastive"]
        assert c["chosen_on"] == "own"  # score_mix_min_images = 1: every class alone
        name = choose_weight(c["probe_pixel"])
        assert (c["weight"], c["space"]) == (float(name.split("@")[0]), "contrastive" if "@" in name else "final")
        assert f"{c['class']} ({c['held_out']} held-out images)" in res.stderr + res.stdout
    head, _ = load_trained_head(extracted / "runs" / run / "checkpoints" / "final.pt", torch.device("cpu"))
    names = head.meta["class_names"]
    assert [names[k] for k in head.mix.mixed] == [n for n in names if choices[n]["weight"] > 0]
    second = [n for n in names if choices[n]["weight"] > 0 and choices[n]["space"] == "contrastive"]
    assert (head.model.space is not None) == bool(second)
    if second:
        assert [names[k] for k in torch.nonzero(head.model.space_classes)[:, 0].tolist()] == second
    maps = torch.randn(2, 16, int(head.meta["embed_dim"]))
    assert head.score_maps(maps).shape == (2, 16)
    # a class that keeps s scores exactly as the discriminator does; one that mixes does not
    s = head.model.score_images(maps)
    if not head.mix.mixed:
        assert torch.equal(head.score_maps(maps), s)


def test_a_coreset_travels_with_the_checkpoint_by_its_positions_per_class():
    kept = {0: np.array([3, 1, 7]), 2: np.array([0])}
    mix = ScoreMix(np.ones(3), np.array([1.0, 0.0, 2.0]), np.zeros(3), np.arange(5), kept=kept)
    back = ScoreMix.from_state(mix.state())
    assert set(back.kept) == {0, 2}
    assert back.kept[0].tolist() == [3, 1, 7] and back.kept[2].tolist() == [0]
    assert "kept" not in ScoreMix(np.ones(3), np.zeros(3), np.zeros(3), np.arange(5)).state()  # as before round 10
    assert ScoreMix.from_state(ScoreMix(np.ones(3), np.zeros(3), np.zeros(3), np.arange(5)).state()).kept == {}


@pytest.mark.parametrize("space,coreset", [("final", 1.0), ("contrastive", 0.5)])  # whole bank / a coreset
def test_calibration_scores_a_mixed_classs_training_images_by_a_bank_without_their_fold(extracted, space, coreset):
    """In the deployed bank a training image's own rows are at distance 0; its calibration score
    takes d from a bank without its fold (exactly: recomputed here for one image), in the space
    the class measures d in. With a coreset the deployed bank is the class's rows at the kept
    positions (selected in blocks of 64 contiguous rows, each block keeping its share), a loaded
    run rebuilds exactly those, and the fold's bank is that coreset without the fold's rows."""
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from core.layout import RunFiles
    from pipeline.config import load_config
    from stages.heads import load_trained_head
    from stages.heads.clad_bank import embed
    from stages.heads.clad_mix import model_parts
    from stages.heads.knn import bank_rows
    from stages.search import block_quotas
    from stages.train.labels import calibration_folds, normal_maps
    from stages.train.stage import train_context

    run = f"mix_distance_{space}_{coreset}"
    sets = [a for s in [*TINY_CLAD, "score_mix=distance", f"score_mix_space={space}", f"score_mix_coreset={coreset}",
                        "score_mix_coreset_block=64"]
            for a in ("--set", s)]
    res = clad("train", str(extracted), "--run", run, "--head", "clad", *sets)
    files = RunFiles(extracted / "runs" / run)
    head, _ = load_trained_head(files.final, torch.device("cpu"))
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    choices = json.loads((files.root / "train.json").read_text())["score_mix"]
    if coreset < 1:
        for c in choices:
            k = head.meta["class_names"].index(c["class"])
            whole = bank_rows(cache, np.isin(np.arange(len(cache.image_ids)), head.mix.bank_images)
                              & (cache.image_class == k))[0]
            kept = head.mix.kept[k]
            assert c["coreset"]["of"] == len(whole) and c["coreset"]["rows"] == len(kept) == round(0.5 * len(whole))
            assert len(np.unique(kept)) == len(kept) and kept.max() < len(whole)
            blocks = -(-len(whole) // 64)
            bounds = np.linspace(0, len(whole), blocks + 1).round().astype(int)
            assert blocks > 1 and f"rows in {blocks} blocks" in res.stderr + res.stdout
            assert np.histogram(kept, bounds)[0].tolist() == block_quotas(len(kept), list(np.diff(bounds)))
            assert f"{c['class']}: probe pixel with the coreset" in res.stderr + res.stdout
            want = embed(head.model, whole[kept], torch.device("cpu"), k)
            assert np.allclose(head.banks[k].rows, want, atol=1e-5)  # rebuilt from the cache after loading
    else:
        assert all("coreset" not in c for c in choices) and head.mix.kept == {}
    ctx = train_context(load_config(files.root / "config.toml"), cache, files, torch.device("cpu"),
                        cache.store.info().key, lambda _m: None, lambda *_: None)
    scores, unseen = head.calibration_scores(ctx, folds=2)
    assert unseen == set(scores)  # d alone, cross-fitted: every image unseen, as for the knn head
    k = head.mix.mixed[0]
    assert head.mix.a[k] == 0.0  # distance: the score is b d + c
    fold = calibration_folds(cache, ctx.held, ctx.seed, 2)
    image = int(np.nonzero((cache.image_class == k) & (fold == 0))[0][0])
    rows, row_image = bank_rows(cache, (cache.image_class == k) & ~ctx.held)
    if coreset < 1:
        rows, row_image = rows[head.mix.kept[k]], row_image[head.mix.kept[k]]
    bank = torch.from_numpy(embed(head.model, rows[fold[row_image] != 0], torch.device("cpu"), k)).double()
    z = embed(head.model, normal_maps(cache, np.arange(len(fold)) == image)[image], torch.device("cpu"), k)
    assert (head.model.space is not None) == (space == "contrastive")
    d = torch.cdist(torch.from_numpy(z).double(), bank).min(1).values
    want = head.mix.b[k] * d + head.mix.c[k]
    assert np.allclose(scores[image], want.numpy(), rtol=1e-4, atol=1e-4)
    assert (d > 0).all()  # the deployed bank holds the image's own rows: d would be 0
    x = torch.from_numpy(normal_maps(cache, np.arange(len(fold)) == image)[image][None].astype(np.float32))
    routed_home = int(model_parts(head.model, x)[2][0]) == k
    if coreset == 1 and routed_home:  # routed to its class: the deployed bank has its rows
        assert torch.allclose(head.score_maps(x)[0], torch.full((x.shape[1],), float(head.mix.c[k])), atol=1e-3)
