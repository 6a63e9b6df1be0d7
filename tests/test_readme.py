"""The result tables of README.md and docs/*.md are generated from benchmarks/results (benchmarks/report.py), never
typed by hand; the docs stand alone (no link out of the repository, every relative link resolves)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # report renders with the benchmark modules
    import report

    return report


def test_tables_match_result_files(monkeypatch):
    report = _report(monkeypatch)
    found = set()
    for path in report.pages():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, done = report.render(text)
        found.update(done)
        assert new == text, f"{os.path.relpath(path, ROOT)}: tables differ from benchmarks/results: run python " \
                            "benchmarks/report.py"
    assert found == set(report.TABLES), f"tables placed nowhere: {set(report.TABLES) - found}"


def test_readme_is_a_front_door_and_docs_stand_alone(monkeypatch):
    report = _report(monkeypatch)
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 300
    for path in report.pages():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert "shared/" not in text and "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith("http"):
                continue
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: broken link {target}"
