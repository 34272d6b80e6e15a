#!/usr/bin/env python3
# A/B of the client side of a resume at 50 %: wall time, client CPU seconds and client rchar of the rerun.
# Usage: bench/resume-ab.py A_BIN B_BIN SIZE_MIB ROUNDS (A and B alternate; medians and B/A at the end). Not run by CI.
import os, subprocess, sys, time, shutil, re, statistics, tempfile
a, b, size_mib, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
work = tempfile.mkdtemp()
src = f"{work}/src.bin"
with open(src, "wb") as f:
    for _ in range(size_mib):
        f.write(os.urandom(1 << 20))
def partial(root):
    d = f"{root}/.ferry/partial"
    try:
        return sum(os.path.getsize(f"{d}/{n}") for n in os.listdir(d))
    except FileNotFoundError:
        return 0
def one(bin_):
    root, state = f"{work}/root", f"{work}/state"
    shutil.rmtree(root, ignore_errors=True); shutil.rmtree(state, ignore_errors=True)
    server = subprocess.Popen([bin_, "-q", "serve", "--listen", "127.0.0.1:0", "--root", root], stdout=subprocess.PIPE, text=True)
    addr = re.search(r"listening on (\S+)", server.stdout.readline()).group(1)
    url = f"ferry://{addr}/src.bin"
    c = subprocess.Popen([bin_, "-q", "push", src, url, "--state", state])
    def client_read():
        try:
            return int(re.search(r"rchar: (\d+)", open(f"/proc/{c.pid}/io").read()).group(1))
        except Exception:
            return 0
    # KILL_AT=read: kill once the client read half the file (hashing not through, manifest not cached);
    # default: once the server's partial holds half (as bench/ab.sh).
    done = (lambda: client_read() >= size_mib * 524288) if os.environ.get("KILL_AT") == "read" else (lambda: partial(root) >= size_mib * 524288)
    while not done() and c.poll() is None:
        time.sleep(0.02)
    c.kill(); c.wait()
    t0 = time.time()
    c = subprocess.Popen([bin_, "-q", "push", src, url, "--state", state])
    os.waitid(os.P_PID, c.pid, os.WEXITED | os.WNOWAIT)
    wall = time.time() - t0
    io = open(f"/proc/{c.pid}/io").read()
    rchar = int(re.search(r"rchar: (\d+)", io).group(1))
    st = open(f"/proc/{c.pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
    c.wait()
    assert c.returncode == 0
    server.send_signal(2); server.wait()
    assert subprocess.run(["cmp", src, f"{root}/src.bin"]).returncode == 0
    return wall, cpu, rchar / (1 << 20)
res = {"A": [], "B": []}
for i in range(rounds):
    order = [("A", a), ("B", b)] if i % 2 == 0 else [("B", b), ("A", a)]
    for label, bin_ in order:
        res[label].append(one(bin_))
        print(label, "wall %.3f s  cpu %.2f s  rchar %.0f MiB" % res[label][-1], flush=True)
for k, name in enumerate(["wall s", "client cpu s", "client rchar MiB"]):
    ma = statistics.median(r[k] for r in res["A"]); mb = statistics.median(r[k] for r in res["B"])
    print(f"{name:18} A {ma:.3f}  B {mb:.3f}  B/A {mb/ma:.2f}")
shutil.rmtree(work)
