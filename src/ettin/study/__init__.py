"""ettin.study: the paper's encoder-vs-decoder comparison end to end, as resumable units.

:mod:`~ettin.study.plan` (units and fingerprints), :mod:`~ettin.study.run` (executor, status),
:mod:`~ettin.study.stats` (bootstrap intervals), :mod:`~ettin.study.report` (study.json,
report.html/.md/.csv), :mod:`~ettin.study.commands` (``ettin study``).
"""
