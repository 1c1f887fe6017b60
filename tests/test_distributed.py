"""torch.distributed on CPU with 2 gloo processes: the cross-rank algebra and torchrun runs.

The unit tests spawn 2 ranks that each take half of one fixed batch and compare with a single
process on the whole batch. BatchNorm runs in eval mode there: per-rank batch statistics differ
from the global batch's by design (that is what SyncBatchNorm and shuffle BN are about), so
only with fixed statistics can the two be equal to float precision.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from selfsup.engine import checkpoint as ckpt
from selfsup.engine.config import build_parser, resolve
from selfsup.engine.trainer import method_class

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
B, SIZE = 8, 16  # global batch (4 per rank), image side
SMALL = ["--img-size", str(SIZE), "--proj-hidden", "32", "--proj-dim", "16", "--pred-hidden",
         "32", "--queue-size", "40", "--out-dim", "64", "--n-local", "2"]

pytestmark = pytest.mark.dist


@pytest.fixture(autouse=True)
def portable_kernels(monkeypatch):
    # Spawned ranks inherit the environment: the kernels' portable path keeps them fast (the
    # fused paths are proven against their references in tests/kernels).
    monkeypatch.setenv("SELFSUP_KERNELS", "torch")


def method_config(name: str, *extra: str):
    argv = ["--method", name, "--arch", "resnet_tiny", *SMALL, *extra]
    cfg = resolve(vars(build_parser().parse_args(argv)), method_class(name).preset)
    cfg.extra.update(steps_per_epoch=10, schedule_steps=10)
    return cfg


def fixed_views(name: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    n_views = 4 if name == "dino" else 2  # dino: 2 global + 2 local crops
    sizes = [SIZE, SIZE, SIZE // 2, SIZE // 2][:n_views]
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def one_step(name: str, model, method, views) -> dict:
    """Forward + backward; the loss, every gradient, and the method's state after the step."""
    out = model(views)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters()
             if p.grad is not None}
    method.on_step_end(0, 10)
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    return {"loss": out["loss"].detach().clone(), "grads": grads, "state": state}


def build(name: str):
    torch.manual_seed(0)  # every rank builds identical weights, queue and center
    method = method_class(name)(method_config(name)).eval()
    return method


def _rank_main(rank: int, name: str, init_file: str, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=WORLD)
    try:
        from selfsup.engine.distributed import wrap

        method = build(name)
        model = wrap(method, method_config(name), torch.device("cpu"))
        n = B // WORLD
        local = [v[rank * n:(rank + 1) * n] for v in fixed_views(name)]
        res = one_step(name, model, method, local)
        res["loss_mean"] = tdist_mean(res["loss"])
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def tdist_mean(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    tdist.all_reduce(x)
    return x / WORLD


def run_two_ranks(name: str, tmp_path: Path) -> list[dict]:
    mp.spawn(_rank_main, args=(name, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name: str) -> dict:
    method = build(name)
    return one_step(name, method, method, fixed_views(name))


def assert_grads_equal(ranks: list[dict], single: dict) -> None:
    for r in ranks:  # DDP averaged the gradients: every rank holds the global gradient
        assert r["grads"].keys() == single["grads"].keys()
        for k, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- the algebra
@pytest.mark.parametrize("name", ["mocov3", "simclr"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(name, tmp_path):
    ranks = run_two_ranks(name, tmp_path)
    single = single_process(name)
    # The global loss is the mean of the ranks' losses: each rank's rows (MoCo v3's queries,
    # SimCLR's 2N anchors) against all gathered keys.
    for r in ranks:
        torch.testing.assert_close(r["loss_mean"], single["loss"], rtol=1e-5, atol=1e-6)
    assert_grads_equal(ranks, single)


def test_moco_queue_after_a_two_rank_step_equals_one_process(tmp_path):
    # Real shuffle BN across ranks (gather, permute, unshuffle) must hand back each rank's own
    # keys; the gathered keys are enqueued on every rank in rank order.
    ranks = run_two_ranks("mocov2", tmp_path)
    single = single_process("mocov2")
    for r in ranks:
        torch.testing.assert_close(r["state"]["queue.queue"], single["state"]["queue.queue"],
                                   rtol=1e-5, atol=1e-6)
        assert int(r["state"]["queue.ptr"]) == B
    assert_grads_equal(ranks, single)


def test_dino_center_after_a_two_rank_step_equals_one_process(tmp_path):
    ranks = run_two_ranks("dino", tmp_path)
    single = single_process("dino")
    center = single["state"]["criterion.center"]
    assert center.abs().sum() > 0
    for r in ranks:
        torch.testing.assert_close(r["state"]["criterion.center"], center, rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(r["loss_mean"], single["loss"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_RUN = ["--data", "fashion-mnist-sample", "--img-size", "16", "--batch-size", "16",
            "--device", "cpu", "--workers", "1", "--knn-every", "-1", "--log-every", "1",
            "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "32",
            "--queue-size", "128", "--out-dim", "128", "--n-local", "2"]


def torchrun(*args: str, nproc: int = WORLD, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SELFSUP_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *args]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("method,arch,loader", [("mocov2", "resnet_tiny", "portable"),
                                                ("mocov3", "resnet_tiny", "dali-cpu"),
                                                ("dino", "vit_tiny", "portable"),
                                                ("ibot", "vit_tiny", "portable"),
                                                ("dinov2", "vit_tiny", "portable")])
def test_torchrun_two_processes_trains(method, arch, loader, tmp_path):
    if loader.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    r = torchrun("--method", method, "--arch", arch, *TINY_RUN, "--data-device", loader,
                 "--steps", "3", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = ckpt.load(out)
    assert state["step"] == 3 and state["config"]["extra"]["world_size"] == WORLD
    rows = [line for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(rows) == 3  # rank 0 logs, the other rank does not write a second log


def test_resume_at_another_world_size(tmp_path):
    out = tmp_path / "run"
    common = ["--method", "mocov2", "--arch", "resnet_tiny", *TINY_RUN, "--data-device",
              "portable", "--out", str(out), "--epochs", "1"]
    r = torchrun(*common, "--steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*common, "--steps", "4", "--resume", "auto", nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    state = ckpt.load(out)
    assert state["step"] == 4 and state["config"]["extra"]["world_size"] == 1


def test_fsdp_checkpoint_loads_without_fsdp(tmp_path):
    out = tmp_path / "run"
    r = torchrun("--method", "mae", "--arch", "vit_tiny", *TINY_RUN, "--data-device",
                 "portable", "--decoder-dim", "32", "--decoder-depth", "1", "--fsdp",
                 "--steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    method, cfg, state = ckpt.load_method(out)  # a plain, unsharded module
    assert cfg.fsdp and state["step"] == 2
    x = torch.randn(2, 3, 16, 16)
    feats = method.encoder()(x)
    assert feats.shape == (2, method.encoder().feature_dim)
    assert all(math.isfinite(v) for v in feats.flatten().tolist())


def _train_losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
            if '"train"' in line]
    return [r["loss"] for r in rows]


@pytest.mark.parametrize("method", ["ibot", "dinov2"])
def test_fsdp_trains_as_ddp(method, tmp_path):
    # iBOT / DINOv2 shard the student's blocks while the teacher's EMA and the masked-token
    # gathers read them: 3 steps on 2 ranks must log DDP's losses (fp32: same math, only the
    # reduction order of the gradient differs), and the checkpoint must load unsharded.
    losses = {}
    for mode in ([], ["--fsdp"]):
        out = tmp_path / f"run{len(mode)}"
        r = torchrun("--method", method, "--arch", "vit_tiny", *TINY_RUN, "--data-device",
                     "portable", *mode, "--steps", "3", "--out", str(out))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[bool(mode)] = _train_losses(out)
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    trained, cfg, state = ckpt.load_method(out)
    assert cfg.fsdp and state["step"] == 3
    feats = trained.encoder()(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, trained.encoder().feature_dim)
    assert torch.isfinite(feats).all()


# ----------------------------------------------------------------------------- --accum-steps
def _accum_rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank: 1-micro-batch steps, then a 3-micro-batch step, counting DDP's gradient
    all-reduces through a comm hook (it runs once per bucket per synced backward)."""
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=WORLD)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        from selfsup.engine.distributed import wrap
        from selfsup.engine.step import NonFiniteWatch, forward_backward

        method = build("simsiam")
        model = wrap(method, method_config("simsiam"), torch.device("cpu"))
        calls = {"n": 0}

        def counting_hook(state, bucket):
            calls["n"] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        views = fixed_views("simsiam")
        n = B // WORLD
        local = [v[rank * n:(rank + 1) * n] for v in views]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        kw = dict(step=0, watch=NonFiniteWatch(torch.device("cpu")), amp_dtype=None,
                  device_type="cpu")
        counts = []
        # the first step twice: DDP rebuilds its buckets after the first backward
        three = [local, [v.flip(0) for v in local], [v * 0.5 for v in local]]
        for micro in ([local], [local], three):
            calls["n"] = 0
            method.zero_grad(set_to_none=True)
            forward_backward(model, scaler, micro, **kw)
            counts.append(calls["n"])
        grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
        torch.save({"counts": counts, "grads": grads}, Path(out_dir) / f"accum{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_accum_all_reduces_only_on_the_last_micro_batch(tmp_path):
    mp.spawn(_accum_rank_main, args=(str(tmp_path / "rdzv"), str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"accum{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in ranks:
        _, one, three = r["counts"]
        assert one >= 1 and three == one, r["counts"]  # no_sync on micro-batches 1 and 2
    for k, g in ranks[0]["grads"].items():  # and the last backward synced all of it
        torch.testing.assert_close(ranks[1]["grads"][k], g, rtol=1e-6, atol=1e-8, msg=k)
