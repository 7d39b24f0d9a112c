"""The reliability and security summary table: every test records one row (case | what was done
| what was observed) through the ``record`` fixture, printed with its outcome at the end of the
session, so a CI log shows which faults were survived and which hostile inputs were refused."""

from __future__ import annotations

import itertools
import re
import textwrap

import pytest

ROWS_KEY = pytest.StashKey[list]()
OUTCOMES_KEY = pytest.StashKey[dict]()
_PATH = re.compile(r"(?<![:/\w.])(?:/[^/\s:,'\"()]+){2,}/([^/\s:,'\"()]+)")


def short(text: str, limit: int = 110) -> str:
    """The first line of an error, without `error: `, absolute paths cut to their last part."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    first = _PATH.sub(lambda m: m.group(1), (lines[0] if lines else "").removeprefix("error: "))
    return first if len(first) <= limit else first[: limit - 3] + "..."


class Recorder:
    """One test's row of the table: ``record(case, done, observed)``, the last call wins.
    ``record.short(text)`` shortens an error message for a cell."""

    short = staticmethod(short)

    def __init__(self, rows: list[Recorder], nodeid: str):
        self.rows, self.nodeid, self.cells = rows, nodeid, None

    def __call__(self, case: str, done: str, observed: str) -> None:
        if self.cells is None:
            self.rows.append(self)
        self.cells = (case, done, observed)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Recorder:
    """This test's row in the summary table."""
    return Recorder(request.config.stash.setdefault(ROWS_KEY, []), request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    outcomes = item.config.stash.setdefault(OUTCOMES_KEY, {})
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcomes[item.nodeid] = "skipped" if report.skipped else report.outcome
    return report


def format_table(rows: list[Recorder], outcomes: dict[str, str]) -> str:
    """The rows as a fixed-width text table, long cells wrapped."""
    widths, results = (28, 40, 60, 6), {"passed": "ok", "failed": "FAIL", "skipped": "skip"}
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [sep]
    table = [("case", "what was done", "what was observed", "result")]
    table += [(*r.cells, results.get(outcomes.get(r.nodeid, "?"), "?")) for r in rows]
    for texts in table:
        cells = [
            textwrap.wrap(" ".join(str(t).split()), w) or [""]
            for t, w in zip(texts, widths, strict=True)
        ]
        for parts in itertools.zip_longest(*cells, fillvalue=""):
            row = " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True))
            lines.append(f"| {row} |")
        lines.append(sep)
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS_KEY, [])
    if rows:
        terminalreporter.section("reliability and security: case | done | observed")
        terminalreporter.write_line(format_table(rows, config.stash.get(OUTCOMES_KEY, {})))
