"""The hardening matrix (issue 9): every bad input and failure the issue lists, and what the user sees.

    .venv/bin/python benchmarks/hardening_matrix.py [--no-write | --render-only]

Runs ``pytest tests/test_hardening.py`` (one test per case, in the issue's order) with
``SLIMDET_HARDENING_LOG`` set, so that each passing test records the message the user saw (or the
recovery it proved) and the command that produced it; pass/fail and times come from pytest's JUnit
XML. Writes benchmarks/results/hardening.json and the "hardening" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from _common import RESULTS_DIR, ROOT, env_line, environment, write_json, write_section

TESTS = ROOT / "tests" / "test_hardening.py"
MESSAGE_CHARS = 240


def cases() -> dict[str, str]:
    """The test module's CASES (test name -> the issue's wording), read without importing it."""
    for node in ast.parse(TESTS.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if isinstance(target, ast.Name) and target.id == "CASES":
                return ast.literal_eval(node.value)
    raise SystemExit(f"{TESTS}: no CASES dict")


def run_tests() -> dict[str, Any]:
    """Run the hardening tests once; per case: pytest's result and time, and what the test recorded."""
    with tempfile.TemporaryDirectory(prefix="hardening-") as tmp:
        log, junit = Path(tmp) / "seen.json", Path(tmp) / "junit.xml"
        env = {**os.environ, "SLIMDET_HARDENING_LOG": str(log), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS.relative_to(ROOT)),
               f"--junitxml={junit}"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall_s = time.perf_counter() - start
        seen = json.loads(log.read_text()) if log.is_file() else {}
        results = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            status = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    status = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
            results[case.get("name")] = {"status": status, "time_s": float(case.get("time", 0))}
    rows = []
    for test, case in cases().items():
        got = seen.get(case, {})
        rows.append({"case": case, "test": test, **results.get(test, {"status": "not run", "time_s": None}),
                     "outcome": got.get("outcome"), "message": got.get("message"), "command": got.get("command")})  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return {"pytest_exit_code": proc.returncode, "pytest_summary": tail, "wall_s": wall_s, "cases": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ and RESULTS.md alone")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results/hardening.json")
    args = parser.parse_args()
    if args.render_only:
        write_section("hardening", render(json.loads((RESULTS_DIR / "hardening.json").read_text())))
        return 0
    payload = {"command": "benchmarks/hardening_matrix.py", **run_tests(), "environment": environment(threads=1)}
    text = render(payload)
    if not args.no_write:
        write_json("hardening", payload)
        write_section("hardening", text)
    print(text)
    return 0 if payload["pytest_exit_code"] == 0 else 1


def _cell(text: str | None, limit: int = MESSAGE_CHARS) -> str:
    if not text:
        return "–"
    text = " ".join(text.split())
    text = re.sub(r"; known: [^()]+ \(did you mean", "; known: … (did you mean", text)  # keep the suggestion in view
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def render(payload: dict[str, Any]) -> str:
    rows = payload["cases"]
    passed = sum(r["status"] == "passed" for r in rows)
    lines = [
        "## Hardening: bad inputs and failures, and what the user sees (issue 9)",
        "",
        f"Command: `.venv/bin/python {payload['command']}`: runs `pytest tests/test_hardening.py` (one test per case, "
        f"in the issue's order; {payload['wall_s']:.0f} s, pytest: {payload['pytest_summary']}). Each test goes "
        "through the user's path (`slimdet ...` in-process or as a subprocess, `load_dataset`, `load_recipe`, "
        "`run_recipe`) and asserts the error type and that the message names the file, the field or record and "
        "what was expected (CLI: exit code 2, an `error:` line, no traceback), or that the run recovers with "
        "nothing lost (metrics.json and weights equal to an uninterrupted run's). `$TMP` is the test's temporary "
        "folder; lists of known names are elided (…) and messages cut at " + str(MESSAGE_CHARS) + " characters.",
        "",
        f"**{passed} / {len(rows)} cases pass.**",
        "",
        "| # | case | test | result | outcome | what the user sees | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, start=1):
        time_s = f" ({r['time_s']:.1f} s)" if r.get("time_s") is not None else ""
        command = f"`{_cell(r['command'], 160)}`" if r.get("command") else "–"
        lines.append(f"| {i} | {r['case']} | `{r['test']}` | {r['status']}{time_s} | {_cell(r['outcome'])} | "
                     f"{_cell(r['message'])} | {command} |")  # fmt: skip
    lines += ["", f"Environment: {env_line(payload['environment'])}. Raw: `benchmarks/results/hardening.json`."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
