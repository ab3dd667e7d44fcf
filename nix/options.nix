# The lagprobe stack's options: one module, evaluated by `lib.evalModules`
# (see ./stack.nix). It needs nothing but nixpkgs' `lib`, so another flake can
# evaluate it too:
#
#   lagprobe.lib.mkStack { netem.delayMs = 250; }
#
# Every value set here flows to each place that uses it: the netem sidecar
# image's defaults, the lab app's default `--delay-ms`, the generated compose
# env file (packages.compose-env) and the image names and tags.
{ lib, ... }:
let
  inherit (lib) mkOption types;

  # host:port, IPv6 in brackets; nothing a shell would interpret, since the
  # lab wrapper script embeds it.
  listenAddress = types.strMatching "[][A-Za-z0-9.:_-]+:[0-9]+";
in
{
  options = {
    netem = {
      delayMs = mkOption {
        type = types.ints.unsigned;
        default = 1000;
        example = 250;
        description = ''
          One-way delay, in milliseconds, added to the replication link
          between the primary and the replica. It is the netem sidecar's
          default `NETEM_DELAY_MS`, the `NETEM_DELAY_MS` line of the generated
          compose env file, and the default `--delay-ms` of `nix run` (the lab).
          At most 600000 (10 minutes), the largest delay the lab accepts.
        '';
      };

      jitterMs = mkOption {
        type = types.ints.unsigned;
        default = 0;
        example = 50;
        description = ''
          Jitter, in milliseconds, around `netem.delayMs` (netem's
          `delay DELAY JITTER`). It is the netem sidecar's default
          `NETEM_JITTER_MS` and the `NETEM_JITTER_MS` line of the generated
          compose env file. It must not exceed `netem.delayMs`, since
          netem would clamp the negative delays to zero and skew the
          distribution. The lab (`nix run`) applies a fixed delay and does not
          use it.
        '';
      };
    };

    lab = {
      httpAddr = mkOption {
        type = listenAddress;
        default = "127.0.0.1:8000";
        example = "0.0.0.0:8000";
        description = ''
          Default HTTP listen address of `nix run` (the lab), passed as
          `LAGPROBE_HTTP_ADDR` unless that is already set.
        '';
      };

      grpcAddr = mkOption {
        type = listenAddress;
        default = "127.0.0.1:50051";
        example = "0.0.0.0:50051";
        description = ''
          Default gRPC listen address of `nix run` (the lab), passed as
          `LAGPROBE_GRPC_ADDR` unless that is already set.
        '';
      };
    };

    image = {
      tag = mkOption {
        type = types.nonEmptyStr;
        default = "nix";
        example = "latest";
        description = ''
          Tag of the lagprobe image (`packages.image`), loaded as
          `lagprobe:<tag>`. The generated compose env file sets
          `LAGPROBE_IMAGE=lagprobe:<tag>`, the variable docker-compose.yml
          names its `app` (and `delay-link`) image with.
        '';
      };

      netemName = mkOption {
        type = types.nonEmptyStr;
        default = "lagprobe-netem";
        description = ''
          Name of the netem sidecar image (`packages.netem-image`).
          docker-compose.yml builds its `netem` service without an `image:`
          key, so compose tags that build, and looks for it, as
          `<project>-netem` with the project name `lagprobe`: hence the
          default, which lets the Nix-built image take the built one's place.
        '';
      };

      netemTag = mkOption {
        type = types.nonEmptyStr;
        default = "latest";
        description = ''
          Tag of the netem sidecar image; compose's own build of the `netem`
          service is tagged `latest`.
        '';
      };

      uid = mkOption {
        type = types.ints.between 1 65534;
        default = 10001;
        description = ''
          Numeric user and group id that `lagprobe serve` runs as in
          `packages.image`. It must not be 0: the image runs as non-root.
        '';
      };
    };
  };
}
