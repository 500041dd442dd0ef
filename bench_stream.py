"""Benchmark of live lip sync (stream.py): first-frame latency, sustained frames/s, real-time
factor, frames dropped when audio arrives in real time, A/V drift after 10 minutes, peak memory;
per U-Net widths, each in its own process.

    python bench_stream.py                                   # light and full widths, random weights (s2d stem), anchor clip
    python bench_stream.py --name anna --checkpoint checkpoint/anna/last.pth --widths trained
    python bench_stream.py --widths light --seconds 4 --drift_seconds 60     # CPU smoke run

Cases, per widths:
  as fast as possible  all the audio pushed at once in 100 ms pieces, every frame made: the U-Net
                       in one thread, the paste and a JPEG (what the server sends) in a second:
                       sustained frames/s, real-time factor (seconds of audio per second of
                       work), the time of each stage per frame
  real time            100 ms pieces pushed at the pace they would be recorded; a frame whose
                       time has passed by more than MAX_LAG is skipped (as the server does):
                       first-frame latency (from the first piece's arrival, and from the start of
                       the audio), frames made and dropped, the largest lag
  drift                DRIFT_SECONDS of audio through a session's timeline (frames skipped, so
                       minutes not hours): |audio seconds - frames / 25| at the end
"""
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import utils
from compose import RenderOptions
from bench_inference import ensure_dataset, lift_bf16_check, random_checkpoint, speech
from utils import FPS, SR, UserError

PIECE = SR // 10            # samples per pushed piece (100 ms)
MAX_LAG = 0.5               # s: a frame later than this behind real time is skipped


@dataclass
class Config:
    name: str = ""                 # avatar dataset; default: the anchor clip processed into --work (bench_inference)
    data_root: str = str(utils.DATASET_DIR)   # where --name lives
    checkpoint: str = ""           # generator checkpoint (with --widths trained)
    work: str = "/tmp/bench_inference"        # scratch folder (dataset, checkpoints, audio)
    widths: str = "light,full"     # comma list of light, narrow, full (random weights) and trained (= --checkpoint)
    stem: str = "s2d"              # the random U-Nets' first level: s2d (train_328's default) or conv (models trained before round 11)
    seconds: float = 8.0           # audio of the fast and real-time cases, s
    drift_seconds: float = 600.0   # audio of the drift case, s
    lookahead: int = 3             # [0..7] frames of look-ahead (stream.LIVE_LOOKAHEAD, the live default)
    guidance: float = -1.0         # [-1..4] inference_328 --guidance (a second U-Net pass when != 1); -1 = a live stream's default (compose.LIVE_GUIDANCE)
    backend: str = "auto"          # U-Net runtime (inference_328 --backend)
    threads: int = 0               # [0..] torch/ORT threads; 0 = torch's default
    part: str = ""                 # internal: the case a child process runs
    arg: str = ""                  # internal: the child's argument (json)


def case(arg):
    """One widths in this process -> dict of figures."""
    import cv2
    import inference_328 as inf
    import stream
    import templates
    import media_io
    if arg["threads"]:
        import torch
        torch.set_num_threads(arg["threads"])
    lift_bf16_check(arg["ckpt"])
    model = inf.LipSyncModel(arg["ckpt"], "cpu", arg["backend"])
    tpl = templates.open_template(arg["name"], arg["data_root"])
    wav = media_io.load_audio(arg["audio"])
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2")
    opts = RenderOptions(guidance=arg["guidance"]) if arg["guidance"] >= 0 else None     # None: LiveSession's default
    res = dict(widths=list(model.widths), runtime=model.runner.kind, torch_loaded="torch" in sys.modules,
               load=round(os.getloadavg()[0], 2), guidance=arg["guidance"])

    # as fast as possible: the U-Net paints in this thread, a second pastes and JPEG-encodes (the server's split)
    sess = stream.LiveSession(model, tpl, opts, lookahead=arg["lookahead"])
    res["delay_s"] = round(sess.delay(), 4)
    stages, t0 = {}, time.perf_counter()
    with Paster(sess, cv2, stages) as paster:
        for i in range(0, len(pcm), PIECE):
            sess.push(pcm[i:i + PIECE])
            _paint_all(sess, paster, stages)
        sess.finish()
        _paint_all(sess, paster, stages)
    dt = time.perf_counter() - t0
    n = paster.done
    res.update(frames=n, fps=round(n / dt, 2), rtf=round(len(wav) / SR / dt, 2),
               ms_per_frame={k: round(1000 * v / max(n, 1), 1) for k, v in stages.items()})

    # real time: pieces arrive at the pace they are recorded; frames too late are skipped
    sess = stream.LiveSession(model, tpl, opts, lookahead=arg["lookahead"])
    start, lag_max, i = time.perf_counter(), 0.0, 0
    with Paster(sess, cv2, {}, start) as paster:
        while i < len(pcm) or not sess.done():
            now = time.perf_counter() - start
            if i < len(pcm) and now >= (i + PIECE) / SR:          # the next piece has been "recorded"
                sess.push(pcm[i:i + PIECE])
                i += PIECE
                if i >= len(pcm):
                    sess.finish()
                continue
            if sess.ready():
                late = now - (sess.k / FPS + sess.delay())          # behind the earliest possible time
                if late > MAX_LAG:
                    sess.skip()
                    continue
                paster.put(sess.next_painted())
                lag_max = max(lag_max, late)
            else:
                time.sleep(0.002)
    first = paster.first
    res["realtime"] = dict(first_frame_after_first_piece_s=round(first - PIECE / SR, 3),
                           first_frame_after_audio_start_s=round(first, 3), made=paster.done, dropped=sess.dropped,
                           max_lag_s=round(lag_max, 3))

    # drift: a long timeline, frames skipped
    sess = stream.LiveSession(model, tpl, opts, lookahead=arg["lookahead"])
    total = int(arg["drift_seconds"] * SR)
    t0, pushed = time.perf_counter(), 0
    while pushed < total:
        piece = pcm[pushed % len(pcm):pushed % len(pcm) + PIECE]
        sess.push(piece)
        pushed += len(piece)
        while sess.skip() is not None:
            pass
    sess.finish()
    while sess.skip() is not None:
        pass
    res["drift"] = dict(audio_s=pushed / SR, frames=sess.k, drift_ms=round(1000 * abs(pushed / SR - sess.k / FPS), 2),
                        seconds=round(time.perf_counter() - t0, 1))
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return res


def _paint_all(sess, paster, stages):
    while True:
        t = time.perf_counter()
        part = sess.next_painted()
        if part is None:
            return
        stages["paint"] = stages.get("paint", 0.0) + time.perf_counter() - t
        paster.put(part)


class Paster:
    """The second thread: paste + JPEG of each painted frame; counts them and times the first."""

    def __init__(self, sess, cv2, stages, start=None):
        import queue
        import threading
        self.sess, self.cv2, self.stages, self.start = sess, cv2, stages, start
        self.q, self.done, self.first = queue.Queue(8), 0, None
        self.th = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.th.start()
        return self

    def __exit__(self, *exc):
        self.q.put(None)
        self.th.join()

    def put(self, part):
        self.q.put(part)

    def _run(self):
        while (part := self.q.get()) is not None:
            t = time.perf_counter()
            image = self.sess.paste(part)
            t1 = time.perf_counter()
            self.cv2.imencode(".jpg", image, [self.cv2.IMWRITE_JPEG_QUALITY, 80])
            self.stages["paste"] = self.stages.get("paste", 0.0) + t1 - t
            self.stages["jpeg"] = self.stages.get("jpeg", 0.0) + time.perf_counter() - t1
            self.done += 1
            if self.first is None and self.start is not None:
                self.first = time.perf_counter() - self.start


def main(cfg):
    utils.check_config(cfg)
    if cfg.part == "warm":            # exports and checks the graphs once, so the measured case loads without PyTorch
        import inference_328
        a = json.loads(cfg.arg)
        lift_bf16_check(a["ckpt"])
        inference_328.LipSyncModel(a["ckpt"], "cpu", a["backend"])
        return
    if cfg.part:
        print("RESULT " + json.dumps(case(json.loads(cfg.arg))), flush=True)
        return
    name, root = ensure_dataset(cfg)
    audio = speech(cfg.seconds, cfg.work)
    from unet_328 import WIDTHS     # here, not at the top: a case's process must not load torch
    rows = []
    for w in [x.strip() for x in cfg.widths.split(",") if x.strip()]:
        if w == "trained":
            if not cfg.checkpoint:
                raise UserError("--widths trained needs --checkpoint PATH")
            ckpt = cfg.checkpoint
        elif w in WIDTHS:
            ckpt = Path(cfg.work) / f"random_{w}{'' if cfg.stem == 'conv' else '_' + cfg.stem}.pth"
            if not ckpt.is_file():
                random_checkpoint(ckpt, w, stem=cfg.stem)
        else:
            raise UserError(f"--widths {w!r}: use {', '.join(WIDTHS)} or trained")
        arg = dict(ckpt=str(ckpt), name=name, data_root=root, audio=str(audio), lookahead=cfg.lookahead,
                   guidance=cfg.guidance, backend=cfg.backend, threads=cfg.threads, drift_seconds=cfg.drift_seconds)
        subprocess.run([sys.executable, __file__, "--part", "warm", "--arg", json.dumps(arg)], capture_output=True)
        r = subprocess.run([sys.executable, __file__, "--part", "case", "--arg", json.dumps(arg)],
                           capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        if r.returncode != 0 or line is None:
            raise UserError(f"the {w} case failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        res = json.loads(line[7:])
        res["case"] = w
        rows.append(res)
        print(json.dumps(res), flush=True)
    print(f"\n{'widths':8} {'U-Net in':8} {'fps':>6} {'RTF':>5} {'delay s':>7} {'first frame s':>13} {'dropped (real time)':>20} "
          f"{'drift ms':>9} {'peak MB':>8} {'load':>5}")
    for r in rows:
        rt = r["realtime"]
        print(f"{r['case']:8} {r['runtime']:8} {r['fps']:6.2f} {r['rtf']:5.2f} {r['delay_s']:7.3f} {rt['first_frame_after_audio_start_s']:13.3f} "
              f"{rt['dropped']:>10} of {rt['made'] + rt['dropped']:<7} {r['drift']['drift_ms']:9.2f} {r['peak_rss_mb']:8} {r['load']:5.2f}")
    return rows


if __name__ == "__main__":
    utils.run_main(main, utils.parse_config(Config, description=__doc__.split("\n")[0]))
