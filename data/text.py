"""Bundled default text: Wikipedia and news articles read from the gensim 4.4.0 wheel.

The wheel ships a shortened English Wikipedia dump and the Lee news corpus as test data. We read
them with `zipfile` (gensim itself is never installed), turn the wiki markup into plain text and
cache the result as a `datasets.DatasetDict` with splits `train`, `test` (Wikipedia) and `calib`
(news), so a fresh machine gets a small real corpus without network access at run time.

From the Wikipedia splits we also build a small instruction set (`bundled:instructions`): for each prose
paragraph one short task (name the article's title, continue the text, name the paragraph's section), so
instruction finetuning runs offline too; its `test` split comes from the held-out `test` articles only.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import datasets

from qat.io.atomic import atomic_dir
from qat.io.env import distqat_home
from qat.keys import COMPLETE_MARKER

BUNDLED_TEXT = "bundled:wikitext"  # the data.path that names this text
WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
MIN_ARTICLE_CHARS = 500

# Sections that are lists of links or citations rather than prose.
_DROP_SECTIONS = set(
    "references|external links|see also|further reading|notes|bibliography|sources"
    "|footnotes|citations|notes and references|references and notes".split("|")
)
_DROP_LINK_NS = {"file", "image", "category"}
_INTERLANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z]+)*|simple")
# Tags whose content is not prose (citations, formulas, image lists, plots, code).
_DROP_TAGS = "ref|gallery|math|chem|ce|timeline|imagemap|score|graph|mapframe|syntaxhighlight|source|pre"
_DROP_TAG_BLOCK = re.compile(rf"<({_DROP_TAGS})\b[^>]*?(?<!/)>.*?</\1\s*>", re.I | re.S)
_DROP_TAG_SINGLE = re.compile(rf"<({_DROP_TAGS})\b[^>]*/\s*>", re.I)
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_INNER_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_BRACE_TOKEN = re.compile(r"\{\{|\}\}|\{\||\|\}")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_LEFTOVER = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "''")


def find_gensim_wheel(search_dirs: list[Path] | None = None) -> Path:
    """Find the gensim 4.4.0 wheel in `$DISTQAT_HOME/wheels`, then in `search_dirs`."""
    wheels_dir = distqat_home() / "wheels"
    dirs = [wheels_dir, *(Path(d) for d in search_dirs or [])]
    for d in dirs:
        found = sorted(d.glob(WHEEL_GLOB)) if d.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(
        f"gensim 4.4.0 wheel not found in {', '.join(map(str, dirs))}; fix: "
        f"pip download --no-deps gensim==4.4.0 -d {wheels_dir} (or run ./launch.sh, which does it)"
    )


def _strip_braces(s: str) -> str:
    """Drop templates `{{..}}` and tables `{|..|}`, which nest inside each other."""
    out, stack, pos, start, opened = [], [], 0, 0, 0
    while True:
        m = _BRACE_TOKEN.search(s, pos)
        if m is None:
            if not stack:
                out.append(s[start:])
                return "".join(out)
            # Unclosed opener: MediaWiki shows it literally, so drop only its two characters.
            stack, pos = [], opened + 2
            start = pos
            continue
        tok, i = m.group(), m.start()
        pos = i + 1  # a rejected token may overlap a real one, as in "|}}"
        if tok == "{{" or (tok == "{|" and _line_start(s, i, " \t:")):
            if not stack:
                out.append(s[start:i])
                opened = i
            stack.append("}}" if tok == "{{" else "|}")
            pos = i + 2
        elif stack and tok == stack[-1] and (tok == "}}" or _line_start(s, i, " \t")):
            stack.pop()
            pos = start = i + 2


def _line_start(s: str, i: int, blanks: str) -> bool:
    return not s[s.rfind("\n", 0, i) + 1 : i].strip(blanks)


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip() if ":" in target else None
    if prefix is not None and (prefix.lower() in _DROP_LINK_NS or _INTERLANGUAGE.fullmatch(prefix)):
        return ""
    return label.strip() or target.lstrip(":")


def _drop_sections(text: str) -> list[str]:
    """Turn headings into their own paragraphs and drop link-list sections with their bodies."""
    lines, drop_level = [], 0
    for line in text.split("\n"):
        m = _HEADING.match(line.strip())
        if m:
            level = len(m.group(1))
            if drop_level and level > drop_level:
                continue
            title = m.group(2)
            drop_level = level if _clean_inline(title).lower() in _DROP_SECTIONS else 0
            if not drop_level:
                lines += ["", title, ""]
        elif not drop_level:
            lines.append(line)
    return lines


def _resolve_links(s: str) -> str:
    prev = None
    while prev != s:  # innermost links first, so captions with nested links go as a whole
        prev, s = s, _INNER_LINK.sub(_link, s)
    return _EXT_LINK.sub(lambda m: m.group(1) or "", s)


def _clean_inline(s: str) -> str:
    """Tags, quote markup and entities of a template- and link-free string."""
    s = _TAG.sub(lambda m: " " if m.group(0).lower().startswith("<br") else "", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"__[A-Z]+__", "", s)
    s = html.unescape(s).replace("\xa0", " ")
    return _TAG.sub("", s)  # escaped tags like &lt;ref&gt; only become tags now


def clean_wikitext(markup: str) -> str:
    """Turn MediaWiki markup into plain text paragraphs, keeping section headings as lines."""
    s = _COMMENT.sub("", markup)
    s = _DROP_TAG_SINGLE.sub("", s)
    s = _DROP_TAG_BLOCK.sub("", s)
    s = _resolve_links(_strip_braces(s))  # on the whole text: file captions span lines
    lines = []
    for line in _drop_sections(s):
        line = _clean_inline(line)
        line = re.sub(r"^[*#:;]+", "", line.strip())
        line = re.sub(r"\(\s*\)", "", re.sub(r"\([,;\s]+", "(", line))  # "(; )" where templates were
        line = re.sub(r"\s+([,.;:])(?=\s|$)", r"\1", re.sub(r"[ \t]+", " ", line)).strip()
        prev = None
        while prev != line:  # safety net: a stray token of broken markup
            prev = line
            for token in _LEFTOVER:
                line = line.replace(token, "")
        if line.startswith("----") or (line and not any(c.isalnum() for c in line)):
            line = ""
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(wheel: Path) -> Iterator[tuple[str, str]]:
    """Stream `(title, "Title\\n\\n" + plain text)` for the main-namespace articles of the dump."""
    with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as xml:
        for _, elem in ElementTree.iterparse(xml, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(e.tag): e for e in elem.iter()}
            title = (fields["title"].text or "").strip()
            ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
            body = (fields["text"].text or "") if "text" in fields else ""
            elem.clear()
            if ns != "0" or "redirect" in fields or body.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(body)
            if len(text) >= MIN_ARTICLE_CHARS:
                yield title, f"{title}\n\n{text}"


def iter_lee_articles(wheel: Path) -> Iterator[str]:
    """The Lee background news articles, one per line of the corpus."""
    with zipfile.ZipFile(wheel) as zf:
        for line in zf.read(LEE_MEMBER).decode("utf-8").splitlines():
            if line.strip():
                yield line.strip()


def split_name(title: str) -> str:
    """`test` for 20% of titles, else `train`; hashing the title keeps it stable as articles come and go."""
    bucket = int(hashlib.md5(title.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "test" if bucket in (0, 1) else "train"


def build_text_dataset(wheel: Path) -> datasets.DatasetDict:
    """Build splits `train`/`test` (Wikipedia, dump order) and `calib` (Lee news) with `text`, `source`."""
    rows: dict[str, dict[str, list[str]]] = {s: {"text": [], "source": []} for s in ("train", "test", "calib")}
    for title, text in iter_wiki_articles(wheel):
        split = rows[split_name(title)]
        split["text"].append(text)
        split["source"].append(f"wikipedia:{title}")
    for i, text in enumerate(iter_lee_articles(wheel)):
        rows["calib"]["text"].append(text)
        rows["calib"]["source"].append(f"lee:{i}")
    features = datasets.Features({"text": datasets.Value("string"), "source": datasets.Value("string")})
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(cols, features=features) for name, cols in rows.items()}
    )


def load_bundled_text(cache_dir: Path | None = None) -> datasets.DatasetDict:
    """The bundled text, built once into `<cache_dir>/bundled_text` and loaded from there after."""
    cache_dir = Path(cache_dir) if cache_dir is not None else distqat_home()
    final = cache_dir / "bundled_text"
    if (final / COMPLETE_MARKER).exists():
        return datasets.load_from_disk(str(final))
    dataset = build_text_dataset(find_gensim_wheel())
    if final.exists() and not (final / COMPLETE_MARKER).exists():
        shutil.rmtree(final, ignore_errors=True)  # not ours: we only ever rename complete folders into place
    with atomic_dir(final, replace=False) as tmp:  # another process building it at once: keep its copy
        dataset.save_to_disk(str(tmp))
        (tmp / COMPLETE_MARKER).write_text("ok\n")
    return datasets.load_from_disk(str(final))


# -- the bundled instruction set ------------------------------------------------------------------

BUNDLED_INSTRUCTIONS = "bundled:instructions"  # the data.path that names the instruction set built below
INSTRUCTIONS_VERSION = "1"  # bump when the tasks change: a cached set of another version is built again
MAX_PROMPT_WORDS = 120  # of paragraph text in a prompt
MAX_ANSWER_WORDS = 60
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "e.g", "i.e", "etc", "c", "ca", "no", "mt", "fl",
                  "u.s", "approx", "inc", "co", "vol", "pp", "op", "cf", "al", "gen", "col", "lt", "sgt", "prof"}
_TITLE_PROMPTS = ("Give a title for the Wikipedia article this paragraph comes from.\n\n{p}",
                  "Which Wikipedia article is this paragraph from? Answer with its title.\n\n{p}")
_CONTINUE_PROMPTS = ("Continue this text with the next sentence or two.\n\n{p}",
                     "Write the next one or two sentences of this text.\n\n{p}")
_SECTION_PROMPTS = ("This paragraph is from the Wikipedia article \"{t}\". Which of its sections does it belong to: "
                    "{o}?\n\n{p}",
                    "Name the section of the Wikipedia article \"{t}\" that this paragraph belongs to ({o}).\n\n{p}")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a prose paragraph: cut after . ! ? before a capital, a digit or a quote, except after an
    initial or a common abbreviation."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(paragraph):
        word = paragraph[start : m.start() + 1].rsplit(None, 1)[-1].rstrip(".").lower()
        if paragraph[m.start()] == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    return [s for s in (*out, paragraph[start:].strip()) if s]


def is_heading(chunk: str) -> bool:
    """A section heading of the bundled text: one short line of its own, not ending like a sentence."""
    return ("\n" not in chunk and len(chunk) <= 80 and 1 <= len(chunk.split()) <= 10
            and (chunk[0].isupper() or chunk[0].isdigit()) and not chunk.endswith(tuple(".!?:;,")))


def _fit(sentences: list[str], max_words: int) -> list[str]:
    """The leading sentences that fit in `max_words` words."""
    out, words = [], 0
    for s in sentences:
        words += len(s.split())
        if words > max_words:
            break
        out.append(s)
    return out


def _chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def article_instructions(article: str, rng) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(task, messages) for each prose paragraph of one bundled article (its first line is the title): one task
    per paragraph, the least used one so far among those the paragraph allows."""
    title, *chunks = article.split("\n\n")
    paragraphs, section = [], None
    for chunk in chunks:
        if is_heading(chunk):
            section = chunk
        elif "\n" not in chunk and len(chunk.split()) >= 25:
            paragraphs.append((section, chunk))
    # Headings with prose right under them: a heading followed at once by subsections never answers.
    sections = list(dict.fromkeys(s for s, _ in paragraphs if s is not None and s != title))
    counts = {"title": 0, "continue": 0, "section": 0}
    for section, paragraph in paragraphs:
        sentences = split_sentences(paragraph)
        text = " ".join(_fit(sentences, MAX_PROMPT_WORDS))
        if not text:
            continue  # one sentence longer than a prompt
        options = {"title": _chat(rng.choice(_TITLE_PROMPTS).format(p=text), title)}
        if len(sentences) >= 2:
            k = rng.randint(1, min(3, len(sentences) - 1))
            prefix = _fit(sentences[:k], MAX_PROMPT_WORDS)
            answer = _fit(sentences[k : k + rng.choice((1, 2))], MAX_ANSWER_WORDS)
            if len(prefix) == k and answer:
                options["continue"] = _chat(rng.choice(_CONTINUE_PROMPTS).format(p=" ".join(prefix)), " ".join(answer))
        if section in sections and len(sections) >= 2:
            others = [s for s in sections if s != section]
            shown = set(rng.sample(others, min(5, len(others)))) | {section}
            listed = ", ".join(s for s in sections if s in shown)  # in article order
            prompt = rng.choice(_SECTION_PROMPTS).format(t=title, o=listed, p=text)
            options["section"] = _chat(prompt, section)
        task = min(options, key=lambda t: (counts[t], rng.random()))
        counts[task] += 1
        yield task, options[task]


def build_instruction_dataset(text: datasets.DatasetDict) -> datasets.DatasetDict:
    """Splits `train`/`test` of short instructions (`messages`, `task`, `source`) from the bundled Wikipedia
    splits of the same names, so test instructions come from held-out articles. Deterministic."""
    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    features = datasets.Features({"messages": [turn], "task": datasets.Value("string"),
                                  "source": datasets.Value("string")})
    out = {}
    for split in ("train", "test"):
        rng = random.Random(f"distqat-instructions-{split}")
        rows: dict[str, list] = {"messages": [], "task": [], "source": []}
        for article, source in zip(text[split]["text"], text[split]["source"]):
            for task, messages in article_instructions(article, rng):
                rows["messages"].append(messages)
                rows["task"].append(task)
                rows["source"].append(source)
        out[split] = datasets.Dataset.from_dict(rows, features=features)
    return datasets.DatasetDict(out)


def _is_version(folder: Path, version: str) -> bool:
    marker = folder / COMPLETE_MARKER
    return marker.exists() and marker.read_text().strip() == version


def load_bundled_instructions(cache_dir: Path | None = None) -> datasets.DatasetDict:
    """The bundled instruction set, built once from the bundled text into `<cache_dir>/bundled_instructions`
    (default: the distqat home) and loaded from there after."""
    cache_dir = Path(cache_dir) if cache_dir is not None else distqat_home()
    final = cache_dir / "bundled_instructions"
    if _is_version(final, INSTRUCTIONS_VERSION):
        return datasets.load_from_disk(str(final))
    dataset = build_instruction_dataset(load_bundled_text(cache_dir))
    if final.exists() and not _is_version(final, INSTRUCTIONS_VERSION):
        shutil.rmtree(final, ignore_errors=True)  # unfinished, or another version's
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # prints nothing, as it is built inside other commands' output
    try:
        with atomic_dir(final, replace=False) as tmp:  # another process building it at once: keep its copy
            dataset.save_to_disk(str(tmp))
            (tmp / COMPLETE_MARKER).write_text(f"{INSTRUCTIONS_VERSION}\n")
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    return datasets.load_from_disk(str(final))
