"""Live lip sync: audio arrives in pieces of any size, frames leave at 25 fps as soon as the audio
they need has arrived. The same features (LipSyncModel.features), reference, U-Net (paint) and
paste (compose) as the file path in inference_328.py; only the order of the work differs.

    python stream.py --name anna --audio_path speech.wav      # the delay and speed of a stream, per look-ahead

    sess = LiveSession(model, template)          # model: inference_328.LipSyncModel
    for pcm in chunks:                           # float32 in [-1, 1], int16 samples, or s16le bytes
        sess.push(pcm)
        while (f := sess.next()) is not None:    # f.index, f.time (s from the first sample), f.image (BGR)
            show(f)
    sess.finish()                                # the audio ended: the last frames come out too

Delay: frame k needs the audio features of frames k-8 .. k+7 (the generator's window) and each
feature reads 0.1 s of audio past its frame (the mel window), so with the full look-ahead
(LOOKAHEAD = 7 frames, the file path's) frame k can be made once the audio reaches 0.41 s past its
start. `lookahead` L < 7 waits only for frames up to k + L and repeats feature k + L for the frames
after it: 0.25 s at L = 3 (LIVE_LOOKAHEAD, the live default: its lips measured as good as the
file path's on the held-out minute), 0.14 s at L = 0 (worse lips; README "Live"). The silence gate
needs 2 frames ahead (vad.GateStream). When no audio arrives the caller feeds silence (idle(): the
mouth closes through the gate), so the avatar's timeline never jumps.

Frames equal the file path's for the same audio, pixel for pixel up to float rounding in the
mel (tests/test_stream.py), when the stream's silence gate is given the recording's level
(`level_shift`); otherwise its level follows the audio heard so far (vad.GateStream).
"""
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

import geometry
import media_io
import utils
import vad
from compose import References, RenderOptions, StillCache, compose
from templates import pingpong
from utils import FEAT_WIN, FPS, SR, UserError

LOOKAHEAD = FEAT_WIN // 2 - 1       # frames of audio features past the frame the generator reads (7): the file path's
LIVE_LOOKAHEAD = 3                  # a live stream's default: 0.16 s less delay, lips as good (README "Live", measured)
TRIM = 10 * SR // FPS               # the audio buffer is trimmed in steps of 10 frames (whole mel frames, whole speech chunks)
HOLD_FRAMES = vad.HOLD + 1          # the detector's hold reads chunks up to the end of frame k + HOLD
FEATURE_CHUNK = 250                 # the file path's features are computed this many frames at a time (10 s, ~0.5 MB)
KEEP = 40                           # frames of audio kept before the oldest frame whose features are still to come


@dataclass
class LiveFrame:
    index: int          # output frame number, from 0
    time: float         # its start, seconds after the stream's first sample
    image: np.ndarray   # BGR uint8, the template's size


def to_float(pcm):
    """PCM as float32 in [-1, 1]: float arrays as they are, int16 arrays scaled, bytes read as s16le."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        b = bytes(pcm)
        if len(b) % 2:
            raise UserError(f"audio chunk of {len(b)} bytes: s16le PCM comes in whole 2-byte samples")
        return np.frombuffer(b, "<i2").astype(np.float32) / 32768.0
    a = np.asarray(pcm)
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    return np.asarray(a, np.float32).reshape(-1)


class LiveSession:
    """One stream: push audio, take frames. Not thread-safe; one session per client."""

    def __init__(self, model, template, opts=None, lookahead=LIVE_LOOKAHEAD, level_shift=None):
        opts = opts if opts is not None else RenderOptions(guidance=model.guidance_for(template, live=True))
        if not 0 <= lookahead <= LOOKAHEAD:
            raise UserError(f"--lookahead {lookahead}: use 0 .. {LOOKAHEAD} frames")
        if not 0 <= opts.start_frame < template.n:
            raise UserError(f"--start_frame {opts.start_frame} is outside the template's {template.n} frames")
        if opts.band_push > 0 or opts.closures > 0:   # auto (-1) is off here: no whole clip to compare voices or z-score on
            raise UserError(f"--{'band_push' if opts.band_push > 0 else 'closures'} reads the whole clip's speech, which a live stream has not "
                            "heard yet: leave it out for live streams (--stream, or evaluate.py with --lookahead below 7)")
        self.model, self.template, self.opts, self.lookahead = model, template, opts, lookahead
        self.refs = References(template, opts.reference, opts.seed, getattr(model, "ref_bank", None))
        self.stills = StillCache() if template.n == 1 else None     # a photo's guidance: its silent pass painted once
        self.gate = vad.GateStream(vad.use_vad(opts.vad), shift=level_shift)
        self._buf, self.off = np.zeros(SR, np.float32), 0      # audio held (from sample `off`), with room to grow
        self.received = 0                                      # samples pushed in all
        self.feats, self.f_lo = np.zeros((0, utils.FEAT_DIM), np.float32), 0   # features of frames f_lo ..
        self.fstop = 0                                         # features of frames < fstop are final
        self.k = 0                                             # next frame to make
        self.total = None                                      # frames of the whole audio, after finish()
        self.dropped = 0                                       # frames skipped (skip())

    # -- audio in ---------------------------------------------------------------------------------
    def push(self, pcm):
        """Add audio (16 kHz mono) -> how many frames are ready now."""
        if self.total is not None:
            raise UserError("audio pushed after finish(): start a new session")
        x = to_float(pcm)
        used = self.received - self.off
        if used + len(x) > len(self._buf):                       # grow by doubling: pushes of 1 sample stay cheap
            self._buf = np.concatenate([self._buf[:used], np.zeros(max(used + len(x), 2 * len(self._buf)), np.float32)])
        self._buf[used:used + len(x)] = x
        self.received += len(x)
        self.gate.push(x)
        while self.model.feature_reach(self.fstop + 1) <= self.received:
            self.fstop += 1
        return self.ready()

    def idle(self, seconds):
        """No audio arrived for `seconds`: feed silence, so the avatar goes on with its mouth closed."""
        return self.push(np.zeros(int(round(seconds * SR)), np.float32))

    def finish(self):
        """The audio ended: every frame it covers becomes ready (features past its end are zero, as
        in the file path). -> how many frames are ready now."""
        if self.total is None:
            self.total = media_io.num_frames(self.received)
            self.gate.finish(self.total)
        return self.ready()

    # -- frames out ---------------------------------------------------------------------------------
    def ready(self):
        """Frames whose audio has all arrived and that are not made yet."""
        if self.total is not None:
            return self.total - self.k
        return max(0, min(self.fstop - self.lookahead, len(self.gate.levels)) - self.k)

    def delay(self, k=100):
        """Seconds of audio past frame k's start that it waits for: the stream's inherent delay
        (features up to k + lookahead, the gate's loudness 1 frame and detector HOLD frames ahead)."""
        hop = SR // FPS
        need = max(self.model.feature_reach(k + self.lookahead + 1), (k + 2) * hop)
        if self.gate.with_vad:
            need = max(need, -(-(k + HOLD_FRAMES) * hop // vad.CHUNK) * vad.CHUNK)
        return (need - k * hop) / SR

    def next(self):
        """Make the next ready frame -> LiveFrame, or None when its audio has not arrived yet."""
        part = self.next_painted()
        return None if part is None else LiveFrame(part.index, part.time, self.paste(part))

    def next_painted(self):
        """The next ready frame up to the U-Net (its paste left to paste(), which another thread may
        run while this one paints the next frame) -> LiveFrame whose image is the paste's input, or None."""
        if not self.ready():
            return None
        k = self.k
        j = pingpong(self.opts.start_frame + k, self.template.n)
        frame, box = self.template.read(j), self.template.boxes[j]
        crop = geometry.crop_face(frame, box)
        win = self._window(k)[None]
        gen = self.model.paint([crop], self.refs.by_audio(win) if self.refs.mode == "audio" else [self.refs.crop(k, j)], win, self.opts.guidance, self.stills)[0]
        self.k += 1
        self._trim()
        return LiveFrame(k, k / FPS, (frame, box, crop, gen, self.refs.closed, self.gate.levels[k], self.refs.mouth))

    def paste(self, painted):
        """The finished frame (BGR) of next_painted()'s output: silence gate, colour match, blend."""
        return compose(painted.image, self.opts, self.model.mask)

    def skip(self):
        """Drop the next ready frame unmade (a client that cannot keep up) -> its index, or None."""
        if not self.ready():
            return None
        k = self.k
        if self.opts.reference == "audio":
            self.refs.by_audio(self._window(k)[None])                                 # the same choice as if made
        elif self.opts.reference != "closed":
            self.refs.index(k, pingpong(self.opts.start_frame + k, self.template.n))   # the same draws as if made
        self.k += 1
        self.dropped += 1
        self._trim()
        return k

    def done(self):
        """True once the audio ended and every frame was made or skipped."""
        return self.total is not None and self.k >= self.total

    # -- inside ---------------------------------------------------------------------------------
    def _window(self, k):
        """The generator's audio input (32, 16, 16) for frame k (zero before the audio and past its
        end, the last final feature repeated past the look-ahead)."""
        stop = self.total if self.total is not None else self.fstop
        have = self.f_lo + len(self.feats)
        if stop > have:                                          # the newly final features, in one batch
            rel = self.off * FPS // SR                           # frames dropped with the audio (a multiple of 10)
            self.feats = np.concatenate([self.feats, self.model.features(self.wav, have - rel, stop - rel)])
        last = stop - 1                                          # the last final feature
        idx = np.arange(k - FEAT_WIN // 2, k + FEAT_WIN // 2)
        if self.total is None:
            idx = np.minimum(idx, k + self.lookahead)            # repeat past the look-ahead
        valid = (idx >= 0) & (idx <= last)
        w = np.zeros((FEAT_WIN, utils.FEAT_DIM), np.float32)
        w[valid] = self.feats[idx[valid] - self.f_lo]
        return w.reshape(32, 16, 16)

    @property
    def wav(self):
        """The audio held: samples off .. received - 1."""
        return self._buf[:self.received - self.off]

    def _trim(self):
        """Drop features and audio no frame to come reads (memory stays flat over hours)."""
        lo = self.k - FEAT_WIN // 2                              # the oldest feature a frame to come reads
        if lo > self.f_lo:
            self.feats, self.f_lo = self.feats[lo - self.f_lo:], lo   # (skipped frames: features never made)
        keep_from = (self.f_lo + len(self.feats) - KEEP) * SR // FPS // TRIM * TRIM
        cut = keep_from - self.off
        if cut >= TRIM and self.total is None:
            used = self.received - self.off
            self._buf[:used - cut] = self._buf[cut:used]
            self.off += cut


# ----------------------------------------------------------------------------------------------
# The file path's features, streamed (inference_328.LipSyncModel._generate)
class FeatureStream:
    """Generator audio windows [32, 16, 16] for frames 0, 1, 2, ... asked for in increasing
    order; the encoder vectors are computed FEATURE_CHUNK frames at a time and old ones dropped."""

    def __init__(self, model, wav, chunk=FEATURE_CHUNK):
        self.model, self.wav, self.chunk = model, wav, chunk
        self.n = media_io.num_frames(len(wav))
        self.lo, self.buf = 0, np.zeros((0, utils.FEAT_DIM), np.float32)   # buf holds frames lo..lo+len-1

    def window(self, i):
        need = min(i + FEAT_WIN // 2, self.n)          # window of frame i reads frames i-8 .. i+7
        while self.lo + len(self.buf) < need:
            a = self.lo + len(self.buf)
            self.buf = np.concatenate([self.buf, self.model.features(self.wav, a, min(a + self.chunk, self.n))])
        drop = max(0, min(i - FEAT_WIN // 2, self.lo + len(self.buf)) - self.lo)
        if drop:
            self.buf, self.lo = self.buf[drop:], self.lo + drop
        # buf starts at frame 0 or at i-8, and ends at frame n or past i+7, so the zero padding of
        # feature_window falls exactly outside the audio, as for the whole-wav features
        return media_io.feature_window(self.buf, i - self.lo)


# ----------------------------------------------------------------------------------------------
# The command line: inference_328.py --stream
READ_BYTES = 3200                   # stdin is read in pieces of up to 100 ms (s16le)
WRITE_BEHIND = 8                    # painted frames waiting for the paste thread


def pcm_chunks(audio_path, chunk=READ_BYTES):
    """s16le 16 kHz mono byte chunks: from stdin for "-", else from any audio file (decoded first)."""
    if audio_path == "-":
        read = getattr(sys.stdin.buffer, "read1", sys.stdin.buffer.read)
        odd = b""
        while data := read(chunk):
            data, odd = odd + data, b""
            if len(data) % 2:                   # a pipe may split a sample: keep its first byte
                data, odd = data[:-1], data[-1:]
            if data:
                yield data
        return
    wav = (np.clip(media_io.load_audio(audio_path), -1, 1) * 32767).astype("<i2")
    for i in range(0, len(wav), chunk // 2):
        yield wav[i:i + chunk // 2].tobytes()


def render_stream(model, template, chunks, out_path, opts=None, lookahead=LIVE_LOOKAHEAD, progress=None):
    """Frames into a fragmented mp4 as their audio arrives (media_io.StreamWriter); the paste runs in
    a second thread while the U-Net paints the next frame -> (frames, seconds from the first audio
    chunk to the first frame written)."""
    sess = LiveSession(model, template, opts, lookahead)
    t0, first, errors = None, [], []
    q = queue.Queue(WRITE_BEHIND)

    def paster(out):
        try:
            while (part := q.get()) is not None:
                out.write(sess.paste(part))
                if not first:
                    first.append(time.perf_counter() - t0)
                if progress is not None:
                    progress(part.index + 1)
        except BaseException as e:              # handed to the caller
            errors.append(e)
            while q.get() is not None:
                pass

    with media_io.StreamWriter(out_path, *template.size, crf=opts.crf) as out:
        th = threading.Thread(target=paster, args=(out,), daemon=True, name="live-paste")
        th.start()
        try:
            for data in chunks:
                t0 = t0 if t0 is not None else time.perf_counter()
                out.write_audio(data)
                sess.push(data)
                while not errors and (part := sess.next_painted()) is not None:
                    q.put(part)
            if t0 is None:
                raise UserError("no audio arrived (stdin was empty): pipe 16 kHz mono s16le PCM into --audio_path -")
            sess.finish()
            while not errors and (part := sess.next_painted()) is not None:
                q.put(part)
        finally:
            q.put(None)
            th.join()
        if errors:
            raise errors[0]
    return sess.k, first[0]


def main(cfg, model, template, out):
    """inference_328.py --stream: the avatar says audio from stdin (--audio_path -) or a file."""
    from tqdm import tqdm
    opts = RenderOptions.from_config(cfg, default=model.guidance_for(template, live=True))
    bar = tqdm(unit="f", desc="live", dynamic_ncols=True)
    sess_delay = LiveSession(model, template, opts, cfg.lookahead).delay()
    print(f"streaming into {out}: look-ahead {cfg.lookahead} frames, each frame waits for "
          f"{sess_delay * 1000:.0f} ms of audio past its start")
    t = time.perf_counter()
    n, first = render_stream(model, template, pcm_chunks(cfg.audio_path), out, opts, cfg.lookahead,
                             progress=lambda k: bar.update(k - bar.n))
    bar.close()
    dt = time.perf_counter() - t
    print(f"done: {out}  {n} frames in {dt:.1f} s ({n / dt:.2f} frames/s); first frame {first:.2f} s after the first audio")
    return out
