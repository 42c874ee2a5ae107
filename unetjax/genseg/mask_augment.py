"""GenSeg's mask augmentation in JAX: on device, jittable, vmappable, 2D and 3D.

One random affine map per mask, composed from (GENSEG.md, level 2):

- random flip of each spatial axis (probability ``flip_prob``);
- pad and resize back: pad ``p ~ U(0, pad)`` of the size in total (``p / 2`` per side)
  then resize to the original size, i.e. a zoom-out by ``1 / (1 + p)`` about the centre;
- isotropic scale ``s ~ U(scale)`` (0.8-1.2);
- translate ``t_a ~ U(-translate, translate) * size_a`` per axis (+-10%);
- rotate ``theta ~ U(-rotate, rotate)`` degrees (+-15) in the plane of two axes: in 2D
  the image plane, in 3D one plane drawn uniformly from (0,1), (0,2), (1,2);
- shear ``gamma ~ U(-shear, shear)`` degrees (+-8): ``x_a += tan(gamma) x_b`` in a plane
  (3D: another uniformly drawn plane).

All of them are composed into one matrix, so the mask is resampled once (no compounding
of nearest-neighbour errors): in centred voxel coordinates ``u_out = M u_src + t`` with
``M = zoom * s * R * Shear * Flip``; each output voxel reads the source at
``M^{-1} (u_out - t)`` (inverse composed analytically, so zero parameters give exactly
the identity). Coordinates are voxel units (anisotropic spacing is not compensated).

Masks are one-hot ``[*spatial, K]`` (``[B, *spatial, K]`` batched), any number of
classes. ``interpolation="nearest"`` copies the nearest source voxel (exact one-hot out);
``"linear"`` interpolates the one-hot channels (bi/trilinear) and re-binarises by argmax.
Voxels mapped from outside the mask get class ``fill_class`` (background, 0).
"""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from unetjax.genseg.ops import fast_rng


@dataclasses.dataclass(frozen=True)
class MaskAugmentConfig:
    flip_prob: float = 0.5
    pad: float = 0.1  # max total padding fraction (pad then resize back)
    scale: tuple[float, float] = (0.8, 1.2)
    translate: float = 0.1  # fraction of the size per axis
    rotate: float = 15.0  # degrees
    shear: float = 8.0  # degrees
    interpolation: str = "nearest"  # or "linear" (then argmax)
    fill_class: int = 0

    def __post_init__(self):
        if self.interpolation not in ("nearest", "linear"):
            raise ValueError(f"interpolation must be nearest or linear; got {self.interpolation!r}")

    @classmethod
    def identity(cls) -> "MaskAugmentConfig":
        """Parameters that leave every mask unchanged."""
        return cls(flip_prob=0.0, pad=0.0, scale=(1.0, 1.0), translate=0.0, rotate=0.0, shear=0.0)


def _planes(nd: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(nd), 2))


def _plane_matrix(nd: int, plane_index, block: jnp.ndarray) -> jnp.ndarray:
    """Identity with the 2x2 ``block`` placed on the rows/cols of plane ``plane_index``."""
    mats = []
    for a, b in _planes(nd):
        m = jnp.eye(nd, dtype=block.dtype)
        m = m.at[a, a].set(block[0, 0]).at[a, b].set(block[0, 1])
        m = m.at[b, a].set(block[1, 0]).at[b, b].set(block[1, 1])
        mats.append(m)
    return jnp.stack(mats)[plane_index]


def sample_affine(key: jax.Array, spatial_shape, cfg: MaskAugmentConfig):
    """Random ``(M_inv, t)``: the source of centred output coordinate u is ``M_inv (u - t)``."""
    nd = len(spatial_shape)
    if nd < 2:
        raise ValueError("mask augmentation needs >= 2 spatial dims")
    f32 = jnp.float32
    # one random draw per mask (each threefry call is a while loop on CPU: compile time)
    u = jax.random.uniform(key, (2 * nd + 6,), f32)

    def between(v, lo, hi):
        return lo + (hi - lo) * v

    flips = jnp.where(u[:nd] < cfg.flip_prob, -1.0, 1.0).astype(f32)
    t = between(u[nd : 2 * nd], -cfg.translate, cfg.translate) * jnp.asarray(spatial_shape, f32)
    pad, scale, theta, gamma, rot_u, shear_u = (u[2 * nd + i] for i in range(6))
    zoom = between(scale, cfg.scale[0], cfg.scale[1]) / (1.0 + between(pad, 0.0, cfg.pad))
    theta = between(theta, -cfg.rotate, cfg.rotate) * (math.pi / 180)
    gamma = between(gamma, -cfg.shear, cfg.shear) * (math.pi / 180)
    n_planes = len(_planes(nd))
    rot_plane = jnp.minimum((rot_u * n_planes).astype(jnp.int32), n_planes - 1)
    shear_plane = jnp.minimum((shear_u * n_planes).astype(jnp.int32), n_planes - 1)
    c, s, tg = jnp.cos(theta), jnp.sin(theta), jnp.tan(gamma)
    one, zero = jnp.ones((), f32), jnp.zeros((), f32)
    # inverses of each factor, composed in reverse order
    rot_inv = _plane_matrix(nd, rot_plane, jnp.array([[c, s], [-s, c]]))
    shear_inv = _plane_matrix(
        nd, shear_plane, jnp.stack([jnp.stack([one, -tg]), jnp.stack([zero, one])])
    )
    m_inv = (jnp.diag(flips) @ shear_inv @ rot_inv) / zoom
    return m_inv, t


def _gather(onehot, idx, fill):
    """Values at integer ``idx`` ``[nd, *out]`` (out of range -> ``fill``)."""
    spatial = onehot.shape[:-1]
    inside = jnp.ones(idx.shape[1:], bool)
    clipped = []
    for a, n in enumerate(spatial):
        inside &= (idx[a] >= 0) & (idx[a] < n)
        clipped.append(jnp.clip(idx[a], 0, n - 1))
    vals = onehot[tuple(clipped)]
    return jnp.where(inside[..., None], vals, fill)


def warp_onehot(onehot, m_inv, t, *, interpolation="nearest", fill_class=0):
    """Resample one mask ``[*spatial, K]`` (one-hot) through the affine map ``(m_inv, t)``."""
    spatial = onehot.shape[:-1]
    nd = len(spatial)
    k = onehot.shape[-1]
    centre = jnp.asarray([(n - 1) / 2 for n in spatial], jnp.float32)
    grid = jnp.stack(
        jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing="ij")
    )
    u = grid - centre.reshape(nd, *(1,) * nd) - t.reshape(nd, *(1,) * nd)
    src = jnp.einsum("ij,j...->i...", m_inv, u) + centre.reshape(nd, *(1,) * nd)
    fill = jax.nn.one_hot(fill_class, k, dtype=onehot.dtype)
    if interpolation == "nearest":
        return _gather(onehot, jnp.round(src).astype(jnp.int32), fill)
    base = jnp.floor(src)
    frac = src - base
    base = base.astype(jnp.int32)
    acc = jnp.zeros((*spatial, k), jnp.float32)
    for corner in itertools.product((0, 1), repeat=nd):
        off = np.asarray(corner).reshape(nd, *(1,) * nd)
        w = jnp.prod(jnp.where(off == 1, frac, 1.0 - frac), axis=0)
        acc = acc + w[..., None] * _gather(onehot, base + off, fill).astype(jnp.float32)
    return jax.nn.one_hot(jnp.argmax(acc, -1), k, dtype=onehot.dtype)


def augment_mask(key: jax.Array, onehot: jnp.ndarray, cfg: MaskAugmentConfig) -> jnp.ndarray:
    """One random augmentation of one one-hot mask ``[*spatial, K]``."""
    m_inv, t = sample_affine(key, onehot.shape[:-1], cfg)
    return warp_onehot(onehot, m_inv, t, interpolation=cfg.interpolation, fill_class=cfg.fill_class)


def augment_masks(key: jax.Array, onehot_batch: jnp.ndarray, cfg: MaskAugmentConfig):
    """Independent random augmentations of a batch ``[B, *spatial, K]`` (jit/vmap-safe)."""
    with fast_rng():
        keys = jax.random.split(key, onehot_batch.shape[0])
        return jax.vmap(lambda k, m: augment_mask(k, m, cfg))(keys, onehot_batch)
