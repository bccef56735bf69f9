"""Runs a pytest selection in this process under the CPU capability that
FUSED_MBCONV_CPU_CAPABILITY chose, and prints one JSON line: the capability the "cpu" backend
loaded, pytest's exit code, and how many tests passed / failed / were skipped.

    FUSED_MBCONV_CPU_CAPABILITY=avx2 python tests/cpu_capability_suite.py [pytest args...]
"""

import json
import sys

import pytest

from fused_mbconv import extension


class Outcomes:
    def __init__(self):
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.counts["failed"] += 1
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.when == "call":
            self.counts["passed"] += 1


def main(argv):
    usable, reason = extension.status("cpu")
    outcomes = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *argv], plugins=[outcomes])
    print(json.dumps({"capability": extension.cpu_capability(), "usable": usable,
                      "reason": reason, "exit": int(code), **outcomes.counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
