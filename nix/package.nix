# lagprobe itself (`package`), and a clippy run over the same sources and
# vendored dependencies (`clippy`). Both use rustPlatform.buildRustPackage
# with the crate's own Cargo.lock, so no hash needs updating when it changes.
{ lib
, rustPlatform
, rustc
, clippy
, postgresql
, testClients
, cargoToml
, src
, lockFile
}:
let
  rustVersion = cargoToml.package.rust-version;

  common = {
    pname = cargoToml.package.name;
    inherit (cargoToml.package) version;
    inherit src;
    cargoLock = { inherit lockFile; };
    # pg_query (the proxy's SQL parser) compiles libpg_query's C and runs
    # bindgen on its headers: the hook puts libclang and the C compiler's
    # include paths where bindgen looks (LIBCLANG_PATH, BINDGEN_EXTRA_CLANG_ARGS).
    nativeBuildInputs = [ rustPlatform.bindgenHook ];
  };

  package = rustPlatform.buildRustPackage (
    common
    // {
      # The tests start real PostgreSQL servers (a primary and a streaming
      # replica each) on loopback ports, in temporary directories, as the
      # build user, and drive the project with real clients (testClients,
      # found on PATH). They look for the server programs in LAGPROBE_PG_BINDIR,
      # then `pg_config --bindir`, then `initdb` on PATH. All three point at
      # nixpkgs' PostgreSQL (its server programs are in the default output,
      # `pg_config` in `dev`).
      nativeCheckInputs = [ postgresql ] ++ testClients;
      preCheck = ''
        export PATH=${postgresql}/bin:$PATH
        export LAGPROBE_PG_BINDIR=${postgresql}/bin
        export HOME="$TMPDIR"
      '';
      # One test at a time: each one runs two servers, and the build machine
      # may have many cores.
      dontUseCargoParallelTests = true;
      # The tests listen on loopback ports, which the macOS sandbox forbids
      # unless asked.
      __darwinAllowLocalNetworking = true;

      meta = {
        inherit (cargoToml.package) description;
        mainProgram = "lagprobe";
        license = [
          lib.licenses.mit
          lib.licenses.asl20
        ];
        platforms = lib.platforms.linux ++ lib.platforms.darwin;
      };
    }
  );

  clippyCheck = rustPlatform.buildRustPackage (
    common
    // {
      pname = "${common.pname}-clippy";
      nativeBuildInputs = common.nativeBuildInputs ++ [ clippy ];
      auditable = false;
      doCheck = false;
      buildPhase = ''
        runHook preBuild
        cargo clippy --offline --locked --all-targets -- -D warnings
        runHook postBuild
      '';
      installPhase = ''
        runHook preInstall
        touch "$out"
        runHook postInstall
      '';
    }
  );
in
assert lib.assertMsg (lib.versionAtLeast rustc.version rustVersion)
  "lagprobe needs rustc >= ${rustVersion} (Cargo.toml rust-version); this nixpkgs has ${rustc.version}.";
{
  inherit package;
  clippy = clippyCheck;
}
