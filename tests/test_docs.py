"""Every shell command in README.md and docs/*.md pastes as is: the test runs them.

A fresh-clone-like copy of the project (the files git tracks or would track, no runs/, no
.venv) gets a tiny main job first -- ``launch/run.sh`` as the quick start runs it (the ranks
it chooses from the host), with overrides that make it take seconds -- and then the shell blocks (```bash / ```sh) of each document run in one bash
process per document, in order, with ``set -euo pipefail``, from the copy's top directory,
so a block may use what an earlier block of the same document set (``$RUN``); each
document starts from its own copy of the state right after the main job.

A block that cannot run here says why, in an HTML comment on the line before it::

    <!-- docs-test: skip (needs 2 hosts) -->

The test fails on a block without a mark that fails, and on a mark without a reason; it
prints how many blocks ran and which were skipped, with the reasons.

Environment of the copy: the project's venv (``DIST_TRIPLET_VENV``, as the launch scripts
honour it) with the copy first on ``PYTHONPATH``, because that venv's editable install
points at another checkout; one OpenMP thread per process.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from _hvd import ROOT, require_horovod

SHELLS = ("bash", "sh", "shell")
MARK = re.compile(r"<!--\s*docs-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
# The tiny main job: the main config on a slice of Fashion-MNIST, 1 epoch.
TINY = ["data.limit_train=2000", "data.limit_test=1000", "train.epochs=1",
        "train.progress=false", "eval.projector_points=200"]


@dataclass
class Block:
    path: str          # relative to the project
    line: int          # 1-based line of the opening fence
    code: str
    skip: str | None   # the reason, or None when the block runs


def doc_files(root: str = ROOT) -> list:
    return ["README.md"] + sorted(os.path.relpath(p, root)
                                  for p in glob.glob(os.path.join(root, "docs", "*.md")))


def shell_blocks(path: str, root: str = ROOT) -> list:
    """The shell blocks of ``path``, each with the skip reason of a mark right above it
    (blank lines between are allowed). Raises ValueError for a mark without a reason."""
    lines = open(os.path.join(root, path), encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if fence.group(1) in SHELLS:
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = MARK.search(lines[j]) if j >= 0 else None
            if mark and not (mark.group("reason") or "").strip():
                raise ValueError(f"{path}:{j + 1}: a docs-test skip mark needs a reason: "
                                 "<!-- docs-test: skip (why) -->")
            out.append(Block(path, i + 1, "\n".join(lines[i + 1:end]),
                             mark.group("reason").strip() if mark else None))
        i = end + 1
    return out


def test_skip_marks_are_read_with_their_reasons(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "text\n```bash\necho one\n```\n<!-- docs-test: skip (needs 2 hosts) -->\n\n"
        "```sh\nssh host2\n```\n```\nnot shell\n```\n```json\n{}\n```\n")
    blocks = shell_blocks("README.md", str(tmp_path))
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "echo one", None), (7, "ssh host2", "needs 2 hosts")]
    (tmp_path / "docs" / "x.md").write_text("<!-- docs-test: skip -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="needs a reason"):
        shell_blocks("docs/x.md", str(tmp_path))


def fresh_copy(dest: str) -> None:
    """The files a clone would hold (tracked or untracked-but-not-ignored, as in the
    working tree), copied to ``dest``."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def test_every_docs_shell_block_runs_on_a_fresh_copy(tmp_path, capsys):
    require_horovod()
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed (launch/setup.sh installs it)")
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")) and \
            not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: cannot tell which files a clone holds")
    clone = str(tmp_path / "clone")
    fresh_copy(clone)
    env = dict(os.environ, DIST_TRIPLET_VENV=sys.prefix, OMP_NUM_THREADS="1",
               PYTHONPATH=clone, PATH=os.path.join(sys.prefix, "bin") + os.pathsep
               + os.environ.get("PATH", ""))
    env.pop("DIST_TRIPLET_FAULT", None)
    env.pop("NP", None)
    job = subprocess.run(["bash", "launch/run.sh", *TINY], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "[run.sh] " in job.stderr, job.stderr[-3000:]   # what it chose, and why
    assert glob.glob(os.path.join(clone, "runs", "fashion_mnist-*", "model"))

    ran, skipped, failures = [], [], []
    for n, path in enumerate(doc_files(clone)):
        blocks = shell_blocks(path, clone)
        skipped += [b for b in blocks if b.skip]
        todo = [b for b in blocks if not b.skip]
        if not todo:
            continue
        # Each document on its own copy of the state after the main job: a reader may open
        # any of them first (README's and search.md's first commands both build $RUN/index).
        here = str(tmp_path / f"doc{n}")
        shutil.copytree(clone, here, symlinks=True)
        # One script per document; a marker before each block tells which one failed.
        script = "set -euo pipefail\n" + "".join(
            f"echo '@@docs-test {b.path}:{b.line}' >&2\n{b.code}\n" for b in todo)
        proc = subprocess.run(["bash", "-c", script], cwd=here, env=dict(env, PYTHONPATH=here),
                              capture_output=True, text=True, timeout=600)
        started = re.findall(r"@@docs-test (\S+)", proc.stderr)
        if proc.returncode != 0:
            failures.append(f"{started[-1] if started else path} (exit {proc.returncode}):\n"
                            + proc.stderr[-2500:])
            ran += [b for b in todo if f"{b.path}:{b.line}" in started[:-1]]
        else:
            ran += todo
    with capsys.disabled():
        print(f"\ndocs code blocks: {len(ran)} ran, {len(skipped)} skipped")
        for b in skipped:
            print(f"  skipped {b.path}:{b.line}: {b.skip}")
    assert not failures, "\n\n".join(failures)
    assert ran, "no docs block ran"
