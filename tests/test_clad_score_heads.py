"""CLAD with a score output per class (``score_heads = class``): the column each row is
scored by, how an image is routed, and that the paper's one-column model is unchanged."""

from __future__ import annotations

import pytest
import torch

from stages.heads.clad_model import CladModel, image_classes, pick_scores


def test_pick_scores_takes_the_rows_label_column_or_its_most_likely_normal_class():
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    logits = torch.tensor([[0.0, 9.0, 1.0, 99.0], [5.0, 0.0, 1.0, 99.0]])  # last column: the anomaly class
    assert pick_scores(scores, torch.tensor([2, 0]), logits).tolist() == [3.0, 4.0]
    assert pick_scores(scores, None, logits).tolist() == [2.0, 4.0]  # the anomaly logit never routes
    one = torch.tensor([[7.0], [8.0]])
    assert pick_scores(one, torch.tensor([1, 0]), logits).tolist() == [7.0, 8.0]


def test_an_image_goes_to_the_class_of_highest_mean_probability_over_its_patches():
    # image 0: two patches lean to class 0 a little, one to class 1 strongly -> mean prob picks class 1
    logits = torch.tensor([[[0.2, 0.0, 50.0], [0.2, 0.0, 50.0], [0.0, 6.0, 50.0]],
                           [[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 0.0, 0.0]]])
    p = torch.softmax(logits[..., :2], -1).mean(1)
    assert p[0, 1] > p[0, 0]
    assert image_classes(logits).tolist() == [1, 0]


def test_score_images_scores_every_patch_by_its_images_class_column():
    torch.manual_seed(0)
    model = CladModel(12, 3, (16, 8), 10, "class").eval()
    maps = torch.randn(4, 5, 12)
    got = model.score_images(maps)
    with torch.no_grad():
        z = model.adaptor(maps.reshape(-1, 12))
        logits, scores = model.disc(z)
    logits, scores = logits.reshape(4, 5, -1), scores.reshape(4, 5, 3)
    assert scores.shape[-1] == 3 and logits.shape[-1] == 4
    for i in range(4):
        c = int(torch.softmax(logits[i, :, :3], -1).mean(0).argmax())
        assert torch.allclose(got[i], scores[i, :, c])
    # in training each row is scored by the column of its label
    label = torch.tensor([2, 0, 1])
    with torch.no_grad():
        s = model(maps[0, :3], label)[2]
    assert torch.allclose(s, scores[0, torch.arange(3), label])


@pytest.mark.parametrize("n_classes", [1, 4])
def test_one_score_column_is_the_papers_model_and_scores_images_as_rows(n_classes):
    torch.manual_seed(1)
    model = CladModel(12, n_classes, (16, 8), 10).eval()
    last = [m for m in model.disc.net if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == n_classes + 2  # N+1 logits and one score, as checkpoints store it
    maps = torch.randn(3, 5, 12)
    assert torch.allclose(model.score_images(maps), model.score(maps.reshape(-1, 12)).reshape(3, 5))
    # one class: a score per class is the same network
    if n_classes == 1:
        per_class = CladModel(12, 1, (16, 8), 10, "class")
        assert per_class.load_state_dict(model.state_dict()) is not None


def test_the_exported_per_class_graph_routes_images_of_any_count_and_size_as_torch_does(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from stages.heads.clad import CladImageScoreGraph
    from stages.heads.onnx_graph import write_onnx

    torch.manual_seed(0)
    graph = CladImageScoreGraph(CladModel(12, 3, (16, 8), 10, "class").eval()).eval()
    write_onnx(graph, torch.zeros(2, 16, 12), tmp_path / "g.onnx", "features", "scores", {0: "images", 1: "rows"})
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"))
    x = 3 * torch.randn(5, 30, 12)  # other counts than the example's 2 x 16
    got = sess.run(None, {"features": x.numpy()})[0]
    assert got.shape == (5, 30)
    assert abs(got - graph(x).numpy()).max() < 1e-5
