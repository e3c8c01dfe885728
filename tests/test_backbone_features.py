import numpy as np
import pytest
import timm
import torch
from PIL import Image

from core.errors import CladError
from stages.extract.backbone import _load_weights, create_backbone, map_efficientnet_pytorch_keys
from stages.extract.features import PatchProjector, aggregate_local, max_embed_dim, patch_features, pool_channels


def _top5(net, name):
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    im = Image.fromarray(load_sample_image(name)).resize((224, 224))
    x = torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = net((x * 255 - 127.5) / 128)
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in logits.topk(5).indices[0]]


def test_packaged_weights_are_real_imagenet_weights():
    """A random-weight model cannot pass: photos must get sensible ImageNet classes."""
    net = timm.create_model("tf_efficientnet_lite0").eval()
    _load_weights(net, "tf_efficientnet_lite0", "package")  # strict load
    assert "daisy" in _top5(net, "flower.jpg")
    assert {"monastery", "palace", "bell cote, bell cot"} & set(_top5(net, "china.jpg"))
    random_net = timm.create_model("tf_efficientnet_lite0").eval()
    assert "daisy" not in _top5(random_net, "flower.jpg")[:1]


def test_key_mapping_renames_blocks_by_stage():
    state = {"_blocks.0._depthwise_conv.weight": 0, "_blocks.1._expand_conv.weight": 1,
             "_blocks.3._project_conv.weight": 2, "_conv_stem.weight": 3, "_fc.bias": 4}
    out = map_efficientnet_pytorch_keys(state, [1, 2, 2])
    assert out == {"blocks.0.0.conv_dw.weight": 0, "blocks.1.0.conv_pw.weight": 1,
                   "blocks.2.0.conv_pwl.weight": 2, "conv_stem.weight": 3, "classifier.bias": 4}


def test_feature_levels_match_feature_info():
    bb = create_backbone("tf_efficientnet_lite0", (2, 3), pretrained=False)
    levels = bb(torch.rand(2, 3, 224, 224))
    assert [f.shape[1] for f in levels] == bb.channels == [40, 112]
    assert [224 // f.shape[-1] for f in levels] == bb.strides == [8, 16]


def test_unknown_backbone_and_missing_weight_file_are_clear_errors(tmp_path):
    with pytest.raises(CladError, match="not a timm model"):
        create_backbone("no_such_net", (2, 3))
    with pytest.raises(CladError, match="file not found"):
        create_backbone("resnet18", (2, 3), weights=str(tmp_path / "missing.pth"))
    with pytest.raises(CladError, match="'package' has no weights"):
        create_backbone("resnet18", (2, 3), weights="package")


def test_aggregate_local_is_the_3x3_block():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    agg = aggregate_local(f, 3)
    assert agg.shape == (1, 9, 4, 4)
    assert agg[0, :, 1, 1].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert agg[0, :, 0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]  # zero padding


def test_pool_channels_and_patch_feature_shapes():
    x = torch.tensor([[1.0, 3.0, 5.0, 7.0]])
    assert pool_channels(x, 2).tolist() == [[2.0, 6.0]]
    levels = [torch.rand(2, 40, 28, 28), torch.rand(2, 112, 14, 14)]
    out = patch_features(levels, 3, 360, 360)
    assert out.shape == (2, 784, 360)
    assert max_embed_dim([40, 112], 3) == 360


def test_projector_equals_unfold_and_pool():
    levels = [torch.randn(2, 40, 28, 28), torch.randn(2, 112, 14, 14)]
    ref = patch_features(levels, 3, 360, 300)
    fast = PatchProjector([40, 112], 3, 360, 300)(levels)
    assert fast.shape == ref.shape == (2, 784, 300)
    assert torch.allclose(fast, ref, atol=1e-5)
