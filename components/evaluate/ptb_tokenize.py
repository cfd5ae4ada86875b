"""The COCO caption tokenisation in pure Python: Stanford PTBTokenizer 3.4.1 + pycocoevalcap's filter.

pycocoevalcap's ``PTBTokenizer`` joins every caption of a batch with newlines, runs Stanford
CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` (java) over the text, splits the
output lines on spaces and drops the punctuation tokens in :data:`PUNCTUATIONS`. This module
reproduces that pipeline without java: a longest-match lexer whose rules follow the
behaviour of CoreNLP 3.4.1's PTB lexer (contractions split, "cannot" -> "can not",
abbreviations keep their period, a sentence-final abbreviation also yields a "." token,
"(" -> "-LRB-", quotes -> `` and '', "…" -> "...", currency and fraction symbols
normalised, unknown characters deleted). As in the reference, captions are lexed as one
newline-joined text, so an abbreviation at the end of a caption sees the next caption.

Known differences from the java reference (differential tests against the jar over ~40k random
captions, caption-like and character noise, agree everywhere else): a caption containing a line
separator other than "\\n" (\\r, U+2028, U+2029, \\v, \\f) stays one caption here, while the reference
splits it and shifts every later caption onto the wrong image; Greek capital sigma inside a token
mixing letters with digits or hyphens may lowercase to small vs final sigma differently (Java decides with its
word BreakIterator); soft hyphens (U+00AD) right after an apostrophe word may be kept; letters of
scripts whose Unicode data changed after Java 7 may be classed differently. Characters outside the
Basic Multilingual Plane (emoji) split tokens and are deleted, as in the reference.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TypeVar

K = TypeVar("K")

#: Tokens pycocoevalcap removes after tokenising (compared after lowercasing, so "-lrb-" stays).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
NEWLINE = "\n"
_LINE_BREAKS = re.compile("[\r\u2028\u2029\x0b\x0c]")


@lru_cache(maxsize=1)
def _letter_class() -> str:
    """A regex character class body with every BMP letter (Java's Character.isLetter)."""
    ranges: list[list[int]] = []
    for code in range(0x10000):
        if unicodedata.category(chr(code)).startswith("L"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _definitions() -> dict[str, str]:
    d: dict[str, str] = {}
    d["SPLET"] = r"&[aeiouAEIOU](?i:acute|grave|uml);"
    d["LETTER"] = (
        rf"(?:[{_letter_class()}\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F]|{d['SPLET']})"
    )
    d["DIGIT"] = r"[0-9\u0660-\u0669\u06F0-\u06F9\u0966-\u096F\u07C0-\u07C9\uFF10-\uFF19]"
    d["SPACE"] = r"[ \t\u00A0\u2000-\u200A\u3000]"
    d["NL"] = r"(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
    d["SPACENL"] = rf"(?:{d['SPACE']}|{d['NL']})"
    name = r"[A-Za-z][A-Za-z0-9_:.\-]*"
    value = r"(?:'[^'\r\n]*'|\"[^\"\r\n]*\")"
    d["SGML"] = rf"<(?:[!?][A-Za-z\-][^>\r\n]*|{name}(?: +(?:{name} *= *{value}|{name}))* *\/?|\/{name}) *>"
    d["SENTEND"] = rf"{d['SPACENL']}(?:{d['SPACENL']}|[A-Z]|{d['SGML']})"
    d["APOS"] = r"(?:['\u0092\u2019]|&(?i:apos);)"
    d["APOSETC"] = rf"(?:{d['APOS']}|[`\u0091\u2018\u201B])"
    d["NUM"] = rf"(?:{d['DIGIT']}*(?:[.:,\u00AD\u066B\u066C]{d['DIGIT']}+)+|{d['DIGIT']}+)"
    d["NUMBER"] = rf"[\-+]?{d['NUM']}"
    d["ALNUM"] = rf"(?:{d['LETTER']}|{d['DIGIT']})"
    d["HYPHEN"] = r"[\-_\u058A\u2010\u2011]"
    d["ACRO"] = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?i:(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R)))"
    d["ABBREV1"] = (
        r"(?:(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec|Mon|Tues?|Wed|Thu|Thurs|Fri"
        r"|Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans?|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla|Penn|Tenn|Va|Vt"
        r"|Wisc?|Wyo|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq"
        r"|Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)"
        r"|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\."
    )
    d["ABBREV4"] = (
        rf"(?:{d['ACRO']}|(?i:Mrs?|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Mt"
        r"|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme"
        r"|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl|M[ft]g|Dept)|M(?i:iss)|[A-Za-z])"
    )
    d["ABBREV3"] = r"(?i:Nos?|Prop|ca|figs?|art|pp|op)\."
    return d


def _rules() -> list[tuple[str, re.Pattern[str]]]:
    """(action, pattern) in the reference's priority order; a pattern's 'tok' group, if any, is the token.

    Python's alternation is first-match, not longest-match: where two alternatives of one rule can
    both match, they are listed as separate patterns so the scanner picks the longest.
    """
    d = _definitions()
    L, DG, SP, SNL, AP, AE = d["LETTER"], d["DIGIT"], d["SPACE"], d["SPACENL"], d["APOS"], d["APOSETC"]
    word = rf"{L}(?:{L}|{DG})*(?:[.!?]{L}(?:{L}|{DG})*)*"
    sword = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
    redaux = rf"{AP}(?:[msdMSD]|(?i:re|ve|ll))"
    sredaux = rf"(?i:n){AE}(?i:t)"
    starters = (
        "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More"
        "|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This|We"
        "|When|While|What|Yet|You"
    )
    starters = "|".join(f"{w[0]}(?i:{w[1:]})" if len(w) > 1 else w for w in starters.split("|"))
    L = f"[{_letter_class()}]"  # APOWORD uses plain letters (no soft hyphen, no entities)
    apoword = (  # alternatives are separate patterns: the longest one wins, as in a JFlex rule
        rf"{AP}(?i:n){AP}?",
        rf"[lLdDjJ]{AP}",
        rf"(?i:Dunkin|somethin|ol){AP}",
        rf"{AP}(?i:em)",
        rf"[A-HJ-XZn]{AE}{L}{{2}}{L}*",
        rf"{AP}[2-9]0(?i:s)",
        rf"{AP}(?i:till?)",
        rf"{L}+[aeiouyAEIOUY]{AE}[aeiouA-Z]{L}*",
        rf"{AP}(?i:cause)",
        r"(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
    )
    L = d["LETTER"]
    url_chars = r"[^ \t\n\f\r\"<>|(){}]"
    likely_url = (
        r"(?:(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
        r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){}\x2C-\x5F$]+\.)+"
        rf"(?i:com|net|org|edu)))(?:\/{url_chars}+[^ \t\n\f\r\"<>|.!?(){{}},\-])?"
    )
    alnum = rf"[{_letter_class()}0-9\u0660-\u0669\u06F0-\u06F9\u0966-\u096F\u07C0-\u07C9\uFF10-\uFF19]"
    thing = rf"(?:[dDoOlL]{AE}{alnum})?{alnum}+(?:{d['HYPHEN']}(?:[dDoOlL]{AE}{alnum})?{alnum}+)*"
    thinga = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
    hthing = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{d['ACRO']}\.|[A-Za-z0-9\u00AD]+))+"
    thing3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    phone = (
        r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}"
        r"[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"
    )
    insentp = r"[,;:\u3001]"
    quotes = (
        r"(?:''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB]{1,2}"
        r"|['\u0092\u2019]|&(?i:apos);)"
    )
    misc = (
        r"[+%&~^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE"
        r"\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D"
        r"\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044"
        r"\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20"
        r"\uFF3B-\uFF40\uFF5B-\uFF65]"
    )
    filename_ext = (
        "(?i:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt|ps|py"
        "|sql|tar|txt|wav|x|xml|zip)"
    )
    filename = rf"{alnum}+(?:\.{alnum}+)*\.{filename_ext}"
    table = [
        ("keep", r"(?i:c\+\+|[cf]#)"),
        ("assim3", r"(?i:cannot|'twas)"),
        ("assim2", r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)"),
        ("sgml", d["SGML"]),
        ("dash", r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]"),
        ("amp", r"&(?i:amp);"),
        ("keep", r"&(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"),
        ("word", rf"(?P<tok>{word})(?:{redaux})"),
        ("word", rf"(?P<tok>{sword})(?:{sredaux})"),
        ("word", word),
        ("keep", apoword),
        ("keep", rf"(?P<tok>[yY]{AP}){L}"),
        ("keep", rf"(?i:https?)://{url_chars}+[^ \t\n\f\r\"<>|.!?(){{}},\-]"),
        ("keep", likely_url),
        (
            "keep",
            r"(?:<|&(?i:lt);)?[a-zA-Z0-9][^ \t\n\f\r\"<>|(){}\u00A0]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
            r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:>|&(?i:gt);)?",
        ),
        ("keep", rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{L}+"),
        ("quote_right", rf"(?P<tok>{redaux})[^A-Za-z]"),
        ("quote_right", sredaux),
        ("keep", rf"{DG}{{1,2}}[\-\/]{DG}{{1,2}}[\-\/]{DG}{{2,4}}"),
        ("number", d["NUMBER"]),
        ("keep", r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"),
        ("frac", rf"(?:{DG}{{1,4}}[\- \u00A0])?{DG}{{1,4}}(?:\\?\/|\u2044){DG}{{1,4}}"),
        ("frac2", r"[\u00BC\u00BD\u00BE\u2153-\u215E]"),
        (
            "amp",
            rf"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{AP}n|c{AP}est)",
        ),
        ("keep", thing3),
        ("keep", r"[A-Z]*\$|#"),
        ("currency", r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]"),
        ("acronym", rf"(?P<tok>{d['ACRO']}\.|[A-Za-z]\.){SNL}+(?:{starters}){SNL}"),
        ("abbrev_end", rf"(?P<tok>{d['ABBREV1']}){d['SENTEND']}"),
        ("keep", rf"(?P<tok>{d['ABBREV1']})[\s\S]{{2}}"),
        ("abbrev_end", d["ABBREV1"]),
        ("keep", rf"{d['ABBREV4']}\."),
        ("keep", rf"(?P<tok>{d['ABBREV3']}){SNL}?{DG}"),
        ("keep", rf"(?P<tok>{d['ABBREV4']}){SP}"),
        ("keep", rf"(?P<tok>{d['ACRO']}){SNL}"),
        ("keep", rf"(?P<tok>{AP}[0-9][0-9]){SNL}"),
        ("keep", rf"(?P<tok>{filename}){SNL}|(?P<tok2>{filename})[.?!,\"'<]"),
        ("word", rf"(?P<tok>{word}\.){insentp}"),
        ("phone", phone),
        ("quote_left", r"(?P<tok>\"|&(?i:quot);)[A-Za-z0-9$]"),
        ("quote_right", r"\"|&(?i:quot);"),
        ("smiley", r"(?P<tok>[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]"),
        ("smiley", (r"[\^x=~<>]\.\[\^x=~<>]", r"[\-^x=~<>']_[\-^x=~<>']", r"\([\-^x=~<>'][_.]?[\-^x=~<>']\)")),
        ("bracket", r"[<>\[\]{}()]|&(?i:lt|gt);"),
        ("hyphens", r"-+"),
        ("ellipsis", r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]"),
        ("keep", r"@+|#+|_+"),
        ("keep", r"\*+|(?:\\\*){1,3}"),
        ("keep", insentp),
        ("keep", r"[?!]+"),
        ("keep", r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]"),
        ("keep", r"[=/]"),
        ("word", rf"(?P<tok>{hthing}\.){insentp}"),
        ("word", hthing),
        ("keep", rf"(?P<tok>{thing}\.){insentp}"),
        ("keep", thing),
        ("amp", rf"(?P<tok>{thinga}\.){insentp}"),
        ("amp", thinga),
        ("quote_left", r"(?P<tok>')[A-Za-z][^ \t\n\r\u00A0]"),
        ("quote_right", redaux),
        ("quote_right", quotes),
        ("keep", r"<<|>>"),
        ("keep", misc),
        ("skip", rf"\x00|{SP}+|[\u200B\u200E\u200F\uFEFF]|&(?i:nbsp);"),
        ("newline", d["NL"]),
    ]
    return [
        (action, re.compile(alternative))
        for action, patterns in table
        for alternative in ((patterns,) if isinstance(patterns, str) else patterns)
    ]


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {
    "(": "-LRB-",
    ")": "-RRB-",
    "[": "-LSB-",
    "]": "-RSB-",
    "{": "-LCB-",
    "}": "-RCB-",
    "&lt;": "<",
    "&gt;": ">",
}
_AMP = re.compile("&amp;", re.IGNORECASE)


def _latex_quotes(text: str, probably_left: bool) -> str:
    if probably_left:
        text = re.sub("&apos;|'", "`", text)
        text = re.sub('"|&quot;', "``", text)
    else:
        text = re.sub("&apos;|'", "'", text)
        text = re.sub('"|&quot;', "''", text)
    text = re.sub("[\u0091\u2018\u201b\u2039]", "`", text)
    text = re.sub("[\u0092\u2019\u203a]", "'", text)
    text = re.sub("[\u0093\u201c\u00ab]", "``", text)
    return re.sub("[\u0094\u201d\u00bb]", "''", text)


def _without_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _currency(text: str) -> str:
    text = text.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", text)


def _trim_trailing_space(text: str) -> str:
    return text.rstrip(" \t\n\x0b\x0c\r\x85")


# action -> f(token text) -> (output token or None, characters consumed from the token's start)
_ACTIONS: dict[str, Callable[[str], tuple[str | None, int]]] = {
    "keep": lambda t: (t, len(t)),
    "skip": lambda t: (None, len(t)),
    "newline": lambda t: (NEWLINE, len(t)),
    "word": lambda t: (_without_soft_hyphens(t), len(t)),
    "number": lambda t: (_without_soft_hyphens(t), len(t)),
    "assim3": lambda t: (t[:-3], len(t) - 3),
    "assim2": lambda t: (t[:-2], len(t) - 2),
    "sgml": lambda t: (t.replace(" ", "\u00a0"), len(t)),
    "dash": lambda t: ("--", len(t)),
    "amp": lambda t: (_AMP.sub("&", t), len(t)),
    "quote_left": lambda t: (_latex_quotes(t, True), len(t)),
    "quote_right": lambda t: (_latex_quotes(t, False), len(t)),
    "frac": lambda t: (t.replace(" ", "\u00a0"), len(t)),
    "frac2": lambda t: ("".join(_FRACTIONS.get(c, c) for c in t), len(t)),
    "currency": lambda t: (_currency(t), len(t)),
    "acronym": lambda t: (t[:1], 1) if len(_trim_trailing_space(t)) == 2 else (_trim_trailing_space(t), len(t) - 1),
    "abbrev_end": lambda t: (t, len(t) - 1),
    "phone": lambda t: (t.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(t)),
    "smiley": lambda t: (t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t)),
    "bracket": lambda t: (_BRACKETS.get(t.lower(), t), len(t)),
    "hyphens": lambda t: ("--" if 3 <= len(t) <= 4 else t, len(t)),
    "ellipsis": lambda t: ("...", len(t)),
}


@lru_cache(maxsize=1)
def _compiled_rules() -> list[tuple[Callable[[str], tuple[str | None, int]], re.Pattern[str], bool]]:
    return [(_ACTIONS[action], pattern, "tok" in pattern.groupindex) for action, pattern in _rules()]


def _token_text(match: re.Match[str], has_tok: bool) -> str:
    if not has_tok:
        return match.group()
    token = match.group("tok")
    return token if token is not None else match.group("tok2")


# Fast path, same result as the rules: an ASCII word followed by a space, a "\n" or the end is a WORD token
# (no other rule matches longer), unless it is an assimilation the rules split; runs of spaces are skipped.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "wanna", "lemme", "gimme"})
_PLAIN_SPACE = re.compile(r"[ \t\u00A0\u2000-\u200A\u3000]+")
# ... and a word of 2+ ASCII letters before a sentence-final "." is a WORD unless it is an abbreviation;
# such a "." (not starting an ellipsis) is a token of its own.
_WORD_BEFORE_PERIOD = re.compile(r"[A-Za-z]{2,}(?=\.(?:[ \n]|\Z))")
_FINAL_PERIOD = re.compile(r"\.(?=[ \n]|\Z)(?![ \u00A0]\.)")


@lru_cache(maxsize=1)
def _abbreviation() -> re.Pattern[str]:
    d = _definitions()
    return re.compile(f"{d['ABBREV1']}|{d['ABBREV4']}\\.|{d['ABBREV3']}")


def ptb_tokens(text: str) -> list[str]:
    """The raw token stream of CoreNLP 3.4.1's PTB lexer (tokenizeNLs on): a "\\n" token per line break."""
    rules = _compiled_rules()
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        word = _PLAIN_WORD.match(text, pos)
        if word is not None and word.group().lower() not in _SPLIT_WORDS:
            tokens.append(word.group())
            pos = word.end()
            continue
        word = _WORD_BEFORE_PERIOD.match(text, pos)
        plain = word is not None and word.group().lower() not in _SPLIT_WORDS
        if plain and not _abbreviation().fullmatch(text, pos, word.end() + 1):
            tokens.append(word.group())
            pos = word.end()
            continue
        period = _FINAL_PERIOD.match(text, pos)
        if period is not None:
            tokens.append(".")
            pos += 1
            continue
        space = _PLAIN_SPACE.match(text, pos)
        if space is not None:
            pos = space.end()
            continue
        best_len, best = 0, None
        for action, pattern, has_tok in rules:
            match = pattern.match(text, pos)
            if match is not None and match.end() - pos > best_len:
                best_len, best = match.end() - pos, (action, _token_text(match, has_tok))
        if best is None:  # untokenizable: CoreNLP's default "firstDelete" drops it
            pos += 1
            continue
        action, matched = best
        token, consumed = action(matched)
        if token is not None:
            tokens.append(token)
        pos += consumed
    return tokens


_JAVA_WORD = re.compile(r"(?:(?![\u2E80-\u9FFF\uF900-\uFAFF])(?:[\w.\u0300-\u036F\u00AD]|-(?=[^\W\d_])))+")


def _is_cased(char: str) -> bool:
    return char.lower() != char or char.upper() != char


def _java_lower(token: str) -> str:
    """Java's toLowerCase(Locale.ENGLISH): as Python's lower(), but a capital sigma becomes final "ς" only at
    the end of a word (letters, digits, "_", "." and a "-" before a letter join words in Java's BreakIterator,
    ideographs do not), with a cased letter before it in the word."""
    if "\u03a3" not in token:
        return token.lower()
    out = [char.lower() for char in token]
    for word in _JAVA_WORD.finditer(token):
        for i in range(word.start(), word.end()):
            if token[i] == "\u03a3" and any(map(_is_cased, token[word.start() : i])):
                out[i] = "\u03c3" if any(map(_is_cased, token[i + 1 : word.end()])) else "\u03c2"
    return "".join(out)


def tokenize_lines(lines: Sequence[str]) -> list[str]:
    """Tokenise captions as one newline-joined batch; one tokenised, punctuation-free string per caption."""
    cleaned = [_LINE_BREAKS.sub(" ", line.replace("\n", " ")) for line in lines]
    out_lines: list[list[str]] = [[]]
    for token in ptb_tokens("\n".join(cleaned)):
        if token == NEWLINE:
            out_lines.append([])
        else:
            out_lines[-1].append(_java_lower(token))
    out_lines += [[] for _ in range(len(lines) - len(out_lines))]
    result = []
    for words in out_lines[: len(lines)]:
        line = " ".join(words).rstrip()
        result.append(" ".join(w for w in line.split(" ") if w not in PUNCTUATIONS))
    return result


def tokenize_captions(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's ``PTBTokenizer().tokenize`` without java.

    Args:
        captions: key -> captions (plain strings, not the reference's ``{"caption": ...}`` dicts).

    Returns:
        key -> tokenised captions: lowercased, PTB-tokenised, punctuation tokens removed, joined by spaces.
    """
    keys = [key for key, texts in captions.items() for _ in texts]
    flat = [text for texts in captions.values() for text in texts]
    result: dict[K, list[str]] = {key: [] for key in captions}
    for key, line in zip(keys, tokenize_lines(flat), strict=True):
        result[key].append(line)
    return result
