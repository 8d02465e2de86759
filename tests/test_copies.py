"""Code repeated across model files on purpose (each model file holds its whole model) is marked
`# Copied from <file>.<name>` above the copy; this test fails when a marked copy differs from its
source."""

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = re.compile(r"^# Copied from (\w+)\.(\w+)\s*$")


def definitions(filename):
    """({name: source text}, {first line number: name}) of the top-level functions and classes of
    a file, and the file's lines."""
    src = open(os.path.join(ROOT, filename)).read()
    lines = src.splitlines()
    nodes = [n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    # what ast.get_source_segment gives (a top-level definition starts at column 0), from lines
    # split once: get_source_segment splits the whole file again for every definition
    def segment(n):
        last = lines[n.end_lineno - 1].encode()[:n.end_col_offset].decode()
        return "\n".join(lines[n.lineno - 1:n.end_lineno - 1] + [last])
    defs = {n.name: segment(n) for n in nodes}
    starts = {n.lineno: n.name for n in nodes}
    return defs, starts, lines


def marked_copies():
    out = []
    for filename in sorted(f for f in os.listdir(ROOT) if f.endswith(".py")):
        _, starts, lines = definitions(filename)
        for i, line in enumerate(lines, 1):
            m = MARK.match(line)
            if m:
                assert i + 1 in starts, (f"{filename}:{i}: '# Copied from' must sit right above "
                                         "a def or class")
                out.append((filename, starts[i + 1], m.group(1), m.group(2)))
    return out


def test_marked_copies_equal_their_source():
    copies = marked_copies()
    # none found would pass whatever the files hold: pengi.py and salmonn.py mark a dozen
    assert len(copies) >= 2
    for filename, name, source_file, source_name in copies:
        assert name == source_name, (f"{filename}: {name} is marked as a copy of "
                                     f"{source_file}.{source_name}")
        copy = definitions(filename)[0][name]
        source = definitions(source_file + ".py")[0].get(source_name)
        assert source is not None, f"{filename}: {name}: {source_file}.{source_name} not found"
        assert copy == source, f"{filename}: {name} has drifted from {source_file}.{source_name}"


def test_a_drifted_copy_is_caught(tmp_path, monkeypatch):
    """The check itself: of two marked copies, the one that differs by one character fails it."""
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n\ndef g(x):\n    return x * 2\n")
    (tmp_path / "b.py").write_text("# Copied from a.f\ndef f(x):\n    return x + 1\n\n# Copied "
                                   "from a.g\ndef g(x):\n    return x * 3\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    try:
        test_marked_copies_equal_their_source()
    except AssertionError as e:
        assert "b.py: g has drifted from a.g" in str(e)
    else:
        raise AssertionError("a drifted copy passed")
