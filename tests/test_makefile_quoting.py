"""No character of a make variable is syntax: hostile values arrive intact or are refused clearly.

Every variable a user passes to make (SET, RESUME, RESULTS, JOBS, DATA_DIR,
DATASET, DATA_PATH, TEXT_FIELD, MAX_DOCS, PYTEST_ARGS) is tried with quotes, $(...),
backquotes, ';' and line breaks. Nothing may run: no file named `pwned` may
appear. A value either reaches the program byte for byte (checked where it
lands: .config, a folder name, a manifest) or is refused with exit status 2
and a message that quotes it.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from lib.data.corpora import HUB_DATASETS
from lib.kconfig import REPO_ROOT, read_config, settings_from_kconfig
from tests.test_train_e2e import make, project  # noqa: F401 (project is a fixture)

pytestmark = pytest.mark.slow

HOSTILE = [
    "x';touch pwned;'",          # the issue's: closes the Makefile's single quotes
    'x";touch pwned;"',
    "$(touch pwned)",
    "`touch pwned`",
    "a;touch pwned\ntouch pwned",  # a line break ends a shell command too
    "$(shell touch pwned)",      # make's own function syntax
]
IDS = ["single-quote", "double-quote", "dollar-paren", "backquote", "newline", "make-shell"]


@pytest.fixture
def workdir(project):
    """The project copy with a .config; asserts afterwards that nothing ran."""
    if not (project / ".config").exists():
        make(project, "defconfig-lenet5-magnitude")
    yield project
    ran = (project / "pwned").exists()
    (project / "pwned").unlink(missing_ok=True)  # so the next test starts clean
    assert not ran, "a make variable was run as a command"


def _refused(result, value: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert value in result.stderr or repr(value) in result.stderr, result.stderr


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_set_values_arrive_intact_or_are_refused(workdir, value):
    # Quoted as a shell word inside SET, the value is one symbol's value, byte for byte.
    result = make(workdir, "check-config", f"SET=DATA_DIR={shlex.quote(value)}", check=False)
    if "\n" in value:  # .config holds one assignment per line
        _refused(result, repr(value))
        assert "line break" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        kconf, _ = read_config(workdir / ".config")
        assert settings_from_kconfig(kconf).data_dir == value
    # Unquoted, SET is split into words as a shell would split them, and nothing more: one
    # SYMBOL=value word is taken as such; anything else (an unbalanced quote, a second word
    # that is not SYMBOL=value) is refused and nothing is written.
    before = (workdir / ".config").read_bytes()
    result = make(workdir, "check-config", f"SET=DATA_DIR={value}", check=False)
    try:
        words = shlex.split(f"DATA_DIR={value}")
    except ValueError:
        words = []
    if len(words) == 1 and "\n" not in words[0]:
        assert result.returncode == 0, result.stderr
        kconf, _ = read_config(workdir / ".config")
        assert settings_from_kconfig(kconf).data_dir == words[0].removeprefix("DATA_DIR=")
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr and "error: SET" in result.stderr
        assert (workdir / ".config").read_bytes() == before


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_run_and_matrix_variables_are_refused_naming_the_value(workdir, value):
    _refused(make(workdir, "resume", f"RESUME={value}", check=False), f"{value} is not a run directory")
    _refused(make(workdir, "plots", f"RESULTS={value}", check=False), f"no matrix directory {value}")
    _refused(make(workdir, "test-matrix", f"JOBS={value}", check=False), f"JOBS={value} is not a positive")
    _refused(make(workdir, "data-gpt2", f"DATASET={value}", "DATA_DIR=quoting-data", check=False),
             f"unknown DATASET {value!r}")
    _refused(make(workdir, "data-gpt2", "DATASET=custom", f"DATA_PATH={value}", "DATA_DIR=quoting-data",
                  check=False), f"DATA_PATH not found: {value}")


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_data_variables_arrive_intact(workdir, value, tmp_path):
    # DATA_PATH names a file with the value in its name, TEXT_FIELD is the JSON key read,
    # DATA_DIR becomes a folder of that very name.
    source = tmp_path / f"{value}.jsonl"
    source.write_text("".join(json.dumps({value: f"Document {i}: a few words to tokenize."}) + "\n"
                              for i in range(4)))
    make(workdir, "data-gpt2", "DATASET=custom", f"DATA_PATH={source}", f"DATA_DIR={value}",
         f"TEXT_FIELD={value}", "MAX_DOCS=3")
    manifest = json.loads((workdir / value / "prepared" / "custom-gpt2" / "manifest.json").read_text())
    assert [f["path"] for f in manifest["source"]["files"]] == [str(source.resolve())]
    assert manifest["source"]["text_field"] == value and manifest["max_docs"] == 3
    result = make(workdir, "data-gpt2", "DATASET=custom", f"DATA_PATH={source}", f"MAX_DOCS={value}",
                  "DATA_DIR=quoting-data", check=False)
    _refused(result, repr(value))


def test_make_installs_hub_requirements_for_exactly_the_hub_corpora():
    line = re.search(r"^HUB_DATASETS := (.*)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert line.split() == list(HUB_DATASETS)


@pytest.mark.parametrize("value", HOSTILE, ids=IDS)
def test_pytest_args_reach_pytest_not_a_shell(workdir, value):
    # PYTEST_ARGS becomes PYTEST_ADDOPTS, which pytest splits itself: the hostile words are test paths
    # that do not exist, so pytest stops with its usage error before collecting anything.
    result = make(workdir, "test", f"PYTEST_ARGS={value}", check=False)
    assert result.returncode == 2 and "Error 4" in result.stderr, result.stdout + result.stderr  # pytest: usage
    assert "file or directory not found" in result.stdout + result.stderr
