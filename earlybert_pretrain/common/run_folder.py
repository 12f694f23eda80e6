"""A run's output folder: one run per folder, --resume only with the same config and inputs, --overwrite only of
what a run of this program wrote. Both recipes (pre-training, fine-tuning) use it.

``run.json`` marks a folder as a run: its kind ("pre-training", "fine-tuning"), the config, digests of the inputs
(ticket, shards, vocab, model) and argv. A folder holding other files is never a run and is never deleted:
``--overwrite`` removes exactly the entries the recipe's layout names (``owned``), nothing else, so a user's notes
or data placed beside a run survive.

``run.json`` also records where the folder was (``location``, ``cwd``): --resume compares the configs with the
folder's own location taken out, so a run moved or copied elsewhere (``cp -a``) resumes under its new name.
Checkpoints resume on the world size that wrote them unless ``--allow-world-size-change`` is passed
(``train.checkpoint``).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from earlybert_pretrain.common.files import atomic_write_json, read_json, remove_entry
from earlybert_pretrain.common.lock import LOCK_FILE
from earlybert_pretrain.errors import RunError

RUN_FILE = "run.json"
ALLOW_WORLD_SIZE_CHANGE = "--allow-world-size-change"  # both recipes' flag: resume on another number of ranks


def flatten(values: dict, prefix: str = "") -> dict:
    """{"phase1": {"lr": 1}} -> {"phase1.lr": 1}, to name the keys two configs differ in."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _located(config: dict, root: str, cwd: str) -> dict:
    """``config`` flattened, with each path to the run folder or into it (output_dir, a file kept in the run) written
    relative to the folder: what a run's config says apart from where the run lives. A relative path counts from
    ``cwd``; a bare name counts only when it is the folder itself (``lamb`` is not a file of a run kept in the cwd)."""
    located = {}
    for key, value in flatten(config).items():
        if isinstance(value, str) and value:
            path = os.path.normpath(os.path.join(cwd, value))
            inside = path.startswith(root + os.sep) and os.sep in value
            if path == root or inside:
                value = os.path.join("<run folder>", os.path.relpath(path, root))
        located[key] = value
    return located


def _differences(previous: dict, current: dict) -> list[str]:
    previous, current = flatten(previous), flatten(current)
    return sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))


def check_no_symlink_loop(folder: Path) -> None:
    """RunError naming the link when ``folder`` or a folder above it is a symbolic link that leads back to itself (the
    OS would only say "File exists" or "Too many levels of symbolic links" when the folder is created)."""
    for path in (*reversed(Path(folder).parents), Path(folder)):  # outermost first: the loop's own link is named
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunError(f"{path}: is a symbolic link loop (-> {os.readlink(path)}); give a real folder") \
                    from None


def check_writable(folder: Path) -> None:
    """One clear line when ``folder`` cannot hold a run: a file in its place, a symbolic link loop, or no permission
    to write there."""
    check_no_symlink_loop(folder)
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunError(f"{existing}: is a file, expected a folder for the run's output")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{existing}: not writable (permission denied); choose another output_dir")


def _remove_run(folder: Path, owned: list[str]) -> None:
    """--overwrite: remove the run's own entries, run.json last, so a removal that fails halfway leaves a folder that
    is still a run (the next --overwrite finishes it). An entry that is a symbolic link (checkpoints/ moved to another
    disk and linked) refuses the whole removal before anything goes: removing through it would delete outside the
    folder, removing the link alone would leave the old checkpoints and put the new ones on this disk."""
    links = [folder / name for name in owned if (folder / name).is_symlink()]
    if links:
        named = ", ".join(f"{link} -> {os.readlink(link)}" for link in links)
        raise RunError(f"{folder}: --overwrite removes no symbolic link nor what it points to ({named}); empty or "
                       f"remove it yourself, then rerun (nothing was removed)")
    for name in sorted(owned, key=lambda name: name == RUN_FILE):
        remove_entry(folder / name)


def prepare(folder: Path, kind: str, config: dict, inputs: dict[str, str], owned: list[str], resume: bool,
            overwrite: bool, is_main: bool) -> bool:
    """Make ``folder`` this run's; True when an earlier run of the same config is being resumed.

    Refused (RunError, nothing touched): a folder holding another run without --resume / --overwrite; --resume with
    a different config or changed inputs (named); any folder that is not a run of this kind (its files named), even
    with --overwrite.
    """
    check_writable(folder)
    run_file = folder / RUN_FILE
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []
    previous = read_json(run_file, what="run record") if run_file.is_file() else None
    if previous is None and present:
        listed = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise RunError(f"{folder} holds files that are not a {kind} run ({listed}); give an empty or new output_dir "
                       f"(nothing there is deleted, not even with --overwrite)")
    if previous is not None and previous.get("kind", kind) != kind:
        raise RunError(f"{folder} holds a {previous.get('kind')} run, not a {kind} run; give another output_dir")
    resuming = False
    if previous is not None:
        if overwrite:
            if is_main:
                _remove_run(folder, owned)
        elif resume:
            here = (os.path.abspath(folder), os.getcwd())
            there = (previous.get("location", here[0]), previous.get("cwd", here[1]))  # older records: unmoved
            changed = _differences(_located(previous.get("config", {}), *there), _located(config, *here))
            if changed:
                raise RunError(f"{folder} holds a run with a different config ({', '.join(changed)} differ); resume "
                               f"it with its own config or pass --overwrite to start over")
            changed = _differences(previous.get("inputs", {}), inputs)
            if changed:
                raise RunError(f"{folder}: the run's inputs changed since it started ({', '.join(changed)}); "
                               f"restore them, or pass --overwrite to start over")
            resuming = True
        else:
            raise RunError(f"{folder} holds another {kind} run; pass --resume to continue it or --overwrite to "
                           f"replace it")
    if is_main:
        atomic_write_json(run_file, {"kind": kind, "config": config, "inputs": inputs, "argv": sys.argv,
                                     "location": os.path.abspath(folder), "cwd": os.getcwd()})
    return resuming
