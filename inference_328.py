"""Make a trained avatar say any audio: one seamless, lip-synced H.264 + AAC mp4 out.

    python inference_328.py --name anna --audio_path speech.m4a              # -> result/anna_speech_last.mp4
    python inference_328.py --name anna --audio_path talk.wav --template portrait.png --out a.mp4
    arecord -f S16_LE -r 16000 -c 1 | python inference_328.py --name anna --audio_path - --stream --out live.mp4   # live, stream.py
    python inference_328.py --name tiny --audio_path a.wav --data_root /tmp/ds --ckpt_root /tmp/ck --device cpu  # CPU smoke run

Pipeline per output frame k (SPEC §8, with the reference faults fixed): template frame j (the
avatar's own frames played forward then backward from --start_frame, or a still image / another
video), its smoothed crop box, the 328 crop; generator input = [reference crop of ANOTHER frame
than the target, as in training, masked crop]; audio = the encoder vectors of frames k-8..k+7;
the painted 320 centre goes back into the 328 crop, colour-matched to the template near the seam,
and is blended into the frame through a feathered alpha (compose.compose, geometry.paste_back); the
options of this path and their defaults are compose.RenderOptions. Frames go straight into one ffmpeg
(media_io.VideoWriter), which muxes the original audio track and renames into place only on success. Decode/crop
runs in a reader thread, the U-Net in the caller, paste/encode in a writer thread; features (chunks of 10 s) and
frames are streamed, so memory does not grow with the audio's length (only the 16 kHz wav itself is held: 230 MB an hour).

Reference crop: by default one fixed template frame, the one with the most closed mouth (inner-lip gap / mouth
width, from landmarks.npz). Against a random other frame per output frame (training's rule, --reference random) it
gives the generator a constant identity input (consecutive random references differ by 18.5 grey levels per pixel on
the anchor clip: flicker) and a closed-mouth prior (mouth opening 0.021 vs 0.105 on average for random frames), so
any mouth motion has to come from the audio. Silence: a per-frame gate (loudness normalised to the recording's loud
frames, and a voice-activity detector, vad.py, so a music or noise bed does not count as speech) blends the lips and
jaw of that closed reference over the generated ones in the pauses; with a generator that ignores audio (the
template's own talking mouth) it brings the dlib mouth opening in silent stretches from 0.091 to 0.016 (closed
reference: 0.021), speech frames untouched.

Speed on CPU (bench_inference.py): the U-Net runs (runner.py) with BatchNorm folded into the convs
through ONNX Runtime when it is installed and the graph matches eager PyTorch to 1e-3 (0.20 CPU s a
full-width frame vs 1.47 folded channels_last PyTorch), its graph cached per checkpoint (LIPSYNC_CACHE,
default ~/.cache/lipsync); else PyTorch, the CLI re-executed once with glibc malloc settings (~1.4x).
"""
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import geometry
import media_io
import runner
import stream
import utils
import vad
from compose import GUIDANCE, LIVE_GUIDANCE, References, RenderOptions, StillCache, compose, frame_guidance, guide
from templates import open_template
from utils import FPS, HOP, MEL_FPS, MEL_WIN, N_FFT, SR, UserError


# The render options (start_frame, feather, color_match, reference, silence_gate, silence_db, speech_db, vad, seed, guidance, crf, sharpen) default as compose.RenderOptions.
@dataclass
class Config:
    name: str = ""                                   # avatar (dataset and checkpoint) name
    audio_path: str = ""                             # any audio (or video with sound) ffmpeg reads
    out: str = ""                                    # output mp4; default result/{name}_{audiostem}_{ckptstem}.mp4
    checkpoint: str = ""                             # generator checkpoint; default ckpt_root/NAME/last.pth, else best.pth
    start_frame: int = RenderOptions.start_frame     # [0..] first template frame (the template then plays forward, backward, ...)
    batch_size: int = 0                              # [0..] frames per U-Net call; 0 = auto (1 on CPU, where batching is slower; 16 on GPU)
    device: str = "auto"                             # auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps
    backend: str = "auto"                            # U-Net runtime: auto, ov (OpenVINO, bf16), ort (onnxruntime), compile, eager
    feather: int = RenderOptions.feather             # [0..64] px (in the 328 crop) over which the pasted face fades into the frame
    color_match: bool = RenderOptions.color_match    # match the generated crop's colours to the template near the seam
    reference: str = RenderOptions.reference         # reference crop: closed (the template frame with the most closed mouth), open (one with the mouth wide open, teeth in view) random (a random other frame per output frame, as in training) or audio (the frame of the checkpoint's bank that sounds most like the output frame: models trained with --reference audio)
    silence_gate: bool = RenderOptions.silence_gate  # where the audio is silent, blend the mouth toward the closed reference
    silence_db: float = RenderOptions.silence_db     # frame loudness (dB, for speech whose loud frames are at -12 dBFS) at or below which a frame is silent
    speech_db: float = RenderOptions.speech_db       # frame loudness (dB, same scale) at or above which the generated mouth is used as is
    vad: str = RenderOptions.vad                     # speech vs pause for the silence gate: auto = a voice-activity detector (vad.py, Silero) with loudness, when silero-vad is installed; on = insist on it; off = loudness only
    template: str = ""                               # optional: an image or a video to animate instead of the avatar's frames
    other_person: bool = False                       # render a --template whose face is another person's than the avatar's (refused by default: the model paints only its own person's mouth)
    data_root: str = str(utils.DATASET_DIR)          # where datasets live
    ckpt_root: str = str(utils.CHECKPOINT_DIR)       # where checkpoints live
    seed: int = RenderOptions.seed                   # [0..] seed of the random reference choice
    guidance: float = -1.0                           # [-1..4] the painted mouth moves this many times as far from what the frame paints with silence (a second U-Net pass): 1 = the network's own output; -1 = the checkpoint's fitted guidance for a file (guidance_fit.py; a photo template's fitted apart; 1.25 when it holds none), 1 with --stream over the avatar's frames (real time)
    band_push: float = RenderOptions.band_push       # [-1..1] each frame's guidance times 1 + W x its 1-5 kHz energy's z-score over the clip's speech: other people's voices (a text-to-speech voice) followed closer, the person's own less (README section 4); 0 = one guidance for all; -1 = auto: 0.1 when the voice is not the avatar's recorded one (vad.auto_band_push), else 0
    closures: float = RenderOptions.closures         # [-1..1] on the frames where the audio's lips shut (a p, b or m: the hama phoneme recogniser; half for f, v, w, u; 1 + W / 4 for open vowels) the guidance times 1 - W, so at 1 the mouth is painted shut there (README section 4); -1 = auto: 1 with the band push on (another voice), else 0
    crf: int = RenderOptions.crf                     # [0..51] H.264 quality (lower = better, larger)
    sharpen: float = RenderOptions.sharpen           # [0..4] unsharp mask on the painted mouth (amount; its blur is one pixel of the frame): 0 = the network's own output
    stream: bool = False                             # live: frames written as their audio arrives (stream.py) into a fragmented mp4; --audio_path - reads 16 kHz mono s16le PCM from stdin
    lookahead: int = 3                               # [0..7] --stream: frames of audio past each frame the generator waits for (7 = the file path's frames, 0.41 s delay; 3 = 0.25 s, lips measured as good)
    malloc_tune: bool = True                         # re-exec with glibc malloc settings when the U-Net runs in PyTorch on CPU (~1.4x, SPEC §11)


# ----------------------------------------------------------------------------------------------
# Design constants
CPU_BATCH, GPU_BATCH = 1, 16      # batching is slower per frame on a CPU, faster on a GPU (SPEC §11)
MEL_MARGIN = 4                    # extra mel frames each side of a chunk: makes chunked mel == whole mel
READ_AHEAD = 8                    # decoded template frames waiting for the model
WRITE_BEHIND = 8                  # generated frames waiting to be pasted and encoded
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
MAX_AUDIO_HOURS = 10              # longer audio is refused (it would take days on a CPU)


class Cancelled(UserError):
    """render() was asked to stop (should_stop returned True); no output is left behind."""


# ----------------------------------------------------------------------------------------------
# The generator
def resolve_checkpoint(name, ckpt_root=None, checkpoint=""):
    """The checkpoint file to use: an explicit path, else utils.default_generator_checkpoint (last.pth, else best.pth)."""
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint not found: {checkpoint}")
        return Path(checkpoint)
    folder = Path(ckpt_root or utils.CHECKPOINT_DIR) / utils.check_name(name, "avatar name")
    found = utils.default_generator_checkpoint(folder)
    if found is not None:
        return found
    raise UserError(f"no checkpoint for {name!r} in {folder} (looked for last.pth and best.pth); "
                    f"train one first: python train_328.py --name {name}")


class LipSyncModel:
    """A trained avatar generator loaded once from one checkpoint file (UNet328 weights, widths, the features' AudioEncoder)."""

    def __init__(self, checkpoint, device="auto", backend="auto", batch_size=0):
        self.path = Path(checkpoint)
        cached = runner.cached_generator(self.path, backend) if runner.torch_free(device, backend) else None
        if cached is not None:      # ONNX Runtime / OpenVINO only, PyTorch never imported: ~0.4 GB less memory
            self.runner, self.audio_encoder, info = cached
            self.device, self.unet, self.batch_size = "cpu", None, batch_size or CPU_BATCH
        else:
            info = self._load_torch(device, backend, batch_size)
        self.widths, self.step, self.config = info["widths"], info["step"], info["config"]
        self.guidance = info.get("guidance") or GUIDANCE    # a file's default push: the checkpoint's fitted one (guidance_fit.py)
        self.guidance_photo = info.get("guidance_photo") or self.guidance    # a photo's (fitted apart; older files: the same)
        self.mask = info["mask"]                    # the area it repaints: bool (320, 320), None = MASK_RECT
        self.ref_bank = info.get("ref_bank")        # (crops, keys) of --reference audio, None when trained without it
        self._silent = None                         # silent_window(), made on first use

    def guidance_for(self, template, live=False):
        """The default guidance over `template`: a photo's (one frame: its silent pass is kept, live too), else the frames'."""
        return self.guidance_photo if template.n == 1 else LIVE_GUIDANCE if live else self.guidance

    @property
    def source(self):
        """The audio feature source its encoder reads (audio_features.SOURCES)."""
        return getattr(self.audio_encoder, "source", "mel")

    def _load_torch(self, device, backend, batch_size):
        import torch
        from unet_328 import fold_bn
        self.device = device if isinstance(device, torch.device) else utils.get_device(device)
        unet, enc, info = runner.load_generator(self.path)
        # BN folded into the convs: same outputs, ~2x faster on CPU with channels_last (SPEC §11)
        self.unet = fold_bn(unet).to(self.device, memory_format=torch.channels_last)
        self.audio_encoder = fold_bn(enc).to(self.device)
        self.batch_size = batch_size or (CPU_BATCH if self.device.type == "cpu" else GPU_BATCH)
        self.runner = runner.make_runner(self.unet, self.device, backend, self.batch_size, self.path)
        if self.runner.kind in runner.GRAPH_KINDS:
            runner.cache_generator(self.path, self.audio_encoder, info)
            if (graph := runner.onnx_cache_path(self.path, "audio")).is_file() and self.device.type == "cpu":
                self.audio_encoder = runner.OrtAudio(graph.read_bytes())   # in ONNX Runtime too (no torch threads beside it)
        return info

    # -- audio -------------------------------------------------------------------------------
    def features(self, wav, start=0, stop=None):
        """Audio-encoder vectors [stop - start, 512] of video frames start..stop-1 of `wav`
        (float32 16 kHz mono), equal to those of the whole wav but computed from the samples
        around those frames only, so long audio is processed in constant memory."""
        n = media_io.num_frames(len(wav))
        stop = n if stop is None else min(stop, n)
        if stop <= start:
            return np.zeros((0, utils.FEAT_DIM), np.float32)
        if self.source != "mel":
            from audio_features import encode_audio
            # speech embeddings see 0.38 s (+ a 30 ms chunk context) each side, on an 80 ms (2 frame) chunk grid from
            # the wav's start: 14 frames of audio each side, a slice on that grid (both: and on the mel's 5-frame grid)
            base = max(0, (start - 14) // (2 if self.source == "speech" else 10) * (2 if self.source == "speech" else 10))
            s0, s1 = base * SR // FPS, min(len(wav), (stop + 14) * SR // FPS)
            return np.asarray(encode_audio(wav[s0:s1], self.audio_encoder, self.device, batch=256, n_frames=stop - base,
                                           first=start - base), np.float32)
        # A chunk starting at a multiple of 5 video frames starts at a whole mel frame (5 frames =
        # 16 mel frames), so window positions relative to the chunk are the global ones shifted.
        base = max(0, (start - 5) // 5 * 5)                       # >= 5 frames of context before start
        m0 = base * MEL_FPS // FPS
        t_mel = len(wav) // HOP + 1                               # mel frames of the whole wav
        m1 = min(t_mel, int(media_io.mel_window_starts([stop - 1])[0]) + MEL_WIN)   # mel frames the windows read
        s0 = max(0, (m0 - MEL_MARGIN) * HOP)
        s1 = min(len(wav), self.feature_reach(stop))              # mel frame m1 - 1 is whole: the same as the whole wav's
        mel = media_io.melspectrogram(wav[s0:s1])[:, m0 - s0 // HOP:m1 - s0 // HOP]   # (80, m1 - m0)
        if isinstance(self.audio_encoder, runner.OrtAudio):
            return self.audio_encoder(media_io.mel_windows(mel, np.arange(start - base, stop - base)))
        from audio_features import encode_audio
        feats = encode_audio(mel, self.audio_encoder, self.device, batch=256, n_frames=stop - base,
                             first=start - base)     # (stop - start, 512): the frames before are mel context only
        return np.asarray(feats, np.float32)

    def feature_reach(self, stop):
        """Samples of audio (from the wav's start) that features(wav, a, stop) reads: once a stream
        holds this many, the features of frames < stop are final (equal to the whole wav's)."""
        if self.source != "mel":
            return (stop + 14) * SR // FPS      # the speech embedding's reach (beyond the mel's)
        last = int(media_io.mel_window_starts([stop - 1])[0]) + MEL_WIN - 1     # the last mel frame read
        return last * HOP + N_FFT // 2                 # its centred STFT window ends here (pre-emphasis looks back only)

    # -- the U-Net -----------------------------------------------------------------------------
    def generate_crops(self, ref_crops, masked, audio_windows, guidance=GUIDANCE, stills=None):
        """Batched generator: reference and masked 320 crops (B, 320, 320, 3) uint8 BGR, audio
        windows (B, 32, 16, 16) -> painted 320 crops (B, 320, 320, 3) uint8 BGR (compose.guide; stills: a StillCache)."""
        img = np.empty((len(masked), 6) + masked.shape[1:3], np.float32)    # [reference | masked] NCHW, filled in place:
        img[:, :3], img[:, 3:] = ref_crops.transpose(0, 3, 1, 2), masked.transpose(0, 3, 1, 2)   # 0.25 ms a frame, not 1.8
        silent = self.silent_window() if np.any(np.asarray(guidance) != 1.0) else None
        out = guide(self.runner, np.multiply(img, np.float32(1 / 255), out=img), np.ascontiguousarray(audio_windows, np.float32), silent, guidance, stills)
        return (out.transpose(0, 2, 3, 1) * 255 + 0.5).clip(0, 255).astype(np.uint8)

    def paint(self, crops, ref_crops, audio_windows, guidance=GUIDANCE, stills=None):
        """328 face crops [B] of the template, their reference 320 crops [B], audio windows
        (B, 32, 16, 16) -> the generated 320 centres (B, 320, 320, 3) uint8 BGR (masked as trained)."""
        masked = geometry.mask_inner(np.stack([geometry.inner(c) for c in crops]), self.mask)
        return self.generate_crops(np.stack(ref_crops), masked, audio_windows, guidance, stills)

    def silent_window(self):
        """The audio window (32, 16, 16) of two seconds of digital silence: what guidance moves away from."""
        if self._silent is None:
            self._silent = media_io.feature_window(self.features(np.zeros(2 * SR, np.float32)), FPS)   # its middle frame
        return self._silent

    # -- whole frames ---------------------------------------------------------------------------
    def frames(self, wav, template, opts=RenderOptions(), stats=None):
        """Iterator of finished BGR frames (template size), one per video frame of `wav`."""
        for item in self._generate(wav, template, opts, stats):
            yield compose(item, opts, self.mask)

    def _generate(self, wav, template, opts, stats):
        """Streams (frame, box, crop328, generated320, closed_ref320, gate level dB, mouth region) per output frame;
        template decoding runs in a reader thread READ_AHEAD frames ahead of the model."""
        n = media_io.num_frames(len(wav))
        feats = stream.FeatureStream(self, wav)
        loud, stats = vad.gate_loudness_db(wav, n, vad.use_vad(opts.vad)), stats if stats is not None else {}
        push = frame_guidance(opts, wav, n, loud, self.config.get("name"), (self.config.get("data_root"), utils.DATASET_DIR), stats)
        refs = References(template, opts.reference, opts.seed, self.ref_bank)
        q, stop, stills = queue.Queue(READ_AHEAD), threading.Event(), StillCache() if template.n == 1 else None   # a photo's silent pass: once

        def reader():
            try:
                for k, (j, frame, box) in enumerate(template.stream(opts.start_frame, n)):
                    t = time.perf_counter()
                    crop = geometry.crop_face(frame, box)                                  # (328, 328, 3)
                    item = (frame, box, crop, refs.crop(k, j))
                    _add(stats, "decode+crop", time.perf_counter() - t)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:   # handed to the consumer, which re-raises it
                q.put(e)

        (th := threading.Thread(target=reader, daemon=True, name="template-reader")).start()
        try:
            k, done = 0, False
            while not done:
                batch = []
                while len(batch) < self.batch_size:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                if not batch:
                    break
                t = time.perf_counter()
                aud = np.stack([feats.window(k + i) for i in range(len(batch))])      # (B, 32, 16, 16)
                _add(stats, "audio features", time.perf_counter() - t)
                t = time.perf_counter()
                ref = refs.by_audio(aud) if refs.mode == "audio" else [b[3] for b in batch]
                gen = self.paint([b[2] for b in batch], ref, aud, push[k:k + len(batch)], stills)
                _add(stats, "model", time.perf_counter() - t)
                for i, (frame, box, crop, _) in enumerate(batch):
                    yield frame, box, crop, gen[i], refs.closed, loud[k + i], refs.mouth
                k += len(batch)
        finally:
            stop.set()
            th.join(timeout=5)

    # -- the whole job ---------------------------------------------------------------------------
    def render(self, audio_path, out_path, template, opts=RenderOptions(), progress=None, should_stop=None,
               stats=None, tmp_dir=None):
        """Write the lip-synced mp4 for `audio_path` to `out_path` (renamed into place only when
        complete) and return its Path. progress(done, total) after each frame; should_stop()
        returning True aborts with Cancelled and leaves nothing at out_path."""
        stats = stats if stats is not None else {}
        out_path = media_io.check_output(out_path)
        t = time.perf_counter()
        wav = load_speech(audio_path)
        _add(stats, "load audio", time.perf_counter() - t)
        n = media_io.num_frames(len(wav))
        if tmp_dir is not None:
            Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix="lipsync-audio-", dir=tmp_dir))   # tmp_dir None: the system's
        try:
            # the original audio track alone: a video or cover picture in the audio file must not become the output's video
            audio_only = tmpdir / "audio.mka"             # Matroska takes any codec: a copy, no re-encode
            try:
                media_io.run_ffmpeg(["-i", audio_path, "-map", "0:a:0", "-vn", "-c:a", "copy", audio_only],
                                 what="extracting the audio track")
            except UserError:
                audio_only = tmpdir / "audio.wav"
                media_io.run_ffmpeg(["-i", audio_path, "-map", "0:a:0", "-vn", "-c:a", "pcm_s16le", audio_only],
                                 what="extracting the audio track")
            q = queue.Queue(WRITE_BEHIND)
            err = []

            def writer(vw):
                try:
                    while (item := q.get()) is not None:
                        t0 = time.perf_counter()
                        frame = compose(item, opts, self.mask)
                        t1 = time.perf_counter()
                        vw.write(frame)
                        _add(stats, "encode", time.perf_counter() - t1)
                        _add(stats, "paste", t1 - t0)
                except BaseException as e:
                    err.append(e)
                    while q.get() is not None:     # drain so the producer never blocks
                        pass

            with media_io.VideoWriter(out_path, *template.size, audio=audio_only, crf=opts.crf) as vw:
                th = threading.Thread(target=writer, args=(vw,), daemon=True, name="paste-writer")
                th.start()
                try:
                    for i, item in enumerate(self._generate(wav, template, opts, stats)):
                        if should_stop is not None and should_stop():
                            raise Cancelled("stopped on request; no output written")
                        if err:
                            break
                        q.put(item)
                        if progress is not None:
                            progress(i + 1, n)
                finally:
                    q.put(None)
                    th.join()
                if err:
                    raise err[0]
            media_io.readable(out_path)
            stats["frames"] = n
            return out_path
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _add(stats, key, dt):
    if stats is not None:
        stats[key] = stats.get(key, 0.0) + dt


# ----------------------------------------------------------------------------------------------
# Audio loading, output names
def load_speech(path):
    """media_io.load_audio plus the checks inference needs: not empty, not absurdly long."""
    wav = media_io.load_audio(path)
    if media_io.num_frames(len(wav)) < 1:
        raise UserError(f"{path}: the audio is {len(wav) / SR * 1000:.0f} ms long, shorter than one video frame (40 ms)")
    if len(wav) > MAX_AUDIO_HOURS * 3600 * SR:
        raise UserError(f"{path}: the audio is {len(wav) / SR / 3600:.1f} h long; split it into parts under {MAX_AUDIO_HOURS} h")
    return wav


def default_output(name, audio_path, checkpoint):
    """result/NAME_AUDIO_CKPT.mp4; audio other than .wav keeps its extension in the name
    (NAME_AUDIO-mp3_CKPT.mp4), so a.mp3, a.m4a and a.wav do not overwrite each other's video."""
    ext = re.sub(r"[^a-z0-9]", "", Path(audio_path).suffix.lower())
    stem = utils.safe_stem(audio_path) + (f"-{ext}" if ext and ext != "wav" else "")
    return utils.REPO / "result" / f"{name}_{stem}_{Path(checkpoint).stem}.mp4"


def maybe_reexec_with_malloc_env(cfg):
    """glibc reads its malloc settings at start-up only: re-run this process once with them set,
    when the U-Net will run in PyTorch on the CPU. Measured: ~1.4x for eager PyTorch (SPEC §11),
    nothing for ONNX Runtime (own allocator: 1.62 vs 1.67 frames/s), so with ORT it is skipped."""
    import importlib.util
    ort_likely = cfg.backend in ("auto", *runner.GRAPH_KINDS) and all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    if (cfg.malloc_tune and not ort_likely and cfg.device in ("auto", "cpu") and sys.platform.startswith("linux")
            and not os.environ.get("LIPSYNC_REEXEC") and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items())):
        env = dict(os.environ, LIPSYNC_REEXEC="1", **MALLOC_ENV)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(cfg):
    utils.check_config(cfg)
    from tqdm import tqdm
    if not cfg.name and not cfg.checkpoint:
        raise UserError("no avatar given: python inference_328.py --name NAME --audio_path AUDIO "
                        "(with --template, --name or --checkpoint says which trained model to use)")
    if not cfg.name and not cfg.template:
        raise UserError("--checkpoint without --name needs --template IMAGE_OR_VIDEO (the frames to animate)")
    if not cfg.audio_path:
        raise UserError("no audio given: python inference_328.py --name NAME --audio_path AUDIO")
    if cfg.name:
        utils.check_name(cfg.name, "avatar name")
    if cfg.audio_path == "-" and not (cfg.stream and cfg.out):
        raise UserError("--audio_path - (16 kHz mono s16le PCM from stdin) needs --stream and --out FILE.mp4")
    ckpt = resolve_checkpoint(cfg.name, cfg.ckpt_root, cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else default_output(cfg.name or "template", cfg.audio_path, ckpt)
    media_io.check_output(out)
    if cfg.audio_path != "-":
        media_io.probe(cfg.audio_path)        # a bad audio file fails now, not after loading the model
    template = open_template(cfg.name, cfg.data_root, cfg.template, cfg.other_person)
    try:
        if not 0 <= cfg.start_frame < template.n:
            raise UserError(f"--start_frame {cfg.start_frame} is outside the template's {template.n} frames (0..{template.n - 1})")
        with_vad = vad.use_vad(cfg.vad)          # --vad on without the detector fails now
        t0 = time.perf_counter()
        model = LipSyncModel(ckpt, cfg.device, cfg.backend, cfg.batch_size)
        opts = RenderOptions.from_config(cfg, default=model.guidance_for(template, live=cfg.stream))
        print(f"model: {ckpt} (step {model.step}, widths {model.widths}) on {model.device}, "
              f"U-Net runtime {model.runner.kind}, batch {model.batch_size}, loaded in {time.perf_counter() - t0:.1f} s; "
              f"silence gate: {'voice activity + loudness' if with_vad else 'loudness'}; guidance {opts.guidance:g}"
              + (f" x (1 + {opts.band_push:g} x the 1-5 kHz energy's z-score)" if opts.band_push > 0 else ""))
        if cfg.stream:
            return stream.main(cfg, model, template, out)
        bar = tqdm(unit="f", desc="lip-sync", dynamic_ncols=True)

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        stats, t0 = {}, time.perf_counter()
        model.render(cfg.audio_path, out, template, opts, progress=progress, stats=stats)
        bar.close()
    finally:
        template.close()
    dt = time.perf_counter() - t0
    d, w, c = stats.get("voice_distance"), stats.get("band_push", 0), stats.get("closures", 0)
    print(f"done: {out}  {stats['frames']} frames in {dt:.1f} s ({stats['frames'] / dt:.2f} frames/s)" + ("" if d is None else
          f"; voice {'not ' * (w > 0)}the avatar's recorded one (distance {d:.2f}): band push {w:g}") + ((f"; mouth shaped at {stats['closures_found']} p/b/m/f/v/w/u and open vowels" if stats.get('closures_found') is not None else "; lips not shut for p/b/m: the hama package is missing (pip install -r requirements.txt)") if c > 0 else ""))
    return out


if __name__ == "__main__":
    _cfg = utils.parse_config(Config, description=__doc__.split("\n")[0], aliases={"audio": "audio_path"})
    maybe_reexec_with_malloc_env(_cfg)
    utils.run_main(main, _cfg)
