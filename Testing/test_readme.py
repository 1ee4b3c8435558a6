"""The README is short and true: every command in it exists with the options it shows, every page it links to
exists, and the docs say how each of their tables was measured."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def code_lines(text: str) -> list[str]:
    """Indented code lines, with backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            cur = ""
            continue
        s = line.strip()
        cur = (cur + " " + s) if cur else s
        if cur.endswith("\\"):
            cur = cur[:-1].strip()
            continue
        out.append(cur.split("  #")[0].strip())
        cur = ""
    return out


def memsam_commands(lines: list[str]) -> list[list[str]]:
    """memsam invocations, also those through torchrun -m MemorizingSAMLib.cli: the argument lists."""
    cmds = []
    for line in lines:
        words = line.split()
        if words[:1] == ["memsam"]:
            cmds.append(words[1:])
        elif "MemorizingSAMLib.cli" in words:
            cmds.append(words[words.index("MemorizingSAMLib.cli") + 1 :])
    return cmds


def test_readme_is_short_and_its_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) < 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), link
    for page in ("performance", "evaluation", "memory", "server", "slicer", "development"):
        assert f"docs/{page}.md" in text, page


def test_every_command_in_the_readme_runs_as_written():
    cmds = memsam_commands(code_lines(README.read_text()))
    assert len(cmds) >= 12
    seen = set()
    for args in cmds:
        sub = args[:2] if args[:1] in (["data"], ["users"]) else args[:1]  # commands with actions
        options = {a.split("=")[0] for a in args if a.startswith("--")}
        r = subprocess.run(
            [sys.executable, "-m", "MemorizingSAMLib.cli", *sub, "--help"], capture_output=True, text=True
        )
        assert r.returncode == 0, (sub, r.stderr)
        for opt in options:
            assert re.search(rf"{re.escape(opt)}\b", r.stdout), (sub, opt)
        seen.add(" ".join(sub))
    assert {"segment", "serve", "train", "evaluate", "build-memory", "data fetch"} <= seen
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)


def test_docs_tables_come_with_their_commands():
    """Each docs page with a table of measurements names the command that produced it."""
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text()
        if re.search(r"^\| .* \|$", text, re.M) and re.search(r"\d+(\.\d+)? ?(ms|s)\b", text):
            assert re.search(r"(benchmarks/\w+\.py|memsam \w+|scripts/\w+)", text), page.name
