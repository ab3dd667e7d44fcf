# `nix run`: `lagprobe lab` with nixpkgs' PostgreSQL, needing nothing else
# installed. The flake option gives the defaults; the caller's environment
# and flags win (`nix run . -- --delay-ms 50`).
{ writeShellApplication
, cfg
, lagprobe
, postgresql
}:
writeShellApplication {
  name = "lagprobe-lab";
  runtimeInputs = [
    lagprobe
    postgresql
  ];
  text = ''
    : "''${LAGPROBE_PG_BINDIR:=${postgresql}/bin}"
    : "''${LAGPROBE_DELAY_MS:=${toString cfg.netem.delayMs}}"
    : "''${LAGPROBE_HTTP_ADDR:=${cfg.lab.httpAddr}}"
    : "''${LAGPROBE_GRPC_ADDR:=${cfg.lab.grpcAddr}}"
    export LAGPROBE_PG_BINDIR LAGPROBE_DELAY_MS LAGPROBE_HTTP_ADDR LAGPROBE_GRPC_ADDR
    exec lagprobe lab "$@"
  '';
  meta.description = "lagprobe lab: a PostgreSQL primary, a replica behind a ${toString cfg.netem.delayMs} ms link, and the probe";
}
