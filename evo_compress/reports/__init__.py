"""Reports of a run: one self-contained HTML page (plotly.js inline, opens offline) and the same
main plots as PNG files (matplotlib, for terminals and papers).

- ``data``: what a report shows, read from the run store in one snapshot (``collect``);
- ``layout``: where the lineage figure places each node;
- ``formatting``: values, shares and provenance as text;
- ``figures``: the page's plotly figure specs;
- ``html``: the page, rendered from ``templates/report.html.j2`` with ``templates/report.js``;
- ``png``: the PNG figures.
"""

from evo_compress.reports.html import write_report
from evo_compress.reports.png import PNG_NAMES, write_pngs

__all__ = ["PNG_NAMES", "write_pngs", "write_report"]
