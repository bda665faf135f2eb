"""Tests for sky_jupyter.notebook.capture: which names a %%sky cell reads (ships) and binds (pulls back).

The table pins the cases a naive AST walk gets wrong; the generated programs check the one property the
client relies on: a cell run with only its claimed reads behaves exactly as it does in a full namespace.
"""

from __future__ import annotations

import builtins
import random
import symtable
from dataclasses import dataclass

import pytest

from sky_jupyter.errors import SkyError
from sky_jupyter.notebook.capture import CellNames, CellSyntaxError, ImportRef, analyze, transform_cell

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

# Names the notebook namespace never holds unless the user shadows them; the caller filters them out.
NOT_USER = frozenset(dir(builtins)) | {"get_ipython"}


@dataclass(frozen=True)
class Case:
    id: str
    source: str
    reads: frozenset[str]
    binds: frozenset[str] = frozenset()
    deletes: frozenset[str] = frozenset()
    dynamic: bool = False


def case(id: str, source: str, reads: str = "", binds: str = "", deletes: str = "",
         dynamic: bool = False) -> Case:
    return Case(id, source, frozenset(reads.split()), frozenset(binds.split()), frozenset(deletes.split()),
                dynamic)


CASES = [
    # assignment, augmented assignment, del
    case("self-increment", "x = x + 1", "x", "x"),
    case("augassign", "x += 1", "x", "x"),
    case("bound-then-read", "y = 1\nprint(y)", "", "y"),
    case("del-needs-name", "del z", "z", "", "z"),
    case("bind-then-del", "z = 1\ndel z", "", "z", "z"),
    case("read-after-del", "z = 1\ndel z\nprint(z)", "z", "z", "z"),
    case("unpacking", "a, *b = c", "c", "a b"),
    case("attribute-store", "obj.attr = v", "obj v"),
    case("subscript-augassign", "d[k] += 1", "d k"),
    case("annotated", "x: int = 5\ny: Foo", "Foo", "x"),
    case("del-mixed", "del a, b[0]", "a b", "", "a"),
    # branches
    case("if-one-branch", "if c:\n    a = 1\nprint(a)", "c a", "a"),
    case("if-both-branches", "if c:\n    a = 1\nelse:\n    a = 2\nprint(a)", "c", "a"),
    case("elif-without-else", "if c:\n    a = 1\nelif d:\n    a = 2\nprint(a)", "c d a", "a"),
    case("ifexp-walrus", "x = (y := 1) if c else 2\nprint(y)", "c y", "x y"),
    case("boolop-walrus", "c and (b := 1)\nprint(b)", "c b", "b"),
    case("walrus-in-test", "if (n := len(s)) > 3:\n    pass\nprint(n)", "s", "n"),
    # loops: the body may run zero times
    case("loop-reads-before-assign", "for i in r:\n    total = total + i", "r total", "i total"),
    case("loop-after-init", "total = 0\nfor i in r:\n    total = total + i", "r", "total i"),
    case("loop-names-after", "for i in r:\n    last = i\nprint(last, i)", "r last i", "i last"),
    case("for-else-no-break", "for i in r:\n    pass\nelse:\n    done = 1\nprint(done)", "r", "i done"),
    case("for-else-break", "for i in r:\n    if i:\n        break\nelse:\n    done = 1\nprint(done)",
         "r done", "i done"),
    case("while-body", "while n > 0:\n    acc = n\n    n -= 1\nprint(acc)", "n acc", "acc n"),
    case("while-true-break", "while True:\n    v = source()\n    if v:\n        break\nprint(v)", "source", "v"),
    case("continue-skips", "for i in r:\n    if i:\n        continue\n    seen = i\nprint(seen)",
         "r seen", "i seen"),
    case("def-from-previous-iteration", "for i in r:\n    if i:\n        f()\n    def f():\n        return g\ng = 1",
         "r f g", "i f g"),
    case("del-in-loop", "x = 1\nfor i in r:\n    print(x)\n    del x", "r x", "x i", "x"),
    # try / except / else / finally
    case("try-import-fallback", "try:\n    import ujson as json\nexcept ImportError:\n    import json\n"
         "json.dumps(1)", "", "json"),
    case("try-bind-maybe", "try:\n    v = f()\nexcept E:\n    pass\nprint(v)", "f E v", "v"),
    case("except-as-unbinds", "try:\n    v = f()\nexcept E as e:\n    msg = str(e)\nprint(e)",
         "f E e", "v e msg", "e"),
    case("try-finally", "try:\n    v = 1\nfinally:\n    w = 2\nprint(v, w)", "", "v w"),
    case("try-else", "try:\n    v = f()\nexcept E:\n    v = None\nelse:\n    ok = True\nprint(v, ok)",
         "f E ok", "v ok"),
    case("finally-reads", "try:\n    pass\nfinally:\n    print(q)", "q"),
    case("handler-after-del", "x = 1\ntry:\n    del x\n    f()\nexcept E:\n    print(x)", "f E x", "x", "x"),
    # global statements
    case("global-top-level-noop", "global g\ng = 1\nprint(g)", "", "g"),
    case("global-write-in-def", "def f():\n    global g\n    g = 1\n    return g", "", "f g"),
    case("global-read-in-def", "def f():\n    global g\n    g = g + 1", "g", "f g"),
    case("global-augassign-in-def", "def f():\n    global counter\n    counter += 1", "counter", "f counter"),
    # functions and lambdas: free names are looked up when they run
    case("def-free-names", "def f():\n    return helper(x)", "helper x", "f"),
    case("def-called-before-bind", "def f():\n    return g\nf()\ng = 1", "g", "f g"),
    case("def-called-after-bind", "def f():\n    return g\ng = 1\nf()", "", "f g"),
    case("def-never-called-bound-later", "def f():\n    return g\ng = 1", "", "f g"),
    case("def-bound-in-branch-only", "def f():\n    return g\nif c:\n    g = 1", "c g", "f g"),
    case("def-defaults-now", "def f(a, b=default, *args, c=kw, **kw2):\n    return a + b + c + z",
         "default kw z", "f"),
    case("decorator-runs-now", "@register(name)\ndef f():\n    return later\nlater = 1",
         "register name later", "f later"),
    case("nested-function", "def outer():\n    a = 1\n    def inner():\n        return a + b\n    return inner",
         "b", "outer"),
    case("locals-only", "def f(p):\n    x = p\n    return x", "", "f"),
    case("lambda-assigned", "f = lambda: k\nk = 1\nf()", "", "f k"),
    case("lambda-passed-now", "print(lambda: k)\nk = 1", "k", "k"),
    case("call-chain", "def f():\n    return h()\ndef h():\n    return g\nf()\ng = 1", "g", "f h g"),
    case("call-chain-ok", "def f():\n    return h()\ndef h():\n    return g\ng = 1\nf()", "", "f h g"),
    case("method-of-later-class", "class A:\n    def m(self):\n        return B()\nclass B:\n    pass\nA().m()",
         "", "A B"),
    # comprehensions have their own scope
    case("comprehension", "[i for i in data]", "data"),
    case("comprehension-var-no-leak", "[i for i in data]\nprint(i)", "data i"),
    case("comprehension-walrus", "[y := i for i in data]\nprint(y)", "data y", "y"),
    case("dictcomp", "{k: v for k, v in items.items() if v > limit}", "items limit"),
    case("nested-comprehension", "[[a * b for b in row] for row in matrix]", "matrix a"),
    case("generator", "gen = (x * k for x in xs)", "xs k", "gen"),
    case("comprehension-in-def", "def f():\n    n = 1\n    return [n + i for i in data]", "data", "f"),
    # class bodies run now, in their own namespace
    case("class-body-order", "class A:\n    x = 1\n    y = x + 1", "", "A"),
    case("class-body-read-first", "class A:\n    y = x + 1\n    x = 1", "x", "A"),
    case("class-bases-methods", "class A(Base, metaclass=Meta):\n    def m(self):\n        return helper()\n"
         "A().m()", "Base Meta helper", "A"),
    case("class-var-not-in-comprehension", "class A:\n    k = 2\n    ys = [i * k for i in range(3)]", "k", "A"),
    case("class-body-global", "class A:\n    global g\n    g = 1\nprint(g)", "", "A g"),
    case("walrus-in-def-comprehension", "def f():\n    [m := i for i in data]\n    return m", "data", "f"),
    case("class-reads-module-binding", "x = 1\nclass A:\n    x = x + 1", "", "x A"),
    # match
    case("match-captures",
         "match cmd:\n    case [name, *rest]:\n        pass\n    case {'k': v, **others}:\n        pass\n"
         "    case Point(x=px) if px > limit:\n        pass\n    case _:\n        pass\nprint(name)",
         "cmd Point limit name", "name rest v others px"),
    case("match-irrefutable", "match v:\n    case 1:\n        r = 'a'\n    case other:\n        r = other\nprint(r)",
         "v", "r other"),
    case("match-value-pattern", "match v:\n    case Color.RED:\n        r = 1\nprint(r)", "v Color r", "r"),
    # with
    case("with-as", "with open(f) as fh:\n    data = fh.read()\nprint(data)", "f", "fh data"),
    case("with-suppress", "with suppress(KeyError):\n    v = d[k]\nprint(v)", "suppress d k v", "v"),
    # f-strings and async at top level (IPython allows await in cells)
    case("fstring", "print(f'{a!r} {b:>{width}}')", "a b width"),
    case("await", "result = await fetch(url)", "fetch url", "result"),
    case("async-with-for", "async with lock:\n    n = 1\nasync for item in stream:\n    last = item",
         "lock stream", "n item last"),
    # IPython syntax
    case("line-magic", "%matplotlib inline", ""),
    case("timeit-reads", "%timeit x + 1", "x"),
    case("timeit-options-locals", "%timeit -n 10 -r 3 y = a + b", "a b"),
    case("time-binds", "%time r = f(x)", "f x", "r"),
    case("shell-dollar", "!ls $d", "d"),
    case("shell-capture", "files = !ls {folder}/*.csv", "folder", "files"),
    case("shell-format-spec", "!echo {value:>{width}}", "value width"),
    case("shell-bound-before", "d = '/tmp'\n!ls $d", "", "d"),
    case("pip", "%pip install numpy", ""),
    case("pinfo", "obj?", "obj"),
    case("cell-magic-capture", "%%capture out\nprint(x)", "x", "out"),
    case("timeit-stores-result", "%timeit -o -v timing f(x)", "f x", "timing"),
    case("xdel", "%xdel big", "big", "", "big"),
    case("vars-of-object", "print(vars(obj))", "obj"),
    case("vars-of-namespace", "print(vars())", "", "", dynamic=True),
    case("run-is-dynamic", "%run script.py", "", "", dynamic=True),
    case("exec-is-dynamic", "exec(code)", "code", "", dynamic=True),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_cell_names(c: Case) -> None:
    names = analyze(c.source)
    assert names.reads - NOT_USER == c.reads
    assert names.binds == c.binds
    assert names.deletes == c.deletes
    assert names.dynamic == c.dynamic


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_builtins_are_reported_unless_shadowed() -> None:
    # reads is a superset; the caller intersects it with the notebook namespace.
    assert {"print", "len", "x"} <= analyze("print(len(x))").reads
    assert analyze("list = [1]\nlist.append(x)").reads == {"x"}
    assert "get_ipython" in analyze("%matplotlib inline").reads


def test_imports_are_recorded() -> None:
    names = analyze("import numpy as np\nfrom os import path as p\nimport os.path\nfrom . import sibling\n"
                    "from x import *")
    assert names.binds == {"np", "p", "os", "sibling"}
    assert names.imports["np"] == ImportRef("numpy", None, 0, "np")
    assert names.imports["np"].statement == "import numpy as np"
    assert names.imports["p"].statement == "from os import path as p"
    assert names.imports["p"].target == "os.path"
    assert names.imports["os"].statement == "import os.path"
    assert names.imports["os"].target == "os"
    assert names.imports["sibling"].statement == "from . import sibling"
    assert names.star_import
    assert names.star_imports == (ImportRef("x", "*"),)
    assert not analyze("import json").star_import


def test_rebinding_forgets_import() -> None:
    assert "np" not in analyze("import numpy as np\nnp = 3").imports
    assert "json" not in analyze("import json\ndel json").imports


def test_empty_cell() -> None:
    assert analyze("") == analyze("# only a comment\n") == CellNames(frozenset(), frozenset(), frozenset(), {})


def test_too_deep_for_the_walk_falls_back_to_a_superset() -> None:
    names = analyze("total = " + " + ".join(f"v{i}" for i in range(1500)) + "\nv0 = 1\n!ls $d")
    assert {f"v{i}" for i in range(1500)} | {"d"} <= names.reads
    assert {"total", "v0"} <= names.binds


def test_cell_names_is_frozen() -> None:
    names = analyze("x = 1")
    assert isinstance(names, CellNames)
    with pytest.raises(AttributeError):
        names.reads = frozenset()  # type: ignore[misc]


@pytest.mark.parametrize(("source", "lineno"), [
    ("x = = 1", 1),
    ("a = 1\nb = 2\nc = (\n", 3),
    ("y = 1\nbreak", 2),
    ("def f():\n    nonlocal q", 2),
])
def test_syntax_error(source: str, lineno: int) -> None:
    with pytest.raises(CellSyntaxError) as info:
        analyze(source)
    err = info.value
    assert isinstance(err, SyntaxError) and isinstance(err, SkyError)
    assert err.lineno == lineno
    message = str(err)
    assert "\n" not in message and f"line {lineno}" in message


def test_transform_cell_makes_magics_python() -> None:
    out = transform_cell("%timeit x\n!ls $d\ny = !cmd\n")
    assert "get_ipython().run_line_magic('timeit', 'x')" in out
    assert "get_ipython().system('ls $d')" in out
    assert "y = get_ipython().getoutput('cmd')" in out


# -- symtable cross-check: free names of functions, as the compiler classifies them

SYMTABLE_CELLS = [
    "def f():\n    return g + h(x)",
    "def f():\n    def inner():\n        return a + b\n    a = 1\n    return inner",
    "def f(data):\n    return [i * k for i in data if i > lim]",
    "def f():\n    global g\n    g = 1",
    "def f():\n    return lambda y: y + z",
    "def f():\n    class C:\n        w = q\n        def m(self):\n            return w2\n    return C",
    "def f():\n    return f() + g()\ndef g():\n    return {k: v for k, v in pairs}",
    "def f(a, *, b):\n    nonlocal_like = [a for a in b]\n    return nonlocal_like, a, outer_name",
]


def symtable_reads(source: str) -> set[str]:
    """Globals referenced inside nested scopes, minus what the module binds: the oracle for def-only cells."""
    top = symtable.symtable(source, "<cell>", "exec")
    found: set[str] = set()
    stack = list(top.get_children())
    while stack:
        table = stack.pop()
        found |= {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
        stack.extend(table.get_children())
    return found - {s.get_name() for s in top.get_symbols() if s.is_assigned()}


@pytest.mark.parametrize("source", SYMTABLE_CELLS)
def test_free_names_match_symtable(source: str) -> None:
    assert analyze(source).reads == symtable_reads(source)


# -- property: only the claimed reads are needed

POOL = ["a", "b", "c", "d", "e"]


class ProgramGenerator:
    """Random small cells over a few int names: branches, loops, try, defs, classes, comprehensions, match."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.functions = 0

    def name(self) -> str:
        return self.rng.choice(POOL)

    def expr(self, depth: int = 0, walrus: bool = True) -> str:
        r = self.rng.random()
        if depth > 1 or r < 0.35:
            return self.name() if self.rng.random() < 0.75 else str(self.rng.randint(0, 3))
        if r < 0.55:
            return f"{self.expr(depth + 1, walrus)} + {self.expr(depth + 1, walrus)}"
        if r < 0.65:
            return f"({self.expr(depth + 1, walrus)} if {self.name()} else {self.expr(depth + 1, walrus)})"
        if r < 0.72:
            return f"({self.name()} and {self.expr(depth + 1, walrus)})"
        if r < 0.80 and walrus:
            return f"({self.name()} := {self.expr(depth + 1, walrus)})"
        if r < 0.88:
            return f"(lambda: {self.expr(depth + 1, False)})()"
        if walrus:
            return f"sum([{self.expr(depth + 1, walrus)} + _j for _j in range(2)])"
        return self.name()

    def block(self, indent: str, depth: int) -> list[str]:
        return [line for _ in range(self.rng.randint(1, 3)) for line in self.stmt(indent, depth)]

    def stmt(self, indent: str, depth: int) -> list[str]:
        r = self.rng.random()
        i2 = indent + "    "
        if depth >= 2 or r < 0.30:
            return [indent + self.simple()]
        if r < 0.42:
            lines = [f"{indent}if {self.rng.choice(['True', 'False', self.name()])}:", *self.block(i2, depth + 1)]
            if self.rng.random() < 0.5:
                lines += [f"{indent}else:", *self.block(i2, depth + 1)]
            return lines
        if r < 0.52:
            lines = [f"{indent}for _i in range({self.rng.randint(0, 2)}):", *self.block(i2, depth + 1)]
            if self.rng.random() < 0.3:
                lines += [f"{i2}if _i:", f"{i2}    break"]
            if self.rng.random() < 0.3:
                lines += [f"{indent}else:", *self.block(i2, depth + 1)]
            return lines
        if r < 0.57:
            n = self.name()
            return [f"{indent}while {n} < 3:", f"{i2}{n} = {n} + 1"]
        if r < 0.67:
            lines = [f"{indent}try:", *self.block(i2, depth + 1)]
            if self.rng.random() < 0.5:
                lines.insert(self.rng.choice([1, len(lines)]), f"{i2}1 // 0")  # not inside a nested block
            lines += [f"{indent}except ZeroDivisionError{' as ' + self.name() if self.rng.random() < 0.3 else ''}:",
                      *self.block(i2, depth + 1)]
            if self.rng.random() < 0.3:
                lines += [f"{indent}else:", *self.block(i2, depth + 1)]
            if self.rng.random() < 0.3:
                lines += [f"{indent}finally:", *self.block(i2, depth + 1)]
            return lines
        if r < 0.77 and depth == 0:
            fn = f"f{self.rng.randint(0, 1)}"
            body = [f"{i2}return {self.expr(1, False)}"]
            if self.rng.random() < 0.4:
                g = self.name()
                body = [f"{i2}global {g}", f"{i2}{g} = {self.expr(1, False)}"] + body
            if fn == "f1" and self.rng.random() < 0.5:
                body[-1] += " + f0()"
            return [f"{indent}def {fn}():", *body]
        if r < 0.84 and depth == 0:
            return [f"{indent}{self.name()} = f{self.rng.randint(0, 1)}()"]
        if r < 0.90 and depth == 0:
            t = self.name()
            return [f"{indent}class C0:", f"{i2}{t} = {self.rng.choice([self.name(), '1'])}",
                    f"{i2}{self.name()} = {t} + 1", f"{i2}def m(self):", f"{i2}    return {self.name()}",
                    f"{indent}{self.name()} = C0().m()"]
        lines = [f"{indent}match {self.name()}:", f"{i2}case 1:", *self.block(i2 + "    ", depth + 1)]
        if self.rng.random() < 0.5:
            lines += [f"{i2}case {self.name()}:", *self.block(i2 + "    ", depth + 1)]
        return lines

    def simple(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return f"{self.name()} = {self.expr()}"
        if r < 0.75:
            return f"{self.name()} += {self.expr()}"
        if r < 0.9:
            return f"del {self.name()}"
        return f"{self.expr()}"

    def program(self) -> str:
        return "\n".join(line for _ in range(self.rng.randint(1, 6)) for line in self.stmt("", 0)) + "\n"


def dummy(name: str) -> int:
    return 10 + sum(map(ord, name)) % 7  # >= 3, so generated while loops do not run


def run(source: str, namespace: dict[str, object]) -> tuple[str | None, dict[str, object]]:
    ns = dict(namespace)
    try:
        exec(compile(source, "<generated>", "exec"), ns)
    except Exception as err:  # noqa: BLE001 - the property compares outcomes, whatever they are
        outcome: str | None = f"{type(err).__name__}: {err}"
    else:
        outcome = None
    return outcome, {k: comparable(v) for k, v in ns.items() if not k.startswith("__")}


def comparable(value: object) -> object:
    """Values of two runs compared across namespaces: ints by value, exceptions by text, the rest by type."""
    if isinstance(value, int):
        return value
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    return type(value).__name__


def check_program(source: str) -> None:
    names = analyze(source)
    everything = {n: dummy(n) for n in [*POOL, "f0", "f1", "C0"]}
    shipped = {n: v for n, v in everything.items() if n in names.reads}
    full_outcome, full_after = run(source, everything)
    outcome, after = run(source, shipped)
    assert outcome == full_outcome, f"{source}\nreads={sorted(names.reads)}"
    for key, value in after.items():
        assert full_after.get(key) == value, f"{source}\n{key}"
    changed = {k for k, v in after.items() if k not in shipped or shipped[k] != v}
    assert changed <= names.binds, f"{source}\nbinds={sorted(names.binds)}"
    assert set(shipped) - set(after) <= names.deletes, f"{source}\ndeletes={sorted(names.deletes)}"


def test_generated_programs_need_only_their_reads() -> None:
    for seed in range(400):
        check_program(ProgramGenerator(seed).program())


def test_straight_line_reads_are_exact() -> None:
    """Without branches every claimed read really happens: dropping any one of them is a NameError."""
    rng = random.Random(7)
    for _ in range(150):
        lines = []
        for _ in range(rng.randint(1, 5)):
            target, r = rng.choice(POOL), rng.random()
            operands = " + ".join(rng.choice(POOL) for _ in range(rng.randint(1, 3)))
            lines.append(f"{target} = {operands}" if r < 0.5 else f"{target} += {operands}" if r < 0.8
                         else f"del {target}")
        source = "\n".join(lines)
        reads = analyze(source).reads
        full = {n: dummy(n) for n in reads}
        if run(source, full)[0] is not None:
            continue  # fails even with everything shipped (e.g. del twice)
        for name in reads:
            outcome, _ = run(source, {k: v for k, v in full.items() if k != name})
            assert outcome is not None and outcome.startswith("NameError"), f"{source}\n{name}"
