"""A synthetic large volume with a labelled structure, generated slab by slab (benchmarks).

Image: smooth low-frequency background + Gaussian noise + brighter spheres (class 1) and one
thick tube along axis 0 (class 2); label: the class map. Every slab is a pure function of
``(seed, z0, z1)``, so the volume never has to exist in memory.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

__all__ = ["SyntheticVolume", "write_npy"]


class SyntheticVolume:
    def __init__(self, shape, seed: int = 0, num_spheres: int = 40):
        self.shape = tuple(int(s) for s in shape)
        rng = np.random.default_rng(seed)
        n = np.asarray(self.shape, np.float64)
        self.centres = rng.uniform(0.1, 0.9, (num_spheres, 3)) * n
        self.radii = rng.uniform(0.02, 0.06, num_spheres) * n.min()
        self.tube_centre = rng.uniform(0.3, 0.7, 2) * n[1:]
        self.tube_radius = 0.04 * n[1:].min()
        self.seed = seed

    def slab(self, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 image and uint8 label of rows ``[z0, z1)``."""
        _, h, w = self.shape
        z = np.arange(z0, z1, dtype=np.float32)[:, None, None]
        y = np.arange(h, dtype=np.float32)[None, :, None]
        x = np.arange(w, dtype=np.float32)[None, None, :]
        label = np.zeros((z1 - z0, h, w), np.uint8)
        ty, tx = self.tube_centre
        label[((y - ty) ** 2 + (x - tx) ** 2 <= self.tube_radius**2).repeat(z1 - z0, 0)] = 2
        for (cz, cy, cx), r in zip(self.centres, self.radii, strict=True):
            if cz + r < z0 or cz - r >= z1:
                continue
            lo_y, hi_y = max(int(cy - r), 0), min(int(cy + r) + 2, h)
            lo_x, hi_x = max(int(cx - r), 0), min(int(cx + r) + 2, w)
            d = (z - cz) ** 2 + (y[:, lo_y:hi_y] - cy) ** 2 + (x[:, :, lo_x:hi_x] - cx) ** 2
            sub = label[:, lo_y:hi_y, lo_x:hi_x]
            sub[d <= r * r] = 1
        rng = np.random.default_rng([self.seed, z0, z1])
        image = rng.standard_normal((z1 - z0, h, w), dtype=np.float32) * 0.5
        image += np.sin(z / 97.0) * np.cos(y / 131.0) + 0.5 * np.sin(x / 71.0)
        image += np.float32(1.5) * (label == 1) + np.float32(2.5) * (label == 2)
        return image, label


def write_npy(
    volume: SyntheticVolume, image_path: str | os.PathLike, label_path: str | os.PathLike,
    slab: int = 32,
) -> None:  # fmt: skip
    """Write the image (float32) and label (uint8) as ``.npy`` files, slab by slab."""
    fmt = np.lib.format
    paths = [pathlib.Path(image_path), pathlib.Path(label_path)]
    tmps = [p.with_name(p.name + ".tmp") for p in paths]
    with open(tmps[0], "wb") as fi, open(tmps[1], "wb") as fl:
        for f, dtype in ((fi, np.float32), (fl, np.uint8)):
            header = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                      "shape": volume.shape}  # fmt: skip
            fmt.write_array_header_1_0(f, header)
        for z0 in range(0, volume.shape[0], slab):
            image, label = volume.slab(z0, min(z0 + slab, volume.shape[0]))
            fi.write(image.tobytes())
            fl.write(label.tobytes())
    for tmp, p in zip(tmps, paths, strict=True):
        os.replace(tmp, p)
