#!/usr/bin/env python3
"""Check that flake.lock is a complete lock of exactly the inputs flake.nix declares.

Usage: check-lock.py FLAKE_INPUTS_JSON FLAKE_LOCK

FLAKE_INPUTS_JSON is `(import ./flake.nix).inputs` as JSON (nix-instantiate
--eval --strict --json), so flake.nix is read by Nix itself, not by a regex.
Checks, for each input: the lock's root node names it (and nothing else), its
`original` is the flake.nix URL, and its `locked` pins that repository with a
full rev, an SRI sha256 narHash and a lastModified time. Exits 1 on the first
set of problems, printing all of them.
"""

import json
import re
import sys

# nixos-26.05 branched off in May 2026: a lock of it cannot be older.
EARLIEST = 1777593600  # 2026-05-01T00:00:00Z


def parse_github_url(url):
    """github:OWNER/REPO[/REF] -> dict in flake.lock's `original` shape."""
    m = re.fullmatch(r"github:([^/?#]+)/([^/?#]+)(?:/([^?#]+))?", url)
    if not m:
        return None
    original = {"type": "github", "owner": m.group(1), "repo": m.group(2)}
    if m.group(3):
        original["ref"] = m.group(3)
    return original


def main(inputs_path, lock_path):
    with open(inputs_path) as f:
        inputs = json.load(f)
    with open(lock_path) as f:
        lock = json.load(f)

    problems = []

    def problem(msg):
        problems.append(msg)

    if lock.get("version") != 7:
        problem(f"flake.lock version is {lock.get('version')!r}, expected 7")
    nodes = lock.get("nodes", {})
    root_name = lock.get("root")
    root = nodes.get(root_name)
    if root is None:
        problem(f"flake.lock root node {root_name!r} is missing")
        root = {}
    root_inputs = root.get("inputs", {})

    if set(root_inputs) != set(inputs):
        problem(
            f"flake.nix inputs {sorted(inputs)} but flake.lock root inputs {sorted(root_inputs)}"
        )

    for name, spec in sorted(inputs.items()):
        url = spec.get("url") if isinstance(spec, dict) else None
        if url is None:
            problem(f"input {name}: flake.nix gives no url")
            continue
        expected = parse_github_url(url)
        if expected is None:
            problem(f"input {name}: this check only knows github: URLs, not {url!r}")
            continue
        node_name = root_inputs.get(name)
        node = nodes.get(node_name) if isinstance(node_name, str) else None
        if node is None:
            problem(f"input {name}: no lock node (root points to {node_name!r})")
            continue
        if node.get("original") != expected:
            problem(f"input {name}: lock original {node.get('original')} != flake.nix {expected}")
        locked = node.get("locked", {})
        for key in ("type", "owner", "repo"):
            if locked.get(key) != expected[key]:
                problem(f"input {name}: locked.{key} is {locked.get(key)!r}, expected {expected[key]!r}")
        if not re.fullmatch(r"[0-9a-f]{40}", str(locked.get("rev", ""))):
            problem(f"input {name}: locked.rev {locked.get('rev')!r} is not a full 40-hex commit")
        if not re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", str(locked.get("narHash", ""))):
            problem(f"input {name}: locked.narHash {locked.get('narHash')!r} is not an SRI sha256 hash")
        last = locked.get("lastModified")
        if not isinstance(last, int) or last < EARLIEST:
            problem(f"input {name}: locked.lastModified {last!r} is missing or older than the 26.05 branch")
        if "ref" in locked:
            problem(f"input {name}: locked must pin a rev, not a ref")

    # Every node is reachable from the root (no stale entries left behind).
    reachable = {root_name}
    stack = [root_name]
    while stack:
        for target in nodes.get(stack.pop(), {}).get("inputs", {}).values():
            if isinstance(target, str) and target not in reachable:
                reachable.add(target)
                stack.append(target)
    stale = sorted(set(nodes) - reachable)
    if stale:
        problem(f"flake.lock has unreachable nodes: {stale}")

    if problems:
        for p in problems:
            print(f"flake.lock: {p}", file=sys.stderr)
        return 1
    print(f"flake.lock: consistent with flake.nix ({', '.join(sorted(inputs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
