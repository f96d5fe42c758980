"""The documentation: a short README whose CI commands `.ci/run` can read, links and paths that resolve, recipe
comments that give advice that works, and no module paths from before the package was split into subpackages."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
# Link targets other work creates: tolerated while absent, checked like any other once they exist.
GENERATED_OR_PENDING: set[str] = set()  # documents a link may name before they exist (none now)
# Module paths before the split into subpackages (olive_int4_pass.X or olive_int4_pass/X.py), and their new homes.
OLD_MODULES = {
    "genai_chat": "genai.chat",
    "olive_metric": "olive.metric",
    "olive_pass": "olive.quantize_pass",
    "olive_registration": "olive.registration",
    "genai_export": "genai.export / olive.export_pass",
    "genai_packaging": "genai.packaging / olive.packaging_pass",
    "quantize": "pipeline",
    "block_quant": "kernels.rtn",
    "fast_rtn": "kernels.streaming_rtn",
    "scale_search": "kernels.scale_search",
    "rewrite_rules": "rewrite.matmul_rules",
    "embedding_rules": "rewrite.embedding_rules",
    "quality": "plan.weight_plan",
    "calibration": "plan.calibration",
    "sensitivity": "plan.sensitivity",
}
OLD_PATH = re.compile(r"olive_int4_pass[./](" + "|".join(OLD_MODULES) + r")\b")
# `compare` became a package: the function is compare.run.compare.
OLD_COMPARE_FUNCTION = re.compile(r"olive_int4_pass\.compare\.compare\b")


def documents() -> list[Path]:
    return [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def recipe_files() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def block_after(text: str, heading: str) -> str | None:
    """What `.ci/run`'s awk does: the line after the first ``` line at or after the first line starting with heading."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return None
    fence = next((i for i in range(start, len(lines)) if lines[i].startswith("```")), None)
    return lines[fence + 1] if fence is not None and fence + 1 < len(lines) else None


def without_code(markdown: str) -> str:
    """The text outside fenced blocks and inline code spans (links there are not links)."""
    markdown = re.sub(r"^```.*?^```[^\n]*$", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def links(markdown: str) -> list[str]:
    """Targets of inline Markdown links and images: [text](target) / ![alt](target "title")."""
    return [m.group(1) for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", markdown)]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(
        r"^#{1,6}\s+(.+?)\s*#*\s*$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), re.M
    ):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth to docs/"


def test_readme_has_the_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    setup, tests = block_after(text, "Set up"), block_after(text, "Run the tests")
    assert setup and tests, "README needs 'Set up' and 'Run the tests' lines, each followed by a ``` block"
    assert re.match(r"pip install .*-e +[\"']?\.\[[^\]]*\bcpu\b[^\]]*\][\"']?", setup), setup
    assert "dev" in re.search(r"\.\[([^\]]*)\]", setup).group(1).split(","), setup
    assert re.match(r"python -m pytest\b.*\btests\b", tests), tests


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("awk")), reason="needs bash and awk")
def test_ci_script_reads_the_same_commands():
    """Run `.ci/run`'s own block_after function on the README: the parser above must match what CI does."""
    script = (ROOT / ".ci" / "run").read_text()
    function = re.search(r"^block_after\(\) \{.*?^\}", script, re.M | re.S)
    assert function, ".ci/run no longer defines block_after(): update this test"
    text = README.read_text(encoding="utf-8")
    for heading in ("Set up", "Run the tests"):
        ci = subprocess.run(
            ["bash", "-c", f'{function.group(0)}\nblock_after "$1"', "bash", heading],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rstrip("\n")
        assert ci == block_after(text, heading), heading


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_relative_links_resolve(doc):
    broken = []
    for target in links(without_code(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto: not checked here; pure anchors: same page, checked below
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve()
        try:
            name = path.relative_to(ROOT).as_posix()
        except ValueError:
            broken.append(f"{target} (outside the repository)")
            continue
        if not path.exists():
            if name not in GENERATED_OR_PENDING:
                broken.append(target)
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{rel(doc)}: broken links: {broken}"


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_same_page_anchors_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [t for t in links(without_code(text)) if t.startswith("#") and t[1:] not in anchors(text)]
    assert not missing, f"{rel(doc)}: anchors without a heading: {missing}"


@pytest.mark.parametrize("doc", documents(), ids=rel)
def test_repository_paths_mentioned_exist(doc):
    """Paths like `tests/x.py::test_y`, `benchmarks/x.py` or `recipes/x.yaml` named in the text are real files."""
    text = doc.read_text(encoding="utf-8")
    mentioned = set(
        re.findall(r"(?<![\w/.-])((?:recipes|benchmarks|tests|olive_int4_pass)/[\w/.-]+\.(?:py|yaml|md|png))", text)
    )
    missing = sorted(p for p in mentioned if not (ROOT / p).exists())
    assert not missing, f"{rel(doc)} names files that do not exist: {missing}"


def test_recipes_do_not_advertise_the_broken_test_flag():
    """Olive 0.13's `olive run --test` fails on genai decoders (docs/upstream.md); recipes must not suggest it."""
    assert recipe_files(), "no recipes found"
    offenders = [rel(f) for f in recipe_files() if re.search(r"--test\b", f.read_text(encoding="utf-8"))]
    assert not offenders, f"recipes mention --test: {offenders}"


@pytest.mark.parametrize("doc", [*documents(), *recipe_files(), *sorted((ROOT / "recipes").glob("*.py"))], ids=rel)
def test_no_old_module_paths(doc):
    text = doc.read_text(encoding="utf-8")
    old = sorted({f"{m.group(0)} (now {OLD_MODULES[m.group(1)]})" for m in OLD_PATH.finditer(text)})
    old += [f"{m.group(0)} (now olive_int4_pass.compare.run.compare)" for m in OLD_COMPARE_FUNCTION.finditer(text)]
    assert not old, f"{rel(doc)} uses module paths from before the reorganisation: {old}"


def test_old_path_pattern_catches_old_and_spares_new_paths():
    """The check above would be worthless if the pattern missed old paths or flagged the new ones."""
    for old in (
        "olive_int4_pass.genai_chat",
        "olive_int4_pass.olive_metric",
        "olive_int4_pass.quantize ",
        "olive_int4_pass/fast_rtn.py",
        "olive_int4_pass.scale_search",
        "olive_int4_pass.quality",
    ):
        assert OLD_PATH.search(old), old
    for new in (
        "olive_int4_pass.genai.chat",
        "olive_int4_pass.olive.metric",
        "olive_int4_pass.olive.quantize_pass",
        "olive_int4_pass.kernels.scale_search",
        "olive_int4_pass/kernels/streaming_rtn.py",
        "olive_int4_pass.plan.weight_plan",
        "olive_int4_pass.pipeline",
        "olive_int4_pass.compare.run.compare",
        "olive_int4_pass.rewrite.embedding_rules",
    ):
        assert not OLD_PATH.search(new) and not OLD_COMPARE_FUNCTION.search(new), new


def test_every_test_named_in_the_testing_page_exists():
    """docs/testing.md maps promises to `tests/x.py::test_y` (a bare `::test_z` is in the file named before it)."""
    text = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    named, current = [], None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(test_\w+)`", text):
        current = match.group(1) or current
        assert current, f"::{match.group(2)} names no file before it"
        named.append((current, match.group(2)))
    assert len(named) > 50, "the page lost its table"
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M)
    ]
    assert not missing, f"docs/testing.md names tests that do not exist: {missing}"
