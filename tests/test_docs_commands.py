"""The docs cannot rot: every ``sparsefusion ...`` command shown in README.md and docs/*.md parses
with the real command-line parser and resolves its config, and every relative Markdown link in
README.md and docs/ points to a file (and heading) that exists.

A command is a line of a fenced code block that runs ``sparsefusion`` (also after ``&&``, as
``torchrun ... -m sparsefusion ...`` or through ``scripts/slurm_train.sbatch``, whose arguments go
to ``sparsefusion train``); backslash-continued lines are joined, ``# ...`` comments dropped and
``for a in x y; do ... $a ... done`` loops expanded. Nothing is trained, generated or loaded:
argument parsing and config resolution only.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparsefusion.cli.main import build_parser
from sparsefusion.config import merge, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
COMMAND_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# Command lines the test does not check: "file: the line as shown" -> why. Keep it short; a doc
# should show runnable example values instead.
ALLOWLIST: dict[str, str] = {}

# Where the commands whose overrides are not a training config take their settings from:
# command -> (module, dataclass, the one override section it accepts or None for top-level keys).
OVERRIDE_CONFIGS = {
    "eval": ("sparsefusion.eval.run_eval", "EvalConfig", "eval"),
    "train-aux": ("sparsefusion.train.aux_train", "AuxTrainConfig", "aux"),
    "compare": ("sparsefusion.compare.savings", "CompareConfig", None),
}


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/x.md:12"
    text: str  # the joined line, as shown
    argv: tuple[str, ...]  # what follows "sparsefusion"

    def __str__(self) -> str:
        return f"{self.where}: sparsefusion {' '.join(self.argv)}"


def fenced_lines(path: Path):
    """(line number, text) of every line inside fenced code blocks, continuations joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def segments(text: str) -> list[list[str]]:
    """Shell words of each simple command of a line (split at ``&&``, ``;``, ``|``), comments
    dropped."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    lex.commenters = "#"
    out: list[list[str]] = [[]]
    for word in lex:
        if word and set(word) <= set(";&|"):
            out.append([])
        else:
            out[-1].append(word)
    return [s for s in out if s]


def invocation(words: list[str]) -> list[str] | None:
    """The arguments ``sparsefusion`` gets from one simple command, or None."""
    for i, w in enumerate(words):
        if w == "sparsefusion" and (i == 0 or words[i - 1] in ("-m", "--no-python")):
            return words[i + 1 :]
        if w.endswith("scripts/slurm_train.sbatch"):
            return ["train", *words[i + 1 :]]
    return None


def expand_loops(lines):
    """``for a in x y; do ... $a ... done``: the loop body once per word, ``$a`` replaced."""
    loop = None
    for n, text in lines:
        m = re.match(r"\s*for (\w+) in ([^;]+); do\s*$", text)
        if m:
            loop = (m.group(1), m.group(2).split())
        elif text.strip() == "done":
            loop = None
        elif loop is None:
            yield n, text
        else:
            var, words = loop
            for w in words:
                yield n, re.sub(r"\$\{?" + var + r"\b\}?", w, text)


def doc_commands() -> list[DocCommand]:
    found = []
    for path in COMMAND_DOCS:
        rel = path.relative_to(ROOT).as_posix()
        for n, text in expand_loops(fenced_lines(path)):
            if "sparsefusion" not in text:
                continue
            for words in segments(text):
                argv = invocation(words)
                if argv is None:
                    continue
                if f"{rel}: {text.strip()}" not in ALLOWLIST:
                    found.append(DocCommand(f"{rel}:{n}", text.strip(), tuple(argv)))
    return found


COMMANDS = doc_commands()


def parse(argv: list[str]):
    """Parse as ``sparsefusion.cli.main.main`` does (options and overrides may interleave)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        pytest.fail(f"argparse rejected it (exit {e.code}); see the message above")
    if extra and args.command == "compare":
        args.runs += extra
    elif extra and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        pytest.fail(f"unrecognized arguments: {' '.join(extra)}")
    return args


def resolve(config_and_overrides: list[str]) -> str:
    """The config ``sparsefusion config ARGS`` prints (preset or YAML, then overrides)."""
    args = build_parser().parse_args(["config", *config_and_overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.fn(args) == 0
    return out.getvalue()


def check_overrides(command: str, overrides: list[str]) -> None:
    """Merge ``key=value`` overrides into the command's settings dataclass, as the command does."""
    module, name, section = OVERRIDE_CONFIGS[command]
    assert all("=" in o for o in overrides), f"not key=value: {overrides}"
    data = parse_overrides(overrides)
    if section is not None:
        assert set(data) <= {section}, f"{command} takes only {section}.* overrides, got {data}"
        data = data.get(section, {})
    merge(getattr(importlib.import_module(module), name)(), data, where=section or command)


def check(args) -> None:
    """Config resolution (no training) for the commands that take settings."""
    cmd = args.command
    if cmd in ("train", "config"):
        resolve(args.args)
    elif cmd in OVERRIDE_CONFIGS:
        if cmd == "compare":
            runs = [r for r in args.runs if "=" not in r]
            assert len(runs) >= 2, "compare needs a baseline and a run"
            check_overrides(cmd, [r for r in args.runs if "=" in r])
        else:
            check_overrides(cmd, args.overrides)
    elif cmd in ("data", "tokenizer") and hasattr(args, "target"):
        from sparsefusion.data.sources import SOURCES

        target = args.target
        where = f"data.source={target}" if target in SOURCES else f"data.path={target}"
        assert target in SOURCES or "/" in target or "." in target, f"unknown source {target!r}"
        resolve([args.preset, where, *args.overrides])
    elif cmd == "bench":
        from sparsefusion.models.presets import MODEL_SIZES

        assert args.size in MODEL_SIZES, f"--size {args.size}: not in {sorted(MODEL_SIZES)}"
        for arch in args.archs.split(","):
            if arch != "naive-mot":
                resolve([arch])
    elif cmd == "bench-generate":
        resolve([args.arch, *args.overrides])
    elif cmd == "generate":
        from sparsefusion.generate.constraints import MODES

        assert args.mode is None or args.mode in MODES, f"--mode {args.mode}: not in {MODES}"
    elif cmd == "sweep":
        assert (ROOT / args.recipe).is_file(), f"no sweep recipe {args.recipe}"


def test_docs_show_commands():
    names = {c.argv[0] for c in COMMANDS if c.argv}
    assert len(COMMANDS) > 50, COMMANDS
    # every subcommand a user has is shown somewhere
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= names, f"never shown: {sorted(set(sub.choices) - names)}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_parses_and_resolves(cmd: DocCommand, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository root
    assert "..." not in cmd.argv and not any(w.startswith("[") for w in cmd.argv), (
        f"{cmd}: a placeholder; show a concrete example (or allowlist it)"
    )
    try:
        check(parse(list(cmd.argv)))
    except Exception as e:  # name the doc line in the failure
        raise AssertionError(f"{cmd}\n  {type(e).__name__}: {e}") from e


# Links -----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def without_fences(text: str) -> str:
    return re.sub(r"^\s*```.*?^\s*```[^\n]*$", "", text, flags=re.S | re.M)


def prose(path: Path) -> str:
    """The Markdown without fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", without_fences(path.read_text()))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped)."""
    out = set()
    for line in without_fences(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


def relative_links():
    for path in LINK_DOCS:
        for target in LINK.findall(prose(path)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield path, target


LINKS = list(relative_links())


def test_docs_have_links():
    assert len(LINKS) > 20


@pytest.mark.parametrize(
    "path,target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS]
)
def test_relative_link_resolves(path: Path, target: str):
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    assert dest.exists(), f"{path.relative_to(ROOT)}: {target} -> {dest} does not exist"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{path.relative_to(ROOT)}: no heading #{anchor} in {dest}"
