{
  description = "lagprobe: make read-after-write anomalies between a PostgreSQL primary and its streaming replica visible";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { nixpkgs, ... }:
    let
      stack = import ./nix/stack.nix {
        inherit nixpkgs;
        root = ./.;
      };
      default = stack.mkStack { };
    in
    {
      # lib.mkStack { netem.delayMs = 250; } gives packages, apps, devShells
      # and checks built from those option values (see nix/options.nix).
      lib = { inherit (stack) mkStack; };

      inherit (default)
        packages
        apps
        devShells
        checks
        ;
    };
}
