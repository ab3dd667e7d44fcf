# The flake's checks that need no nixpkgs (it cannot be fetched in CI): run by
# .ci/check-nix.sh as
#
#   nix-instantiate --eval --strict --json nix/tests/offline.nix
#
# They use builtins only and test this repository's own Nix code and data,
# never a stand-in for nixpkgs. Each entry: { name, ok, detail }.
let
  root = ../..;
  flake = import (root + "/flake.nix");
  sources = import ../sources.nix root;
  composeEnv = import ../compose-env.nix;
  cargoToml = builtins.fromTOML (builtins.readFile (root + "/Cargo.toml"));

  check = name: ok: detail: { inherit name ok detail; };

  sample = {
    netem = { delayMs = 250; jitterMs = 20; };
    image.tag = "test";
  };
  zero = sample // { netem = { delayMs = 0; jitterMs = 0; }; };

  envLines = text: builtins.filter (l: l != "" && builtins.substring 0 1 l != "#") (
    builtins.filter builtins.isString (builtins.split "\n" text)
  );
in
[
  (check "flake.nix: the only input is nixpkgs on nixos-26.05"
    (flake.inputs == { nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05"; })
    flake.inputs)

  (check "flake.nix: outputs takes only declared inputs"
    (builtins.all (a: a == "self" || flake.inputs ? ${a})
      (builtins.attrNames (builtins.functionArgs flake.outputs)))
    (builtins.functionArgs flake.outputs))

  (check "flake.nix: has a description"
    (builtins.isString flake.description && flake.description != "")
    flake.description)

  (check "sources: every file the crate build reads exists"
    (builtins.all builtins.pathExists sources.crate)
    (map toString (builtins.filter (p: !builtins.pathExists p) sources.crate)))

  (check "sources: the netem sidecar script exists"
    (builtins.pathExists sources.netemScript)
    (toString sources.netemScript))

  (check "Cargo.toml: has what nix/package.nix reads"
    (builtins.all (k: cargoToml.package ? ${k})
      [ "name" "version" "edition" "rust-version" "description" ])
    (builtins.attrNames cargoToml.package))

  (check "compose env: the option values, one NAME=value line each"
    (envLines (composeEnv sample) == [
      "NETEM_DELAY_MS=250"
      "NETEM_JITTER_MS=20"
      "LAGPROBE_IMAGE=lagprobe:test"
    ])
    (composeEnv sample))

  (check "compose env: zero values are written, not dropped"
    (envLines (composeEnv zero) == [
      "NETEM_DELAY_MS=0"
      "NETEM_JITTER_MS=0"
      "LAGPROBE_IMAGE=lagprobe:test"
    ])
    (composeEnv zero))
]
