"""Config validation: shipped configs load; bad ones fail with exit code 2, one line per field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bdray.cli import main
from bdray.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_validates(path: Path, capsys: pytest.CaptureFixture) -> None:
    # `bdray validate` takes each kind of shipped config through the loader that runs it.
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"{path}: ok"


BAD = [
    ("data.name", "nope", "data.name: unknown dataset 'nope'; expected one of:"),
    ("attack.name", "badnett",
     "attack.name: unknown attack 'badnett'; expected one of: adaptive_blend, adaptive_patch, badexpert_adap, badnet"),
    ("model.name", "resnet99", "model.name: unknown model 'resnet99'"),
    ("attack.poison_rate", "-0.1", "attack.poison_rate: Input should be greater than or equal to 0"),
    ("attack.poison_rate", "1.5", "attack.poison_rate: Input should be less than 1 (got 1.5)"),
    ("attack.target", "10", "attack.target: 10 is not a class of synthetic (allowed: 0..3)"),
    ("defense.eta", "0", "defense.eta: Input should be greater than 0"),
    ("defense.eta", "-1e-4", "defense.eta: Input should be greater than 0"),
    ("train.colour", "red", "train.colour: unknown key"),
    ("attack.patch_sizee", "3", "attack.patch_sizee: unknown key"),
    ("model.options.depth", "3", "model.options.depth: unknown option; allowed: width"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_config_exits_2_naming_the_field_before_any_work(
    field: str, value: str, message: str, smoke_config: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config_path = tmp_path / "exp.yaml"
    config_path.write_text(yaml.safe_dump(smoke_config))
    out = tmp_path / "out"
    code = main(["run", str(config_path), "--out", str(out), "--set", f"{field}={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not Path(smoke_config["storage"]).exists()


def test_all_errors_are_reported_at_once(smoke_config: dict) -> None:
    smoke_config["attack"]["poison_rate"] = 2
    smoke_config["defense"]["gamma"] = 0
    smoke_config["train"]["epochs"] = 0
    with pytest.raises(ConfigError) as info:
        validate_config(smoke_config)
    fields = [loc for loc, _ in info.value.errors]
    assert fields == ["attack.poison_rate", "defense.gamma", "train.epochs"]


def test_missing_config_file_and_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml does not exist" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("seed: [1, 2\n")
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_overrides_are_typed_and_reach_nested_fields(smoke_config: dict, tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(smoke_config))
    with pytest.raises(ConfigError, match="attack.patch_size: unknown key"):  # blend has no patch
        load_config(path, ["attack.name=blend"])
    del smoke_config["attack"]["patch_size"]
    path.write_text(yaml.safe_dump(smoke_config))
    config = load_config(path, ["defense.eta=3e-4", "attack.name=blend", "attack.alpha=0.1"])
    assert config.defense.eta == 3e-4
    assert config.attack.name == "blend" and config.attack.alpha == 0.1


def test_config_objects_are_frozen(smoke_config: dict) -> None:
    config = validate_config(smoke_config)
    with pytest.raises(Exception, match="frozen"):
        config.seed = 3  # type: ignore[misc]
