"""Speech or pause, per video frame: the level the silence gate reads (inference_328, evaluate's
baselines) and the voice-activity detector behind it; also each frame's loudness (metrics.py).

The gate's level is the frame's loudness normalised to the recording's loud frames, lowered where
the detector hears no voice: loudness alone takes a sound bed (music, street noise, a studio hum)
under a voice for speech, so the mouth keeps moving through the pauses. The detector is Silero VAD
(MIT licence), whose ONNX model ships inside the `silero-vad` wheel (nothing is downloaded); it runs
in ONNX Runtime on 32 ms chunks of 16 kHz audio, batched (the wheel's sequence model). Where the
package is missing, `available()` is False and the gate falls back to loudness.

For a voice that is not the person's own, the mouth is also pushed per frame, further on frames with
more 1-5 kHz energy (band_push, RESULTS.md rounds 54-56); phones.py shapes it by the audio's phones.

    python vad.py speech.wav           # the share of frames it calls speech, and the time it took
"""
import importlib.util
import os
import sys
import time

import numpy as np

import media_io
import utils
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
STREAM_SHIFT_MIN = 50           # a stream's level shift waits for 2 s of heard (non-silent) frames ...
STREAM_SHIFT_FRAMES = 7500      # ... and follows its last 5 minutes

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
    return run_chunks(rows)[0]


def run_chunks(rows, state=None):
    """The detector over rows [n, CONTEXT + CHUNK] (each chunk with its context), from `state`
    (None = the start of the audio) -> (probabilities float32 [n], the state after the last row)."""
    sess = _get_session()
    h, c = state if state is not None else (np.zeros((1, 1, 128), np.float32),) * 2
    out = np.empty(len(rows), np.float32)
    for a in range(0, len(rows), BLOCK):
        p, h, c = sess.run(None, {"input": np.ascontiguousarray(rows[a:a + BLOCK]), "h": h, "c": c})
        out[a:a + BLOCK] = p.reshape(-1)
    return out, (h, c)


def frame_speech_prob(wav, n):
    """Speech probability of each of n video frames: the highest of the chunks overlapping the
    frame, then held HOLD frames each side. float32 [n]."""
    return hold(frame_max(chunk_probs(wav), 0, n))


def frame_max(probs, a, b, c0=0):
    """Per video frame a..b-1: the highest probability of the chunks overlapping it; probs[i] is
    chunk c0 + i (chunks past the end count as absent). float32 [b - a]."""
    hop = SR / FPS
    out = np.zeros(max(b - a, 0), np.float32)
    for i in range(a, b):
        lo, hi = int(i * hop // CHUNK) - c0, int(np.ceil((i + 1) * hop / CHUNK)) - c0
        seg = probs[max(lo, 0):max(hi, 0)]
        out[i - a] = seg.max() if len(seg) else 0.0
    return out


def hold(x):
    """Each frame's value raised to the highest within HOLD frames each side (onsets, releases)."""
    held = x.copy()
    for d in range(1, HOLD + 1):
        held[d:] = np.maximum(held[d:], x[:-d])
        held[:-d] = np.maximum(held[:-d], x[d:])
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
def _frame_chunks(wav, n, chunk):
    """(first frame, frames (k, SR // FPS) float32) over the n video frames of `wav`, `chunk` frames
    at a time (zero-padded past its end), so long audio is framed in constant memory."""
    hop = SR // FPS
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        seg = np.zeros((b - a) * hop, np.float32)
        part = wav[a * hop:b * hop]
        seg[:len(part)] = part
        yield a, seg.reshape(b - a, hop)


def frame_loudness_db(wav, n, chunk=10_000):
    """Loudness (dBFS, RMS) of each video frame's 40 ms of audio, max-pooled over +-1 frame so
    a syllable's onset and release count as speech. [n] float32; computed chunk by chunk."""
    db = np.empty(n, np.float32)
    for a, fr in _frame_chunks(wav, n, chunk):
        db[a:a + len(fr)] = 20 * np.log10(np.sqrt(np.mean(fr.astype(np.float64) ** 2, axis=1)) + 1e-9)
    pooled = db.copy()
    pooled[1:] = np.maximum(pooled[1:], db[:-1])
    pooled[:-1] = np.maximum(pooled[:-1], db[1:])
    return pooled


def frame_band_db(wav, n, band=(1000.0, 5000.0), chunk=10_000):
    """Energy (dB) of each video frame's 40 ms of audio in `band` Hz (Hann window). [n] float32,
    computed chunk by chunk. Open vowels radiate there and shut lips (m, b, p) do not, whoever
    speaks (RESULTS.md round 54)."""
    hop = SR // FPS
    f = np.fft.rfftfreq(hop, 1 / SR)
    keep, win, db = (f > band[0]) & (f < band[1]), np.hanning(hop).astype(np.float32), np.empty(n, np.float32)
    for a, fr in _frame_chunks(wav, n, chunk):
        db[a:a + len(fr)] = 10 * np.log10((np.abs(np.fft.rfft(fr * win, axis=1)[:, keep]) ** 2).sum(1) + 1e-10)
    return db


def band_push(wav, n, weight, level, speech_db):
    """--band_push W: per-frame factors on the guidance, 1 + W x the frame's 1-5 kHz energy as a
    z-score over the clip's speech frames (gate `level` >= speech_db), clipped to +-2, never below
    0.3; all ones when W is 0 or under 10 frames are speech. [n] float32."""
    speech = np.asarray(level) >= speech_db
    if weight <= 0 or speech.sum() < 10:
        return np.ones(n, np.float32)
    b = frame_band_db(wav, n)
    z = np.clip((b - b[speech].mean()) / (b[speech].std() + 1e-6), -2, 2)
    return np.maximum(1 + np.float32(weight) * z, 0.3).astype(np.float32)


OTHER_VOICE = 0.22      # voice_distance above which a driving voice is not the avatar's recorded one: the same person and microphone 0.07-0.19, other people 0.24-0.69 (RESULTS.md round 56)
VOICE_SECONDS = 120     # a voice_signature reads at most this much of a recording ...
VOICE_MIN_SECONDS = 3   # ... and auto_band_push decides on no less (one second of the same voice can sit 0.36 from the whole)


def voice_signature(wav):
    """A voice and its microphone in 80 numbers: the mean normalised log-mel of the louder half of
    the frames of the first VOICE_SECONDS, less its mean over the bands (the level)."""
    mel = media_io.melspectrogram(np.asarray(wav[:VOICE_SECONDS * SR], np.float32))
    e = mel.mean(0)
    v = mel[:, e >= np.percentile(e, 50)].mean(1)
    return (v - v.mean()).astype(np.float32)


def voice_distance(a, b):
    """RMS difference of two voice_signatures, in normalised log-mel units."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


_RECORDED = {}


def recorded_voice(name, data_roots):
    """The voice_signature of avatar `name`'s recording (its dataset's aud.wav under the first of
    `data_roots` that holds it, cached by path and mtime), None when none does."""
    for root in filter(None, data_roots):
        p = utils.dataset_path(name, root) / utils.AUDIO_WAV if name else None
        if p is not None and p.is_file():
            key = (str(p), p.stat().st_mtime)
            if key not in _RECORDED:
                _RECORDED[key] = voice_signature(media_io.load_audio(str(p)))
            return _RECORDED[key]
    return None


def auto_band_push(weight, wav, name, data_roots, other=0.1):
    """--band_push W resolved: W itself when >= 0; -1 (auto) gives `other` when the voice of `wav` is
    not the avatar's recorded one (voice_distance > OTHER_VOICE), else 0, and 0 when the recording is
    not at hand or `wav` is shorter than VOICE_MIN_SECONDS. -> (weight, distance or None)."""
    if weight >= 0:
        return float(weight), None
    own = recorded_voice(name, data_roots) if len(wav) >= VOICE_MIN_SECONDS * SR else None
    if own is None:
        return 0.0, None
    d = voice_distance(voice_signature(wav), own)
    return (float(other) if d > OTHER_VOICE else 0.0), d


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
    no voice, so a music or noise bed under the pauses does not hold the mouth open."""
    db = frame_loudness_db(wav, n)
    return gate_level(db, level_shift(db), frame_speech_prob(wav, n) if with_vad and n else None)


def level_shift(db):
    """dB that bring the loud frames (95th percentile) of frame loudnesses `db` to NOMINAL_SPEECH_DB."""
    loud = float(np.percentile(db, 95)) if len(db) else NOMINAL_SPEECH_DB
    return float(np.clip(NOMINAL_SPEECH_DB - loud, -MAX_LEVEL_SHIFT, MAX_LEVEL_SHIFT))


def gate_level(db, shift, prob=None):
    """Frame loudnesses (dBFS) -> the gate's levels: shifted, silent below ABS_SILENCE_DB, and
    lowered by up to PAUSE_DB where the speech probabilities `prob` (None: no detector) say pause."""
    out = db + np.float32(shift)
    out[db < ABS_SILENCE_DB] = -200.0           # far below any threshold
    if prob is not None:
        out = out - np.float32(PAUSE_DB) * (1 - speech_weight(prob))
    return out


class GateStream:
    """The gate's levels for audio that arrives in pieces (stream.py): the same loudness, detector
    and hold as gate_loudness_db, frame by frame as soon as the audio each frame needs has arrived
    (1 frame ahead for the loudness, HOLD frames ahead for the detector). The one difference: the
    level shift can only know the audio heard so far, so it is the percentile of the frames heard
    (those above ABS_SILENCE_DB, the last STREAM_SHIFT_FRAMES of them), 0 until STREAM_SHIFT_MIN
    were heard; `shift` fixes it instead (gate_loudness_db's value for a known recording)."""

    def __init__(self, with_vad, shift=None):
        self.with_vad, self.fixed_shift = with_vad, shift
        self.tail = np.zeros(0, np.float32)       # samples not yet in a whole frame (loudness)
        self.vtail = np.zeros(CONTEXT, np.float32)  # the detector's context + samples not yet in a whole chunk
        self.state, self.probs, self.db = None, [], []   # detector state, chunk probs, raw frame dB
        self.heard = []                          # frame dB above ABS_SILENCE_DB (for the shift)
        self.levels = []                         # finished levels of frames 0 .. len - 1
        self.total = None                        # frames of the whole audio, once finish() was called

    def push(self, wav):
        wav = np.asarray(wav, np.float32)
        hop = SR // FPS
        x = np.concatenate([self.tail, wav])
        k = len(x) // hop
        if k:
            rms = np.sqrt(np.mean(x[:k * hop].reshape(k, hop).astype(np.float64) ** 2, axis=1))
            self._add_db(20 * np.log10(rms + 1e-9))
        self.tail = x[k * hop:]
        if self.with_vad:
            self.vtail = self._vad(np.concatenate([self.vtail, wav]))
        self._levels()

    def finish(self, n):
        """The audio ended; it covers n video frames (media_io.num_frames of its length)."""
        hop = SR // FPS
        if len(self.tail) and len(self.db) < n:
            seg = np.zeros(hop, np.float32)
            seg[:len(self.tail)] = self.tail
            self._add_db([20 * np.log10(np.sqrt(np.mean(seg.astype(np.float64) ** 2)) + 1e-9)])
        while len(self.db) < n:                   # frames past the audio are zeros, as frame_loudness_db pads them
            self._add_db([20 * np.log10(1e-9)])
        if self.with_vad and len(self.vtail) > CONTEXT:
            pad = -(len(self.vtail) - CONTEXT) % CHUNK
            self.vtail = self._vad(np.concatenate([self.vtail, np.zeros(pad, np.float32)]))
        self.total = n
        self._levels()

    def _add_db(self, db):
        db = np.asarray(db, np.float32)
        self.db.extend(db.tolist())
        self.heard.extend(db[db >= ABS_SILENCE_DB].tolist())
        del self.heard[:-STREAM_SHIFT_FRAMES]

    def _vad(self, x):
        k = (len(x) - CONTEXT) // CHUNK
        if k > 0:
            rows = np.lib.stride_tricks.sliding_window_view(x[:k * CHUNK + CONTEXT], CHUNK + CONTEXT)[::CHUNK]
            p, self.state = run_chunks(rows, self.state)
            self.probs.extend(p.tolist())
        return x[k * CHUNK:] if k > 0 else x

    def _levels(self):
        """Append the levels of the frames whose loudness and detector window are complete."""
        n = len(self.db) if self.total is not None else len(self.db) - 1          # pooling looks 1 frame ahead
        if self.with_vad:
            if self.total is not None:
                n = min(n, self.total)
            else:
                # frames whose chunks and HOLD neighbours' chunks have all been heard
                n = min(n, int(len(self.probs) * CHUNK // (SR // FPS)) - HOLD)
        a = len(self.levels)
        if n <= a:
            return
        lo, hi = max(a - 1, 0), min(n + 1, len(self.db))
        part = np.asarray(self.db[lo:hi], np.float32)
        pooled = part.copy()
        pooled[1:] = np.maximum(pooled[1:], part[:-1])
        pooled[:-1] = np.maximum(pooled[:-1], part[1:])
        pooled = pooled[a - lo:a - lo + n - a]
        prob = None
        if self.with_vad:
            end = self.total if self.total is not None else n + HOLD
            f0 = max(a - HOLD, 0)
            c0 = int(f0 * (SR / FPS) // CHUNK)
            raw = frame_max(np.asarray(self.probs[c0:], np.float32), f0, min(n + HOLD, end), c0)
            prob = hold(raw)[a - f0:a - f0 + n - a]
        self.levels.extend(gate_level(pooled, self.shift(), prob).tolist())

    def shift(self):
        if self.fixed_shift is not None:
            return self.fixed_shift
        if len(self.heard) < STREAM_SHIFT_MIN:
            return 0.0
        return level_shift(np.asarray(self.heard, np.float32))


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
