"""README.md's result tables are generated from benchmarks/results (benchmarks/report.py), never typed by hand."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_result_files():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    new, done = report.render(readme)
    assert {"vs_peft", "calibration"} <= set(done)
    assert new == readme, "README.md tables differ from benchmarks/results: run python benchmarks/report.py"
