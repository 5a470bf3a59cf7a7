# Runs the netbpf command line for the collection's modules and reads its --json output.
# Only the CLI's JSON is read (never its tables); no policy logic lives here.
from __future__ import annotations

import json


def netbpf_command(module, *args):
    """The argv of `netbpf [-n NETNS] ARGS` for the module's executable and netns options."""
    exe = module.params.get("executable") or module.get_bin_path("netbpf", required=True)
    argv = [exe]
    if module.params.get("netns"):
        argv += ["-n", module.params["netns"]]
    return argv + list(args)


def run_json(module, *args, cwd=None):
    """(rc, parsed stdout or None, stderr) of a netbpf subcommand run with --json."""
    rc, out, err = module.run_command(netbpf_command(module, *args), cwd=cwd)
    try:
        data = json.loads(out) if out.strip() else None
    except ValueError:
        data = None
    return rc, data, err


def error_lines(errors):
    """netbpf's own text for each error record: FILE:LINE:COL: path: message."""
    lines = []
    for e in errors or ():
        where = ""
        if e.get("file"):
            where = e["file"] + "".join(f":{e[k]}" for k in ("line", "column") if e.get(k)) + ": "
        path = f"{e['path']}: " if e.get("path") else ""
        lines.append(where + path + e["message"])
    return lines


def fail_from(module, what, rc, data, err, **result):
    """Fail the task with netbpf's messages and exit code (errors from JSON, else stderr)."""
    lines = error_lines((data or {}).get("errors"))
    msg = "\n".join(lines) if lines else (err.strip() or f"netbpf exited with {rc}")
    module.fail_json(msg=f"{what}: {msg}", rc=rc, stderr=err, errors=(data or {}).get("errors", []),
                     **result)
