"""The reader's path of a short plain RL run: every function of this project that
`python rl.py --schedule linear --L 1 ...` calls (vae prefixes, GRPO, one process, no resampling,
no FSDP) on a tiny world, found by tracing, with its lines. Two figures:

- the whole run, from the command line (rl.py run as __main__ in a fresh process) to its end:
  each called function's whole body, and rl.py's module level (its lines outside any function
  or class, blank lines left out);
- one step: the functions the second step calls (imports and first-call set-up done) and the
  loop that runs it.

A class whose methods run counts with its field declarations (the lines before its first method).
Lines are counted once per file however many rows hold them (a nested function inside a counted
one). Outside the project (torch, transformers, the standard library) and tests/ and bench/,
nothing counts. No module other than rl is named here, so functions may move between files.

    python bench/reader_path.py          # builds a tiny world in a temporary directory
"""

import ast
import json
import os
import runpy
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
SKIP = ("<module>", "<lambda>", "<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>")   # inside a counted unit


def rl_argv(root, out):
    return [f"{REPO}/rl.py", "--model", f"{root}/model", "--vae", f"{root}/vae", "--data", f"{root}/train.jsonl",
            "--out", f"{root}/{out}", "--schedule", "linear", "--L", "1", "--steps", "3", "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "8", "--save-every", "0"]


def tiny_world(root):
    """A random toy-shaped model, 1-digit additions, and a VAE from train_vae.py's command line."""
    from conftest import run_script, tiny_toy_model
    from toy.task import generate as toy_rows, write_jsonl
    model, _ = tiny_toy_model(os.path.join(root, "tokenizer"), layers=2, std=0.1)
    model.save_pretrained(os.path.join(root, "model"), tokenizer_dir=os.path.join(root, "tokenizer"))
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), os.path.join(root, "train.jsonl"))
    for domain in ("math", "code", "qa"):
        write_jsonl(toy_rows(domain, 12, seed=3), os.path.join(root, f"vae_{domain}.jsonl"))
    run_script("train_vae.py", "--model", f"{root}/model", "--out", f"{root}/vae", "--steps", "5",
               "--latent-dim", "4", "--hidden-dim", "16", "--batch-size", "8",
               "--data", ",".join(f"{d}={root}/vae_{d}.jsonl" for d in ("math", "code", "qa")), threads=1)


def tracer(called):
    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(REPO) and "/tests/" not in name and "/bench/" not in name:
            called.add(frame.f_code)
    return profile


class Source:
    """One file's definitions, by ast: each def and class by its first line (decorators included)."""
    def __init__(self, path):
        self.lines = open(path).read().splitlines()
        tree = ast.parse("\n".join(self.lines))
        self.nodes, self.tree = {}, tree
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                node.first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                self.nodes[node.first] = self.nodes[node.lineno] = node
                for child in ast.iter_child_nodes(node):
                    child.parent = node

    def fields(self, cls):
        """A class's lines up to its first method."""
        methods = [n.first for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        return range(cls.first, min(methods, default=cls.end_lineno + 1))

    def module_level(self):
        defs = {i for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                for i in range(n.first, n.end_lineno + 1)}
        return [i for i, line in enumerate(self.lines, 1) if i not in defs and line.strip()]

    def loop_at(self, lineno):
        """The innermost for-loop holding line `lineno`."""
        loops = [n for n in ast.walk(self.tree) if isinstance(n, (ast.For, ast.AsyncFor))
                 and n.lineno <= lineno <= n.end_lineno]
        return max(loops, key=lambda n: n.lineno)


def units(called, extra=()):
    """[(file, first line, name, [line numbers])] of the called code objects, plus `extra` rows."""
    sources, rows, seen = {}, list(extra), set()
    for code in called:
        if code.co_name in SKIP:
            continue
        source = sources.setdefault(code.co_filename, Source(code.co_filename))
        node, file = source.nodes.get(code.co_firstlineno), os.path.relpath(code.co_filename, REPO)
        if node is None or isinstance(node, ast.ClassDef):            # a class body run at import
            continue
        rows.append((file, node.first, code.co_qualname, list(range(node.first, node.end_lineno + 1))))
        owner = getattr(node, "parent", None)
        if isinstance(owner, ast.ClassDef) and (file, owner.first) not in seen:
            seen.add((file, owner.first))
            lines = source.fields(owner)
            rows.append((file, owner.first, f"{code.co_qualname.rsplit('.', 1)[0]} (class, fields)", list(lines)))
    return sorted(rows)


def whole_run(root):
    """Run in a fresh process: rl.py from the command line under the tracer; its rows as JSON."""
    called = set()
    sys.argv = rl_argv(root, "rl_whole")
    sys.path[:2] = [REPO]                     # as `python rl.py` has it
    threading.setprofile(tracer(called))
    sys.setprofile(tracer(called))
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    module = ("rl.py", 1, "(module level)", Source(f"{REPO}/rl.py").module_level())
    return units(called, [module])


def one_step(root):
    """The second step of rl.main, traced in this process (rl.progress wrapped)."""
    import torch
    import rl
    called, loop = set(), []

    class TracedSteps:
        def __init__(self, iterable, *args, **kwargs):
            self.iterable = iterable

        def set_postfix(self, **kwargs):
            pass

        def __iter__(self):
            for i, step in enumerate(self.iterable):
                if i == 1:
                    caller = sys._getframe(1)            # the frame whose for-loop runs the steps
                    loop.append((caller.f_code, caller.f_lineno))
                sys.setprofile(tracer(called) if i == 1 else None)
                yield step
            sys.setprofile(None)

    rl.progress = TracedSteps
    torch.manual_seed(0)
    rl.main(rl_argv(root, "rl_step")[1:])
    sys.setprofile(None)
    code, lineno = loop[0]
    node = Source(code.co_filename).loop_at(lineno)
    return units(called, [(os.path.relpath(code.co_filename, REPO), node.lineno, f"{code.co_qualname} (the loop)",
                           list(range(node.lineno, node.end_lineno + 1)))])


def report(title, rows):
    """Print the rows, lines per file and the total; return them as a dict."""
    print(f"== {title}")
    per_file = {}
    for file, start, name, lines in rows:
        print(f"{file}:{start:<5} {name:50s} {len(lines):4d}")
        per_file.setdefault(file, set()).update(lines)
    files = {file: len(lines) for file, lines in sorted(per_file.items())}
    for file, n in files.items():
        print(f"  {file:20s} {n:5d}")
    total = sum(files.values())
    print(f"{title}: {len(rows)} functions and classes in {len(files)} files: {total} lines")
    return {"lines": total, "units": len(rows), "n_files": len(files), "files": files}


def main():
    if sys.argv[1:2] == ["--whole-run"]:                  # the child: rows of the whole run
        root = sys.argv[2]
        json.dump(whole_run(root), open(os.path.join(root, "whole.json"), "w"))
        return
    with tempfile.TemporaryDirectory() as root:
        tiny_world(root)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--whole-run", root], check=True,
                       stdout=subprocess.DEVNULL, cwd=REPO)
        whole = [tuple(r) for r in json.load(open(os.path.join(root, "whole.json")))]
        step = one_step(root)
    figures = {"whole_run": report("whole run", whole), "one_step": report("one step", step)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
