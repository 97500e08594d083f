"""File I/O for the Pascal layout: images, class-id label PNGs, list files, atomic folder writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError", "read_image", "read_mask", "read_label", "read_list", "write_list", "list_path", "atomic_dir",
    "write_label", "image_size", "incomplete_image", "file_head_and_tail", "exif_orientation", "apply_orientation",
    "MAX_IMAGE_PIXELS", "decoder_complaints", "wxh",
]


class DataError(ValueError):
    """A dataset file is missing, unreadable or not in the expected format."""


#: Largest image read (pixels): a phone's 50-108 MP photo passes; a larger file (a 192 MP panorama,
#: a decompression bomb) is refused before it is decoded.
MAX_IMAGE_PIXELS = 120_000_000
_ORIENTATION_TAG = 0x0112
#: What an empty file is called in every message about it.
EMPTY_FILE = "an empty file (0 bytes)"


def wxh(hw) -> str:
    """An (H, W, ...) shape as people read an image's size, width first: a 112-wide, 86-high image is "112x86"
    (every image viewer says it so; numpy's (H, W) order would read as a transposed image)."""
    return f"{hw[1]}x{hw[0]}"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3): the one image reader of every command.

    The rule: an image's EXIF orientation is applied (a phone photo comes out as it is shown),
    while masks and labels (:func:`read_label`) are never rotated. 16-bit, greyscale and palette
    images are converted to 8-bit RGB (16-bit values scaled, not clipped). A truncated JPEG or
    PNG is refused (libjpeg would decode it with a grey lower part and only a warning that names
    no file), and so is an image over :data:`MAX_IMAGE_PIXELS`.

    Raises:
        DataError: the file is missing, incomplete, too large, or cannot be decoded.
    """
    path = Path(path)
    data = _checked_bytes(path, "an RGB image file")
    orientation = _header(data, path)[1]
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"{path}: expected an RGB image file, found a file that cannot be decoded as an image")
    return np.ascontiguousarray(apply_orientation(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), orientation))


def _checked_bytes(path: Path, what: str) -> bytes:
    """The whole file, refused in one line when it is missing, unreadable or a truncated JPEG/PNG."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: expected {what}, found no file") from None
    except OSError as e:
        raise DataError(f"{path}: expected {what}, found an unreadable file ({e.strerror})") from None
    if not data:  # OpenCV's decoder asserts on an empty buffer (a traceback that names no file)
        raise DataError(f"{path}: expected {what}, found {EMPTY_FILE}")
    problem = incomplete_image(data)
    if problem:
        raise DataError(f"{path}: expected a complete image, found {problem}")
    return data


#: Mask modes whose values are read as stored (palette indices, greyscale, 1-bit, 16/32-bit integers).
_MASK_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a user's mask (a support mask, a ground truth) as int64 (H, W): the one mask reader of predict/serve.

    Palette and greyscale values as stored (palette indices, 16-bit values unscaled), a colour
    mask as its luminance; never rotated by an EXIF orientation (a mask is the pixels as stored,
    like :func:`read_label`). What is checked is what :func:`read_image` checks: a truncated PNG
    or JPEG (which Pillow would decode without a word when only its end is missing) and an image
    over :data:`MAX_IMAGE_PIXELS` are refused.

    A mask with transparency (RGBA, LA, a palette or greyscale PNG with a transparent entry) is
    read by :func:`_mask_values`: the alpha channel when every pixel has one colour (the object
    drawn in the alpha channel, as drawing tools save it), else the values when the alpha agrees
    with them; a mask whose alpha disagrees is refused (the object the user sees is not the one
    its values hold).

    Raises:
        DataError: the file is missing, empty, incomplete, too large, cannot be decoded, or its alpha
            channel disagrees with its colour.
    """
    import io
    import warnings

    path = Path(path)
    data = _checked_bytes(path, "a mask image file")
    _header(data, path)  # the size limit, before a pixel is decoded
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # under our own limit, checked above
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" says nothing more than this line
        why = "" if isinstance(e, UnidentifiedImageError) else f" ({e})"
        raise DataError(f"{path}: expected a mask image file, found a file that cannot be decoded as an "
                        f"image{why}") from None
    return _mask_values(im, path)


def _mask_values(im: Image.Image, path: Path) -> np.ndarray:
    """A decoded mask's values (int64, (H, W)), its alpha channel read as :func:`read_mask` says."""
    values = np.array(im if im.mode in _MASK_MODES else (im.convert("RGBA") if im.mode == "PA" else im).convert("L")
                      ).astype(np.int64)
    alpha = _alpha(im)
    if alpha is None or alpha.min() == alpha.max():  # no transparency, or the same everywhere: the colour is the mask
        return values
    rgb = np.asarray(im.convert("RGBA").convert("RGB"))
    if (rgb == rgb[:1, :1]).all():  # one colour everywhere: what was drawn is in the alpha channel
        return alpha.astype(np.int64)
    # Both vary: they must say the same, transparent exactly where the value is 0 (the background)
    disagree = int(((alpha == 0) != (values == 0)).sum())
    if disagree:
        raise DataError(f"{path}: expected a mask whose alpha channel agrees with its colour (transparent exactly "
                        f"where the value is 0, the background), found {disagree:,} pixel(s) transparent with "
                        f"another value or opaque with value 0; save it without transparency, or draw the object "
                        f"in the alpha channel over a single colour")
    return values


def _alpha(im: Image.Image) -> Optional[np.ndarray]:
    """The alpha channel of a mask image (uint8, (H, W)), or None when it has no transparency."""
    if "A" in im.getbands():  # RGBA, LA, PA
        return np.asarray(im.convert("RGBA").getchannel("A") if im.mode == "PA" else im.getchannel("A"))
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):  # a tRNS entry: a palette index, a grey, a colour
        return np.asarray(im.convert("RGBA").getchannel("A"))
    return None


def _header(data_or_path, where, *, strict: bool = False) -> tuple[tuple[int, int], int]:
    """((height, width) as stored, EXIF orientation 1..8) from the header; refuses an image too large to read.

    A file Pillow cannot read gives ((0, 0), 1), or with ``strict`` its OSError.
    """
    import io
    import warnings

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says more
            with Image.open(src) as im:
                w, h = im.size
                try:
                    orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
                except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still the image
                    orientation = 1
    except Image.DecompressionBombError:
        raise DataError(f"{where}: expected an image of at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, found "
                        f"one of more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; downscale it "
                        f"first") from None
    except (OSError, SyntaxError, ValueError) as e:
        if strict:
            raise OSError(f"cannot read it as an image ({e})") from None
        return (0, 0), 1  # not a format Pillow reads: the decoder says what it cannot read
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: expected an image of at most {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, found "
                        f"{w}x{h} ({w * h / 1e6:.0f} megapixels); downscale it first")
    return (h, w), orientation if 1 <= orientation <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """An (H, W, ...) array as EXIF orientation ``orientation`` (1..8) says it is shown."""
    if orientation == 5:  # 5..8 swap height and width
        img = img.swapaxes(0, 1)
    elif orientation == 6:
        img = np.rot90(img, -1)
    elif orientation == 7:
        img = np.rot90(img, 2).swapaxes(0, 1)
    elif orientation == 8:
        img = np.rot90(img, 1)
    elif orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    return img


def decoder_complaints(path: str | os.PathLike) -> str:
    """What libjpeg/libpng say while fully decoding ``path`` ("" when nothing): damage inside a complete file.

    A JPEG whose middle was zeroed still decodes (grey or smeared blocks); only the decoder's
    warnings ("Corrupt JPEG data: premature end of data segment"), which it writes to the C
    stderr, tell. They are captured here by pointing file descriptor 2 at a temporary file for
    the decode, so call this where nothing else writes to stderr meanwhile (``prepare --check``).
    """
    import tempfile

    data = Path(path).read_bytes()
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        try:
            os.dup2(err.fileno(), 2)
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        said = " ".join(line.strip() for line in err.read().decode(errors="replace").splitlines() if line.strip())
    if img is None:
        return said or "not a readable image"
    return said


def exif_orientation(path: str | os.PathLike) -> int:
    """An image file's EXIF orientation (1: as stored; 2..8: flipped and/or rotated when shown)."""
    return _header(Path(path), path)[1]


# A complete JPEG ends with its EOI marker (FF D9), a PNG with its IEND chunk. Scan data cannot
# hold FF D9 (an FF there is followed by 00 or a restart marker), so finding EOI near the end is
# enough; the tolerance allows padding some writers append after it.
_JPEG_SOI, _JPEG_EOI, _PNG_SIG, _PNG_IEND = b"\xff\xd8", b"\xff\xd9", b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_TAIL = 1024


def incomplete_image(data: bytes) -> str:
    """Why ``data`` (a file's bytes, or its first bytes + its last ``1024``) is a cut-off JPEG/PNG; "" if not.

    Other formats are not checked here (the decoder reports what it cannot read).
    """
    if data[:2] == _JPEG_SOI:
        return "" if _JPEG_EOI in data[-_TAIL:] else "a truncated JPEG (no end-of-image marker)"
    if data[:8] == _PNG_SIG:
        return "" if _PNG_IEND in data[-_TAIL:] else "a truncated PNG (no IEND chunk)"
    return ""


def file_head_and_tail(path: str | os.PathLike) -> bytes:
    """The first 8 and last 1024 bytes of a file: enough for :func:`incomplete_image`, cheap on any size."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - _TAIL, 0))
        return head + f.read()


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a class-id label PNG (mode L, or P whose palette indices are the ids) as uint8 (H, W).

    Raises:
        DataError: missing, unreadable, or not a single-channel class-id image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DataError(
                    f"{path}: expected a single-channel class-id PNG (mode L or P), found mode {im.mode}")
            arr = np.array(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: expected a label PNG, found no file") from None
    except OSError as e:
        found = EMPTY_FILE if _is_empty(path) else f"an unreadable file ({e})"
        raise DataError(f"{path}: expected a label PNG, found {found}") from None
    return arr.astype(np.uint8, copy=False)


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def write_label(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a uint8 class-id array as a mode-L PNG (what PFENet/BAM read)."""
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(path, optimize=False)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the image :func:`read_image` returns (EXIF orientation applied), from the header.

    Raises:
        OSError: the file is empty or cannot be read as an image; DataError: it is too large.
    """
    if _is_empty(Path(path)):
        raise OSError(EMPTY_FILE)
    (h, w), orientation = _header(Path(path), path, strict=True)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def list_path(root: str | os.PathLike, split: str) -> Path:
    """The list file of a split: ``root/<split>.txt`` (also ``root/lists/<split>.txt``)."""
    root = Path(root)
    for cand in (root / f"{split}.txt", root / "lists" / f"{split}.txt"):
        if cand.is_file():
            return cand
    raise DataError(f"{root}: expected a list file {split}.txt (or lists/{split}.txt), found none")


def read_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Parse a list file: one ``<image path> <label path>`` per line, relative to the dataset root.

    This is the PFENet/BAM format (``JPEGImages/x.jpg SegmentationClassAug/x.png``); blank lines
    are skipped, duplicates are an error.

    Raises:
        DataError: a line has not exactly two fields, or an entry repeats (names file and line).
    """
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(
                f"{path}:{lineno}: expected '<image> <label>' (2 fields), found {len(fields)}: {line!r}")
        if fields[0] in seen:
            raise DataError(f"{path}:{lineno}: image {fields[0]} already listed at line {seen[fields[0]]}")
        seen[fields[0]] = lineno
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{path}: expected at least one '<image> <label>' line, found none")
    return pairs


def write_list(path: str | os.PathLike, pairs: list[tuple[str, str]]) -> None:
    """Write a list file in the PFENet/BAM format."""
    Path(path).write_text("".join(f"{a} {b}\n" for a, b in pairs))


#: In a prepared root: which given list file made each split's list (``svfseg prepare --val-list``).
LIST_SOURCES = "list_sources.json"


def list_record(path: str | os.PathLike, images: int) -> dict:
    """What a root records of a given list file: its name, sha256 and the images it listed."""
    path = Path(path)
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "images": images}


def write_list_sources(root: str | os.PathLike, records: dict[str, dict]) -> None:
    """Record the given list files of a root being prepared (nothing when none was given)."""
    if records:
        (Path(root) / LIST_SOURCES).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def list_source(root: str | os.PathLike, split: str) -> str:
    """``"val_data_list.txt (sha256 0123456789ab, 1,000 images)"``: the file that made ``split``'s list, or ""."""
    path = Path(root) / LIST_SOURCES
    if not path.is_file():
        return ""  # svfseg made the lists
    try:
        rec = json.loads(path.read_text()).get(split)
        return "" if rec is None else f"{rec['file']} (sha256 {str(rec['sha256'])[:12]}, {int(rec['images']):,} images)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: expected {{split: {{file, sha256, images}}}} (written by svfseg prepare), could not "
                        f"read it ({e})") from None


def _new_dir(parent: Path, prefix: str) -> Path:
    """Create a fresh, uniquely named folder in ``parent`` with the umask's mode.

    ``tempfile.mkdtemp`` would make it 0700, and the rename would leave a shared dataset root
    unreadable to the group and others whatever the user's umask says.
    """
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 & ~umask, like any folder the user makes
            return path
        except FileExistsError:
            continue
    raise DataError(f"{parent}: expected to create a temporary folder {prefix}*, found 100 names taken")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success.

    Args:
        target: final folder.
        replace: if ``target`` exists, swap it out (the old folder is removed after the rename).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not replace:
        raise DataError(f"{target}: output folder already exists (choose another --out or remove it)")
    tmp = _new_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
