#!/usr/bin/env python3
"""What one S3 request costs on the test cluster, by object size: the figures behind the object size chosen in
docs/object-store.md ("Chunk objects, not packs").

    reqcost.py BUCKET [COUNT] [THREADS]

PUTs COUNT objects of each size (4 KiB, 64 KiB, 256 KiB, 1 MiB, 4 MiB, 5 MiB: rclone's multipart part) under
`reqcost/`, one request at a time, then with THREADS requests in flight, and prints requests per second and MiB/s
for each, then GETs them back the same way; then a LIST of the prefix and the DELETEs. Same environment as s3.py (source the cluster's env file first). Absolute numbers
depend on the machine's load; compare the rows of one run with each other, not runs with runs.
"""

import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import s3  # noqa: E402

SIZES = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 5 << 20]


def put(bucket, key, body):
    status, reason, _, resp = s3.request("PUT", bucket, key, body=body)
    s3.check(status, reason, resp)


def get(bucket, key, size):
    status, reason, _, resp = s3.request("GET", bucket, key)
    s3.check(status, reason, resp)
    assert len(resp) == size, (key, len(resp), size)


def run(bucket, size, count, threads, method):
    body = os.urandom(size)
    keys = [f"reqcost/{size}/{threads}/{i}" for i in range(count)]
    one = (lambda k: put(bucket, k, body)) if method == "PUT" else (lambda k: get(bucket, k, size))
    start = time.monotonic()
    if threads == 1:
        for key in keys:
            one(key)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, keys))
    secs = time.monotonic() - start
    return count / secs, count * size / secs / (1 << 20), secs * 1000 / count


def main(argv):
    if not argv:
        sys.exit(__doc__)
    bucket = argv[0]
    count = int(argv[1]) if len(argv) > 1 else 40
    threads = int(argv[2]) if len(argv) > 2 else 16
    print(f"{'request':>7} {'object':>8} {'in flight':>9} {'req/s':>8} {'MiB/s':>8} {'ms/req':>8}")
    for method in ("PUT", "GET"):
        for size in SIZES:
            for t in (1, threads):
                rps, mibs, ms = run(bucket, size, count, t, method)
                print(f"{method:>7} {size >> 10:>6}Ki {t:>9} {rps:>8.1f} {mibs:>8.1f} {ms:>8.1f}")
    start = time.monotonic()
    status, reason, _, body = s3.request("GET", bucket, query={"list-type": "2", "prefix": "reqcost/"})
    s3.check(status, reason, body)
    print(f"LIST of up to 1000 keys: {(time.monotonic() - start) * 1000:.1f} ms")
    for size in SIZES:
        for t in (1, threads):
            for i in range(count):
                s3.request("DELETE", bucket, f"reqcost/{size}/{t}/{i}")


if __name__ == "__main__":
    main(sys.argv[1:])
