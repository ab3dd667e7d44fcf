# The repository files the Nix build reads, relative to the flake root. Only
# builtins here: ./stack.nix turns these into the build's source (lib.fileset)
# and nix/tests/offline.nix checks them offline.
root: {
  # What `cargo build` and `cargo test` read: the Cargo files, the build
  # script, the sources, the .proto files (compiled by build.rs with protox)
  # and the migrations (embedded by sqlx::migrate!).
  crate = map (p: root + p) [
    "/Cargo.toml"
    "/Cargo.lock"
    "/build.rs"
    "/src"
    "/proto"
    "/migrations"
  ];
  # Taken when present: the integration tests, sqlx's offline query data and
  # the rustfmt and clippy settings (so the checks match `cargo fmt` and
  # `cargo clippy` run in the repository).
  crateOptional = map (p: root + p) [
    "/tests"
    "/.sqlx"
    "/rustfmt.toml"
    "/.rustfmt.toml"
    "/clippy.toml"
    "/.clippy.toml"
  ];
  # The netem sidecar's script, owned by the compose stack (postgresql/Dockerfile
  # installs it as /usr/local/bin/netem-delay).
  netemScript = root + "/postgresql/netem-delay.sh";
}
