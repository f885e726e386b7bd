# A Python function as a new user writes one: text in, statistics out. It imports the standard
# library's json, re, hashlib and datetime and a package from PyPI (python-dateutil, in
# requirements.txt), and builds its tables at module level, once, in init.
#
#   thaw pack examples/python/words
#   thaw invoke words.thaw --data '{"text": "Ada met Bob on 2024-03-01. Bob wrote back on 2024-03-09."}'
#
# Run as a script, it answers one request from stdin, as `python3 handler.py` would on a host.
import datetime
import hashlib
import json
import re
import sys

from dateutil import parser as dates
from dateutil.relativedelta import relativedelta

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2} (?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]* \d{4}\b")

with open(__file__.rsplit("/", 1)[0] + "/stopwords.txt") as f:
    STOPWORDS = frozenset(f.read().split())

# Module-level work worth keeping in the snapshot: the English letter frequencies of a long
# sample text, which each request's text is scored against.
SAMPLE = " ".join(sorted(STOPWORDS)) * 200
LETTERS = {c: SAMPLE.count(c) / len(SAMPLE) for c in "abcdefghijklmnopqrstuvwxyz"}


def englishness(text):
    counts = {c: text.count(c) for c in LETTERS}
    total = sum(counts.values()) or 1
    return round(1 - sum(abs(counts[c] / total - LETTERS[c]) for c in LETTERS) / 2, 4)


def handle(request):
    text = json.loads(request or b"{}").get("text", "")
    lower = text.lower()
    words = WORD.findall(lower)
    counts = {}
    for word in words:
        if word not in STOPWORDS:
            counts[word] = counts.get(word, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    mentioned = sorted(dates.parse(m).date() for m in DATE.findall(lower))
    span = relativedelta(mentioned[-1], mentioned[0]) if mentioned else relativedelta()
    return {
        "words": len(words),
        "top": top,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "dates": [d.isoformat() for d in mentioned],
        "span": {"months": span.months + 12 * span.years, "days": span.days},
        "weekday": mentioned[0].strftime("%A") if mentioned else None,
        "year_day": mentioned[0].timetuple().tm_yday if mentioned else None,
        "englishness": englishness(lower),
        "epoch": datetime.date(1970, 1, 1).isoformat(),
    }


if __name__ == "__main__":
    sys.stdout.write(json.dumps(handle(sys.stdin.buffer.read())))
