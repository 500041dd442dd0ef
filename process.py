"""Turn a talking-head video into a training dataset, offline.

    python process.py my_video.mp4                       # -> dataset/my_video/
    python process.py my_video.mp4 --name anna --overwrite
    python process.py ../shared/media/fps30_6s.mp4 --name smoke   # CPU smoke run, ~10 s

dataset/NAME/ gets:
    video.mp4      the video at 25 fps (stream-copied when it already is constant 25 fps)
    aud.wav        16 kHz mono PCM
    frames/        every frame as JPEG (quality 95: ~10x smaller than PNG and decoded only once
                   more, for the crop cache and as inference templates)
    landmarks.npz  lms [N,68,2] smoothed, lms_raw [N,68,2] (NaN = no face), boxes [N,4] face
                   boxes, found [N], filled [N] (interpolated frames), crop_boxes [N,4]
    crops.npy      uint8 [N,328,328,3] face crops (the training set reads these, not the frames)
    mel.npy        float32 [80, T] log-mel of the whole wav, 80 frames per second (SPEC §5)
    meta.json      source, fps, frame count, duration, resolution, backend, versions, gaps
"""
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import av_offset
import geometry
import landmarks
import media_io
import templates
import utils
from utils import FPS, SR, UserError


WARN_SECONDS = 60        # shorter videos are processed with a warning: quality suffers below about a minute


@dataclass
class Config:
    video: str = ""                 # input video (any format ffmpeg reads)
    name: str = ""                  # dataset name; default: the video's file stem
    data_root: str = str(utils.DATASET_DIR)  # where datasets live
    overwrite: bool = False         # replace an existing dataset of the same name
    backend: str = "dlib"           # landmark backend: dlib (offline default) or face_alignment
    device: str = "cpu"             # device for the face_alignment backend
    detect_every: int = landmarks.DETECT_EVERY    # [1..] run the face detector every N frames, track in between (0.3 s)
    max_side: int = landmarks.DETECT_MAX_SIDE     # [64..] detect on a copy downscaled to this side, px (landmarks use full size)
    max_gap: int = landmarks.MAX_GAP              # [0..] interpolate faceless gaps up to this many frames (0.5 s)
    min_face_share: float = 0.5     # [0..1] fail when fewer frames than this share have a face
    smooth_sigma: float = landmarks.SMOOTH_SIGMA  # [0..] temporal gaussian on landmarks, frames (removes crop jitter)
    jpeg_quality: int = 95          # [1..100] frames/*.jpg quality
    min_frames: int = 65            # [1..] refuse shorter videos: SyncNet training needs 65 frames (2.6 s); a warning below WARN_SECONDS
    av_offset: str = "auto"         # audio-video offset: auto = measure it (av_offset.py) and shift the audio when it is clear and >= 2 frames; N = shift the audio N frames earlier (+ = it was late; 0 = keep it as recorded, still measured)


def normalise_video(src, info, dst):
    """Copy the video stream when it is constant 25 fps and unrotated, else re-encode to 25 fps."""
    v = info["video"]
    cfr25 = v["fps"] is not None and abs(v["fps"] - FPS) < 0.01 and (v["tbr"] is None or abs(v["tbr"] - FPS) < 0.01)
    if cfr25 and not v["rotation"] and v["codec"] in ("h264", "hevc", "mpeg4"):
        media_io.run_ffmpeg(["-i", src, "-map", "0:v:0", "-c:v", "copy", "-an", dst], what="copying the video")
        return False
    media_io.run_ffmpeg(["-i", src, "-map", "0:v:0", "-vf", f"fps={FPS}", "-c:v", "libx264", "-crf", "17",
                      "-preset", "veryfast", "-pix_fmt", "yuv420p", "-an", dst], what="re-encoding to 25 fps")
    return True


def extract_audio(src, dst):
    media_io.run_ffmpeg(["-i", src, "-map", "0:a:0", "-vn", "-ac", "1", "-ar", SR, "-c:a", "pcm_s16le", dst],
                     what="extracting audio")
    import soundfile as sf
    wav, sr = sf.read(str(dst), dtype="float32")
    assert sr == SR
    return wav


@contextmanager
def writer_pool(n):
    """Threads for the frame and crop writes, stopped and joined on leaving: on an error or Ctrl-C
    their pending writes are cancelled first, so nothing writes into a temp dataset being removed."""
    pool = ThreadPoolExecutor(n)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def parse_av_offset(text):
    """--av_offset -> None (auto) or a whole number of frames."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        n = int(str(text).strip())
    except ValueError:
        n = None
    if n is None or abs(n) > 5 * FPS:
        raise UserError(f"--av_offset {text!r}: use auto or a whole number of frames within +-{5 * FPS} "
                        "(+ = the audio is late and moves earlier)")
    return n


def apply_av_offset(wav, opening, mode):
    """Measure the recording's audio-video offset and shift the audio as `mode` says ->
    (wav, its mel, meta record, message or None); the mel is computed again only when shifted."""
    mel = media_io.melspectrogram(wav)
    av = av_offset.measure(opening, mel)
    d, forced = av["frames"], parse_av_offset(mode)
    clear = d is not None and abs(d) >= av_offset.WARN_FRAMES
    shift = forced if forced is not None else (d if clear else 0)
    msg = None
    if clear:
        said = (f"the audio is {abs(d)} frames ({40 * abs(d)} ms) {'late' if d > 0 else 'early'} against the lips "
                f"(held-out r {av['r']:.2f} at that shift, {av['r_at_0']:.2f} unshifted)")
        msg = (f"warning: {said}; shifted it to match (--av_offset 0 keeps it as recorded)" if forced is None else
               f"warning: {said}; kept it as recorded: training learns the offset (--av_offset auto shifts it)" if shift == 0
               else f"warning: {said}; shifted it by {shift} frames as --av_offset asks")
    elif shift:
        msg = f"note: audio shifted by {shift} frames as --av_offset asks (measured offset: {d if d is not None else 'unclear'})"
    elif d is None and abs(av["peak"]) >= av_offset.WARN_FRAMES:   # a peak, but not one to trust: say so, change nothing
        msg = (f"note: the audio-video offset is unclear (best shift {av['peak']:+d} frames, held-out r {av['r']:.2f} against "
               f"{av['r_at_0']:.2f} unshifted: too short or too little clear speech to be sure); kept the audio as recorded. "
               f"If the lips of the results lag or lead the voice, process again with --av_offset N (+ = audio late)")
    record = dict(av, mode=str(mode), applied=int(shift))
    if shift:
        wav = av_offset.shift_audio(wav, shift)
        mel = media_io.melspectrogram(wav)
    return wav, mel, record, msg


def main(cfg):
    """Video -> dataset/NAME (module docstring); returns the dataset folder."""
    utils.check_config(cfg)
    parse_av_offset(cfg.av_offset)
    t0 = time.time()
    src, name, final, info = check_video(cfg)
    detector = landmark_detector(cfg)
    # JPEG encoding releases the GIL: two writer threads overlap it with the landmarks
    with utils.atomic_dir(final) as ds, writer_pool(2) as pool:
        media = extract_media(src, info, ds)
        track = frames_and_landmarks(ds, pool, media, detector, cfg, src)
        found = track["found"]
        smooth, filled, long_gaps = landmarks.clean_track(track["lms"], found, cfg.max_gap, cfg.smooth_sigma)
        boxes = np.stack([geometry.crop_box(l) for l in smooth])
        write_crops(ds, pool, boxes)
        wav, mel, audio_fix_ms, av_record, av_msg = align_audio(ds, media["wav"], len(found), smooth, cfg)
        np.savez(ds / utils.LANDMARKS, lms=smooth, lms_raw=track["lms"].astype(np.float32),
                 boxes=track["boxes"].astype(np.float32), found=found, filled=filled | long_gaps,
                 crop_boxes=boxes)
        meta = dataset_meta(src, name, info, media, wav, mel, audio_fix_ms, av_record, detector, track, filled,
                            long_gaps, cfg)
        (ds / utils.META).write_text(json.dumps(meta, indent=1))
    report(final, src, meta, media["announced"], av_msg, found, filled, long_gaps, cfg, time.time() - t0)
    return final


def check_video(cfg):
    """The input checks made before any work: a name, no dataset in the way, a video stream, an
    audio track, long enough. -> (source path, dataset name, dataset folder, ffprobe info)."""
    src = Path(cfg.video)
    if not cfg.video:
        raise UserError("no video given: python process.py VIDEO [--name NAME]")
    name = utils.check_name(cfg.name or utils.safe_stem(src), "dataset name")
    final = Path(cfg.data_root) / name
    if final.exists() and not cfg.overwrite:
        raise UserError(f"dataset {final} already exists; pass --overwrite to replace it or choose another --name")
    info = media_io.probe(src)
    if info["video"] is None or not info["video"]["width"]:
        raise UserError(f"{src} has no video stream; give a video of the person speaking")
    if info["audio"] is None:
        raise UserError(f"{src} has no audio track; the model learns from the speech, record with sound")
    frames_est = int(round((info["duration"] or 0) * FPS))
    if info["duration"] and frames_est < cfg.min_frames:
        raise UserError(f"{src} is {info['duration']:.1f} s long; a dataset needs at least {cfg.min_frames / FPS:.1f} s "
                        f"({cfg.min_frames} frames), and 3-5 minutes of speech make a good avatar")
    if info["duration"] and info["duration"] < WARN_SECONDS:
        print(f"warning: {src} is {info['duration']:.0f} s long; the avatar will be rough (3-5 minutes of speech "
              f"train a far better one, see README: What video to record)", file=sys.stderr)
    return src, name, final, info


def landmark_detector(cfg):
    """--backend's face detector + landmark fit; a missing package or weights is a UserError."""
    if cfg.backend not in landmarks.BACKENDS:
        raise UserError(f"unknown --backend {cfg.backend!r}; choose one of {', '.join(landmarks.BACKENDS)}")
    try:
        return landmarks.make_detector(cfg.backend, cfg.device)
    except landmarks.LandmarkError as e:
        raise UserError(str(e)) from None


def extract_media(src, info, ds):
    """Step 1: the video at 25 fps and 16 kHz mono audio into ds. -> dict(reencoded, wav, w, h,
    expect: frames the 25 fps video should hold, announced: frames the source's header says)."""
    reencoded = normalise_video(src, info, ds / "video.mp4")
    wav = extract_audio(src, ds / utils.AUDIO_WAV)
    if media_io.is_silent(wav):
        raise UserError(f"the audio of {src} is silent; the model learns lip motion from speech, so record with sound")
    vinfo = media_io.probe(ds / "video.mp4")
    return dict(reencoded=reencoded, wav=wav, w=vinfo["video"]["width"], h=vinfo["video"]["height"],
                expect=int(round((vinfo["duration"] or info["duration"] or 0) * FPS)),
                announced=int(round((info["duration"] or 0) * FPS)))   # a cut file: more than it holds


def frames_and_landmarks(ds, pool, media, detector, cfg, src):
    """Step 2: every frame to JPEG (in the writer threads) with the landmarks tracked on the same
    pass; then the checks on what was decoded and found. -> landmarks.track_video's dict."""
    (ds / utils.FRAMES_DIR).mkdir()
    quality = [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
    bar = tqdm(total=media["expect"] or None, desc="frames+landmarks", unit="f", dynamic_ncols=True)
    writes = []

    def frames():
        for i, frame in enumerate(media_io.iter_frames(ds / "video.mp4", media["w"], media["h"])):
            writes.append(pool.submit(cv2.imwrite, str(utils.frame_file(ds / utils.FRAMES_DIR, i)), frame, quality))
            bar.update(1)
            yield frame

    track = landmarks.track_video(frames(), detector, detect_every=cfg.detect_every, max_side=cfg.max_side)
    bar.close()
    if not all(f.result() for f in writes):
        raise UserError(f"could not write frames into {ds}; is the disk full?")
    n = len(track["found"])
    if n == 0:
        raise UserError(f"no frames could be decoded from {src}; the file is damaged or not a video")
    if n < cfg.min_frames:
        raise UserError(f"{src} holds only {n} frames; a dataset needs at least {cfg.min_frames} "
                        f"({cfg.min_frames / FPS:.1f} s), and 3-5 minutes of speech make a good avatar")
    found = track["found"]
    if found.sum() == 0:
        raise UserError(f"no face found in any of the {n} frames of {src}; record the speaker's face, frontal and well lit")
    if found.mean() < cfg.min_face_share:
        raise UserError(f"a face was found in only {found.sum()} of {n} frames ({100 * found.mean():.0f}%); "
                        f"at least {100 * cfg.min_face_share:.0f}% are needed: trim the parts without the face")
    return track


def write_crops(ds, pool, boxes):
    """Step 3: the crop cache: the training set reads 328 crops, never the full frames."""
    n = len(boxes)
    crops = np.lib.format.open_memmap(ds / utils.CROPS, mode="w+", dtype=np.uint8, shape=(n, utils.CROP, utils.CROP, 3))

    def crop(i):
        crops[i] = geometry.crop_face(cv2.imread(str(utils.frame_file(ds / utils.FRAMES_DIR, i))), boxes[i])

    for _ in tqdm(pool.map(crop, range(n)), total=n, desc="crops", unit="f", dynamic_ncols=True):
        pass
    pool.shutdown()
    crops.flush()


def align_audio(ds, wav, n, smooth, cfg):
    """Step 4: the audio at least as long as the video (containers often end the two streams tens
    of ms apart): a short track is padded with silence so every frame has its audio, speech is
    never trimmed; then in step with the lips (av_offset.py). Writes aud.wav again when changed,
    and mel.npy. -> (wav, mel, padded ms, av_offset record, message or None)."""
    target = int(round(n * SR / FPS))
    audio_fix_ms = max(0, round(1000 * (target - len(wav)) / SR))
    if audio_fix_ms:
        wav = np.pad(wav, (0, target - len(wav)))
    wav, mel, av_record, av_msg = apply_av_offset(wav, templates.mouth_opening(smooth), cfg.av_offset)
    if audio_fix_ms or av_record["applied"]:
        media_io.write_wav(ds / utils.AUDIO_WAV, wav)
    np.save(ds / utils.MEL, mel)
    return wav, mel, audio_fix_ms, av_record, av_msg


def dataset_meta(src, name, info, media, wav, mel, audio_fix_ms, av_record, detector, track, filled, long_gaps, cfg):
    """meta.json: the facts of the recording and of the processing."""
    found, n = track["found"], len(track["found"])
    return {
        "source": str(src.resolve()), "name": name, "fps": FPS, "frames": n,
        "duration": round(len(wav) / SR, 3), "audio_samples": int(len(wav)), "sample_rate": SR,
        "width": media["w"], "height": media["h"], "source_fps": info["video"]["fps"], "reencoded": media["reencoded"],
        "mel_frames": int(mel.shape[1]), "audio_padded_ms": audio_fix_ms, "av_offset": av_record,
        "frames_announced": media["announced"], "landmark_backend": detector.name,
        "smooth_sigma": cfg.smooth_sigma,
        "faces_seen_max": int(np.max(track["n_faces"])) if len(track["n_faces"]) else 0,
        "no_face_frames": int((~found).sum()), "interpolated_frames": np.flatnonzero(filled).tolist(),
        "held_frames": np.flatnonzero(long_gaps).tolist(),
        "fill": f"gaps <= {cfg.max_gap} frames linearly interpolated; longer gaps bridged the same way and listed in held_frames",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                     "dlib": utils.package_version("dlib-bin")},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(final, src, meta, announced, av_msg, found, filled, long_gaps, cfg, dt):
    """The closing lines: the audio offset, a truncated file, several faces, long gaps, the summary."""
    n, seconds = meta["frames"], meta["audio_samples"] / SR
    if av_msg:
        print(av_msg, file=sys.stderr if av_msg.startswith("warning") else sys.stdout)
    if announced and n < announced - max(5, announced // 20):
        print(f"warning: {src} ends after {n} frames ({n / FPS:.1f} s) although its header announces {announced} "
              f"({announced / FPS:.1f} s): the file looks truncated; the dataset holds what could be decoded", file=sys.stderr)
    if meta["faces_seen_max"] > 1:
        print(f"note: up to {meta['faces_seen_max']} faces in a frame; kept the largest one and tracked it")
    if long_gaps.any():
        print(f"warning: {int(long_gaps.sum())} frames without a face in gaps longer than {cfg.max_gap} frames; "
              "they are bridged by interpolation (consider trimming them)")
    print(f"done: {final}  {n} frames, {seconds:.1f} s, {n / dt:.1f} frames/s, "
          f"{int((~found).sum())} frames without a face ({int(filled.sum())} interpolated)")


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0], positional=("video",)))
