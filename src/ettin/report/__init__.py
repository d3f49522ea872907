"""ettin.report: HTML/Markdown/CSV report with plots (``write_report``)."""


def write_report(runs, out):
    from ettin.report.report import write_report as _write

    return _write(runs, out)
