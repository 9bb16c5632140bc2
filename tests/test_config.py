import dataclasses
from pathlib import Path

import pytest
import yaml

from sp_ray.cli import main
from sp_ray.config import (
    FAMILY_SECTIONS,
    Config,
    ConfigError,
    KNetLoss,
    Mask2FormerModel,
    MaskRCNNLoss,
    ModelConfig,
    QueryInstLoss,
    QueryInstModel,
    absolute_paths,
    apply_overrides,
    check_config_values,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
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
    ("data.rotate_level=11", "finetune", r"data\.rotate_level is 11(\.0)?: it must be in \[0, 10\]"),
    ("data.rotate_prob=1.5", "pretrain", r"data\.rotate_prob is 1\.5: it must be in \[0, 1\]"),
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


# --- the loss section per family, and the shipped configs' _base_ --------------------------------------------

def section_keys(section: str) -> dict[str, list[str]]:
    return {name: [f.name for f in dataclasses.fields(getattr(family, section))]
            for name, family in FAMILY_SECTIONS.items()}


FAMILY_LOSS_KEYS, FAMILY_MODEL_KEYS = section_keys("loss"), section_keys("model")
ALL_LOSS_KEYS = sorted({key for keys in FAMILY_LOSS_KEYS.values() for key in keys})
ALL_MODEL_KEYS = sorted({key for keys in FAMILY_MODEL_KEYS.values() for key in keys})
TITLES = {name: family.title for name, family in FAMILY_SECTIONS.items()}


def test_family_sections_cover_the_model_families():
    from sp_ray.models import FAMILIES

    assert set(FAMILY_SECTIONS) == set(FAMILIES)
    # A key has one meaning: the same type and default in every family that has it (but model.name).
    for section, keys in (("loss", ALL_LOSS_KEYS), ("model", ALL_MODEL_KEYS)):
        for key in set(keys) - {"name"}:
            found = {(f.type, f.default) for family in FAMILY_SECTIONS.values()
                     for f in dataclasses.fields(getattr(family, section)) if f.name == key}
            assert len(found) == 1, key
    assert [f.name for f in dataclasses.fields(Mask2FormerModel)][-3:] == [
        "encoder_layers", "encoder_ffn_channels", "deform_points"]
    assert [f.name for f in dataclasses.fields(QueryInstModel)][-1] == "dynamic_channels"


@pytest.mark.parametrize("family", sorted(FAMILY_SECTIONS))
def test_each_family_gets_its_sections_and_dumps_only_their_keys(family, tmp_path):
    cfg = load_config(None, [f"model.name={family}"])
    assert type(cfg.loss) is FAMILY_SECTIONS[family].loss and type(cfg.model) is FAMILY_SECTIONS[family].model
    assert cfg == Config(model=ModelConfig(name=family))
    dumped = yaml.safe_load(dump_config(cfg))
    assert list(dumped["loss"]) == FAMILY_LOSS_KEYS[family] and list(dumped["model"]) == FAMILY_MODEL_KEYS[family]
    again = load_config(write(tmp_path / "dumped.yaml", dump_config(cfg)))
    assert again == cfg and config_from_dict(config_to_dict(cfg)) == cfg


INAPPLICABLE = [
    (section, family, next(k for k in all_keys if k not in keys[family]))
    for section, keys, all_keys in (("loss", FAMILY_LOSS_KEYS, ALL_LOSS_KEYS),
                                    ("model", FAMILY_MODEL_KEYS, ALL_MODEL_KEYS))
    for family in sorted(FAMILY_SECTIONS)
]


@pytest.mark.parametrize("section, family, key", INAPPLICABLE, ids=lambda v: str(v))
def test_a_key_of_another_family_is_an_error_naming_key_and_family(section, family, key, tmp_path):
    title = TITLES[family]
    keys = FAMILY_LOSS_KEYS[family] if section == "loss" else FAMILY_MODEL_KEYS[family]
    applies = f"has the {section} keys: {', '.join(keys)}" if keys else f"has no {section} keys"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.name={family}", f"{section}.{key}=1"])
    message = str(err.value)
    assert f"'{section}.{key}'" in message and f"model.name '{family}' ({title})" in message and applies in message
    # In a file whose family comes from its _base_: the message names the file that sets the key.
    write(tmp_path / "base.yaml", f"model:\n  name: {family}\n")
    child = write(tmp_path / "child.yaml", f"_base_: base.yaml\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"child\.yaml: '{section}\.{key}' is a {section} key of .*not of {title}"):
        load_config(child)
    # A config built for the family refuses it as an override too, and so does a dict.
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        apply_overrides(Config(model=ModelConfig(name=family)), [f"{section}.{key}=1"])
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        config_from_dict({"model": {"name": family}, section: {key: 1}})


def test_knet_only_keys_and_the_box_weights_stay_in_their_family():
    with pytest.raises(ConfigError, match=r"'loss\.l1_weight' is a loss key of QueryInst, not of K-Net"):
        load_config(CONFIGS / "demo" / "knet_tiny_synthetic.yaml", ["loss.l1_weight=3"])
    with pytest.raises(ConfigError, match=r"'loss\.mask_loss' is a loss key of K-Net, not of Mask2Former"):
        load_config(CONFIGS / "demo" / "mask2former_tiny_synthetic.yaml", ["loss.mask_loss=weak"])
    with pytest.raises(ConfigError, match=r"Mask R-CNN\) has no loss keys"):
        load_config(CONFIGS / "demo" / "maskrcnn_tiny_synthetic.yaml", ["loss.cls_weight=3"])
    assert load_config(None, ["loss.mask_loss=weak"]).loss.mask_loss == "weak"
    with pytest.raises(ConfigError, match=r"'model\.dynamic_channels' is a model key of QueryInst, not of Mask2Former"):
        load_config(CONFIGS / "demo" / "mask2former_tiny_synthetic.yaml", ["model.dynamic_channels=8"])
    with pytest.raises(ConfigError, match=r"'model\.encoder_layers' is a model key of Mask2Former, not of K-Net"):
        load_config(CONFIGS / "demo" / "knet_tiny_synthetic.yaml", ["model.encoder_layers=1"])


def test_an_unknown_loss_key_suggests_the_close_name_of_the_family():
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.l1_weigth' \(did you mean 'loss\.l1_weight'\?\); "
                                          r"model\.name 'queryinst' \(QueryInst\) has the loss keys: cls_weight"):
        load_config(None, ["model.name=queryinst", "loss.l1_weigth=3"])
    with pytest.raises(ConfigError, match=r"model\.name 'knetz' is not a model family \(did you mean 'knet'\?\)"):
        load_config(None, ["model.name=knetz"])


def test_an_override_of_the_family_keeps_the_shared_loss_values():
    cfg = load_config(CONFIGS / "demo" / "queryinst_tiny_synthetic.yaml", ["loss.cls_weight=3"])
    switched = apply_overrides(cfg, ["model.name=knet"])
    assert type(switched.loss) is KNetLoss
    assert (switched.loss.cls_weight, switched.loss.dice_weight, switched.loss.init_dice_weight) == (3.0, 8.0, 4.0)
    assert type(switched.model) is ModelConfig and switched.model.num_kernels == cfg.model.num_kernels == 16
    with pytest.raises(ConfigError, match=r"loss\.l1_weight"):
        apply_overrides(cfg, ["model.name=knet", "loss.l1_weight=1"])
    with pytest.raises(ConfigError, match="takes a KNetLoss"):
        Config(loss=QueryInstLoss())
    with pytest.raises(ConfigError, match="takes a Mask2FormerModel"):
        Config(model=QueryInstModel(name="mask2former"))


# The model and loss sections of a QueryInst checkpoint's config.yaml as sp-ray wrote them before these
# sections were split per family (every section was dumped; the others are left out here, they default).
OLD_CHECKPOINT_CONFIG = """\
model:
  name: queryinst
  depth: 18
  backbone_weights: null
  frozen_stages: -1
  norm_eval: false
  num_classes: 3
  num_kernels: 16
  num_stages: 3
  feat_channels: 64
  ffn_channels: 256
  num_heads: 4
  encoder_layers: 6
  encoder_ffn_channels: 1024
  deform_points: 4
  dynamic_channels: 16
loss:
  cls_weight: 2.0
  mask_weight: 1.0
  dice_weight: 8.0
  init_mask_weight: 1.0
  init_dice_weight: 4.0
  cost_class: 2.0
  cost_dice: 4.0
  cost_mask: 1.0
  mask_loss: full
  projection_weight: 4.0
  avg_projection_weight: 0.4
  pairwise_weight: 1.0
  pairwise_color_threshold: 0.3
  pairwise_warmup_iters: 1000
  no_object_weight: 0.1
  num_points: 12544
  oversample_ratio: 3.0
  importance_sample_ratio: 0.75
  l1_weight: 5.0
  giou_weight: 2.0
  cost_l1: 5.0
  cost_giou: 2.0
train:
  epochs: 40
  batch_size: 4
"""


def test_a_checkpoint_config_written_before_the_split_still_loads(tmp_path):
    from torch import nn

    from sp_ray.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint

    def checkpoint(name: str, text: str):
        path = save_checkpoint(tmp_path / name, model=nn.Linear(2, 2), config=Config(), meta={"epoch": 1})
        (path / CONFIG_FILE).write_text(text)
        return path

    cfg = load_checkpoint(checkpoint("queryinst", OLD_CHECKPOINT_CONFIG)).config
    assert cfg.model.name == "queryinst" and cfg.model.dynamic_channels == 16 and cfg.train.epochs == 40
    assert cfg.loss == QueryInstLoss(dice_weight=8.0) and not hasattr(cfg.model, "encoder_layers")
    # Mask R-CNN's checkpoints carried every loss key as well: none applies.
    maskrcnn = OLD_CHECKPOINT_CONFIG.replace("name: queryinst", "name: maskrcnn")
    old = load_checkpoint(checkpoint("maskrcnn", maskrcnn)).config
    assert old.loss == MaskRCNNLoss() and type(old.model) is ModelConfig
    # Only the keys of the old ModelConfig and LossConfig are dropped: anything else is still an error.
    typo = OLD_CHECKPOINT_CONFIG.replace("  cost_giou: 2.0\n", "  cost_giou: 2.0\n  cost_gio: 2.0\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: unknown key 'loss\.cost_gio' \(did you mean 'loss\.cost_gi"):
        load_checkpoint(checkpoint("typo", typo))
    # The rule is the checkpoint's only: a config dict of the old shape is refused elsewhere.
    with pytest.raises(ConfigError, match=r"'model\.encoder_layers' is a model key of Mask2Former, not of QueryInst"):
        config_from_dict(yaml.safe_load(OLD_CHECKPOINT_CONFIG))
    # A checkpoint written now keeps the family's keys only.
    written = save_checkpoint(tmp_path / "new", model=nn.Linear(2, 2), config=cfg, meta={"epoch": 1})
    again = yaml.safe_load((written / CONFIG_FILE).read_text())
    assert list(again["loss"]) == FAMILY_LOSS_KEYS["queryinst"]
    assert list(again["model"]) == FAMILY_MODEL_KEYS["queryinst"]
    assert load_checkpoint(written).config == cfg


SP_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not {"cluster", "serve", "tune"} & set(p.parts))


@pytest.mark.parametrize("path", SP_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_have_at_most_one_base_level_of_their_own_family(path):
    bases = yaml.safe_load(path.read_text()).get("_base_", [])
    for base in [bases] if isinstance(bases, str) else bases:
        parent = (path.parent / base).resolve()
        assert parent.is_file(), base
        assert "_base_" not in yaml.safe_load(parent.read_text()), f"{path.name}: its base {base} has a _base_"
        assert load_config(parent).model.name == load_config(path).model.name, f"{path.name} crosses families"
