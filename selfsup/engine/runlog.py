"""Run logs: JSONL (always), TensorBoard (when installed), and a progress line.

On a TTY the progress line redraws in place; otherwise (CI, files, pipes) it prints plain
lines, one every `log_every` steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLogger:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "log.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed: JSONL still has everything
                self.tb = None

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """img/s, ETA and loss; redrawn in place on a TTY, plain lines otherwise."""

    def __init__(self, total: int, start: int, batch: int, log_every: int, enabled: bool,
                 stream=None) -> None:
        self.total, self.step0, self.batch = total, start, batch
        self.log_every, self.enabled = max(1, log_every), enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self.step0
        elapsed = time.perf_counter() - self.t0
        ips = done * self.batch / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / max(done, 1)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.3g} | {ips:.0f} img/s "
                f"| ETA {_fmt(eta)}{' | ' + extra if extra else ''}")
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160))
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.log_every == 0 or step >= self.total or step == self.step0 + 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
