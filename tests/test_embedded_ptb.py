"""PTB ships inside the package: README's quick start runs with no network and no environment
variable, the shipped files are checked against the published sha256 sums, ``$TEXTVAE_DATA_DIR``
takes precedence when set, and a failing lookup leaves no empty folder behind."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import pytest

from textvae import data, registry
from textvae.config import DataConfig
from textvae.data import DataError, load_split

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # this project's local copy, as .ci/run sets it
SIZES = {"train": 42068, "valid": 3370, "test": 3761}


def _network_blocked(*args, **kwargs):
    raise urllib.error.URLError("network blocked by the test")


@pytest.fixture
def offline(monkeypatch):
    """No network: every download fails as it would on a machine without one."""
    monkeypatch.setattr(urllib.request, "urlopen", _network_blocked)
    monkeypatch.setattr(socket, "create_connection", _network_blocked)


@pytest.fixture
def fresh_home(tmp_path, monkeypatch, offline):
    """A new user's machine: no TEXTVAE_DATA_DIR, an empty HOME, no network."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("TEXTVAE_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def _ptb():
    return registry.discover_corpora()["ptb"]


def _with_ptb(monkeypatch, **changes):
    """Register a PTB spec with ``changes`` for this test only."""
    monkeypatch.setitem(registry.CORPORA, "ptb", dataclasses.replace(_ptb(), **changes))


def test_ptb_by_name_reads_the_shipped_copy_offline(fresh_home):
    for role, n in SIZES.items():
        corpus = load_split(DataConfig(corpus="ptb"), role, whole=True)
        assert len(corpus.texts) == n and corpus.stats["blank_lines"] == 0, role
        assert Path(corpus.source).parent == _ptb().embedded
    assert not list(fresh_home.iterdir())  # nothing written under HOME (no cache, no download)


def test_the_shipped_files_are_package_data_with_the_published_sums():
    shipped = resources.files("textvae") / "corpora_data" / "ptb"
    for name, expected in data.PTB_SHA256.items():
        assert (shipped / name).is_file(), name
        assert data._sha256(_ptb().embedded / name) == expected, name


def test_the_package_data_glob_covers_the_shipped_files():
    """pyproject's package-data puts the files in a wheel (checked for real by building one:
    ``pip wheel . --no-deps -w dist && python -m zipfile -l dist/textvae-*.whl``)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["textvae"]
    package = ROOT / "src" / "textvae"
    covered = {p.relative_to(package) for g in globs for p in package.glob(g)}
    assert {Path("corpora_data", "ptb", name) for name in data.PTB_SHA256} <= covered


def test_a_damaged_shipped_copy_is_refused_naming_the_file(tmp_path, monkeypatch, fresh_home):
    damaged = tmp_path / "shipped" / "ptb"
    shutil.copytree(_ptb().embedded, damaged)
    with open(damaged / "ptb.valid.txt", "a") as fh:
        fh.write(" one more line\n")
    _with_ptb(monkeypatch, embedded=damaged)
    with pytest.raises(DataError, match=r"ptb\.valid\.txt: sha256 [0-9a-f]{64} differs"):
        load_split(DataConfig(corpus="ptb"), "valid")
    (damaged / "ptb.test.txt").unlink()
    with pytest.raises(DataError, match=r"ptb\.test\.txt.*missing.*reinstall"):
        load_split(DataConfig(corpus="ptb"), "test")


@pytest.mark.parametrize("root", ["empty", "no/such/folder"])
def test_a_data_dir_without_ptb_gets_no_empty_folder(tmp_path, monkeypatch, offline, root):
    """Set, $TEXTVAE_DATA_DIR is where named corpora live: PTB missing there is downloaded into
    it; offline that fails, says what to do, and leaves the folder as it was (no ptb/, and a
    folder that did not exist is not created)."""
    (tmp_path / "empty").mkdir()
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(tmp_path / root))
    with pytest.raises(DataError) as err:
        load_split(DataConfig(corpus="ptb"), "valid")
    assert sorted(tmp_path.rglob("*")) == before
    assert "failed" in str(err.value) and "unset TEXTVAE_DATA_DIR" in str(err.value)


def test_a_local_copy_takes_precedence_over_the_shipped_one(tmp_path, monkeypatch, fresh_home):
    local = tmp_path / "data" / "ptb"
    local.mkdir(parents=True)
    for name in data.PTB_SHA256:
        (local / name).write_text(f" a local sentence of {name}\n")
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(local.parent))
    corpus = load_split(DataConfig(corpus="ptb"), "valid")
    assert corpus.texts == ["a local sentence of ptb.valid.txt"]  # the user's copy, as it is
    monkeypatch.delenv("TEXTVAE_DATA_DIR")
    assert len(load_split(DataConfig(corpus="ptb"), "valid").texts) == SIZES["valid"]


def test_the_projects_local_copy_is_read_when_pointed_at(tmp_path, monkeypatch, offline):
    if not (SHARED_DATA / "ptb" / "ptb.valid.txt").is_file():
        pytest.skip(f"no local copy at {SHARED_DATA}")
    _with_ptb(monkeypatch, embedded=tmp_path / "not-consulted")
    monkeypatch.setenv("TEXTVAE_DATA_DIR", str(SHARED_DATA))
    corpus = load_split(DataConfig(corpus="ptb"), "valid")
    assert Path(corpus.source) == SHARED_DATA / "ptb" / "ptb.valid.txt"
    assert len(corpus.texts) == SIZES["valid"]
