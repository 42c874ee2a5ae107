"""The low-data experiment: arms x labelled budgets N x seeds on one dataset, one command.

    python -m unetjax.genseg.lowdata --config configs/lowdata_nuclei.py --out runs/lowdata_nuclei

Protocol (``lowdata_data`` for the data and splits, ``arms`` for the arms):

- every arm of budget N and seed s gets the same N labelled items; arms with an upper
  level (``released``, ``genseg``) hold ``num_val(N)`` of them out as their internal
  validation split and train the segmenter on the rest; the others (``baseline``,
  ``baseline_aug``, ``separate``) train the segmenter on all N. No arm selects a
  checkpoint: the final weights are tested.
- the generator arms start from one shared pix2pix pre-training (``pretrain_steps``) on
  the internal train split, then run ``num_steps`` iterations; the baselines run
  ``num_steps`` segmenter steps. Batches are drawn from ``rng([seed, role, step])``, so
  every arm sees the same item sequence for a role.
- the seeds of one arm train as one vmapped program; each (arm, N) is written atomically
  to ``OUT/results/ARM_N{N}.json`` when it finishes, and a rerun skips finished ones.
- outputs: ``OUT/results.csv``, ``OUT/table.md`` (mean +- std Dice over seeds),
  ``OUT/dice_vs_n.png``, per-run logs ``OUT/logs/ARM_N{N}.jsonl`` (all losses, softmax(alpha)
  per cell) and synthetic image grids ``OUT/grids/ARM_N{N}_step{S}.png``.
"""

import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unetjax.data.augment import AugmentConfig, augment_patch
from unetjax.experiment import resolve_data_path
from unetjax.genseg import arms as A
from unetjax.genseg import lowdata_data as D
from unetjax.genseg import report
from unetjax.genseg.step import TEST_COMPILER_OPTIONS

ROLES = {"train": 1, "val": 2}


def write_json_atomic(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def data_spec(cfg: ml_collections.ConfigDict) -> D.LowDataSpec:
    d = cfg.data
    return D.LowDataSpec(
        path=d.path,
        size=d.size,
        tile=d.tile,
        label_map=dict(d.label_map) if d.label_map else None,
        num_classes=d.num_classes,
        num_test=d.num_test,
        split_seed=d.split_seed,
        domain_column=d.domain_column,
        in_domain=d.in_domain,
        slice_axis=d.slice_axis,
        slices_per_volume=d.slices_per_volume,
        max_sources=d.max_sources,
    )


def sample_batch(data: D.LowData, items, seeds, step, role, batch_size, augment=None):
    """Host batch ``{"image": [S, B, ...], "label": [S, B, ...]}``; items[i] for seed i."""
    images, labels = [], []
    for seed, idx in zip(seeds, items, strict=True):
        rng = np.random.default_rng([seed, ROLES[role], step])
        pick = rng.choice(idx, batch_size, replace=len(idx) < batch_size)
        im, lb = data.images[pick], data.labels[pick]
        if augment is not None:
            pairs = [augment_patch(im[j], lb[j], rng, augment) for j in range(len(pick))]
            im = np.stack([p[0] for p in pairs]).astype(np.float32)
            lb = np.stack([p[1] for p in pairs]).astype(np.int32)
        images.append(im)
        labels.append(lb)
    return {"image": jnp.asarray(np.stack(images)), "label": jnp.asarray(np.stack(labels))}


class Runner:
    """Holds the data, models and compiled programs of one experiment directory."""

    def __init__(self, cfg: ml_collections.ConfigDict, out: str | pathlib.Path):
        self.cfg = cfg
        self.out = pathlib.Path(out)
        self.data = D.load_lowdata(data_spec(cfg), resolve_data_path(cfg.data.path))
        p = cfg.protocol
        unknown = sorted(set(p.arms) - set(A.ARMS))
        if unknown:
            raise ValueError(f"protocol.arms: unknown {unknown}; known {A.ARMS}")
        D.check_budget(self.data, p.budgets, p.val_fraction)
        self.seeds = tuple(int(s) for s in p.seeds)
        self.k = cfg.data.num_classes
        self.models = A.build_models(cfg, self.data.channels, self.k)
        self.opts = A.build_optimizers(cfg)
        self.options = TEST_COMPILER_OPTIONS if cfg.train.fast_compile else None
        size = cfg.data.size
        self.example = jnp.zeros((cfg.train.batch_size, size, size, self.data.channels))
        self.keys = jnp.stack([jax.random.key(s) for s in self.seeds])
        self._programs = {}
        self.predict = A.make_predict(self.models.segmenter, self.options)
        self.synthesize = A.make_synthesize(self.models.generator, self.options)

    # ------------------------------------------------------------------ programs
    def program(self, name: str) -> A.SeedProgram:
        if name not in self._programs:
            args = (self.example, self.k, self.options)
            if name == "plain":
                self._programs[name] = A.plain_program(self.models, self.opts, *args)
            else:
                self._programs[name] = A.genseg_program(
                    self.models, self.opts, self.cfg, name, *args
                )
        return self._programs[name]

    # ------------------------------------------------------------------ splits
    def splits(self, n: int) -> dict:
        nv = D.num_val(n, self.cfg.protocol.val_fraction)
        labelled = [self.data.labelled(s, n) for s in self.seeds]
        return {
            "all": labelled,
            "val": [x[:nv] for x in labelled],
            "train": [x[nv:] for x in labelled],
        }

    # ------------------------------------------------------------------ training
    def _train(self, program, state, steps, sampler, log, tag, log_offset=0):
        t = self.cfg.train
        timing = {"compile_s": 0.0, "train_s": 0.0, "log_s": 0.0}
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = program.step(state, sampler(i))
            if i == 0:
                jax.block_until_ready(metrics)
                timing["compile_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
            last = i == steps - 1
            want_log = (i + 1) % t.log_every == 0 or last
            want_grid = hasattr(state, "gen_params") and ((i + 1) % t.grid_every == 0 or last)
            if want_log or want_grid:
                jax.block_until_ready(metrics)
                t_log = time.perf_counter()
                if want_log:
                    log.metrics(log_offset + i + 1, tag, metrics, state)
                if want_grid:
                    log.grid(log_offset + i + 1, state)
                if i > 0:
                    timing["log_s"] += time.perf_counter() - t_log
        jax.block_until_ready(state)
        timing["train_s"] = time.perf_counter() - t0
        # seconds per step after the first (compiling) one, logging and grids excluded
        timing["s_per_step"] = (timing["train_s"] - timing["log_s"]) / max(steps - 1, 1)
        return state, timing

    def pretrain(self, n: int, log) -> tuple:
        sp = self.splits(n)
        prog = self.program("pretrain")
        state = prog.init(self.keys)
        t = self.cfg.train

        def sampler(i):
            return {
                "train": sample_batch(self.data, sp["train"], self.seeds, i, "train", t.batch_size)
            }

        return self._train(prog, state, t.pretrain_steps, sampler, log, "pretrain")

    def run_arm(self, arm: str, n: int, log, pretrained=None) -> dict:
        sp = self.splits(n)
        t = self.cfg.train
        augment = AugmentConfig() if arm == "baseline_aug" else None
        seg_role = "train" if arm in A.USES_VAL else "all"

        def sampler(i):
            batch = {
                "train": sample_batch(
                    self.data, sp[seg_role], self.seeds, i, "train", t.batch_size, augment
                )
            }
            if arm in A.USES_VAL:
                batch["val"] = sample_batch(
                    self.data, sp["val"], self.seeds, i, "val", t.batch_size
                )
            return batch

        if arm in A.GENERATOR_ARMS:
            prog = self.program(arm)
            state = jax.tree.map(jnp.copy, pretrained)
            offset = t.pretrain_steps
        else:
            prog = self.program("plain")
            state = prog.init(self.keys)
            offset = 0
        state, timing = self._train(prog, state, t.num_steps, sampler, log, arm, offset)
        result = {"arm": arm, "N": n, "seeds": list(self.seeds), **timing}
        result["num_val"] = len(sp["val"][0]) if arm in A.USES_VAL else 0
        result["num_seg_train"] = len(sp[seg_role][0])
        result.update(self.evaluate(prog.seg_params(state)))
        if hasattr(state, "arch"):
            result["alpha_softmax"] = _alpha_softmax(state.arch)
            result["counts"] = {k: np.asarray(v).tolist() for k, v in state.counts.items()}
            result["nonfinite_steps"] = np.asarray(state.nonfinite_steps).tolist()
        return result

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params) -> dict:
        out = {}
        for split in ("test", "ood"):
            idx = getattr(self.data, split)
            if len(idx) == 0:
                continue
            preds = self._predict_all(params, self.data.images[idx])
            scores = [D.dice_scores(p, self.data.labels[idx], self.k) for p in preds]
            out[f"dice_{split}"] = [float(np.nanmean(s)) for s in scores]
            out[f"num_{split}"] = len(idx)
        return out

    def _predict_all(self, params, images):
        bs = self.cfg.train.eval_batch
        chunks = []
        for lo in range(0, len(images), bs):
            chunk = images[lo : lo + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            chunks.append(np.asarray(self.predict(params, jnp.asarray(chunk)))[:, : bs - pad])
        return np.concatenate(chunks, axis=1)

    # ------------------------------------------------------------------ driver
    def run(self) -> list[dict]:
        p = self.cfg.protocol
        results = []
        for n in p.budgets:
            pretrained = None
            for arm in p.arms:
                path = self.out / "results" / f"{arm}_N{n}.json"
                if path.exists():
                    results.append(json.loads(path.read_text()))
                    print(f"[lowdata] {arm} N={n}: done before, skipped", flush=True)
                    continue
                log = report.RunLog(self, arm, n)
                if arm in A.GENERATOR_ARMS and pretrained is None:
                    pre_log = report.RunLog(self, "pretrain", n)
                    pretrained, pre_timing = self.pretrain(n, pre_log)
                    print(f"[lowdata] pretrain N={n}: {pre_timing}", flush=True)
                result = self.run_arm(arm, n, log, pretrained)
                write_json_atomic(path, result)
                results.append(result)
                print(
                    f"[lowdata] {arm} N={n}: test Dice {np.round(result['dice_test'], 3)} "
                    f"({result['train_s']:.0f} s + compile {result['compile_s']:.0f} s)",
                    flush=True,
                )
        report.write_reports(self.out, self.cfg, results)
        return results


def _alpha_softmax(arch) -> dict:
    return {
        k: np.asarray(jax.nn.softmax(v, -1), np.float64).round(4).tolist() for k, v in arch.items()
    }


def check_out_dir(cfg: ml_collections.ConfigDict, out: pathlib.Path) -> None:
    """A results directory belongs to one config: refuse to mix results of two."""
    path = out / "config.json"
    text = cfg.to_json(indent=1, sort_keys=True)
    if path.exists() and path.read_text() != text and (out / "results").exists():
        raise SystemExit(
            f"{path}: this directory holds results of a different config; use a new --out "
            "(or delete it) to run this one"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("config.json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_lowdata(cfg: ml_collections.ConfigDict, out: str | pathlib.Path) -> list[dict]:
    """Run (or resume) the whole experiment; returns one result dict per (arm, N)."""
    out = pathlib.Path(out)
    check_out_dir(cfg, out)
    return Runner(cfg, out).run()


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("out", None, "Experiment directory (resumable).", required=True)
    config_flags.DEFINE_config_file("config", None, "Low-data config file.", lock_config=True)

    def _main(_):
        from unetjax.training.loop import enable_compilation_cache

        enable_compilation_cache()
        run_lowdata(flags.FLAGS.config, flags.FLAGS.out)
        print(f"[lowdata] tables in {flags.FLAGS.out}/table.md", flush=True)

    app.run(_main, argv or sys.argv)


if __name__ == "__main__":
    main()
