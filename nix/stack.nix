# `mkStack`: evaluate the options module (./options.nix) with one user
# module and build every flake output from the evaluated configuration.
#
#   mkStack { }                       -> the flake's own outputs
#   mkStack { netem.delayMs = 250; }  -> the same outputs, 250 ms everywhere
#
# The argument is any module: an attribute set of option values (as above), a
# function `{ lib, ... }: { ... }`, or a path to a file holding one.
{ nixpkgs, root }:
let
  inherit (nixpkgs) lib;

  linuxSystems = [ "x86_64-linux" "aarch64-linux" ];
  darwinSystems = [ "x86_64-darwin" "aarch64-darwin" ];
  allSystems = linuxSystems ++ darwinSystems;
  isLinux = system: builtins.elem system linuxSystems;

  cargoToml = builtins.fromTOML (builtins.readFile (root + "/Cargo.toml"));

  sources = import ./sources.nix root;

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions (
      sources.crate ++ map lib.fileset.maybeMissing sources.crateOptional
    );
  };

  evalStack =
    module:
    lib.evalModules {
      class = "lagprobe";
      modules = [
        ./options.nix
        {
          _file = "lagprobe.lib.mkStack argument";
          imports = [ module ];
        }
      ];
    };

  # The lab's `--delay-ms` accepts at most 10 minutes.
  maxDelayMs = 600000;

  # Forces every option value, so that a bad definition (a negative or
  # non-integer delay, say) fails the evaluation of any output with the
  # module system's message, which names the option. Then checks what a
  # type cannot say alone.
  checkConfig =
    config:
    let
      inherit (config.netem) delayMs jitterMs;
    in
    builtins.deepSeq config (
      if delayMs > maxDelayMs then
        throw "lagprobe: netem.delayMs (${toString delayMs}) must be at most ${toString maxDelayMs} (10 minutes), the largest delay lagprobe lab accepts."
      else if jitterMs > delayMs then
        throw "lagprobe: netem.jitterMs (${toString jitterMs}) must not exceed netem.delayMs (${toString delayMs}): netem would clamp the negative delays to 0 ms."
      else
        config
    );

  mkStack =
    module:
    let
      evaluated = evalStack module;
      cfg = checkConfig evaluated.config;

      forSystems =
        systems: f:
        builtins.seq cfg (lib.genAttrs systems (system: f system (build system)));

      build =
        system:
        import ./build.nix {
          pkgs = nixpkgs.legacyPackages.${system};
          inherit cfg cargoToml src;
          inherit (sources) netemScript;
          lockFile = root + "/Cargo.lock";
        };
    in
    {
      inherit (evaluated) options;
      config = cfg;

      packages = forSystems allSystems (
        system: b:
          {
            default = b.lagprobe;
            inherit (b) lagprobe compose-env;
          }
          // lib.optionalAttrs (isLinux system) {
            inherit (b) image netem-image lab;
          }
      );

      apps = forSystems linuxSystems (
        _: b: {
          default = {
            type = "app";
            program = lib.getExe b.lab;
            meta.description = "Start the lagprobe lab (a primary, a delayed replica and the probe) with nixpkgs' PostgreSQL";
          };
        }
      );

      devShells = forSystems allSystems (_: b: { default = b.devShell; });

      checks = forSystems linuxSystems (
        _: b: {
          inherit (b) lagprobe clippy rustfmt;
        }
      );
    };
in
{
  inherit mkStack;
}
