"""Messages in the user's language: a gettext catalog (`minigpt/locale/<lang>/LC_MESSAGES/minigpt.mo`).

The language comes from `MINIGPT_LANG` (`zh` or `en`) when it is set, else from the locale variables in
gettext's order (`LANGUAGE`, `LC_ALL`, `LC_MESSAGES`, `LANG`): any `zh*` locale (zh_CN.UTF-8, zh_TW, zh)
gives Chinese, anything else English. Messages are written in English in the code and marked with `_()`;
a message with values takes named fields, filled after translation: `_("{path}: not found").format(path=p)`.
The catalog's source is `minigpt/locale/zh/LC_MESSAGES/minigpt.po`; `python -m minigpt.i18n compile`
rebuilds the `.mo` beside it (needs Babel, a development dependency; tests/test_i18n.py checks both are
complete and in step).
"""

from __future__ import annotations

import functools
import gettext
import os
import sys
from pathlib import Path

DOMAIN = "minigpt"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANG_ENV = "MINIGPT_LANG"
LANGUAGES = ("en", "zh")
LOCALE_ENVS = ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG")


def choose_language(environ: dict[str, str] | None = None) -> str:
    """`en` or `zh` for this process (see the module docstring)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(LANG_ENV, "").strip().lower()
    if chosen:
        return "zh" if chosen.startswith("zh") else "en"
    for name in LOCALE_ENVS:
        value = environ.get(name, "")
        if value:  # LANGUAGE may list several (zh_CN:en); the first decides
            return "zh" if value.split(":")[0].lower().startswith("zh") else "en"
    return "en"


@functools.cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalog of `language` (English: the messages as written)."""
    if language == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, localedir=str(LOCALE_DIR), languages=[language], fallback=True)


def _(message: str) -> str:
    """`message` in this process's language."""
    return translations(choose_language()).gettext(message)


def docs_page(page: str, zh: str | None = None) -> str:
    """The documentation page `page` (e.g. "training.md#resuming") in this process's language. `zh`: the
    Chinese page and anchor where its heading's anchor differs (e.g. "training.md#恢复训练")."""
    return f"docs/zh/{zh or page}" if choose_language() == "zh" else f"docs/{page}"


def compile_catalogs() -> list[Path]:
    """Rebuild every `.mo` from its `.po` (Babel); returns the files written."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    written = []
    for po_path in sorted(LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po")):
        with open(po_path, "rb") as handle:
            catalog = read_po(handle)
        mo_path = po_path.with_suffix(".mo")
        with open(mo_path, "wb") as handle:
            write_mo(handle, catalog)
        written.append(mo_path)
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["compile"]:
        print("usage: python -m minigpt.i18n compile", file=sys.stderr)
        sys.exit(2)
    for path in compile_catalogs():
        print(f"wrote {path}")
