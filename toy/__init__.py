"""The toy reasoning world: the embedded default task (task.py) and its character-level
tokenizer (tokenizer.py), small enough that the whole pipeline runs on a CPU in minutes; the
premise checks, the exploration comparison and the reports. publish_results, below, is the one
way a report (this package's or real/report.py) writes docs/results/ and the README's headlines."""

import os
import shutil
import subprocess

from common import atomic_write_text
from guard import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def publish_results(name, full, headline, command, pictures=(), repo=REPO):
    """A maintainer's step, never part of a user's run: docs/results/{name}.md gets the full tables,
    the pictures ((source path, file name) pairs) go beside it, and README.md gets the headline
    (between its <!-- {name}:start --> and <!-- {name}:end --> markers), each saying where its
    numbers came from (the command and the commit)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=repo).stdout.strip()
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    source = f"`{command}` at commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}"
    atomic_write_text(os.path.join(repo, "docs", "results", f"{name}.md"),
                      f"<!-- written by {source} -->\n{full.strip()}\n")
    readme, start, end = os.path.join(repo, "README.md"), f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(readme).read()
    if start not in text or end not in text:
        raise UserError(f"{readme} has no {start} ... {end} markers: add them where the headline belongs")
    before, rest = text.split(start, 1)
    atomic_write_text(readme, f"{before}{start}\n{headline.strip()}\n\nFull tables: [docs/results/{name}.md]"
                              f"(docs/results/{name}.md), from {source}.\n{end}{rest.split(end, 1)[1]}")
    for source_path, file_name in pictures:
        shutil.copy(source_path, os.path.join(repo, "docs", "results", file_name))
    print(f"wrote docs/results/{name}.md{', its pictures' if pictures else ''} and the README's headline")
