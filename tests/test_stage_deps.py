"""Stage dependencies are what the code imports, not what someone remembered to list.

For every stage of dvc.yaml whose command is ``heimdall <verb>`` this computes, statically with
``ast`` (nothing is imported), the set of source files the verb runs:

  * src/heimdall/cli.py itself, its module-level ``heimdall`` imports, the imports inside ``main()``
    (it runs before every verb: it pins the CPU numerics) and inside the verb's handler (``set_defaults(func=_cmd_...)`` in build_parser) and inside any cli.py function
    that handler calls. Other verbs' handlers do not count, nor does ``heimdall.db.cli`` (build_parser
    imports it for every verb, but it only registers the ``db`` verbs' arguments; its handlers' imports
    never run for a pipeline stage);
  * then, transitively, every ``heimdall`` module those import, at any depth in the module (function-level
    imports included: they run when the stage takes that path), ``from heimdall import geo`` style
    submodule imports, relative imports, and the ``__init__.py`` of every package on the way. Imports under
    ``if TYPE_CHECKING:`` are not followed (they never run).

cli.py, src/heimdall/__init__.py and errors.py are in every closure and are required in every stage's deps
like any other file: the handler in cli.py decides what a stage is given (export-onnx's params hash and
options are computed there), errors.py and the package ``__init__`` run on every verb. The price is that an
edit to cli.py reruns every stage; the remedy is to keep handlers thin, not to leave cli.py out.
Non-Python package data (migrations/*.sql) is not derived from imports and is not checked.

The tests:
  * test_stage_deps_cover_imports - each stage's deps cover its import closure (a folder dep covers all under it);
  * test_stage_code_deps_are_imported - each code dep under src/ is actually used (no stale deps);
  * test_stages_are_imported_only_by_cli - nothing but cli.py imports from heimdall.stages;
  * test_no_source_file_over_400_lines;
  * test_editing_a_module_marks_exactly_its_importers (slow) - `dvc status` in a copy of the repository,
    after appending a comment to a module, reports a changed dep in exactly the stages whose closure has it.

``python tests/test_stage_deps.py`` prints the complete code deps of every stage, ready to paste into dvc.yaml.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"
PKG = "heimdall"
PKG_DIR = SRC / PKG
CLI = PKG_DIR / "cli.py"
STAGES_DIR = PKG_DIR / "stages"
MAX_LINES = 400


# ----------------------------------------------------------------------------------------------
# modules <-> files
# ----------------------------------------------------------------------------------------------

def rel(path: Path) -> str:
    """Repository-relative posix path, the way dvc.yaml spells deps."""
    return path.resolve().relative_to(REPO_ROOT).as_posix()


def module_file(module: str) -> Path | None:
    """The file that defines ``module`` (a package's __init__.py), or None when there is none under src/."""
    base = SRC.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def module_name(path: Path) -> str:
    parts = list(path.resolve().relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def files_executed_by_import(module: str) -> list[Path]:
    """Importing a.b.c runs a/__init__.py, a/b/__init__.py and a/b/c.py."""
    parts = module.split(".")
    files = (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return [f for f in files if f is not None]


def _ours(module: str | None) -> bool:
    return bool(module) and (module == PKG or module.startswith(PKG + "."))


# ----------------------------------------------------------------------------------------------
# imports of a module, from its AST
# ----------------------------------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, *, skip_type_checking: bool = True, skip_functions: bool = False):
    """ast.walk in source order that can skip `if TYPE_CHECKING:` bodies and function bodies."""
    yield node
    if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if skip_functions and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield from _walk(child, skip_type_checking=skip_type_checking, skip_functions=skip_functions)


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports_in(node: ast.AST, path: Path, *, skip_type_checking: bool = True,
               skip_functions: bool = False) -> set[str]:
    """The ``heimdall`` modules imported anywhere under ``node`` (a module or function of file ``path``)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for n in _walk(node, skip_type_checking=skip_type_checking, skip_functions=skip_functions):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if _ours(a.name)}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (n.level - 1)]
                base = ".".join(anchor + ([n.module] if n.module else []))
            else:
                base = n.module or ""
            if not _ours(base):
                continue
            found.add(base)
            # `from heimdall import geo` / `from heimdall.stages import train` import submodules
            found |= {f"{base}.{a.name}" for a in n.names
                      if a.name != "*" and module_file(f"{base}.{a.name}") is not None}
        elif isinstance(n, ast.Call):
            # importlib.import_module("heimdall.x") / __import__("heimdall.x") with a literal name
            fn = n.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__") and n.args and isinstance(n.args[0], ast.Constant) \
                    and isinstance(n.args[0].value, str) and _ours(n.args[0].value):
                found.add(n.args[0].value)
    return found


def import_closure(start: dict[Path, str | None], modules: dict[str, Path]) -> dict[Path, str | None]:
    """Files reached from ``start`` files (kept as they are, not followed) plus ``modules``, followed fully.

    Returns file -> the file that first imported it (None for starting points), for error messages.
    """
    reached: dict[Path, str | None] = dict(start)
    followed: set[Path] = set()
    queue: deque[tuple[str, Path | None]] = deque(modules.items())
    while queue:
        module, importer = queue.popleft()
        for f in files_executed_by_import(module):
            reached.setdefault(f, rel(importer) if importer else None)
            if f in followed:
                continue
            followed.add(f)
            queue.extend((m, f) for m in sorted(imports_in(_parse(f), f)))
    return reached


# ----------------------------------------------------------------------------------------------
# verbs -> handlers (build_parser's add_parser / set_defaults(func=...))
# ----------------------------------------------------------------------------------------------

def _call(node: ast.AST, method: str) -> ast.Call | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
        return node
    return None


def _parser_verbs(tree: ast.Module) -> dict[tuple[str, ...], str]:
    """(verb, subverb...) -> handler function name, for the argparse trees built in one module.

    Tracks ``p = <subparsers>.add_parser("name", ...)``, ``s = p.add_subparsers(...)`` and
    ``p.set_defaults(func=handler)`` per function, in source order. A subparsers object the function did
    not create (a parameter, e.g. heimdall.db.cli.add_parser(sub)) is the top level.
    """
    verbs: dict[tuple[str, ...], str] = {}

    def add_parser_path(call: ast.Call, subparsers: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
        ap = _call(call, "add_parser")
        if ap is None or not ap.args or not isinstance(ap.args[0], ast.Constant):
            return None
        owner = ap.func.value
        prefix = subparsers.get(owner.id, ()) if isinstance(owner, ast.Name) else ()
        return prefix + (str(ap.args[0].value),)

    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
        parsers: dict[str, tuple[str, ...]] = {}
        subparsers: dict[str, tuple[str, ...]] = {}
        nodes = [n for n in _walk(fn, skip_functions=fn is tree) if isinstance(n, (ast.Assign, ast.Call))]
        nodes.sort(key=lambda n: (n.lineno, n.col_offset))
        for n in nodes:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                target = n.targets[0].id
                path = add_parser_path(n.value, subparsers)
                if path is not None:
                    parsers[target] = path
                elif (sp := _call(n.value, "add_subparsers")) is not None:
                    owner = sp.func.value
                    subparsers[target] = parsers.get(owner.id, ()) if isinstance(owner, ast.Name) else ()
            elif (sd := _call(n, "set_defaults")) is not None:
                handler = next((k.value for k in sd.keywords if k.arg == "func"), None)
                if not isinstance(handler, ast.Name):
                    continue
                owner = sd.func.value
                if isinstance(owner, ast.Name) and owner.id in parsers:
                    verbs[parsers[owner.id]] = handler.id
                elif isinstance(owner, ast.Call) and (path := add_parser_path(owner, subparsers)) is not None:
                    verbs[path] = handler.id
    return verbs


@functools.lru_cache(maxsize=None)
def cli_handlers() -> dict[tuple[str, ...], tuple[Path, str]]:
    """Every verb of ``heimdall`` -> (file, handler function), from cli.py and the CLI modules it imports."""
    files = [CLI] + sorted({f for m in imports_in(_parse(CLI), CLI) if (f := module_file(m)) and f != CLI})
    handlers: dict[tuple[str, ...], tuple[Path, str]] = {}
    for f in files:
        for verb, fn in _parser_verbs(_parse(f)).items():
            handlers.setdefault(verb, (f, fn))
    return handlers


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def handler_imports(path: Path, name: str) -> set[str]:
    """Imports in the handler and in every module-level function of its file that it calls (transitively)."""
    funcs = _functions(_parse(path))
    if name not in funcs:
        raise LookupError(f"{rel(path)}: handler {name}() is not a module-level function")
    found: set[str] = set()
    todo, seen = [name], set()
    while todo:
        fn = funcs[todo.pop()]
        if fn.name in seen:
            continue
        seen.add(fn.name)
        found |= imports_in(fn, path)
        todo += [n.func.id for n in _walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in funcs and n.func.id not in seen]
    return found


# ----------------------------------------------------------------------------------------------
# dvc.yaml stages -> closures
# ----------------------------------------------------------------------------------------------

def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    return {name: s for name, s in stages.items() if isinstance(s, dict) and "cmd" in s}


def stage_verb(cmd: str | list[str], handlers) -> list[tuple[str, ...]]:
    """The heimdall verbs a stage's cmd runs: `heimdall train`, `heimdall db seed ...`, `python -m heimdall x`."""
    verbs = []
    for line in [cmd] if isinstance(cmd, str) else cmd:
        words = shlex.split(line)
        for i, w in enumerate(words):
            after = None
            if Path(w).name == PKG:
                after = words[i + 1:]
            elif w == "-m" and i + 1 < len(words) and words[i + 1] in (PKG, f"{PKG}.cli"):
                after = words[i + 2:]
            if after is None:
                continue
            args = []
            for a in after:
                if a.startswith("-") or a in ("&&", "||", ";", "|"):
                    break
                args.append(a)
            matches = [tuple(args[:k]) for k in range(len(args), 0, -1) if tuple(args[:k]) in handlers]
            verbs.append(matches[0] if matches else tuple(args[:1]))
            break
    return verbs


def stage_closure(stage: dict, handlers=None) -> dict[Path, str | None]:
    """Source files a stage runs -> who imports them (None: the CLI entry point / handler's own module)."""
    handlers = cli_handlers() if handlers is None else handlers
    start: dict[Path, str | None] = {}
    modules: dict[str, Path] = {}
    for verb in stage_verb(stage["cmd"], handlers):
        if verb not in handlers:
            raise LookupError(f"`{' '.join(verb)}`: no such verb in {rel(CLI)} (verbs: "
                              f"{', '.join(' '.join(v) for v in sorted(handlers))})")
        path, name = handlers[verb]
        for entry in {CLI, path}:
            # the entry modules run their module level (and build_parser), not every verb's handler
            for f in files_executed_by_import(module_name(entry)):
                start.setdefault(f, None)
            modules.update(dict.fromkeys(imports_in(_parse(entry), entry, skip_functions=True), entry))
        modules.update(dict.fromkeys(handler_imports(path, name), path))
    # main() runs before every verb's handler (it pins the CPU numerics, which changes every output)
    modules.update(dict.fromkeys(handler_imports(CLI, "main"), CLI))
    return import_closure(start, modules)


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") or d in ("", ".") for d in deps)


def stage_deps(stage: dict) -> list[str]:
    return [str(d).rstrip("/") for d in stage.get("deps") or []]


def code_deps(stage: dict, handlers=None) -> list[str]:
    """The complete list of code deps for a stage, sorted the way dvc.yaml lists them (stage module first)."""
    files = sorted(rel(f) for f in stage_closure(stage, handlers))
    return sorted(files, key=lambda f: (not f.startswith(rel(STAGES_DIR) + "/"), f))


def suggested_yaml() -> str:
    handlers = cli_handlers()
    out = []
    for name, stage in dvc_stages().items():
        if not stage_verb(stage["cmd"], handlers):
            continue
        data = [d for d in stage_deps(stage) if not d.startswith("src/")]
        out.append(f"  {name}:\n    deps:")
        out += [f"      - {d}" for d in data + code_deps(stage, handlers)]
    return "\n".join(out)


STAGES = dvc_stages()


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

def test_verbs_are_found():
    """The AST reading of build_parser finds every pipeline verb (guards the tests below against vacuity)."""
    handlers = cli_handlers()
    assert ("train",) in handlers and ("export-sessions",) in handlers, sorted(handlers)
    for name, stage in STAGES.items():
        for verb in stage_verb(stage["cmd"], handlers):
            assert verb in handlers, f"stage {name}: `{stage['cmd']}` has no handler in {rel(CLI)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_imports(name):
    stage = STAGES[name]
    closure = stage_closure(stage)
    if not closure:
        pytest.skip(f"stage {name}: `{stage['cmd']}` is not a heimdall verb")
    deps = stage_deps(stage)
    missing = {rel(f): via for f, via in closure.items() if not covered(rel(f), deps)}
    if missing:
        width = max(map(len, missing)) + 6
        lines = [f"stage {name!r} (cmd: {stage['cmd']}) runs code that dvc.yaml does not list in its deps, so "
                 f"editing it would not rerun the stage. Add to stages.{name}.deps:"]
        lines += [f"      - {f}".ljust(width + 2) + f"  # {'imported by ' + via if via else 'runs for every verb'}"
                  for f, via in sorted(missing.items())]
        lines += ["", f"complete code deps of {name} (or run `python tests/test_stage_deps.py`):"]
        lines += [f"      - {f}" for f in code_deps(stage)]
        pytest.fail("\n".join(lines), pytrace=False)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_imported(name):
    """A code dep the stage never imports reruns it for nothing (or names a file that moved)."""
    stage = STAGES[name]
    closure = {rel(f) for f in stage_closure(stage)}
    if not closure:
        pytest.skip(f"stage {name}: `{stage['cmd']}` is not a heimdall verb")
    stale = []
    for dep in stage_deps(stage):
        if not dep.startswith("src/"):
            continue
        p = REPO_ROOT / dep
        if p.is_dir():
            py = [rel(f) for f in p.rglob("*.py")]
            if py and not any(f in closure for f in py):
                stale.append(f"{dep}/ (a folder none of whose modules the stage imports)")
        elif not p.exists():
            stale.append(f"{dep} (does not exist)")
        elif p.suffix == ".py" and dep not in closure:
            stale.append(f"{dep} (not imported by `{stage['cmd']}`)")
    assert not stale, (f"stage {name!r}: stale code deps in dvc.yaml:\n  " + "\n  ".join(stale)
                       + "\ncomplete code deps:\n" + "\n".join(f"      - {f}" for f in code_deps(stage)))


def test_stages_are_imported_only_by_cli():
    """heimdall.stages.* are entry points: shared code lives outside stages/, only cli.py dispatches to them.

    Every import counts here, TYPE_CHECKING ones included: a type imported from a stage is still a dependency
    on it.
    """
    stages_pkg = module_name(STAGES_DIR / "__init__.py")
    offenders = []
    for f in sorted(PKG_DIR.rglob("*.py")):
        if f == CLI or STAGES_DIR in f.parents:
            continue
        hits = {m for m in imports_in(_parse(f), f, skip_type_checking=False)
                if m == stages_pkg or m.startswith(stages_pkg + ".")}
        if len(hits) > 1:
            hits.discard(stages_pkg)  # `from heimdall.stages import x`: report x
        offenders += [f"{rel(f)} imports {m}" for m in sorted(hits)]
    assert not offenders, "modules under stages/ imported from outside it (move the shared code out):\n  " + \
        "\n  ".join(offenders)


def test_no_source_file_over_400_lines():
    long = {rel(f): n for f in sorted(PKG_DIR.rglob("*.py"))
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines (split them): " + \
        ", ".join(f"{f} ({n})" for f, n in long.items())


# --- what DVC itself thinks: edit a module, ask `dvc status` --------------------------------------------

# modules whose edit is checked (those that exist); predict.py and db/seed.py belong to no stage
EDITED = ["src/heimdall/geo.py", "src/heimdall/simulator.py", "src/heimdall/params.py",
          "src/heimdall/contracts.py", "src/heimdall/model.py", "src/heimdall/radiomap.py",
          "src/heimdall/stages/train.py", "src/heimdall/db/source.py", "src/heimdall/errors.py",
          "src/heimdall/predict.py", "src/heimdall/db/seed.py"]


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="heimdall-tests", GIT_AUTHOR_EMAIL="tests@heimdall.invalid",
               GIT_COMMITTER_NAME="heimdall-tests", GIT_COMMITTER_EMAIL="tests@heimdall.invalid")
    return env


def _run(args, cwd) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _dvc_changed_deps(repo: Path) -> dict[str, set[str]]:
    """stage -> the dep paths `dvc status --json` reports under "changed deps" (any state)."""
    out = _run(["dvc", "status", "--json"], repo)
    status = json.loads(out[out.index("{"): out.rindex("}") + 1]) if "{" in out else {}
    changed: dict[str, set[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("changed deps"), dict):
                changed.setdefault(stage.split(":")[-1], set()).update(
                    p.rstrip("/") for p in entry["changed deps"])
    return changed


def _refresh_lock(repo: Path) -> None:
    """Record the current md5 of every code file dep in the copy's dvc.lock (adding missing entries).

    So the check does not depend on dvc.lock being up to date with the code: before any edit no file dep
    under src/ is changed. (Folder deps keep their recorded .dir hash; they cover the edited file either way.)
    """
    lock_path = repo / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.exists() else {}
    lock = lock or {}
    lock.setdefault("schema", "2.0")
    stages = lock.setdefault("stages", {}) or {}
    lock["stages"] = stages
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        if not isinstance(stage, dict) or "cmd" not in stage:
            continue
        entry = stages.setdefault(name, {"cmd": stage["cmd"]})
        locked = {d["path"]: d for d in entry.setdefault("deps", []) or []}
        for dep in stage_deps(stage):
            f = repo / dep
            if dep.startswith("src/") and f.is_file():
                d = locked.get(dep)
                if d is None:
                    d = {"path": dep}
                    entry["deps"].append(d)
                d.update(hash="md5", md5=hashlib.md5(f.read_bytes()).hexdigest(), size=f.stat().st_size)  # noqa: S324
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The working tree's files (tracked, and new ones git does not ignore) in a fresh git + DVC repository."""
    if shutil.which("dvc", path=_env()["PATH"]) is None:
        pytest.skip("dvc is not installed")
    repo = tmp_path_factory.mktemp("stage_deps") / "repo"
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO_ROOT)
    for name in filter(None, listed.split("\0")):
        src = REPO_ROOT / name
        if src.is_file() and not src.is_symlink():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    assert (repo / ".dvc").is_dir(), "the repository's .dvc/ was not copied"
    _refresh_lock(repo)
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "copy"], repo)
    return repo


@pytest.mark.slow
def test_editing_a_module_marks_exactly_its_importers(repo_copy):
    repo = repo_copy
    handlers = cli_handlers()
    closures = {name: {rel(f) for f in stage_closure(s, handlers)} for name, s in STAGES.items()}
    edited = [f for f in EDITED if (REPO_ROOT / f).is_file()]
    assert len(edited) >= 3, f"fewer than 3 of {EDITED} exist: update EDITED"

    def covering(changed: dict[str, set[str]], f: str) -> set[str]:
        return {stage for stage, paths in changed.items() if covered(f, sorted(paths))}

    baseline = _dvc_changed_deps(repo)
    stale = {f: sorted(s for s in covering(baseline, f) if f in baseline[s]) for f in edited}
    assert not any(stale.values()), f"dvc status reports code deps changed before any edit: {stale}"

    wrong = []
    for f in edited:
        path = repo / f
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# edited by tests/test_stage_deps.py\n")
            dvc_view = covering(_dvc_changed_deps(repo), f)
        finally:
            path.write_bytes(original)
        code_view = {name for name, files in closures.items() if f in files}
        if dvc_view != code_view:
            wrong.append(f"{f}: dvc status marks {sorted(dvc_view) or 'no stage'}, "
                         f"but {sorted(code_view) or 'no stage'} import it")
    assert not wrong, "editing a module does not rerun exactly the stages that import it:\n  " + \
        "\n  ".join(wrong) + "\n\ncode deps per stage (paste into dvc.yaml):\n" + suggested_yaml()


if __name__ == "__main__":
    print("# complete deps per stage (data deps as in dvc.yaml, then the code the stage imports)")
    print("stages:")
    print(suggested_yaml())
