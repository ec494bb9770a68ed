"""What tracing needs to know about libraries the model comes from, read only when the
library is already imported (qprep depends on none of them).

* Hugging Face transformers: its KV caches (``transformers.cache_utils.Cache`` and
  subclasses) are created inside ``forward`` and updated in place; tracing records their
  construction and method calls, so the prepared model makes and updates its own at run time.
"""

from __future__ import annotations

import sys

__all__ = ["runtime_classes"]


def runtime_classes() -> tuple[type, ...]:
    """Classes whose construction in traced code is recorded as a call (made at run time)."""
    found = []
    cache_utils = sys.modules.get("transformers.cache_utils")
    if cache_utils is not None and isinstance(getattr(cache_utils, "Cache", None), type):
        found.append(cache_utils.Cache)
    return tuple(found)
