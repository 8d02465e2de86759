"""The README's and docs' relative links lead somewhere: every linked file exists, and every #anchor
is a heading of the page it names, as GitHub makes anchors from headings. Every name that
docs/code_map.md gives is in the code."""
import functools
import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped but - and _, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path):
    """The anchors of a markdown file's headings (not of # lines inside code blocks); a repeated
    heading's anchor gets -1, -2, ... as on GitHub."""
    seen, out, in_code = {}, set(), False
    with open(path) as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#+\s+(.*)", line)
        if m:
            a = anchor(m.group(1))
            out.add(a if a not in seen else f"{a}-{seen[a]}")
            seen[a] = seen.get(a, 0) + 1
    return out


def broken_links(root):
    """'page: link' for each relative link of root's README.md and docs/*.md that leads nowhere."""
    docs = os.path.join(root, "docs")
    pages = [os.path.join(root, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    bad = []
    for page in pages:
        with open(page) as f:
            targets = LINK.findall(f.read())
        for target in targets:
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, name = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(linked) or (name and linked.endswith(".md")
                                              and name not in anchors(linked)):
                bad.append(f"{os.path.relpath(page, root)}: {target}")
    return bad


def test_every_relative_link_and_anchor_resolves():
    assert broken_links(ROOT) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    """The check itself: a missing file, a missing anchor and a repeated heading's second anchor."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Setup, and why\n## Runs\n## Runs\n```\n# not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#setup-and-why) [ok](docs/a.md#runs-1) [bad](docs/a.md#runs-2) "
        "[bad](docs/b.md) [bad](docs/a.md#not-a-heading) [web](https://example.com/x.md#y)\n")
    assert broken_links(str(tmp_path)) == ["README.md: docs/a.md#runs-2", "README.md: docs/b.md",
                                           "README.md: docs/a.md#not-a-heading"]


def missing_names(root):
    """'module.name' for each name in the 'where' column of root's docs/code_map.md that its module
    lacks. In a cell, each ';'-separated part may open with a `file.py`, the module of the plain
    names after it; a name whose first dotted part is a .py file of root names its own module."""
    with open(os.path.join(root, "docs", "code_map.md")) as f:
        cells = [line.split("|")[2] for line in f if line.startswith("| ") and "`" in line]
    missing = []
    for cell in cells:
        for part in cell.split(";"):
            module = None
            for name in re.findall(r"`([^`]+)`", part):
                if name.endswith(".py"):
                    module = name[:-3]
                    continue
                head, _, rest = name.partition(".")
                qualified = rest and os.path.exists(os.path.join(root, head + ".py"))
                owner, attrs = (head, rest) if qualified else (module, name)
                obj = importlib.import_module(owner) if owner else None
                for attr in attrs.split("."):
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"{owner}.{attrs}" if owner else f"{name} (no module named)")
    return missing


def test_every_name_of_the_code_map_is_in_the_code():
    assert missing_names(ROOT) == []


def test_a_name_missing_from_the_code_is_caught(tmp_path, monkeypatch):
    """The check itself: a missing function, a missing attribute of a class, and a name with no
    module."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "code_map_example.py").write_text("def f():\n    pass\nclass C:\n    x = 1\n")
    (tmp_path / "docs" / "code_map.md").write_text(
        "| idea | where |\n|---|---|\n"
        "| a | `code_map_example.py`: `f`, `C.x`, `g`; `code_map_example.C.y`; `f` |\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing_names(str(tmp_path)) == ["code_map_example.g", "code_map_example.C.y",
                                            "f (no module named)"]
