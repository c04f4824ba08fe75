"""Resumable checkpoints, written atomically (a checkpoint folder is either complete or absent), and the atomic
model folders (``best/``, ``model/``) of a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..file_utils import atomic_directory, fsync_tree

__all__ = ["latest_checkpoint", "save_checkpoint", "save_model_folder"]

STATE_FILE = "trainer_state.json"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-*`` folder under ``output_dir/checkpoints`` (None if there is none)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def save_checkpoint(accelerator, output_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` (model, optimizer, RNG, registered objects) plus the loop's state, into a
    temporary folder that is fsynced and renamed into place; the oldest checkpoints beyond ``keep`` are removed."""
    root = output_dir / "checkpoints"
    final = root / f"checkpoint-{state['step']:08d}"
    tmp = root / f".tmp-checkpoint-{state['step']:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model_folder(model, processor, path: Path, extra_files: dict[str, str] | None = None) -> None:
    """``save_pretrained`` of the model and its processor plus extra text files, atomically."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
