"""Speech or pause, per video frame, by a voice-activity detector rather than by loudness.

Loudness alone takes a sound bed (music, street noise, a studio hum) under a voice for speech, so
the mouth keeps moving through the pauses. The detector is Silero VAD (MIT licence), whose ONNX
model ships inside the `silero-vad` wheel (nothing is downloaded); it runs in ONNX Runtime on
32 ms chunks of 16 kHz audio, batched (the wheel's sequence model). Where the package is missing, `available()`
is False and the callers fall back to loudness.

    python vad.py speech.wav           # the share of frames it calls speech, and the time it took
"""
import importlib.util
import os
import sys
import time

import numpy as np

import media_io
from utils import FPS, SR

CHUNK = 512             # samples per VAD step at 16 kHz (32 ms): the model's fixed input
CONTEXT = 64            # samples of the previous chunk the model sees before each chunk
ONNX_FILE = "silero_vad_16k_sequence.onnx"   # the batched model: all chunks of a block in one call
BLOCK = 1024            # chunks per call (33 s of audio); the LSTM state carries across blocks
PROB_PAUSE = 0.3        # speech probability at or below which a frame is a pause ...
PROB_SPEECH = 0.6       # ... and at or above which it is speech (smooth in between)
HOLD = 2                # frames each side a speech frame also counts as speech (onsets, releases)

_session = None


def model_path():
    """Path of the ONNX model inside the installed silero-vad package, or None."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "data", ONNX_FILE)
    return p if os.path.isfile(p) else None


def available():
    return model_path() is not None


def _get_session():
    global _session
    if _session is None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        opts.log_severity_level = 3                           # the wheel's model has unused initialisers
        _session = ort.InferenceSession(model_path(), opts, providers=["CPUExecutionProvider"])
    return _session


def chunk_probs(wav):
    """Speech probability of each 32 ms chunk of a 16 kHz mono wav [S] -> float32 [ceil(S / CHUNK)]."""
    wav = np.asarray(wav, np.float32)
    n = -(-len(wav) // CHUNK)
    if n == 0:
        return np.zeros(0, np.float32)
    padded = np.zeros(n * CHUNK + CONTEXT, np.float32)
    padded[CONTEXT:CONTEXT + len(wav)] = wav                  # chunk k sees padded[k*CHUNK : (k+1)*CHUNK + CONTEXT]
    rows = np.lib.stride_tricks.sliding_window_view(padded, CHUNK + CONTEXT)[::CHUNK]   # (n, 576), a view
    sess = _get_session()
    h = c = np.zeros((1, 1, 128), np.float32)
    out = np.empty(n, np.float32)
    for a in range(0, n, BLOCK):
        p, h, c = sess.run(None, {"input": np.ascontiguousarray(rows[a:a + BLOCK]), "h": h, "c": c})
        out[a:a + BLOCK] = p.reshape(-1)
    return out


def frame_speech_prob(wav, n):
    """Speech probability of each of n video frames: the highest of the chunks overlapping the
    frame, then held HOLD frames each side. float32 [n]."""
    probs = chunk_probs(wav)
    hop = SR / FPS
    out = np.zeros(n, np.float32)
    for i in range(n):
        a, b = int(i * hop // CHUNK), int(np.ceil((i + 1) * hop / CHUNK))
        seg = probs[a:b]
        out[i] = seg.max() if len(seg) else 0.0
    held = out.copy()
    for d in range(1, HOLD + 1):
        held[d:] = np.maximum(held[d:], out[:-d])
        held[:-d] = np.maximum(held[:-d], out[d:])
    return held


def speech_weight(prob):
    """0 at or below PROB_PAUSE, 1 at or above PROB_SPEECH, smooth in between."""
    t = np.clip((np.asarray(prob, np.float32) - PROB_PAUSE) / (PROB_SPEECH - PROB_PAUSE), 0, 1)
    return t * t * (3 - 2 * t)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[-1].strip())
        sys.exit(0)
    if not available():
        sys.exit("error: the silero-vad package is not installed: pip install -r requirements.txt")
    wav = media_io.load_audio(sys.argv[1])
    t = time.perf_counter()
    p = frame_speech_prob(wav, media_io.num_frames(len(wav)))
    dt = time.perf_counter() - t
    print(f"{sys.argv[1]}: {len(wav) / SR:.1f} s, speech in {100 * (p >= PROB_SPEECH).mean():.0f}% of frames, "
          f"{1000 * dt / max(len(wav) / SR, 1e-9):.1f} ms per second of audio")
