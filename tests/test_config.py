from pathlib import Path

import pytest

from sp_ray.cli import main
from sp_ray.config import (
    Config,
    ConfigError,
    absolute_paths,
    apply_overrides,
    check_config_values,
    config_from_dict,
    config_hash,
    config_to_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_base_inheritance_child_wins_and_parent_values_stay(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  num_kernels: 50\n  depth: 34\ntrain:\n  lr: 0.001\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel:\n  num_kernels: 8\n")
    cfg = load_config(child)
    assert cfg.model.num_kernels == 8
    assert cfg.model.depth == 34
    assert cfg.train.lr == 0.001
    assert cfg.model.num_stages == Config().model.num_stages


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config(None, ["model.num_kernels=16", "train.lr=3e-4", "train.lr_steps=[2, 3]",
                             "model.backbone_weights=null", "train.use_gpu=true", "train.weight_decay=0"])
    assert cfg.model.num_kernels == 16
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.lr_steps == [2, 3]
    assert cfg.model.backbone_weights is None
    assert cfg.train.use_gpu is True
    assert isinstance(cfg.train.weight_decay, float)


def test_unknown_key_in_file_names_file_and_dotted_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model:\n  num_kernal: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "bad.yaml" in message and "model.num_kernal" in message and "model.num_kernels" in message


def test_unknown_key_in_a_base_file_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  epochz: 3\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*train\.epochz"):
        load_config(child)


@pytest.mark.parametrize("text, key", [
    ("model:\n  num_kernels: 1.5\n", "model.num_kernels"),
    ("model:\n  num_kernels: true\n", "model.num_kernels"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  lr_steps: 8\n", "train.lr_steps"),
    ("model: 3\n", "model"),
])
def test_wrong_type_is_an_error(tmp_path, text, key):
    bad = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(bad)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="model.num_kernal"):
        load_config(None, ["model.num_kernal=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["model.num_kernels"])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(None, ["model=3"])


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_and_hash():
    cfg = apply_overrides(Config(), ["model.num_kernels=7"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg) != config_hash(Config())


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if "cluster" in path.parts:
        pytest.skip("cluster manifests are not sp-ray configs")
    if "serve" in path.parts:
        import yaml
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # a `serve deploy` file: Ray's schema
        return
    if "tune" in path.parts:
        from sp_ray.tune.spec import load_sweep

        load_sweep(path)  # a sweep file: its own schema, plus the run configs it names
        return
    cfg = load_config(path)
    # The driver's range checks accept every shipped config, for either training loop.
    check_config_values(cfg, task="finetune")
    check_config_values(cfg, task="ssl")


def test_print_config(capsys):
    code = main(["finetune", "--config", str(CONFIGS / "demo" / "knet_tiny_synthetic.yaml"),
                 "--print-config", "model.num_kernels=5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "num_kernels: 5" in out and "depth: 18" in out


def test_cli_reports_config_errors(capsys):
    code = main(["finetune", "--config", str(CONFIGS / "demo" / "knet_tiny_synthetic.yaml"), "model.nope=1"])
    assert code == 2
    assert "model.nope" in capsys.readouterr().err


@pytest.mark.parametrize("override, task, match", [
    ("train.lr=.inf", "finetune", r"train\.lr is inf: it must be a finite number"),
    ("data.train_scale_range=[1.2, 0.8]", "finetune", r"data\.train_scale_range .* 0 < low <= high"),
    ("ssl.queue_size=0", "ssl", r"ssl\.queue_size is 0: it must be >= 1"),
    ("ssl.crop_scale_min=0", "ssl", r"ssl\.crop_scale_min is 0\.0: it must be in \(0, 1\]"),
    ("model.depth=19", "ssl", r"model\.depth is 19: ResNet depths are 18, 34, 50"),
    ("loss.mask_loss=weakest", "finetune", r"loss\.mask_loss is 'weakest': it must be one of full, weak"),
])
def test_value_checks_name_the_key_and_the_range(override, task, match):
    with pytest.raises(ConfigError, match=match):
        check_config_values(apply_overrides(Config(), [override]), task=task)


def test_value_checks_are_per_task():
    # DenseCL does not read train.epochs, so an ssl run does not reject it; fine-tuning does.
    cfg = apply_overrides(Config(), ["train.epochs=0"])
    check_config_values(cfg, task="ssl")
    with pytest.raises(ConfigError, match=r"train\.epochs is 0"):
        check_config_values(cfg, task="finetune")


def test_absolute_paths_resolve_relative_files_against_the_driver_directory(tmp_path):
    # Ray workers do not run in the driver's directory: run_training hands them absolute paths.
    cfg = apply_overrides(Config(), [
        "data.train_annotations=data/train.json", "data.train_images=data/images", f"data.val_images={tmp_path}",
        "train.storage_path=s3://bucket/runs", "pretrain.prompts=p/prompts.npy",
    ])
    resolved = absolute_paths(cfg, base=tmp_path)
    assert resolved.data.train_annotations == str(tmp_path / "data" / "train.json")
    assert resolved.data.train_images == str(tmp_path / "data" / "images")
    assert resolved.pretrain.prompts == str(tmp_path / "p" / "prompts.npy")
    assert resolved.data.val_images == str(tmp_path)  # already absolute
    assert resolved.train.storage_path == "s3://bucket/runs"  # a URI
    assert resolved.data.val_annotations == "" and resolved.model.backbone_weights is None  # unset
    assert resolved.model == cfg.model and resolved.train.lr == cfg.train.lr
