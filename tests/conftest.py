"""Shared fixtures. Everything here is generated; tests that read ../shared/media use `media()`,
which skips cleanly on a fresh clone without it."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", "/tmp/numba-cache")

MEDIA = ROOT.parent / "shared" / "media"


def media(name):
    """Path of a real test clip in ../shared/media, or skip the test when it is absent."""
    p = MEDIA / name
    if not p.is_file():
        pytest.skip(f"{p} not present (real media lives outside the repository)")
    return p


@pytest.fixture(scope="session")
def synthetic_clip(tmp_path_factory):
    """A 6 s synthetic talking clip (astronaut face, speech-like audio, jaw follows loudness)."""
    import synthetic
    return synthetic.make_talking_clip(tmp_path_factory.mktemp("clip") / "talk.mp4", seconds=6.0, seed=1)


@pytest.fixture(scope="session")
def tiny_dataset(synthetic_clip, tmp_path_factory):
    """The synthetic clip processed by process.py: dataset/<name> under a temp data root."""
    import process
    root = tmp_path_factory.mktemp("data")
    cfg = process.Config(video=str(synthetic_clip), name="tiny", data_root=str(root))
    return process.main(cfg)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
