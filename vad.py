"""Speech or pause, per video frame: the level the silence gate reads (inference_328, evaluate's
baselines) and the voice-activity detector behind it; also each frame's loudness (metrics.py).

The gate's level is the frame's loudness normalised to the recording's loud frames, lowered where
the detector hears no voice: loudness alone takes a sound bed (music, street noise, a studio hum)
under a voice for speech, so the mouth keeps moving through the pauses. The detector is Silero VAD
(MIT licence), whose ONNX model ships inside the `silero-vad` wheel (nothing is downloaded); it runs
in ONNX Runtime on 32 ms chunks of 16 kHz audio, batched (the wheel's sequence model). Where the
package is missing, `available()` is False and the gate falls back to loudness.

    python vad.py speech.wav           # the share of frames it calls speech, and the time it took
"""
import importlib.util
import os
import sys
import time

import numpy as np

import media_io
from utils import FPS, SR, UserError

CHUNK = 512             # samples per VAD step at 16 kHz (32 ms): the model's fixed input
CONTEXT = 64            # samples of the previous chunk the model sees before each chunk
ONNX_FILE = "silero_vad_16k_sequence.onnx"   # the batched model: all chunks of a block in one call
BLOCK = 1024            # chunks per call (33 s of audio); the LSTM state carries across blocks
PROB_PAUSE = 0.3        # speech probability at or below which a frame is a pause ...
PROB_SPEECH = 0.6       # ... and at or above which it is speech (smooth in between)
HOLD = 2                # frames each side a speech frame also counts as speech (onsets, releases)
MODES = ("auto", "on", "off")   # --vad: the detector when installed, insist on it, loudness only
NOMINAL_SPEECH_DB = -12.0       # dBFS of the loud frames (95th percentile) of typical speech files
MAX_LEVEL_SHIFT = 20.0          # dB: the gate adapts to recordings at most this much quieter/louder
ABS_SILENCE_DB = -60.0          # dBFS below which a frame is silent whatever the recording level
PAUSE_DB = 60.0                 # dB the gate's level drops where no voice is heard: below any silence threshold

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
    return ramp(np.asarray(prob, np.float32), PROB_PAUSE, PROB_SPEECH)


def ramp(x, lo, hi):
    """0 at or below lo, 1 at or above hi, smooth in between (smoothstep): how much of a frame is
    speech, from a speech probability or from the gate's level in dB."""
    t = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    return t * t * (3 - 2 * t)


# ----------------------------------------------------------------------------------------------
# The silence gate's level per video frame
def frame_loudness_db(wav, n, chunk=10_000):
    """Loudness (dBFS, RMS) of each video frame's 40 ms of audio, max-pooled over +-1 frame so
    a syllable's onset and release count as speech. [n] float32; computed chunk by chunk."""
    hop = SR // FPS
    db = np.empty(n, np.float32)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        seg = np.zeros((b - a) * hop, np.float32)
        part = wav[a * hop:b * hop]
        seg[:len(part)] = part
        rms = np.sqrt(np.mean(seg.reshape(b - a, hop).astype(np.float64) ** 2, axis=1))
        db[a:b] = 20 * np.log10(rms + 1e-9)
    pooled = db.copy()
    pooled[1:] = np.maximum(pooled[1:], db[:-1])
    pooled[:-1] = np.maximum(pooled[:-1], db[1:])
    return pooled


def use_vad(mode):
    """--vad auto|on|off -> whether the silence gate uses the voice-activity detector."""
    if mode not in MODES:
        raise UserError(f"--vad {mode!r}: choose {', '.join(MODES)}")
    if mode == "on" and not available():
        raise UserError("--vad on needs the silero-vad package (its ONNX model ships in the wheel): "
                        "pip install -r requirements.txt, or pass --vad auto")
    return mode != "off" and available()


def gate_loudness_db(wav, n, with_vad=False):
    """The level the silence gate reads per frame: frame_loudness_db shifted so that the audio's
    loud frames (95th percentile) sit at NOMINAL_SPEECH_DB, so the thresholds hold for quiet and
    loud recordings alike (shift capped at +-MAX_LEVEL_SHIFT dB); below ABS_SILENCE_DB dBFS a frame
    is always silent. with_vad: lowered by up to PAUSE_DB where the voice-activity detector hears
    no voice, so a music bed or noise under the pauses does not hold the mouth open."""
    db = frame_loudness_db(wav, n)
    loud = float(np.percentile(db, 95)) if n else NOMINAL_SPEECH_DB
    shift = float(np.clip(NOMINAL_SPEECH_DB - loud, -MAX_LEVEL_SHIFT, MAX_LEVEL_SHIFT))
    out = db + np.float32(shift)
    out[db < ABS_SILENCE_DB] = -200.0           # far below any threshold
    if with_vad and n:
        out = out - np.float32(PAUSE_DB) * (1 - speech_weight(frame_speech_prob(wav, n)))
    return out


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
