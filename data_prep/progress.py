"""Progress bars of the data_prep readers: shown on an interactive stderr only."""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(enabled: bool, **options: Any) -> tqdm | None:
    """A tqdm bar on stderr with ``options``, or None when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    return tqdm(file=sys.stderr, leave=False, **options)
