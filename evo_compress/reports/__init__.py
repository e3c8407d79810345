"""Reports of a run: one self-contained HTML page (plotly.js inline, opens offline) and the same
main plots as PNG files (matplotlib, for terminals and papers)."""

from evo_compress.reports.html import write_report
from evo_compress.reports.png import PNG_NAMES, write_pngs

__all__ = ["PNG_NAMES", "write_pngs", "write_report"]
