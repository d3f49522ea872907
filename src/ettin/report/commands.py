"""``ettin report RUN... --out report.html``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: list[Path] = typer.Argument(..., help="Run directories (single, pair, or a folder of runs such as a demo output)."),
        out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write; .md, .csv and _files/ go beside it."),
        force: bool = typer.Option(False, "--force", help="Replace outputs at --out that 'ettin report' did not write."),
    ):
        """One self-contained HTML report (plus Markdown and CSV) comparing the runs."""
        from ettin.report.report import report_paths, write_report

        write_report(runs, out, force=force)
        p = report_paths(out)
        typer.echo(f"wrote {p['html']} (+ {p['md'].name}, {p['csv'].name}, {p['files'].name}/)")
