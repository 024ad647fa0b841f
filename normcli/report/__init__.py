"""`normcli report`: a study's checkpoints as one page a person can read and hand in.

    from normcli.report import build_report, write_report
    report = build_report(["runs/mnist"], data_dir="data")
    write_report(report, Path("runs/mnist/report.html"), markdown=True)

`build_report` gathers the groups, tables, sentences and figures (normcli.report.build);
`render_html` / `render_markdown` fill the templates in normcli/templates; `write_report`
writes the page (and its Markdown twin with the figures beside it) atomically.
"""

from normcli.report.build import Report, build_report
from normcli.report.render import render_html, render_markdown, write_report

__all__ = ["Report", "build_report", "render_html", "render_markdown", "write_report"]
