"""bench_gpu.py: a dataset packed here, rebuilt and trained where neither dlib nor ffmpeg nor the
speech models exist, and the weights brought back in pieces as the checkpoint training wrote."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench_gpu
import syncnet_328 as sn
import utils
from conftest import ROOT
from unet_328 import AudioEncoder

# what the lent GPU machine lacks: importing any of these there fails, so the train action must not need them
ABSENT = ("dlib", "face_recognition_models", "librosa", "soundfile", "imageio_ffmpeg", "openwakeword",
          "onnxruntime", "openvino", "face_alignment")


@pytest.fixture(scope="module")
def featured(tiny_dataset, tmp_path_factory):
    """A copy of the processed synthetic clip with features from an audio encoder (mel source)."""
    tmp = tmp_path_factory.mktemp("bench_gpu")
    shutil.copytree(tiny_dataset, tmp / "data" / "tiny")
    torch.manual_seed(0)
    enc = AudioEncoder().eval()
    torch.save({k[len("audio_encoder."):]: v for k, v in enc.state_dict().items()}, tmp / "encoder.pth")
    sn.main(sn.Config(name="tiny", data_root=str(tmp / "data"), ckpt_root=str(tmp / "ck"), features_only=True,
                      reference_encoder=str(tmp / "encoder.pth"), device="cpu"))
    return tmp


def test_pack_train_where_the_setup_is_missing_and_unpack(featured, capsys):
    tmp, ds = featured, featured / "data" / "tiny"
    out = bench_gpu.main(bench_gpu.Config(action="pack", dataset=str(ds), pack=str(tmp / "pack")))
    carried = {p.name for p in out.iterdir()}
    assert utils.CROPS not in carried and "frames" not in carried                 # the crops do not travel
    assert sum((out / f).stat().st_size for f in carried) < (ds / utils.CROPS).stat().st_size
    info = json.loads((out / bench_gpu.PACK_INFO).read_text())
    assert info["encoder_id"] == json.loads((ds / utils.AUD_FEAT_INFO).read_text())["encoder_id"]

    block = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ABSENT) + \
        f"sys.path.insert(0, {str(ROOT)!r})\nimport runpy\nsys.argv = ['bench_gpu.py'] + sys.argv[1:]\n" \
        f"runpy.run_path({str(ROOT / 'bench_gpu.py')!r}, run_name='__main__')\n"
    r = subprocess.run([sys.executable, "-c", block, "train", "--pack", str(tmp / "pack"), "--out", str(tmp / "back"),
                        "--work", str(tmp / "work"), "--steps", "2", "--widths", "4,4,8,8,16,16", "--batch_size", "2",
                        "--device", "cpu", "--num_workers", "0"], capture_output=True, text=True, cwd=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    rebuilt = np.load(tmp / "work" / "data" / "tiny" / utils.CROPS)
    own = np.load(ds / utils.CROPS)
    assert rebuilt.shape == own.shape and np.abs(rebuilt.astype(np.int16) - own).mean() < 0.5   # process.py's pixels
    man = json.loads((tmp / "back" / bench_gpu.MANIFEST).read_text())
    assert man["steps"] == 2 and man["samples_per_s"] > 0 and man["rebuild"]["mean_abs"] < 0.5
    assert all((tmp / "back" / p).stat().st_size <= bench_gpu.PART_BYTES for p in man["parts"])

    ck = bench_gpu.main(bench_gpu.Config(action="unpack", pack=str(tmp / "pack"), parts=str(tmp / "back"),
                                         out=str(tmp / "gpu" / "last.pth")))
    mine, theirs = utils.load_checkpoint(ck), utils.load_checkpoint(tmp / "work" / "run" / utils.LAST)
    for key in ("model", "audio_encoder"):                                       # the weights, bit for bit
        assert mine[key].keys() == theirs[key].keys()
        assert all(torch.equal(mine[key][k], theirs[key][k]) for k in theirs[key])
    assert "optimizer" not in mine and "train_model" not in mine and mine["step"] == 2
    assert "held-out tail of 15 frames" in capsys.readouterr().out       # the guidance fit ran here, on the dataset's tail
    import inference_328
    assert inference_328.LipSyncModel(ck, "cpu").widths == (4, 4, 8, 8, 16, 16)


def test_damaged_or_missing_pieces_are_refused(featured, tmp_path):
    bench_gpu.main(bench_gpu.Config(action="pack", dataset=str(featured / "data" / "tiny"), pack=str(tmp_path / "pack")))
    parts = tmp_path / "back"
    parts.mkdir()
    data = b"not a model" * 1000
    (parts / "model.part00").write_bytes(data[:5000])
    (parts / "model.part01").write_bytes(data[5000:])
    man = dict(parts=["model.part00", "model.part01"], bytes=len(data), sha256="0" * 64)
    (parts / bench_gpu.MANIFEST).write_text(json.dumps(man))
    cfg = bench_gpu.Config(action="unpack", pack=str(tmp_path / "pack"), parts=str(parts), out=str(tmp_path / "x.pth"))
    with pytest.raises(utils.UserError, match="do not add up"):
        bench_gpu.main(cfg)
    (parts / "model.part01").unlink()
    with pytest.raises(utils.UserError, match="lacks model.part01"):
        bench_gpu.main(cfg)
    assert not (tmp_path / "x.pth").exists()


def test_pack_refuses_a_folder_without_features(tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset, tmp_path / "bare")
    for f in (utils.AUD_FEAT, utils.AUD_FEAT_INFO):
        (tmp_path / "bare" / f).unlink(missing_ok=True)
    with pytest.raises(utils.UserError, match="syncnet_328.py"):
        bench_gpu.main(bench_gpu.Config(action="pack", dataset=str(tmp_path / "bare"), pack=str(tmp_path / "pack")))
    assert not (tmp_path / "pack" / "bare").exists()
    with pytest.raises(utils.UserError, match="pack --dataset"):
        bench_gpu.main(bench_gpu.Config(action="train", pack=str(tmp_path / "pack"), out=str(tmp_path / "o")))


def test_a_run_past_its_deadline_still_ships_what_it_has(featured, tmp_path, monkeypatch):
    """The device call returns nothing once it is killed: the safety net stops training, saves and ships."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))                      # where the work folder goes
    ds = shutil.copytree(featured / "data" / "tiny", tmp_path / "data" / "tiny")
    bench_gpu.main(bench_gpu.Config(action="pack", dataset=str(ds), pack=str(tmp_path / "pack")))
    figures = bench_gpu.main(bench_gpu.Config(
        action="train", pack=str(tmp_path / "pack"), out=str(tmp_path / "back"), steps=500, widths="4,4,8,8,16,16",
        batch_size=2, device="cpu", num_workers=0, deadline_s=1e-3))
    man = json.loads((tmp_path / "back" / bench_gpu.MANIFEST).read_text())
    assert figures["stopped"] and man["stopped"] and 1 <= man["steps"] < 500
    ck = bench_gpu.main(bench_gpu.Config(action="unpack", pack=str(tmp_path / "pack"), parts=str(tmp_path / "back"),
                                         out=str(tmp_path / "last.pth"), fit_guidance=False))
    assert utils.load_checkpoint(ck)["step"] == man["steps"]
    info = json.loads((ds / utils.AUD_FEAT_INFO).read_text())                  # the dataset's features replaced since
    (ds / utils.AUD_FEAT_INFO).write_text(json.dumps(dict(info, encoder_id="000000000000")))
    with pytest.raises(utils.UserError, match="no longer the packed ones"):     # the fit would read the wrong features
        bench_gpu.main(bench_gpu.Config(action="unpack", pack=str(tmp_path / "pack"), parts=str(tmp_path / "back"),
                                        out=str(tmp_path / "again.pth")))
    assert not list(tmp_path.glob("bench_gpu-*")) and man["train_s"] > 0         # no --work: its temp folder is gone
