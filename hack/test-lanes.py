#!/usr/bin/env python3
"""Runs the workspace's test binaries in parallel lanes (what `make test` runs).

Usage: hack/test-lanes.py [--lanes N] [-- ARGS...]

`cargo test --workspace` runs one test binary after another. Ours mostly
wait: on a private control plane, on a guest in software KVM, on a
kubelet. One binary keeps ~1.2 of this machine's 2 cores busy, and a
binary whose last test is slow leaves the rest of the machine idle, and
the longest one (access, which holds a console idle for ten minutes) is
mostly asleep. This
runs N binaries at once (default 3; KUBEVMM_TEST_LANES), each with
libtest's own threads, taking the longest first (durations of the last run,
kept in $CARGO_TARGET_DIR/test-lanes.json; without them, the order below).
Every binary runs to the end (like --no-fail-fast); its output is printed
whole when it ends, with its time. Exit status 1 if any failed.

ARGS after `--` go to every binary (e.g. a name filter, --ignored).
The tests are safe to overlap: each makes its own control plane, ports,
state directories, bridges and namespaces, named after its process.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

# libtest threads per binary where the default (one per core) is wrong:
# access holds a console idle for ten minutes; a third thread keeps that
# sleeping test from halving the binary's pace.
THREADS = {"access": 3}

# Without durations from an earlier run: known long binaries first.
LONG_FIRST = ["access", "deploy", "images", "helm", "lifecycle", "operator_faults",
              "status", "examples", "storage", "linux", "networking", "operator"]


def log(msg):
    print(f"test-lanes: {msg}", file=sys.stderr, flush=True)


def build(cargo):
    """Builds every test binary; returns [(name, executable, cwd)]."""
    cmd = [cargo, "test", "--workspace", "--no-run", "--message-format=json-render-diagnostics"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        log(f"`{' '.join(cmd)}` failed (errors above)")
        sys.exit(proc.returncode)
    tests = []
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg["profile"]["test"]:
            continue
        target = msg["target"]
        kind = target["kind"][0]
        name = target["name"] if kind == "test" else f"{target['name']} ({kind})"
        tests.append((name, msg["executable"], os.path.dirname(msg["manifest_path"])))
    # Doc tests have no binary of their own: one job runs them all.
    tests.append(("doc-tests", None, None))
    return tests


def order(tests, history):
    """Longest first: the last whole run's durations; a binary without one
    goes before them if LONG_FIRST names it, else after."""
    def key(t):
        name = t[0]
        if name in history:
            return (-history[name], name)
        if name in LONG_FIRST:
            return (-1e6 + LONG_FIRST.index(name), name)
        return (0, name)
    return sorted(tests, key=key)


def summary_of(output):
    """(passed, failed, ignored) summed over libtest's `test result:` lines."""
    p = f = i = 0
    for line in output.splitlines():
        if line.startswith("test result:"):
            words = line.replace(";", "").split()
            for n, w in zip(words, words[1:]):
                if w == "passed":
                    p += int(n)
                elif w == "failed":
                    f += int(n)
                elif w == "ignored":
                    i += int(n)
    return p, f, i


def main():
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        extra = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    lanes = int(os.environ.get("KUBEVMM_TEST_LANES", "3"))
    if args[:1] == ["--lanes"] and len(args) == 2 and args[1].isdigit():
        lanes = int(args[1])
    elif args:
        sys.exit("usage: hack/test-lanes.py [--lanes N] [-- ARGS...]")
    if lanes < 1:
        sys.exit("test-lanes: --lanes (KUBEVMM_TEST_LANES) must be at least 1")

    cargo = os.environ.get("CARGO", "cargo")
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.getcwd(), "target")
    history_file = os.path.join(target, "test-lanes.json")
    try:
        with open(history_file) as f:
            history = json.load(f)
    except (OSError, ValueError):
        history = {}

    t0 = time.monotonic()
    tests = order(build(cargo), history)
    log(f"{len(tests)} test binaries built in {time.monotonic() - t0:.0f}s; running them in {lanes} lanes")

    work = queue.Queue()
    for t in tests:
        work.put(t)
    lock = threading.Lock()
    results = {}
    running = {}

    def lane():
        while True:
            try:
                name, exe, cwd = work.get_nowait()
            except queue.Empty:
                return
            start = time.monotonic()
            args = list(extra)
            if name in THREADS and not any(a.startswith("--test-threads") for a in args):
                args.append(f"--test-threads={THREADS[name]}")
            cmd = [exe, *args] if exe else [cargo, "test", "--workspace", "--doc", "--", *args]
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace",
                                    start_new_session=True)
            with lock:
                running[name] = proc
            out, _ = proc.communicate()
            took = time.monotonic() - start
            with lock:
                del running[name]
                results[name] = (proc.returncode, took, summary_of(out))
                verdict = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                sys.stdout.write(f"\n     Running {name} ({exe or ' '.join(cmd)})\n{out}")
                sys.stdout.write(f"test-lanes: {name}: {verdict} in {took:.1f}s\n")
                sys.stdout.flush()

    def stop(signum, _frame):
        with lock:
            for proc in running.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    threads = [threading.Thread(target=lane, daemon=True) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(1)

    # Only whole runs teach the order (a filtered run's times say nothing);
    # a failed binary's time is an estimate too.
    if not extra:
        history.update({n: round(r[1], 1) for n, r in results.items()})
    try:
        with open(history_file, "w") as f:
            json.dump(history, f, indent=1, sort_keys=True)
    except OSError as e:
        log(f"cannot keep durations in {history_file}: {e}")

    passed = sum(r[2][0] for r in results.values())
    failed = sum(r[2][1] for r in results.values())
    ignored = sum(r[2][2] for r in results.values())
    bad = sorted(n for n, r in results.items() if r[0] != 0)
    busy = sum(r[1] for r in results.values())
    wall = time.monotonic() - t0
    log(f"{passed} passed, {failed} failed, {ignored} ignored in {len(results)} binaries; "
        f"{wall:.0f}s wall for {busy:.0f}s of test time ({lanes} lanes)")
    if bad:
        log("FAILED: " + ", ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
