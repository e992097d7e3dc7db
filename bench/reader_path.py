"""The reader's path of one plain RL step: every function of this project that one step of rl.py
calls (linear schedule, vae prefixes, GRPO, one process, no resampling, no FSDP), found by tracing
the step, with its lines. A record class whose methods run counts with its field declarations.
Outside the project (torch, transformers, the standard library) nothing counts.

    python bench/reader_path.py          # builds a tiny world in a temporary directory
"""

import inspect
import json
import os
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import rl  # noqa: E402


def tiny_world(root):
    """A random toy-shaped model, 1-digit additions and an untrained VAE for it."""
    from conftest import tiny_toy_model
    from model import PaletteVAE, embedding_fingerprint, save_vae
    from toy.task import generate as toy_rows, write_jsonl
    model, _ = tiny_toy_model(os.path.join(root, "tokenizer"), layers=2, std=0.1)
    model.save_pretrained(os.path.join(root, "model"), tokenizer_dir=os.path.join(root, "tokenizer"))
    write_jsonl(toy_rows("math", 20, seed=1, digits=1), os.path.join(root, "train.jsonl"))
    E = model.embed_tokens.weight.detach()
    vae = PaletteVAE(E.shape[1], latent_dim=4, hidden_dim=16)
    vae.set_statistics(E[:40].reshape(10, 4, -1).mean(1), E)
    save_vae(vae, os.path.join(root, "vae"), {"beta": 0.1, "model": "tiny", "fingerprint": embedding_fingerprint(E)})


def main():
    called = set()

    def profile(frame, event, arg):
        name = frame.f_code.co_filename
        if event == "call" and name.startswith(REPO) and "/tests/" not in name and "/bench/" not in name:
            called.add(frame.f_code)

    class TracedSteps:
        """rl.py's progress bar: the second step (imports and first-call set-up done) is traced."""
        def __init__(self, iterable, *args, **kwargs):
            self.iterable = iterable

        def set_postfix(self, **kwargs):
            pass

        def __iter__(self):
            for i, step in enumerate(self.iterable):
                sys.setprofile(profile if i == 1 else None)
                yield step
            sys.setprofile(None)

    rl.progress = TracedSteps
    with tempfile.TemporaryDirectory() as root:
        tiny_world(root)
        torch.manual_seed(0)
        rl.main(["--model", f"{root}/model", "--vae", f"{root}/vae", "--data", f"{root}/train.jsonl",
                 "--out", f"{root}/rl", "--schedule", "linear", "--L", "1", "--steps", "3",
                 "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
                 "--save-every", "0"])
    sys.setprofile(None)
    rows, seen_classes = [], set()
    for code in called:
        if code.co_name in ("<lambda>", "<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>"):
            continue                         # inside a function already counted
        lines, start = inspect.getsourcelines(code)
        rows.append((os.path.relpath(code.co_filename, REPO), start, code.co_qualname, len(lines)))
        owner = code.co_qualname.rsplit(".", 1)[0] if "." in code.co_qualname else None
        if owner and owner not in seen_classes and "<locals>" not in owner:
            seen_classes.add(owner)
            module = sys.modules[{"rl.py": "rl"}.get(os.path.relpath(code.co_filename, REPO),
                                                      os.path.relpath(code.co_filename, REPO)[:-3].replace("/", "."))]
            cls = getattr(module, owner)
            source, first = inspect.getsourcelines(cls)
            methods = [i for i, line in enumerate(source) if i and line.lstrip().startswith(("def ", "@"))]
            head = methods[0] if methods else len(source)
            rows.append((os.path.relpath(code.co_filename, REPO), first, f"{owner} (class, fields)", head))
    source, first = inspect.getsourcelines(rl.main)          # the loop itself: rl.main's for-loop
    start = next(i for i, line in enumerate(source) if line.strip().startswith("for step in bar"))
    end = next(i for i in range(start + 1, len(source)) if source[i].strip() and not source[i].startswith(" " * 8))
    rows.append(("rl.py", first + start, "main (the loop)", end - start))
    rows.sort()
    total = sum(r[3] for r in rows)
    for file, start, name, n in rows:
        print(f"{file}:{start:<5} {name:45s} {n:4d}")
    files = sorted({r[0] for r in rows})
    print(f"{len(rows)} functions and classes in {len(files)} files ({', '.join(files)}): {total} lines")
    print(json.dumps({"lines": total, "units": len(rows), "files": files}))


if __name__ == "__main__":
    main()
