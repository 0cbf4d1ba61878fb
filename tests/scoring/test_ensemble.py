"""`freqtag ensemble` and `freqtag evaluate`: a real tiny grid end to end, hand-built runs with known
tables, results.tsv against scikit-learn, refusals, and the --groups rebuild of the original submission."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, freqtag
from known_runs import BAD, GOOD, KNOWN_RUNS, SPLITS, T, make_run
from sklearn.metrics import average_precision_score, f1_score, precision_recall_fscore_support, roc_auc_score

from freqtag.data.jamendo import MOODTHEME_TAGS
from freqtag.scoring.submission import RESULT_METRICS

cli = partial(freqtag, in_process=True)  # `freqtag ARGS` in this process: torch is imported once for all tests


def read_table(path: Path) -> dict[str, dict[str, float]]:
    with open(path, newline="") as f:
        return {r["row"]: {k: float(v) for k, v in r.items() if k != "row"} for r in csv.DictReader(f)}


def read_results(path: Path) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split("\t") for line in path.read_text().splitlines())}


def sk_scores(probs: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(macro PR-AUC, macro ROC-AUC) by scikit-learn."""
    return average_precision_score(targets, probs, average="macro"), roc_auc_score(targets, probs, average="macro")


# --------------------------------------------- (b) hand-built runs whose table is known

@pytest.fixture()
def known_runs(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    for i, ((model, loss), val) in enumerate(KNOWN_RUNS.items()):
        test = BAD if val is GOOD else GOOD
        overrides = [f"model={model}", f"loss={loss}", "experiment=ablation", f"paths.data_dir=/data/{i}"]
        make_run(sweep / str(i), overrides, {"validation": val, "test": test}, {"validation": T, "test": T})
    return sweep


def test_known_table(known_runs, tmp_path):
    res = cli("ensemble", known_runs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    table = read_table(tmp_path / "out" / "table.csv")
    # keys that vary: model, loss; experiment is the same everywhere, paths.* says where a run lived
    assert list(table) == ["model=convs", "model=freq_dep", "loss=bce", "loss=weighted", "ensemble"]
    cols = ("validation_pr_auc", "validation_roc_auc", "test_pr_auc", "test_roc_auc")
    want = {
        "model=convs": (2, 1, 1, 5 / 12, 0),  # validation mean GOOD; test mean BAD
        "model=freq_dep": (2, 0.5, 0.5, 0.5, 0.5),  # (GOOD + BAD) / 2 is constant: chance level
        "loss=bce": (2, 0.5, 0.5, 0.5, 0.5),
        "loss=weighted": (2, 1, 1, 5 / 12, 0),
        "ensemble": (4, 1, 1, 5 / 12, 0),  # (3 GOOD + BAD) / 4 ranks like GOOD
    }
    for row, (runs, *values) in want.items():
        assert table[row]["runs"] == runs
        assert [table[row][c] for c in cols] == pytest.approx(values, abs=1e-12), row
    md = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert md[0] == "| row | runs | val PR-AUC | val ROC-AUC | test PR-AUC | test ROC-AUC |"
    assert md[2] == "| model=convs | 2 | **1.0000** | **1.0000** | 0.4167 | 0.0000 |"
    assert md[3] == "| model=freq_dep | 2 | 0.5000 | 0.5000 | **0.5000** | **0.5000** |"
    assert md[6] == "| ensemble | 4 | 1.0000 | 1.0000 | 0.4167 | 0.0000 |"  # never bold: not one of a pair
    assert (tmp_path / "out" / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_tag = list(csv.DictReader(open(tmp_path / "out" / "per_tag.csv")))
    assert [r["tag"] for r in per_tag] == list(MOODTHEME_TAGS[:2])
    assert float(per_tag[0]["validation_roc_auc"]) == 1.0 and float(per_tag[1]["test_pr_auc"]) == pytest.approx(5 / 12)
    assert per_tag[0]["validation_positives"] == per_tag[0]["test_positives"] == "2"
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_keys_that_only_say_how_a_run_ran_make_no_row(known_runs, tmp_path):
    """eval_batch_frames (how evaluation was batched) and async_checkpoint (how last.ckpt was written) change no
    result: like paths.*, they are no row of the table (and no part of a W&B run name, through the same WHERE)."""
    from freqtag.train.overrides import WHERE

    for i, run in enumerate(sorted(p for p in known_runs.iterdir())):
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        extra = [f"eval_batch_frames={i * 1000}", f"async_checkpoint={'true' if i % 2 else 'false'}"]
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + extra))
        assert all(o.startswith(WHERE) for o in extra)
    res = freqtag("ensemble", known_runs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert list(read_table(tmp_path / "out" / "table.csv")) == ["model=convs", "model=freq_dep", "loss=bce",
                                                                "loss=weighted", "ensemble"]


def test_select_restricts_the_runs(known_runs, tmp_path):
    res = cli("ensemble", known_runs, "--select", "model=freq_dep", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    table = read_table(tmp_path / "out" / "table.csv")
    assert list(table) == ["loss=bce", "loss=weighted", "ensemble"]  # model no longer varies
    assert table["loss=bce"]["validation_roc_auc"] == 0 and table["loss=weighted"]["validation_roc_auc"] == 1
    assert table["ensemble"]["runs"] == 2 and table["ensemble"]["validation_roc_auc"] == 0.5


def test_a_key_some_runs_leave_unset(known_runs, tmp_path):
    make_run(known_runs / "4", ["model=convs", "experiment=ablation"], {"validation": GOOD, "test": GOOD}, {"validation": T, "test": T})
    res = cli("ensemble", known_runs, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    table = read_table(tmp_path / "out" / "table.csv")
    assert list(table) == ["model=convs", "model=freq_dep", "loss=bce", "loss=weighted", "loss=(default)", "ensemble"]
    assert table["loss=(default)"]["runs"] == 1 and table["loss=(default)"]["test_roc_auc"] == 1


def test_evaluate_our_npz(known_runs):
    run = known_runs / "0" / "predictions"
    res = cli("evaluate", run / "validation.npz")  # the targets are in the file
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:2] == ["ROC-AUC-macro\t1.000000", "PR-AUC-macro\t1.000000"]
    res = cli("evaluate", run / "validation.npz", run / "test.npz")
    assert res.returncode == 1
    assert "differ in their track ids (row 0: 'track_validation_0000' vs 'track_test_0000')" in res.stderr


@pytest.mark.parametrize(("select", "message"), [
    ("features=mel96", "no run overrides 'features'; their override keys are: experiment, loss, model, paths.data_dir"),
    ("model=cnn", "no run has model=cnn; the runs have model=convs, freq_dep"),
    ("model", "'model' is not KEY=VALUE"),
])  # fmt: skip
def test_bad_selection_is_one_line(known_runs, tmp_path, select, message):
    res = cli("ensemble", known_runs, "--select", select, "--out", tmp_path / "out")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert message in res.stderr


# ------------------------------------------------ (c) results.tsv against scikit-learn


def random_split(rng: np.random.Generator, n: int, c: int = 56) -> np.ndarray:
    y = (rng.random((n, c)) < 0.15).astype(np.uint8)
    y[0], y[1] = 1, 0  # every tag has a positive and a negative
    return y


@pytest.fixture(scope="module")
def random_runs(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("random")
    rng = np.random.default_rng(0)
    targets = {"validation": random_split(rng, 80), "test": random_split(rng, 90)}
    runs = []
    for i, model in enumerate(["convs", "convs", "freq_dep"]):
        # scores that carry some signal, so thresholds and decisions mean something
        probs = {s: np.clip(0.3 * t + rng.random(t.shape) * 0.7, 0, 1).astype(np.float32) for s, t in targets.items()}
        make_run(tmp / "sweep" / str(i), [f"model={model}", f"seed={i}"], probs, targets)
        runs.append(probs)
    return tmp, targets, runs


def test_results_tsv_matches_scikit_learn(random_runs):
    tmp, targets, runs = random_runs
    out = tmp / "out"
    res = cli("ensemble", tmp / "sweep", "--out", out)
    assert res.returncode == 0, res.stderr
    sub = out / "submission"
    mean = {s: np.mean([r[s].astype(np.float64) for r in runs], axis=0) for s in SPLITS}
    predictions = np.load(sub / "predictions.npy")
    assert predictions.dtype == np.float64 and predictions.shape == (90, 56)
    np.testing.assert_allclose(predictions, mean["test"], rtol=0, atol=1e-15)

    # thresholds: each maximises the tag's F-score on validation (no distinct validation score does better)
    lines = [line.split("\t") for line in (sub / "thresholds.tsv").read_text().splitlines()]
    assert [t for t, _ in lines] == list(MOODTHEME_TAGS)
    thresholds = np.array([float(v) for _, v in lines])
    yv, pv = targets["validation"], mean["validation"]
    for j in range(56):
        chosen = f1_score(yv[:, j], pv[:, j] >= thresholds[j])
        d = pv[:, j][None, :] >= np.unique(pv[:, j])[:, None]  # every distinct score as a threshold
        tp, fp, fn = (d & (yv[:, j] == 1)).sum(1), (d & (yv[:, j] == 0)).sum(1), (~d & (yv[:, j] == 1)).sum(1)
        assert chosen == pytest.approx((2 * tp / (2 * tp + fp + fn)).max(), abs=1e-12), MOODTHEME_TAGS[j]

    decisions = np.load(sub / "decisions.npy")
    assert decisions.dtype == bool
    np.testing.assert_array_equal(decisions, mean["test"] >= thresholds)  # validation thresholds, applied to test

    y, p = targets["test"], mean["test"]
    want = {}
    for avg in ("macro", "micro"):
        want[f"ROC-AUC-{avg}"] = roc_auc_score(y, p, average=avg)
        want[f"PR-AUC-{avg}"] = average_precision_score(y, p, average=avg)
        prec, rec, f, _ = precision_recall_fscore_support(y, decisions, average=avg, zero_division=0)
        want[f"precision-{avg}"], want[f"recall-{avg}"], want[f"F-score-{avg}"] = prec, rec, f
    text = (sub / "results.tsv").read_text()
    assert [line.split("\t")[0] for line in text.splitlines()] == list(RESULT_METRICS)
    assert all(len(line.split("\t")[1]) == len("0.123456") for line in text.splitlines())  # 6 decimals
    got = read_results(sub / "results.tsv")
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=5.1e-7), k

    # the table's ensemble row is the same average, at full precision
    table = read_table(out / "table.csv")
    for s in SPLITS:
        pr, roc = sk_scores(mean[s], targets[s])
        assert table["ensemble"][f"{s}_pr_auc"] == pytest.approx(pr, abs=1e-12)
        assert table["ensemble"][f"{s}_roc_auc"] == pytest.approx(roc, abs=1e-12)
    assert table["model=convs"]["test_pr_auc"] == pytest.approx(
        sk_scores((runs[0]["test"].astype(np.float64) + runs[1]["test"]) / 2, y)[0], abs=1e-12)

    # freqtag evaluate on the MediaEval files prints (and writes) the same lines
    np.save(tmp / "groundtruth.npy", y.astype(bool))
    ev = cli("evaluate", sub / "predictions.npy", tmp / "groundtruth.npy",
                 "--decisions", sub / "decisions.npy", "--out", tmp / "results.tsv")  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout == text == (tmp / "results.tsv").read_text()
    # and with thresholds instead of decisions
    ev = cli("evaluate", sub / "predictions.npy", tmp / "groundtruth.npy", "--thresholds", sub / "thresholds.tsv")
    assert ev.stdout == text
    # without decisions: the four AUC lines
    ev = cli("evaluate", sub / "predictions.npy", tmp / "groundtruth.npy")
    assert [line.split("\t")[0] for line in ev.stdout.splitlines()] == ["ROC-AUC-macro", "PR-AUC-macro", "ROC-AUC-micro", "PR-AUC-micro"]


@pytest.mark.parametrize(("args", "message"), [
    (["sweep/0/predictions/test.npz", "validation.npy"], "are (90, 56) but the ground truth validation.npy is (80, 56)"),
    (["nothing.npy", "validation.npy"], "predictions file nothing.npy does not exist"),
    (["sweep/0/predictions/test.npz", "--decisions", "sweep/0/predictions/test.npz"], "not a readable .npy decisions"),
])  # fmt: skip
def test_evaluate_errors_are_one_line(random_runs, args, message):
    tmp, targets, _ = random_runs
    np.save(tmp / "validation.npy", targets["validation"])  # the wrong split for test predictions
    res = cli("evaluate", *args, cwd=tmp)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert message in res.stderr


# ------------------------------------------------------------- (d) mismatched runs


@pytest.mark.parametrize(("change", "what"), [
    ("track_ids", "test track ids (1 rows differ, first row 3)"),
    ("tags", "test tag list"),
    ("targets", "test targets (1 rows differ, first row 2)"),
    ("fewer", "test track ids (3 vs 4 rows)"),
])  # fmt: skip
def test_mismatched_runs_are_refused(known_runs, tmp_path, change, what):
    odd = known_runs / "3" / "predictions" / "test.npz"
    z = dict(np.load(odd))
    if change == "track_ids":
        z["track_ids"][3] = "track_elsewhere"
    elif change == "tags":
        z["tags"] = np.array(["mood/theme---calm", "mood/theme---sad"])
    elif change == "targets":
        z["targets"][2, 0] ^= 1
    else:
        z = {k: v[:3] if k != "tags" else v for k, v in z.items()}
    np.savez(odd, **z)
    res = cli("ensemble", known_runs, "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert f"sweep/3 vs sweep/0: {what}" in res.stderr
    assert "cannot ensemble runs that predict different data" in res.stderr and "data.splits_dir" in res.stderr
    assert not (tmp_path / "out").exists()


def test_unfinished_runs_are_named_and_can_be_skipped(known_runs, tmp_path):
    (known_runs / "4" / ".hydra").mkdir(parents=True)
    (known_runs / "4" / ".hydra" / "overrides.yaml").write_text("- model=convs\n- loss=focal\n")
    res = cli("ensemble", known_runs, "--out", tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 1 and "1 run(s) have no predictions" in res.stderr and "sweep/4" in res.stderr
    assert "--skip-unfinished" in res.stderr
    res = cli("ensemble", known_runs, "--out", tmp_path / "out", "--skip-unfinished", cwd=tmp_path)
    assert res.returncode == 0 and "skipping 1 unfinished run(s): sweep/4" in res.stderr
    assert read_table(tmp_path / "out" / "table.csv")["ensemble"]["runs"] == 4


def test_no_runs_is_one_line(tmp_path):
    res = freqtag("ensemble", tmp_path)
    assert res.returncode == 1 and "holds no run" in res.stderr and res.stderr.count("\n") == 1


# -------------------------------------------- (e) --groups: the original submission


def test_groups_rebuild_the_original_submission(tmp_path):
    """The submission averaged the convs-mel96 runs' mean and the freq_dep-mel128 runs' mean."""
    rng = np.random.default_rng(1)
    targets = {"validation": random_split(rng, 40), "test": random_split(rng, 50)}
    runs = {}
    for i, (model, features, loss) in enumerate([("convs", "mel96", "bce"), ("convs", "mel96", "weighted"),
                                                  ("convs", "mel96", "focal"), ("freq_dep", "mel128", "bce"),
                                                  ("convs", "mel128", "bce")]):  # fmt: skip
        probs = {s: rng.random(t.shape).astype(np.float32) for s, t in targets.items()}
        make_run(tmp_path / "sweep" / str(i), [f"model={model}", f"features={features}", f"loss={loss}"], probs, targets)
        runs[model, features, loss] = {s: p.astype(np.float64) for s, p in probs.items()}
    res = cli("ensemble", tmp_path / "sweep", "--out", tmp_path / "out",
                  "--groups", "model=convs,features=mel96", "model=freq_dep,features=mel128")  # fmt: skip
    assert res.returncode == 0, res.stderr
    convs96 = {s: np.mean([p[s] for k, p in runs.items() if k[:2] == ("convs", "mel96")], axis=0) for s in SPLITS}
    freq128 = {s: runs["freq_dep", "mel128", "bce"][s] for s in SPLITS}
    submission = {s: (convs96[s] + freq128[s]) / 2 for s in SPLITS}  # not the mean of the 4 runs: 3 vs 1
    np.testing.assert_allclose(np.load(tmp_path / "out" / "submission" / "predictions.npy"), submission["test"], atol=1e-15)
    table = read_table(tmp_path / "out" / "table.csv")
    assert [r for r in table if not r.startswith(("model=", "features=", "loss="))] == [
        "ensemble", "group model=convs,features=mel96", "group model=freq_dep,features=mel128", "groups"]
    assert [table[r]["runs"] for r in ("ensemble", "group model=convs,features=mel96", "groups")] == [5, 3, 4]
    for row, probs in (("group model=convs,features=mel96", convs96), ("group model=freq_dep,features=mel128", freq128),
                       ("groups", submission)):  # fmt: skip
        pr, roc = sk_scores(probs["test"], targets["test"])
        assert (table[row]["test_pr_auc"], table[row]["test_roc_auc"]) == pytest.approx((pr, roc), abs=1e-12), row
    got = read_results(tmp_path / "out" / "submission" / "results.tsv")
    assert got["PR-AUC-macro"] == pytest.approx(sk_scores(submission["test"], targets["test"])[0], abs=5.1e-7)
    # a group that matches no run is refused, naming it
    res = cli("ensemble", tmp_path / "sweep", "--out", tmp_path / "x", "--groups", "model=freq_dep,features=mel96")
    assert res.returncode == 1 and "--groups model=freq_dep,features=mel96" in res.stderr


# ------------------------------------ (a) a tiny real grid: train.py -m, then ensemble

GRID_FIXED = [
    "experiment=ablation",
    "data=synthetic",
    "features=mel96",
    "data.input_length=32",
    "data.synthetic.tracks=300",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
]


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("grid")
    sweep = tmp / "sweep"
    args = [sys.executable, str(REPO / "train.py"), "-m", *GRID_FIXED, "model=convs,freq_dep", "loss=bce,weighted",
            f"paths.data_dir={tmp / 'data'}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    res = subprocess.run(args, cwd=tmp, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep


@pytest.mark.slow
def test_tiny_grid_overrides(tiny_grid):
    data_dir = tiny_grid.parent / "data"
    for num, (model, loss) in enumerate([("convs", "bce"), ("convs", "weighted"), ("freq_dep", "bce"), ("freq_dep", "weighted")]):
        overrides = yaml.safe_load((tiny_grid / str(num) / ".hydra" / "overrides.yaml").read_text())
        # the swept keys first (values from the command line replace the grid's), then the fixed command line
        swept = [f"model={model}", "features=mel96", "data.input_length=32", f"loss={loss}"]
        fixed = [o for o in GRID_FIXED if not o.startswith(("features=", "data.input_length="))]
        assert overrides == swept + fixed + [f"paths.data_dir={data_dir}"]


@pytest.mark.slow
def test_tiny_grid_ensemble(tiny_grid, tmp_path):
    res = freqtag("ensemble", tiny_grid, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "4 runs" in res.stdout and "| ensemble | 4 |" in res.stdout
    table = read_table(tmp_path / "out" / "table.csv")
    assert list(table) == ["model=convs", "model=freq_dep", "loss=bce", "loss=weighted", "ensemble"]
    preds = {n: {s: np.load(tiny_grid / str(n) / "predictions" / f"{s}.npz") for s in SPLITS} for n in range(4)}
    members = {"model=convs": [0, 1], "model=freq_dep": [2, 3], "loss=bce": [0, 2], "loss=weighted": [1, 3], "ensemble": [0, 1, 2, 3]}
    for row, nums in members.items():
        assert table[row]["runs"] == len(nums)
        for s in SPLITS:
            mean = np.mean([preds[n][s]["probs"].astype(np.float64) for n in nums], axis=0)
            pr, roc = sk_scores(mean, preds[0][s]["targets"])
            assert table[row][f"{s}_pr_auc"] == pytest.approx(pr, abs=1e-9), (row, s)
            assert table[row][f"{s}_roc_auc"] == pytest.approx(roc, abs=1e-9), (row, s)
    sub = tmp_path / "out" / "submission"
    n_test = len(preds[0]["test"]["track_ids"])
    assert np.load(sub / "predictions.npy").shape == (n_test, 56) and np.load(sub / "decisions.npy").dtype == bool
    assert len((sub / "results.tsv").read_text().splitlines()) == 10
    for name in ("table.md", "table.png", "per_tag.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0


@pytest.mark.slow
def test_evaluate_a_run_against_its_split_tsv(tiny_grid, tmp_path):
    """Our predictions .npz scored against the split TSV, decisions from the run's validation thresholds."""
    run = tiny_grid / "2"
    tsv = next((tiny_grid.parent / "data").rglob("autotagging_moodtheme-test.tsv"))
    res = cli("evaluate", run / "predictions" / "test.npz", tsv, "--thresholds", run / "checkpoints" / "thresholds.tsv",
                  "--out", tmp_path / "results.tsv")  # fmt: skip
    assert res.returncode == 0, res.stderr
    z = np.load(run / "predictions" / "test.npz")
    thresholds = np.array([float(line.split("\t")[1]) for line in (run / "checkpoints" / "thresholds.tsv").read_text().splitlines()])
    y, p = z["targets"], z["probs"].astype(np.float64)
    prec, rec, f, _ = precision_recall_fscore_support(y, p >= thresholds, average="macro", zero_division=0)
    got = read_results(tmp_path / "results.tsv")
    assert got["ROC-AUC-macro"] == pytest.approx(roc_auc_score(y, p), abs=5.1e-7)
    assert got["PR-AUC-micro"] == pytest.approx(average_precision_score(y, p, average="micro"), abs=5.1e-7)
    assert (got["precision-macro"], got["recall-macro"], got["F-score-macro"]) == pytest.approx((prec, rec, f), abs=5.1e-7)
    assert res.stdout == (tmp_path / "results.tsv").read_text()
