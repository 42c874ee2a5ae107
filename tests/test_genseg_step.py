"""The GenSeg iteration: each level's optimizer steps once per iteration, alpha moves under
``genseg`` and stays exactly fixed under ``released``, modes freeze what they should,
2D and 3D through one code path, seeds vmapped."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unetjax.genseg import (
    COUNTERS,
    TEST_COMPILER_OPTIONS,
    GenSegConfig,
    GenSegModels,
    GenSegOptimizers,
    MaskToImageGenerator,
    PatchDiscriminator,
    init_genseg_state,
    make_genseg_step,
)
from unetjax.models.unet import UNet

K = 2
OPT0 = TEST_COMPILER_OPTIONS  # ~5x faster XLA CPU compiles, slower code


@functools.lru_cache  # one (models, optimizers) per nd: init_genseg_state's compile is reused
def _models(nd):
    seg = UNet(K, (4, 8), ((1,) * nd, (2,) * nd), ((3,) * nd,) * 2, convs_per_stage=1)
    gen = MaskToImageGenerator(1, depth=2, base_features=4)
    disc = PatchDiscriminator(base_features=4, n_layers=1)
    models = GenSegModels(seg, gen, disc)
    opts = GenSegOptimizers(segmenter=optax.sgd(0.05), arch=optax.adam(0.05))
    return models, opts


def _setup(nd, n=16, batch=2, seed=0):
    models, opts = _models(nd)
    rng = np.random.default_rng(seed)

    def pair():
        lab = np.zeros((batch, *(n,) * nd), np.int32)
        for b in range(batch):
            lo = rng.integers(2, n // 2, nd)
            lab[(b, *(slice(a, a + n // 3) for a in lo))] = 1
        img = rng.normal(size=lab.shape + (1,)) + 2.0 * lab[..., None]
        return {"image": jnp.asarray(img, jnp.float32), "label": jnp.asarray(lab)}

    batch_ = {"train": pair(), "val": pair()}
    return models, opts, batch_


def _host(tree):
    def copy(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        return np.array(a)

    return jax.tree.map(copy, tree)


def _changed(a, b):
    return any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _run(mode, nd, iters, n=16, **cfg):
    models, opts, batch = _setup(nd, n)
    state = init_genseg_state(
        jax.random.key(0), models, opts, batch["train"]["image"], K, compiler_options=OPT0
    )
    before = _host(state)
    step = make_genseg_step(models, opts, GenSegConfig(mode=mode, **cfg), K, compiler_options=OPT0)
    history = []
    for _ in range(iters):
        state, metrics = step(state, batch)
        history.append(_host(metrics))
    return before, _host(state), history


def _counts(state):
    return {k: int(state.counts[k]) for k in COUNTERS}


def test_genseg_moves_alpha_and_steps_each_level_once():
    before, after, history = _run("genseg", 2, 3)
    assert all(bool(m["finite"]) for m in history)
    assert int(after.iteration) == 3
    assert _counts(after) == {
        "discriminator": 3,
        "generator": 3,
        "segmenter": 3,
        "arch": 3,
        "segmenter_val": 0,
    }
    assert all(m["hypergrad_norm"] > 0 for m in history)
    # alpha: its own collection, initialised near uniform, and it moved
    assert set(before.arch) == {"alpha_up"} and before.arch["alpha_up"].shape == (2, 3)
    assert np.abs(before.arch["alpha_up"]).max() < 1e-2
    assert _changed(before.arch, after.arch)
    for name in ("seg_params", "gen_params", "disc_params"):
        assert _changed(getattr(before, name), getattr(after, name)), name


def test_released_keeps_alpha_fixed_and_steps_on_validation():
    before, after, history = _run("released", 2, 2)
    assert all(bool(m["finite"]) for m in history)
    assert _counts(after) == {
        "discriminator": 2,
        "generator": 2,
        "segmenter": 2,
        "arch": 0,
        "segmenter_val": 2,
    }
    for name in before.arch:
        np.testing.assert_array_equal(after.arch[name], before.arch[name])
    assert jax.tree.all(jax.tree.map(np.array_equal, after.arch_opt, before.arch_opt))
    assert _changed(before.seg_params, after.seg_params)
    assert _changed(before.gen_params, after.gen_params)


def test_pretrain_freezes_segmenter_and_alpha():
    before, after, _ = _run("pretrain", 2, 2)
    assert _counts(after) == dict.fromkeys(COUNTERS, 0) | {"discriminator": 2, "generator": 2}
    assert not _changed(before.seg_params, after.seg_params)
    assert not _changed(before.arch, after.arch)
    assert _changed(before.gen_params, after.gen_params)


def test_separate_freezes_generator_with_seeds_vmapped_3d():
    models, opts, batch = _setup(3, n=8)
    keys = jax.random.split(jax.random.key(0), 2)
    example = batch["train"]["image"]
    states = jax.vmap(
        lambda k: init_genseg_state(k, models, opts, example, K, compiler_options=OPT0)
    )(keys)
    before = _host(states)
    step = make_genseg_step(models, opts, GenSegConfig(mode="separate"), K, jit=False)
    vstep = jax.jit(jax.vmap(step), compiler_options=OPT0)
    batches = jax.tree.map(lambda a: jnp.stack([a, a]), batch)  # per-seed batches
    for _ in range(2):
        states, metrics = vstep(states, batches)
    after = _host(states)
    for name in COUNTERS:
        assert after.counts[name].tolist() == ([2, 2] if name == "segmenter" else [0, 0])
    loss = np.asarray(metrics["seg_loss"])
    assert loss.shape == (2,) and np.all(np.isfinite(loss)) and loss[0] != loss[1]
    assert not _changed(before.gen_params, after.gen_params)
    assert not _changed(before.disc_params, after.disc_params)
    assert not _changed(before.arch, after.arch)
    assert _changed(before.seg_params, after.seg_params)
