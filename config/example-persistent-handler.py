#!/usr/bin/env python3
"""A persistent spoold handler (handler.mode = "persistent"), standard library only.

spoold starts it once per worker and writes one JSON line per job on its stdin:
    {"id": "01J...", "path": "/var/spool/spoold/active/01J...", "attempt": 1}
It answers each with one JSON line on stdout:
    {"id": "01J...", "status": 0}                    done
    {"id": "01J...", "status": 75, "reason": "..."}  as exit status 75 in exec mode
Anything it prints on stderr is logged with the job's ID. Expensive set-up (imports, a
database connection) goes before the loop: it is paid once, not per job.
"""
import json
import sys


def handle(path, attempt):
    """Does the work on the job file at `path`; returns 0 when done, or an exit status."""
    with open(path, "rb") as f:
        data = f.read()
    print(f"got {len(data)} bytes, attempt {attempt}", file=sys.stderr, flush=True)
    return 0


def main():
    for line in sys.stdin:  # one job per line; the end of stdin means: exit now
        job = json.loads(line)
        try:
            status, reason = handle(job["path"], job["attempt"]), None
        except Exception as e:  # the job fails; the handler serves the next one
            status, reason = 1, f"{type(e).__name__}: {e}"
        answer = {"id": job["id"], "status": status}
        if reason:
            answer["reason"] = reason
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()  # the answer must not wait in a buffer


if __name__ == "__main__":
    main()
