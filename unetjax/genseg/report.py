"""Logs and reports of the low-data runner: per-step JSONL logs, synthetic image grids,
and the results CSV, markdown table and Dice-vs-N plot (PNG, drawn with Pillow)."""

import csv
import json
import math
import os
import pathlib

import jax
import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "baseline": (120, 120, 120),
    "baseline_aug": (31, 119, 180),
    "separate": (44, 160, 44),
    "released": (255, 127, 14),
    "genseg": (214, 39, 40),
}


def _per_seed(value):
    a = np.asarray(value)
    return a.astype(np.float64).round(5).tolist() if a.dtype.kind == "f" else a.tolist()


class RunLog:
    """``OUT/logs/ARM_N{n}.jsonl`` (rewritten from the start) and ``OUT/grids/``."""

    def __init__(self, runner, arm: str, n: int):
        self.runner, self.arm, self.n = runner, arm, n
        self.path = runner.out / "logs" / f"{arm}_N{n}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        items = runner.splits(n)["train"][0][:4]
        self.grid_items = items
        self.grid_masks = jax.nn.one_hot(runner.data.labels[items], runner.k)

    def metrics(self, step: int, phase: str, metrics: dict, state) -> None:
        row = {"step": step, "phase": phase}
        row.update({k: _per_seed(v) for k, v in metrics.items()})
        arch = getattr(state, "arch", None)
        if arch:
            row["alpha_softmax"] = {
                k: np.asarray(jax.nn.softmax(v, -1), np.float64).round(4).tolist()
                for k, v in arch.items()
            }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def grid(self, step: int, state) -> None:
        """Masks, their synthetic images (seed 0) and the real images, one column each."""
        first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
        fake = self.runner.synthesize(first(state.gen_params), first(state.arch), self.grid_masks)
        real = self.runner.data.images[self.grid_items]
        masks = self.runner.data.labels[self.grid_items] / max(self.runner.k - 1, 1)
        rows = [
            [_to_uint8(m[..., None]) for m in masks],
            [_to_uint8(np.asarray(f)) for f in fake],
            [_to_uint8(r) for r in real],
        ]
        path = self.runner.out / "grids" / f"{self.arm}_N{self.n}_step{step}.png"
        save_grid(rows, path)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.float32)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    img = (img * 255).round().astype(np.uint8)
    return np.repeat(img, 3, -1) if img.shape[-1] == 1 else img[..., :3]


def save_grid(rows, path: pathlib.Path, gap: int = 2) -> None:
    h, w = rows[0][0].shape[:2]
    nr, nc = len(rows), max(len(r) for r in rows)
    canvas = np.full((nr * (h + gap) - gap, nc * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- results

FIELDS = (
    "dataset",
    "arm",
    "N",
    "seed",
    "dice_test",
    "dice_ood",
    "num_seg_train",
    "num_val",
    "train_s",
    "compile_s",
)


def result_rows(name: str, results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        for i, seed in enumerate(r["seeds"]):
            rows.append(
                {
                    "dataset": name,
                    "arm": r["arm"],
                    "N": r["N"],
                    "seed": seed,
                    "dice_test": round(r["dice_test"][i], 4),
                    "dice_ood": round(r["dice_ood"][i], 4) if "dice_ood" in r else "",
                    "num_seg_train": r["num_seg_train"],
                    "num_val": r["num_val"],
                    "train_s": round(r["train_s"], 1),
                    "compile_s": round(r["compile_s"], 1),
                }
            )
    return rows


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std())


def table_markdown(results: list[dict], arms, budgets, key: str = "dice_test") -> str:
    by = {(r["arm"], r["N"]): r for r in results}
    head = "| arm | " + " | ".join(f"N={n}" for n in budgets) + " |"
    lines = [head, "|---|" + "---|" * len(budgets)]
    for arm in arms:
        cells = []
        for n in budgets:
            r = by.get((arm, n))
            if r is None or key not in r:
                cells.append("—")
            else:
                m, s = _mean_std(r[key])
                cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(out: pathlib.Path, cfg, results: list[dict]) -> None:
    arms, budgets = list(cfg.protocol.arms), list(cfg.protocol.budgets)
    rows = result_rows(cfg.name, results)
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    parts = [
        f"# {cfg.name}: mean ± std foreground Dice over seeds {list(cfg.protocol.seeds)}",
        "",
        "In-domain test split:",
        "",
        table_markdown(results, arms, budgets),
    ]
    if any("dice_ood" in r for r in results):
        parts += [
            "",
            "Out-of-domain test split:",
            "",
            table_markdown(results, arms, budgets, "dice_ood"),
        ]
    tmp = out / "table.md.tmp"
    tmp.write_text("\n".join(parts) + "\n")
    os.replace(tmp, out / "table.md")
    plot_dice_vs_n(results, arms, budgets, out / "dice_vs_n.png", title=cfg.name)


def plot_dice_vs_n(results, arms, budgets, path: pathlib.Path, title: str = "") -> None:
    """Mean test Dice vs N per arm, error bars +- std over seeds (log2 N axis)."""
    w, h, left, right, top, bottom = 560, 380, 60, 130, 30, 45
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    by = {(r["arm"], r["N"]): r for r in results}
    vals = [v for r in results for v in r["dice_test"]]
    lo = math.floor(min(vals, default=0) * 10) / 10
    hi = min(1.0, math.ceil(max(vals, default=1) * 10) / 10)
    hi = hi if hi > lo else lo + 0.1
    xs = np.log2(budgets)
    span = (xs.max() - xs.min()) or 1.0

    def px(x, y):
        return (
            left + (x - xs.min()) / span * (w - left - right),
            top + (hi - y) / (hi - lo) * (h - top - bottom),
        )

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(int(round((hi - lo) * 10)) + 1):
        y = lo + k / 10
        _, yy = px(xs.min(), y)
        d.line([left - 4, yy, left, yy], fill="black")
        d.text((8, yy - 6), f"{y:.1f}", fill="black")
    for x, n in zip(xs, budgets, strict=True):
        xx, _ = px(x, lo)
        d.line([xx, h - bottom, xx, h - bottom + 4], fill="black")
        d.text((xx - 8, h - bottom + 8), f"N={n}", fill="black")
    d.text(
        (left, 8), f"{title}: test Dice vs labelled images (mean ± std over seeds)", fill="black"
    )
    for i, arm in enumerate(arms):
        colour = COLOURS.get(arm, (0, 0, 0))
        pts = []
        for x, n in zip(xs, budgets, strict=True):
            r = by.get((arm, n))
            if r is None:
                continue
            m, s = _mean_std(r["dice_test"])
            pts.append(px(x, m))
            (x0, y0), (_, y1) = px(x, m - s), px(x, m + s)
            d.line([x0, y0, x0, y1], fill=colour, width=1)
            d.ellipse([pts[-1][0] - 3, pts[-1][1] - 3, pts[-1][0] + 3, pts[-1][1] + 3], fill=colour)
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        ly = top + 10 + 18 * i
        d.line([w - right + 10, ly + 6, w - right + 30, ly + 6], fill=colour, width=3)
        d.text((w - right + 36, ly), arm, fill="black")
    tmp = path.with_name(path.stem + ".tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def load_results(out: pathlib.Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


__all__ = ["RunLog", "load_results", "plot_dice_vs_n", "table_markdown", "write_reports"]
