"""Tests for the ensemble stage: selection, test inference, outputs and their schema, errors."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from raysearch.config import TrialConfig
from raysearch.data.mura import BODY_PARTS
from raysearch.ensemble.run import METRIC_COLUMNS, run_ensemble
from raysearch.ensemble.selection import greedy_select, select_top
from raysearch.errors import CheckpointError, ConfigError
from raysearch.evaluation import metrics as M
from raysearch.experiment import find_experiment
from raysearch.storage import atomic_write_bytes, atomic_write_parquet, atomic_write_text, join
from raysearch.storage import read_parquet as read_pq
from tests.test_schema import assert_matches_schema

# trial id -> best val_loss; "t_failed" never wrote a checkpoint
LOSSES = {"t_a": 0.52, "t_b": 0.31, "t_c": 0.70, "t_d": 0.44, "t_e": 0.61}
QUALITY = {"t_a": 1.0, "t_b": 2.0, "t_c": 0.3, "t_d": 1.5, "t_e": 0.6}  # signal in the val probs


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120, color_system=None)


@pytest.fixture(scope="module")
def manifest(tiny_root) -> pd.DataFrame:
    from raysearch.data.mura import read_mura

    return read_mura(tiny_root, val_fraction=0.3, seed=0)


@pytest.fixture(scope="module")
def model_bytes() -> dict[str, bytes]:
    """Real, distinct mobilenet_v3_small state dicts (random init, single-logit head)."""
    from raysearch.models.factory import create_model

    out = {}
    with torch.random.fork_rng():
        for i, tid in enumerate(LOSSES):
            torch.manual_seed(i)
            buf = io.BytesIO()
            torch.save(create_model("mobilenet_v3_small", weights="none").state_dict(), buf)
            out[tid] = buf.getvalue()
    return out


def make_experiment(storage: str, name: str, manifest: pd.DataFrame, model_bytes, *, cache_dir):
    """A finished-search folder as `raysearch tune` leaves it: experiment.json, manifest,
    trials.parquet and one best checkpoint per trial (model.pt, trial.json, val predictions)."""
    exp = join(storage, name)
    atomic_write_parquet(manifest, join(exp, "manifest.parquet"))
    val = manifest[manifest["split"] == "val"]
    cfg = TrialConfig(arch="mobilenet_v3_small", weights="none", image_size=32, batch_size=16)
    rows = []
    for i, (tid, loss) in enumerate(LOSSES.items()):
        ckpt = join(exp, f"train-{tid}", "checkpoint_000002")
        rng = np.random.default_rng(i)
        logit = QUALITY[tid] * (2 * val["label"].to_numpy() - 1) + rng.normal(0, 1.0, len(val))
        preds = val[["image_path", "study_id", "patient_id", "body_part", "label"]].assign(
            prob=(1 / (1 + np.exp(-logit))).astype(np.float32)
        )
        atomic_write_parquet(
            preds.sample(frac=1.0, random_state=i), join(ckpt, "val_predictions.parquet")
        )
        atomic_write_bytes(join(ckpt, "model.pt"), model_bytes[tid])
        atomic_write_text(join(ckpt, "trial.json"), json.dumps({**cfg.to_dict(), "seed": i}))
        atomic_write_text(join(ckpt, "metrics.json"), json.dumps({"val_loss": loss}))
        rows.append(
            {
                "trial_id": tid,
                "status": "completed",
                "epochs": 3,
                "best_val_loss": loss,
                "best_epoch": 2,
                "val_study_kappa": 0.5,
                "best_checkpoint": ckpt,
                "wall_time_s": 1.0,
                "error": None,
                **cfg.to_dict(),
            }
        )
    rows.append(
        {
            "trial_id": "t_failed",
            "status": "failed",
            "epochs": 0,
            "best_val_loss": float("nan"),
            "best_epoch": 0,
            "val_study_kappa": float("nan"),
            "best_checkpoint": None,
            "wall_time_s": 1.0,
            "error": "boom",
            **cfg.to_dict(),
        }
    )
    atomic_write_parquet(pd.DataFrame(rows), join(exp, "trials.parquet"))
    atomic_write_text(
        join(exp, "experiment.json"),
        json.dumps(
            {
                "name": name,
                "storage": storage,
                "experiment_dir": exp,
                "manifest": join(exp, "manifest.parquet"),
                "cache_dir": cache_dir,
                "data": {},
            }
        ),
    )
    return exp


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ens_cache"))


@pytest.fixture(scope="module")
def top_run(tmp_path_factory, manifest, model_bytes, cache_dir):
    """One `--top 3` run, shared by the tests that read its outputs."""
    storage = str(tmp_path_factory.mktemp("reports"))
    exp = make_experiment(storage, "exp1", manifest, model_bytes, cache_dir=cache_dir)
    console = _quiet()
    out = run_ensemble(storage=storage, top=3, n_boot=200, seed=0, console=console)
    return {"exp": exp, "out": out, "text": console.file.getvalue(), "storage": storage}


# ----------------------------------------------------------------------------- selection


def _trials(losses, ckpts=None) -> pd.DataFrame:
    ids = [f"t{i}" for i in range(len(losses))]
    ckpts = ckpts or [f"/ck/{i}" for i in ids]
    return pd.DataFrame(
        {"trial_id": ids, "status": "completed", "best_val_loss": losses, "best_checkpoint": ckpts}
    )


def test_select_top_picks_the_k_lowest_with_equal_weights():
    trials = _trials([0.5, 0.2, 0.9, 0.1, 0.3, 0.4]).sample(frac=1.0, random_state=0)
    top = select_top(trials, 4)
    assert top["trial_id"].tolist() == ["t3", "t1", "t4", "t5"]
    assert np.allclose(top["weight"], 0.25)


def test_select_top_skips_trials_without_checkpoint_and_shrinks():
    trials = _trials([0.1, 0.2, float("nan"), 0.05], ckpts=[None, "/ck/1", "/ck/2", ""])
    top = select_top(trials, 4)
    assert top["trial_id"].tolist() == ["t1"]
    assert top["weight"].tolist() == [1.0]


def test_select_top_without_any_checkpoint_is_a_clear_error():
    trials = _trials([float("nan")] * 2, ckpts=[None, None]).assign(status="failed")
    with pytest.raises(CheckpointError, match="none of the 2 trials .*2 failed"):
        select_top(trials, 4)
    with pytest.raises(ConfigError, match="--top must be >= 1"):
        select_top(_trials([0.1]), 0)


def _val_images(rng, n_studies: int) -> pd.DataFrame:
    views = rng.integers(1, 4, n_studies)  # uneven view counts per study
    study = np.repeat(np.arange(n_studies), views)
    label = rng.integers(0, 2, n_studies)[study]
    return pd.DataFrame(
        {
            "study_id": [f"s{s}" for s in study],
            "patient_id": [f"p{s // 2}" for s in study],
            "body_part": "WRIST",
            "label": label,
        }
    )


def _study_loss(images: pd.DataFrame, probs: dict[str, np.ndarray], weights: dict[str, float]):
    ens = sum(w * probs[t] for t, w in weights.items())
    studies = M.aggregate_studies(images.assign(prob=ens))
    return M.log_loss(studies["label"], studies["prob"])


@pytest.mark.parametrize("seed", range(12))
def test_greedy_is_never_worse_than_the_best_single_member(seed):
    rng = np.random.default_rng(seed)
    images = _val_images(rng, 40)
    y = images["label"].to_numpy()
    probs = {
        f"m{j}": 1 / (1 + np.exp(-(rng.uniform(0, 2) * (2 * y - 1) + rng.normal(0, 1.5, len(y)))))
        for j in range(6)
    }
    weights = greedy_select(probs, images, max_rounds=10)
    assert abs(sum(weights.values()) - 1) < 1e-12
    best_single = min(_study_loss(images, probs, {t: 1.0}) for t in probs)
    assert _study_loss(images, probs, weights) <= best_single + 1e-12


def test_greedy_picks_with_replacement_and_keeps_the_best_size():
    rng = np.random.default_rng(0)
    images = _val_images(rng, 60)
    y = images["label"].to_numpy().astype(float)
    perfect = np.where(y == 1, 0.99, 0.01)
    noisy = np.clip(perfect + rng.normal(0, 0.4, len(y)), 0.01, 0.99)
    # The perfect member alone cannot be improved upon: one pick, weight 1.
    assert greedy_select({"noisy": noisy, "perfect": perfect}, images, max_rounds=5) == {
        "perfect": 1.0
    }
    # a is sure of the abnormal studies, b of the normal ones: the best mix picks a three times
    # and b twice out of six rounds (with replacement), and beats either alone.
    a = np.where(y == 1, 0.95, 0.5)
    b = np.where(y == 1, 0.5, 0.02)
    w = greedy_select({"a": a, "b": b, "bad": 1 - perfect}, images, max_rounds=6)
    assert w == pytest.approx({"a": 0.6, "b": 0.4})
    assert _study_loss(images, {"a": a, "b": b}, w) < min(
        _study_loss(images, {"a": a}, {"a": 1.0}), _study_loss(images, {"b": b}, {"b": 1.0})
    )
    with pytest.raises(ConfigError, match="max_rounds >= 1"):
        greedy_select({"a": a}, images, max_rounds=0)


# ----------------------------------------------------------------------------- finding experiments


def test_find_experiment_newest_by_name_by_path_and_missing(tmp_path):
    storage = str(tmp_path / "reports")
    for name, t in (("old", 1_000_000), ("new", 2_000_000)):
        atomic_write_text(join(storage, name, "experiment.json"), "{}")
        os.utime(join(storage, name, "experiment.json"), (t, t))
    assert find_experiment(None, storage=storage) == join(storage, "new")
    assert find_experiment("old", storage=storage) == join(storage, "old")
    assert find_experiment(join(storage, "old"), storage="elsewhere") == join(storage, "old")
    with pytest.raises(
        ConfigError, match=r"no experiment at .*nope.*experiments under .*: new, old"
    ):
        find_experiment("nope", storage=storage)
    with pytest.raises(ConfigError, match="no experiment under"):
        find_experiment(None, storage=str(tmp_path / "empty"))
    # a path is looked for where it points: the hint lists its folder, not the storage's
    runs = str(tmp_path / "runs")
    atomic_write_text(join(runs, "tiny", "experiment.json"), "{}")
    with pytest.raises(ConfigError, match=r"no experiment at .*runs/tyni .*experiments under "
                                          r".*runs: tiny$"):
        find_experiment(join(runs, "tyni"), storage=storage)
    with pytest.raises(ConfigError, match=r"there are none under .*nowhere$"):
        find_experiment(str(tmp_path / "nowhere" / "x"), storage=storage)


# ----------------------------------------------------------------------------- a full run


def test_run_top_writes_every_file_with_the_documented_columns(top_run):
    out = top_run["out"]
    assert out == join(top_run["exp"], "ensemble")
    members = pd.read_parquet(join(out, "members.parquet"))
    assert members["trial_id"].tolist() == ["t_b", "t_d", "t_a"]  # the 3 lowest val_loss
    assert np.allclose(members["weight"], 1 / 3)
    for col in ("trial_id", "weight", "best_val_loss", "arch", "image_size", "lr",
                "best_checkpoint"):  # trials.parquet's name for the checkpoint column
        assert col in members.columns
    assert_matches_schema(out)
    member_cols = ["prob_t_b", "prob_t_d", "prob_t_a"]
    studies = pd.read_parquet(join(out, "study_predictions.parquet"))
    assert list(studies.columns) == [
        "study_id",
        "patient_id",
        "body_part",
        "split",
        "label",
        "n_images",
        "prob",
        "pred",
        *member_cols,
    ]
    images = pd.read_parquet(join(out, "image_predictions.parquet"))
    assert list(images.columns) == [
        "image_path",
        "study_id",
        "patient_id",
        "body_part",
        "split",
        "label",
        "prob",
        "pred",
        *member_cols,
    ]
    assert set(studies["split"]) == {"val", "test"}
    metrics = pd.read_parquet(join(out, "category_metrics.parquet"))
    assert list(metrics.columns) == METRIC_COLUMNS
    assert METRIC_COLUMNS[:15] == [
        "model",
        "split",
        "body_part",
        "n_studies",
        "accuracy",
        "kappa",
        "kappa_low",
        "kappa_high",
        "sensitivity",
        "specificity",
        "auc",
        "tp",
        "fp",
        "tn",
        "fn",
    ]
    assert set(metrics["model"]) == {"ensemble", "t_b", "t_d", "t_a"}
    assert set(metrics["body_part"]) == {M.ALL, *BODY_PARTS}
    work = pd.read_csv(join(out, "worklist.csv"))
    assert list(work.columns) == [
        "rank",
        "study_id",
        "patient_id",
        "body_part",
        "prob",
        "pred",
        "label",
    ]
    with open(join(out, "ensemble.json")) as f:
        assert json.load(f)["method"] == "top"


def test_the_decision_threshold_is_chosen_on_val_studies(top_run):
    from raysearch.inference.predictor import Predictor

    with open(join(top_run["out"], "ensemble.json")) as f:
        summary = json.load(f)
    studies = read_pq(join(top_run["out"], "study_predictions.parquet"))
    val = studies[studies["split"] == "val"]
    assert summary["threshold"] == M.choose_threshold(val["label"], val["prob"])
    assert summary["threshold_rule"] == "max Cohen's kappa on val studies"
    from raysearch.experiment.schema import ENSEMBLE_JSON

    assert set(summary) == set(ENSEMBLE_JSON)  # every key documented, none undocumented
    assert "decision threshold: " in top_run["text"]
    # The predictor (predict and serve) decides at it.
    assert Predictor.from_dir(top_run["out"], device="cpu").threshold == summary["threshold"]


def test_category_metrics_can_be_recomputed_from_study_predictions(top_run):
    out = top_run["out"]
    studies = pd.read_parquet(join(out, "study_predictions.parquet"))
    metrics = pd.read_parquet(join(out, "category_metrics.parquet"))
    for row in metrics.itertuples():
        st = studies[studies["split"] == row.split]
        if row.body_part != M.ALL:
            st = st[st["body_part"] == row.body_part]
        col = "prob" if row.model == "ensemble" else f"prob_{row.model}"
        m = M.binary_metrics(st["label"], st[col])
        for key in ("n_studies", "tp", "fp", "tn", "fn"):
            assert getattr(row, key) == m[key], (row.model, row.split, row.body_part, key)
        for key in ("accuracy", "kappa", "sensitivity", "specificity", "auc"):
            assert np.isclose(getattr(row, key), m[key], equal_nan=True), (row.model, key)
        if not np.isnan(row.kappa_low):
            assert row.kappa_low <= row.kappa + 1e-9 <= row.kappa_high + 2e-9
    # every split has an ALL row per model, with all of that split's studies
    all_rows = metrics[metrics["body_part"] == M.ALL]
    assert len(all_rows) == 2 * 4
    for split, n in studies["split"].value_counts().items():
        assert (all_rows.loc[all_rows["split"] == split, "n_studies"] == n).all()


def test_predictions_follow_the_mura_rules(top_run, manifest):
    out = top_run["out"]
    images = pd.read_parquet(join(out, "image_predictions.parquet"))
    studies = pd.read_parquet(join(out, "study_predictions.parquet"))
    cols = ["prob_t_b", "prob_t_d", "prob_t_a"]
    # the ensemble image probability is the mean over members; studies are view means, > 0.5
    assert np.allclose(images["prob"], images[cols].mean(axis=1))
    again = M.aggregate_studies(images, prob_cols=["prob", *cols])
    pd.testing.assert_frame_equal(again, studies.drop(columns="pred"), check_dtype=False)
    assert (studies["pred"] == (studies["prob"] > 0.5)).all()
    # test images are the manifest's test split, val images its val split, nothing else
    for split in ("test", "val"):
        want = set(manifest.loc[manifest["split"] == split, "image_path"])
        assert set(images.loc[images["split"] == split, "image_path"]) == want
    # val probabilities are the saved ones (no re-inference)
    saved = pd.read_parquet(
        join(top_run["exp"], "train-t_d", "checkpoint_000002", "val_predictions.parquet")
    ).set_index("image_path")["prob"]
    val = images[images["split"] == "val"].set_index("image_path")
    assert np.allclose(val["prob_t_d"], saved.reindex(val.index), atol=1e-7)
    # test probabilities come from real inference: distinct members, distinct probabilities
    test = images[images["split"] == "test"]
    assert not np.allclose(test["prob_t_b"], test["prob_t_d"])


def test_worklist_is_the_test_studies_most_likely_abnormal_first(top_run):
    out = top_run["out"]
    work = pd.read_csv(join(out, "worklist.csv"))
    studies = pd.read_parquet(join(out, "study_predictions.parquet"))
    test = studies[studies["split"] == "test"]
    assert sorted(work["study_id"]) == sorted(test["study_id"])
    assert (np.diff(work["prob"].to_numpy()) <= 0).all()
    assert work["rank"].tolist() == list(range(1, len(work) + 1))


def test_terminal_report_shows_members_and_both_splits(top_run):
    text = top_run["text"]
    assert "ensemble members" in text and "t_b" in text
    assert "selection set (val)" in text
    assert "best single member t_b" in text  # lowest best val_loss
    assert "ALL" in text and "[" in text  # kappa with interval


def test_greedy_run_with_tta_and_memory_storage(manifest, model_bytes, cache_dir):
    storage = "memory://ens-test/reports"
    make_experiment(storage, "exp_mem", manifest, model_bytes, cache_dir=cache_dir)
    out = run_ensemble(
        storage=storage,
        method="greedy",
        top=5,
        tta=True,
        n_boot=50,
        out="memory://ens-test/greedy-out",
        console=_quiet(),
    )
    assert out == "memory://ens-test/greedy-out"
    members = read_pq(join(out, "members.parquet"))
    assert abs(members["weight"].sum() - 1) < 1e-9
    assert (members["picks"] >= 1).all() and members["picks"].sum() <= 5
    assert np.allclose(members["weight"], members["picks"] / members["picks"].sum())
    # never worse than the best single candidate on the selection set (study log loss)
    images = read_pq(join(out, "image_predictions.parquet"))
    val = images[images["split"] == "val"]
    ens = M.aggregate_studies(val)
    exp = join(storage, "exp_mem")
    single = []
    for tid in LOSSES:
        p = read_pq(join(exp, f"train-{tid}", "checkpoint_000002", "val_predictions.parquet"))
        single.append(M.log_loss(*M.aggregate_studies(p)[["label", "prob"]].to_numpy().T))
    assert M.log_loss(ens["label"], ens["prob"]) <= min(single) + 1e-9


# ----------------------------------------------------------------------------- broken checkpoints


@pytest.mark.parametrize(
    ("broken", "how", "match"),
    [
        ("model.pt", "missing", r"trial t_b: model\.pt is missing from its checkpoint .*train-t_b"),
        ("model.pt", "garbage", r"trial t_b: model\.pt in .*train-t_b.* not a readable state dict"),
        ("val_predictions.parquet", "missing", r"trial t_d: val_predictions\.parquet is missing"),
        ("val_predictions.parquet", "garbage", r"trial t_d: val_predictions\.parquet in .*corrupt"),
        ("trial.json", "garbage", r"trial t_a: trial\.json in .*corrupt"),
    ],
)
def test_broken_checkpoint_names_the_trial_and_writes_nothing(
    tmp_path, manifest, model_bytes, cache_dir, broken, how, match
):
    storage = str(tmp_path / "reports")
    exp = make_experiment(storage, "exp", manifest, model_bytes, cache_dir=cache_dir)
    tid = {"model.pt": "t_b", "val_predictions.parquet": "t_d", "trial.json": "t_a"}[broken]
    path = join(exp, f"train-{tid}", "checkpoint_000002", broken)
    if how == "missing":
        os.remove(path)
    else:
        with open(path, "wb") as f:
            f.write(b"\x00garbage\xff" * 10)
    with pytest.raises(CheckpointError, match=match):
        run_ensemble(experiment="exp", storage=storage, top=3, n_boot=20, console=_quiet())
    assert not os.path.exists(join(exp, "ensemble"))


def test_a_model_pt_of_another_architecture_names_trial_file_arch_and_keys(tmp_path):
    from raysearch.data.mura import MURA_TASK
    from raysearch.experiment import TrialCheckpoint
    from raysearch.inference.predictor import load_member_model
    from raysearch.models.factory import create_model

    ckpt = tmp_path / "train-t_x" / "checkpoint_000002"
    ckpt.mkdir(parents=True)
    torch.save(create_model("resnet18").state_dict(), ckpt / "model.pt")
    member = TrialCheckpoint(
        trial_id="t_x", checkpoint=str(ckpt), task=MURA_TASK,
        config=TrialConfig(arch="mobilenet_v3_small", weights="none"),
    )  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        load_member_model(member, k=1, device=torch.device("cpu"))
    assert str(info.value).startswith(
        f"trial t_x: model.pt in {ckpt}: the weights do not fit mobilenet_v3_small: "
        "missing keys features.0.0.weight, features.0.1.weight, features.0.1.bias (+"
    )
    assert "unexpected keys conv1.weight, bn1.weight, bn1.bias (+" in str(info.value)


def test_fewer_usable_trials_than_k_says_so(tmp_path, manifest, model_bytes, cache_dir):
    storage = str(tmp_path / "reports")
    make_experiment(storage, "exp", manifest, model_bytes, cache_dir=cache_dir)
    console = _quiet()
    out = run_ensemble(experiment="exp", storage=storage, top=8, n_boot=20, console=console)
    assert len(pd.read_parquet(join(out, "members.parquet"))) == 5
    assert ("--top 8 asks for more members than the 5 trials with a usable checkpoint (1 of the "
            "6 trials has none); using 5") in " ".join(console.file.getvalue().split())


def test_top_beyond_the_trials_says_what_is_true():
    from raysearch.ensemble.run import _top_shortfall

    # not "only 8 of 8 trials have a usable checkpoint": every trial has one, --top is too big
    assert _top_shortfall(100, 8, 8) == (
        "--top 100 asks for more members than the 8 trials with a usable checkpoint; using 8")
    assert _top_shortfall(4, 1, 3) == ("--top 4 asks for more members than the 1 trial with a "
                                       "usable checkpoint (2 of the 3 trials have none); using 1")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_on_a_small_search(small_experiment):
    out = run_ensemble(experiment=small_experiment, top=4, n_boot=1000, console=_quiet())
    studies = read_pq(join(out, "study_predictions.parquet"))
    metrics = read_pq(join(out, "category_metrics.parquet"))
    assert list(metrics.columns) == METRIC_COLUMNS
    for row in metrics[metrics["model"] == "ensemble"].itertuples():
        st = studies[studies["split"] == row.split]
        if row.body_part != M.ALL:
            st = st[st["body_part"] == row.body_part]
        m = M.binary_metrics(st["label"], st["prob"])
        assert (row.n_studies, row.tp, row.fp, row.tn, row.fn) == tuple(
            m[k] for k in ("n_studies", "tp", "fp", "tn", "fn")
        )
        assert np.isclose(row.kappa, m["kappa"], equal_nan=True)


def test_the_selection_path_is_the_score_of_each_prefix():
    """ensemble.json's selection_path: greedy's rounds in order, and top-k's rank order, each
    point the study log loss of the equal-weight mean of the picks so far."""
    from raysearch.ensemble.selection import greedy_picks, selection_path

    rng = np.random.default_rng(3)
    images = _val_images(rng, 50)
    y = images["label"].to_numpy().astype(float)
    probs = {f"m{j}": np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.3, len(y)), 0.01, 0.99)
             for j in range(4)}
    path: list = []
    greedy_picks(probs, images, max_rounds=5, path=path)
    assert [p["round"] for p in path] == [1, 2, 3, 4, 5]
    added = [p["added"] for p in path]
    for i, p in enumerate(path):
        picks = pd.Series(added[: i + 1]).value_counts()
        weights = {t: n / (i + 1) for t, n in picks.items()}
        assert p["val_study_log_loss"] == pytest.approx(_study_loss(images, probs, weights))
    top = selection_path(probs, images, ["m2", "m0"])
    assert [p["added"] for p in top] == ["m2", "m0"]
    assert top[1]["val_study_log_loss"] == pytest.approx(
        _study_loss(images, probs, {"m2": 0.5, "m0": 0.5}))


def test_find_experiment_takes_a_name_with_a_slash_and_names_an_ensemble_folder(tmp_path):
    """`status demo/` (a shell's completion) is the experiment `demo`; an experiment's
    `ensemble/` folder given for it is named as such, with its experiment."""
    storage = str(tmp_path / "reports")
    atomic_write_text(join(storage, "demo", "experiment.json"), "{}")
    atomic_write_text(join(storage, "demo", "ensemble", "members.parquet"), "")
    assert find_experiment("demo/", storage=storage) == join(storage, "demo")
    with pytest.raises(ConfigError, match=r"demo/ensemble is an ensemble folder, not an "
                                          r"experiment; its experiment is .*reports/demo$"):
        find_experiment(join(storage, "demo", "ensemble"), storage=storage)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_an_ensemble_seed_out_of_range_is_refused_before_any_work(tmp_path, seed):
    """`ensemble --seed -1` loaded and scored every member, then failed with `unexpected
    ValueError: expected non-negative integer`, exit 1."""
    with pytest.raises(ConfigError, match=rf"^--seed must be in \[0, 4294967295\], got {seed}$"):
        run_ensemble(experiment=str(tmp_path / "nowhere"), seed=seed)
