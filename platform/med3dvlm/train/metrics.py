"""What a worker says about its run: progress lines on the console (rank 0) and per-step metrics kept for the
run's history and written to TensorBoard."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time

import torch

from med3dvlm import storage


class Progress:
    """Rank 0's progress lines, as HF Trainer / torchtitan print them: every `every` steps, but no sooner than
    `gap` seconds after the last line (a fast stage stays readable), and at each epoch's end."""

    def __init__(self, stage: int, start: int, total: int, steps_per_epoch: int, every: int, gap: float = 0.0):
        self.stage, self.start, self.total, self.per_epoch, self.every = stage, start, total, steps_per_epoch, every
        self.t0 = self.t_line = time.perf_counter()
        self.gap = gap

    def step(self, m: dict) -> None:
        if not self.every:
            return
        done, now = m["step"] + 1, time.perf_counter()
        due = done % self.every == 0 and now - self.t_line >= self.gap
        if not (due or done % self.per_epoch == 0 or done == self.total):
            return
        self.t_line = now
        elapsed = now - self.t0
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        wait = m["data_wait_s"] / max(m["data_wait_s"] + m["compute_s"], 1e-9)
        print(f"[train] stage {self.stage} step {done}/{self.total} epoch {m['epoch'] + 1}: loss {m['loss']:.4f} "
              f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s data wait {100 * wait:.0f}% "
              f"ETA {_clock(eta)}", flush=True)

    def validation(self, m: dict, step: int) -> None:
        if self.every:
            print(f"[train] stage {self.stage} validation at step {step}: loss {m['val_loss']:.4f} "
                  f"R@1 {100 * m['val_R@1']:.1f}% (n={m['val_n']})", flush=True)


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _staging_dir(uri: str) -> str:
    """The node-local folder where TensorBoard writes before an upload to `uri`, named by it: a worker restarted on
    this node replaces the folder a killed one left (its events up to the last checkpoint are in the bucket)."""
    d = os.path.join(tempfile.gettempdir(), f"med3dvlm-tb-{hashlib.sha256(uri.encode()).hexdigest()[:16]}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


class StepLog:
    """Per-step metrics (loss averaged over ranks, lr, samples/s, data wait vs compute, the stage's own figures such
    as stage 1's t and b) kept in `history` and written to TensorBoard by rank 0 (for a URI: to a node-local folder,
    uploaded at every checkpoint)."""

    def __init__(self, stage, batch_size: int, tb: str | None, progress: Progress | None = None):
        self.stage, self.batch_size, self.history, self.progress = stage, batch_size, [], progress
        self.tb = tb
        self.tb_remote = bool(tb) and not storage.is_local(tb)
        self.tb_dir = _staging_dir(tb) if self.tb_remote else tb and storage.resolve(tb)[1]
        self.writer = _tb_writer(self.tb_dir)
        self.t_last = time.perf_counter()

    def step(self, engine, scheduler, step: int, epoch: int, loss, data_s: float, compute_s: float) -> dict:
        import torch.distributed as dist

        loss_v, world = float(loss.detach()), 1
        if dist.is_initialized():
            world = dist.get_world_size()
            lt = torch.tensor([loss_v], device=loss.device)
            dist.all_reduce(lt)
            loss_v = float(lt.item()) / world
        now = time.perf_counter()
        m = {"step": step, "epoch": epoch, "loss": loss_v, "lr": max(scheduler.get_last_lr()),
             "samples_per_s": self.batch_size * world / max(now - self.t_last, 1e-9),
             "data_wait_s": data_s, "compute_s": compute_s}
        self.t_last = now
        m.update(self.stage.step_report(engine.module))
        self.history.append(m)
        self.scalars(m, step)
        if self.progress:
            self.progress.step(m)
        return m

    def validation(self, m: dict, step: int) -> None:
        """A validation's figures, after the step they follow."""
        self.scalars(m, step - 1, ("val_loss", "val_R@1"))
        if self.progress:
            self.progress.validation(m, step)

    def scalars(self, m: dict, step: int, keys=None) -> None:
        if self.writer:
            for k in keys or [k for k in m if k not in ("step", "epoch")]:
                self.writer.add_scalar(f"{self.stage.name}/{k}", m[k], step)

    def sync(self) -> None:
        """Flush the events; for a URI, upload them (at every checkpoint: a restarted run's TensorBoard keeps the
        steps before the failure)."""
        if self.writer:
            self.writer.flush()
            if self.tb_remote:
                storage.copy_dir(self.tb_dir, self.tb)

    def close(self) -> None:
        self.sync()
        if self.writer:
            self.writer.close()
            self.writer = None  # the last checkpoint comes after the export: nothing left to sync then
        if self.tb_remote:
            shutil.rmtree(self.tb_dir, ignore_errors=True)


def _tb_writer(path: str | None):
    if not path:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(path)
