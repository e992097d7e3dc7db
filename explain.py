"""One-line explanations of bad input, off the reading path: common.py and data.py check what they read with a short
condition and import this module only when a check fails, to say in one line what is wrong and what to do (hf.py
does the same for checkpoints, tokenizers and VAE directories)."""

import json
from pathlib import Path

from common import UserError, one_line
from data import GRADING_KINDS, DataError, _adapt_generic, grading_kind_for

def bad_json(path, what, found):   # common.read_json found `found`: the error it raised, or a value not an object
    if isinstance(found, FileNotFoundError):
        return UserError(f"{what} {path}: no such file")
    if isinstance(found, (ValueError, OSError)):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return UserError(f"{what} {path} is corrupt or cut short, or cannot be read ({one_line(found)}); "
                         "restore it, or start again without it")
    return UserError(f"{what} {path}: expected a JSON object, found {type(found).__name__}")

def bad_rows(source, domain, rows=None):
    """Why data.load_rows has no rows to give: the first line or row of `source` it refuses, in the order it reads
    them (`rows`: a hub split's; a file is read again, line by line), else that there are none."""
    for where, row in _file_rows(source) if rows is None else rows:
        if problem := _row_problem({**row, "domain": domain or row.get("domain")}, source):
            return DataError(f"{where}: {problem}")
    return DataError(f"{source}: no rows (empty file or split)")

def _file_rows(path):   # (where, row) pairs of a JSON-lines file; the first line that is not a JSON object raises
    try:
        lines = Path(path).read_bytes().split(b"\n")  # decoded line by line: a bad byte is reported with its line
    except OSError as e:        # missing, a directory, not readable
        raise DataError(f"{path}: {e.strerror.lower()}. Pass a JSON-lines file (one {{\"problem\": ...}} "
                        "object per line) or a Hugging Face dataset id such as openai/gsm8k.") from None
    for lineno, raw in enumerate(lines, 1):
        try:
            if not (line := raw.decode("utf-8")).strip():
                continue
            row = json.loads(line)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                            f"byte {e.start + 1} of the line); save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                            "expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{lineno}", _adapt_generic(row)

def _row_problem(row, source):   # the first field of a row that data.row_ok refuses, and why (None: none)
    if row["problem"] is None:
        return "row has no 'problem' field (a non-empty string; 'question' and 'query' are accepted too)"
    if not isinstance(row["problem"], str) or not row["problem"].strip():
        return f"'problem' is {_describe(row['problem'])}; expected a non-empty string"
    for key in ("answer", "solution"):  # text the graders and tokenizers read, or absent
        if row[key] is not None and not isinstance(row[key], str):
            return f"{key!r} is {_describe(row[key])}; expected a string{' or a number' * (key == 'answer')}, or null"
    if not row["domain"]:
        return ("row has no 'domain' field; add one to each row or give the domain in the data spec, "
                f"e.g. math={source}")
    if not isinstance(row["domain"], str):
        return f"'domain' is {_describe(row['domain'])}; expected a string"
    if (kind := row.get("grading_kind") or grading_kind_for(row.get("source") or source)) not in GRADING_KINDS:
        return f"'grading_kind' is {kind!r}; known: {', '.join(GRADING_KINDS)}"

def _describe(value):              # 'a list', 'an int', 'an empty string': what a field holds
    name = "empty string" if isinstance(value, str) and not value.strip() else type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
