#!/usr/bin/env python3
"""Runs CRIU's zdtm static suite through `telefork dump` and `telefork restore`.

Every test of CRIU's test/zdtm/static is built from a CRIU source tree (never downloaded),
started the way zdtm.py starts it in its host flavour (`make NAME.pid`, the same
environment, hooks), captured with `telefork dump`, restored with `telefork restore
--detach`, sent SIGTERM, and classified by what it then says about its own state:

  pass            the restored test wrote PASS
  refused         dump or restore exited with 3: it refused a piece of state it cannot
                  carry, naming it (grouped by the kind the message names)
  failed          dump or restore failed with another error (the message is kept)
  WRONG           restored, and the test reported FAIL (or died without a verdict)
  HUNG            restored, but no verdict within the timeout (then killed)
  could-not-start the test did not reach its pid file without any capture
  skipped         zdtm itself would not run it here (noauto, no host flavour, other arch,
                  its .checkskip says no)
  not-built       the Makefile lists it, but it did not compile (a missing library)

Usage (as root):  scripts/criu-zdtm.py --criu-src ~/criu [--work DIR] [--keep] [TEST...]

The script makes itself a child subreaper, so every process a test leaves behind, the
restored copy included, becomes its child: it reaps the dumped process at once (so its PID
is free for the restore), learns how a restored test died, and at the end of each test
kills by PID whatever the test left running. No process it did not start is touched.
"""

import argparse
import ast
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

PR_SET_CHILD_SUBREAPER = 36
CLASSES = ["pass", "refused", "failed", "WRONG", "HUNG", "could-not-start", "skipped",
           "not-built"]
# zdtm.py's own environment for a non-suid test: it drops to these ids (zdtm/lib/test.c).
ZDTM_IDS = {"ZDTM_UID": "18943", "ZDTM_GID": "58467", "ZDTM_GROUPS": "27495 48244"}


def log(msg):
    print(msg, flush=True)


def set_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("criu-zdtm: prctl(PR_SET_CHILD_SUBREAPER): %s"
                 % os.strerror(ctypes.get_errno()))


# ---------------------------------------------------------------- processes


def alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def reap(pid):
    """Reaps pid if it is our dead child; returns its wait status, or None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if got == pid else None


def wait_gone(pid, timeout):
    """Waits until pid has exited (reaping it if it is ours). Returns (gone, status)."""
    deadline = time.monotonic() + timeout
    while True:
        status = reap(pid)
        if status is not None:
            return True, status
        if not alive(pid):
            # Not our child (or already reaped): a zombie elsewhere or gone.
            return True, None
        if time.monotonic() >= deadline:
            return False, None
        time.sleep(0.05)


def kill_pid(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def proc_stat(pid):
    """(ppid, session) of pid, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def sweep(sessions):
    """Kills, by PID, every process that is our child (orphans of the tests, reparented to
    us) or in one of the given sessions (the tests' own, they call setsid), until none is
    left, and reaps them. Called only while no helper of ours runs."""
    me = os.getpid()
    killed = []
    for _ in range(50):
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            st = proc_stat(int(d))
            if st and (st[0] == me or st[1] in sessions) and alive(int(d)):
                found.append(int(d))
        for pid in found:
            kill_pid(pid)
        killed += found
        while True:
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if got == 0:
                break
        if not found:
            break
        time.sleep(0.05)
    return sorted(set(killed))


def run(cmd, timeout, **kw):
    """Runs a helper with fds >= 3 closed; returns (rc, stdout, stderr), rc None on timeout
    (the helper is then killed by PID). Its output goes to files, not pipes: a process it
    leaves behind holding a pipe would make us wait for ever."""
    with tempfile.TemporaryFile("w+", errors="replace") as out, \
            tempfile.TemporaryFile("w+", errors="replace") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             close_fds=True, **kw)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_pid(p.pid)
            p.wait()
            rc = None
        out.seek(0)
        err.seek(0)
        return rc, out.read(), err.read()


# ---------------------------------------------------------------- messages


def error_text(stderr):
    """The message of a failed command: from its first `telefork: error:` to the end, on
    one line (a path in it may hold a newline); else its last line."""
    i = stderr.find("telefork: error:")
    if i >= 0:
        return " ".join(stderr[i + len("telefork: error:"):].split())
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    return lines[-1] if lines else "(no message)"


EXIT_CANNOT_CARRY = 3

REFUSAL_MARKS = ("not supported yet", "cannot be captured", "cannot be carried",
                 "can be carried so far", "can be restored so far", "cannot travel",
                 "is refused", "refused", "not carried", "cannot be restored",
                 "cannot be mapped again", "cannot be reopened", "is not reachable",
                 "process trees cannot be captured", "would lift its sandbox")


def refusal_kind(msg, refused=False):
    """The kind of state a refusal names, taken from its text; None if msg is no refusal
    (`refused`: the CLI said it is one, by its exit status)."""
    if not refused and not any(k in msg for k in REFUSAL_MARKS) \
            and not re.search(r"\bfd \d+ is an? ", msg):
        return None
    if "before giving up privileges" in msg:
        return "fd opened before setuid"
    if re.search(r"holds a (lease|deleg)", msg):
        return "fd: lease"
    if "cgroup " in msg:
        return "cgroup membership"
    if "AIO ring" in msg:
        return "mapping: AIO ring"
    if "VmFlag" in msg:
        return "mapping flag"
    m = re.search(r"\bfd \d+ is an? (.+?) \(", msg)
    if m:
        return "fd: " + m.group(1)
    if re.search(r"\bfd \d+ \(.*\(deleted\)\)", msg):
        return "fd: deleted file"
    if re.search(r"\d+ threads: only single-threaded", msg) or "threads: only single" in msg:
        return "threads"
    if re.search(r"has (a child process|\d+ child processes)", msg):
        return "children"
    if "runs under seccomp" in msg:
        return "seccomp"
    if "working directory" in msg:
        return "cwd: " + ("deleted" if "deleted" in msg else "unreachable")
    if re.search(r"mapping 0x[0-9a-f]+-0x[0-9a-f]+ is backed by the deleted file", msg):
        return "mapping: deleted file"
    if re.search(r"the executable of process \d+ .*was deleted", msg):
        return "exe: deleted"
    # Otherwise: the thing the innermost error names (what comes after the engine's
    # "...; it was left running: " / "nothing was made: "), without numbers and paths.
    inner = re.split(r"(?:left running|nothing was made|nothing was left running): ", msg)[-1]
    what = inner.split(": ")[0]
    what = re.sub(r"\(.*?\)", "", what)
    what = re.sub(r"0x[0-9a-f]+(-0x[0-9a-f]+)?", "ADDR", what)
    what = re.sub(r'"[^"]*"', "PATH", what)
    what = re.sub(r"\b(process|fd) \d+\b", r"\1", what)
    what = re.sub(r"\d+", "N", what)
    return " ".join(what.split())[:60] or "other"


def verdict(outfile):
    """(kind, text) from a test's .out or .out.inprogress: kind is 'PASS', 'FAIL' or None,
    text the FAIL lines (or the file's tail); and which file had it."""
    for path, where in ((outfile, ".out"), (outfile + ".inprogress", ".out.inprogress")):
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        # (Without zdtm's "HH:MM:SS.mmm:  PID: " prefix.)
        lines = [re.sub(r"^\d\d:\d\d:\d\d\.\d+:\s+\d+:\s*", "", l.strip())
                 for l in text.splitlines() if l.strip()]
        fails = [l for l in lines if "FAIL" in l or "ERR:" in l or "Error" in l]
        tokens = [t.strip() for t in text.split()]
        if "PASS" in tokens and not [l for l in lines if "FAIL" in l]:
            return "PASS", "", where
        if fails:
            return "FAIL", " | ".join(fails[-4:]), where
        return None, " | ".join(lines[-3:]), where
    return None, "", None


def describe(status):
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return "killed by %s" % signal.Signals(os.WTERMSIG(status)).name
    return "exit status %d" % os.WEXITSTATUS(status)


def what_it_tests(static, name):
    """One line about the test, from its .c (the test_doc / TEST_DOC string)."""
    try:
        with open(os.path.join(static, name + ".c"), errors="replace") as f:
            src = f.read()
    except OSError:
        return ""
    m = re.search(r"test_doc\s*=\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)", src)
    if not m:
        return ""
    return " ".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1))).replace("\\n", " ")[:160]


# ---------------------------------------------------------------- build and list


def make_var(static, var):
    snippet = "print-var:\n\t@echo $(%s)\n" % var
    p = subprocess.run(["make", "--no-print-directory", "-s", "-f", "Makefile", "-f", "-",
                        "print-var"], cwd=static, input=snippet, text=True,
                       capture_output=True, close_fds=True)
    return p.stdout.split()


def build(src, work, jobs, fresh):
    zdtm = os.path.join(work, "zdtm")
    if fresh and os.path.exists(zdtm):
        shutil.rmtree(zdtm)
    if not os.path.exists(zdtm):
        shutil.copytree(os.path.join(src, "test", "zdtm"), zdtm, symlinks=True)
    blog = os.path.join(work, "build.log")
    with open(blog, "w") as f:
        for d in ("lib", "static"):
            log("criu-zdtm: building test/zdtm/%s (log: %s)" % (d, blog))
            subprocess.run(["make", "-k", "-j%d" % jobs, "-C", os.path.join(zdtm, d)],
                           stdout=f, stderr=subprocess.STDOUT, close_fds=True)
    return zdtm


def list_tests(src, static):
    excl = ["route_rules", "criu-rtc.so"]
    try:
        with open(os.path.join(src, "test", "zdtm.desc")) as f:
            d = ast.literal_eval(f.read())
        excl = [e.split("/", 1)[1] for e in d.get("exclude", []) if e.startswith("static/")]
    except (OSError, ValueError, SyntaxError):
        pass
    tests = []
    for f in sorted(os.listdir(static)):
        p = os.path.join(static, f)
        st = os.lstat(p)
        if not (st.st_mode & 0o100) or not os.path.isfile(p) or os.path.islink(p):
            continue
        if f.endswith(".checkskip") or f.endswith(".hook") or f in excl:
            continue
        tests.append(f)
    return tests


def read_desc(static, name):
    p = os.path.join(static, name + ".desc")
    try:
        with open(p) as f:
            text = f.read()
    except OSError:
        return {}
    if not text.strip():
        return {}
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    # A few are Python expressions (mnt_ext_dev reads the environment): zdtm.py evaluates
    # them, and so do we; the tree is the caller's own CRIU checkout.
    try:
        d = eval(text, {"os": os})  # noqa: S307
        return d if isinstance(d, dict) else {"_unreadable": text.strip()}
    except Exception:  # noqa: BLE001
        return {"_unreadable": text.strip()}


def flags(desc):
    return desc.get("flags", "").split()


def skip_reason(static, name, desc, arch):
    if "_unreadable" in desc:
        return "unreadable .desc"
    if desc.get("arch", arch) != arch:
        return "arch %s" % desc["arch"]
    if "noauto" in flags(desc):
        return "noauto"
    if "h" not in desc.get("flavor", "h ns uns").split():
        return "no host flavour (%s)" % desc.get("flavor")
    chs = os.path.join(static, name + ".checkskip")
    if os.access(chs, os.X_OK):
        rc, _, _ = run([chs], 60, cwd=static)
        if rc != 0:
            return "checkskip"
    return None


# ---------------------------------------------------------------- one test


def hook(static, name, arg, env):
    """Runs NAME.hook ARG as zdtm.py does: from the directory above zdtm/ (hooks name their
    files as zdtm/static/...). Its output goes to a file, not a pipe: some hooks leave a
    daemon behind that holds their stdout."""
    h = os.path.join(static, name + ".hook")
    if not os.access(h, os.X_OK):
        return None
    top = os.path.dirname(os.path.dirname(static))
    logf = os.path.join(top, "hook.log")
    with open(logf, "w+") as out:
        p = subprocess.Popen([os.path.join("zdtm", "static", name + ".hook"), arg], cwd=top,
                             env=env, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, close_fds=True)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_pid(p.pid)
            p.wait()
            rc = "timeout"
        out.seek(0)
        text = out.read()
    if rc != 0:
        return "hook %s failed (%s): %s" % (arg, rc, " ".join(text.split())[-200:])
    return None


def mounts_under(pred):
    """Mount points (of /proc/self/mountinfo) for which pred(path) holds, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # (Octal escapes: \040 for a space, as the kernel writes them.)
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                          line.split()[4])
            if pred(path):
                found.append(path)
    return sorted(set(found), key=lambda p: -p.count("/"))


def unmount(paths):
    for p in paths:
        subprocess.run(["umount", "-l", p], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, close_fds=True)
    return paths


def test_mounts(static, name):
    """What a test mounted on its own files (NAME.test, NAME.dir.test, ...): the cgroup
    tests mount hierarchies there and leave them when they do not come back to unmount."""
    own = re.compile(r"^%s/%s(\.[^/]*)?\.test(/|$)" % (re.escape(static), re.escape(name)))
    return mounts_under(own.match)


def cleanout(static, name):
    unmount(test_mounts(static, name))
    subprocess.run(["make", "--no-print-directory", "-s", "-C", static, name + ".cleanout"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


def run_test(args, static, name, desc, images, capture=True):
    """Runs one test; returns a dict: class, kind, message, note. Without capture, the
    test is only started and stopped (to check a WRONG or HUNG verdict against it)."""
    res = {"test": name, "class": None, "kind": "", "message": "", "note": "",
           "flags": desc.get("flags", ""), "opts": desc.get("opts", "")}
    env = dict(os.environ)
    env["TMPDIR"] = env.get("TMPDIR", "/tmp")
    env["ZDTM_THREAD_BOMB"] = "5"
    if "suid" not in flags(desc):
        env.update(ZDTM_IDS)
    outfile = os.path.join(static, name + ".out")
    pidfile = os.path.join(static, name + ".pid")
    img = os.path.join(images, name + ".img")
    sessions = set()
    cleanout(static, name)
    try:
        # -- start, as zdtm.py does: `make NAME.pid` with fds >= 3 closed
        start_timeout = int(desc.get("timeout") or 30)
        with tempfile.TemporaryFile("w+", errors="replace") as mlog:
            mk = subprocess.Popen(["make", "--no-print-directory", "-C", static,
                                   name + ".pid"], env=env, stdin=subprocess.DEVNULL,
                                  stdout=mlog, stderr=subprocess.STDOUT, close_fds=True)
            herr = hook(static, name, "--post-start", env)
            try:
                mrc = mk.wait(timeout=start_timeout)
            except subprocess.TimeoutExpired:
                kill_pid(mk.pid)
                mk.wait()
                mrc = "timeout"
            mlog.seek(0)
            mout = mlog.read()
        pid = None
        try:
            with open(pidfile) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        if mrc != 0 or herr or not pid or not alive(pid):
            v, text, _ = verdict(outfile)
            why = herr or "make %s.pid: %s" % (name, mrc)
            res.update({"class": "could-not-start",
                        "message": "%s; %s" % (why, text or " ".join(mout.split())[-200:])})
            if desc.get("feature"):
                res["note"] = "needs CRIU feature(s): %s" % desc["feature"]
            return res
        sessions.add(pid)
        if not capture:
            kill_pid(pid, signal.SIGTERM)
            gone, status = wait_gone(pid, args.timeout)
            v, text, _ = verdict(outfile)
            if not gone:
                res.update({"class": "HUNG", "message": "no verdict; log: " + text})
            else:
                res.update({"class": "pass" if v == "PASS" else "WRONG",
                            "message": text if v != "PASS" else ""})
            return res

        # -- dump
        env["ZDTM_TEST_PID"] = str(pid)
        herr = hook(static, name, "--pre-dump", env)
        if herr:
            res.update({"class": "failed", "message": herr})
            return res
        rc, out, err = run([args.telefork, "dump", "--pid", str(pid), "--out", img],
                           args.dump_timeout)
        if rc != 0:
            msg = "dump: " + (error_text(err) if rc is not None else "timed out")
            # Exit status 3: the CLI refused state it cannot carry (the message names it).
            kind = (refusal_kind(msg, True) or "other") if rc == EXIT_CANNOT_CARRY else None
            res.update({"class": "refused" if kind else "failed", "kind": kind or "",
                        "message": msg})
            # Untouched by the refusal: its own verdict, uncaptured, for the record.
            if alive(pid):
                kill_pid(pid, signal.SIGTERM)
                wait_gone(pid, args.timeout)
                v, text, _ = verdict(outfile)
                if v != "PASS":
                    res["note"] = "after the refused dump, uncaptured: %s %s" % (v, text)
            return res
        gone, _ = wait_gone(pid, 10)  # we are its subreaper: its zombie goes now
        if not gone:
            res.update({"class": "failed", "message": "dump succeeded but the process lives"})
            return res

        # -- restore
        herr = hook(static, name, "--pre-restore", env)
        if herr:
            res.update({"class": "failed", "message": herr})
            return res
        # --trust-image: the image is this script's own, made a moment ago as root, of a
        # process that holds zdtm's ids (uid 18943, groups 27495 48244), which no user of
        # this machine has: without it every non-suid test is refused at restore.
        restore = [args.telefork, "restore", img, "--detach", "--trust-image"]
        # (CRIU's --manage-cgroups=ignore: the restored process stays in the restorer's.)
        if "--manage-cgroups=ignore" in str(desc.get("ropts", "")):
            restore.append("--ignore-cgroups")
        rc, out, err = run(restore, args.restore_timeout)
        lines = out.strip().splitlines()
        rpid = int(lines[-1]) if rc == 0 and lines and lines[-1].strip().isdigit() else None
        if rc != 0 or rpid is None:
            msg = "restore: " + (error_text(err) if rc is not None else "timed out")
            # Exit status 3: the CLI refused state it cannot carry (the message names it).
            kind = (refusal_kind(msg, True) or "other") if rc == EXIT_CANNOT_CARRY else None
            res.update({"class": "refused" if kind else "failed", "kind": kind or "",
                        "message": msg})
            return res
        sessions.add(rpid)
        if rpid != pid:
            res["note"] = "new PID %d (was %d)" % (rpid, pid)
        env["ZDTM_TEST_PID"] = str(rpid)
        herr = hook(static, name, "--post-restore", env)

        # -- stop and read the verdict
        kill_pid(rpid, signal.SIGTERM)
        gone, status = wait_gone(rpid, args.timeout)
        if not gone:
            kill_pid(rpid)
            wait_gone(rpid, 5)
            v, text, _ = verdict(outfile)
            res.update({"class": "HUNG",
                        "message": "no verdict %ds after SIGTERM; log: %s" % (args.timeout, text)})
            return res
        v, text, where = verdict(outfile)
        if where == ".out.inprogress" and v is not None:
            res["note"] = (res["note"] + "; " if res["note"] else "") + \
                "verdict in .out.inprogress (the test saw its PID change)"
        if v == "PASS" and not herr:
            res["class"] = "pass"
        elif v == "PASS":
            res.update({"class": "WRONG", "message": herr})
        elif v == "FAIL":
            res.update({"class": "WRONG", "message": text})
        else:
            res.update({"class": "WRONG", "message": "exited without a verdict (%s); log: %s"
                        % (describe(status), text or "(empty)")})
        return res
    finally:
        killed = sweep(sessions)
        if killed:
            res["note"] = (res["note"] + "; " if res["note"] else "") + \
                "killed leftovers %s" % ",".join(map(str, killed))
        env.pop("ZDTM_TEST_PID", None)
        hook(static, name, "--clean", env)
        left = unmount(test_mounts(static, name))
        if left:
            res["note"] = (res["note"] + "; " if res["note"] else "") + \
                "unmounted what it left: " + " ".join(os.path.basename(p) for p in left)
        if not args.keep and os.path.exists(img):
            os.unlink(img)
        if not args.keep:
            cleanout(static, name)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criu-src", default=os.environ.get("CRIU_SRC"),
                    help="CRIU source tree (with test/zdtm); default $CRIU_SRC")
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/criu-zdtm"),
                    help="the script's own directory for the build, images and results "
                         "(default $WORK or /tmp/criu-zdtm)")
    ap.add_argument("--telefork", default=None,
                    help="the telefork binary (default target/release/telefork of this repo)")
    ap.add_argument("--results", default=None,
                    help="machine-readable results, JSON (default WORK/results.json; a .tsv "
                         "beside it)")
    ap.add_argument("--timeout", type=int, default=10,
                    help="seconds to wait for a verdict after SIGTERM (default 10)")
    ap.add_argument("--dump-timeout", type=int, default=120)
    ap.add_argument("--restore-timeout", type=int, default=120)
    ap.add_argument("--jobs", type=int, default=2, help="make -j for the build")
    ap.add_argument("--fresh", action="store_true",
                    help="copy and build the tests anew (default: reuse WORK/zdtm)")
    ap.add_argument("--keep", action="store_true",
                    help="keep images, test files and WORK (default: each test's files go "
                         "after it, the build stays in WORK for the next run)")
    ap.add_argument("--no-recheck", action="store_true",
                    help="do not run each WRONG or HUNG test again without capture (by "
                         "default it is, and its uncaptured verdict noted)")
    ap.add_argument("--clean", action="store_true",
                    help="remove the build and images from WORK at the end (not the results)")
    ap.add_argument("tests", nargs="*", help="only these tests (names or regexes)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("criu-zdtm: needs root (zdtm tests and telefork dump do)")
    if not args.criu_src or not os.path.isfile(
            os.path.join(args.criu_src, "test", "zdtm", "static", "Makefile")):
        sys.exit("criu-zdtm: give a CRIU source tree with --criu-src or CRIU_SRC "
                 "(it needs test/zdtm/static/Makefile); nothing is downloaded")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args.telefork = os.path.abspath(args.telefork or
                                    os.path.join(repo, "target", "release", "telefork"))
    if not os.access(args.telefork, os.X_OK):
        sys.exit("criu-zdtm: no telefork binary at %s (cargo build --release -p telefork-cli)"
                 % args.telefork)
    src = os.path.abspath(args.criu_src)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o755)
    results = args.results or os.path.join(work, "results.json")
    set_subreaper()

    zdtm = build(src, work, args.jobs, args.fresh)
    static = os.path.join(zdtm, "static")
    # zdtm.py's __add_wperms: the tests drop to uid 18943 and write beside themselves.
    os.chmod(static, os.stat(static).st_mode | 0o222)
    os.chmod(zdtm, os.stat(zdtm).st_mode | 0o555)
    images = os.path.join(work, "images")
    os.makedirs(images, exist_ok=True)
    stale = unmount(mounts_under(lambda p: p.startswith(zdtm + "/")))
    if stale:
        log("criu-zdtm: unmounted what an earlier run left: %s" % " ".join(stale))

    tests = list_tests(src, static)
    listed = make_var(static, "TST")
    not_built = sorted(t for t in listed if t not in tests)
    names = sorted(set(tests) | set(not_built))
    if args.tests:
        pats = [re.compile("^(%s)$" % t) for t in args.tests]
        names = [n for n in names if any(p.match(n) for p in pats)]
    arch = os.uname()[4]
    log("criu-zdtm: %d tests (%d not built: %s); telefork %s" %
        (len(names), len([n for n in not_built if n in names]),
         " ".join(n for n in not_built if n in names) or "-", args.telefork))

    rows = []
    started = time.monotonic()
    for i, name in enumerate(names):
        desc = read_desc(static, name)
        if name in not_built:
            r = {"test": name, "class": "not-built", "kind": "", "message": "did not compile "
                 "(see build.log)", "note": "", "flags": desc.get("flags", ""), "opts": ""}
        else:
            why = skip_reason(static, name, desc, arch)
            if why:
                r = {"test": name, "class": "skipped", "kind": why, "message": "", "note": "",
                     "flags": desc.get("flags", ""), "opts": desc.get("opts", "")}
            else:
                r = run_test(args, static, name, desc, images)
        if r["class"] in ("WRONG", "HUNG"):
            r["about"] = what_it_tests(static, name)
            if not args.no_recheck:
                u = run_test(args, static, name, desc, images, capture=False)
                r["uncaptured"] = u["class"] + (": " + u["message"] if u["message"] else "")
                r["note"] = (r["note"] + "; " if r["note"] else "") + \
                    "uncaptured: " + r["uncaptured"]
        rows.append(r)
        detail = r["kind"] + (": " if r["kind"] and r["message"] else "") + r["message"]
        if r["note"]:
            detail += "  [%s]" % r["note"]
        log("%3d/%d %-28s %-15s %s" % (i + 1, len(names), name, r["class"], detail))

    # -- summary
    counts = {c: 0 for c in CLASSES}
    kinds = {}
    skips = {}
    for r in rows:
        counts[r["class"]] += 1
        if r["class"] == "refused":
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        if r["class"] == "skipped":
            k = r["kind"].split(" (")[0]
            skips[k] = skips.get(k, 0) + 1
    log("\ncriu-zdtm: %d tests in %.0f s" % (len(rows), time.monotonic() - started))
    log("%-18s %5s" % ("class", "count"))
    for c in CLASSES:
        also = [r for r in rows if r["class"] == c and r.get("uncaptured", "pass") != "pass"]
        log("%-18s %5d%s" % (c, counts[c], "  (%d of them fail without capture too: %s)"
                             % (len(also), " ".join(r["test"] for r in also)) if also else ""))
    if kinds:
        log("\nrefused, by kind:")
        for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
            log("  %-50s %4d" % (k, n))
    if skips:
        log("\nskipped, why:")
        for k, n in sorted(skips.items(), key=lambda kv: (-kv[1], kv[0])):
            log("  %-50s %4d" % (k, n))
    for c in ("WRONG", "HUNG", "failed"):
        bad = [r for r in rows if r["class"] == c]
        if bad:
            log("\n%s:" % c)
            for r in bad:
                log("  %s%s: %s" % (r["test"], " (%s)" % r["about"] if r.get("about") else "",
                                    r["message"]))

    with open(results, "w") as f:
        json.dump({"counts": counts, "refused_by_kind": kinds, "skipped_by_reason": skips,
                   "tests": rows}, f, indent=1)
    tsv = os.path.splitext(results)[0] + ".tsv"
    with open(tsv, "w") as f:
        f.write("test\tclass\tkind\tmessage\tnote\n")
        for r in rows:
            f.write("\t".join(str(r[k]).replace("\t", " ").replace("\n", " ")
                              for k in ("test", "class", "kind", "message", "note")) + "\n")
    log("\ncriu-zdtm: results in %s and %s" % (results, tsv))
    if args.clean and not args.keep:
        shutil.rmtree(zdtm)
        shutil.rmtree(images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
