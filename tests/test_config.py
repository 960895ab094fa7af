"""Config: search-space YAML validation, a table of good and bad specs and the exact errors."""

from __future__ import annotations

import copy

import pytest
import yaml

from raysearch.config import TrialConfig, load_trial_config, load_yaml
from raysearch.errors import ConfigError
from raysearch.search.space import load_search_space, parse_search_space

GOOD = {
    "name": "t",
    "data": {"root": "/data", "val_fraction": 0.2, "seed": 1},
    "resources": {"workers_per_trial": 1},
    "search": {"algorithm": "tpe", "seed": 0, "num_samples": 4},
    "scheduler": {"kind": "asha", "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
    "storage": "/tmp/reports",
    "trial": {"weights": "none"},
    "space": {
        "arch": {"choice": ["resnet18", "mobilenet_v3_small"]},
        "image_size": {"choice": [32, 48]},
        "lr": {"loguniform": [1e-4, 1e-2]},
        "dropout": {"uniform": [0.0, 0.5]},
        "batch_size": {"int": [8, 32], "step": 8},
        "augment": "light",
        "fp_bias": {"uniform": [0.0, 1.0], "when": {"arch": ["resnet18"]}},
    },
}


def spec_with(path: str, value, *, delete: bool = False) -> dict:
    spec = copy.deepcopy(GOOD)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return spec


def test_good_spec_parses_every_kind():
    spec = parse_search_space(GOOD)
    kinds = {p.name: p.kind for p in spec.space}
    assert kinds == {
        "arch": "choice", "image_size": "choice", "lr": "loguniform", "dropout": "uniform",
        "batch_size": "int", "augment": "constant", "fp_bias": "uniform",
    }
    assert spec.scheduler.max_epochs == 3
    assert spec.experiment_dir == "/tmp/reports/t"
    assert spec.cache_dir == "/tmp/reports/cache"
    cfg = spec.trial_config({"arch": "resnet18", "lr": 0.001})
    assert cfg.max_epochs == 3 and cfg.weights == "none" and cfg.lr == 0.001
    # The round trip through search_space.yaml gives the same spec.
    again = parse_search_space(yaml.safe_load(yaml.safe_dump(spec.to_dict(), sort_keys=False)))
    assert again == spec


def test_cli_overrides_win():
    spec = parse_search_space(
        GOOD, data_root="/other", name="n2", storage="gs://b/runs", num_samples=9, max_concurrent=3
    )
    assert spec.data.root == "/other"
    assert spec.name == "n2"
    assert spec.storage == "gs://b/runs"
    assert spec.experiment_dir == "gs://b/runs/n2"
    assert spec.search.num_samples == 9
    assert spec.resources.max_concurrent == 3


BAD = [
    (spec_with("colour", "red"), "unknown key `colour`; allowed: data, name, resources, scheduler, search, space, storage, trial"),
    (spec_with("data.rot", "/x"), "unknown key `data.rot`; allowed: aggregation, any_finding, blank, cache_dir, drop_all_negative, format, group_column, labels, path_column, patient_column, root, seed, skip_bad, split_column, study_column, test_fraction, uncertain, val_fraction, views"),
    (spec_with("data.val_fraction", "lots"), "`data.val_fraction` must be float, got 'lots'"),
    (spec_with("data.val_fraction", 1.5), "data.val_fraction must be in (0, 1), got 1.5"),
    (spec_with("search.num_samples", 0), "search.num_samples must be >= 1, got 0"),
    (spec_with("search.algorithm", "grid"), "search.algorithm: unknown value 'grid'; allowed: tpe, random"),
    (spec_with("scheduler.kind", "pbt"), "scheduler.kind: unknown value 'pbt'; allowed: asha, fifo"),
    (spec_with("scheduler.grace_period", 5), "scheduler: `1 <= grace_period <= max_epochs` must hold, but got grace_period=5, max_epochs=3"),
    (spec_with("space.arch", {"choice": []}), "`space.arch.choice` must be a non-empty list, got []"),
    (spec_with("space.lr", {"loguniform": [1e-2, 1e-4]}), "`space.lr.loguniform`: `low < high` must hold, but got (low=0.01, high=0.0001)"),
    (spec_with("space.lr", {"loguniform": [0, 1e-2]}), "`space.lr.loguniform`: low must be > 0, got 0"),
    (spec_with("space.dropout", {"uniform": ["a", 1]}), "`space.dropout.uniform` low must be a number, got 'a'"),
    (spec_with("space.dropout", {"normal": [0, 1]}), "unknown key `space.dropout.normal`; allowed: choice, uniform, loguniform, int, constant, step, when"),
    (spec_with("space.colour", {"choice": [1]}), "unknown key `space.colour`; allowed parameters:"),
    (spec_with("space.arch", {"choice": ["resnet18", "alexnet"]}), "space.arch: unknown value 'alexnet'; allowed:"),
    (spec_with("space.fp_bias", {"uniform": [0, 1], "when": {"optimizer": ["adam"]}}), "`space.fp_bias.when.optimizer` refers to a parameter that is not defined earlier in `space`"),
    (spec_with("trial.max_epochs", 10), "trial.max_epochs is set by scheduler.max_epochs; remove it from `trial`"),
    (spec_with("trial.optimiser", "adam"), "unknown key `trial.optimiser`; allowed:"),
    (spec_with("space", None, delete=True), "<spec>: missing key `space` (the parameters to search)"),
    (spec_with("search.points_to_evaluate", [{"arch": "resnet18", "colour": 1}]), "search.points_to_evaluate[0]: unknown parameter `colour`; the space defines:"),
    (spec_with("name", "a/b"), ("name must be one folder name of letters, digits and _.+=@,- "
                               "(not starting with '.' or '-'), got 'a/b'")),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_gets_one_clear_error(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_search_space(raw)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_trial_config_errors():
    with pytest.raises(ConfigError, match=r"^arch: unknown value 'resnet9'; allowed: .*densenet169"):
        TrialConfig(arch="resnet9")
    with pytest.raises(ConfigError, match=r"^dropout must be in \[0, 1\), got 1.0"):
        TrialConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"^class_weighting: unknown value 'focal'"):
        TrialConfig.from_dict({"class_weighting": "focal"})
    with pytest.raises(ConfigError, match=r"^`batch_size` must be int, got 'big'"):
        TrialConfig.from_dict({"batch_size": "big"})
    with pytest.raises(ConfigError, match=r"^unknown key `colour`"):
        TrialConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("hook", ["fail_at_epoch", "fail_mode"])
def test_internal_test_hooks_are_not_user_parameters(hook):
    """fail_at_epoch / fail_mode were fault-injection hooks in the trial config: listed among the
    allowed keys and written to trials.parquet. They are no settings now, anywhere."""
    from dataclasses import fields

    assert hook not in {f.name for f in fields(TrialConfig)}
    assert hook not in TrialConfig().to_dict()  # so not a trials.parquet column either
    for raw in (spec_with(f"trial.{hook}", 1), spec_with(f"space.{hook}", {"constant": 1})):
        with pytest.raises(ConfigError) as info:
            parse_search_space(raw)
        assert "unknown" in str(info.value) and hook not in str(info.value).split("allowed", 1)[1]
    # a config saved by an earlier release, which wrote both keys, still reads
    saved = {**TrialConfig(lr=0.01).to_dict(), "fail_at_epoch": None, "fail_mode": "raise"}
    assert TrialConfig.from_saved(saved) == TrialConfig(lr=0.01)
    with pytest.raises(ConfigError, match=f"unknown key `{hook}`"):
        TrialConfig.from_dict({hook: 1})


def test_faults_are_injected_by_the_worker_environment(tmp_path, monkeypatch):
    import json

    from raysearch.train.worker import FAULTS_ENV, injected_fault

    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps([{"when": {"lr": 0.03}, "epoch": 2, "mode": "nan"},
                                  {"epoch": 1}]))  # fmt: skip
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    assert injected_fault({"lr": 0.03, "arch": "resnet18"}) == (2, "nan")
    assert injected_fault({"lr": 0.01}) == (1, "raise")
    faults.write_text("[]")
    assert injected_fault({"lr": 0.03}) is None
    monkeypatch.delenv(FAULTS_ENV)
    assert injected_fault({"lr": 0.03}) is None


def test_yaml_scientific_notation_without_dot_is_a_float():
    # PyYAML reads `1e-4` as a string; the config must still accept it for float fields.
    assert TrialConfig.from_dict({"lr": "1e-4"}).lr == 1e-4


def test_shipped_search_spaces_validate():
    demo = load_search_space("search_spaces/demo.yaml")
    mura = load_search_space("search_spaces/mura.yaml")
    assert demo.scheduler.kind == "asha" and demo.trial["weights"] == "none"
    baseline = mura.trial_config(dict(mura.search.points_to_evaluate[0]))
    assert (baseline.arch, baseline.image_size, baseline.lr, baseline.augment, baseline.dropout) == (
        "densenet169", 320, 1e-4, "mura", 0.0
    )
    assert baseline.weights == "imagenet"
    assert (mura.scheduler.max_epochs, mura.scheduler.grace_period) == (30, 3)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_search_space(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_search_space(str(bad))
    trial = tmp_path / "trial.yaml"
    trial.write_text("arch: resnet18\nweights: none\ndata: {root: x}\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key `learning_rate`"):
        load_trial_config(str(trial))


WHEN_SPACE = {
    "class_weighting": {"choice": ["mura", "inverse"]},
    "augment": "light",
    "lr": {"loguniform": [1e-4, 1e-2]},
    "optimizer": {"choice": ["adam", "adamw"], "when": {"class_weighting": ["mura"]}},
}
WHEN_BAD = [
    ({"fp_bias": {"uniform": [0, 1], "when": {"class_weighting": ["inversee"]}}},
     ("`space.fp_bias.when.class_weighting`: 'inversee' is not a value of `class_weighting`; "
     "its values: 'mura', 'inverse'")),
    ({"fp_bias": {"uniform": [0, 1], "when": {"class_weighting": []}}},
     ("`space.fp_bias.when.class_weighting` must list at least one value of `class_weighting` "
     "('mura', 'inverse')")),
    ({"fp_bias": {"uniform": [0, 1], "when": {"augment": "strong"}}},
     "`space.fp_bias.when.augment`: 'strong' is not a value of `augment`; its values: 'light'"),
    ({"fp_bias": {"uniform": [0, 1], "when": {"lr": [0.001]}}},
     "`space.fp_bias.when.lr`: `lr` is a loguniform parameter; `when` needs a choice or constant"),
    ({"batch_size": {"int": [8, 32]}, "fp_bias": {"uniform": [0, 1], "when": {"batch_size": 8}}},
     "`space.fp_bias.when.batch_size`: `batch_size` is an int parameter; `when` needs a choice"),
    # optimizer is only sampled under mura, so it never meets class_weighting inverse.
    ({"weight_decay": {"loguniform": [1e-6, 1e-2],
                       "when": {"optimizer": ["adamw"], "class_weighting": ["inverse"]}}},
     ("`space.weight_decay.when` can never hold: no values of `class_weighting`, `optimizer` meet "
     "it and their own `when` conditions together, so `weight_decay` would never be sampled")),
    # The same through a chain: fp_bias needs optimizer, which needs class_weighting mura.
    ({"weight_decay": {"choice": [0.0, 0.01], "when": {"optimizer": ["adamw"]}},
      "fp_bias": {"uniform": [0, 1], "when": {"weight_decay": [0.01], "class_weighting": ["inverse"]}}},
     ("`space.fp_bias.when` can never hold: no values of `class_weighting`, `optimizer`, "
     "`weight_decay` meet it")),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", WHEN_BAD, ids=[m[:50] for _, m in WHEN_BAD])
def test_when_values_are_checked_against_the_parent(extra, message):
    with pytest.raises(ConfigError) as info:
        parse_search_space(spec_with("space", {**WHEN_SPACE, **extra}))
    assert str(info.value).startswith(message), str(info.value)


def test_when_conditions_that_can_hold_parse():
    space = {
        **WHEN_SPACE,
        "weight_decay": {"choice": [0.0, 0.01], "when": {"optimizer": ["adamw"]}},
        "fp_bias": {"uniform": [0, 1], "when": {"weight_decay": 0.01, "class_weighting": "mura"}},
        "dropout": {"uniform": [0, 0.5], "when": {"class_weighting": "inverse", "augment": "light"}},
    }
    spec = parse_search_space(spec_with("space", space))
    when = {p.name: p.when for p in spec.space}
    assert when["fp_bias"] == (("weight_decay", (0.01,)), ("class_weighting", ("mura",)))
    assert when["dropout"] == (("class_weighting", ("inverse",)), ("augment", ("light",)))


TOO_BIG_TRIAL = [
    ({"image_size": 100000}, "image_size must be <= 1024, got 100000"),
    ({"batch_size": 100000}, "batch_size must be <= 4096, got 100000"),
    ({"max_epochs": 10**6}, "max_epochs must be <= 1000, got 1000000"),
    ({"early_stop_patience": 10**6}, "early_stop_patience must be <= 1000, got 1000000"),
    ({"plateau_patience": 10**6}, "plateau_patience must be <= 1000, got 1000000"),
    ({"warmup_epochs": 5000}, "warmup_epochs must be <= 1000, got 5000"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0, got -1"),
    ({"warmup_epochs": 31}, "`warmup_epochs <= max_epochs` must hold, but got warmup_epochs=31, max_epochs=30"),
    ({"precise_bn_images": 10**9}, "precise_bn_images must be <= 100000, got 1000000000"),
    ({"lr": 5.0}, "lr must be <= 1.0, got 5.0"),
    ({"weight_decay": 10.0}, "weight_decay must be <= 1.0, got 10.0"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
    ({"seed": 2**40}, "seed must be <= 4294967295, got 1099511627776"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, message", TOO_BIG_TRIAL, ids=[m[:40] for _, m in TOO_BIG_TRIAL])
def test_trial_settings_have_sane_bounds(kwargs, message):
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(kwargs)
    assert str(info.value) == message


TOO_BIG_SPEC = [
    (spec_with("search.num_samples", 10**6), "search.num_samples must be <= 10000, got 1000000"),
    (spec_with("search.seed", -1), "search.seed must be >= 0, got -1"),
    (spec_with("data.seed", 2**32), "data.seed must be <= 4294967295, got 4294967296"),
    (spec_with("resources.workers_per_trial", 10**4), "resources.workers_per_trial must be <= 128, got 10000"),
    (spec_with("resources.gpus_per_worker", -1), "resources.gpus_per_worker must be >= 0, got -1.0"),
    (spec_with("resources.gpus_per_worker", 64), "resources.gpus_per_worker must be <= 8, got 64.0"),
    (spec_with("resources.cpus_per_worker", 0), "resources.cpus_per_worker must be in (0, 256], got 0.0"),
    (spec_with("resources.max_concurrent", 10**9), "resources.max_concurrent must be <= 10000, got 1000000000"),
    (spec_with("resources.max_failures", 10**6), "resources.max_failures must be <= 100, got 1000000"),
    (spec_with("scheduler.max_epochs", 10**6), "scheduler.max_epochs must be <= 1000, got 1000000"),
    (spec_with("scheduler.reduction_factor", 1000), "scheduler.reduction_factor must be in (1, 100], got 1000.0"),
]  # fmt: skip


@pytest.mark.parametrize("raw, message", TOO_BIG_SPEC, ids=[m[:40] for _, m in TOO_BIG_SPEC])
def test_search_settings_have_sane_bounds(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_search_space(raw)
    assert str(info.value) == message


def test_a_huge_image_size_in_a_trial_file_is_refused(tmp_path):
    trial = tmp_path / "trial.yaml"
    trial.write_text("arch: resnet18\nweights: none\nimage_size: 100000\n")
    with pytest.raises(ConfigError, match=r"^image_size must be <= 1024, got 100000$"):
        load_trial_config(str(trial))


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: a\nspace: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\nname: b\n",
         "duplicate key `name` at lines 1 and 3"),
        ("space:\n  lr: {choice: [0.1]}\nscheduler:\n  max_epochs: 3\n  grace_period: 1\n  max_epochs: 5\n",
         "duplicate key `scheduler.max_epochs` at lines 4 and 6"),
        ("space: {lr: {choice: [0.1]}}\nsearch:\n  points_to_evaluate:\n    - {lr: 0.1, lr: 0.2}\n",
         "duplicate key `search.points_to_evaluate[0].lr` at lines 4 and 4"),
    ],
)  # fmt: skip
def test_duplicate_yaml_keys_in_a_search_space_are_refused(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_search_space(str(path))
    assert str(info.value) == f"{path}: {message}"


def test_duplicate_yaml_keys_in_a_trial_config_are_refused(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text("arch: resnet18\nweights: none\nlr: 0.1\ndata: {root: x}\nlr: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load_trial_config(str(path))
    assert str(info.value) == f"{path}: duplicate key `lr` at lines 3 and 5"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    # `<<: *base` then an override is how YAML shares settings, not a repeated key.
    path = tmp_path / "x.yaml"
    path.write_text("trial:\n  <<: {lr: 0.1, dropout: 0.2}\n  lr: 0.01\nspace: {}\n")
    assert load_yaml(str(path))["trial"] == {"lr": 0.01, "dropout": 0.2}


@pytest.mark.parametrize("how", ["simulated", "chmod"])
def test_unreadable_config_file_names_the_file_and_the_reason(
    tmp_path, monkeypatch, how, permissions_enforced
):
    from fsspec.implementations.local import LocalFileSystem

    with pytest.raises(ConfigError, match=f"^cannot read {tmp_path}: is a directory$"):
        load_trial_config(str(tmp_path))
    path = tmp_path / "space.yaml"
    path.write_text("space: {lr: {choice: [0.1]}}\n")
    if how == "chmod":
        if not permissions_enforced:
            pytest.skip("this user ignores file permissions (root); the simulated case covers it")
        path.chmod(0)
    else:  # what the kernel does for a user without read permission
        import builtins

        real_open = builtins.open

        def denied(self, p, *args, **kwargs):
            raise PermissionError(13, "Permission denied", p)

        def open_(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "_open", denied)
        monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(ConfigError) as info:
        load_search_space(str(path))
    assert str(info.value) == f"cannot read {path}: permission denied"


# One bad value for every TrialConfig field (max_epochs comes from scheduler.max_epochs).
BAD_FIELD = {
    "arch": "alexnet",
    "finetune": "frozen",
    "last_n_blocks": 99,
    "backbone_lr_mult": -1.0,
    "weights": 5,
    "dropout": 1.5,
    "image_size": 100000,
    "batch_size": 0,
    "optimizer": "sgd",
    "lr": 5.0,
    "weight_decay": -1.0,
    "lr_schedule": "step",
    "plateau_patience": 0,
    "warmup_epochs": -1,
    "early_stop_patience": 0,
    "precise_bn_images": -1,
    "class_weighting": "focal",
    "fp_bias": -1.0,
    "augment": "heavy",
    "rotation": 200.0,
    "hflip": 1.5,
    "scale_min": -0.5,
    "scale_max": 0.0,
    "translate": 0.9,
    "brightness": "bright",
    "contrast": 2.0,
    "seed": -1,
    "binary_relevance": "maybe",
    "uncertain": "sometimes",
}


def test_every_trial_field_has_a_bad_value_below():
    from dataclasses import fields

    assert set(BAD_FIELD) == {f.name for f in fields(TrialConfig)} - {"max_epochs"}


def _names(message: str, where: str) -> bool:
    return message.startswith((f"{where} ", f"{where}:", f"`{where}`"))


@pytest.mark.parametrize("field", sorted(BAD_FIELD))
@pytest.mark.parametrize("source", ["trial", "space", "points_to_evaluate"])
def test_a_bad_trial_value_is_reported_where_it_is_written(field, source):
    bad = BAD_FIELD[field]
    spec = copy.deepcopy(GOOD)
    spec["space"]["fp_bias"] = {"uniform": [0.0, 1.0]}  # no `when` on a parameter popped below
    spec["space"].pop(field, None)
    if source == "trial":
        spec["trial"][field] = bad
        where = f"trial.{field}"
    elif source == "space":
        spec["space"][field] = {"constant": bad}
        where = f"space.{field}"
    else:
        spec["space"][field] = {"constant": getattr(TrialConfig(), field)}
        spec["search"]["points_to_evaluate"] = [{field: bad}]
        where = f"search.points_to_evaluate[0].{field}"
    with pytest.raises(ConfigError) as info:
        parse_search_space(spec)
    text = str(info.value)
    assert _names(text, where), text
    assert repr(bad) in text and "\n" not in text
    # No garbled paths: the place is named once, and no other place is.
    assert text.count(where) == 1 and "trial.trial" not in text and "is invalid" not in text
    elsewhere = [w for w in ("trial.", "space.", "points_to_evaluate") if w not in where]
    assert not any(w in text for w in elsewhere), text


@pytest.mark.parametrize(
    "trial, message",
    [
        ({"batch_size": 0}, "trial.batch_size must be >= 1, got 0"),
        ({"augment": "heavy"}, "trial.augment: unknown value 'heavy'; allowed: none, light, mura, strong"),
        ({"rotation": 200}, "trial.rotation must be in [0, 180], got 200.0"),
        ({"batch_size": "big"}, "`trial.batch_size` must be int, got 'big'"),
        ({"scale_min": 1.2}, "trial: augment `scale_min <= scale_max` must hold, but got scale_min=1.2, scale_max=1.0"),
    ],
)  # fmt: skip
def test_trial_block_errors_are_exact(trial, message):
    with pytest.raises(ConfigError) as info:
        parse_search_space(spec_with("trial", {"weights": "none", **trial}))
    assert str(info.value) == message


def test_a_value_that_clashes_with_another_setting_names_both():
    # scale_min 1.1 is fine with the `strong` preset (scale_max 1.15) but not with `mura` (1.0).
    spec = spec_with("trial", {"weights": "none", "scale_min": 1.1})
    spec["space"]["augment"] = {"choice": ["strong", "mura"]}
    with pytest.raises(ConfigError) as info:
        parse_search_space(spec)
    assert str(info.value) == (
        "space.augment: value 'mura' does not fit the other settings: augment "
        "`scale_min <= scale_max` must hold, but got scale_min=1.1, scale_max=1.0"
    )
    spec["space"]["augment"] = {"choice": ["strong"]}
    cfg = parse_search_space(spec).trial_config({"augment": "strong"})
    assert cfg.augment_params().scale_min == 1.1


# ----------------------------------------------------------------------------- starting points

POINTS_BAD = [
    ({"arch": "densenet169"}, ("search.points_to_evaluate[0].arch: 'densenet169' is not one of "
     "the choices ('resnet18', 'mobilenet_v3_small')")),
    ({"image_size": 320}, "search.points_to_evaluate[0].image_size: 320 is not one of the choices"),
    ({"lr": 1e-5}, ("search.points_to_evaluate[0].lr: 1e-05 is outside `space.lr.loguniform` "
     "[0.0001, 0.01]")),
    ({"dropout": 0.9}, "search.points_to_evaluate[0].dropout: 0.9 is outside"),
    ({"dropout": "high"}, "search.points_to_evaluate[0].dropout must be a number, got 'high'"),
    ({"batch_size": 12}, ("search.points_to_evaluate[0].batch_size: 12 is not on the grid of "
     "`space.batch_size` (8 + k * 8)")),
    ({"batch_size": 16.5}, "search.points_to_evaluate[0].batch_size must be an integer"),
    ({"augment": "strong"}, ("search.points_to_evaluate[0].augment: 'strong' is not the constant "
     "('light')")),
    ({"arch": "mobilenet_v3_small", "fp_bias": 0.5}, ("search.points_to_evaluate[0].fp_bias: set, "
     "but `space.fp_bias.when` needs arch in ['resnet18'] and this point's arch is "
     "'mobilenet_v3_small'")),
]


@pytest.mark.parametrize("point, message", POINTS_BAD, ids=[m[27:70] for _, m in POINTS_BAD])
def test_a_starting_point_the_space_cannot_take_is_refused(point, message):
    good = {"arch": "resnet18", "lr": 1e-3}
    with pytest.raises(ConfigError) as info:
        parse_search_space(spec_with("search.points_to_evaluate", [good, point]))
    text = str(info.value).replace("points_to_evaluate[1]", "points_to_evaluate[0]")
    assert "\n" not in text and text.startswith(message), text
    assert "points_to_evaluate[1]" in str(info.value)  # the index of the bad point


def test_starting_points_inside_the_space_pass():
    points = [{"arch": "mobilenet_v3_small", "image_size": 48, "lr": 1e-4, "dropout": 0.5,
               "batch_size": 32, "augment": "light"},
              {"arch": "resnet18", "fp_bias": 0.25}, {"fp_bias": 1.0}]  # arch sampled: may hold
    spec = parse_search_space(spec_with("search.points_to_evaluate", points))
    assert spec.search.points_to_evaluate == tuple(points)


def _readme_yaml_after(heading: str) -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    found = re.search(rf"^## {re.escape(heading)}\n+```yaml\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    assert found, f"README has no YAML block under `## {heading}`"
    return found.group(1)


def test_the_readme_search_space_example_validates():
    # The README's own example, as a user would copy it: every key, every point, every `when`.
    spec = parse_search_space(yaml.safe_load(_readme_yaml_after("The search-space file")),
                              source="README.md")
    assert spec.search.points_to_evaluate and {p.name for p in spec.space} >= {"arch", "fp_bias"}


@pytest.mark.parametrize("text, where, what", [
    ("name: x\nspace:\n  lr: {choice: [1, 2]\n  arch: a\n", "line 4, column 3",
     "expected ',' or '}', but got '<scalar>' (while parsing a flow mapping at line 3)"),
    ("name: x\n  space: 3\n", "line 2, column 8", "mapping values are not allowed here"),
    ("name: x\nspace:\n\tlr: 3\n", "line 3, column 1",
     "found character '\\t' that cannot start any token"),
])
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, text, where, what):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(str(bad))
    message = str(info.value)
    assert message.startswith(f"{bad}, {where}: not valid YAML: {what}"), message
    assert "\n" not in message


def test_shipped_chexpert_spaces_validate_and_start_from_report_3():
    """search_spaces/chexpert.yaml's first point is source report 3's setup (ResNet-50, Adam 1e-3,
    plateau patience 5, early stopping patience 10, batch 16, U-Ignore); the policy is searched."""
    spec = load_search_space("search_spaces/chexpert.yaml")
    first = spec.trial_config(dict(spec.search.points_to_evaluate[0]))
    assert (first.arch, first.weights, first.optimizer, first.lr, first.lr_schedule,
            first.plateau_patience, first.early_stop_patience, first.batch_size,
            first.uncertain) == ("resnet50", "imagenet", "adam", 1e-3, "plateau", 5, 10, 16,
                                 "ignore")
    params = {p.name: p for p in spec.space}
    assert set(params["arch"].values) == {"densenet121", "resnet50"}
    assert set(params["image_size"].values) <= set(range(224, 321))
    assert set(params["uncertain"].values) == {"ignore", "zeros", "ones", "drop"}
    assert spec.data.format == "chexpert" and spec.trial["hflip"] == 0.0
    demo = load_search_space("search_spaces/chexpert_demo.yaml")
    assert demo.trial["weights"] == "none" and demo.data.format == "chexpert"


def test_every_search_space_the_readme_shows_validates():
    """Not only the reference example: every YAML block of the README that holds a `space:`
    (the extended search's file, ...) parses as `raysearch tune` would parse it."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", readme,
                                                   re.DOTALL | re.MULTILINE)]
    spaces = [b for b in blocks if isinstance(b, dict) and "space" in b]
    assert len(spaces) >= 2, "README shows fewer search spaces than expected"
    for raw in spaces:
        assert parse_search_space(raw, source="README.md").space
