"""The user's files: reading an image safely, writing a PNG atomically.

Every image minisd writes goes to a temporary file beside its target and is renamed into
place, so an interrupted run never leaves a half-written PNG, and a file that exists is never
replaced unless asked.
"""
from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .errors import InputError, ResourceError
from .pnginfo import png_info


def read_image(path: Path, argument: str = "--init-image"):
    """An image file decoded in full now, so that a missing, truncated or non-image file fails
    in one line naming `argument` before the model loads rather than halfway through."""
    if path.is_dir():
        raise InputError(f"{argument}: {str(path)!r} is a folder; name an image file")
    if not path.exists():
        raise InputError(f"{argument}: {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns, in several lines, about damage it then reports
            with Image.open(path) as image:
                image.load()
                return image.copy()  # closing the file leaves the copy usable
    except UnidentifiedImageError:
        raise InputError(f"{argument}: {str(path)!r} is not an image file PIL can read "
                         "(PNG, JPEG, WebP, ...)") from None
    # What PIL's decoders raised on thousands of truncated and corrupted files of nine formats.
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise InputError(f"{argument}: cannot read {str(path)!r}: {reason}") from None


def save_png_atomically(image, path: Path, parameters: str, overwrite: bool) -> None:
    """Write to a temporary file beside `path`, then move it into place, so an interrupted
    run never leaves a half-written PNG (and, without overwrite, never replaces a file that
    appeared meanwhile: os.link fails if the target exists)."""
    info = png_info(parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give what open() would
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise InputError(f"--output: {str(path)!r} appeared while generating; not overwritten") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        raise ResourceError(f"--output: no space left to write {str(path)!r} ({e.strerror}); "
                            "free some space or choose another folder") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
