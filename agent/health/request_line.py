"""A health check's `requestLine`, read the way HAProxy reads `option httpchk <args>`.

Rancher wrote the field straight into HAProxy's config (`option httpchk {{requestLine}}`), so
users have two spellings in their specs: the old unquoted `GET /healthz HTTP/1.0` and the quoted
form the 1.6 UI writes, `GET "/healthz" "HTTP/1.1\\r\\nHost: example.com"`, where `\\r\\n` are
literal backslash sequences that HAProxy's config parser expands into the request's header
lines. Both are tokenized here by HAProxy's rules (double quotes expand escapes, single quotes
are literal, a backslash escapes outside quotes too) and then given HAProxy's defaults:

=================================  ==========================================
requestLine                        request sent
=================================  ==========================================
``/ping``                          ``OPTIONS /ping HTTP/1.0``
``GET /ping``                      ``GET /ping HTTP/1.0``
``GET /ping HTTP/1.1``             ``GET /ping HTTP/1.1``
``GET "/" "HTTP/1.1\\r\\nHost: a"``  ``GET / HTTP/1.1`` + header ``Host: a``
=================================  ==========================================

The result is checked strictly (a token method, a path without spaces or controls, HTTP/1.0 or
1.1, well-formed header lines) so a bad line is refused when the spec is validated, with the
reason, instead of becoming a check that can never pass (Rancher's "stuck initializing").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LENGTH = 2048
DEFAULT_METHOD = "OPTIONS"  # HAProxy's default when only a URI is given
DEFAULT_VERSION = "HTTP/1.0"

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}\Z")
_URI = re.compile(r"(/[\x21-\x7e]*|\*)\Z")
_VERSION = re.compile(r"HTTP/1\.[01]\Z")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\Z")
_SIMPLE_ESCAPES = {" ": " ", "\\": "\\", "#": "#", "'": "'", '"': '"', "r": "\r", "n": "\n", "t": "\t"}


class RequestLineError(ValueError):
    """The requestLine cannot be turned into a request; the message says why."""


@dataclass(frozen=True, slots=True)
class HttpCheck:
    """The request an HTTP health check sends: HAProxy's method, URI, version and headers."""

    method: str
    uri: str
    version: str
    headers: tuple[str, ...] = ()

    def request(self) -> bytes:
        """The bytes on the wire: request line, header lines, the blank line."""
        lines = [f"{self.method} {self.uri} {self.version}", *self.headers, "", ""]
        return "\r\n".join(lines).encode("ascii")


def parse_request_line(text: str) -> HttpCheck:
    """An HTTP check from a non-empty requestLine; RequestLineError says what is wrong."""
    if len(text) > MAX_LENGTH:
        raise RequestLineError(f"is longer than {MAX_LENGTH} characters")
    tokens = tokenize(text)
    if not tokens:
        raise RequestLineError("is blank; leave requestLine empty (or null) for a TCP connect check")
    if len(tokens) > 3:
        raise RequestLineError(
            f"has {len(tokens)} words; expected [METHOD] URI [VERSION], e.g. 'GET /healthz HTTP/1.0' "
            "(quote a word that contains spaces)")
    if len(tokens) == 1:
        method, uri, rest = DEFAULT_METHOD, tokens[0], DEFAULT_VERSION
    elif len(tokens) == 2:
        (method, uri), rest = tokens, DEFAULT_VERSION
    else:
        method, uri, rest = tokens
    if not _METHOD.match(method):
        raise RequestLineError(f"method {method!r} is not an HTTP method (a word such as GET, HEAD or OPTIONS)")
    if not _URI.match(uri):
        raise RequestLineError(f"URI {uri!r} must start with '/' and hold no spaces or control characters")
    version, *headers = rest.split("\r\n")
    if not _VERSION.match(version):
        raise RequestLineError(f"version {version!r} must be HTTP/1.0 or HTTP/1.1 (headers follow as \\r\\n...)")
    for header in headers:
        if not _HEADER.match(header):
            raise RequestLineError(
                f"header line {header!r} must be 'Name: value' without control characters "
                "(separate header lines with \\r\\n, with nothing after the last)")
    return HttpCheck(method=method, uri=uri, version=version, headers=tuple(headers))


def tokenize(text: str) -> list[str]:
    """Split like HAProxy's config parser: blanks separate words; "..." groups and expands
    escapes; '...' groups literally; a backslash escapes outside quotes too."""
    tokens: list[str] = []
    word: list[str] = []
    in_word = False
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and quote != "'":
            expanded, i = _escape(text, i)
            word.append(expanded)
            in_word = True
            continue
        if quote:
            if char == quote:
                quote = ""
            else:
                word.append(char)
        elif char in "\"'":
            quote, in_word = char, True
        elif char in " \t":
            if in_word:
                tokens.append("".join(word))
                word, in_word = [], False
        elif char == "#":
            raise RequestLineError("has an unquoted '#', which HAProxy reads as the start of a comment; quote or escape it")
        elif char < " " or char == "\x7f":
            raise RequestLineError(f"holds the control character {char!r}; write \\r\\n between header lines")
        else:
            word.append(char)
            in_word = True
        i += 1
    if quote:
        raise RequestLineError(f"has an unterminated {quote} quote")
    if in_word:
        tokens.append("".join(word))
    return tokens


def _escape(text: str, i: int) -> tuple[str, int]:
    """The character a backslash sequence at text[i] stands for, and the index after it."""
    if i + 1 >= len(text):
        raise RequestLineError("ends with a lone backslash")
    code = text[i + 1]
    if code in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[code], i + 2
    if code == "x":
        digits = text[i + 2:i + 4]
        if len(digits) == 2 and all(c in "0123456789abcdefABCDEF" for c in digits):
            return chr(int(digits, 16)), i + 4
        raise RequestLineError("has \\x without two hex digits")
    raise RequestLineError(f"has the unknown escape \\{code}; HAProxy knows \\r \\n \\t \\\\ \\\" \\' \\# \\<space> \\xHH")
