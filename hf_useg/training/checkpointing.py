"""Resumable checkpoints, written atomically (a checkpoint folder is either complete or absent, its files fsynced
before the rename), the atomic model folders (``best/``, ``model/``) of a run, and the guards that keep runs
apart: every checkpoint carries the identity of its run, a checkpoint of another run is never resumed, and a
fresh run never takes over a folder that holds another run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..file_utils import atomic_directory, fsync_tree

__all__ = [
    "check_output_dir",
    "check_same_run",
    "latest_checkpoint",
    "remove_interrupted_writes",
    "run_identity",
    "save_checkpoint",
    "save_model_folder",
]

STATE_FILE = "trainer_state.json"
# what a run writes into its output_dir: a folder holding any of these holds a run
RUN_OUTPUTS = ("checkpoints", "model", "best", "metrics.jsonl")
# settings that may change when a run is resumed: where and how often it logs and saves, how it is evaluated, and
# how long it trains (extending a run is resuming it)
_RESUMABLE_CHANGES = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "save_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "report_to",
    "eval_batch_size",
    "num_workers",
    "max_val_images",
    "final_crf",
    "final_flip_tta",
    "val_every",
    "max_steps",
}


def run_identity(args, options, train_set) -> dict[str, Any]:
    """What makes two runs the same run: the method, its model and recipe settings, the seed, the backbone and the
    training data (its `datasets` fingerprint when it has one). Saved with every checkpoint."""
    import dataclasses

    # the resolved recipe options below stand for the raw `recipe` overrides
    skipped = _RESUMABLE_CHANGES | {"recipe"}
    identity = {key: value for key, value in dataclasses.asdict(args).items() if key not in skipped}
    may_change = _RESUMABLE_CHANGES - set(getattr(options, "fixed_on_resume", ()))
    identity["recipe_options"] = {
        key: value for key, value in dataclasses.asdict(options).items() if key not in may_change
    }
    identity["train_data"] = getattr(train_set, "_fingerprint", None) or f"{len(train_set)} items"
    return json.loads(json.dumps(identity, default=str))  # what a JSON round trip gives back, for comparisons


def check_same_run(checkpoint: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` unless it was written by a run with this ``identity``, naming what differs."""
    saved = json.loads((checkpoint / STATE_FILE).read_text()).get("run")
    if saved is None:
        raise ValueError(
            f"{checkpoint} carries no run identity (written before checkpoints had one): it cannot be checked to "
            "belong to this run; start a new run (--overwrite_output_dir or another --output_dir)"
        )
    differences = []
    for key in sorted(set(saved) | set(identity)):
        if key == "recipe_options":
            inner_saved, inner_now = saved.get(key, {}), identity.get(key, {})
            for name in sorted(set(inner_saved) | set(inner_now)):
                if inner_saved.get(name) != inner_now.get(name):
                    differences.append(
                        f"{name}: checkpoint {inner_saved.get(name)!r}, this run {inner_now.get(name)!r}"
                    )
        elif saved.get(key) != identity.get(key):
            differences.append(f"{key}: checkpoint {saved.get(key)!r}, this run {identity.get(key)!r}")
    if differences:
        raise ValueError(
            f"{checkpoint} belongs to another run, refusing to resume it ({'; '.join(differences)}); resume with the "
            "same settings, or start a new run (--overwrite_output_dir or another --output_dir)"
        )


def check_output_dir(output_dir: Path, resuming: bool, overwrite: bool, remove: bool = True) -> None:
    """A fresh run never adopts or destroys another run's outputs: it refuses a folder that holds a run unless
    told to replace it (``overwrite``: the run's outputs are removed, by the process given ``remove``) or to resume
    it. Every process calls it, so they all refuse together."""
    existing = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not existing or resuming:
        return
    if not overwrite:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}): continue it with "
            "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose another --output_dir"
        )
    for name in existing if remove else ():
        path = output_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_interrupted_writes(output_dir: Path) -> list[Path]:
    """Remove the temporary folders an interrupted run left (``.tmp-checkpoint-*``, ``.tmp-model``, ...)."""
    leftovers = [*output_dir.glob(".tmp-*"), *(output_dir / "checkpoints").glob(".tmp-checkpoint-*")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


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
