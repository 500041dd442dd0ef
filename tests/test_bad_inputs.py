"""Bad or damaged inputs, as a user meets them on the command line: each ends with exit code 2,
one `error:` line as the LAST line, naming the file and the command that fixes it, no traceback,
and nothing half-written left behind. (The first part of a sweep; process.py's bad videos are in
test_process.py, inference's bad audio in test_inference.py, the server's in test_server.py.)"""
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import media_io
import synthetic
import utils
from conftest import ROOT


def run(script, *args):
    r = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    return r.returncode, (lines[-1] if lines else ""), r.stderr


@pytest.fixture
def fake_root(tmp_path):
    synthetic.write_fake_dataset(tmp_path / "data" / "fake", n=40)
    return tmp_path


def train(root, *extra):
    return run("train_328.py", "--name", "fake", "--data_root", root / "data", "--ckpt_root", root / "ck",
               "--widths", "4,4,8,8,16,16", "--batch_size", "2", "--max_steps", "2", "--device", "cpu",
               "--num_workers", "0", *extra)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage,expect", [
    (lambda d: truncate(d / "crops.npy"), "crops.npy is damaged"),
    (lambda d: truncate(d / "aud_feat.npy"), "aud_feat.npy is damaged"),
    (lambda d: (d / "meta.json").write_text('{"frames": 4'), "meta.json is damaged"),
    (lambda d: truncate(d / "landmarks.npz", 0.3), "landmarks.npz is damaged"),
])
def test_damaged_dataset_files_name_the_file_and_the_fix(fake_root, damage, expect):
    damage(fake_root / "data" / "fake")
    rc, last, err = train(fake_root)
    assert rc == 2 and last.startswith("error:") and expect in last and "Traceback" not in err, err
    fix = "syncnet_328.py --name fake --features_only" if "aud_feat" in expect else "process.py"
    assert fix in last
    assert not (fake_root / "ck" / "fake" / "last.pth").exists()


@pytest.mark.parametrize("args,expect", [
    (("--batch_size", "0"), "error: --batch_size 0: must be >= 1"),
    (("--max_steps", "-5"), "error: --max_steps -5: must be >= 0"),
    (("--lr", "0"), "error: --lr 0.0: must be > 0"),
    (("--held_out", "0.9"), "error: --held_out 0.9: must be >= 0 and <= 0.5"),
])
def test_numeric_settings_out_of_range_are_refused(fake_root, args, expect):
    rc, last, err = train(fake_root, *args)
    assert rc == 2 and last == expect and "Traceback" not in err
    assert not (fake_root / "ck").exists()


def test_guidance_fit_says_which_step_is_missing(fake_root):
    data, ck = ("--data_root", fake_root / "data"), ("--ckpt_root", fake_root / "ck")
    for args, expect in (((), "no avatar given: python guidance_fit.py --name NAME"),
                         (("--name", "nosuch", *data), "run python process.py --name nosuch first"),
                         (("--name", "fake", *data, *ck), "run python train_328.py --name fake first"),
                         (("--name", "fake", *data, "--checkpoint", fake_root / "no.pth"), "checkpoint not found")):
        rc, last, err = run("guidance_fit.py", *args)
        assert rc == 2 and last.startswith("error:") and expect in last and "Traceback" not in err, err


def test_syncnet_on_a_truncated_crop_cache(fake_root):
    d = fake_root / "data" / "fake"
    media_io.write_wav(d / "aud.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 40 * utils.SR // utils.FPS).astype(np.float32))
    truncate(d / "crops.npy")
    rc, last, err = run("syncnet_328.py", "--name", "fake", "--data_root", fake_root / "data", "--ckpt_root",
                        fake_root / "ck", "--max_steps", "2", "--device", "cpu")
    assert rc == 2 and "crops.npy is damaged" in last and "Traceback" not in err, err
    shutil.rmtree(fake_root / "ck", ignore_errors=True)


def test_a_bare_resume_continues_or_starts(fake_root):
    rc, _, err = train(fake_root, "--resume")                     # nothing to continue: a new run
    assert rc == 0, err
    rc, _, err = train(fake_root, "--max_steps", "3", "--resume")  # continues the 2 steps
    assert rc == 0 and "resumed from step 2" in (fake_root / "ck" / "fake" / "log.txt").read_text(), err


def test_ctrl_c_during_process_leaves_no_dataset_behind(synthetic_clip, tmp_path):
    """SIGINT in each phase (imports, frames + landmarks, crops) at a random moment within it: either
    a complete dataset or nothing -- never a half-written dataset or a temp folder that keeps filling.
    The moment is found from the progress lines, not from wall time, so a fast or slow machine
    interrupts the same phases."""
    rng = random.Random(0)
    interrupted = 0
    phases = [None, "frames+landmarks", "crops"] * 3
    for k, phase in enumerate(phases):
        root = tmp_path / f"r{k}"
        root.mkdir()
        p = subprocess.Popen([sys.executable, "process.py", str(synthetic_clip), "--name", "x", "--data_root", str(root)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # a background CI job ignores SIGINT
        err = b""
        if phase is None:
            time.sleep(rng.uniform(0.1, 1.0))
        else:
            while phase.encode() not in err and p.poll() is None:
                err += p.stderr.read1(4096)
            time.sleep(rng.uniform(0.0, 0.15))
        p.send_signal(signal.SIGINT)
        err = (err + p.communicate(timeout=120)[1]).decode(errors="replace")
        time.sleep(0.3)                                            # a stray writer thread would show up now
        complete = [q.name for q in root.iterdir()] == ["x"] and (root / "x" / "meta.json").is_file()
        if p.returncode == 0:
            assert complete
        elif p.returncode == -signal.SIGINT:
            # the signal landed while Python was shutting down after its work (handlers are back to
            # the default by then): the process dies of it, and the dataset is whole or absent
            assert complete or list(root.iterdir()) == [], list(root.rglob("*"))[:5]
        else:
            interrupted += 1
            if "KeyboardInterrupt" not in err:                     # (Ctrl-C during Python's imports: its own message)
                assert p.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-500:]
            assert list(root.iterdir()) == [], list(root.rglob("*"))[:5]
    assert interrupted >= 6
