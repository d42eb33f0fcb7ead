"""Self-contained, atomic, verified checkpoints.

A checkpoint is a folder `<run_dir>/step_<N:08d>/` holding `model.safetensors`,
`optimizer.safetensors`, `meta.json` (the caller's dict plus "step"), an optional
`tokenizer/` copy, a `manifest.json` with the size and sha256 of every other file,
and a `COMMIT` marker written last: a folder without it is not a checkpoint.

Writing goes to `<run_dir>/.tmp-step_<N>-<pid>/` (every file fsynced), which is then
renamed into place, so a crash at any moment leaves the previous checkpoint intact
and at worst a `.tmp-*` folder that the next save deletes. `mx.save_safetensors`
truncates in place, which is why nothing is ever written under a final name.
`latest` and `best` are relative symlinks swapped with `os.replace`; `best.json`
holds the best metric. Verification re-hashes every file (cost: one read of the
checkpoint), which catches a flipped byte that safetensors would load silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError
from ..files import fsync_path, write_bytes

FORMAT = 1
COMMIT = "COMMIT"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


def _write_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:  # MLX reports write failures (disk full) this way
        raise OSError(errno.EIO, str(e), str(path)) from e
    fsync_path(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or not a real pid
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _point_link(run_dir: Path, name: str, target: str) -> None:
    """Atomically make `run_dir/name` a symlink to the relative `target`."""
    tmp = run_dir / f".tmp-link-{name}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, run_dir / name)


# --- saving ----------------------------------------------------------------------


def _check_finite(group: str, arrays: dict[str, mx.array], step: int) -> None:
    names = [k for k, a in arrays.items() if mx.issubdtype(a.dtype, mx.floating)]
    flags = [mx.all(mx.isfinite(arrays[k])) for k in names]
    mx.eval(flags)  # one evaluation for all arrays, not one sync per array
    bad = [k for k, ok in zip(names, flags, strict=True) if not ok.item()]
    if bad:
        raise CheckpointError(
            f"refusing to save checkpoint step {step}: non-finite values in "
            f"{group} {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
        )


def _write_checkpoint_dir(tmp, step, weights, optimizer, meta, tokenizer_dir) -> None:
    tmp.mkdir()
    _write_arrays(tmp / "model.safetensors", weights)
    _write_arrays(tmp / "optimizer.safetensors", optimizer)  # written even if empty
    write_bytes(
        tmp / "meta.json", json.dumps({**meta, "step": step}, indent=2).encode()
    )
    if tokenizer_dir is not None:
        (tmp / "tokenizer").mkdir()
        for src in sorted(Path(tokenizer_dir).iterdir()):
            if src.is_file():
                shutil.copyfile(src, tmp / "tokenizer" / src.name)
                fsync_path(tmp / "tokenizer" / src.name)
        fsync_path(tmp / "tokenizer")
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        files[p.relative_to(tmp).as_posix()] = {
            "sha256": _sha256(p),
            "bytes": p.stat().st_size,
        }
    manifest = {"format": FORMAT, "step": step, "files": files}
    write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
    write_bytes(tmp / COMMIT, b"")  # last: its presence means "complete"
    fsync_path(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (same step re-saved) is replaced."""
    if not final.exists():
        os.rename(tmp, final)
        return
    # A directory cannot be atomically replaced: move the old one aside under a
    # `.tmp-` name (cleaned up if we die here), put the new one in, drop the old.
    aside = final.parent / f".tmp-replaced-{final.name}-{os.getpid()}"
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(aside, final)
        raise
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _read_best(run_dir: Path) -> tuple[str, float] | None:
    try:
        best = json.loads((run_dir / "best.json").read_text())
        name, metric = f"step_{int(best['step']):08d}", float(best["metric"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (name, metric) if (run_dir / name / COMMIT).is_file() else None


def _cleanup_tmp(run_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of dead writers (or of our own earlier attempts)."""
    for p in run_dir.glob(".tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue  # not a name we make; leave it alone
        if pid == os.getpid() or not _pid_alive(pid):
            _remove(p)


def _retain(run_dir: Path, keep_last: int, keep: set[str]) -> None:
    """Keep the newest `keep_last` committed checkpoints plus those named in `keep`."""
    if keep_last <= 0:
        return
    committed = list_checkpoints(run_dir)
    keep = keep | {p.name for p in committed[-keep_last:]}
    for p in committed:
        if p.name not in keep:
            # Rename first: a crash mid-delete leaves a `.tmp-` dir, not a
            # half-deleted step dir that still carries its COMMIT marker.
            aside = run_dir / f".tmp-purge-{p.name}-{os.getpid()}"
            os.rename(p, aside)
            shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(
    run_dir,
    step: int,
    weights: dict[str, mx.array],
    optimizer: dict[str, mx.array],
    meta: dict,
    tokenizer_dir=None,
    keep_last: int = 3,
    metric: float | None = None,
) -> Path:
    """Write `<run_dir>/step_<step:08d>/` atomically and return its path.

    Refuses (CheckpointError, nothing written) if any floating array is NaN/inf.
    After the commit: `latest` points to it; `best` too if `metric` is finite and
    lower than the best so far (kept in `run_dir/best.json`). Then retention keeps
    the newest `keep_last` committed checkpoints plus `best` and this one
    (`keep_last <= 0` keeps all), and leftover `.tmp-*` dirs of dead writers are
    deleted. Any OS error removes the temp dir and raises CheckpointError.
    """
    run_dir = Path(run_dir)
    _check_finite("weights", weights, step)
    _check_finite("optimizer state", optimizer, step)
    name = f"step_{step:08d}"
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # our own earlier failed attempt (or a recycled pid)
            shutil.rmtree(tmp)
        _write_checkpoint_dir(tmp, step, weights, optimizer, meta, tokenizer_dir)
        _install(tmp, final)
        fsync_path(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not save checkpoint {final}: {e}") from e
    except BaseException:  # e.g. Ctrl-C or unserializable meta: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    try:
        _point_link(run_dir, "latest", name)
        best = _read_best(run_dir)
        if metric is not None and math.isfinite(metric):
            if best is None or metric < best[1]:
                record = json.dumps({"step": step, "metric": metric}).encode()
                write_bytes(run_dir / f".tmp-best-{os.getpid()}", record)
                os.replace(run_dir / f".tmp-best-{os.getpid()}", run_dir / "best.json")
                _point_link(run_dir, "best", name)
                best = (name, metric)
        fsync_path(run_dir)
        _retain(run_dir, keep_last, {name} | ({best[0]} if best else set()))
        _cleanup_tmp(run_dir)
        fsync_path(run_dir)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {final} was saved, but updating {run_dir} failed: {e}"
        ) from e
    return final


# --- finding, verifying, loading -------------------------------------------------


def list_checkpoints(run_dir) -> list[Path]:
    """Committed `step_*` dirs (COMMIT present) in `run_dir`, ascending by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _step_of(p) is not None]
    found = [p for p in found if not p.is_symlink() and (p / COMMIT).is_file()]
    return sorted(found, key=_step_of)


def verify_checkpoint(path) -> None:
    """Check COMMIT, the manifest, and the size and sha256 of every listed file.

    Raises CheckpointError naming the offending file; returns None if all is well.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not (path / COMMIT).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMMIT} marker)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["format"] != FORMAT or not isinstance(files, dict):
            raise ValueError(f"unsupported format {manifest['format']!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST}: missing or unreadable: {e}") from e
    for rel, entry in files.items():
        f = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path / MANIFEST}: corrupt, bad file name {rel!r}")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing; checkpoint {path} is incomplete")
        size, want = f.stat().st_size, int(entry["bytes"])
        if size < want:
            raise CheckpointError(f"{f}: truncated ({size} bytes, expected {want})")
        if size != want:
            raise CheckpointError(f"{f}: corrupt ({size} bytes, expected {want})")
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: corrupt (checksum mismatch)")


def find_latest_valid(run_dir, warn=print) -> Path | None:
    """Newest checkpoint in `run_dir` that verifies, or None.

    Every newer step dir that fails (uncommitted ones included) is reported through
    `warn`, naming the file and the checkpoint used instead.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    candidates = [p for p in run_dir.iterdir() if _step_of(p) is not None]
    failures = []
    for p in sorted(candidates, key=_step_of, reverse=True):
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for msg in failures:
            warn(f"warning: {msg}; falling back to {p}")
        return p
    for msg in failures:
        warn(f"warning: {msg}; no valid checkpoint left to fall back to")
    return None


def resolve_resume(arg: str, run_dir, warn=print) -> Path:
    """Map a `--resume` value to a verified checkpoint dir.

    "auto" picks the newest valid checkpoint in `run_dir`; anything else is a path
    (a symlink such as `<run_dir>/best` is resolved). Raises CheckpointError.
    """
    if arg == "auto":
        found = find_latest_valid(run_dir, warn=warn)
        if found is None:
            raise CheckpointError(f"nothing to resume in {run_dir}")
        return found
    path = Path(arg)
    if not path.exists():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    path = path.resolve()
    verify_checkpoint(path)
    return path


def read_meta(path) -> dict:
    """The checkpoint's meta.json only: cheap, for refusing changes before allocating."""
    f = Path(path) / "meta.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read checkpoint metadata: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    return meta


def load_checkpoint(
    path, verify: bool = True
) -> tuple[dict[str, mx.array], dict[str, mx.array], dict]:
    """Return (weights, optimizer state, meta); verify checksums first by default."""
    path = Path(path).resolve()
    if verify:
        verify_checkpoint(path)
    arrays = []
    for name in ("model.safetensors", "optimizer.safetensors"):
        try:
            arrays.append(mx.load(str(path / name)))
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path / name}: cannot load: {e}") from e
    return arrays[0], arrays[1], read_meta(path)
