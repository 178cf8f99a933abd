"""Config: presets, overrides, and errors that name the field."""

import json

import pytest

from vlcore.train.cli import main
from vlcore.train.params import ConfigError, TrainConfig, help_text, list_presets, load_config


def test_presets_load_and_overrides_apply():
    assert {"default", "clip-b32", "clip-b16", "fiber", "captioner"} <= set(list_presets())
    for name in list_presets():
        load_config(["--preset", name, "--train-data", "x.tar"])
    cfg = load_config(["--lr", "5e-4", "--steps=7", "--compile", "--model-overrides", '{"embed_dim": 32}'])
    assert (cfg.lr, cfg.steps, cfg.compile, cfg.model_overrides) == (5e-4, 7, True, {"embed_dim": 32})
    assert cfg.model == "clip-tiny"  # from the default preset


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.1, "steps": 3}))
    cfg = load_config(["--config", str(path), "--steps", "4"])
    assert (cfg.lr, cfg.steps) == (0.1, 4)


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unknown config field 'lrr' (did you mean 'lr'?)"),
    (["--steps", "ten"], "config field 'steps': expected int, got 'ten'"),
    (["--steps", "2.5"], "config field 'steps': expected int"),
    (["--lr", "fast"], "config field 'lr': expected float"),
    (["--compile", "maybe"], "config field 'compile': expected bool"),
    (["--model-overrides", "[1]"], "config field 'model_overrides': expected dict"),
    (["--data", "parquet"], "config field 'data': must be one of"),
    (["--batch-size", "0"], "config field 'batch_size': must be positive"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset"], "--preset needs a value"),
    (["--config"], "--config needs a value"),
    (["--config", "/no/such/file.json"], "config file /no/such/file.json: No such file or directory"),
    (["--steps"], "config field 'steps': needs a value"),
    (["steps=3"], "unexpected argument 'steps=3'"),
])
def test_config_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert message in str(e.value)


def test_bad_field_in_a_config_file_names_file_and_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"warmup": 3}))
    with pytest.raises(ConfigError, match=r"config file .*c.json: unknown config field 'warmup' \(did you mean 'warmup_steps'"):
        load_config(["--config", str(path)])


def test_model_errors_and_global_batch_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_overrides.*vision_cfg: unknown keys"):
        main(["--model-overrides", '{"vision_cfg": {"wdith": 3}}', "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="'batch_size': 10 must be a multiple of world_size x grad_accum = 1 x 3"):
        main(["--batch-size", "10", "--grad-accum", "3", "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="config field 'tokenizer': model 'ViT-B-32' uses CLIP's BPE; pass --tokenizer"):
        main(["--model", "ViT-B-32", "--out-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="config field 'tome_r'"):
        main(["--tome-r", "eight", "--out-dir", str(tmp_path)])


def test_nvfp4_values_parse_into_policies():
    from vlcore.nvfp4 import NVFP4Policy, NVFP4Recipe

    from vlcore.train.params import NVFP4_POLICIES, nvfp4_policy

    assert nvfp4_policy("default") == NVFP4Policy()
    assert nvfp4_policy("all-blocks").keep_last_fraction == 0.0
    assert nvfp4_policy('{"keep_first_blocks": 1, "recipe": {"rht": false}}') == NVFP4Policy(
        keep_first_blocks=1, recipe=NVFP4Recipe(rht=False))
    for name in NVFP4_POLICIES:
        assert load_config(["--nvfp4", name]).nvfp4 == name
        assert name in help_text()


@pytest.mark.parametrize("value, message", [
    ("fp4", "expected one of ['default'"),
    ('{"keep_last_fraction": 2}', "keep_last_fraction must be in [0, 1]"),
    ('{"keep_last": 0.1}', "unexpected keyword argument 'keep_last'"),
    ('{"recipe": {"rht": 1, "nope": 2}}', "unexpected keyword argument 'nope'"),
    ('{"keep_last_fraction": "a"}', "config field 'nvfp4'"),
    ("{not json", "config field 'nvfp4'"),
])
def test_bad_nvfp4_values_name_the_field(value, message):
    with pytest.raises(ConfigError, match="config field 'nvfp4'") as e:
        load_config(["--nvfp4", value])
    assert message in str(e.value)


@pytest.mark.parametrize("field, value, allowed", [
    ("lr", "inf", "a finite number > 0"), ("lr", "nan", "a finite number > 0"), ("lr", "0", "a finite number > 0"),
    ("lr", "-1e-3", "a finite number > 0"),
    ("weight-decay", "nan", "a finite number >= 0"), ("weight-decay", "-0.1", "a finite number >= 0"),
    ("weight-decay", "inf", "a finite number >= 0"),
    ("grad-clip", "nan", "or 0 to turn clipping off"), ("grad-clip", "-1", "or 0 to turn clipping off"),
    ("grad-clip", "inf", "or 0 to turn clipping off"),
    ("min-lr-ratio", "-5", "in [0, 1]"), ("min-lr-ratio", "1.5", "in [0, 1]"), ("min-lr-ratio", "nan", "in [0, 1]"),
    ("beta1", "2", "in [0, 1)"), ("beta1", "1", "in [0, 1)"), ("beta1", "nan", "in [0, 1)"),
    ("beta2", "-1", "in [0, 1)"), ("beta2", "1.0", "in [0, 1)"),
    ("eps", "-1", "a finite number > 0"), ("eps", "0", "a finite number > 0"), ("eps", "nan", "a finite number > 0"),
    ("warmup-steps", "-1", ">= 0"), ("workers", "-2", ">= 0"), ("keep-checkpoints", "0", "positive"),
    ("device", "gpu0", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("itm-rerank-k", "-1", ">= 0"), ("caption-samples", "-1", ">= 0"), ("mir-samples", "-3", ">= 0"),
    ("num-beams", "0", ">= 1"), ("zeroshot", "", "'auto', 'shapes', 'none' or a folder-per-class path"),
    ("val-data-type", "flickr", "must be one of"), ("val-data-type", "karpathy", "needs an annotation file"),
])
def test_numeric_ranges_are_checked_with_the_field_named(field, value, allowed):
    with pytest.raises(ConfigError, match=f"config field '{field.replace('-', '_')}'") as e:
        load_config([f"--{field}", value])
    assert allowed in str(e.value)


def test_edges_of_the_ranges_are_accepted():
    cfg = load_config(["--grad-clip", "0", "--weight-decay", "0", "--min-lr-ratio", "1", "--beta1", "0",
                       "--eps", "1e-30", "--min-lr-ratio", "0"])
    assert (cfg.grad_clip, cfg.weight_decay, cfg.beta1) == (0.0, 0.0, 0.0)


def test_help_lists_every_field(capsys):
    text = help_text()
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text
    main(["--help"])
    assert "--grad-checkpointing" in capsys.readouterr().out
