"""Rendering for trust reports: colour maps and overlay panels (PNG), line charts and
reliability diagrams (SVG), markdown tables and the HTML summary page.

Dependency-free (numpy + PIL): charts are written as SVG text, which browsers and GitHub
render directly. Images are ``[H, W, 3]`` uint8 RGB; 3D data is shown as one axial slice
(:func:`display_slice`).
"""

from __future__ import annotations

import html
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unetjax.evaluation import _atomic_write_bytes

# Anchor colours of perceptually ordered maps (sampled from matplotlib's viridis / magma).
_MAPS = {
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "magma": [(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97), (252, 253, 191)],
}
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def colormap(values: np.ndarray, lo: float, hi: float, name: str = "magma") -> np.ndarray:
    """``values`` scaled from ``[lo, hi]`` to a colour map: ``[..., 3]`` uint8."""
    anchors = np.asarray(_MAPS[name], np.float64)
    t = np.clip((np.asarray(values, np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
    pos = t * (len(anchors) - 1)
    i = np.minimum(pos.astype(np.int64), len(anchors) - 2)
    w = (pos - i)[..., None]
    return (anchors[i] * (1 - w) + anchors[i + 1] * w).round().astype(np.uint8)


def display_slice(labels: np.ndarray, target: np.ndarray | None = None) -> int:
    """Axis-0 index of a 3D case with the most predicted plus true foreground."""
    fg = (labels > 0).sum(tuple(range(1, labels.ndim)))
    if target is not None:
        fg = fg + (target > 0).sum(tuple(range(1, target.ndim)))
    return int(np.argmax(fg))


def grayscale_rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` image -> RGB in [0, 1] (0.5-99.5 percentile window), as the overlays."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    rgb = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    return rgb if rgb.shape[-1] == 3 else np.repeat(rgb[..., :1], 3, -1)


def heat_overlay(image: np.ndarray, heat: np.ndarray, hi: float, name: str = "magma"):
    """Heat map over the dimmed image: ``alpha`` grows with ``heat / hi``."""
    base = grayscale_rgb(image)
    colour = colormap(heat, 0.0, hi, name) / 255.0
    alpha = np.clip(heat / max(hi, 1e-12), 0, 1)[..., None] ** 0.5
    return ((0.6 * base * (1 - alpha) + colour * alpha) * 255).astype(np.uint8)


def signed_overlay(image: np.ndarray, attribution: np.ndarray, quantile: float = 99.0):
    """Attributions in red (positive) and blue (negative) over the dimmed image; the colour
    saturates at the ``quantile`` of ``|attribution|``."""
    base = 0.6 * grayscale_rgb(image)
    scale = float(np.percentile(np.abs(attribution), quantile)) or 1.0
    a = np.clip(attribution / scale, -1, 1)[..., None]
    red, blue = np.array([1.0, 0.1, 0.1]), np.array([0.1, 0.4, 1.0])
    out = np.where(a > 0, base * (1 - a) + red * a, base * (1 + a) - blue * a)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def panel(images: Sequence[np.ndarray], titles: Sequence[str], height: int = 192) -> np.ndarray:
    """Images side by side, each resized to ``height`` rows, with a title strip above."""
    tiles = []
    for img in images:
        pil = Image.fromarray(np.asarray(img, np.uint8))
        width = max(1, round(pil.width * height / pil.height))
        resample = Image.NEAREST if pil.height < height else Image.BILINEAR
        tiles.append(pil.resize((width, height), resample))
    strip, gap = 18, 4
    total = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (total, height + strip), "white")
    draw, font, x = ImageDraw.Draw(canvas), _font(12), 0
    for tile, title in zip(tiles, titles, strict=True):
        canvas.paste(tile, (x, strip))
        draw.text((x + 2, 2), title, fill="black", font=font)
        x += tile.width + gap
    return np.asarray(canvas)


def save_png(path: pathlib.Path, rgb: np.ndarray, colors: int = 128) -> pathlib.Path:
    """Atomically write an optimised PNG with an adaptive ``colors``-entry palette (small
    files for the docs; 0 keeps full RGB)."""
    image = Image.fromarray(rgb)
    if colors:
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=0)
    _atomic_write_bytes(path, lambda p: image.save(p, "PNG", optimize=True))
    return path


def save_text(path: pathlib.Path, text: str) -> pathlib.Path:
    _atomic_write_bytes(path, lambda p: p.write_text(text))
    return path


# ----------------------------------------------------------------------------- charts (SVG)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    span = hi - lo if hi > lo else 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step = next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 10) for i in range(int((hi - start) / step + 1e-9) + 1)]


def line_chart_svg(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    diagonal: bool = False,
    width: int = 560,
    height: int = 340,
) -> str:
    """A line chart with markers and a legend; NaN points are skipped. ``diagonal`` draws
    ``y = x`` (reliability diagrams)."""
    left, right, top, bottom = 52, 150, 28, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1] if np.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = ylim if ylim else ((min(ys), max(ys)) if ys else (0.0, 1.0))
    if y1 == y0:
        y1 = y0 + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    for t in _nice_ticks(y0, y1):
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            'stroke="#e5e5e5"/>'
        )
        out.append(f'<text x="{left - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _nice_ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    if diagonal:
        out.append(
            f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(1):.1f}" y2="{py(1):.1f}" '
            'stroke="#999" stroke-dasharray="4 3"/>'
        )
    out.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
        f"{html.escape(xlabel)}</text>"
    )
    out.append(
        f'<text transform="translate(13 {top + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(sx, sy, strict=True) if np.isfinite(y)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>'
            )
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{colour}"/>' for x, y in pts]
        ly = top + 10 + 16 * i
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 28}" y1="{ly}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw + 32}" y="{ly + 4}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def reliability_svg(diagrams: dict[str, dict], title: str) -> str:
    """Reliability curves (bin accuracy vs bin confidence) of :func:`reliability_diagram`
    outputs, one per label, with the ``y = x`` line of perfect calibration."""
    series = {k: (list(d["confidence"]), list(d["accuracy"])) for k, d in diagrams.items()}
    for name, (conf, acc) in list(series.items()):
        keep = [i for i, c in enumerate(conf) if np.isfinite(c)]
        series[name] = ([conf[i] for i in keep], [acc[i] for i in keep])
    return line_chart_svg(
        series,
        title=title,
        xlabel="confidence (bin mean)",
        ylabel="accuracy (bin mean)",
        ylim=(0.0, 1.0),
        diagonal=True,
        width=460,
        height=340,
    )


# ----------------------------------------------------------------------------- tables, page


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not np.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:4px 0}
.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:0 3px}"""


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A standalone page: ``sections`` are ``(heading, html body)`` pairs."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    parts.append("</body></html>")
    return "\n".join(parts)
