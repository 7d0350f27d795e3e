"""Every reach into a library's private parts, one module per library, behind the version it was written for.

A private attribute, a class swap or an assumed memory layout can change in any release without a
word. Each module here names the versions its code was written and tested against
(``WRITTEN_FOR``); on any other installed version it takes the library's stock path instead (slower,
or with less memory saved, never different results) and says so once in a warning. The pins in
requirements.txt keep a normal install on the fast path.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)


def installed_version(library: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(library))
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def written_for(library: str, versions: str, what: str) -> bool:
    """Whether the installed ``library`` is one that ``what`` (the private part used) was written for;
    warns once per library and use when it is not."""
    installed = installed_version(library)
    if installed is not None and SpecifierSet(versions).contains(installed, prereleases=True):
        return True
    logger.warning(
        "%s %s: replytune's use of %s was written for %s %s; using the library's stock path instead",
        library,
        installed or "(not installed)",
        what,
        library,
        versions,
    )
    return False
