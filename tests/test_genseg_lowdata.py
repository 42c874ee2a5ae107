"""The low-data runner: seeds vmapped == seeds one by one, splits shared and disjoint, one
command end to end (CSV, table, plot), resumable (finished runs skipped, rerun identical)."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.genseg import arms as A
from unetjax.genseg import lowdata_data as D
from unetjax.genseg.lowdata import run_lowdata, sample_batch
from unetjax.genseg.lowdata_config import lowdata_defaults
from unetjax.genseg.step import TEST_COMPILER_OPTIONS, init_genseg_state, make_genseg_step

OPT0 = TEST_COMPILER_OPTIONS


def _tiny_config(nuclei_dir, **protocol):
    c = lowdata_defaults()
    c.name = "tiny"
    c.data.path = str(nuclei_dir)
    c.data.size = 16
    c.data.num_test = 6
    c.data.max_sources = 30
    c.data.domain_column = "kind"
    c.data.in_domain = "gray"
    c.protocol.arms = protocol.get("arms", ("baseline", "baseline_aug"))
    c.protocol.budgets = (4,)
    c.protocol.seeds = (0, 1)
    c.model.seg_features = (4, 8)
    c.model.seg_convs_per_stage = 1
    c.model.gen_depth = 2
    c.model.gen_width = 4
    c.model.disc_layers = 1
    c.train.batch_size = 2
    c.train.num_steps = 3
    c.train.pretrain_steps = 2
    c.train.warmup_steps = 1
    c.train.log_every = 2
    c.train.grid_every = 2
    c.train.eval_batch = 8
    c.train.fast_compile = True
    return c


@pytest.fixture(scope="module")
def tiny_data(nuclei_dir):
    cfg = _tiny_config(nuclei_dir)
    from unetjax.genseg.lowdata import data_spec

    return cfg, D.load_lowdata(data_spec(cfg), nuclei_dir)


def test_splits_disjoint_nested_and_shared(tiny_data):
    _, data = tiny_data
    test, ood, pool = set(data.test), set(data.ood), set(data.pool)
    assert not (test & pool) and not (test & ood) and not (ood & pool)
    assert len(test | ood | pool) == len(data.images)
    assert set(data.source[list(test)]).isdisjoint(data.source[list(pool)])
    small, big = data.labelled(1, 4), data.labelled(1, 8)
    np.testing.assert_array_equal(small, big[:4])  # budgets nested per seed
    assert not np.array_equal(data.labelled(0, 4), small)  # seeds draw different items
    with pytest.raises(ValueError, match="pool"):
        D.check_budget(data, (len(data.pool) + 1,), 0.25)


def test_vmapped_seeds_match_seeds_one_by_one(tiny_data):
    """The runner's vmapped genseg program (all three levels) vs the per-seed step, 2 iters.
    Tolerance: float32 reassociation of batched convs, rtol 1e-4 / atol 1e-6."""
    cfg, data = tiny_data
    k, seeds = 2, (0, 1)
    models = A.build_models(cfg, data.channels, k)
    opts = A.build_optimizers(cfg)
    example = jnp.zeros((2, 16, 16, data.channels))
    prog = A.genseg_program(models, opts, cfg, "genseg", example, k, OPT0)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    items = [data.labelled(s, 4) for s in seeds]
    batches = [
        {
            "train": sample_batch(data, items, seeds, i, "train", 2),
            "val": sample_batch(data, items, seeds, i, "val", 2),
        }
        for i in range(2)
    ]
    state = prog.init(keys)
    for b in batches:
        state, _ = prog.step(state, b)
    single = make_genseg_step(
        models, opts, A.genseg_config(cfg, "genseg"), k, compiler_options=OPT0
    )
    for i, key in enumerate(keys):
        s = init_genseg_state(key, models, opts, example, k, compiler_options=OPT0)
        for b in batches:
            s, _ = single(s, jax.tree.map(lambda a, i=i: a[i], b))
        assert int(s.counts["arch"]) == 2
        for name in ("seg_params", "gen_params", "disc_params", "arch"):
            mine = jax.tree.map(lambda a, i=i: np.asarray(a[i]), getattr(state, name))
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                mine,
                jax.tree.map(np.asarray, getattr(s, name)),
            )
    a0, a1 = (np.asarray(state.arch["alpha_up"][i]) for i in range(2))
    assert not np.array_equal(a0, a1)  # the seeds really differ


def test_runner_end_to_end_and_resume(nuclei_dir, tmp_path, capsys):
    cfg = _tiny_config(nuclei_dir)
    out = tmp_path / "run"
    run_lowdata(cfg, out)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], r["seed"]) for r in rows] == [
        ("baseline", "0"),
        ("baseline", "1"),
        ("baseline_aug", "0"),
        ("baseline_aug", "1"),
    ]
    for r in rows:
        assert 0.0 <= float(r["dice_test"]) <= 1.0 and 0.0 <= float(r["dice_ood"]) <= 1.0
    table = (out / "table.md").read_text()
    assert "| baseline_aug |" in table and "Out-of-domain" in table
    assert (out / "dice_vs_n.png").stat().st_size > 0
    log = [json.loads(x) for x in (out / "logs" / "baseline_N4.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [2, 3] and len(log[0]["seg_loss"]) == 2
    first = json.loads((out / "results" / "baseline_aug_N4.json").read_text())

    (out / "results" / "baseline_aug_N4.json").unlink()  # as if interrupted during it
    capsys.readouterr()
    run_lowdata(cfg, out)
    printed = capsys.readouterr().out
    assert "baseline N=4: done before, skipped" in printed
    assert "baseline_aug N=4: test Dice" in printed
    again = json.loads((out / "results" / "baseline_aug_N4.json").read_text())
    assert again["dice_test"] == first["dice_test"]  # deterministic rerun

    cfg.train.num_steps = 4  # a different config must not mix into this directory
    with pytest.raises(SystemExit, match="different config"):
        run_lowdata(cfg, out)
