"""Error and warning types of `mmoe.data` (defined in `mmoe.errors`; no heavy imports)."""

from __future__ import annotations

from ..errors import DataError, DataWarning

__all__ = ["DataError", "DataWarning"]
