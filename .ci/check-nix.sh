#!/usr/bin/env bash
# Checks of the Nix flake that can run without nixpkgs (it cannot be fetched
# here, and Debian's Nix 2.8 is too old to evaluate it): every .nix file
# parses, deadnix and nixpkgs-fmt are clean, flake.lock is a complete lock of
# what flake.nix declares, and the builtins-only parts evaluate as expected.
# `nix build` / `nix flake check` are not run: see README.md, section "Nix".
#
# Runs as root on a fresh Debian 12 (CI=true, no stdin); installs what it
# misses: nix-bin (apt), deadnix and nixpkgs-fmt (cargo install --locked).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEADNIX_VERSION=1.3.1
NIXPKGS_FMT_VERSION=1.3.0

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# Single-user Nix as root, no build users; flakes for `nix flake metadata`.
export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command flakes'

log() { printf '==> %s\n' "$*"; }

apt_updated=
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [[ -z $apt_updated ]]; then
    apt-get update -qq
    apt_updated=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_tools() {
  if ! command -v nix-instantiate >/dev/null || ! command -v nix >/dev/null; then
    log "installing nix-bin (apt-get)"
    apt_install nix-bin
  fi
  if ! command -v shellcheck >/dev/null; then
    log "installing shellcheck (apt-get)"
    apt_install shellcheck
  fi
  if ! command -v deadnix >/dev/null; then
    log "installing deadnix $DEADNIX_VERSION (cargo install --locked)"
    cargo install --locked --quiet deadnix --version "$DEADNIX_VERSION"
  fi
  if ! command -v nixpkgs-fmt >/dev/null; then
    log "installing nixpkgs-fmt $NIXPKGS_FMT_VERSION (cargo install --locked)"
    cargo install --locked --quiet nixpkgs-fmt --version "$NIXPKGS_FMT_VERSION"
  fi
  log "tools: $(nix --version), $(deadnix --version), $(nixpkgs-fmt --version), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
}

passed=0
failed=0
check() {
  local name=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    printf 'ok   %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$name"
  fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The flake's own Nix files (the crate's target/ may hold vendored ones).
mapfile -t nix_files < <(
  find . -name '*.nix' -not -path './target/*' -not -path './.git/*' | sort
)

parse_all() {
  local f ok=0
  for f in "${nix_files[@]}"; do
    nix-instantiate --parse "$f" >/dev/null || { echo "does not parse: $f" >&2; ok=1; }
  done
  return "$ok"
}

lock_matches_flake() {
  nix-instantiate --eval --strict --json -E '(import ./flake.nix).inputs' >"$tmp/inputs.json" &&
    python3 nix/ci/check-lock.py "$tmp/inputs.json" flake.lock
}

# Nix's own reading of the lock, offline and without writing it: fails if
# flake.nix's inputs would need the lock changed.
nix_flake_metadata() {
  mkdir -p "$tmp/flake"
  cp flake.nix flake.lock "$tmp/flake/"
  timeout 120 nix flake metadata --offline --no-update-lock-file --json "path:$tmp/flake" \
    >"$tmp/metadata.json" &&
    python3 - "$tmp/metadata.json" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
nodes = meta["locks"]["nodes"]
rev = nodes[nodes["root"]["inputs"]["nixpkgs"]]["locked"]["rev"]
print(f"nix flake metadata: nixpkgs locked at {rev}")
EOF
}

# nix/tests/offline.nix: builtins-only checks of this repository's Nix code.
offline_eval() {
  nix-instantiate --eval --strict --json nix/tests/offline.nix >"$tmp/offline.json" &&
    python3 - "$tmp/offline.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
bad = [r for r in results if not r["ok"]]
for r in results:
    print(("  ok   " if r["ok"] else "  FAIL ") + r["name"])
    if not r["ok"]:
        print("       got: " + json.dumps(r["detail"]))
sys.exit(1 if bad else 0)
EOF
}

# The lab wrapper's text, as writeShellApplication gets it, must pass the
# check that writeShellApplication runs at build time. The text is
# rendered by calling nix/lab.nix with a function that returns the text; the
# store paths are placeholders.
lab_script_shellcheck() {
  nix-instantiate --eval --strict --json -E '
    import ./nix/lab.nix {
      writeShellApplication = args: args.text;
      cfg = {
        netem.delayMs = 1000;
        lab = { httpAddr = "127.0.0.1:8000"; grpcAddr = "127.0.0.1:50051"; };
      };
      lagprobe = "/nix/store/00000000000000000000000000000000-lagprobe";
      postgresql = "/nix/store/00000000000000000000000000000000-postgresql";
    }' >"$tmp/lab.json" &&
    python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); open(sys.argv[2],"w").write("#!/usr/bin/env bash\nset -o errexit\nset -o nounset\nset -o pipefail\n\n" + t)' \
      "$tmp/lab.json" "$tmp/lagprobe-lab" &&
    shellcheck "$tmp/lagprobe-lab"
}

# The generated compose env file only sets variables docker-compose.yml uses,
# and the compose file still names its images the way nix/options.nix assumes:
# project `lagprobe`, a `netem` service without an `image:` key (so compose
# runs `lagprobe-netem:latest`, which packages.netem-image is tagged as) whose
# healthcheck runs `netem-delay`, and an `app` image taken from LAGPROBE_IMAGE.
compose_matches_flake() {
  if [[ ! -f docker-compose.yml ]]; then
    echo "docker-compose.yml not found" >&2
    return 1
  fi
  nix-instantiate --eval --strict --json -E \
    'import ./nix/compose-env.nix { netem = { delayMs = 1000; jitterMs = 0; }; image.tag = "nix"; }' \
    >"$tmp/env.json" &&
    python3 - "$tmp/env.json" docker-compose.yml <<'EOF'
import json, re, sys
text = json.load(open(sys.argv[1]))
lines = open(sys.argv[2]).read().splitlines()
compose = "\n".join(lines)
problems = []

keys = [l.split("=", 1)[0] for l in text.splitlines() if l and not l.startswith("#")]
for k in keys:
    if not re.search(r"\$\{" + re.escape(k) + r"\b", compose):
        problems.append(f"the compose env file sets {k}, which docker-compose.yml does not use")

def service_block(name):
    """The lines of services.<name> (service keys indented by two spaces)."""
    block, inside = [], False
    for line in lines:
        if re.fullmatch(r"  " + re.escape(name) + r":\s*", line):
            inside = True
            continue
        if inside:
            if line.strip() and not line.startswith("    ") and not line.lstrip().startswith("#"):
                break
            block.append(line)
    return block if inside else None

if not re.search(r"^name: lagprobe\s*$", compose, re.M):
    problems.append("the project name is no longer `lagprobe` (image.netemName assumes it)")
netem = service_block("netem")
if netem is None:
    problems.append("there is no netem service")
else:
    if any(re.match(r"    image:", l) for l in netem):
        problems.append("the netem service now has an image: key: make nix/compose-env.nix set it")
    if not any("netem-delay" in l for l in netem):
        problems.append("the netem healthcheck no longer runs netem-delay, the program the Nix image provides")
app = service_block("app")
if app is None or not any(re.match(r"    image: \$\{LAGPROBE_IMAGE\b", l) for l in app):
    problems.append("the app service no longer takes its image from LAGPROBE_IMAGE")

for p in problems:
    print("docker-compose.yml: " + p, file=sys.stderr)
if problems:
    sys.exit(1)
print("docker-compose.yml: uses " + ", ".join(keys)
      + "; netem runs lagprobe-netem:latest; app runs $LAGPROBE_IMAGE")
EOF
}

install_tools
log "checking ${#nix_files[@]} Nix files"
check "every .nix file parses (nix-instantiate --parse)" parse_all
check "deadnix --fail" deadnix --fail "${nix_files[@]}"
check "nixpkgs-fmt --check" nixpkgs-fmt --check "${nix_files[@]}"
check "flake.lock locks exactly flake.nix's inputs (rev, narHash, lastModified)" lock_matches_flake
check "nix flake metadata --offline --no-update-lock-file" nix_flake_metadata
check "offline evaluation (nix/tests/offline.nix)" offline_eval
check "lab wrapper script passes shellcheck" lab_script_shellcheck
check "docker-compose.yml matches the compose env file and the image names" compose_matches_flake

echo "check-nix: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
