"""Run tests and print the figures they measured (``measured(...)`` in tests/harness/measure.py): the source of the
test-derived figures in docs/ and bench/README.md. Tests themselves print nothing.

    python scripts/test_figures.py current tests/test_style_transfer.py [-k ...]   (or 2024-03 for the old tree)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    tree, args = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        code = subprocess.call(["bash", str(ROOT / "scripts" / "run_tests.sh"), tree, *args, "-q",
                                f"--junitxml={report}"], cwd=ROOT)
        if not report.is_file():
            return code
        for case in ET.parse(report).getroot().iter("testcase"):
            lines = [p.get("value") for p in case.iter("property") if p.get("name") == "measured"]
            if lines:
                print(f"{case.get('classname')}::{case.get('name')}")
                for line in lines:
                    print(f"    {line}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
