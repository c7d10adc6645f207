"""Security tests: the escape battery's summary ("N probes, 0 escaped") and the measured limits,
shown after the run."""

from __future__ import annotations

import pytest

# Sections of lines for the terminal summary, by title.
SUMMARY: dict[str, list[str]] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, lines in SUMMARY.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
