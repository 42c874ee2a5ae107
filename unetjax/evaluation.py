"""Whole-case prediction and scoring: validation during training and ``eval.py``.

Outputs under ``out_dir``: ``metrics.csv`` (one row per case and class), ``summary.json``
(mean ± std per class and over classes), ``predictions/<case>.png|.nii.gz`` (label maps of
the input's size and geometry) and ``overlays/<case>.png``. Files are written to a
temporary name and renamed, and ``summary.json`` last: a run cut short never looks complete.
"""

import csv
import gzip
import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from unetjax import metrics
from unetjax.data.store import Dataset
from unetjax.inference.sliding_window import sliding_window_predict

CSV_FIELDS = ("case", "class", *metrics.METRICS, "tp", "fp", "fn", "pred_voxels", "target_voxels")


def predict_case(
    exp, predict: Callable, params, case_id: str, dataset: Dataset | None = None
) -> np.ndarray:
    """Class probabilities ``[*spatial, K]`` of one stored case (Gaussian sliding window)."""
    dataset = dataset or exp.dataset
    image = exp.normalize(dataset.read_image(case_id), case_id, dataset)
    return predict_image(exp, predict, params, image)


def predict_image(exp, predict: Callable, params, image: np.ndarray) -> np.ndarray:
    """Class probabilities ``[*spatial, K]`` of an already normalised image (e.g. corrupted),
    with the same sliding window as :func:`predict_case`."""
    return sliding_window_predict(
        image,
        lambda tiles: predict(params, tiles),
        exp.patch_size,
        exp.num_classes,
        step=exp.config.eval.step,
        batch_size=exp.config.eval.batch_size,
    )


def score_cases(
    exp,
    predict: Callable,
    params,
    case_ids: Sequence[str],
    dataset: Dataset | None = None,
    on_case: Callable | None = None,
    stream_dir: pathlib.Path | None = None,
) -> list[dict]:
    """Predict and score cases; ``on_case(case_id, label_map, per_class)`` sees each result.

    With ``stream_dir``, 3D cases are predicted by the streaming sliding window into
    ``stream_dir/<case_id>`` (a resumable zarr store, :mod:`unetjax.volumes`) and read back.
    """
    dataset = dataset or exp.dataset
    rows = []
    for case_id in case_ids:
        info = dataset.manifest.case(case_id)
        if stream_dir is not None and len(info.shape) == 3:
            from unetjax.volumes.export import open_prediction
            from unetjax.volumes.predict import predict_case_to_store

            predict_case_to_store(exp, predict, params, case_id, stream_dir / case_id, dataset)
            array = open_prediction(stream_dir / case_id)[0]
            labels = np.asarray(array.read().result(), np.uint8)
        else:
            probs = predict_case(exp, predict, params, case_id, dataset)
            labels = probs.argmax(-1).astype(np.uint8)
        per_class = None
        if info.has_label:
            per_class = metrics.case_metrics(
                labels, dataset.read_label(case_id), exp.num_classes, spacing=info.spacing
            )
            rows.append(per_class)
        if on_case is not None:
            on_case(case_id, labels, per_class)
    return rows


def mean_foreground_dice(rows: list[dict]) -> float:
    """Mean Dice over cases and foreground classes, NaNs (empty vs empty) excluded."""
    if not rows:
        return math.nan
    return metrics.summarize(rows)["mean"]["dice"]["mean"]


def _atomic_write_bytes(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_label_map(path_stem: pathlib.Path, labels: np.ndarray, info) -> pathlib.Path:
    """PNG for 2D, NIfTI (with the case's affine) for 3D; returns the path written."""
    if labels.ndim == 2:
        path = path_stem.parent / f"{path_stem.name}.png"
        _atomic_write_bytes(path, lambda p: Image.fromarray(labels).save(p, format="PNG"))
        return path
    import nibabel as nib

    affine = np.asarray(info.affine) if info.affine is not None else np.diag([*info.spacing, 1.0])
    path = path_stem.parent / f"{path_stem.name}.nii.gz"
    data = gzip.compress(nib.Nifti1Image(labels, affine).to_bytes())
    _atomic_write_bytes(path, lambda p: p.write_bytes(data))
    return path


def overlay_png(image: np.ndarray, labels: np.ndarray, target: np.ndarray | None) -> np.ndarray:
    """RGB uint8 overlay: prediction filled in colour, ground-truth outline in white.

    3D inputs show the slice (axis 0) with the most predicted or true foreground.
    """
    if labels.ndim == 3:
        fg = (labels > 0).sum((1, 2)) + ((target > 0).sum((1, 2)) if target is not None else 0)
        k = int(np.argmax(fg))
        image, labels = image[k], labels[k]
        target = target[k] if target is not None else None
    lo, hi = np.percentile(image, [0.5, 99.5])
    rgb = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    if rgb.shape[-1] != 3:
        rgb = np.repeat(rgb[..., :1], 3, -1)
    palette = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 1, 0.2]])
    colour = palette[np.minimum(labels, len(palette) - 1)]
    mask = (labels > 0)[..., None]
    out = np.where(mask, 0.55 * rgb + 0.45 * colour, rgb)
    if target is not None:
        edge = _outline(target > 0)
        out[edge] = 1.0
    return (out * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def write_reports(out_dir: pathlib.Path, rows: list[dict], case_ids: list[str]) -> dict:
    """metrics.csv and summary.json (written last); returns the summary."""

    def write_csv(p: pathlib.Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for case_id, per_class in zip(case_ids, rows, strict=True):
                for cls, values in per_class.items():
                    writer.writerow(
                        {"case": case_id, "class": cls, **{k: values[k] for k in CSV_FIELDS[2:]}}
                    )

    _atomic_write_bytes(out_dir / "metrics.csv", write_csv)
    summary = metrics.summarize(rows) if rows else {}
    summary = {str(k): v for k, v in summary.items()}
    text = json.dumps({"num_cases": len(rows), "metrics": summary}, indent=2, allow_nan=True)
    _atomic_write_bytes(out_dir / "summary.json", lambda p: p.write_text(text))
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table: one row per class (and the mean), mean ± std per metric."""
    header = f"{'class':>6} " + " ".join(f"{m:>17}" for m in metrics.METRICS)
    lines = [header]
    for cls, values in summary.items():
        cells = []
        for m in metrics.METRICS:
            v = values.get(m)
            cells.append(f"{v['mean']:8.4f} ± {v['std']:6.4f}" if v else f"{'-':>17}")
        lines.append(f"{cls:>6} " + " ".join(cells))
    return "\n".join(lines)


def evaluate_workdir(
    workdir: str | os.PathLike,
    split: str = "test",
    data_dir: str | None = None,
    mirror_tta: bool | None = None,
) -> dict:
    """Evaluate a training workdir's best checkpoint; write outputs under ``workdir/eval/``.

    ``split`` is test, val, train or all (cases of the training data); with ``data_dir``
    every case of that folder is predicted, and scored where it has masks.
    """
    from unetjax.trained import case_ids_for, load_trained, mesh_predictor

    t = load_trained(workdir, data_dir)
    exp, dataset = t.exp, t.dataset
    case_ids, name = case_ids_for(t, split, data_dir)
    workdir, ndim = t.workdir, t.ndim
    predict, params, _ = mesh_predictor(t, mirror_tta)

    out_dir = workdir / "eval" / name
    (out_dir / "summary.json").unlink(missing_ok=True)  # incomplete until rewritten
    scored_ids = []

    def save(case_id, labels, per_class):
        info = dataset.manifest.case(case_id)
        save_label_map(out_dir / "predictions" / case_id, labels, info)
        target = dataset.read_label(case_id) if info.has_label else None
        image = exp.normalize(dataset.read_image(case_id), case_id, dataset)
        rgb = overlay_png(image, labels, target)
        _atomic_write_bytes(
            out_dir / "overlays" / f"{case_id}.png", lambda p: Image.fromarray(rgb).save(p, "PNG")
        )
        if per_class is not None:
            scored_ids.append(case_id)

    stream_dir = out_dir / "volumes" if ndim == 3 else None
    rows = score_cases(exp, predict, params, case_ids, dataset, on_case=save, stream_dir=stream_dir)
    summary = write_reports(out_dir, rows, scored_ids)
    return {
        "out_dir": str(out_dir),
        "checkpoint_step": t.step,
        "num_cases": len(case_ids),
        "num_scored": len(rows),
        "summary": summary,
    }
