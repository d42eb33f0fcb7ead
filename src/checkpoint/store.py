"""Self-contained, atomic, verified checkpoints.

A checkpoint is a folder `<run_dir>/step_<N:08d>/` holding `model.safetensors`,
`optimizer.safetensors`, `meta.json` (the caller's dict plus "step"), an optional
`tokenizer/` copy, a `manifest.json` with the size and sha256 of every other file,
and a `COMMIT` marker written last: a folder without it is not a checkpoint.

Writing goes to `<run_dir>/.tmp-step_<N>-<pid>/` (every file fsynced), which is then
renamed into place, so a crash at any moment leaves the previous checkpoint intact
and at worst a `.tmp-*` folder that the next save deletes. `mx.save_safetensors`
truncates in place, which is why nothing is ever written under a final name, and
a checkpoint folder, once there, is never replaced. `latest` and `best` are
relative symlinks swapped with `os.replace`; `best.json` holds the best metric.
A rewind (`set_aside`) moves the checkpoints past a step into `rewound-<time>/`
and makes the links true again (`relink`). Verification re-hashes every file
(cost: one read of the checkpoint), which catches a flipped byte that
safetensors would load silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError
from ..files import fsync_path, write_bytes, write_failure
from ..tokenizer.kinds import save_tokenizer

FORMAT = 1
COMMIT = "COMMIT"
MANIFEST = "manifest.json"
ASIDE = "rewound-"  # folders of checkpoints a rewind moved out of the way
# The files of a checkpoint folder, beside the tokenizer copy in `tokenizer/`.
FILES = ("model.safetensors", "optimizer.safetensors", "meta.json", MANIFEST, COMMIT)
_STEP_RE = re.compile(r"^step_(\d+)$")
# Everything else the store writes in a run folder: the links, the best metric,
# and its temp names (`.tmp-<what>-<pid>`; `replaced-` from older versions).
_OWN_RE = re.compile(
    r"^(latest|best|best\.json"
    r"|\.tmp-(step_\d+|link-\w+|best|(purge|replaced)-step_\d+)-\d+)$"
)
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


def step_of(path: Path) -> int | None:
    """The step a `step_<N>` folder name says; None for any other name."""
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _point_link(run_dir: Path, name: str, target: str) -> None:
    """Atomically make `run_dir/name` a symlink to the relative `target`."""
    tmp = run_dir / f".tmp-link-{name}-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, run_dir / name)


def _set_best(run_dir: Path, name: str, metric: float) -> None:
    """`best.json` and the `best` link name checkpoint `name` with `metric`."""
    record = json.dumps({"step": step_of(Path(name)), "metric": metric}).encode()
    tmp = run_dir / f".tmp-best-{os.getpid()}"
    write_bytes(tmp, record)
    os.replace(tmp, run_dir / "best.json")
    _point_link(run_dir, "best", name)


def _drop_best(run_dir: Path) -> None:
    """No best checkpoint: a `best` link or `best.json` left over would lie."""
    (run_dir / "best").unlink(missing_ok=True)
    (run_dir / "best.json").unlink(missing_ok=True)


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


def _write_checkpoint_dir(
    tmp, step, weights, optimizer, meta, tokenizer_dir, tokenizer
) -> None:
    tmp.mkdir()
    _write_arrays(tmp / "model.safetensors", weights)
    _write_arrays(tmp / "optimizer.safetensors", optimizer)  # written even if empty
    write_bytes(
        tmp / "meta.json", json.dumps({**meta, "step": step}, indent=2).encode()
    )
    if tokenizer is not None:  # only the files that make it, never a model's weights
        for path in save_tokenizer(tokenizer, tmp / "tokenizer"):
            fsync_path(path)
        fsync_path(tmp / "tokenizer")
    elif tokenizer_dir is not None:
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


def _refuse_existing(final: Path) -> None:
    """A saved checkpoint is never replaced (nor anything else by its name)."""
    if os.path.lexists(final):
        raise CheckpointError(
            f"checkpoint {final} already exists, and a saved checkpoint is never "
            f"replaced: resume from it, or move it out of {final.parent} first"
        )


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`, which must not exist (checked again
    here: renaming onto an empty folder would silently replace it)."""
    _refuse_existing(final)
    os.rename(tmp, final)


def _failure(exc: OSError, tmp: Path, final: Path) -> str:
    """`write_failure` for the file that failed, named where it was going to be
    (the temp folder is deleted), a full disk said as such."""
    try:
        where = final / Path(exc.filename).relative_to(tmp)
    except (TypeError, ValueError):  # no file name, or not one of ours
        where = final
    return write_failure(where, exc)


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
    tokenizer=None,
) -> Path:
    """Write `<run_dir>/step_<step:08d>/` atomically and return its path; its
    `tokenizer/` holds the files that make `tokenizer` (`src.tokenizer.kinds`),
    or a copy of the files in `tokenizer_dir`.

    Refuses (CheckpointError, nothing written) if `<run_dir>/step_<step>` already
    exists (a saved checkpoint is never replaced) or any floating array is NaN/inf.
    After the commit: `latest` points to it; `best` too if `metric` is finite and
    lower than the best so far (kept in `run_dir/best.json`). Then retention keeps
    the newest `keep_last` committed checkpoints plus `best` and this one
    (`keep_last <= 0` keeps all), and leftover `.tmp-*` dirs of dead writers are
    deleted. Any OS error removes the temp dir and raises CheckpointError naming
    the file (a full disk as such); the checkpoints saved before are untouched.
    """
    run_dir = Path(run_dir)
    name = f"step_{step:08d}"
    final = run_dir / name
    _refuse_existing(final)
    _check_finite("weights", weights, step)
    _check_finite("optimizer state", optimizer, step)
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # our own earlier failed attempt (or a recycled pid)
            shutil.rmtree(tmp)
        _write_checkpoint_dir(
            tmp, step, weights, optimizer, meta, tokenizer_dir, tokenizer
        )
        _install(tmp, final)
    except OSError as e:
        message = _failure(e, tmp, final)  # before the temp dir frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        before = list_checkpoints(run_dir)
        kept = f"; the last checkpoint, {before[-1]}, is intact" if before else ""
        raise CheckpointError(f"{message}; step {step} was not saved{kept}") from e
    except BaseException:  # e.g. Ctrl-C or unserializable meta: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    try:
        fsync_path(run_dir)
        _point_link(run_dir, "latest", name)
        best = _read_best(run_dir)
        if metric is not None and math.isfinite(metric):
            if best is None or metric < best[1]:
                _set_best(run_dir, name, metric)
                best = (name, metric)
        if best is None:
            _drop_best(run_dir)
        fsync_path(run_dir)
        _retain(run_dir, keep_last, {name} | ({best[0]} if best else set()))
        _cleanup_tmp(run_dir)
        fsync_path(run_dir)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {final} was saved, but updating {run_dir} failed: "
            f"{write_failure(e.filename or run_dir, e)}"
        ) from e
    return final


# --- rewinding, and what a run folder holds --------------------------------------


def relink(run_dir, metric_key: str = "val_loss") -> None:
    """Make `latest`, `best` and `best.json` true to the committed checkpoints of
    `run_dir` (after some were moved away): `latest` the newest, `best` the one
    whose meta has the lowest finite `metric_key` (the earliest on ties, as
    `save_checkpoint` keeps it); links to nothing are removed."""
    run_dir = Path(run_dir)
    committed = list_checkpoints(run_dir)
    if committed:
        _point_link(run_dir, "latest", committed[-1].name)
    else:
        (run_dir / "latest").unlink(missing_ok=True)
    best = None
    for p in committed:
        try:
            metric = read_meta(p).get(metric_key)
        except CheckpointError:
            continue
        if isinstance(metric, int | float) and math.isfinite(metric):
            if best is None or metric < best[1]:
                best = (p.name, float(metric))
    if best is None:
        _drop_best(run_dir)
    else:
        _set_best(run_dir, *best)
    fsync_path(run_dir)


def step_folders(run_dir) -> list[Path]:
    """Every `step_*` entry of `run_dir`, committed or not, ascending by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if step_of(p) is not None), key=step_of)


def set_aside(run_dir, after: int) -> tuple[Path, list[str]] | None:
    """Move every step folder of `run_dir` past step `after` (committed or not)
    into a new `run_dir/rewound-<time>/`, newest first, then `relink`: nothing is
    deleted, and a later save of those steps collides with nothing. Returns that
    folder and the names moved, or None when there were none."""
    run_dir = Path(run_dir)
    newer = [p for p in step_folders(run_dir) if step_of(p) > after][::-1]
    if not newer:
        return None
    base = run_dir / f"{ASIDE}{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while True:  # two rewinds in one second: -2, -3, ...
        try:
            aside.mkdir()
            break
        except FileExistsError:
            n += 1
            aside = base.with_name(f"{base.name}-{n}")
    for p in newer:
        os.rename(p, aside / p.name)
    fsync_path(aside)
    fsync_path(run_dir)
    relink(run_dir)
    return aside, [p.name for p in newer[::-1]]


def _checkpoint_strays(path: Path) -> list[Path]:
    """What in a step folder a save did not write: beside `FILES`, only the
    tokenizer copy (the files its manifest lists; any plain file without one)."""
    if path.is_symlink() or not path.is_dir():
        return []
    try:
        listed = set(json.loads((path / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    strays = []
    for p in path.iterdir():
        if p.name in FILES or (listed and p.name in listed):
            continue
        if p.name != "tokenizer" or p.is_symlink() or not p.is_dir():
            strays.append(p)
            continue
        for f in p.iterdir():
            rel = f"tokenizer/{f.name}"
            if listed is not None and rel not in listed:
                strays.append(f)
            elif listed is None and (f.is_symlink() or not f.is_file()):
                strays.append(f)
    return strays


def strays(run_dir, others: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    """What in `run_dir` the store did not write and `others` does not accept:
    a caller about to delete a run's files must find none. Checkpoint folders
    and the `rewound-*` folders of rewinds are looked into."""
    out = []
    for p in sorted(Path(run_dir).iterdir()):
        if step_of(p) is not None:
            out += _checkpoint_strays(p)
        elif p.name.startswith(ASIDE) and p.is_dir() and not p.is_symlink():
            for q in sorted(p.iterdir()):
                out += _checkpoint_strays(q) if step_of(q) is not None else [q]
        elif not _OWN_RE.match(p.name) and not others(p):
            out.append(p)
    return out


# --- finding, verifying, loading -------------------------------------------------


def list_checkpoints(run_dir) -> list[Path]:
    """Committed `step_*` dirs (COMMIT present) in `run_dir`, ascending by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if step_of(p) is not None]
    found = [p for p in found if not p.is_symlink() and (p / COMMIT).is_file()]
    return sorted(found, key=step_of)


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
    candidates = [p for p in run_dir.iterdir() if step_of(p) is not None]
    failures = []
    for p in sorted(candidates, key=step_of, reverse=True):
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
