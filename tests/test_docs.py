"""The README's and docs' relative links lead somewhere: every linked file exists, and every #anchor
is a heading of the page it names, as GitHub makes anchors from headings."""
import functools
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
