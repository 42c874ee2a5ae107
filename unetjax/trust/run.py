"""Trust analyses of a trained workdir (``eval.py --robustness --calibration --uncertainty
--explain``): each writes arrays, figures, tables and a ``summary.json`` (last) under
``workdir/trust/<split>/<analysis>/``; :func:`write_report` gathers them into ``report.html``.

* Robustness: every case is corrupted in its **raw intensity space** (``corruptions.py``,
  seed ``seed + case index``), then normalised the way ingestion + training would have seen
  it (z-score: the statistics are recomputed from the corrupted image; CT: dataset
  statistics), then predicted like ``eval.py``. Per-image z-scoring undoes any affine
  intensity change, so ``contrast`` (affine by construction) cannot change the prediction.
* Calibration: top-label and class-wise ECE of the sliding-window probabilities on the
  evaluated cases, before and after a temperature fitted on the validation split (NLL of
  ``softmax(log(probs) / T)``, ``calibration.fit_temperature``).
* Uncertainty: TTA (mirrorings, optional affine) or MC-dropout maps
  (``uncertainty.sliding_window_uncertainty``), per-case scores
  (``uncertainty.case_uncertainty``) and their Spearman correlation with the per-case Dice
  of the uncertainty pass's own prediction (``argmax`` of the sample-mean probabilities).
* Explanations: on one patch per case, centred on the predicted region of the target class:
  integrated gradients (blur baseline) and Grad-CAM of that class's summed probability
  (IG) / logit (Grad-CAM) over the predicted region.

Case Dice here is the mean over foreground classes (NaN for empty vs empty, skipped).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import pathlib
import shutil
from collections.abc import Sequence

import jax
import numpy as np
from scipy import ndimage, special, stats

from unetjax import metrics
from unetjax.data.normalize import normalize
from unetjax.evaluation import _atomic_write_bytes, overlay_png, predict_case, predict_image
from unetjax.trained import Trained
from unetjax.trust import report
from unetjax.trust.attribution import (
    make_baseline,
    make_grad_cam_fn,
    make_integrated_gradients_fn,
)
from unetjax.trust.calibration import (
    calibration_bins,
    ece_from_bins,
    fit_temperature,
    log_probs,
    merge_bins,
    reliability_diagram,
    temperature_scale_probs,
)
from unetjax.trust.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt, psnr
from unetjax.trust.uncertainty import (
    case_uncertainty,
    make_uncertainty_fn,
    sliding_window_uncertainty,
)

ANALYSES = ("robustness", "calibration", "uncertainty", "explain")
log = logging.getLogger(__name__)


def spread(case_ids: Sequence[str], max_cases: int) -> list[str]:
    """At most ``max_cases`` ids evenly spaced over the list (all when 0 or enough)."""
    ids = list(case_ids)
    if not max_cases or len(ids) <= max_cases:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, max_cases).round().astype(int)]


def load_groups(path: str | None, case_ids: Sequence[str]) -> dict[str, str]:
    """``case -> group`` from a JSON ``{"groups": {name: [ids]}}`` (or the inner object);
    cases in no group map to ``"-"``. Errors name the file."""
    if not path:
        return {c: "-" for c in case_ids}
    p = pathlib.Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: groups file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    groups = obj.get("groups", obj) if isinstance(obj, dict) else None
    if not isinstance(groups, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in groups.values()
    ):
        raise ValueError(f"{p}: expected {{'groups': {{name: [case ids]}}}}")
    out = {c: "-" for c in case_ids}
    for name, ids in groups.items():
        for i in ids:
            if i in out:
                if out[i] != "-":
                    raise ValueError(f"{p}: case {i!r} is in groups {out[i]!r} and {name!r}")
                out[i] = name
    return out


def case_dice(labels: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """Mean foreground Dice of one case (NaN classes skipped; NaN if all are)."""
    counts = metrics.confusion_counts(labels, target, num_classes)[1:].astype(np.float64)
    den = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
    dice = np.where(den > 0, 2 * counts[:, 0] / np.where(den > 0, den, 1), np.nan)
    return float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan


def normalize_raw(t: Trained, raw: np.ndarray, case_id: str) -> np.ndarray:
    """Normalise a (corrupted) raw image of ``case_id`` as ingestion + training would:
    z-score statistics recomputed from this image, CT statistics of the dataset."""
    info = t.dataset.manifest.case(case_id)
    raw = np.asarray(raw, np.float32)
    if t.exp.config.data.normalization == "zscore":
        flat = raw.reshape(-1, raw.shape[-1]).astype(np.float64)
        intensity = {**info.intensity, "mean": list(flat.mean(0)), "std": list(flat.std(0))}
        info = dataclasses.replace(info, intensity=intensity)
    return normalize(raw, info, t.exp.config.data.normalization, ct_stats=t.exp.ct_stats)


def _predict_fn(t: Trained, tta: bool):
    from unetjax.training.step import make_predict_fn

    return make_predict_fn(t.exp.model, tuple(range(t.ndim)) if tta else ())


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["case"])
    writer.writeheader()
    writer.writerows(rows)
    report.save_text(path, buf.getvalue())


def _finish(out_dir: pathlib.Path, summary: dict) -> dict:
    text = json.dumps(summary, indent=2, allow_nan=True)
    _atomic_write_bytes(out_dir / "summary.json", lambda p: p.write_text(text))
    return summary


def _start(out_dir: pathlib.Path) -> None:
    """Mark an analysis incomplete until its summary.json is rewritten."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)


def _display(image, labels, target=None, k: int | None = None):
    """2D views of a case (3D: slice ``k`` or the most foreground one) and that index."""
    if labels.ndim == 3:
        k = display_k = report.display_slice(labels, target) if k is None else k
        return image[k], labels[k], (target[k] if target is not None else None), display_k
    return image, labels, target, None


def _mean(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    return float(v.mean()) if v.size else math.nan


def _std(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    return float(v.std()) if v.size else math.nan


def _save_maps(path_stem: pathlib.Path, maps: dict[str, np.ndarray], info) -> list[str]:
    """Without ``info``: one ``.npz`` (float16); with it: one NIfTI per map (its affine)."""
    if info is None:
        path = path_stem.with_suffix(".npz")

        def write(p):
            with open(p, "wb") as f:
                np.savez_compressed(f, **{k: v.astype(np.float16) for k, v in maps.items()})

        _atomic_write_bytes(path, write)
        return [path.name]
    import gzip

    import nibabel as nib

    affine = np.asarray(info.affine) if info.affine is not None else np.diag([*info.spacing, 1.0])
    names = []
    for key, value in maps.items():
        path = path_stem.parent / f"{path_stem.name}_{key}.nii.gz"
        data = gzip.compress(nib.Nifti1Image(value.astype(np.float32), affine).to_bytes())
        _atomic_write_bytes(path, lambda p, d=data: p.write_bytes(d))
        names.append(path.name)
    return names


# ----------------------------------------------------------------------------- robustness


def run_robustness(
    t: Trained,
    case_ids: Sequence[str],
    out_dir: pathlib.Path,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = tuple(range(1, MAX_SEVERITY + 1)),
    seed: int = 0,
    tta: bool = False,
    groups: dict[str, str] | None = None,
) -> dict:
    """Dice (and mean predictive entropy) vs severity per corruption; module notes."""
    names = list(corruptions or [n for n in CORRUPTIONS if not (n == "jpeg" and t.ndim == 3)])
    for n in names:
        if n not in CORRUPTIONS:
            raise ValueError(f"unknown corruption {n!r}; choose from {sorted(CORRUPTIONS)}")
        if n == "jpeg" and t.ndim == 3:
            raise ValueError("jpeg is a 2D corruption; this model is 3D")
    if any(not 1 <= s <= MAX_SEVERITY for s in severities):
        raise ValueError(f"severities must be in 1..{MAX_SEVERITY}, got {list(severities)}")
    case_ids = [c for c in case_ids if t.dataset.manifest.case(c).has_label]
    if not case_ids:
        raise ValueError("robustness needs labelled cases; none of the selected cases has one")
    _start(out_dir)
    predict, exp, groups = _predict_fn(t, tta), t.exp, groups or {}
    rows, examples = [], {}
    for i, case_id in enumerate(case_ids):
        log.info("robustness: case %s (%d/%d)", case_id, i + 1, len(case_ids))
        raw = np.asarray(t.dataset.read_image(case_id), np.float32)
        target = t.dataset.read_label(case_id)

        def score(image, name, severity, raw_image, cid=case_id, tgt=target):
            probs = predict_image(exp, predict, t.params, normalize_raw(t, image, cid))
            rows.append(
                {
                    "corruption": name,
                    "severity": severity,
                    "case": cid,
                    "group": groups.get(cid, "-"),
                    "dice": case_dice(probs.argmax(-1), tgt, exp.num_classes),
                    "mean_entropy": float(special.entr(probs).sum(-1).mean()),
                    "psnr_db": float(min(psnr(raw_image, image), 99.0)),
                }
            )
            return probs

        score(raw, "none", 0, raw)
        for name in names:
            for s in severities:
                image = corrupt(raw, name, s, seed=seed + i)
                score(image, name, s, raw)
                if i == 0 and s == max(severities):
                    examples[name] = image
    _write_csv(out_dir / "robustness_cases.csv", rows)
    summary_rows, series = _robustness_summary(rows, names, severities)
    _write_csv(out_dir / "robustness.csv", summary_rows)
    header = ["corruption", "0 (clean)", *[str(s) for s in severities], "drop at max"]
    table = []
    for name in names:
        values = series[name][1]
        table.append([name, *values, values[0] - values[-1]])
    report.save_text(out_dir / "robustness.md", report.markdown_table(header, table))
    report.save_text(
        out_dir / "dice_vs_severity.svg",
        report.line_chart_svg(
            {n: series[n] for n in names},
            title="Mean foreground Dice vs corruption severity",
            xlabel="severity (0 = clean)",
            ylabel="Dice",
        ),
    )
    # Example: the first case at the highest severity of each corruption (display slice).
    raw0 = np.asarray(t.dataset.read_image(case_ids[0]), np.float32)
    label0 = t.dataset.read_label(case_ids[0])
    k = report.display_slice(label0) if t.ndim == 3 else None
    views = [raw0] + [examples[n] for n in names]
    views = [v[k] if k is not None else v for v in views]
    rgb = [(report.grayscale_rgb(v) * 255).astype(np.uint8) for v in views]
    report.save_png(
        out_dir / "examples.png",
        report.panel(rgb, ["clean", *names], height=128 if t.ndim == 2 else 96),
    )
    groups_summary = {}
    for g in sorted({r["group"] for r in rows} - {"-"}):
        clean = [r["dice"] for r in rows if r["group"] == g and r["severity"] == 0]
        groups_summary[g] = {"clean_dice": _mean(clean), "cases": len(clean)}
    return _finish(
        out_dir,
        {
            "cases": list(case_ids),
            "corruptions": names,
            "severities": list(severities),
            "seed": seed,
            "tta": tta,
            "space": "raw intensities, then the training normalisation",
            "table_header": header,
            "table": table,
            "groups": groups_summary,
            "figures": {"plot": "dice_vs_severity.svg", "examples": "examples.png"},
        },
    )


def _robustness_summary(rows, names, severities):
    clean = [r for r in rows if r["severity"] == 0]
    summary, series = [], {}
    for name in names:
        xs, ys = [0], [_mean(r["dice"] for r in clean)]
        summary.append(
            {
                "corruption": name,
                "severity": 0,
                "dice_mean": ys[0],
                "dice_std": _std(r["dice"] for r in clean),
                "mean_entropy": _mean(r["mean_entropy"] for r in clean),
                "psnr_db": math.inf,
                "cases": len(clean),
            }
        )
        for s in severities:
            sel = [r for r in rows if r["corruption"] == name and r["severity"] == s]
            xs.append(s)
            ys.append(_mean(r["dice"] for r in sel))
            summary.append(
                {
                    "corruption": name,
                    "severity": s,
                    "dice_mean": ys[-1],
                    "dice_std": _std(r["dice"] for r in sel),
                    "mean_entropy": _mean(r["mean_entropy"] for r in sel),
                    "psnr_db": _mean(r["psnr_db"] for r in sel),
                    "cases": len(sel),
                }
            )
        series[name] = (xs, ys)
    return summary, series


# ----------------------------------------------------------------------------- calibration


def run_calibration(
    t: Trained,
    case_ids: Sequence[str],
    out_dir: pathlib.Path,
    *,
    tta: bool = False,
    num_bins: int = 15,
    groups: dict[str, str] | None = None,
) -> dict:
    """ECE before/after temperature scaling fitted on the validation split; module notes."""
    val_ids = list(t.exp.split["val"])
    case_ids = [c for c in case_ids if t.dataset.manifest.case(c).has_label]
    if not val_ids or not case_ids:
        raise ValueError("calibration needs a non-empty val split and labelled cases")
    _start(out_dir)
    predict, exp, groups = _predict_fn(t, tta), t.exp, groups or {}
    logits, labels = [], []
    for case_id in val_ids:
        probs = predict_case(exp, predict, t.params, case_id)
        logits.append(log_probs(probs).astype(np.float32))
        labels.append(exp.dataset.read_label(case_id))
    temperature = fit_temperature(logits, labels)
    log.info("calibration: T = %.4f from %d val cases", temperature, len(val_ids))
    del logits, labels
    bins = {"before": {}, "after": {}}
    nll = {"before": [], "after": []}
    for case_id in case_ids:
        probs = predict_case(exp, predict, t.params, case_id, t.dataset)
        target = t.dataset.read_label(case_id)
        g = groups.get(case_id, "-")
        for when, p in (("before", probs), ("after", temperature_scale_probs(probs, temperature))):
            b = calibration_bins(p, target, num_bins)
            for key in ("all", g) if g != "-" else ("all",):
                bins[when][key] = merge_bins(bins[when][key], b) if key in bins[when] else b
            picked = np.take_along_axis(p, target[..., None].astype(np.int64), -1)
            nll[when].append(float(-np.log(np.maximum(picked, 1e-12)).mean()))

    def eces(b):
        per_class = np.asarray(ece_from_bins(b["classwise"]))
        return {
            "ece": ece_from_bins(b["top_label"]),
            "classwise_ece": float(np.nanmean(per_class)),
            "per_class_ece": [float(x) for x in per_class],
        }

    results = {k: {w: eces(bins[w][k]) for w in bins} for k in bins["before"]}
    header = ["cases", "top-label ECE before", "after", "class-wise ECE before", "after"]
    table = [
        [
            k,
            r["before"]["ece"],
            r["after"]["ece"],
            r["before"]["classwise_ece"],
            r["after"]["classwise_ece"],
        ]
        for k, r in results.items()
    ]
    report.save_text(out_dir / "calibration.md", report.markdown_table(header, table))
    diagrams = {
        f"{w} (T={temperature:.2f})" if w == "after" else w: reliability_diagram(
            bins[w]["all"]["top_label"]
        )
        for w in ("before", "after")
    }
    report.save_text(
        out_dir / "reliability.svg",
        report.reliability_svg(diagrams, "Reliability (top label, all voxels)"),
    )
    fg = {
        f"class {c} {w}": reliability_diagram(bins[w]["all"]["classwise"][c])
        for c in range(1, exp.num_classes)
        for w in ("before", "after")
    }
    report.save_text(
        out_dir / "reliability_classwise.svg",
        report.reliability_svg(fg, "Reliability per foreground class (one-vs-rest)"),
    )
    return _finish(
        out_dir,
        {
            "val_cases": len(val_ids),
            "cases": list(case_ids),
            "temperature": temperature,
            "num_bins": num_bins,
            "tta": tta,
            "results": results,
            "nll_before": _mean(nll["before"]),
            "nll_after": _mean(nll["after"]),
            "table_header": header,
            "table": table,
            "figures": {"reliability": "reliability.svg", "classwise": "reliability_classwise.svg"},
        },
    )


# ----------------------------------------------------------------------------- uncertainty


def run_uncertainty(
    t: Trained,
    case_ids: Sequence[str],
    out_dir: pathlib.Path,
    *,
    mode: str = "tta",
    num_samples: int | None = None,
    affine: float = 0.0,
    seed: int = 0,
    groups: dict[str, str] | None = None,
    num_examples: int = 2,
) -> dict:
    """Uncertainty maps, overlays and per-case scores; module notes."""
    if mode == "mc_dropout" and not t.exp.model.dropout_rate > 0:
        raise ValueError(
            f"{t.workdir}: MC-dropout needs a model trained with model.dropout_rate > 0 "
            f"(this one has {t.exp.model.dropout_rate}); use --uncertainty_mode=tta"
        )
    _start(out_dir)
    exp, groups = t.exp, groups or {}
    fn = make_uncertainty_fn(exp.model, mode, num_samples or None, affine=affine)
    samples = num_samples or (2**t.ndim if mode == "tta" else 0)
    batch = max(1, exp.config.eval.batch_size * 2 // max(samples, 1))
    key = jax.random.key(seed)
    rows, overlays = [], {}
    for i, case_id in enumerate(case_ids):
        log.info("uncertainty: case %s (%d/%d)", case_id, i + 1, len(case_ids))
        info = t.dataset.manifest.case(case_id)
        image = exp.normalize(t.dataset.read_image(case_id), case_id, t.dataset)
        maps = sliding_window_uncertainty(
            image,
            fn,
            t.params,
            jax.random.fold_in(key, i),
            exp.patch_size,
            exp.num_classes,
            step=exp.config.eval.step,
            batch_size=batch,
        )
        labels = maps["probs"].argmax(-1).astype(np.uint8)
        target = t.dataset.read_label(case_id) if info.has_label else None
        scores = case_uncertainty(maps)
        dice = case_dice(labels, target, exp.num_classes) if target is not None else math.nan
        stored = {"entropy": maps["entropy"], "mutual_info": maps["mutual_info"]}
        if t.ndim == 2:
            stored["probs"] = maps["probs"]
        files = _save_maps(out_dir / "maps" / case_id, stored, None if t.ndim == 2 else info)
        img2, lab2, tgt2, k = _display(image, labels, target)
        ent2 = maps["entropy"][k] if k is not None else maps["entropy"]
        mi2 = maps["mutual_info"][k] if k is not None else maps["mutual_info"]
        h_max = math.log(exp.num_classes)
        mi_hi = max(float(np.percentile(mi2, 99.5)), 1e-6)  # MI is sparse: clip its peaks
        views = [
            (report.grayscale_rgb(img2) * 255).astype(np.uint8),
            overlay_png(img2, lab2, tgt2),
            report.heat_overlay(img2, ent2, h_max),
            report.heat_overlay(img2, mi2, mi_hi),
        ]
        titles = [
            "image" + (f" (slice {k})" if k is not None else ""),
            "prediction / truth",
            f"entropy (0-{h_max:.2f} nats)",
            f"mutual info (0-{mi_hi:.3f})",
        ]
        png = out_dir / "overlays" / f"{case_id}.png"
        report.save_png(png, report.panel(views, titles, height=160))
        overlays[case_id] = f"overlays/{case_id}.png"
        rows.append(
            {
                "case": case_id,
                "group": groups.get(case_id, "-"),
                "dice": dice,
                **scores,
                "maps": " ".join(files),
            }
        )
    _write_csv(out_dir / "cases.csv", rows)
    valid = [(r["score"], r["dice"]) for r in rows if np.isfinite(r["score"] + r["dice"])]
    rho = p_value = math.nan
    if len(valid) >= 3:
        res = stats.spearmanr(*zip(*valid, strict=True))
        rho, p_value = float(res.statistic), float(res.pvalue)
    by_group = {}
    for g in sorted({r["group"] for r in rows}):
        sel = [r for r in rows if r["group"] == g]
        by_group[g] = {
            "cases": len(sel),
            "dice": _mean(r["dice"] for r in sel),
            "score": _mean(r["score"] for r in sel),
            "mean_entropy": _mean(r["mean_entropy"] for r in sel),
            "mean_mutual_info": _mean(r["mean_mutual_info"] for r in sel),
        }
    ranked = sorted(rows, key=lambda r: -r["score"] if np.isfinite(r["score"]) else 0.0)
    picks = [r["case"] for r in ranked[: max(1, num_examples // 2)]]
    picks += [r["case"] for r in ranked[::-1] if r["case"] not in picks][: num_examples // 2]
    return _finish(
        out_dir,
        {
            "mode": mode,
            "samples": samples,
            "affine": affine,
            "seed": seed,
            "cases": len(rows),
            "spearman_score_vs_dice": rho,
            "spearman_p": p_value,
            "groups": by_group,
            "examples": {c: overlays[c] for c in picks},
            "per_case": [{k: r[k] for k in ("case", "group", "dice", "score")} for r in rows],
        },
    )


# ----------------------------------------------------------------------------- explanations


def _crop(array: np.ndarray, centre: Sequence[int], patch: Sequence[int], fill=0) -> np.ndarray:
    """The ``patch`` window of ``array`` (spatial axes first) around ``centre``; padded with
    ``fill`` where the array is smaller than the patch."""
    pads, slices = [], []
    for n, p, c in zip(array.shape, patch, centre, strict=False):
        before = max(p - n, 0) // 2
        pads.append((before, max(p - n, 0) - before))
        size = n + max(p - n, 0)
        start = int(np.clip(c + before - p // 2, 0, size - p))
        slices.append(slice(start, start + p))
    pads += [(0, 0)] * (array.ndim - len(patch))
    return np.pad(array, pads, constant_values=fill)[tuple(slices)]


def _densest_window_centre(region: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Centre of the patch-sized window holding the most ``region`` voxels (image centre
    when the region is empty)."""
    if not region.any():
        return np.asarray(region.shape) // 2
    size = [min(p, n) for p, n in zip(patch, region.shape, strict=True)]
    density = ndimage.uniform_filter(region.astype(np.float32), size, mode="constant")
    return np.asarray(np.unravel_index(np.argmax(density), region.shape))


def run_explain(
    t: Trained,
    case_ids: Sequence[str],
    out_dir: pathlib.Path,
    *,
    target_class: int = 1,
    steps: int = 128,
    level: int = 2,
    sigma: float = 5.0,
) -> dict:
    """Integrated gradients and Grad-CAM on one patch per case; module notes."""
    exp = t.exp
    _start(out_dir)
    ig_fn = make_integrated_gradients_fn(exp.model, target_class, steps=steps, chunk=16)
    cam_fn = make_grad_cam_fn(exp.model, target_class, level=level)
    predict = _predict_fn(t, False)
    rows, overlays = [], {}
    for case_id in case_ids:
        log.info("explain: case %s", case_id)
        info = t.dataset.manifest.case(case_id)
        image = exp.normalize(t.dataset.read_image(case_id), case_id, t.dataset)
        labels = predict_image(exp, predict, t.params, image).argmax(-1)
        target = t.dataset.read_label(case_id) if info.has_label else None
        centre = _densest_window_centre(labels == target_class, exp.patch_size)
        tile = _crop(image, centre, exp.patch_size)[None]
        tile_target = _crop(target, centre, exp.patch_size) if target is not None else None
        tile_pred = np.asarray(predict(t.params, tile)).argmax(-1)[0]
        mask = (tile_pred == target_class)[None]
        mask_arg = mask.astype(np.float32) if mask.any() else None
        baseline = make_baseline(tile, "blur", sigma)
        ig = jax.device_get(ig_fn(t.params, tile, baseline, mask_arg))
        cam = np.asarray(cam_fn(t.params, tile, mask_arg))[0]
        attr = ig["attributions"][0].sum(-1)
        files = _save_maps(
            out_dir / "maps" / case_id, {"integrated_gradients": attr, "grad_cam": cam}, None
        )
        img2, lab2, tgt2, k = _display(tile[0], tile_pred.astype(np.uint8), tile_target)
        attr2 = attr[k] if k is not None else attr
        cam2 = cam[k] if k is not None else cam
        views = [
            overlay_png(img2, lab2, tgt2),
            report.signed_overlay(img2, attr2),
            report.heat_overlay(img2, cam2, 1.0, "viridis"),
        ]
        titles = [
            "patch: prediction / truth",
            "integrated gradients (+red -blue)",
            f"Grad-CAM (decoder level {level})",
        ]
        report.save_png(out_dir / "overlays" / f"{case_id}.png", report.panel(views, titles, 192))
        overlays[case_id] = f"overlays/{case_id}.png"
        change = float(ig["target"][0] - ig["baseline_target"][0])
        rows.append(
            {
                "case": case_id,
                "region_voxels": int(mask.sum()),
                "f_x": float(ig["target"][0]),
                "f_baseline": float(ig["baseline_target"][0]),
                "sum_attributions": float(attr.sum()),
                "completeness_gap": float(ig["delta"][0]),
                "relative_gap": abs(float(ig["delta"][0])) / max(abs(change), 1e-12),
                "cam_positive_fraction": float((cam > 0).mean()),
                "maps": " ".join(files),
            }
        )
    _write_csv(out_dir / "cases.csv", rows)
    return _finish(
        out_dir,
        {
            "target_class": target_class,
            "ig_steps": steps,
            "ig_rule": "trapezoid",
            "baseline": f"Gaussian blur, sigma {sigma} voxels",
            "gradcam_level": level,
            "cases": rows,
            "examples": overlays,
        },
    )


# ----------------------------------------------------------------------------- report page


def _img(path: str, alt: str) -> str:
    return f'<img src="{path}" alt="{alt}">'


def write_report(out_dir: pathlib.Path, meta: dict) -> pathlib.Path:
    """``report.html`` from every analysis with a ``summary.json`` under ``out_dir``."""
    parts = {}
    for name in ANALYSES:
        p = out_dir / name / "summary.json"
        if p.exists():
            parts[name] = json.loads(p.read_text())
    sections = [
        (
            "Model",
            (
                f"<p>Workdir <code>{meta['workdir']}</code>, checkpoint step {meta['step']}, "
                f"cases from <code>{meta['split']}</code>.<br>"
                f"Command: <code>{meta['command']}</code></p>"
                "<p class='note'>Dice: mean over foreground classes per case, then over cases. "
                "Entropy and mutual information in nats.</p>"
            ),
        )
    ]
    if "robustness" in parts:
        r = parts["robustness"]
        body = (
            f"<p>{len(r['cases'])} cases, each corrupted in {r['space']} (seed {r['seed']} + "
            "case index); Dice of the prediction against the ground truth.</p>"
            + report.html_table(r["table_header"], r["table"])
            + _img("robustness/dice_vs_severity.svg", "Dice vs severity")
            + "<p>First case, clean and at the highest severity of each corruption:</p>"
            + _img("robustness/examples.png", "corruption examples")
            + "<p class='note'>Per-case values: robustness/robustness_cases.csv; means, PSNR and "
            "mean predictive entropy per severity: robustness/robustness.csv.</p>"
        )
        sections.append(("Robustness to corruptions", body))
    if "calibration" in parts:
        c = parts["calibration"]
        body = (
            f"<p>Temperature T = {c['temperature']:.3f} fitted on the {c['val_cases']} validation "
            f"cases (NLL of softmax(log p / T)); ECE with {c['num_bins']} bins over all voxels "
            f"of {len(c['cases'])} cases. Mean per-case NLL {c['nll_before']:.4f} before, "
            f"{c['nll_after']:.4f} after.</p>"
            + report.html_table(c["table_header"], c["table"])
            + _img("calibration/reliability.svg", "reliability")
            + _img("calibration/reliability_classwise.svg", "class-wise reliability")
        )
        sections.append(("Calibration", body))
    if "uncertainty" in parts:
        u = parts["uncertainty"]
        rows = [
            [g, v["cases"], v["dice"], v["score"], v["mean_entropy"], v["mean_mutual_info"]]
            for g, v in u["groups"].items()
        ]
        body = (
            f"<p>{u['mode']} with {u['samples'] or 'the configured'} samples "
            f"(affine {u['affine']}). Per-case score = mean predictive entropy over the "
            f"predicted foreground. Spearman correlation of score with Dice over "
            f"{u['cases']} cases: {report.fmt(u['spearman_score_vs_dice'])} "
            f"(p = {report.fmt(u['spearman_p'], 4)}); negative means more uncertain cases "
            "tend to be worse.</p>"
            + report.html_table(
                ["group", "cases", "Dice", "score", "mean entropy", "mean mutual info"], rows
            )
            + "<p>Most and least uncertain cases:</p>"
            + "".join(_img(f"uncertainty/{p}", c) for c, p in u["examples"].items())
            + "<p class='note'>All cases: uncertainty/overlays/, maps: uncertainty/maps/, "
            "scores: uncertainty/cases.csv.</p>"
        )
        sections.append(("Uncertainty", body))
    if "explain" in parts:
        e = parts["explain"]
        keys = (
            "case",
            "region_voxels",
            "f_x",
            "f_baseline",
            "sum_attributions",
            "relative_gap",
            "cam_positive_fraction",
        )
        rows = [[r.get(k, math.nan) for k in keys] for r in e["cases"]]
        body = (
            f"<p>Target: summed probability of class {e['target_class']} over the predicted "
            f"region of a patch (IG: {e['ig_steps']} steps, {e['ig_rule']} rule, baseline "
            f"{e['baseline']}); Grad-CAM on decoder level {e['gradcam_level']} (logit "
            "target). Completeness: the sum of attributions should equal f(x) - f(baseline)."
            "</p>"
            + report.html_table(
                [
                    "case",
                    "region voxels",
                    "f(x)",
                    "f(baseline)",
                    "sum IG",
                    "relative gap",
                    "Grad-CAM > 0 (fraction)",
                ],
                rows,
            )
            + "".join(_img(f"explain/{p}", c) for c, p in e["examples"].items())
        )
        sections.append(("Explanations", body))
    page = report.html_page(f"Trust report: {meta['workdir']} ({meta['split']})", sections)
    return report.save_text(out_dir / "report.html", page)


def export_figures(out_dir: pathlib.Path, docs_dir: pathlib.Path, max_examples: int = 2) -> list:
    """Copy the summary figures and tables (plus a few example overlays) to ``docs_dir``."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    picks = [
        "robustness/dice_vs_severity.svg",
        "robustness/robustness.md",
        "robustness/examples.png",
        "calibration/reliability.svg",
        "calibration/reliability_classwise.svg",
        "calibration/calibration.md",
    ]
    for name in ("uncertainty", "explain"):
        p = out_dir / name / "summary.json"
        if p.exists():
            examples = list(json.loads(p.read_text())["examples"].values())[:max_examples]
            picks += [f"{name}/{e}" for e in examples]
    copied = []
    for rel in picks:
        src = out_dir / rel
        if src.exists():
            dst = docs_dir / rel.replace("/overlays/", "_").replace("/", "_")
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied
