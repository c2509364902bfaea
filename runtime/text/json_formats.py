"""JSON Schema's `format` values that structured output enforces, each as a regular expression
(re.fullmatch semantics, ASCII only) whose every match is valid for the format. Not every valid
text matches: each entry says what it leaves out. runtime.text.json_regex compiles them.
"""

from __future__ import annotations

_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999
_MONTH_DAY = (r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"  # the 28 days every month has
              r"|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)")
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_TOP_LABEL = r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join([rf"(?:{_H16}:){{6}}{_LS32}", rf"::(?:{_H16}:){{5}}{_LS32}"]
                 + [rf"(?:(?:{_H16}:){{0,{n - 1}}}{_H16})?::(?:{_H16}:){{{5 - n}}}{_LS32}" for n in range(1, 5)]
                 + [rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}", rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
                    rf"(?:(?:{_H16}:){{0,6}}{_H16})?::"])  # RFC 3986's nine forms
_D = "[0-9]+"
_DUR_TIME = rf"T(?:{_D}H(?:{_D}M(?:{_D}S)?)?|{_D}M(?:{_D}S)?|{_D}S)"
_DUR_DATE = rf"(?:{_D}D|{_D}M(?:{_D}D)?|{_D}Y(?:{_D}M(?:{_D}D)?)?)(?:{_DUR_TIME})?"
_PCT = r"%[0-9A-Fa-f]{2}"
_PCHAR = rf"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|{_PCT})"  # RFC 3986: unreserved, sub-delims, ":", "@"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)"
# a URI's host labels hold no "--" (so no "xn--" punycode label, which URL parsers decode and may
# refuse), at most 61 characters
_URI_LABEL = r"[A-Za-z0-9](?:-?[A-Za-z0-9]){0,30}"
_URI_HOST = rf"(?:(?:{_URI_LABEL}\.)*[A-Za-z](?:-?[A-Za-z0-9]){{0,30}}|{_IPV4}|\[(?:{_IPV6})\])"
_SC = "[A-Za-z0-9+.-]"
# any scheme but "file" (URL parsers refuse a port in a file URL), which is written without a port
_NOT_FILE = (rf"[A-Za-z](?:{_SC}{{0,2}}|{_SC}{{4,}})|[A-EG-Za-eg-z]{_SC}{{3}}|[fF][A-HJ-Za-hj-z0-9+.-]{_SC}{{2}}"
             rf"|[fF][iI][A-KM-Za-km-z0-9+.-]{_SC}|[fF][iI][lL][A-DF-Za-df-z0-9+.-]")
_URI = (rf"(?:(?:{_NOT_FILE})://{_URI_HOST}(?::{_PORT})?|[fF][iI][lL][eE]://{_URI_HOST})"
        rf"(?:/{_PCHAR}*)*(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?")

# format -> a regex (re.fullmatch semantics, ASCII only) whose every match is valid for the format
# (with FORMAT_MAX_LEN's cap where one is given). Not every valid text matches: see each note.
FORMATS = {
    "date": _DATE,  # RFC 3339 full-date, years 0001-9999
    "time": _TIME,  # full-time: an offset required, upper-case Z, at most 9 fraction digits, no leap second
    "date-time": rf"{_DATE}T{_TIME}",  # upper-case T
    "uuid": r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}",
    "email": rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+)*@(?:{_LABEL}\.)+{_TOP_LABEL}",
    "ipv4": _IPV4,  # dotted decimal, no leading zeros
    "ipv6": _IPV6,  # no zone (%eth0)
    "hostname": rf"(?:{_LABEL}\.)*{_TOP_LABEL}",  # RFC 1123; the last label starts with a letter
    "duration": rf"P(?:{_DUR_DATE}|{_DUR_TIME}|{_D}W)",  # RFC 3339 appendix A
    # RFC 3986 URI with an authority (scheme://host), the host a hostname (no "--" in a label), an
    # IPv4 address or a bracketed IPv6 one, no user info, a port up to 65535 (none in a file URL),
    # ASCII only: what pydantic's AnyUrl takes too
    "uri": _URI,
}
FORMAT_MAX_LEN = {"hostname": 253, "email": 254}  # lengths the regexes cannot count (RFC 1035, RFC 5321)
