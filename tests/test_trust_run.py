"""Trust analyses of a tiny workdir end to end, raw-space normalisation,
groups files and the report renderers."""

import csv
import json
import shutil

import numpy as np
import pytest
from helpers import random_params
from PIL import Image

from unetjax.config import default_config
from unetjax.experiment import build_experiment
from unetjax.trained import Trained, case_ids_for
from unetjax.trust import report, run
from unetjax.trust.corruptions import corrupt

NUM_CASES = 8


@pytest.fixture(scope="module")
def trained(nuclei_dir, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trust_nuclei")
    small = [
        p.name
        for p in sorted((nuclei_dir / "images").glob("*.png"))
        if Image.open(p).size == (256, 256)
    ][:NUM_CASES]  # one tile batch each
    for sub in ("images", "masks"):
        (root / "data" / sub).mkdir(parents=True)
        for name in small:
            shutil.copy(nuclei_dir / sub / name, root / "data" / sub / name)
    c = default_config()
    c.data.path = str(root / "data")
    c.data.store_dir = str(root / "store")
    c.data.patch_size = (64, 64)
    c.data.num_threads = 1
    c.data.test_fraction = 0.25
    c.data.val_fraction = 0.25
    c.mesh.data = 1
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.model.dropout_rate = 0.2
    c.eval.step = 1.0  # no overlap: fewer tiles
    c.eval.batch_size = 16
    workdir = root / "run"
    exp = build_experiment(c, workdir)
    # Random weights: the analyses' plumbing is under test here, not a model's quality
    # (test_trust_uncertainty trains one); no training keeps this test fast.
    params = random_params(exp.model, np.zeros((1, 64, 64, 3), np.float32))
    return Trained(workdir, exp, params, 0, exp.dataset)


def test_all_analyses_write_complete_outputs_and_one_report(trained, tmp_path):
    t = trained
    ids, name = case_ids_for(t, "test", None)
    assert name == "test" and ids == list(t.exp.split["test"])
    groups_file = tmp_path / "groups.json"
    groups_file.write_text(json.dumps({"groups": {"a": ids[:1], "b": ids[1:]}}))
    groups = run.load_groups(str(groups_file), ids)
    out = tmp_path / "trust"

    r = run.run_robustness(t, ids, out / "robustness", corruptions=["gaussian_noise", "jpeg"],
                           severities=[5], groups=groups)  # fmt: skip
    with open(out / "robustness" / "robustness_cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ids) * 3  # clean + 2 corruptions x 1 severity
    assert {row["group"] for row in rows} == {"a", "b"}
    assert [row[0] for row in r["table"]] == ["gaussian_noise", "jpeg"]
    assert all(0 <= v <= 1 for row in r["table"] for v in row[1:3])
    assert "<svg" in (out / "robustness" / "dice_vs_severity.svg").read_text()

    c = run.run_calibration(t, ids, out / "calibration", groups=groups)
    assert 0.05 <= c["temperature"] <= 20
    assert set(c["results"]) == {"all", "a", "b"}
    for when in ("before", "after"):
        assert 0 <= c["results"]["all"][when]["ece"] <= 1
    # fitted on the validation cases, so the validation NLL cannot get worse than T = 1
    assert np.isfinite(c["nll_after"])

    u = run.run_uncertainty(t, ids, out / "uncertainty", mode="mc_dropout", num_samples=3)
    assert u["cases"] == len(ids) and u["samples"] == 3
    maps = np.load(out / "uncertainty" / "maps" / f"{ids[0]}.npz", allow_pickle=False)
    image = t.dataset.read_image(ids[0])
    assert maps["entropy"].shape == image.shape[:2]
    assert maps["probs"].shape == (*image.shape[:2], 2)
    assert (out / "uncertainty" / "overlays" / f"{ids[0]}.png").exists()

    e = run.run_explain(t, ids[:1], out / "explain", steps=4, level=0)
    ig = np.load(out / "explain" / "maps" / f"{ids[0]}.npz", allow_pickle=False)
    assert ig["integrated_gradients"].shape == ig["grad_cam"].shape == t.exp.patch_size
    assert np.all(ig["grad_cam"] >= 0)
    assert e["cases"][0]["sum_attributions"] == pytest.approx(
        e["cases"][0]["f_x"] - e["cases"][0]["f_baseline"] + e["cases"][0]["completeness_gap"],
        rel=1e-3, abs=1e-3,
    )  # fmt: skip

    page = run.write_report(out, {"workdir": "w", "step": 2, "split": "test", "command": "x"})
    text = page.read_text()
    for heading in ("Robustness", "Calibration", "Uncertainty", "Explanations"):
        assert f"<h2>{heading}" in text
    for src in ("robustness/dice_vs_severity.svg", "calibration/reliability.svg"):
        assert src in text and (out / src).exists()
    docs = run.export_figures(out, tmp_path / "docs")
    assert docs and all(p.stat().st_size < 150_000 for p in docs)


def test_unfinished_analysis_is_left_out_of_the_report(trained, tmp_path):
    out = tmp_path / "trust"
    with pytest.raises(ValueError, match="unknown corruption"):
        run.run_robustness(trained, ["x"], out / "robustness", corruptions=["nope"])
    (out / "uncertainty").mkdir(parents=True)
    (out / "uncertainty" / "cases.csv").write_text("partial")
    text = run.write_report(out, {"workdir": "w", "step": 0, "split": "s", "command": "c"})
    assert "<h2>Uncertainty" not in text.read_text()


def test_raw_space_corruption_renormalises_like_ingestion(trained):
    t = trained
    case_id = t.dataset.manifest.case_ids[0]
    raw = np.asarray(t.dataset.read_image(case_id), np.float32)
    clean = run.normalize_raw(t, raw, case_id)
    np.testing.assert_allclose(clean, t.exp.normalize(raw, case_id), atol=1e-4)
    # z-score statistics are recomputed, so an affine contrast change is undone exactly
    low_contrast = run.normalize_raw(t, corrupt(raw, "contrast", 5), case_id)
    np.testing.assert_allclose(low_contrast, clean, atol=1e-3)
    noisy = run.normalize_raw(t, corrupt(raw, "gaussian_noise", 5), case_id)
    assert np.abs(noisy - clean).mean() > 0.1


def test_groups_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="g.json"):
        run.load_groups(str(bad), ["1"])
    bad.write_text(json.dumps({"groups": {"a": ["1"], "b": ["1"]}}))
    with pytest.raises(ValueError, match="g.json.*in groups"):
        run.load_groups(str(bad), ["1"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run.load_groups(str(tmp_path / "missing.json"), ["1"])
    assert run.load_groups(None, ["1", "2"]) == {"1": "-", "2": "-"}


def test_spread_and_crop():
    assert run.spread(list("abcdef"), 3) == ["a", "c", "f"]
    assert run.spread(list("ab"), 0) == ["a", "b"]
    a = np.arange(20).reshape(4, 5)
    crop = run._crop(a, (0, 4), (6, 3))  # padded rows, clamped columns
    assert crop.shape == (6, 3)
    np.testing.assert_array_equal(crop[1:5], a[:, 2:5])
    assert (crop[0] == 0).all() and (crop[5] == 0).all()


def test_line_chart_and_colormap():
    svg = report.line_chart_svg({"x": ([0, 1, 2], [0.9, np.nan, 0.5])}, title="t", xlabel="s",
                                ylabel="d")  # fmt: skip
    assert svg.count("<circle") == 2 and svg.startswith("<svg")
    rgb = report.colormap(np.array([0.0, 0.5, 1.0]), 0, 1, "viridis")
    assert (
        rgb.dtype == np.uint8 and tuple(rgb[0]) == (68, 1, 84) and tuple(rgb[2]) == (253, 231, 37)
    )
