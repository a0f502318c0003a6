"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does with Quarto, which can't be installed here).

Markdown cells are copied; code cells become ```python blocks (without `#|` directives) followed by their
text output; cells marked `#| hide` are left out. `--check` exits 1 when README.md differs from the notebook.
"""
import sys
from pathlib import Path
import nbformat

root = Path(__file__).resolve().parent.parent
HEADER = "<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, then run `make sync` -->\n\n"

def _text(output):
    if output.get("output_type") == "stream" and output.get("name") == "stdout": return output["text"]
    data = output.get("data", {})
    return data.get("text/plain")

def render(nb_path=root/"nbs"/"index.ipynb"):
    parts = []
    for cell in nbformat.read(nb_path, as_version=4).cells:
        lines = cell.source.splitlines()
        directives = [l for l in lines if l.startswith("#|")]
        if any(d.split()[1:2] == ["hide"] for d in directives): continue
        if cell.cell_type == "markdown": parts.append(cell.source.strip()); continue
        if cell.cell_type != "code": continue
        code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
        if code: parts.append(f"```python\n{code}\n```")
        out = "".join(t for t in map(_text, cell.get("outputs", [])) if t).rstrip()
        if out: parts.append(f"```\n{out}\n```")
    return HEADER + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    text, readme = render(), root/"README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is not what nbs/index.ipynb generates: run `make sync` and commit")
        print("README.md matches nbs/index.ipynb")
    else: readme.write_text(text)
