"""Data of the low-data protocol: small fixed-size 2D images in memory, fixed splits.

Every source image (a 2D image, or one slice of a 3D npz volume) is reduced to one or
more fixed-size ``size x size`` items:

- ``tile == 0``: the centred square crop of side ``min(H, W)``, resized to ``size``;
- ``tile > 0``: the non-overlapping ``tile x tile`` tiles of the image (row-major),
  each resized to ``size`` (no resize when ``tile == size``).

Images are resized with Pillow's antialiased bilinear filter per channel and z-scored per
item and channel (the convention of ``hypergrad.from_generator_range``); masks by
area-averaged one-hot channels and argmax (so thin or small structures survive a
down-scaling better than nearest neighbour).

Splits (all seeded, all arms share them):

- ``domain`` (optional): a column of ``index.tsv`` and the value that is in-domain; the
  other sources form the out-of-domain test split (``ood``).
- ``test``: ``num_test`` in-domain *sources* (all their items), fixed by ``split_seed``;
  the rest is the labelled ``pool`` (items).
- For run seed ``s`` and budget ``N``: the first ``N`` items of the pool in the order
  ``default_rng([split_seed, s])`` (so budgets are nested: N=8 is a subset of N=16).
  Of those, ``num_val(N)`` (the first ones) form the internal validation split that
  ``genseg`` and ``released`` use; see ``lowdata`` for which arm uses what.
"""

import csv
import dataclasses
import math
import pathlib

import numpy as np
from PIL import Image

from unetjax.data import io as dio
from unetjax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class LowDataSpec:
    path: str
    size: int = 64
    tile: int = 0
    label_map: dict | None = None  # source value -> class
    num_classes: int = 2
    num_test: int = 40
    split_seed: int = 0
    domain_column: str = ""  # index.tsv column; "" = no out-of-domain split
    in_domain: str = ""
    slice_axis: int = 0  # npz volumes: slices along this axis ...
    slices_per_volume: int = 1  # ... this many, centred, with foreground preferred
    max_sources: int = 0  # 0 = all (npz: the first ones, for a quick protocol)


@dataclasses.dataclass
class LowData:
    images: np.ndarray  # [items, size, size, C] float32, z-scored per item
    labels: np.ndarray  # [items, size, size] int32
    source: np.ndarray  # [items] source index
    test: np.ndarray  # item indices
    ood: np.ndarray
    pool: np.ndarray
    spec: LowDataSpec

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def labelled(self, seed: int, n: int) -> np.ndarray:
        """The ``n`` labelled items of run seed ``seed`` (nested in ``n``)."""
        if n > len(self.pool):
            raise ValueError(f"N={n} labelled items requested; the pool has {len(self.pool)}")
        order = np.random.default_rng([self.spec.split_seed, seed]).permutation(len(self.pool))
        return self.pool[order[:n]]


def num_val(n: int, fraction: float) -> int:
    """Internal validation items out of ``n`` labelled (at least 1, at most n - 1)."""
    return int(min(max(1, round(n * fraction)), n - 1))


def _resize(channels: np.ndarray, size: int) -> np.ndarray:
    """``[H, W, C]`` float -> ``[size, size, C]`` (Pillow bilinear, antialiased)."""
    if channels.shape[:2] == (size, size):
        return channels.astype(np.float32)
    out = [
        np.asarray(
            Image.fromarray(channels[..., c].astype(np.float32), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(channels.shape[-1])
    ]
    return np.stack(out, -1)


def _crops(h: int, w: int, tile: int):
    if tile == 0:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return [(top, left, s)]
    if tile > min(h, w):
        return []
    rows, cols = range(0, h - tile + 1, tile), range(0, w - tile + 1, tile)
    return [(r, c, tile) for r in rows for c in cols]


def _items(image: np.ndarray, label: np.ndarray, spec: LowDataSpec):
    k = spec.num_classes
    for top, left, s in _crops(*label.shape, spec.tile):
        img = image[top : top + s, left : left + s].astype(np.float32)
        lab = label[top : top + s, left : left + s]
        onehot = (lab[..., None] == np.arange(k)).astype(np.float32)
        lab = np.argmax(_resize(onehot, spec.size), -1).astype(np.int32)
        img = _resize(img, spec.size)
        mean = img.mean((0, 1), keepdims=True)
        std = np.maximum(img.std((0, 1), keepdims=True), 1e-8)
        yield (img - mean) / std, lab


def _map_labels(raw: np.ndarray, spec: LowDataSpec, where) -> np.ndarray:
    lab = raw.astype(np.int64)
    if spec.label_map:
        mapped = lab.copy()
        for a, b in spec.label_map.items():
            mapped[lab == int(a)] = int(b)
        lab = mapped
    if lab.min() < 0 or lab.max() >= spec.num_classes:
        raise DataError(
            f"{where}: mask values {np.unique(lab)[:8].tolist()} outside 0..{spec.num_classes - 1}"
            " (set label_map / num_classes in the config)"
        )
    return lab


def _read_sources(spec: LowDataSpec, root: pathlib.Path):
    """``[(source_id, image [H, W, C], label [H, W])]`` of the dataset folder."""
    layout = dio.scan_source(root)
    cases = layout.cases[: spec.max_sources or None]
    if layout.kind == "2d":
        for case in cases:
            if case.label_path is None:
                raise DataError(f"{case.image_path}: no mask (the low-data protocol needs masks)")
            img = dio.read_image_2d(case.image_path)
            lab = _map_labels(dio.read_mask_2d(case.label_path), spec, case.label_path)
            if img.shape[:2] != lab.shape:
                raise DataError(f"{case.image_path}: image {img.shape[:2]} vs mask {lab.shape}")
            yield case.case_id, [(img, lab)]
    elif layout.kind == "npz":
        for case in cases:
            loaded = dio.load_case(case, layout.kind)
            yield case.case_id, _volume_slices(loaded, spec, case.image_path)
    else:
        raise DataError(f"{root}: {layout.kind} data is not supported by the low-data runner")


def _volume_slices(loaded, spec: LowDataSpec, where):
    image = np.moveaxis(np.asarray(loaded.image), spec.slice_axis, 0)  # [D, H, W, C]
    label = np.moveaxis(_map_labels(np.asarray(loaded.label), spec, where), spec.slice_axis, 0)
    if image.ndim == 3:
        image = image[..., None]
    fg = (label > 0).reshape(len(label), -1).sum(1)
    order = np.argsort(-fg, kind="stable")[: spec.slices_per_volume]
    return [(image[i], label[i]) for i in sorted(order)]


def _domains(root: pathlib.Path, spec: LowDataSpec) -> dict[str, str]:
    index = root / "index.tsv"
    if not index.exists():
        raise DataError(f"{index}: missing (needed for domain_column={spec.domain_column!r})")
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or spec.domain_column not in rows[0]:
        raise DataError(f"{index}: no column {spec.domain_column!r}")
    key = next(iter(rows[0]))  # the first column names the case (e.g. "index")
    width = max(len(r[key]) for r in rows)
    return {r[key].zfill(width): r[spec.domain_column] for r in rows}


def load_lowdata(spec: LowDataSpec, root: str | pathlib.Path) -> LowData:
    """Read, crop/resize and split a dataset folder (see the module docstring)."""
    root = pathlib.Path(root)
    domains = _domains(root, spec) if spec.domain_column else None
    images, labels, sources, in_domain = [], [], [], []
    for s, (case_id, pairs) in enumerate(_read_sources(spec, root)):
        dom = True
        if domains is not None:
            if case_id not in domains:
                raise DataError(f"{root / 'index.tsv'}: no row for case {case_id!r}")
            dom = domains[case_id] == spec.in_domain
        for img, lab in pairs:
            for item_img, item_lab in _items(img, lab, spec):
                images.append(item_img)
                labels.append(item_lab)
                sources.append(s)
        in_domain.append(dom)
    if not images:
        raise DataError(f"{root}: no items (tile {spec.tile} larger than every image?)")
    sources = np.asarray(sources)
    in_src = np.flatnonzero(in_domain)
    if spec.num_test >= len(in_src):
        raise DataError(f"{root}: num_test={spec.num_test} >= {len(in_src)} in-domain sources")
    order = np.random.default_rng(spec.split_seed).permutation(in_src)
    test_src = np.sort(order[: spec.num_test])
    items = np.arange(len(sources))
    is_test = np.isin(sources, test_src)
    is_in = np.isin(sources, in_src)
    return LowData(
        images=np.stack(images).astype(np.float32),
        labels=np.stack(labels).astype(np.int32),
        source=sources,
        test=items[is_test],
        ood=items[~is_in],
        pool=items[is_in & ~is_test],
        spec=spec,
    )


def dice_scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean foreground Dice per item ``[items]`` (classes with empty prediction and target
    are skipped; an item with none is NaN), the project's metric convention."""
    p = np.asarray(pred).reshape(len(pred), -1)
    t = np.asarray(target).reshape(len(target), -1)
    out = np.full(len(p), np.nan)
    for i in range(len(p)):
        vals = []
        for c in range(1, num_classes):
            tp = np.sum((p[i] == c) & (t[i] == c))
            den = np.sum(p[i] == c) + np.sum(t[i] == c)
            if den > 0:
                vals.append(2 * tp / den)
        if vals:
            out[i] = float(np.mean(vals))
    return out


def check_budget(data: LowData, budgets, val_fraction: float) -> None:
    """Refuse budgets the pool cannot supply, before any training."""
    for n in budgets:
        if n < 2:
            raise ValueError(f"N={n}: need at least 2 labelled items (1 train + 1 val)")
        if n > len(data.pool):
            raise ValueError(f"N={n} > {len(data.pool)} labelled items in the pool")
        if num_val(n, val_fraction) < 1 or math.isnan(val_fraction):
            raise ValueError(f"val_fraction={val_fraction} gives no validation item at N={n}")
