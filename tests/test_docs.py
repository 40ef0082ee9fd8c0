"""The README and docs/ say what the code does: every relative link resolves (to a file, and
to a heading where it names one), every ``stemserve`` command in the README's code blocks
parses with the flags the command line has, and every benchmark command in the pages names a
scenario and flags that exist."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import sys

import pytest

from stemserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "benchmarks").glob("**/README.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", page.read_text()))
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: are not ours


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_manual_has_its_pages():
    """Every section the README had is a page of the manual (issue 21's list)."""
    names = {page.stem for page in (ROOT / "docs").glob("*.md")}
    assert {"install", "models", "export", "serving", "separating", "web", "security",
            "performance", "architecture", "testing"} <= names
    assert len(list((ROOT / "docs" / "decisions").glob("0*.md"))) >= 4


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#title) [c](#nowhere) [d](https://x.y)\n")
    assert links(page) == ["missing.md", "#title", "#nowhere"]
    assert anchors(page) == {"title"}


def readme_commands() -> list[str]:
    """Every ``stemserve ...`` command in the README's shell blocks (in a pipe too), without
    comments."""
    commands = []
    for language, block in FENCE.findall((ROOT / "README.md").read_text()):
        if language not in ("bash", "sh", ""):
            continue
        for line in block.splitlines():
            for part in re.split(r"&&|\|", line.split("#")[0]):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0]:  # VAR=value before the command
                    words.pop(0)
                if words and Path(words[0]).name == "stemserve":
                    commands.append(shlex.join(words[1:]))
    return commands


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses(command):
    """The flags the README shows are the command line's (argparse exits on any other)."""
    args = build_parser().parse_args(shlex.split(command))
    assert callable(args.func)


def benchmark_commands() -> list[str]:
    """Every ``python -m benchmarks.run_all <scenario> ...`` command in the pages' text."""
    found = []
    for page in PAGES:
        for match in re.finditer(r"python -m benchmarks\.run_all ([a-z_]+\.[a-z_]+[^`\n]*)",
                                 page.read_text()):
            command = match.group(1).split("#")[0].split("&&")[0].strip()
            found.append(command)
    return sorted(set(found))


def test_the_pages_show_benchmark_commands():
    assert len(benchmark_commands()) >= 5


@pytest.mark.parametrize("command", benchmark_commands())
def test_every_benchmark_command_parses(command):
    """A documented benchmark command names a scenario and flags its config has."""
    if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not a package
        sys.path.insert(0, str(ROOT))
    from benchmarks.run_all import scenario_parser

    name, *argv = shlex.split(command)
    try:
        _, parser = scenario_parser(name)
    except SystemExit as err:
        raise AssertionError(f"{command}: {err}") from None
    if argv != ["--help"]:
        parser.parse_args(argv)
