"""Every command in README.md and docs/*.md is run here, at tiny sizes, so none can rot.

What a command is
    Each line of a fenced ```bash block in README.md and docs/*.md. A line ending in `\\`
    continues on the next; `#` starts a comment; `&&`, `||`, `;` and `|` separate commands,
    each checked on its own. Leading `VAR=value` words are the command's environment, and the
    wrappers `nice`, `time`, `/usr/bin/time -v` and `timeout N` are dropped. `python`,
    `python3` and `.venv/bin/python` all mean this test's interpreter. Output shown in the docs
    belongs in ```text blocks, which are not read.

Every command parses (test_command_parses)
    - `python FILE.py ARGS` or `python -m MODULE ARGS`, for a file or module of this repository
      (train.py, bench/*.py, scripts/*.py, selfsup.*): its `main(ARGS)` runs in this process up
      to its first `ArgumentParser.parse_args`, which parses ARGS and then stops it (nothing is
      trained). A renamed or removed flag, a bad choice or a missing required argument fails.
      For train.py the flags are also resolved against the method's preset, and `--method` and
      `--arch` must name a method and a backbone.
    - `torchrun TORCHRUN_ARGS SCRIPT ARGS`: torchrun's own parser reads its part, then SCRIPT
      ARGS is checked as above.
    - `python -c CODE`: CODE compiles and its top-level imports resolve.
    - `python -m pytest ARGS` (or `pytest ARGS`): pytest collects ARGS (`--collect-only`):
      paths, markers and plugin options must exist and something must be collected.
    - `make TARGET [VAR=value ...]`: `make -n TARGET` (a dry run) succeeds.
    - `pip install ...` / `python -m pip install ...`: every requirement parses, `-e ".[X]"`
      needs extra X in pyproject.toml, and a `torch==V` pin equals the Makefile's TORCH_SPEC
      (README's install-order note).
    - `bash FILE`: FILE exists and `bash -n` parses it.
    - `cd`, `export`, `echo`, `ls`, `mkdir`, `git`: shell, nothing of ours to check.
    - Anything else fails, naming the command: add a rule here.

Every command of a runnable entry point also runs (test_command_runs)
    The entry points are train.py, `selfsup.eval knn|linear`, `selfsup.visualize
    attention|reconstruction`, `selfsup.export`, `selfsup.finetune` and `bench/quality.py
    --table`. Each of their commands that can run on a CPU runs in a subprocess
    (TRITON_INTERPRET unset, one OMP thread), rewritten (`--help` runs as written and must
    print the usage):
    - Parse-only, never run: torchrun, make, pip, pytest, bash, `selfsup.kernels.report`
      (compiles for minutes; tests/kernels/test_compile.py runs it), `bench/quality.py`
      without `--table` (it trains for an hour), and any command with `--device cuda`,
      `--data-device dali-gpu`, `--fsdp`, `--compile`, `--precision fp16` or a `--resume`
      path that does not exist.
    - Sizes: train.py gets `--steps 2 --batch-size 4 --device cpu --img-size 16 --n-local 2
      --out-dim 1024 --queue-size 256 --knn-train-size 64 --knn-test-size 32 --workers 1`;
      `--arch vit_*` becomes `vit_tiny --patch-size 4`, `resnet*` becomes `resnet_tiny`.
      selfsup.eval gets `--device cpu --train-size 64 --test-size 32 --batch-size 32` (linear:
      `--epochs 1`; `--full` is dropped); selfsup.finetune `--steps 2 --batch-size 4 --device
      cpu --train-size 64 --test-size 32`.
    - Paths: a built-in `--data` name becomes `fashion-mnist-sample`; a `--data`,
      `--test-data` or `--knn-data` path that does not exist becomes a folder of PNGs made
      here, `TMP/images/{train,val}/<class>/`: `--data .../train` (or val; test: val) points at that
      split, any other `--data` and `--knn-data` at `TMP/images`, `--test-data` at
      `TMP/images/val`. A missing `--image` becomes a PNG made here. `--out` goes under TMP
      (its base name kept). A `--checkpoint` that does not exist becomes a 2-step run, made
      once per session, of the method named in the path (`runs/dino-vit_s` -> dino; none
      named: mae) on vit_tiny (a ViT is named, or the method is dino or mae) or resnet_tiny.
    - Success: exit 0 and the documented last line (train.py: `run folder: ...`; eval:
      `knn_top1 X` / `linear_top1 X`...; finetune: `finetune_top1 X`), or the written file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", ".venv/bin/python", "./.venv/bin/python", sys.executable}
SHELL_ONLY = {"cd", "export", "echo", "ls", "mkdir", "git"}
SEPARATORS = {"&&", "||", ";", "|"}
BUILTIN_DATA = {"fashion-mnist", "fashion-mnist-sample", "mnist"}


# ------------------------------------------------------------------------------ extraction
@dataclass
class Command:
    where: str  # "docs/training.md:12"
    text: str  # the command as written (one of a chain)
    env: dict = field(default_factory=dict)
    argv: list = field(default_factory=list)  # without env and wrappers

    def __str__(self) -> str:
        return self.text


def bash_blocks(markdown: str):
    """(first line number, lines) of each ```bash fence."""
    lines, i = markdown.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield start, body
        i += 1


def split_commands(tokens: list[str]) -> list[list[str]]:
    out, cur = [], []
    for t in tokens:
        if t in SEPARATORS:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [c for c in out + [cur] if c]


def strip_env_and_wrappers(tokens: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        k, v = tokens[0].split("=", 1)
        env[k] = v
        tokens = tokens[1:]
    while tokens:
        if tokens[0] in ("nice", "time"):
            tokens = tokens[1:]
        elif tokens[0] == "/usr/bin/time":
            tokens = tokens[2:] if len(tokens) > 1 and tokens[1] == "-v" else tokens[1:]
        elif tokens[0] == "timeout" and len(tokens) > 1:
            tokens = tokens[2:]
        else:
            break
    return env, tokens


def extract(markdown: str, name: str) -> list[Command]:
    cmds = []
    for start, body in bash_blocks(markdown):
        pending, first = "", None
        for k, line in enumerate(body):
            first = first if pending else start + k
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = pending + line, ""
            tokens = shlex.split(text, comments=True)
            for part in split_commands(tokens):
                env, argv = strip_env_and_wrappers(part)
                cmds.append(Command(f"{name}:{first}", shlex.join(part), env, argv))
    return cmds


def all_commands() -> list[Command]:
    out = []
    for path in DOCS:
        out += extract(path.read_text(), str(path.relative_to(ROOT)))
    return out


# ------------------------------------------------------------------------------ entry points
class CommandError(AssertionError):
    pass


class _Parsed(BaseException):  # BaseException: a main's `except Exception` must not eat it
    def __init__(self, namespace):
        super().__init__()
        self.namespace = namespace


def entry_point(argv: list[str]) -> tuple[str, list[str]] | None:
    """("train.py" | "bench/quality.py" | "selfsup.eval" | "pytest" | "-c" ..., args)."""
    if argv and Path(argv[0]).name == "pytest":
        return "pytest", argv[1:]
    if not argv or argv[0] not in PYTHONS or len(argv) < 2:
        return None
    if argv[1] == "-c" and len(argv) > 2:
        return "-c", argv[2:]
    if argv[1] == "-m" and len(argv) > 2:
        return argv[2], argv[3:]
    if argv[1].endswith(".py"):
        return argv[1], argv[2:]
    return None


def load_main(entry: str):
    if entry.endswith(".py"):
        path = ROOT / entry
        if not path.is_file():
            raise CommandError(f"{entry} does not exist")
        name = "_docs_" + re.sub(r"\W", "_", entry)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    else:
        if not (entry == "selfsup" or entry.startswith("selfsup.")):
            raise CommandError(f"`python -m {entry}` is not a module of this repository")
        try:
            module = importlib.import_module(entry)
        except ImportError as e:
            raise CommandError(f"cannot import {entry}: {e}") from e
    main = getattr(module, "main", None)
    if main is None:
        raise CommandError(f"{entry} has no main(argv) to parse its arguments with")
    return main


def parse_only(entry: str, args: list[str], env: dict) -> argparse.Namespace | None:
    """Run entry's main(args) up to its first parse_args; return the namespace (None: --help)."""
    main = load_main(entry)
    real = argparse.ArgumentParser.parse_args

    def stop(self, a=None, namespace=None):
        raise _Parsed(real(self, a, namespace))

    err = io.StringIO()
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.dict(os.environ, environ, clear=True), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(args))
        except _Parsed as p:
            return p.namespace
        except SystemExit as e:
            if e.code in (0, None):
                return None  # --help
            said = err.getvalue().strip().splitlines() or [f"exit {e.code}"]
            raise CommandError(f"its argument parser rejected it: {said[-1]}") from None
        except Exception as e:  # noqa: BLE001 - e.g. an import that fails before parse_args
            raise CommandError(f"{entry} raised before parsing its arguments: {e!r}") from e
    raise CommandError(f"{entry}'s main returned without calling ArgumentParser.parse_args")


def check_train_config(ns: argparse.Namespace) -> None:
    from selfsup.engine.config import resolve_method
    from selfsup.models import ALIASES, ARCHS

    cli = vars(ns)
    try:
        cfg = resolve_method(cli)  # as train.py: the preset chosen from --data
    except Exception as e:  # noqa: BLE001 - whatever it is, the documented command is broken
        raise CommandError(f"train.py's config does not resolve: {e!r}") from e
    if ALIASES.get(cfg.arch, cfg.arch) not in ARCHS:
        raise CommandError(f"--arch {cfg.arch!r} is not one of {sorted(ARCHS) + sorted(ALIASES)}")


def check_python(argv: list[str], env: dict) -> None:
    entry, args = entry_point(argv)
    if entry == "-c":
        return check_snippet(args[0] if args else "")
    if entry == "pytest":
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise CommandError(f"pytest --collect-only exited {r.returncode}:\n"
                               f"{(r.stdout + r.stderr)[-2000:]}")
        return
    if entry == "pip":
        return check_pip(args)
    ns = parse_only(entry, args, env)
    if entry == "train.py" and ns is not None:
        check_train_config(ns)


def check_snippet(code: str) -> None:
    """`python -c CODE`: it compiles, and every module it imports at its top level exists."""
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise CommandError(f"python -c: {e}") from e
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            try:
                module = importlib.import_module(name)
            except ImportError as e:
                raise CommandError(f"python -c imports {name}: {e}") from e
            if isinstance(node, ast.ImportFrom):
                missing = [a.name for a in node.names if a.name != "*"
                           and not hasattr(module, a.name)]
                if missing:
                    raise CommandError(f"python -c: {name} has no {missing}")


def makefile_torch_spec() -> str:
    m = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1)


def check_pip(args: list[str]) -> None:
    from packaging.requirements import InvalidRequirement, Requirement

    if not args or args[0] != "install":
        raise CommandError("only `pip install` has a rule")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    it = iter(args[1:])
    for a in it:
        if a == "-e":
            target = next(it, "")
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
            if not m:
                raise CommandError(f"-e {target!r}: expected . or .[extra]")
            missing = set((m.group(1) or "").split(",")) - set(extras) - {""}
            if missing:
                raise CommandError(f"pyproject.toml has no extra {sorted(missing)}")
        elif a.startswith("-"):
            continue
        else:
            try:
                req = Requirement(a)
            except InvalidRequirement as e:
                raise CommandError(f"{a!r} is not a requirement: {e}") from e
            if req.name == "torch" and str(req) != makefile_torch_spec():
                raise CommandError(f"{a} differs from the Makefile's TORCH_SPEC "
                                   f"{makefile_torch_spec()}")


def check(cmd: Command) -> None:
    argv = cmd.argv
    if not argv:
        return
    head = argv[0]
    if head in SHELL_ONLY:
        return
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                ns = get_args_parser().parse_args(argv[1:])
            except SystemExit:
                said = err.getvalue().strip().splitlines() or ["?"]
                raise CommandError(f"torchrun rejected it: {said[-1]}") from None
        script = ["python", *(["-m"] if ns.module else []), ns.training_script,
                  *ns.training_script_args]
        return check_python(script, cmd.env)
    if head == "make":
        targets = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
        r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0 or not targets:
            raise CommandError(f"make -n {' '.join(argv[1:])}: {r.stderr.strip() or 'no target'}")
        return
    if head == "pip":
        return check_pip(argv[1:])
    if head == "bash":
        path = ROOT / argv[1] if len(argv) > 1 else None
        if path is None or not path.is_file():
            raise CommandError(f"bash: no file {argv[1:2]}")
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        if r.returncode:
            raise CommandError(f"bash -n {argv[1]}: {r.stderr.strip()}")
        return
    if entry_point(argv) is not None:
        return check_python(argv, cmd.env)
    raise CommandError("no rule for this command: add one to tests/test_docs_commands.py")


COMMANDS = all_commands()


def label(cmd: Command) -> str:
    """docs/training.md:12 train.py: where, and what runs, for the test id."""
    ep = entry_point(cmd.argv)
    what = ep[0] if ep else (cmd.argv[0] if cmd.argv else "")
    sub = ep[1][0] if ep and ep[0] in ("selfsup.eval", "selfsup.visualize") and ep[1] else ""
    return " ".join(filter(None, [cmd.where, what, sub]))


@pytest.mark.parametrize("cmd", COMMANDS, ids=[label(c) for c in COMMANDS])
def test_command_parses(cmd):
    failure = None
    try:
        check(cmd)
    except CommandError as e:
        failure = str(e)
    if failure:  # outside the except: the report is the command and why, nothing chained
        pytest.fail(f"{cmd.where}: `{cmd.text}`\n{failure}", pytrace=False)


# ------------------------------------------------------------------------------ tiny runs
NOT_HERE = {("--device", "cuda"), ("--data-device", "dali-gpu"), ("--precision", "fp16")}
NOT_HERE_FLAGS = {"--fsdp", "--compile"}
SUBCOMMANDS = {"selfsup.eval", "selfsup.visualize"}
RUNNABLE = {"train.py", "selfsup.eval", "selfsup.visualize", "selfsup.export",
            "selfsup.finetune", "bench/quality.py"}


def run_key(cmd: Command) -> tuple | None:
    """(entry, sub-command) when cmd is a command of a runnable entry point that can run here."""
    ep = entry_point(cmd.argv) if cmd.argv else None
    if ep is None or ep[0] not in RUNNABLE:
        return None
    entry, args = ep
    if any((a, b) in NOT_HERE for a, b in zip(args, args[1:])) or NOT_HERE_FLAGS & set(args):
        return None
    if "--resume" in args:
        value = args[args.index("--resume") + 1] if args.index("--resume") + 1 < len(args) else ""
        if value != "auto" and not (ROOT / value).exists():
            return None
    if entry == "bench/quality.py" and "--table" not in args:
        return None
    return entry, (args[0] if entry in SUBCOMMANDS and args else None)


def runnable() -> list[Command]:
    return [c for c in COMMANDS if run_key(c) is not None]


def set_flag(args: list[str], flag: str, *values: str) -> list[str]:
    """args with flag's value(s) replaced (or the flag appended)."""
    if flag in args:
        i = args.index(flag)
        n = 1
        while i + n < len(args) and not args[i + n].startswith("--"):
            n += 1
        args = args[:i] + args[i + n:]
    return [*args, flag, *values]


def flag_value(args: list[str], flag: str) -> str | None:
    if flag in args and args.index(flag) + 1 < len(args):
        return args[args.index(flag) + 1]
    return None


def tiny_arch(args: list[str]) -> list[str]:
    arch = flag_value(args, "--arch")
    if arch and arch.startswith("vit"):
        return set_flag(set_flag(args, "--arch", "vit_tiny"), "--patch-size", "4")
    if arch and arch.startswith("resnet"):
        return set_flag(args, "--arch", "resnet_tiny")
    return args


TRAIN_TINY = ["--steps", "2", "--batch-size", "4", "--device", "cpu", "--img-size", "16",
              "--n-local", "2", "--out-dim", "1024", "--queue-size", "256",
              "--knn-train-size", "64", "--knn-test-size", "32", "--workers", "1"]


def make_images(root: Path) -> Path:
    """root/images/{train,val}/<class>/*.png: three classes of small RGB squares."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for c in range(3):
            d = root / "images" / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                px[..., c] = 255  # each class has its own dominant channel
                Image.fromarray(px).save(d / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "image.png")
    return root


def subprocess_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


def run_python(args: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(env),
                       capture_output=True, text=True, timeout=400)
    if r.returncode != 0:
        raise CommandError(f"{what} exited {r.returncode}; ran: {shlex.join(args)}\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    return r


class Workspace:
    """TMP with the sample images and the checkpoints made on demand (once per session)."""

    def __init__(self, root: Path):
        self.root = make_images(root)
        self.runs: dict[tuple[str, str], Path] = {}

    def checkpoint(self, path: str) -> str:
        if (ROOT / path).exists():
            return path
        from selfsup.ssl import METHODS

        words = re.split(r"[-_/.]", path.lower())
        method = next((w for w in words if w in METHODS), "mae")
        family = "vit" if "vit" in path.lower() or method in ("dino", "mae") else "resnet"
        if (method, family) not in self.runs:
            out = self.root / f"ckpt-{method}-{family}"
            arch = "vit_tiny" if family == "vit" else "resnet_tiny"
            run_python(["train.py", "--method", method, "--arch", arch, *TRAIN_TINY,
                        *(["--patch-size", "4"] if family == "vit" else []),
                        "--data", "fashion-mnist-sample", "--knn-every", "-1",
                        "--out", str(out)], {}, f"the {method} checkpoint for {path}")
            self.runs[(method, family)] = out
        return str(self.runs[(method, family)])

    def data(self, flag: str, value: str) -> str:
        if value in BUILTIN_DATA:
            return "fashion-mnist-sample" if flag == "--data" else value
        if (ROOT / value).exists():
            return value
        images = self.root / "images"
        last = Path(value).name
        if flag == "--test-data":
            return str(images / "val")
        if flag == "--data" and last in ("train", "val", "test"):
            return str(images / ("val" if last == "test" else last))
        return str(images)


def rewrite(cmd: Command, ws: Workspace) -> tuple[list[str], str]:
    """(argv for this interpreter, what a success prints last or the file it writes)."""
    entry, args = entry_point(cmd.argv)
    args = list(args)
    for flag in ("--data", "--test-data", "--knn-data"):
        if flag_value(args, flag):
            args = set_flag(args, flag, ws.data(flag, flag_value(args, flag)))
    if flag_value(args, "--checkpoint"):
        args = set_flag(args, "--checkpoint", ws.checkpoint(flag_value(args, "--checkpoint")))
    if flag_value(args, "--image") and not (ROOT / flag_value(args, "--image")).exists():
        args = set_flag(args, "--image", str(ws.root / "image.png"))
    out = flag_value(args, "--out")
    if out is not None:
        args = set_flag(args, "--out", str(ws.root / "out" / Path(out).name))
    head = ["-m", entry] if not entry.endswith(".py") else [entry]
    if "--help" in args or "-h" in args:
        return head + args, r"^usage: |^options:|--help"
    if entry == "train.py":
        out = out or "train-run"
        args = set_flag(tiny_arch(args), "--out", str(ws.root / "out" / Path(out).name))
        for i in range(0, len(TRAIN_TINY), 2):
            args = set_flag(args, TRAIN_TINY[i], TRAIN_TINY[i + 1])
        if not flag_value(args, "--data"):
            args = set_flag(args, "--data", "fashion-mnist-sample")
        return head + args, r"run folder: "
    if entry == "selfsup.eval":
        args = [a for a in args if a != "--full"]
        for flag, v in (("--device", "cpu"), ("--train-size", "64"), ("--test-size", "32"),
                        ("--batch-size", "32")) + ((("--epochs", "1"),) if args[0] == "linear"
                                                   else ()):
            args = set_flag(args, flag, v)
        return head + args, rf"{args[0]}_top1 [0-9.]+$"
    if entry == "selfsup.finetune":
        for flag, v in (("--steps", "2"), ("--batch-size", "4"), ("--device", "cpu"),
                        ("--train-size", "64"), ("--test-size", "32")):
            args = set_flag(args, flag, v)
        if out is None:
            args = set_flag(args, "--out", str(ws.root / "out" / "finetune"))
        return head + args, r"finetune_top1 [0-9.]+$"
    if entry in ("selfsup.export", "selfsup.visualize"):
        return head + args, "file:" + flag_value(args, "--out")
    return head + args, r"\| method \|"  # bench/quality.py --table


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("docs_commands"))


RUNS = runnable()


@pytest.mark.parametrize("cmd", RUNS, ids=[label(c) for c in RUNS])
def test_command_runs(cmd, workspace):
    failure = None
    try:
        check(cmd)  # a command that does not parse is reported as such, not as a crash
        argv, expect = rewrite(cmd, workspace)
        r = run_python(argv, cmd.env, "it")
    except CommandError as e:
        failure = str(e)
    if failure:
        pytest.fail(f"{cmd.where}: `{cmd.text}`\n{failure}", pytrace=False)
    if expect.startswith("file:"):
        assert Path(expect[5:]).is_file(), f"{cmd.where}: `{cmd.text}` wrote no {expect[5:]}"
    else:
        assert re.search(expect, r.stdout.strip(), re.M), (
            f"{cmd.where}: `{cmd.text}` ran as `{shlex.join(argv)}` but printed no /{expect}/:"
            f"\n{r.stdout[-2000:]}")


def test_every_runnable_entry_point_has_a_documented_command_that_runs():
    keys = {run_key(c) for c in RUNS}
    want = {("train.py", None), ("selfsup.eval", "knn"), ("selfsup.export", None),
            ("selfsup.visualize", "attention"), ("bench/quality.py", None)}
    assert want <= keys, f"no documented, runnable command for {sorted(want - keys, key=str)}"


# ------------------------------------------------------------------------------ the checker
def test_extraction_joins_continuations_splits_chains_and_skips_other_blocks():
    md = ("text\n```bash\nFOO=1 nice python train.py --steps 2 \\\n    --lr 0.1   # note\n"
          "make demo && make test\n```\n```text\npython not-a-command\n```\n")
    cmds = extract(md, "x.md")
    assert [c.argv for c in cmds] == [["python", "train.py", "--steps", "2", "--lr", "0.1"],
                                      ["make", "demo"], ["make", "test"]]
    assert cmds[0].env == {"FOO": "1"} and cmds[0].where == "x.md:3"
    assert cmds[1].where == "x.md:5"


@pytest.mark.parametrize("text", [
    "python train.py --no-such-flag 1",  # a renamed flag
    "python train.py --method nosuch",  # resolved against METHODS
    "python train.py --arch vit_xl",  # not a backbone
    "python -m selfsup.eval knn",  # --checkpoint is required
    "python -m selfsup.export --checkpoint RUN --out x --format zip",  # not a choice
    "torchrun --nproc-per-node-typo 2 train.py",
    "torchrun --standalone --nproc_per_node 2 train.py --no-such-flag",
    "python -m pip install torch==2.0.0",  # not the Makefile's pin
    "python -m pip install -e .[nosuchextra]",
    "make no-such-target",
    "python nosuch.py",
    "frobnicate --all",  # no rule
    "pytest tests/no_such_test_file.py",
    "python -c 'from selfsup.kernels import no_such_op'",
])
def test_the_checker_fails_on_broken_commands(text):
    (cmd,) = extract(f"```bash\n{text}\n```\n", "t.md")
    with pytest.raises(CommandError):
        check(cmd)


def test_tiny_rewrite_follows_the_documented_rules(tmp_path):
    ws = Workspace(tmp_path)
    (cmd,) = extract("```bash\npython train.py --method dino --arch vit_small --data "
                     "/nowhere/imagenet/train --steps 9000 --out runs/x\n```\n", "t.md")
    argv, expect = rewrite(cmd, ws)
    assert argv[0] == "train.py" and expect == "run folder: "
    args = argv[1:]
    assert flag_value(args, "--arch") == "vit_tiny" and flag_value(args, "--patch-size") == "4"
    assert flag_value(args, "--data") == str(tmp_path / "images" / "train")
    assert flag_value(args, "--steps") == "2" and args.count("--steps") == 1
    assert flag_value(args, "--out") == str(tmp_path / "out" / "x")
    assert (tmp_path / "images" / "val" / "class0" / "0.png").is_file()
    assert ws.data("--data", "mnist") == "fashion-mnist-sample"
    assert ws.data("--test-data", "/nowhere/heldout") == str(tmp_path / "images" / "val")
    (gpu,) = extract("```bash\npython train.py --device cuda\n```\n", "t.md")
    assert run_key(gpu) is None  # parse-only


# ------------------------------------------------------------------------------ tables
def quality_table() -> str:
    spec = importlib.util.spec_from_file_location("_docs_quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    import json

    return quality.table(json.loads((ROOT / "bench" / "results" / "quality.json").read_text()))


def test_quality_tables_are_what_bench_quality_prints():
    """README's (and any doc's) learning-quality table is `python bench/quality.py --table`."""
    want = quality_table().splitlines()
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == want[0]:
                got = lines[i:i + len(want)]
                found.append(path.name)
                assert got == want, (
                    f"{path.relative_to(ROOT)}:{i + 1}: the quality table differs from "
                    f"`python bench/quality.py --table`; paste its output:\n" + "\n".join(want))
    assert "README.md" in found, "README.md lacks the table of `bench/quality.py --table`"


# ------------------------------------------------------------------------------ links
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_point_at_files():
    broken = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL or an anchor on the same page
                if not (path.parent / target.split("#")[0]).exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
