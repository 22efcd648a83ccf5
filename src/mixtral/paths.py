"""Where mixtral keeps what it makes once per machine: the compiled CPU kernels and the probe of torch's kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`MIXTRAL_CACHE_DIR`, else `$XDG_CACHE_HOME/mixtral`, else `~/.cache/mixtral` (not created here)."""
    if os.environ.get("MIXTRAL_CACHE_DIR"):
        return Path(os.environ["MIXTRAL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixtral"
