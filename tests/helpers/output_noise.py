"""What must never appear in a runner's output on a warm start: the libraries' start-up warnings, raw compiler
lines, colour codes, carriage-return progress updates and tracebacks (issue 17 item 10)."""

from __future__ import annotations

import re
from typing import List

NOISE = {
    "Paddle's ccache warning": re.compile(r"No ccache found"),
    "setuptools' distutils warning": re.compile(r"Setuptools is replacing distutils"),
    "a Python warning from a library": re.compile(r"site-packages/\S+: \w*Warning: "),
    "Paddle's set_state_dict warning": re.compile(r"Skip loading for "),
    "a raw compiler line": re.compile(r"(^|\s)(g\+\+|c\+\+|gcc) .*-o "),
    "an ANSI colour code": re.compile(r"\x1b\["),
    "a carriage-return progress update": re.compile(r"\r"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "a glog INFO line of Paddle's C++ core": re.compile(r"^I\d{4} \d\d:\d\d:\d\d"),
    "fleet's start-up chatter": re.compile(r"HybridParallelInfo|comm group|Modified FLAGS detected|"
                                           r"is not in group"),
}


def noise_lines(output: str) -> List[str]:
    """``"what: line"`` for every line of ``output`` that is noise (empty when the output is clean)."""
    found = []
    for line in output.split("\n"):
        for what, pattern in NOISE.items():
            if pattern.search(line):
                found.append(f"{what}: {line[:200]!r}")
    return found
