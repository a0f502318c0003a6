"""Fail when a committed notebook's saved outputs would read badly on the docs site or leak the machine that ran them.

A saved output must not hold: an absolute path, a warning or anything else on stderr, a traceback, a widget without a text fallback or a
text progress bar's stub, a figure saved as its `<Figure size …>` text instead of a PNG, or more than
`MAX_CHARS` characters of text. Usage: `python tools/check_outputs.py [NOTEBOOK ...]` (default: nbs/*.ipynb);
prints one line per problem and exits 1 if there is any.
"""
from __future__ import annotations
import json, re, sys
from pathlib import Path

MAX_CHARS = 6000   # text of one output; longer is a log dump, not something a reader reads
WIDGET = "application/vnd.jupyter.widget-view+json"
RULES = [   # (problem, pattern over an output's text)
    ("absolute path", re.compile(r"(?<![\w.~])/(?:root|home|work|tmp|Users|private|var/folders|opt|mnt)/\S")),
    ("warning", re.compile(r"\b[A-Z]\w*Warning\b|^\s*warnings\.warn\(", re.M)),
    ("traceback", re.compile(r"Traceback \(most recent call last\)")),
    ("progress-bar stub", re.compile(r"\d+/\d+ \[\d\d:\d\d<|[HV]Box\(children=|FloatProgress\(|IntProgress\(")),
]

def output_text(out:dict) -> str:
    "The text a saved output shows outside Jupyter: its stream, or its plain/markdown/html text."
    if out.get("output_type") == "stream": t = out.get("text", "")
    elif out.get("output_type") == "error": return "\n".join(out.get("traceback", [])) or "Traceback (most recent call last)"
    else:
        data = out.get("data", {})
        t = next((data[k] for k in ("text/plain", "text/markdown", "text/html") if k in data), "")
    return "".join(t) if isinstance(t, list) else t

def output_problems(out:dict) -> list[str]:
    "What is wrong with one saved output (empty: nothing)."
    text, data = output_text(out), out.get("data", {})
    found = [name for name, pat in RULES if pat.search(text)]
    if out.get("output_type") == "error" and "traceback" not in found: found.append("traceback")
    if out.get("name") == "stderr" and not found: found.append("stderr output (a log line or a warning)")
    if WIDGET in data and "text/plain" not in data: found.append("widget without a text fallback")
    if "<Figure size" in text and "image/png" not in data: found.append("figure saved as text, not PNG")
    if len(text) > MAX_CHARS: found.append(f"long output: {len(text):,} characters of text (limit {MAX_CHARS:,})")
    return found

def notebook_problems(path:str|Path) -> list[str]:
    "One line per problem in a notebook's saved outputs: `path, cell N: problem: excerpt`."
    nb = json.loads(Path(path).read_text())
    lines = []
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            for p in output_problems(out):
                excerpt = " ".join(output_text(out).split())[:100]
                lines.append(f"{Path(path).name}, cell {i}: {p}: {excerpt}")
    return lines

def main(paths:list[str]) -> int:
    paths = paths or sorted(str(p) for p in Path(__file__).resolve().parent.parent.glob("nbs/*.ipynb"))
    problems = [line for p in paths for line in notebook_problems(p)]
    print("\n".join(problems) if problems else f"saved outputs clean in {len(paths)} notebooks")
    return 1 if problems else 0

if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
