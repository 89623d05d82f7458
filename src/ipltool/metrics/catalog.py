"""The names of the metrics `ipl eval` knows, in report order (no torch: command help reads them)."""

from __future__ import annotations

METRICS = ("is", "fid", "kid", "sifid", "scs", "id", "clip", "diversity")
