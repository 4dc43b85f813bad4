"""The documentation is true to the repository: every relative link and image in it resolves
(README, ARCHITECTURE, docs/, bench/RESULTS.md, analysis/README.md), every test, test file and
repository path it cites exists, the package has no import cycle (as ARCHITECTURE.md says), and
no committed file names a path of one particular machine."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "ARCHITECTURE.md",
        ROOT / "bench" / "RESULTS.md",
        ROOT / "analysis" / "README.md",
        *(ROOT / "docs").rglob("*.md"),
    ]
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, outside code blocks."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_pages_exist_and_have_links():
    assert (ROOT / "docs" / "results" / "README.md") in PAGES
    assert sum(len(links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(
                f"{target}: no such file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
            )
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[ok](#title) [gone](missing.md) `[code](nothere.md)`\n"
        "```\n[fenced](nothere.md)\n```\n![img](http://example.org/x.png)\n"
    )
    assert links(page) == ["#title", "missing.md"]
    assert _anchors(page) == {"title"}


# --- what the documentation cites exists, and the package has no import cycle ----------------

SRC = ROOT / "src"
PACKAGE = "textvae"
# a path in the repository: a top-level folder or file, then anything up to a space, a quote,
# a bracket or punctuation
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:src|tests|bench|analysis|configs|experiments|docs|\.ci)/[^\s`'\"()\[\],;:]*"
    r"|(?:README|ARCHITECTURE)\.md|pyproject\.toml)"
)
PLACEHOLDER = re.compile(r"[<>*{}$|]|\.\.\.")
# a removed file cited at a commit that still has it, e.g. `0fc93c0^:bench/matrix.py`
AT_COMMIT = re.compile(r"[0-9a-f]{7,40}\^*:$")
TEST_FILE = re.compile(r"(?<![\w.-])(test_\w+\.py)\b")
# a test function; not a config key (`data.test_path=...`, `test_split: dev`) nor a file name
TEST_NAME = re.compile(r"(?<![\w.$/-])(test_\w+)\b(?![.=:])")
TEST_IN_FILE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
# file names of other projects that ARCHITECTURE.md cites for comparison
EXTERNAL_FILES = {"configuration_t5.py", "modeling_t5.py", "configuration_x.py", "modeling_x.py"}
BARE_MODULE = re.compile(r"(?<![\w./-])((?:models/)?\w+\.py)\b")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _defined_names(path: Path) -> set[str]:
    """The functions and classes defined anywhere in a Python file (fixtures included)."""
    return {
        node.name
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }


def cited_paths(text: str) -> list[str]:
    """The repository paths a page cites (code blocks included), without placeholders such as
    ``configs/<corpus>/`` and without removed files cited at a commit (``<sha>^:path``)."""
    found = []
    for m in REPO_PATH.finditer(text):
        path = m.group(1).partition("#")[0].rstrip(".")  # a link's anchor: not part of the path
        if PLACEHOLDER.search(path) or AT_COMMIT.search(text[max(0, m.start() - 42) : m.start()]):
            continue
        if not TEST_FILE.fullmatch(Path(path).name):  # test files: checked by name
            found.append(path)
    return found


def missing_citations(text: str, tests_dir: Path, repo: Path) -> list[str]:
    """What a page cites that does not exist: test files and test functions under
    ``tests_dir`` (``name``, ``tests/x.py::name``) and repository paths under ``repo``."""
    files = {p.name: p for p in tests_dir.rglob("test_*.py")}
    names = set().union(*(_defined_names(p) for p in files.values())) if files else set()
    missing = [f"test file {f}" for f in TEST_FILE.findall(text) if f not in files]
    missing += [f"test {n}" for n in TEST_NAME.findall(text) if n not in names]
    for path, name in TEST_IN_FILE.findall(text):
        if (repo / path).is_file() and name not in _defined_names(repo / path):
            missing.append(f"{path}::{name}")
    missing += [f"file {p}" for p in cited_paths(text) if not (repo / p).exists()]
    return sorted(set(missing))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_tests_and_files_exist(page):
    """Every test file, test function and repository path a page names exists (a renamed test
    or a removed script fails here until the page follows)."""
    missing = missing_citations(page.read_text(encoding="utf-8"), ROOT / "tests", ROOT)
    assert not missing, f"{_rel(page)} cites what does not exist: " + "; ".join(missing)


def test_architecture_names_only_modules_that_exist():
    """ARCHITECTURE.md names modules by their file (``rundir.py``, ``models/parts.py``)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = sorted(
        {
            name
            for name in BARE_MODULE.findall(text)
            if name not in EXTERNAL_FILES
            and not (SRC / PACKAGE / name).is_file()
            and not (ROOT / "tests" / name).is_file()
        }
    )
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"


def test_the_citation_checker_catches_what_is_gone(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_here.py").write_text("def test_present():\n    pass\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "speed.py").write_text("")
    page = (
        "`tests/test_here.py::test_present` `test_present` `bench/speed.py` "
        "`data.test_path=x` `test_split: dev` `configs/<corpus>/x.yaml` "
        "`0fc93c0^:bench/matrix.py`\n"
        "`tests/test_gone.py` `test_absent` `tests/test_here.py::test_other` `bench/gone.py`\n"
    )
    assert missing_citations(page, tmp_path / "tests", tmp_path) == [
        "file bench/gone.py",
        "test file test_gone.py",
        "test test_absent",
        "test test_other",
        "tests/test_here.py::test_other",
    ]


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, read with ``ast`` (imports inside functions
    count; ``from package import x`` counts as ``package.x`` when x is a module; a module's
    import of the package root it belongs to does not count)."""
    files = {}
    for path in (src / package).rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target != package:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets, each as [a, b, ..., a]."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_package_has_no_import_cycles():
    graph = import_graph(SRC, PACKAGE)
    assert len(graph) > 20 and "textvae.registry" in graph["textvae.config"]
    cycles = import_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


# --- no path of a particular machine in committed text ----------------------------------------

# An absolute path that exists on one machine (a home, a mount, a scratch folder of a session):
# a command or a record citing it runs or reads nowhere else. Commands use paths relative to
# the checkout instead. The one path outside the checkout that is allowed is ``../shared/data``:
# this project's convention for the corpus folder beside a checkout (`.ci/run` points
# TEXTVAE_DATA_DIR at it, and the recorded commands in docs/ and bench/ set it so); it is
# relative, so it names no machine, and it holds data only, never code the repository needs.
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|root|home|Users|mnt|scratch|tmp)/")
OUTSIDE_CHECKOUT = re.compile(r"\.\./shared/(?!data\b)[\w.-]*")


def machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that cite a machine's absolute path or a folder beside the checkout
    other than ``../shared/data``, as ``line: text``."""
    return [
        f"{number}: {line.strip()[:120]}"
        for number, line in enumerate(text.splitlines(), 1)
        if MACHINE_PATH.search(line) or OUTSIDE_CHECKOUT.search(line)
    ]


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of committed files")
    return [ROOT / name for name in out.split("\0") if name]


def test_no_committed_text_names_a_path_of_one_machine():
    offenders = []
    for path in _tracked_text_files():
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        hits = machine_paths(data.decode("utf-8", errors="replace"))
        offenders += [f"{path.relative_to(ROOT)}:{hit}" for hit in hits]
    assert not offenders, "paths of one machine in committed files:\n" + "\n".join(offenders)


def test_the_machine_path_check_catches_one():
    text = (
        "TEXTVAE_DATA_DIR=../shared/data ok\n"
        "cd /" + "work/main\n"  # split, so that this file holds no such path itself
        "see https://example.org/home/x and ~/.cache/textvae and $HOME/x\n"
        "--run-dir /" + "tmp/tv17/x\n"
        "python ../" + "shared/tools/import_graph.py\n"
    )
    assert [hit.split(":")[0] for hit in machine_paths(text)] == ["2", "4", "5"]
