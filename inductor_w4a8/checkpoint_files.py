"""A checkpoint directory's files: config.json and the safetensors shards, read lazily.

One `.safetensors` file, several, or shards listed by `model.safetensors.index.json`. Every
problem with a file (missing, unreadable, truncated, invalid JSON, an index without
`weight_map`, a shard the index names but the directory lacks) is a W4A8CheckpointError that
names the file, raised before any tensor is handed out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checks import W4A8CheckpointError

__all__ = ["CONFIG_NAME", "INDEX_NAME", "SINGLE_FILE_NAME", "read_config", "CheckpointFiles"]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"


def _read_json(file: Path, what: str) -> dict:
    try:
        value = json.loads(file.read_text())
    except OSError as e:
        raise W4A8CheckpointError(f"{file}: cannot read the {what} ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise W4A8CheckpointError(f"{file}: the {what} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise W4A8CheckpointError(f"{file}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_config(path) -> dict:
    """`path/config.json` as a dict, or W4A8CheckpointError naming the file."""
    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise W4A8CheckpointError(f"{path} is not a checkpoint directory (it needs {CONFIG_NAME} and "
                                  f".safetensors files)")
    if not file.exists():
        raise W4A8CheckpointError(f"{path} has no {CONFIG_NAME}")
    return _read_json(file, "model config")


class CheckpointFiles:
    """key -> safetensors file; `get(key)` reads one tensor (through safe_open, one handle per file)."""

    def __init__(self, path):
        from safetensors import safe_open
        self._safe_open = safe_open
        self.path = Path(path)
        self._open = {}
        index = self.path / INDEX_NAME
        if index.exists():
            self.where = self._from_index(index)
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise W4A8CheckpointError(f"{self.path} holds no .safetensors file")
            self.where = {}
            for f in files:
                for k in self._handle(f).keys():
                    self.where[k] = f

    def _from_index(self, index: Path) -> dict:
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise W4A8CheckpointError(f"{index}: the index has no weight_map (a JSON object of "
                                      f"tensor name -> shard file)")
        where = {k: self.path / str(f) for k, f in weight_map.items()}
        missing = sorted({str(f.name) for f in where.values() if not f.is_file()})
        if missing:
            raise W4A8CheckpointError(f"{index} names shard(s) {missing} that {self.path} does not hold")
        for f in sorted(set(where.values())):
            listed = set(self._handle(f).keys())
            absent = [k for k, g in where.items() if g == f and k not in listed]
            if absent:
                raise W4A8CheckpointError(f"{f}: the index maps {absent[:3]} to this shard, but it "
                                          f"does not hold them")
        return where

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                self._open[f] = self._safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise W4A8CheckpointError(f"{f}: not a readable safetensors file (truncated or "
                                          f"corrupt?): {e}") from e
        return self._open[f]

    def keys(self):
        return self.where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def file_of(self, key: str) -> Path:
        return self.where[key]

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        try:
            return self._handle(f).get_tensor(key)
        except W4A8CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise W4A8CheckpointError(f"{f}: cannot read tensor {key!r} (truncated or corrupt "
                                      f"file?): {e}") from e

    def close(self):
        for h in self._open.values():
            if hasattr(h, "__exit__"):
                h.__exit__(None, None, None)
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
