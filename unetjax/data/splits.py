"""Train/val/test splits (``docs/DATA_API.md``).

* :func:`make_split`: ``np.random.default_rng(seed).permutation`` of the sorted case ids;
  test takes the first ``round(test_fraction * n)`` ids of that order, val the next
  ``round(val_fraction * n)``, train the rest (in permutation order, which is the training
  order). A non-zero fraction gets at least one case; train must keep at least one.
  ``val``/``test`` lists are sorted.
* :func:`load_split`: a JSON object with lists ``train``, ``val``, ``test`` of case-id
  strings; unknown ids, duplicates, overlaps, missing keys or an empty train list raise
  :class:`DataError` naming the file. Other keys are ignored.
* :func:`resolve_split`: an explicit ``split_file`` (its train ids reordered by the seeded
  permutation, so ``num_train`` takes a seeded subset), else :func:`make_split`; then
  ``train`` is cut to its first ``num_train`` ids (0 = all). The full split, the used train
  ids and the settings go to ``workdir/split.json``; when that file exists it is reused
  (resume), and it must agree with an explicit ``split_file``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from unetjax.data.errors import DataError

__all__ = ["SPLIT_FILE", "load_split", "make_split", "resolve_split"]

SPLIT_FILE = "split.json"
_KEYS = ("train", "val", "test")


def _n_for(fraction: float, n: int) -> int:
    if fraction <= 0:
        return 0
    return max(1, int(round(fraction * n)))


def _seeded_order(ids: Sequence[str], seed: int) -> list[str]:
    ids = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in perm]


def make_split(
    case_ids: Sequence[str], *, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Seeded split; ``train`` in the seeded (training) order, ``val``/``test`` sorted."""
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("case_ids contain duplicates")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= float(f) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    n = len(ids)
    n_test, n_val = _n_for(float(test_fraction), n), _n_for(float(val_fraction), n)
    if n - n_test - n_val < 1:
        raise DataError(
            f"too few cases ({n}) for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: no training case would be left"
        )
    order = _seeded_order(ids, int(seed))
    return {
        "train": order[n_test + n_val :],
        "val": sorted(order[n_test : n_test + n_val]),
        "test": sorted(order[:n_test]),
    }


def _validate_split(obj, case_ids: Sequence[str], where: str) -> dict[str, list[str]]:
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with keys {list(_KEYS)}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise DataError(f"{where}: missing keys {missing} (need {list(_KEYS)})")
    known = set(map(str, case_ids))
    out: dict[str, list[str]] = {}
    for k in _KEYS:
        v = obj[k]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(f"{where}: {k!r} must be a list of case-id strings")
        if len(set(v)) != len(v):
            dup = sorted({x for x in v if v.count(x) > 1})
            raise DataError(f"{where}: duplicate ids in {k!r}: {dup[:10]}")
        unknown = [x for x in v if x not in known]
        if unknown:
            raise DataError(
                f"{where}: unknown case ids in {k!r}: {unknown[:10]}"
                + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
            )
        out[k] = list(v)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(out[a]) & set(out[b]))
        if both:
            raise DataError(f"{where}: overlap between {a!r} and {b!r}: {both[:10]}")
    if not out["train"]:
        raise DataError(f"{where}: empty 'train' list")
    return out


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found (missing)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable split file (invalid JSON: {exc})") from exc


def load_split(path: str | os.PathLike, case_ids: Sequence[str]) -> dict[str, list[str]]:
    """Reads and validates a JSON split file; returns ``{"train", "val", "test"}``."""
    path = pathlib.Path(path).expanduser()
    return _validate_split(_read_json(path), case_ids, str(path))


def _get(cfg, key: str, default=None):
    """Key/attribute access for dicts, ml_collections ConfigDicts and plain objects."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except TypeError:
            pass
    return getattr(cfg, key, default)


def _write_json_atomic(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resolve_split(workdir: str | os.PathLike, case_ids: Sequence[str], config_data) -> dict:
    """The split to use: ``{"train": used train ids, "val": [...], "test": [...]}``.

    ``config_data`` (dict, ConfigDict or object) provides ``split_file`` (str, None or
    ''), ``seed``, ``val_fraction``, ``test_fraction`` and ``num_train`` (0 = all).
    """
    workdir = pathlib.Path(workdir).expanduser()
    split_file = _get(config_data, "split_file", None) or None
    seed = int(_get(config_data, "seed", 0) or 0)
    val_fraction = float(_get(config_data, "val_fraction", 0.0) or 0.0)
    test_fraction = float(_get(config_data, "test_fraction", 0.0) or 0.0)
    num_train = int(_get(config_data, "num_train", 0) or 0)
    if num_train < 0:
        raise ValueError(f"num_train must be >= 0, got {num_train}")

    explicit = None
    if split_file is not None:
        explicit = load_split(split_file, case_ids)
        explicit["train"] = _seeded_order(explicit["train"], seed)

    saved_path = workdir / SPLIT_FILE
    if saved_path.exists():
        saved = _read_json(saved_path)
        full = _validate_split(saved, case_ids, str(saved_path))
        if explicit is not None:
            for k in _KEYS:
                if set(full[k]) != set(explicit[k]):
                    raise DataError(
                        f"{saved_path}: contradicts the split file {split_file} "
                        f"({k!r} differs); use a fresh workdir or the same split file"
                    )
        settings = {
            k: saved[k] for k in ("seed", "val_fraction", "test_fraction", "source") if k in saved
        }
    elif explicit is not None:
        full = explicit
        source = str(pathlib.Path(split_file).expanduser().resolve())
        settings = {"seed": seed, "source": source}
    else:
        full = make_split(
            case_ids, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
        settings = {
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "source": "seeded",
        }

    if num_train > len(full["train"]):
        raise DataError(f"num_train={num_train} exceeds the {len(full['train'])} training cases")
    train = full["train"][:num_train] if num_train > 0 else list(full["train"])
    record = {
        "train": full["train"],
        "val": full["val"],
        "test": full["test"],
        "train_used": train,
        "num_train": num_train,
        **settings,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(saved_path, record)
    return {"train": train, "val": list(full["val"]), "test": list(full["test"])}
