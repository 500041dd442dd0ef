"""A training run's record (train_328.py): log lines to the console and log.txt, optional
TensorBoard scalars, the speed of its steps (data vs compute time, samples/s), and preview PNGs
(reference | masked | prediction | truth)."""
import time

import cv2
import numpy as np
from tqdm import tqdm

import utils
from utils import UserError


def to_img(t):   # (3, H, W) float in [0, 1] -> (H, W, 3) uint8 BGR
    return (t.detach().float().clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()


def save_preview(path, ref, masked, pred, target, rows=2):
    grid = np.concatenate([np.concatenate([to_img(x[i]) for x in (ref, masked, pred, target)], 1)
                           for i in range(min(rows, len(pred)))], 0)
    with utils.atomic_file(path) as tmp:
        cv2.imwrite(str(tmp), grid)


class RunLog:
    """A run's log: lines to the console (tqdm-safe) and out/log.txt, optional TensorBoard scalars,
    and the speed of the steps since the last report (data vs compute time, samples/s); only the
    master process writes."""

    def __init__(self, out, master, tensorboard=False):
        self.out, self.master, self.writer = out, master, None
        if master and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(out / "tb"))
        self.timing = [0, 0.0, 0.0, 0.0, 0]   # whole run after its first step: steps, data s, compute s, compute CPU s, frames
        self._window(0)

    def _window(self, step):
        self.acc, self.t_data, self.t_comp, self.n_seen, self.t_last, self.logged = {}, 0.0, 0.0, 0, time.perf_counter(), step

    def line(self, msg):
        if self.master:
            tqdm.write(msg)
            with open(self.out / "log.txt", "a") as f:
                f.write(msg + "\n")

    def scalars(self, prefix, values, step):
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def add(self, terms, data_s, comp_s, cpu_s, frames, count):
        """One step's loss terms and times; `count` False for the first step of a process (worker
        start-up and allocator warm-up), which stays out of the run's timing."""
        self.t_data, self.t_comp, self.n_seen = self.t_data + data_s, self.t_comp + comp_s, self.n_seen + frames
        if count:
            self.timing = [u + v for u, v in zip(self.timing, (1, data_s, comp_s, cpu_s, frames))]
        for k, v in terms.items():
            self.acc[k] = self.acc.get(k, 0.0) + v.detach().float()

    def report(self, step, max_steps, per_epoch, lr):
        ns, dt = step - self.logged, time.perf_counter() - self.t_last
        avg = {term: (v / ns).item() for term, v in self.acc.items()}
        self.line(f"step {step}/{max_steps} ep {step // per_epoch} | " + " ".join(f"{t} {v:.4f}" for t, v in avg.items()) +
                  f" | lr {lr:.2e} | {self.n_seen / dt:.1f} samples/s | {1e3 * dt / ns:.0f} ms/step "
                  f"(data {1e3 * self.t_data / ns:.0f}, compute {1e3 * self.t_comp / ns:.0f})")
        self.scalars("train", dict(avg, lr=lr), step)
        self._window(step)

    def summary(self):
        ns, td, tc, cc, frames = self.timing
        return dict(steps=ns, data_ms=1e3 * td / max(ns, 1), compute_ms=1e3 * tc / max(ns, 1),
                    compute_cpu_ms=1e3 * cc / max(ns, 1), samples_per_s=frames / max(td + tc, 1e-9))

    def close(self):
        if self.writer:
            self.writer.close()
