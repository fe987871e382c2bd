"""Shared by the benchmark scripts: the environment line and the RESULTS.md sections."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"


def environment(threads: int | None = None) -> dict[str, Any]:
    """CPU model, core and thread counts, library versions, git commit and date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "torchvision", "onnxruntime", "onnx", "pycocotools", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def env_line(env: dict[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    threads = f", {env['threads']} threads" if env.get("threads") else ""
    return f"{env['cpu']} ({env['cores']} cores{threads}); Python {env['python']}; {libs}; commit {env['commit']}; {env['date']}"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_section(key: str, markdown: str) -> None:
    """Replace (or append) the section of RESULTS.md delimited by markers named ``key``."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n\nEvery number here was measured by the command shown with it.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
