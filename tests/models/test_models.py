"""Every registered model builds for any channel/class count; checkpoints load safely."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bdray.models import (
    MODELS,
    Classifier,
    ModelSpec,
    UnsafeCheckpointError,
    get_model,
    list_models,
    load_state_dict,
    load_weights,
    save_weights,
)
from bdray.models.cnn import compact_cnn
from bdray.registry import Registry

NUM_CLASSES = 7


# -- every registered model -------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_builds_and_returns_logits(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = get_model(name, in_channels=in_channels, num_classes=NUM_CLASSES, image_size=32)
    assert isinstance(model, Classifier)
    assert model.mean.shape == model.std.shape == (1, in_channels, 1, 1)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, 32, 32))
    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_list_models_filters() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"compact_cnn", "mlp", "resnet18_cifar", "resnet18", "vgg16_bn", "mobilenet_v2", "vit_b_16"} <= set(names)
    assert list_models("resnet*") == ["resnet18", "resnet18_cifar"]
    assert "resnet18" not in list_models(exclude="resnet*")


def test_vit_rejects_indivisible_image_size() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        get_model("vit_b_16", in_channels=3, num_classes=NUM_CLASSES, image_size=28)


def test_normalization_lives_in_the_model() -> None:
    model = get_model("mlp", in_channels=2, num_classes=3, image_size=4, mean=(0.1, 0.2), std=(0.3, 0.4))
    assert model.mean.flatten().tolist() == pytest.approx([0.1, 0.2])
    assert model.std.flatten().tolist() == pytest.approx([0.3, 0.4])
    x = torch.rand(5, 2, 4, 4)
    torch.testing.assert_close(model(x), model.backbone((x - model.mean) / model.std))


def test_model_spec_rebuilds() -> None:
    spec = ModelSpec(name="compact_cnn", in_channels=3, num_classes=4, image_size=32, kwargs={"width": 8})
    model = spec.build()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert model.backbone[0][0].out_channels == 8
    assert "name" in spec  # build() does not consume the spec


# -- checkpoints ------------------------------------------------------------------------------------


def small_model(seed: int = 0, num_classes: int = NUM_CLASSES) -> Classifier:
    """A compact CNN with every parameter and BN buffer randomized (so a fresh init never matches)."""
    torch.manual_seed(seed)
    model = get_model("compact_cnn", in_channels=3, num_classes=num_classes, image_size=32, width=4)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in ("mean", "std"):
                continue
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in name else torch.randn_like(tensor))
            else:
                tensor.fill_(seed + 3)
    return model.eval()


def fresh_model(num_classes: int = NUM_CLASSES) -> Classifier:
    torch.manual_seed(123)
    return get_model("compact_cnn", in_channels=3, num_classes=num_classes, image_size=32, width=4).eval()


X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "sub" / "model.safetensors"
    save_weights(model, path)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    loaded = load_weights(fresh_model(), path)
    assert_same_state(model, loaded)
    assert torch.equal(outputs(model), outputs(loaded))
    assert not torch.equal(outputs(fresh_model()), outputs(model))  # the test is not vacuous


def test_save_weights_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_weights(small_model(0), path)
    save_weights(small_model(1), path)
    assert torch.equal(outputs(load_weights(fresh_model(), path)), outputs(small_model(1)))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_state_dict_loads(tmp_path: Path, suffix: str) -> None:
    model = small_model()
    path = tmp_path / f"model{suffix}"
    torch.save(model.state_dict(), path)
    loaded = load_weights(fresh_model(), path)
    assert torch.equal(outputs(model), outputs(loaded))


def test_torch_checkpoint_with_state_dict_entry_loads(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "arch": "compact_cnn"}, path)
    assert torch.equal(outputs(model), outputs(load_weights(fresh_model(), path)))


def test_backbone_only_state_dict_loads(tmp_path: Path) -> None:
    model = small_model()
    backbone_state = model.backbone.state_dict()
    assert not any(k.startswith("backbone.") or k in ("mean", "std") for k in backbone_state)
    for path in (tmp_path / "backbone.pt", tmp_path / "backbone.safetensors"):
        if path.suffix == ".pt":
            torch.save(backbone_state, path)
        else:
            save_file({k: v.contiguous() for k, v in backbone_state.items()}, str(path))
        loaded = load_weights(fresh_model(), path)
        assert torch.equal(outputs(model), outputs(loaded))
        assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)


@pytest.mark.parametrize("backbone_only", [False, True], ids=["classifier", "backbone"])
def test_ddp_prefixed_state_dict_loads(tmp_path: Path, backbone_only: bool) -> None:
    model = small_model()
    state = (model.backbone if backbone_only else model).state_dict()
    ddp_state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ddp.pt"
    torch.save(ddp_state, path)
    assert all(not k.startswith("module.") for k in load_state_dict(path))
    assert torch.equal(outputs(model), outputs(load_weights(fresh_model(), path)))


def test_ddp_prefixed_safetensors_loads(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert torch.equal(outputs(model), outputs(load_weights(fresh_model(), path)))


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(fresh_model(), tmp_path / "nope.pt")


def test_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    # wrong architecture: an MLP's weights into a CNN
    mlp_path = tmp_path / "mlp_weights.safetensors"
    save_weights(get_model("mlp", in_channels=3, num_classes=NUM_CLASSES, image_size=32), mlp_path)
    with pytest.raises(ValueError, match="mlp_weights.safetensors") as info:
        load_weights(fresh_model(), mlp_path)
    assert "does not fit" in str(info.value)
    # right architecture, wrong class count: a size mismatch in the head
    head_path = tmp_path / "five_classes.pt"
    torch.save(small_model(num_classes=5).state_dict(), head_path)
    with pytest.raises(ValueError, match="five_classes.pt"):
        load_weights(fresh_model(), head_path)


def test_corrupt_files_give_value_errors(tmp_path: Path) -> None:
    for name in ("garbage.safetensors", "garbage.pt"):
        path = tmp_path / name
        path.write_bytes(b"\x00\x01 definitely not a checkpoint")
        with pytest.raises(ValueError, match=name):
            load_state_dict(path)


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)  # allowed by weights_only, not a state_dict
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(path)


# -- malicious checkpoints --------------------------------------------------------------------------


class SystemPayload:
    """Unpickling this runs ``touch <marker>`` through a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling this runs Python source via ``builtins.exec``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class OpenPayload:
    """Unpickling this calls ``builtins.open(marker, 'w')``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


PAYLOADS = [SystemPayload, ExecPayload, OpenPayload]


def write_raw_pickle(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps({"weight": payload}, protocol=2))


def write_torch_zip(path: Path, payload: object) -> None:
    torch.save({"state_dict": payload}, path)


def plain_unpickle_in_subprocess(path: Path) -> None:
    """What an unsafe loader would do: ``pickle.load`` the file (or the zip's data.pkl)."""
    code = (
        "import pickle, sys, zipfile\n"
        "p = sys.argv[1]\n"
        "if zipfile.is_zipfile(p):\n"
        "    z = zipfile.ZipFile(p)\n"
        "    blob = z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))\n"
        "else:\n"
        "    blob = open(p, 'rb').read()\n"
        "pickle.loads(blob)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60, capture_output=True)


@pytest.mark.parametrize("payload_cls", PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("writer", "filename"),
    [
        (write_raw_pickle, "evil.pt"),
        (write_raw_pickle, "evil.pth"),
        (write_raw_pickle, "evil.ckpt"),
        (write_torch_zip, "evil.pt"),
        (write_raw_pickle, "evil.safetensors"),
    ],
    ids=["raw-pt", "raw-pth", "raw-ckpt", "torchzip-pt", "raw-safetensors"],
)
def test_pickled_code_is_refused(tmp_path: Path, payload_cls, writer, filename: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / filename
    writer(path, payload_cls(marker))
    assert not marker.exists()

    expected = ValueError if path.suffix == ".safetensors" else UnsafeCheckpointError
    with pytest.raises(expected, match=filename.replace(".", r"\.")):
        load_weights(fresh_model(), path)
    with pytest.raises(expected):
        load_state_dict(path)
    assert not marker.exists(), "loading the checkpoint ran the pickled payload"

    # Control: the same bytes DO run code under a plain unpickler, so the refusal above is meaningful.
    plain_unpickle_in_subprocess(path)
    assert marker.exists()


def test_unsafe_error_is_a_value_error() -> None:
    assert issubclass(UnsafeCheckpointError, ValueError)


# -- the registry -----------------------------------------------------------------------------------


def test_registry_duplicate_name_raises() -> None:
    registry: Registry[object] = Registry("widget")
    registry.register("a")(object)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(dict)
    assert registry.get("a") is object


def test_model_registry_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("compact_cnn")(compact_cnn)


def test_registry_unknown_name_lists_valid_names() -> None:
    registry: Registry[object] = Registry("widget")
    for name in ("beta", "alpha"):
        registry.register(name)(object)
    with pytest.raises(KeyError, match="unknown widget 'gamma'") as info:
        registry.get("gamma")
    assert "alpha, beta" in str(info.value)
    with pytest.raises(KeyError) as info:
        get_model("no_such_model", in_channels=1, num_classes=2, image_size=8)
    for name in list_models():
        assert name in str(info.value)


def test_registry_names_contains_iter() -> None:
    registry: Registry[int] = Registry("number")
    for i, name in enumerate(["one", "two", "three"]):
        registry.register(name)(i)
    assert registry.names() == ["one", "three", "two"] == list(registry)
    assert registry.names("t*") == ["three", "two"]
    assert registry.names(exclude="t*") == ["one"]
    assert "one" in registry and "four" not in registry


def test_import_path_resolves() -> None:
    assert MODELS.get("bdray.models.cnn:compact_cnn") is compact_cnn
    assert "bdray.models.cnn:compact_cnn" not in MODELS  # resolved, not registered
    model = get_model("bdray.models.cnn:compact_cnn", in_channels=1, num_classes=3, image_size=28, width=4)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_bad_import_paths_raise_key_error() -> None:
    with pytest.raises(KeyError, match="cannot import module"):
        MODELS.get("bdray.no_such_module:thing")
    with pytest.raises(KeyError, match="has no attribute 'nothing'"):
        MODELS.get("bdray.models.cnn:nothing")
