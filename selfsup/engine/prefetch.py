"""The next batches, fetched and copied to the device while the current step runs.

    for views in DevicePrefetcher(loader, device, depth=2): ...   # views on `device`

- A background thread pulls batches from the loader (the portable loader builds them in
  its own thread already; this one also covers DALI-CPU and a slow iterator), and, when the
  device is CUDA, copies each CPU tensor into pinned (page-locked) host memory: only from
  pinned memory can a host->device copy run asynchronously, overlapped with compute.
- The main thread issues the copy of batch i+1 with non_blocking=True on a side CUDA
  stream before it hands batch i to the step, so the copy runs under step i. The step's
  stream waits for the side stream (wait_stream) before it reads a batch, and each tensor
  is marked with record_stream so the caching allocator does not reuse its memory while the
  step's stream may still read it.
- On CPU there is no stream and no pinning (pin_memory needs CUDA); the thread still
  overlaps the loader with the step. The batches and their order are the loader's: each
  batch is a pure function of its index (its own RNG), never of the global torch RNG the
  model uses, so prefetching cannot change what is trained on (tests/test_prefetch.py).
- An exception raised by the loader is re-raised in the consumer, at the batch where it
  happened; leaving the loop early (break, error) stops the thread.
"""

from __future__ import annotations

import torch

from ..data.loader import background


def pin_views(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU tensors in pinned memory (those pinned already, and device tensors, as they are)."""
    return [v.pin_memory() if v.device.type == "cpu" and not v.is_pinned() else v
            for v in views]


class DevicePrefetcher:
    """Iterate `batches` ((views, labels) pairs) for views on `device`, `depth` ahead.

    depth 0: no thread, no side stream: each batch is fetched and copied when asked for.
    pin: pin host memory (default: when the device is CUDA). The copy keeps `memory_format`
    (channels_last for --channels-last)."""

    def __init__(self, batches, device: torch.device, *, depth: int = 2,
                 memory_format=torch.contiguous_format, pin: bool | None = None) -> None:
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth must be an int >= 0, got {depth!r}")
        self.batches, self.device, self.depth = batches, torch.device(device), depth
        self.memory_format = memory_format
        self.pin = self.device.type == "cuda" if pin is None else pin
        cuda = self.device.type == "cuda" and depth > 0
        self.stream = torch.cuda.Stream(self.device) if cuda else None

    # ---------------------------------------------------------------- host side
    def _host_batches(self):
        """The loader's batches (pinned when asked), `depth` ahead in a thread."""
        pinned = (((pin_views(views) if self.pin else views), labels)
                  for views, labels in self.batches)
        if self.depth == 0:
            return pinned
        return background(pinned, self.depth, "selfsup-device-prefetch")

    # ---------------------------------------------------------------- device side
    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        kw = dict(non_blocking=self.pin, memory_format=self.memory_format)
        if self.stream is None:
            return [v.to(self.device, **kw) for v in views]
        with torch.cuda.stream(self.stream):
            return [v.to(self.device, **kw) for v in views]

    def _ready(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Make the step's stream wait for the copy of `views` before it uses them."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for v in views:
                if v.device.type == "cuda":
                    v.record_stream(current)
        return views

    def __iter__(self):
        host = self._host_batches()
        if self.depth == 0:
            for views, labels in host:
                yield self._to_device(views), labels
            return
        try:
            nxt = next(host, None)
            pending = None if nxt is None else (self._to_device(nxt[0]), nxt[1])
            while pending is not None:
                views, labels = pending
                try:  # the copy of batch i+1 is issued before step i runs
                    nxt, error = next(host, None), None
                except Exception as e:  # noqa: BLE001 - raised after batch i, where it belongs
                    nxt, error = None, e
                pending = None if nxt is None else (self._to_device(nxt[0]), nxt[1])
                yield self._ready(views), labels
                if error is not None:
                    raise error
        finally:
            host.close()
