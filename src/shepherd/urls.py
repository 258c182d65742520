"""Worker URLs as the gateway shows them: credentials in a URL are used to connect, and never shown."""

from __future__ import annotations


def display_url(url: str) -> str:
    """`url` as the gateway shows it: credentials in its userinfo masked (`http://user:***@host:port`).

    Requests go to the real URL (aiohttp sends its userinfo as HTTP Basic auth); everything the gateway shows (API
    answers, headers, error bodies, metric labels, logs) uses this form. A userinfo without a password may itself
    be a token, so it is masked whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{shown}@{host}{slash}{path}"


def has_userinfo(url: str) -> bool:
    """Whether `url` carries credentials (`user:password@`); they replace any Bearer key for that worker."""
    return "@" in url.partition("://")[2].partition("/")[0]
