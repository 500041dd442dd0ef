"""probe_features.py: a linear read-out of the mouth opening from audio features, fitted on one
toy clip, follows the opening of another clip whose lips part with its loudness, and not that of a
clip whose lips move at random."""
import shutil

import numpy as np
import pytest

import probe_features as pf
from test_syncnet import add_toy_landmarks, make_toy_dataset
from utils import UserError


def test_readout_follows_another_clip_and_not_a_random_mouth(tmp_path):
    make_toy_dataset(tmp_path / "data", "anna", seed=0)
    bob = make_toy_dataset(tmp_path / "data", "bob", seed=1)        # other audio, the same loudness -> lips rule
    rand = tmp_path / "data" / "rand"
    shutil.copytree(bob, rand)                                      # bob's audio, lips that ignore it
    add_toy_landmarks(rand, np.random.default_rng(2).uniform(2, 42, 200))
    rows = pf.main(pf.Config(name="anna", data_root=str(tmp_path / "data"), raw="mel", on=f"{bob},{rand}",
                             ridge="10,1000", threads=1))
    assert [row["ridge"] for row in rows] == [10.0, 1000.0]
    for row in rows:
        assert row["r"]["anna"] > 0.8, row                          # fitted on it
        assert row["r"]["bob"] > 0.7, row                           # carries over to another clip
        assert abs(row["r"]["rand"]) < 0.3, row                     # a mouth the audio does not drive
        assert row["mean_on"] == pytest.approx((row["r"]["bob"] + row["r"]["rand"]) / 2)


def test_bad_arguments_are_one_line(tmp_path):
    make_toy_dataset(tmp_path / "data", "anna")
    with pytest.raises(UserError, match="either --syncnet"):
        pf.main(pf.Config(name="anna", data_root=str(tmp_path / "data"), on=str(tmp_path / "data" / "anna")))
    with pytest.raises(UserError, match="--raw wav2vec"):
        pf.main(pf.Config(name="anna", data_root=str(tmp_path / "data"), raw="wav2vec", on=str(tmp_path / "data" / "anna")))
    with pytest.raises(UserError, match="not a processed dataset"):
        pf.main(pf.Config(name="anna", data_root=str(tmp_path / "data"), raw="mel", on=str(tmp_path / "nowhere")))
