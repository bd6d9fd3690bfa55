"""The README's commands against the real CLI, so the README cannot drift from it.

Every shell line in the README's fenced code blocks is one of:

- a cheap ``bonecluster`` command (``CHEAP`` below, shrunk where it would take long): run in a
  temporary folder, in README order, and it must exit 0;
- any other ``bonecluster`` command (also behind ``torchrun -m``): ``bonecluster SUB --help``
  must succeed and list every option the line uses, and a line without placeholders must parse
  with the CLI's own parser, its ``--preset`` and ``--set key=value`` included;
- ``make``, ``pip``, ``git clone`` or ``cd``: the make targets must exist in the Makefile, and
  pip's constraints file and extras in the repository.

A line whose program is none of these fails the test, so that a new kind of command gets a check
here instead of going unchecked. The ``bonecluster`` synopses in docs/*.md get the ``--help``
check too. The README must also stay short, docs/index.md must list every page in docs/, and
every relative link (and its #anchor) in the README and in docs/ must resolve.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250
BIN = Path(sys.executable).parent  # the venv that runs the tests holds the `bonecluster` script
TIMEOUT_S = 60

# Programs the README may use, each with its check below.
KNOWN_PROGRAMS = ("bonecluster", "torchrun", "make", "pip", "git", "cd")
SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")

# Cheap subcommands, run for real: option -> value forced onto the README's line, so that each
# runs in seconds on 2 cores (21 phantoms are 3 per body part; one process, no worker pool).
CHEAP = {
    "phantom": {"--n": "21", "--size": "64", "--workers": "1"},
    "prepare": {"--workers": "1"},
}
# `bonecluster` lines without a subcommand (`--help`, `--version`) are always cheap.

# Link targets that another change is writing; a link to one may point nowhere until it lands.
# Remove an entry once the file exists.
WRITTEN_ELSEWHERE: set[str] = set()


@dataclass(frozen=True)
class Command:
    line: int                # line of its file where the command starts (1-based)
    text: str                # as written, continuation lines joined
    tokens: tuple[str, ...]  # shell words, comment dropped
    file: str = "README.md"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


# ----------------------------------------------------------------------------- parsing the README


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, 1-based line number of its first line inside the fences, lines) of every fenced block."""
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start + 1, body))
        i += 1
    return blocks


def _is_shell(lang: str, body: list[str]) -> bool:
    """A labelled shell block, or an unlabelled one that starts with a command or a `$ ` prompt
    (unlabelled blocks also hold folder trees and JSON schemas, which are not commands)."""
    if lang in SHELL_LANGS:
        return True
    if lang:
        return False
    first = next((s.strip() for s in body if s.strip()), "")
    return first.startswith("$ ") or first.split(" ")[0] in KNOWN_PROGRAMS


def commands(text: str, file: str = "README.md") -> list[Command]:
    """Every shell command of the text's shell blocks, in order.

    A line ending in a backslash, or an indented line right after a command (the README's way of
    wrapping a long synopsis), continues it. In console blocks, and in any block that uses a
    `$ ` prompt, only prompted lines are commands; the rest is output.
    """
    found: list[Command] = []
    for lang, first_line, body in fenced_blocks(text):
        if not _is_shell(lang, body):
            continue
        prompted = lang == "console" or any(s.lstrip().startswith("$ ") for s in body)
        current: list[str] = []
        start = 0

        def flush() -> None:
            if current:
                joined = " ".join(current)
                found.append(Command(start, joined, tuple(shlex.split(joined, comments=True)), file))
                current.clear()

        for offset, raw in enumerate(body):
            stripped = raw.strip()
            continues = bool(current) and (current[-1].endswith("\\") or (raw[:1].isspace() and not prompted))
            if current and current[-1].endswith("\\"):
                current[-1] = current[-1][:-1].rstrip()
            if continues and stripped:
                current.append(stripped)
                continue
            flush()
            if prompted:
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:].strip()
            if not stripped or stripped.startswith("#"):
                continue
            current.append(stripped)
            start = first_line + offset
        flush()
    return found


README_COMMANDS = commands(README.read_text(encoding="utf-8"))


def _of(program: str) -> list[Command]:
    return [c for c in README_COMMANDS if c.tokens and c.tokens[0] == program]


def bonecluster_args(cmd: Command) -> list[str]:
    """The arguments after `bonecluster`, also from `torchrun ... -m bonecluster ...`."""
    tokens = list(cmd.tokens)
    if tokens[0] == "bonecluster":
        return tokens[1:]
    if tokens[0] == "torchrun":
        for i in range(len(tokens) - 1):
            if tokens[i] == "-m" and tokens[i + 1] == "bonecluster":
                return tokens[i + 2:]
        pytest.fail(f"{cmd}\n  torchrun line does not run `-m bonecluster`")
    raise AssertionError(cmd)


def split_subcommand(args: list[str]) -> tuple[list[str], str | None, list[str]]:
    """(global options, subcommand or None, the subcommand's arguments)."""
    for i, tok in enumerate(args):
        if not tok.startswith("-"):
            return args[:i], tok, args[i + 1:]
    return args, None, []


def options_used(args: list[str]) -> list[str]:
    """Every option a line names, also inside synopsis brackets: `[--fit squash|letterbox]`."""
    found = []
    for tok in args:
        tok = tok.strip("[]")
        m = re.fullmatch(r"(--?[A-Za-z][\w-]*)(=.*)?", tok)
        if m:
            found.append(m.group(1))
    return found


def is_concrete(args: list[str]) -> bool:
    """No synopsis notation: optional `[...]`, alternatives `a|b`, repetition `DATA...`."""
    return not any(ch in tok for tok in args for ch in "[]|") and not any("..." in tok for tok in args)


# ----------------------------------------------------------------------------- running bonecluster


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny inputs; threads only contend on a shared CPU
    return env


def run_bonecluster(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = BIN / "bonecluster"
    assert exe.exists(), f"{exe} is missing: install the package into the venv that runs the tests"
    return subprocess.run([str(exe), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@cache
def help_text(subcommand: str | None) -> str:
    """`bonecluster [SUB] --help`, which must succeed."""
    args = [subcommand, "--help"] if subcommand else ["--help"]
    done = run_bonecluster(args, REPO)
    assert done.returncode == 0, f"bonecluster {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def _has_option(help_out: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_out) is not None


def forced(args: list[str], values: dict[str, str]) -> list[str]:
    """The line's arguments with each option in ``values`` set to its value (added when absent)."""
    out, i = [], 0
    while i < len(args):
        if args[i] in values:
            i += 2  # drop the option and the README's value
            continue
        out.append(args[i])
        i += 1
    for option, value in values.items():
        out += [option, value]
    return out


def is_cheap(args: list[str]) -> bool:
    _, sub, rest = split_subcommand(args)
    return (sub is None or sub in CHEAP) and is_concrete(rest)


# ----------------------------------------------------------------------------- the tests


def test_readme_is_short_and_points_to_the_docs():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES} and move detail to docs/")
    text = "\n".join(lines)
    for target in ("docs/index.md", "docs/DEVELOPING.md"):
        assert f"]({target})" in text, f"README.md should link {target}"


def test_every_readme_command_has_a_check():
    assert README_COMMANDS, "no shell commands found in README.md"
    unknown = [str(c) for c in README_COMMANDS if c.tokens[0] not in KNOWN_PROGRAMS]
    assert not unknown, ("README commands this test cannot check; add their program to KNOWN_PROGRAMS "
                         "with a check:\n" + "\n".join(unknown))


def test_readme_shows_the_fresh_clone_commands():
    """`make demo` and `make test` are the two entry points (.ci/run calls `make test`)."""
    made = {c.tokens[1:] for c in _of("make")}
    assert ("demo",) in made and ("test",) in made, "README.md must show `make demo` and `make test`"
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


def test_make_targets_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = {t for m in re.finditer(r"^([\w.$()/ -]+?)\s*:(?!=)", makefile, re.M)
               for t in m.group(1).split() if not t.startswith((".", "$"))}
    for cmd in _of("make"):
        for target in (t for t in cmd.tokens[1:] if not t.startswith("-") and "=" not in t):
            assert target in targets, f"{cmd}\n  no target {target!r} in the Makefile ({sorted(targets)})"


def test_pip_lines_name_real_files_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for cmd in _of("pip"):
        tokens = list(cmd.tokens)
        for i, tok in enumerate(tokens[:-1]):
            value = tokens[i + 1]
            if tok in ("-c", "--constraint", "-r", "--requirement"):
                assert (REPO / value).is_file(), f"{cmd}\n  {value} is not in the repository"
            if tok in ("-e", "--editable"):
                m = re.fullmatch(r"([^\[]+)(?:\[([\w,-]+)\])?", value)
                assert m and (REPO / m.group(1)).resolve() == REPO, f"{cmd}\n  -e should install this repository"
                missing = set((m.group(2) or "").split(",")) - extras - {""}
                assert not missing, f"{cmd}\n  no extras {sorted(missing)} in pyproject.toml ({sorted(extras)})"


def test_git_and_cd_lines_are_plain():
    for cmd in _of("git"):
        assert cmd.tokens[1:2] == ("clone",), f"{cmd}\n  only `git clone` is expected in the README"
    for cmd in _of("cd"):
        assert len(cmd.tokens) == 2, f"{cmd}\n  `cd` takes one folder"


BONECLUSTER_LINES = _of("bonecluster") + _of("torchrun")


@pytest.mark.parametrize("cmd", BONECLUSTER_LINES, ids=[f"line{c.line}" for c in BONECLUSTER_LINES])
def test_bonecluster_line_matches_the_cli(cmd):
    """`bonecluster SUB --help` works and lists every option the line uses; a concrete line also
    parses with the CLI's parser, and its preset and `--set` overrides load."""
    check_against_cli(cmd, parse=True)


DOCS_LINES = [c for p in sorted(DOCS.glob("*.md"))
              for c in commands(p.read_text(encoding="utf-8"), f"docs/{p.name}")
              if c.tokens[0] in ("bonecluster", "torchrun")]


@pytest.mark.parametrize("cmd", DOCS_LINES, ids=[f"{c.file}:{c.line}" for c in DOCS_LINES])
def test_docs_bonecluster_line_matches_the_help(cmd):
    """The docs' synopses name only options the CLI has (they are not parsed: most are synopses)."""
    check_against_cli(cmd, parse=False)


def check_against_cli(cmd: Command, parse: bool) -> None:
    global_opts, sub, rest = split_subcommand(bonecluster_args(cmd))
    top = help_text(None)
    for option in global_opts:
        assert _has_option(top, option), f"{cmd}\n  `bonecluster --help` has no {option}"
    if sub is None:
        return
    assert re.search(rf"^\s+{re.escape(sub)}\s", top, re.M), f"{cmd}\n  no subcommand {sub!r} in `bonecluster --help`"
    sub_help = help_text(sub)
    missing = [o for o in options_used(rest) if not _has_option(sub_help, o)]
    assert not missing, f"{cmd}\n  `bonecluster {sub} --help` has no {', '.join(missing)}"
    if not parse or not is_concrete(rest):
        return
    from bonecluster.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            ns = build_parser().parse_args([*global_opts, sub, *rest])
        except SystemExit as stop:
            pytest.fail(f"{cmd}\n  the CLI rejects it (exit {stop.code}): {err.getvalue().strip()}")
    if hasattr(ns, "preset") and hasattr(ns, "overrides"):
        from bonecluster.config import load_config

        try:
            load_config(ns.preset, None, ns.overrides)
        except ValueError as bad:
            pytest.fail(f"{cmd}\n  its config does not load: {bad}")


def test_cheap_readme_commands_run(tmp_path):
    """Run the cheap lines in README order in one folder (`prepare` reads what `phantom` wrote)."""
    ran: set[str | None] = set()
    for cmd in BONECLUSTER_LINES:
        if cmd.tokens[0] != "bonecluster" or not is_cheap(list(cmd.tokens[1:])):
            continue
        args = list(cmd.tokens[1:])
        _, sub, _ = split_subcommand(args)
        if sub in CHEAP:
            args = forced(args, CHEAP[sub])
        done = run_bonecluster(args, tmp_path)
        assert done.returncode == 0, (f"{cmd}\n  ran as: bonecluster {shlex.join(args)}\n  exit "
                                      f"{done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        ran.add(sub)
    # The README keeps a runnable first step; if it loses one, this allow-list must change with it.
    expected = {None, *CHEAP}
    assert ran == expected, (f"ran {sorted(map(str, ran))}, expected {sorted(map(str, expected))}: a cheap "
                             "command is no longer in the README without placeholders")


# ----------------------------------------------------------------------------- links


def prose_lines(text: str) -> list[str]:
    """The text's lines with those of fenced blocks blanked: there `# x` is no heading and
    `[x](y)` no link."""
    kept, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if m and (fence is None or m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence)):
            fence = m.group(1) if fence is None else None
            kept.append("")
            continue
        kept.append("" if fence else line)
    return kept


def github_anchors(md: Path) -> set[str]:
    """The anchors GitHub makes for a Markdown file's headings (lowercase, punctuation dropped,
    spaces to hyphens, -1, -2... for repeats)."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose_lines(md.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def local_links(md: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it points to, anchor) for each link that is not a URL."""
    prose = "\n".join(prose_lines(md.read_text(encoding="utf-8")))
    prose = re.sub(r"`[^`\n]*(?:\n[^`\n]*)?`", "", prose)  # inline code (a span may wrap once)
    found = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        found.append((target, (md.parent / path).resolve() if path else md, anchor))
    return found


MARKDOWN_FILES = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("md", MARKDOWN_FILES, ids=[p.relative_to(REPO).as_posix() for p in MARKDOWN_FILES])
def test_relative_links_resolve(md):
    broken = []
    for target, path, anchor in local_links(md):
        try:
            rel = path.relative_to(REPO).as_posix()
        except ValueError:
            broken.append(f"{target}: outside the repository")
            continue
        if not path.exists():
            if rel not in WRITTEN_ELSEWHERE:
                broken.append(f"{target}: no file {rel}")
            continue
        if anchor and path.suffix == ".md" and anchor not in github_anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {rel}")
    assert not broken, f"{md.relative_to(REPO)}:\n  " + "\n  ".join(broken)


def test_docs_index_links_every_page():
    index = DOCS / "index.md"
    linked = {path for _, path, _ in local_links(index)}
    pages = {p.resolve() for p in DOCS.glob("*.md")} - {index.resolve()}
    missing = sorted(p.name for p in pages - linked)
    assert not missing, f"docs/index.md does not link {', '.join(missing)}"
