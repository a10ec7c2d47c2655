"""Image datasets: a MedMNIST-layout .npz, or a .zip of class folders of PNG, JPEG or
DICOM files. Both end up as ``work_dir/data.npz`` in one normalised layout, so training
only ever reads npz:

    {split}_images  uint8 (N, H, W, C), C in (1, 3)      split in train, val, test
    {split}_labels  int64 (N, 1) class ids (multiclass)  or uint8 (N, K) 0/1 (multilabel)

Arrays are streamed in chunks (never a whole split in memory): npz members are read
piecewise, decoded zip images go to a disk-backed memmap, the output is written member
by member.

DICOM files are de-identified (app/ingest/deid.py) in memory as they leave the zip, before
anything of them is written; archive names never reach the disk (files are extracted
under their position) nor the report (messages say "file 17").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Self

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps

from app.artifacts import open_write

from .archive import MemberRejected, Rewrite, check_zip, extract_zip, open_zip
from .common import IngestLimits, IngestReport, InvalidRows, check_option_names, opt_list
from .deid import METHOD, Deidentifier, NotDeidentifiable, identifiers, is_dicom
from .errors import IngestError, too_large

if TYPE_CHECKING:  # pydicom is imported lazily, only when a zip holds DICOM files
    from pydicom import Dataset

OPTIONS = ("image_size", "classes")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_PIL_EXT = {".png", ".jpg", ".jpeg"}
_PIL_FORMATS = ["PNG", "JPEG", "MPO"]  # MPO: the multi-picture JPEG many cameras write
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_CHUNK_BYTES = 64 << 20
_MIN_SIDE, _MAX_SIDE = 8, 4096
_MAX_LABELS = 10_000
_MAX_DICOM_BYTES = 1 << 30  # one DICOM file is de-identified in memory
DICOM_INDEX = "dicom_index.jsonl"  # per DICOM row: split, row, file, de-identified ids


def ingest_images(
    path: str | IO[bytes],
    original_filename: str,
    work_dir: str,
    limits: IngestLimits | Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    deid_seed: str | None = None,
    scratch_dir: str | None = None,
) -> IngestReport:
    """``path``: a file name or a seekable binary file. ``deid_seed``: the tenant's
    de-identification seed (deid.tenant_seed); None de-identifies with a random one.
    ``scratch_dir``: where a zip's members are extracted and its pixels decoded while it is
    read (a private temporary directory is made in it and removed); default ``work_dir``."""
    limits = IngestLimits.of(limits)
    options = dict(options or {})
    check_option_names(options, OPTIONS, "images")
    size = _opt_image_size(options.get("image_size"))
    class_names = opt_list(options, "classes")
    os.makedirs(work_dir, exist_ok=True)
    with open_zip(path, "npz or zip file") as zf:
        members = zf.namelist()
    if any(m.endswith(".npy") for m in members) and all(m.endswith((".npy", "/")) for m in members):
        return _ingest_npz(path, work_dir, limits, size, class_names)
    if original_filename.lower().endswith(".npz"):
        raise IngestError(
            "invalid_npz",
            "the .npz file contains non-array entries; expected only "
            "train_images, train_labels and optional val_*/test_* arrays",
        )
    return _ingest_folders(path, work_dir, limits, size, class_names, Deidentifier(deid_seed), scratch_dir or work_dir)


def _opt_image_size(value: Any) -> tuple[int, int] | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            parts = [int(p) for p in value.replace(" ", "").split(",")]
        elif isinstance(value, (list, tuple)):
            parts = [int(p) for p in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            raise ValueError
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError
    except (TypeError, ValueError):
        raise IngestError(
            "invalid_option", f"option image_size must be an integer or [height, width], got {value!r}"
        ) from None
    if not all(_MIN_SIDE <= p <= _MAX_SIDE for p in parts):
        raise IngestError("invalid_option", f"option image_size must be between {_MIN_SIDE} and {_MAX_SIDE} pixels")
    return parts[0], parts[1]


# -- npz input -------------------------------------------------------------------


@dataclass
class _NpyHeader:
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype


def _read_npy_header(fp: IO[bytes], key: str) -> _NpyHeader:
    try:
        version = np.lib.format.read_magic(fp)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = reader(fp)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise IngestError("invalid_npz", f"array {key} in the npz is not a valid .npy array: {exc}") from None
    return _NpyHeader(tuple(shape), bool(fortran), dtype)


def _ingest_npz(
    path: str | IO[bytes],
    work_dir: str,
    limits: IngestLimits,
    size: tuple[int, int] | None,
    class_names: list[str] | None,
) -> IngestReport:
    with open_zip(path, "npz file") as zf:
        # No ratio check: sorted labels compress extremely well, and reads below are
        # bounded by the declared sizes, which check_zip caps.
        check_zip(zf, limits, check_ratio=False)
        try:
            if not isinstance(path, str):
                path.seek(0)  # np.load reads a file object from where it stands
            npz = np.load(path, allow_pickle=False)
        except Exception as exc:  # np.load raises a variety of types on garbage
            raise IngestError("invalid_npz", f"the file is not a readable .npz: {exc}") from None
        with npz:
            keys = set(npz.files)
            warn = []
            missing = [k for k in ("train_images", "train_labels") if k not in keys]
            if missing:
                raise IngestError(
                    "invalid_npz",
                    f"the npz has no {' or '.join(missing)}; arrays are: {', '.join(sorted(keys)) or '(none)'}",
                    {"arrays": sorted(keys)},
                )
            splits = []
            for split in SPLITS:
                pair = (f"{split}_images", f"{split}_labels")
                present = [k for k in pair if k in keys]
                if len(present) == 1:
                    other = pair[1] if present[0] == pair[0] else pair[0]
                    raise IngestError("invalid_npz", f"the npz has {present[0]} but no {other}")
                if present:
                    splits.append(split)
            extra = sorted(keys - {f"{s}_{p}" for s in SPLITS for p in ("images", "labels")})
            if extra:
                warn.append(f"ignored arrays in the npz: {', '.join(extra)}")

            headers = {s: _image_header(zf, f"{s}_images") for s in splits}
            hwc = {s: _hwc(h) for s, h in headers.items()}
            if len(set(hwc.values())) > 1:
                raise IngestError(
                    "invalid_npz",
                    "image shapes differ between splits: " + ", ".join(f"{s} {list(v)}" for s, v in hwc.items()),
                )
            h, w, c = hwc["train"]
            labels = {s: _load_labels(npz, zf, s, headers[s].shape[0]) for s in splits}

    kinds = {s: k for s, (_, k) in labels.items()}
    if len(set(kinds.values())) > 1:
        raise IngestError("invalid_npz", f"label kinds differ between splits: {kinds}")
    label_kind = kinds["train"]
    arrays = {s: a for s, (a, _) in labels.items()}
    classes = _npz_classes(arrays, label_kind, class_names)
    out_h, out_w = size or (h, w)
    total = sum(headers[s].shape[0] for s in splits) * out_h * out_w * c
    _check_output_size(total, limits)

    out_path = os.path.join(work_dir, "data.npz")
    with _NpzWriter(out_path) as out, open_zip(path, "npz file") as zf:
        for s in splits:
            n = headers[s].shape[0]
            chunks = _npy_image_chunks(zf, f"{s}_images", headers[s])
            if (out_h, out_w) != (h, w):
                chunks = (_resize_batch(ch, out_h, out_w) for ch in chunks)
            out.write(f"{s}_images", (n, out_h, out_w, c), np.uint8, chunks)
            out.write_array(f"{s}_labels", arrays[s])
    rows = {s: int(headers[s].shape[0]) for s in splits}
    return _report(
        rows,
        InvalidRows(limits.max_invalid_samples),
        (out_h, out_w, c),
        classes,
        label_kind,
        arrays,
        out_path,
        warn,
        {"source_format": "npz", "source_shape": [h, w, c]},
    )


def _image_header(zf: zipfile.ZipFile, key: str) -> _NpyHeader:
    with zf.open(key + ".npy") as fp:
        hdr = _read_npy_header(fp, key)
    if hdr.dtype.hasobject:
        raise IngestError(
            "pickled_data",
            f"{key} holds Python objects (pickled data), which are never loaded; store images as a uint8 array",
        )
    if hdr.dtype != np.uint8:
        raise IngestError(
            "invalid_npz",
            f"{key} has dtype {hdr.dtype}; expected uint8 (0-255). "
            "Convert with np.clip(x * 255, 0, 255).astype(np.uint8) if values are 0-1.",
        )
    shape = hdr.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise IngestError("invalid_npz", f"{key} has shape {shape}; expected (N, H, W) or (N, H, W, C) with C 1 or 3")
    if shape[0] == 0:
        raise IngestError("invalid_npz", f"{key} has no images")
    if not all(_MIN_SIDE // 2 <= s <= _MAX_SIDE for s in shape[1:3]):
        raise IngestError(
            "invalid_npz",
            f"{key} has images of {shape[1]}x{shape[2]} pixels; each side "
            f"must be between {_MIN_SIDE // 2} and {_MAX_SIDE}",
        )
    if hdr.fortran:
        raise IngestError("invalid_npz", f"{key} is stored in Fortran order; save it with np.ascontiguousarray(...)")
    return hdr


def _hwc(hdr: _NpyHeader) -> tuple[int, int, int]:
    s = hdr.shape
    return s[1], s[2], (s[3] if len(s) == 4 else 1)


def _load_labels(npz: np.lib.npyio.NpzFile, zf: zipfile.ZipFile, split: str, n: int) -> tuple[np.ndarray, str]:
    key = f"{split}_labels"
    with zf.open(key + ".npy") as fp:
        shape = _read_npy_header(fp, key).shape
    # check the shape before loading, so a huge labels array is never read into memory
    if len(shape) not in (1, 2) or shape[0] != n or (len(shape) == 2 and not 1 <= shape[1] <= _MAX_LABELS):
        raise IngestError(
            "invalid_npz",
            f"{key} has shape {shape}; expected ({n},), ({n}, 1) or "
            f"({n}, K) with K <= {_MAX_LABELS} to match {n} {split} images",
        )
    try:
        y = npz[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise IngestError(
                "pickled_data",
                f"{key} holds Python objects (pickled data), which are never loaded; store labels as an integer array",
            ) from None
        raise IngestError("invalid_npz", f"{key} is not a valid array: {exc}") from None
    except Exception as exc:
        raise IngestError("invalid_npz", f"{key} could not be read: {exc}") from None
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise IngestError(
                "invalid_npz", f"{key} has non-integer values; labels must be class ids or 0/1 indicators"
            )
    elif y.dtype.kind not in "iub":
        raise IngestError("invalid_npz", f"{key} has dtype {y.dtype}; expected integers")
    if y.size and y.min() < 0:
        raise IngestError("invalid_npz", f"{key} has negative values; class ids start at 0")
    if y.ndim == 1 or y.shape[1] == 1:
        return y.reshape(-1, 1).astype(np.int64), "multiclass"
    if y.size and y.max() > 1:
        raise IngestError("invalid_npz", f"{key} has shape {y.shape} (multi-label) but values other than 0 and 1")
    return y.astype(np.uint8), "multilabel"


def _npz_classes(arrays: dict[str, np.ndarray], label_kind: str, names: list[str] | None) -> list[str] | int:
    if label_kind == "multilabel":
        k = {a.shape[1] for a in arrays.values()}
        if len(k) > 1:
            raise IngestError("invalid_npz", f"multi-label widths differ between splits: {sorted(k)}")
        k = k.pop()
        if names is not None and len(names) != k:
            raise IngestError(
                "invalid_option", f"option classes names {len(names)} classes but the labels have {k} columns"
            )
        return names or k
    n = int(max(int(a.max()) for a in arrays.values())) + 1
    if names is not None:
        if len(names) < n:
            raise IngestError(
                "invalid_option", f"option classes names {len(names)} classes but labels go up to {n - 1}"
            )
        return names
    if n < 2:
        raise IngestError("invalid_npz", "all labels are 0; a classifier needs at least two classes")
    return n


def _npy_image_chunks(zf: zipfile.ZipFile, key: str, hdr: _NpyHeader) -> Iterator[np.ndarray]:
    row_shape = hdr.shape[1:]
    row_bytes = math.prod(row_shape)
    per = max(1, _CHUNK_BYTES // row_bytes)
    try:
        with zf.open(key + ".npy") as fp:
            _read_npy_header(fp, key)
            left = hdr.shape[0]
            while left:
                n = min(per, left)
                buf = fp.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise IngestError("invalid_npz", f"{key} is truncated: the header promises {hdr.shape[0]} images")
                left -= n
                yield np.frombuffer(buf, np.uint8).reshape((n, *row_shape[:2], -1))
            fp.read(1)  # reach end of member so zipfile verifies the CRC
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise IngestError("invalid_npz", f"{key} is corrupt: {exc}") from None


# -- zip of class folders ----------------------------------------------------------


@dataclass
class _Item:
    split: str
    cls: str
    name: str  # inside the archive: read for its folders and extension, never shown
    label: str  # what messages call it: "file <position in the archive>"
    path: str
    fmt: str = ""  # PNG, JPEG or DICOM
    color: bool = False
    rejected: str | None = None  # why de-identification refused it


@dataclass
class _Source:
    name: str
    label: str
    path: str
    dicom: bool  # de-identified on extraction
    rejected: str | None


def _dicom_rewrite(deid: Deidentifier, ids: dict[str, dict[str, str]]) -> Rewrite:
    """The extraction hook that de-identifies every DICOM member (by its 'DICM' marker or a
    .dcm/.dicom name) in memory; ids collects each one's de-identified identifiers."""

    def rewrite(name: str, head: bytes, size: int) -> Callable[[bytes], bytes] | None:
        if not is_dicom(head, name):
            return None
        if size > _MAX_DICOM_BYTES:
            raise MemberRejected(f"DICOM file is {size} bytes; the limit is {_MAX_DICOM_BYTES}")

        def deidentify(raw: bytes) -> bytes:
            try:
                out, ds = deid.file(raw)
            except NotDeidentifiable as exc:
                raise MemberRejected(str(exc)) from None
            ids[name] = identifiers(ds)
            return out

        return deidentify

    return rewrite


def _is_junk(name: str) -> bool:
    return any(p in _JUNK_NAMES or p.startswith(".") for p in name.split("/"))


def _ingest_folders(
    path: str | IO[bytes],
    work_dir: str,
    limits: IngestLimits,
    size: tuple[int, int] | None,
    class_names: list[str] | None,
    deid: Deidentifier,
    scratch_dir: str,
) -> IngestReport:
    invalid = InvalidRows(limits.max_invalid_samples)
    scratch = tempfile.mkdtemp(prefix="_extract-", dir=scratch_dir)
    extract_dir = os.path.join(scratch, "members")
    memmap_path = os.path.join(scratch, "_images.u8")
    dicom_ids: dict[str, dict[str, str]] = {}
    try:
        files = extract_zip(
            path, extract_dir, limits, skip=_is_junk, flat=True, rewrite=_dicom_rewrite(deid, dicom_ids)
        )
        items = _layout(
            [_Source(f.name, f"file {f.position}", f.path, f.rewritten, f.rejected) for f in files], invalid
        )
        if not items:
            raise IngestError(
                "no_images",
                "the zip has no files inside class folders; expected <class>/<image> or train|val|test/<class>/<image>",
                {"invalid_samples": invalid.samples},
            )
        classes = _folder_classes(items, class_names)

        probed: list[_Item] = []
        sizes: Counter[tuple[int, int]] = Counter()
        for it in items:
            try:
                h, w = _probe(it, limits)
            except _Invalid as bad:
                invalid.add(str(bad), file=it.label)
                continue
            sizes[(h, w)] += 1
            probed.append(it)
        if not any(it.split == "train" for it in probed):
            raise IngestError(
                "no_valid_images",
                "no readable training images in the zip",
                {"invalid_rows": invalid.count, "invalid_samples": invalid.samples},
            )
        out_h, out_w = size or sizes.most_common(1)[0][0]
        c = 3 if any(it.color for it in probed) else 1
        _check_output_size(len(probed) * out_h * out_w * c, limits)

        index = {name: i for i, name in enumerate(classes)}
        mm = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.uint8, shape=(len(probed), out_h, out_w, c))
        labels = np.empty((len(probed), 1), np.int64)
        bounds: dict[str, list[int]] = {}
        formats: Counter[str] = Counter()
        rows_of: list[_Item] = []
        pos = 0
        for it in probed:
            try:
                img = _decode(it, out_h, out_w, c)
            except _Invalid as bad:
                invalid.add(str(bad), file=it.label)
                continue
            rows_of.append(it)
            mm[pos] = img
            labels[pos, 0] = index[it.cls]
            bounds.setdefault(it.split, [pos, pos])[1] = pos + 1
            formats[it.fmt] += 1
            pos += 1
        if "train" not in bounds:
            raise IngestError(
                "no_valid_images",
                "no readable training images in the zip",
                {"invalid_rows": invalid.count, "invalid_samples": invalid.samples},
            )
        mm.flush()
        out_path = os.path.join(work_dir, "data.npz")
        arrays = {}
        with _NpzWriter(out_path) as out:
            for s in SPLITS:
                if s in bounds:
                    a, b = bounds[s]
                    out.write(
                        f"{s}_images",
                        (b - a, out_h, out_w, c),
                        np.uint8,
                        (mm[i : min(i + 256, b)] for i in range(a, b, 256)),
                    )
                    arrays[s] = labels[a:b]
                    out.write_array(f"{s}_labels", arrays[s])
        del mm
        rows = {s: b - a for s, (a, b) in bounds.items()}
        warn = [
            f"class {name!r} has no training images"
            for name, n in zip(classes, np.bincount(arrays["train"][:, 0], minlength=len(classes)), strict=False)
            if n == 0
        ]
        resized = sum(n for hw, n in sizes.items() if hw != (out_h, out_w))
        deid_stats = _write_dicom_index(work_dir, rows_of, bounds, dicom_ids) if dicom_ids else {}
        return _report(
            rows,
            invalid,
            (out_h, out_w, c),
            classes,
            "multiclass",
            arrays,
            out_path,
            warn,
            {
                "source_format": "zip",
                "file_formats": dict(formats),
                "resized": resized,
                "source_sizes": [{"height": h, "width": w, "count": n} for (h, w), n in sizes.most_common(5)],
                **deid_stats,
            },
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_dicom_index(
    work_dir: str, rows_of: list[_Item], bounds: dict[str, list[int]], ids: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """One JSON line per DICOM row of data.npz: split, row, file, de-identified ids (to keep
    one patient's images in one split, or link rows across uploads of the tenant)."""
    starts = sorted((a, s) for s, (a, _) in bounds.items())
    lines = []
    for pos, it in enumerate(rows_of):
        if it.name in ids:
            start, split = max((a, s) for a, s in starts if a <= pos)
            lines.append(json.dumps({"split": split, "row": pos - start, "file": it.label, **ids[it.name]}))
    with open_write(os.path.join(work_dir, DICOM_INDEX)) as f:
        f.write("".join(line + "\n" for line in lines).encode())
    return {"deidentification": {**METHOD, "dicom_files": len(lines), "index": DICOM_INDEX}}


def _layout(files: list[_Source], invalid: InvalidRows) -> list[_Item]:
    parts = [f.name.split("/") for f in files]
    # A zip of one wrapping folder ("mydata/cls_a/x.png") is common; look inside it.
    depth = 0
    while (
        parts
        and all(len(p) > depth + 1 for p in parts)
        and any(len(p) > depth + 2 for p in parts)
        and len({p[depth] for p in parts}) == 1
        and parts[0][depth].lower() not in _SPLIT_ALIASES
    ):
        depth += 1
    tops = {p[depth] for p in parts if len(p) > depth + 1}
    split_tops = {t for t in tops if t.lower() in _SPLIT_ALIASES}
    if split_tops and split_tops != tops:
        raise IngestError(
            "invalid_layout",
            "the zip mixes split folders ("
            f"{', '.join(sorted(split_tops))}) with other folders ({', '.join(sorted(tops - split_tops))}); "
            "use either <class>/<image> or train|val|test/<class>/<image>",
        )
    need = depth + (3 if split_tops else 2)
    items = []
    for f, p in zip(files, parts, strict=False):
        if len(p) < need:
            invalid.add("file is not inside a class folder", file=f.label)
            continue
        split = _SPLIT_ALIASES[p[depth].lower()] if split_tops else "train"
        cls = p[depth + 1] if split_tops else p[depth]
        items.append(_Item(split, cls, f.name, f.label, f.path, "DICOM" if f.dicom else "", rejected=f.rejected))
    if split_tops and items and not any(it.split == "train" for it in items):
        raise IngestError("invalid_layout", "the zip has split folders but no train/ folder")
    items.sort(key=lambda it: (SPLITS.index(it.split), it.cls, it.name))
    return items


def _folder_classes(items: list[_Item], names: list[str] | None) -> list[str]:
    found = sorted({it.cls for it in items})
    if names is not None:
        unknown = [c for c in found if c not in names]
        if unknown:
            raise IngestError(
                "invalid_option",
                f"option classes does not list the folder(s) {', '.join(unknown)}; folders are: {', '.join(found)}",
            )
        return names
    if len(found) < 2:
        raise IngestError(
            "invalid_layout",
            f"found one class folder ({found[0]!r}); a classifier needs at least two, e.g. normal/ and abnormal/",
        )
    return found


class _Invalid(Exception):
    """One unreadable image: reported as an invalid row, never fatal."""


def _msg(exc: Exception, it: _Item) -> str:
    return str(exc).replace(it.path, it.label)  # never show server paths


def _sniff_format(it: _Item) -> str:
    if it.rejected is not None:
        raise _Invalid(it.rejected)
    if it.fmt == "DICOM":  # de-identified on extraction
        return it.fmt
    ext = os.path.splitext(it.name)[1].lower()
    if ext in _PIL_EXT:
        return "JPEG" if ext != ".png" else "PNG"
    raise _Invalid(f"unsupported file type: '{ext or '(no extension)'}' is not PNG, JPEG or DICOM")


def _probe(it: _Item, limits: IngestLimits) -> tuple[int, int]:
    """Read the header (and for PNG/JPEG verify the file) without decoding pixels."""
    it.fmt = _sniff_format(it)
    if it.fmt == "DICOM":
        ds = _read_dicom(it, stop_before_pixels=True)
        h, w = ds.get("Rows"), ds.get("Columns")
        if not h or not w:
            raise _Invalid("DICOM file has no image (no Rows/Columns)")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise _Invalid(f"multi-frame DICOM ({frames} frames) is not supported; export one image per file")
        it.color = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    else:
        try:
            with Image.open(it.path, formats=_PIL_FORMATS) as im:
                w, h = im.size
                it.fmt = "JPEG" if im.format == "MPO" else (im.format or it.fmt)  # trust content over extension
                it.color = im.mode not in _GREY_MODES
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation swaps axes
                    h, w = w, h
            if w * h <= limits.max_image_pixels:
                with Image.open(it.path, formats=_PIL_FORMATS) as im:
                    im.verify()  # must come straight after open
        except Exception as exc:  # Pillow raises many types for hostile files
            raise _Invalid(f"not a readable {it.fmt} image: {_msg(exc, it)}") from None
    if h * w > limits.max_image_pixels:
        raise _Invalid(f"image is {w}x{h} pixels; the limit is {limits.max_image_pixels} pixels")
    return int(h), int(w)


def _read_dicom(it: _Item, stop_before_pixels: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            return pydicom.dcmread(it.path, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            # Written by deid without a preamble because the original had none.
            return pydicom.dcmread(it.path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:
        raise _Invalid(f"not a readable DICOM file: {_msg(exc, it)}") from None


def _decode(it: _Item, h: int, w: int, c: int) -> np.ndarray:
    arr = _decode_dicom(it) if it.fmt == "DICOM" else _decode_pil(it)
    img = Image.fromarray(arr)
    if c == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, np.uint8)
    return out.reshape(h, w, c)


def _decode_pil(it: _Item) -> np.ndarray:
    try:
        with Image.open(it.path, formats=_PIL_FORMATS) as src:
            im = ImageOps.exif_transpose(src)
            im.load()
    except Exception as exc:
        raise _Invalid(f"not a readable {it.fmt} image: {_msg(exc, it)}") from None
    if im.mode in _GREY_MODES[3:]:
        # 16-bit/float greyscale: Pillow's convert("L") clips, so scale min-max instead.
        return _minmax_u8(np.asarray(im, np.float32))
    if im.mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def _decode_dicom(it: _Item) -> np.ndarray:
    ds = _read_dicom(it, stop_before_pixels=False)
    try:
        px = ds.pixel_array
    except Exception as exc:  # missing decoder plugins, truncated pixel data, ...
        raise _Invalid(f"DICOM pixel data cannot be decoded: {_msg(exc, it)}") from None
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        px = _apply_palette(px, ds)
    elif int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        return _dicom_grey(px, ds)
    if px.ndim != 3 or px.shape[-1] != 3:
        raise _Invalid(f"DICOM colour image has unexpected shape {px.shape}")
    return px if px.dtype == np.uint8 else _minmax_u8(px.astype(np.float32))


def _dicom_grey(px: np.ndarray, ds: Dataset) -> np.ndarray:
    if px.ndim != 2:
        raise _Invalid(f"DICOM image has unexpected shape {px.shape}")
    a: np.ndarray = px.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    a = a * float(slope if slope not in (None, "") else 1) + float(intercept if intercept not in (None, "") else 0)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2 linear window
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    else:
        a = _minmax_u8(a).astype(np.float32) / 255
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        a = 1 - a  # MONOCHROME1: the lowest value is displayed white
    return np.rint(a * 255).astype(np.uint8)


def _apply_palette(px: np.ndarray, ds: Dataset) -> np.ndarray:
    try:
        from pydicom.pixels import apply_color_lut  # pydicom >= 3
    except ImportError:
        from pydicom.pixel_data_handlers import util as pydicom2_util

        apply_color_lut = pydicom2_util.apply_color_lut
    try:
        rgb = apply_color_lut(px, ds)
    except Exception as exc:
        raise _Invalid(f"DICOM palette cannot be applied: {exc}") from None
    return (rgb >> 8).astype(np.uint8) if rgb.dtype == np.uint16 else rgb.astype(np.uint8)


def _first(value: Any) -> float | None:
    """The first number of a DICOM value (a number, a string or a multi-value), or None."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (int, float, str)):
            value = next(iter(value))
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _minmax_u8(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint(np.clip(np.nan_to_num((a - lo) / (hi - lo)), 0, 1) * 255).astype(np.uint8)


def _resize_batch(batch: np.ndarray, h: int, w: int) -> np.ndarray:
    out = np.empty((len(batch), h, w, batch.shape[3]), np.uint8)
    for i, img in enumerate(batch):
        im = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out[i] = np.asarray(im.resize((w, h), Image.Resampling.BICUBIC)).reshape(h, w, -1)
    return out


# -- output ------------------------------------------------------------------------


def _check_output_size(nbytes: int, limits: IngestLimits) -> None:
    if nbytes > limits.max_output_bytes:
        raise too_large(
            "images_too_large",
            f"the normalised images would take {nbytes} bytes; the limit "
            f"is {limits.max_output_bytes}. Pass a smaller image_size to downscale.",
            {"bytes": nbytes, "max_output_bytes": limits.max_output_bytes},
        )


class _NpzWriter:
    """Writes an uncompressed .npz one array at a time, from chunks, then renames it into place."""

    def __init__(self, path: str) -> None:
        self.sink = open_write(path)  # encrypted when the artifact root is
        self.zf = zipfile.ZipFile(self.sink, "w", zipfile.ZIP_STORED, allowZip64=True)

    def write(self, key: str, shape: tuple[int, ...], dtype: npt.DTypeLike, chunks: Iterable[np.ndarray]) -> None:
        dtype = np.dtype(dtype)
        n = 0
        with self.zf.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            )
            for chunk in chunks:
                f.write(np.ascontiguousarray(chunk, dtype).tobytes())
                n += len(chunk)
        if n != shape[0]:
            raise RuntimeError(f"{key}: wrote {n} rows, expected {shape[0]}")

    def write_array(self, key: str, array: np.ndarray) -> None:
        self.write(key, array.shape, array.dtype, [array])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.zf.close()
        if exc_type is None:
            self.sink.close()
        else:
            self.sink.discard()


def _report(
    rows: dict[str, int],
    invalid: InvalidRows,
    shape: tuple[int, int, int],
    classes: list[str] | int,
    label_kind: str,
    labels: dict[str, np.ndarray],
    out_path: str,
    warn: list[str],
    extra_stats: dict[str, Any],
) -> IngestReport:
    names = classes if isinstance(classes, list) else [str(i) for i in range(classes)]
    counts: dict[str, dict[str, int]] = {}
    for s, y in labels.items():
        per = y.sum(axis=0) if label_kind == "multilabel" else np.bincount(y[:, 0], minlength=len(names))
        counts[s] = {name: int(v) for name, v in zip(names, per, strict=False)}
    return IngestReport(
        rows=sum(rows.values()),
        invalid_rows=invalid.count,
        invalid_samples=invalid.samples,
        schema={
            "kind": "images",
            "shape": list(shape),
            "classes": classes,
            "label_kind": label_kind,
            "splits": rows,
            "layout": "NHWC",
        },
        stats={
            "label_counts": counts,
            "invalid_reasons": dict(invalid.reasons),
            **extra_stats,
            "inferred": _inferred(rows, shape, names, label_kind),
        },
        data_path=out_path,
        warnings=warn,
    )


def _inferred(rows: dict[str, int], shape: tuple[int, int, int], names: list[str], label_kind: str) -> dict[str, Any]:
    """What was read from the file, for the upload response."""
    h, w, c = shape
    splits = ", ".join(f"{s} {n}" for s, n in rows.items())
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return {
        "shape": [h, w, c],
        "label_kind": label_kind,
        "classes": len(names),
        "splits": dict(rows),
        "summary": f"{h}x{w} images with {c} channel{'' if c == 1 else 's'}; {label_kind} labels, "
        f"{len(names)} classes ({shown}); rows per split: {splits}",
    }
