"""Argument checks for the command-line entry points (`python -m inductor_w4a8 ...`, examples/).

Every check runs before the long work starts and ends the program with one line on stderr and
exit code 2 (argparse's code for a usage error), never a traceback: a missing GPU, an output
path that cannot be written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

USAGE_ERROR = 2
CPU_HINT = "on a CPU machine, `python -m inductor_w4a8 demo` runs the whole pipeline"


def exit_usage(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


def require_cuda(prog: str, what: str = "this script") -> None:
    """End the program (exit 2, one line) unless a CUDA GPU is usable."""
    if not torch.cuda.is_available():
        exit_usage(prog, f"{what} needs a CUDA GPU and torch {torch.__version__} sees none; {CPU_HINT}")


def device_or_exit(prog: str, spec: str | None) -> torch.device:
    """`--device` value -> torch.device (None: cuda when available, else cpu); ends the program
    when the device is unknown or not present."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        exit_usage(prog, f"--device {spec!r} is not a device; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            exit_usage(prog, f"--device {spec}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            exit_usage(prog, f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        exit_usage(prog, f"--device {spec}: only cpu and cuda are supported")
    return device


def positive_int(text: str) -> int:
    """argparse `type=` for a count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def output_file(value: str) -> Path:
    """argparse `type=` for a file the program writes at the end: its folder must exist and be
    writable now, so that a bad path fails in a second, not after the run."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{value} exists and is not writable")
    parent = path.parent if str(path.parent) else Path(".")
    if not _writable_dir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {value}: the folder {parent} does not exist "
                                         f"or is not writable (create it first)")
    return path


def output_dir(value: str) -> Path:
    """argparse `type=` for a folder the program writes into at the end: it, or the nearest folder
    above it that exists, must be writable now. Nothing is created here (the writer calls
    `path.mkdir(parents=True, exist_ok=True)`), so a refused run leaves no empty folder behind."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not _writable_dir(existing):
        raise argparse.ArgumentTypeError(f"cannot write into {value}: {existing} is not a writable folder")
    return path
