"""Seeded and explicit train/val/test splits, num_train, workdir/split.json (resume)."""

import json

import ml_collections
import pytest

from unetjax.data.errors import DataError
from unetjax.data.splits import load_split, make_split, resolve_split

IDS = [f"{i:03d}" for i in range(20)]


def _cfg(**kw):
    base = {
        "split_file": None,
        "seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.1,
        "num_train": 0,
    }
    base.update(kw)
    return base


def test_make_split_deterministic_and_disjoint():
    a = make_split(IDS, seed=3, val_fraction=0.2, test_fraction=0.1)
    b = make_split(list(reversed(IDS)), seed=3, val_fraction=0.2, test_fraction=0.1)
    assert a == b  # depends on the seed, not on the input order
    assert make_split(IDS, seed=4, val_fraction=0.2, test_fraction=0.1) != a
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 4, 2)
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert set.union(*sets) == set(IDS)
    assert sum(map(len, sets)) == len(IDS)
    assert a["train"] != sorted(a["train"])  # seeded training order


def test_make_split_minimum_one_and_zero_fractions():
    s = make_split(IDS[:5], seed=0, val_fraction=0.05, test_fraction=0.0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (4, 1, 0)
    with pytest.raises(DataError, match="too few cases"):
        make_split(IDS[:2], seed=0, val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ValueError):
        make_split(IDS, seed=0, val_fraction=1.5, test_fraction=0.0)


def test_num_train_prefix(tmp_path):
    full = make_split(IDS, seed=7, val_fraction=0.2, test_fraction=0.1)
    s3 = resolve_split(tmp_path / "a", IDS, _cfg(seed=7, num_train=3))
    s5 = resolve_split(tmp_path / "b", IDS, _cfg(seed=7, num_train=5))
    assert s3["train"] == full["train"][:3]
    assert s5["train"][:3] == s3["train"]
    assert s3["val"] == s5["val"] == full["val"]
    assert resolve_split(tmp_path / "c", IDS, _cfg(seed=7))["train"] == full["train"]
    with pytest.raises(DataError, match="num_train"):
        resolve_split(tmp_path / "d", IDS, _cfg(num_train=100))


def test_split_json_written_and_reused(tmp_path):
    first = resolve_split(tmp_path, IDS, _cfg(seed=1, num_train=4))
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["train_used"] == first["train"]
    assert saved["train"][:4] == first["train"] and len(saved["train"]) == 14
    assert saved["val"] == first["val"] and saved["test"] == first["test"]
    # Resume: the saved split wins over a changed seed.
    again = resolve_split(tmp_path, IDS, _cfg(seed=99, num_train=4))
    assert again == first
    assert json.loads((tmp_path / "split.json").read_text())["seed"] == 1


def test_config_dict_and_attribute_access(tmp_path):
    cfg = ml_collections.ConfigDict(_cfg(seed=2, num_train=3, split_file=""))
    a = resolve_split(tmp_path / "a", IDS, cfg)
    b = resolve_split(tmp_path / "b", IDS, _cfg(seed=2, num_train=3))
    assert a == b


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_explicit_split_file(tmp_path):
    path = _write(
        tmp_path / "my_split.json", {"train": IDS[:12], "val": IDS[12:16], "test": IDS[16:]}
    )
    s = resolve_split(tmp_path / "run", IDS, _cfg(split_file=str(path), num_train=5))
    assert s["val"] == IDS[12:16] and s["test"] == IDS[16:]
    assert len(s["train"]) == 5 and set(s["train"]) <= set(IDS[:12])
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(saved["train"]) == IDS[:12]
    # Resume with the same file is fine; a contradicting file is refused.
    assert resolve_split(tmp_path / "run", IDS, _cfg(split_file=str(path), num_train=5)) == s
    other = _write(tmp_path / "other.json", {"train": IDS[:10], "val": IDS[10:16], "test": []})
    with pytest.raises(DataError, match="contradicts"):
        resolve_split(tmp_path / "run", IDS, _cfg(split_file=str(other)))


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"train": ["000", "zzz"], "val": [], "test": []}, "unknown case ids"),
        ({"train": ["000", "001"], "val": ["001"], "test": []}, "overlap"),
        ({"train": ["000"], "val": []}, "missing keys"),
        ({"train": [], "val": ["000"], "test": []}, "empty 'train'"),
        ({"train": [0, 1], "val": [], "test": []}, "strings"),
        ({"train": ["000", "000"], "val": [], "test": []}, "duplicate"),
        (["000"], "JSON object"),
    ],
)
def test_load_split_validation(tmp_path, content, needle):
    path = _write(tmp_path / "bad_split.json", content)
    with pytest.raises(DataError, match=needle) as info:
        load_split(path, IDS)
    assert "bad_split.json" in str(info.value)


def test_load_split_unreadable(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_split(tmp_path / "broken.json", IDS)
    with pytest.raises(DataError, match="missing"):
        load_split(tmp_path / "absent.json", IDS)
