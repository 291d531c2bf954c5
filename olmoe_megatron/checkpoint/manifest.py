"""A checkpoint's integrity manifest: every file with its size and a fast checksum.

    ROOT/step_0000100/olmoe_manifest.json
        {"version": 1, "checksum": "xxh3_64", "files": {"common.pt": {"size": 1234, "xxh3_64": "..."}, ...},
         "total_bytes": ..., "step": 100}

Training writes it into the temporary directory after every rank's files are written and synced,
and before the directory is renamed into place, so a committed checkpoint always has one (see
olmoe_megatron.training.checkpoint). The ranks hash a stripe of the files each, in parallel.

- `check_sizes`: existence and sizes only (a stat per file): what a resume checks before loading.
- `verify`: sizes and checksums (reads every byte): `olmoe ckpt verify`.
- `newest_complete`: the newest step directory of a root that passes `check_sizes`, for a resume
  that opts in to fall back past a damaged `latest` (checkpoint.fallback_to_complete).

A checkpoint without a manifest (written by a converter, or by a version before manifests) loads
as before; `verify` reports that it cannot be checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

from olmoe_megatron.checkpoint.format import STEP_NAME, CheckpointFormatError

MANIFEST_FILE = "olmoe_manifest.json"
MANIFEST_VERSION = 1
CHECKSUM = "xxh3_64"
_CHUNK = 8 << 20


def list_files(directory: str | Path) -> list[str]:
    """Every regular file under `directory` (relative, '/'-separated, sorted), the manifest excepted."""
    directory = Path(directory)
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def describe(directory: str | Path, names: list[str], *, fsync: bool = False) -> dict[str, dict]:
    """name -> {"size", "xxh3_64"} for `names` under `directory` (fsync: also flush each to disk)."""
    directory = Path(directory)
    out = {}
    for name in names:
        digest = xxhash.xxh3_64()
        size = 0
        with open(directory / name, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            if fsync:
                os.fsync(handle.fileno())
        out[name] = {"size": size, CHECKSUM: digest.hexdigest()}
    return out


def write_manifest(directory: str | Path, files: dict[str, dict], **fields) -> Path:
    """Writes `directory`/olmoe_manifest.json (temporary name, fsync, rename) with `fields` beside the files."""
    directory = Path(directory)
    body = {"version": MANIFEST_VERSION, "checksum": CHECKSUM, **fields,
            "total_bytes": sum(f["size"] for f in files.values()), "files": dict(sorted(files.items()))}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(body, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)
    return directory / MANIFEST_FILE


def write_manifest_for(directory: str | Path, **fields) -> Path:
    """A manifest of everything now in `directory`, hashed by this process (one-process writers)."""
    return write_manifest(directory, describe(directory, list_files(directory), fsync=True), **fields)


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a checkpoint directory; None when it has none.

    Raises:
        CheckpointFormatError: the manifest exists but is not one (truncated, edited, foreign).
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    fix = (f"the checkpoint's file list is lost: check the files by hand, or delete {path.name} to load it "
           "unchecked")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(f"{path} cannot be read as a manifest ({str(exc)[:120]}); {fix}") from None
    files = body.get("files") if isinstance(body, dict) else None
    if (not isinstance(files, dict) or body.get("version") != MANIFEST_VERSION or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get(CHECKSUM), str)
            for f in files.values())):
        raise CheckpointFormatError(f"{path} is not a version-{MANIFEST_VERSION} manifest (a 'files' map of "
                                    f"name -> size and {CHECKSUM}); {fix}")
    return body


def _size_problems(directory: Path, files: dict[str, dict]) -> dict[str, str]:
    """name -> what is wrong with it, for the listed files that are missing or of another size."""
    problems = {}
    for name, entry in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems[name] = f"{path} is missing (the manifest lists {entry['size']} bytes)"
            continue
        if size != entry["size"]:
            kind = "truncated" if size < entry["size"] else "longer than written"
            problems[name] = f"{path} is {kind}: {size} bytes, the manifest says {entry['size']}"
    return problems


def check_sizes(directory: str | Path) -> list[str]:
    """What is missing or has the wrong size in a checkpoint directory (sizes only; [] when complete).

    A directory without a manifest passes unchecked; its dist checkpoint metadata must still be there.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        missing = [name for name in (".metadata", "common.pt", "metadata.json") if not (directory / name).is_file()]
        return [f"{directory / name} is missing" for name in missing]
    return list(_size_problems(directory, manifest["files"]).values())


def verify(directory: str | Path) -> tuple[dict | None, list[str]]:
    """(manifest, problems): sizes, then the checksum of every file of the right size, plus files the
    manifest does not list. The manifest is None for a directory without one (problems then say so)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None, [f"{directory} has no {MANIFEST_FILE} (written by a converter or by a version without "
                      "manifests): its files cannot be checked"]
    files = manifest["files"]
    wrong_size = _size_problems(directory, files)
    problems = list(wrong_size.values())
    for name, entry in files.items():
        if name in wrong_size:
            continue
        got = describe(directory, [name])[name][CHECKSUM]
        if got != entry[CHECKSUM]:
            problems.append(f"{directory / name} has changed: {CHECKSUM} {got}, the manifest says {entry[CHECKSUM]}")
    for name in sorted(set(list_files(directory)) - set(files)):
        problems.append(f"{directory / name} is not in the manifest (added after the save)")
    return manifest, problems


def require_complete(directory: str | Path, *, field: str) -> None:
    """Raises CheckpointFormatError naming the first missing or truncated file of `directory`."""
    problems = check_sizes(directory)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointFormatError(
            f"{field}: checkpoint {directory} is incomplete: {problems[0]}{more}; restore the file, load an older "
            f"step of {Path(directory).parent} (--{field}=.../step_XXXXXXX), or set "
            "--checkpoint.fallback_to_complete=true to resume from the newest complete checkpoint"
        )


def newest_complete(root: str | Path, *, below: str | None = None) -> Path | None:
    """The newest step directory of `root` (older than step name `below`, if given) that passes
    check_sizes; None when there is none."""
    steps = sorted((p for p in Path(root).iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)), reverse=True)
    for step in steps:
        if below is not None and step.name >= below:
            continue
        try:
            if not check_sizes(step):
                return step
        except CheckpointFormatError:
            continue
    return None
