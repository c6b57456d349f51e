import pytest

from landmark_unet.data.splits import load_split, make_split, save_split
from landmark_unet.errors import InputError

NAMES = [f"sub{i:03d}" for i in range(50)]


def test_study_rounds_are_40_train_10_test_and_cover_every_subject_once():
    tested = []
    for r in range(5):
        s = make_split(NAMES, rounds=5, round=r, val_fraction=0.15, seed=3)
        assert len(s["test"]) == 10
        assert len(s["train"]) + len(s["val"]) == 40
        assert len(s["val"]) == 6  # 15 % of 40
        assert not (set(s["train"]) & set(s["val"])) and not (set(s["train"]) & set(s["test"]))
        assert not (set(s["val"]) & set(s["test"]))
        tested += s["test"]
    assert sorted(tested) == NAMES


def test_seeded_and_order_independent():
    a = make_split(NAMES, round=1, seed=7)
    b = make_split(list(reversed(NAMES)), round=1, seed=7)
    c = make_split(NAMES, round=1, seed=8)
    assert a == b
    assert a != c


def test_round_trip(tmp_path):
    s = make_split(NAMES, round=2)
    save_split(tmp_path / "splits.json", s, round=2)
    assert {k: v for k, v in load_split(tmp_path / "splits.json").items() if k in s} == s


@pytest.mark.parametrize("kwargs,key", [
    ({"rounds": 1}, "data.split.rounds"),
    ({"round": 5}, "data.split.round"),
    ({"val_fraction": 1.0}, "data.split.val_fraction"),
])
def test_bad_split_settings_name_the_key(kwargs, key):
    with pytest.raises(InputError, match=key):
        make_split(NAMES, **kwargs)


@pytest.mark.parametrize("text, problem", [('["a", "b"]', "found a list"), ('{"train": ["a"]}', "no 'test' list"),
                                           ("{train", "cannot read")])
def test_a_malformed_splits_file_is_named(tmp_path, text, problem):
    from landmark_unet.data.splits import load_split
    from landmark_unet.errors import InputError

    path = tmp_path / "splits.json"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        load_split(path)
    assert err.value.where == str(path)
