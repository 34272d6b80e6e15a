#!/usr/bin/env python3
"""A minimal S3 client for the Garage test scripts: standard library only, SigV4, path-style.

    s3.py [-H 'Name: value']... put BUCKET KEY FILE     FILE '-' reads standard input
    s3.py [-H 'Name: value']... get BUCKET KEY          the body on standard output
    s3.py head BUCKET KEY                               the response headers, one a line
    s3.py list BUCKET PREFIX                            the keys under PREFIX, one a line
    s3.py du BUCKET PREFIX                              "OBJECTS BYTES" stored under PREFIX (LIST sizes)
    s3.py delete BUCKET KEY

Credentials and endpoint come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_REGION (the variables tests/garage/cluster.sh writes). Every request carries
`x-amz-content-sha256` (the SHA-256 of the body, signed): Garage refuses a request without it.
Exit status: 0 on a 2xx answer, 22 on any other HTTP status (printed on standard error as
`HTTP <status> <reason>` and the body's first 400 bytes), 2 on a usage error, 1 on a network error.
"""

import datetime
import hashlib
import hmac
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

TIMEOUT = 60  # seconds per request
MAX_LIST_PAGES = 10_000  # bounds the pagination loop
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def quote(text, safe="-_.~"):
    """URI-encode as SigV4 wants: unreserved characters kept, the rest %XX (upper case)."""
    return urllib.parse.quote(text, safe=safe)


def hmac_sha256(key, msg):
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret, date, region):
    k = hmac_sha256(("AWS4" + secret).encode(), date)
    k = hmac_sha256(k, region)
    k = hmac_sha256(k, "s3")
    return hmac_sha256(k, "aws4_request")


def request(method, bucket, key="", query=None, body=b"", extra_headers=None):
    """Send one signed request; return (status, reason, headers, body)."""
    endpoint = os.environ["AWS_ENDPOINT_URL"].rstrip("/")
    access = os.environ["AWS_ACCESS_KEY_ID"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "garage"
    host = urllib.parse.urlsplit(endpoint).netloc

    path = "/" + quote(bucket)
    if key:
        path += "/" + quote(key, safe="-_.~/")
    query = sorted((query or {}).items())
    canonical_query = "&".join(f"{quote(k)}={quote(v)}" for k, v in query)

    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()

    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    for name, value in (extra_headers or {}).items():
        headers[name.lower()] = value.strip()
    signed = sorted(headers)
    canonical_headers = "".join(f"{h}:{headers[h]}\n" for h in signed)
    signed_headers = ";".join(signed)
    canonical_request = "\n".join(
        [method, path, canonical_query, canonical_headers, signed_headers, payload_hash]
    )
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    signature = hmac.new(signing_key(secret, date, region), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )

    url = endpoint + path + ("?" + canonical_query if canonical_query else "")
    data = body if method in ("PUT", "POST") else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, resp.reason, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.reason, dict(err.headers), err.read()


def check(status, reason, body):
    if 200 <= status < 300:
        return
    sys.stderr.write(f"HTTP {status} {reason}\n{body[:400].decode(errors='replace')}\n")
    sys.exit(22)


def list_keys(bucket, prefix, each=lambda key, size: print(key)):
    token = None
    for _ in range(MAX_LIST_PAGES):
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        status, reason, _, body = request("GET", bucket, query=query)
        check(status, reason, body)
        root = ET.fromstring(body)
        for item in root.iter(S3_NS + "Contents"):
            each(item.find(S3_NS + "Key").text, int(item.find(S3_NS + "Size").text))
        truncated = root.find(S3_NS + "IsTruncated")
        if truncated is None or truncated.text != "true":
            return
        token = root.find(S3_NS + "NextContinuationToken").text
    sys.exit("s3.py: listing did not end within the page bound")


def main(argv):
    extra = {}
    while len(argv) >= 2 and argv[0] == "-H":
        name, sep, value = argv[1].partition(":")
        if not sep:
            sys.exit(f"s3.py: bad header {argv[1]!r} (want 'Name: value')")
        extra[name.strip()] = value
        argv = argv[2:]
    if not argv:
        sys.exit(__doc__)
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "put" and len(args) == 3:
            bucket, key, src = args
            body = sys.stdin.buffer.read() if src == "-" else open(src, "rb").read()
            status, reason, headers, resp = request("PUT", bucket, key, body=body, extra_headers=extra)
            check(status, reason, resp)
        elif cmd == "get" and len(args) == 2:
            status, reason, _, resp = request("GET", args[0], args[1], extra_headers=extra)
            check(status, reason, resp)
            sys.stdout.buffer.write(resp)
        elif cmd == "head" and len(args) == 2:
            status, reason, headers, resp = request("HEAD", args[0], args[1], extra_headers=extra)
            check(status, reason, resp)
            for name, value in sorted(headers.items()):
                print(f"{name.lower()}: {value}")
        elif cmd == "list" and len(args) == 2:
            list_keys(args[0], args[1])
        elif cmd == "du" and len(args) == 2:
            total = [0, 0]

            def add(_key, size):
                total[0] += 1
                total[1] += size

            list_keys(args[0], args[1], add)
            print(total[0], total[1])
        elif cmd == "delete" and len(args) == 2:
            status, reason, _, resp = request("DELETE", args[0], args[1], extra_headers=extra)
            check(status, reason, resp)
        else:
            sys.stderr.write(__doc__)
            sys.exit(2)
    except OSError as err:  # connection refused, reset, timeout
        sys.stderr.write(f"s3.py: {err}\n")
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
