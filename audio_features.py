"""Audio -> the generator's per-frame audio features: THE path shared by SyncNet training (which
writes dataset/NAME/aud_feat.npy), generator training, inference, evaluation and the server.

    python syncnet_328.py --name anna                  # trains the encoder, then writes the features
    python -c "import audio_features as af, unet_328; print(af.encode_audio('speech.wav', unet_328.AudioEncoder()).shape)"

A feature is the AudioEncoder's 512-d output for the 0.2 s mel window (80 x 16) centred on a video
frame (media_io.mel_windows); `encoder_id` names the encoder that made a set of features, so that a
generator is never fed features of another encoder.
"""
import hashlib
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

import media_io
import utils
from unet_328 import AudioEncoder
from utils import FEAT_DIM, N_MELS, UserError

SOURCE_REFERENCE = "reference"      # aud_feat.json "source" prefix for the original encoder


def encoder_id(audio_encoder):
    """First 12 hex of the sha1 of the encoder's state dict (names + bytes, BatchNorm counters
    left out since they do not change outputs): same id <=> same features."""
    h = hashlib.sha1()
    for k, v in audio_encoder.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def encode_audio(wav_or_mel, audio_encoder, device="cpu", batch=256, n_frames=None):
    """Audio -> one 512-d feature per video frame, float32 [n_frames, 512]. Accepts a path (any
    audio/video ffmpeg reads), a float32 16 kHz mono wav [S] or a mel [80, T]; n_frames defaults
    to media_io.num_frames(S) (for a mel, the frames its length covers)."""
    if isinstance(wav_or_mel, (str, Path)):
        wav_or_mel = media_io.load_audio(wav_or_mel)
    x = np.asarray(wav_or_mel, np.float32)
    if x.ndim == 1:
        mel = media_io.melspectrogram(x)
        n = media_io.num_frames(len(x)) if n_frames is None else n_frames
    elif x.ndim == 2 and x.shape[0] == N_MELS:
        mel = x
        n = int(round((x.shape[1] - 1) * utils.FPS / utils.MEL_FPS)) if n_frames is None else n_frames
    else:
        raise ValueError(f"encode_audio: expected a wav [S] or a mel [{N_MELS}, T], got shape {x.shape}")
    device = torch.device(device)
    was_training = audio_encoder.training
    audio_encoder.eval().to(device)
    out = np.zeros((n, FEAT_DIM), np.float32)
    for s in range(0, n, batch):
        win = media_io.mel_windows(mel, np.arange(s, min(s + batch, n)))          # (b, 1, 80, 16)
        out[s:s + len(win)] = audio_encoder(torch.from_numpy(win).to(device)).float().cpu().numpy()
    audio_encoder.train(was_training)
    return out


def write_features(ds_dir, audio_encoder, source, device="cpu"):
    """dataset/NAME/aud_feat.npy (float32 [num_frames, 512], num_frames = max(video frames,
    frames of the audio)) + aud_feat.json (encoder_id, source, ...), each written atomically."""
    ds_dir = Path(ds_dir)
    meta = utils.load_meta(ds_dir)
    wav = read_wav(ds_dir)
    n = max(int(meta.get("frames", 0)), media_io.num_frames(len(wav)))
    feats = encode_audio(wav, audio_encoder, device, n_frames=n)
    # the json is the stamp that says which encoder made the npy: drop it first, write it last
    (ds_dir / utils.AUD_FEAT_INFO).unlink(missing_ok=True)
    with utils.atomic_file(ds_dir / utils.AUD_FEAT) as tmp:
        np.save(tmp, feats)
    info = {"encoder_id": encoder_id(audio_encoder), "source": str(source), "num_frames": n,
            "feat_dim": FEAT_DIM, "audio": utils.AUDIO_WAV, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with utils.atomic_file(ds_dir / utils.AUD_FEAT_INFO) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return feats, info


def load_reference_encoder(path):
    """The original SyncTalk_2D `audio_visual_encoder.pth` (or any Wav2Lip-layout state dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--reference_encoder {path}: file not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return AudioEncoder().load_reference_state_dict(sd)
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"--reference_encoder {path} is not a usable audio encoder state dict: "
                        f"{str(e).splitlines()[0]}") from None


def read_wav(ds_dir):
    import soundfile as sf
    wav, sr = sf.read(str(Path(ds_dir) / utils.AUDIO_WAV), dtype="float32", always_2d=True)
    if sr != utils.SR:
        raise UserError(f"{ds_dir}/aud.wav is {sr} Hz, not {utils.SR}; re-run process.py on the video")
    return wav.mean(axis=1)
