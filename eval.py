"""Evaluate a trained workdir's best checkpoint with Gaussian sliding-window inference.

python eval.py --workdir runs/default                 # test split
python eval.py --workdir runs/default --split val --tta
python eval.py --workdir runs/default --data /other/folder   # predict (and score) a folder

Trust analyses (docs/TRUST.md) instead of the plain evaluation, any combination; results and
one ``report.html`` under ``workdir/trust/<split>/``:

python eval.py --workdir runs/default --robustness --calibration --uncertainty --explain
python eval.py --workdir runs/nuclei_ood --uncertainty --uncertainty_mode=mc_dropout
    --uncertainty_samples=16 --groups=configs/splits/nuclei_fluorescence_ood.json
"""

import logging
import pathlib
import shlex
import sys

from unetjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts: the plain evaluation shards tiles over them

from absl import app, flags
from absl import logging as absl_logging

from unetjax.evaluation import evaluate_workdir, format_summary

flags.DEFINE_string("workdir", "runs/default", "A training workdir.")
flags.DEFINE_enum("split", "test", ["test", "val", "train", "all"], "Cases to evaluate.")
flags.DEFINE_string("data", None, "Another dataset folder: predict all its cases.")
flags.DEFINE_bool("tta", None, "Mirror test-time augmentation (default: config.eval.mirror_tta).")

flags.DEFINE_bool("robustness", False, "Dice vs severity for every corruption (trust report).")
flags.DEFINE_bool("calibration", False, "ECE before/after temperature scaling fitted on val.")
flags.DEFINE_bool("uncertainty", False, "Uncertainty maps, overlays and per-case scores.")
flags.DEFINE_bool("explain", False, "Integrated gradients and Grad-CAM on one patch per case.")
flags.DEFINE_integer("max_cases", 0, "Cap on cases for the trust analyses (evenly spaced).")
flags.DEFINE_integer("robustness_cases", 16, "Further cap for --robustness (0 = no cap).")
flags.DEFINE_string("groups", None, "JSON {'groups': {name: [case ids]}}: per-group results.")
flags.DEFINE_list("corruptions", [], "Corruptions to run (default: all that fit the data).")
flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "Corruption severities (1..5).")
flags.DEFINE_integer("seed", 0, "Seed of corruptions and uncertainty sampling.")
flags.DEFINE_enum("uncertainty_mode", "tta", ["tta", "mc_dropout"], "Sampling for uncertainty.")
flags.DEFINE_integer("uncertainty_samples", 0, "Samples (0: every mirroring for TTA).")
flags.DEFINE_float("uncertainty_affine", 0.0, "Random affine amplitude per TTA sample.")
flags.DEFINE_integer("explain_cases", 3, "Cases to explain (evenly spaced over the split).")
flags.DEFINE_integer("explain_class", 1, "Class whose predicted region is explained.")
flags.DEFINE_integer("ig_steps", 128, "Integrated-gradients path steps.")
flags.DEFINE_float("ig_blur_sigma", 5.0, "Sigma (voxels) of the blurred-image IG baseline.")
flags.DEFINE_integer("gradcam_level", 2, "Decoder level for Grad-CAM (0 = full resolution).")
flags.DEFINE_string("docs_dir", None, "Also copy summary figures/tables and a few examples here.")

TRUST_FLAGS = ("robustness", "calibration", "uncertainty", "explain")


def run_trust(f) -> None:
    from unetjax.trained import case_ids_for, load_trained
    from unetjax.trust import run

    logging.getLogger("unetjax").setLevel(logging.INFO)
    t = load_trained(f.workdir, f.data)
    case_ids, name = case_ids_for(t, f.split, f.data)
    groups = run.load_groups(f.groups, case_ids)
    tta = t.exp.config.eval.mirror_tta if f.tta is None else f.tta
    cases = run.spread(case_ids, f.max_cases)
    out = pathlib.Path(f.workdir) / "trust" / name
    print(f"checkpoint step {t.step}; {len(cases)} of {len(case_ids)} cases of {name} -> {out}")
    if f.robustness:
        run.run_robustness(
            t,
            run.spread(cases, f.robustness_cases),
            out / "robustness",
            corruptions=f.corruptions or None,
            severities=[int(s) for s in f.severities],
            seed=f.seed,
            tta=tta,
            groups=groups,
        )
        print((out / "robustness" / "robustness.md").read_text())
    if f.calibration:
        c = run.run_calibration(t, cases, out / "calibration", tta=tta, groups=groups)
        print(f"temperature {c['temperature']:.3f} (fitted on {c['val_cases']} val cases)")
        print((out / "calibration" / "calibration.md").read_text())
    if f.uncertainty:
        u = run.run_uncertainty(
            t,
            cases,
            out / "uncertainty",
            mode=f.uncertainty_mode,
            num_samples=f.uncertainty_samples or None,
            affine=f.uncertainty_affine,
            seed=f.seed,
            groups=groups,
        )
        print(f"spearman(score, dice) = {u['spearman_score_vs_dice']:.3f}; per group:")
        for g, v in u["groups"].items():
            print(f"  {g}: {v}")
    if f.explain:
        e = run.run_explain(
            t,
            run.spread(cases, f.explain_cases),
            out / "explain",
            target_class=f.explain_class,
            steps=f.ig_steps,
            level=f.gradcam_level,
            sigma=f.ig_blur_sigma,
        )
        for row in e["cases"]:
            print({k: v for k, v in row.items() if k != "maps"})
    command = "python eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"workdir": f.workdir, "step": t.step, "split": name, "command": command}
    page = run.write_report(out, meta)
    print(f"report: {page}")
    if f.docs_dir:
        for p in run.export_figures(out, pathlib.Path(f.docs_dir)):
            print(f"copied {p} ({p.stat().st_size // 1024} KB)")


def main(argv):
    del argv
    f = flags.FLAGS
    if any(getattr(f, k) for k in TRUST_FLAGS):
        run_trust(f)
        return
    result = evaluate_workdir(f.workdir, f.split, f.data, f.tta)
    print(
        f"{result['num_cases']} cases predicted, {result['num_scored']} scored "
        f"(checkpoint step {result['checkpoint_step']}) -> {result['out_dir']}"
    )
    if result["summary"]:
        print(format_summary(result["summary"]))


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    app.run(main)
