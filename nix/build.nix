# Everything the flake builds for one system, from one evaluated configuration
# (`cfg`, see ./options.nix and ./stack.nix).
{ pkgs
, cfg
, cargoToml
, src
, lockFile
, netemScript
}:
let
  inherit (pkgs) lib;

  # nixpkgs' default PostgreSQL: the tests' servers (check input), the lab's
  # servers (`nix run`) and the dev shell's.
  inherit (pkgs) postgresql;

  # The real clients the tests drive the project with, besides PostgreSQL's
  # own psql and pgbench: grpcurl, Python's psycopg 3, grpcio (through
  # reflection) and prometheus_client, and headless Chromium (Linux only, as
  # nixpkgs builds it; the browser tests fail elsewhere, saying so).
  testClients = [
    pkgs.grpcurl
    (pkgs.python3.withPackages (ps: [
      ps.psycopg
      ps.prometheus-client
      ps.grpcio
      ps.grpcio-reflection
    ]))
  ] ++ lib.optional pkgs.stdenv.hostPlatform.isLinux pkgs.chromium;

  crate = import ./package.nix {
    inherit (pkgs) lib rustPlatform rustc clippy;
    inherit postgresql testClients cargoToml src lockFile;
  };
  lagprobe = crate.package;

  images = import ./images.nix {
    inherit (pkgs)
      lib
      dockerTools
      fakeNss
      runCommand
      makeWrapper
      dash
      coreutils
      gawk
      gnused
      gnugrep
      iproute2
      iputils
      unixtools
      ;
    inherit cfg lagprobe netemScript;
  };
in
{
  inherit lagprobe;
  inherit (crate) clippy;
  inherit (images) image netem-image;

  rustfmt = pkgs.runCommand "lagprobe-rustfmt-check" { nativeBuildInputs = [ pkgs.rustfmt ]; } ''
    cd ${src}
    find . -name '*.rs' -print0 | sort -z \
      | xargs -0 rustfmt --check --edition ${cargoToml.package.edition}
    touch "$out"
  '';

  compose-env = pkgs.writeText "lagprobe-compose.env" (import ./compose-env.nix cfg);

  lab = import ./lab.nix {
    inherit (pkgs) writeShellApplication;
    inherit cfg lagprobe postgresql;
  };

  devShell = pkgs.mkShell {
    packages = [
      pkgs.cargo
      pkgs.rustc
      pkgs.clippy
      pkgs.rustfmt
      pkgs.rust-analyzer
      postgresql
      pkgs.docker-compose
      pkgs.shellcheck
      # libclang for pg_query's bindgen step (the hook sets LIBCLANG_PATH and
      # BINDGEN_EXTRA_CLANG_ARGS in the shell too)
      pkgs.rustPlatform.bindgenHook
    ] ++ testClients;
    # `lagprobe lab` and the tests look here first, then `pg_config --bindir`,
    # then `initdb` on PATH, which the shell hook puts first.
    LAGPROBE_PG_BINDIR = "${postgresql}/bin";
    shellHook = ''
      export PATH=${postgresql}/bin:$PATH
    '';
    # rust-analyzer's standard library sources, matching the shell's rustc.
    RUST_SRC_PATH = "${pkgs.rustPlatform.rustLibSrc}";
  };
}
