# The two OCI images, as dockerTools.streamLayeredImage scripts: building
# them yields a program that writes the image tarball to stdout, so
#
#   nix build .#image && ./result | docker load
#
# loads it without storing the tarball in the Nix store.
{ lib
, dockerTools
, fakeNss
, runCommand
, makeWrapper
, dash
, coreutils
, iproute2
, iputils
, unixtools
, cfg
, lagprobe
, netemScript
}:
let
  uid = toString cfg.image.uid;

  # The netem sidecar: the compose stack's POSIX sh script, run by dash with
  # the tools it needs (tc and ip from iproute2, ping from iputils, getent)
  # on PATH. Its defaults come from the flake option; the environment (the
  # compose file, `docker run -e`) still overrides them.
  netem = runCommand "lagprobe-netem"
    {
      nativeBuildInputs = [ makeWrapper ];
      meta.mainProgram = "lagprobe-netem";
    }
    ''
      install -D -m 0755 ${netemScript} "$out/libexec/lagprobe/netem.sh"
      makeWrapper ${dash}/bin/dash "$out/bin/lagprobe-netem" \
        --add-flags "$out/libexec/lagprobe/netem.sh" \
        --prefix PATH : ${lib.makeBinPath [ iproute2 iputils unixtools.getent coreutils ]} \
        --set-default NETEM_DELAY_MS ${toString cfg.netem.delayMs} \
        --set-default NETEM_JITTER_MS ${toString cfg.netem.jitterMs}
    '';
in
{
  image = dockerTools.streamLayeredImage {
    name = "lagprobe";
    inherit (cfg.image) tag;
    contents = [
      lagprobe
      # /etc/passwd and /etc/group with the non-root user the server runs as.
      (fakeNss.override {
        extraPasswdLines = [ "lagprobe:x:${uid}:${uid}:lagprobe:/var/empty:/bin/sh" ];
        extraGroupLines = [ "lagprobe:x:${uid}:" ];
      })
    ];
    extraCommands = ''
      mkdir -m 1777 tmp
    '';
    config = {
      User = "${uid}:${uid}";
      Entrypoint = [ "/bin/lagprobe" ];
      Cmd = [ "serve" ];
      Env = [
        "PATH=/bin"
        "LAGPROBE_HTTP_ADDR=0.0.0.0:8000"
        "LAGPROBE_GRPC_ADDR=0.0.0.0:50051"
      ];
      ExposedPorts = {
        "8000/tcp" = { };
        "50051/tcp" = { };
      };
      WorkingDir = "/tmp";
      # `lagprobe healthcheck` GETs http://127.0.0.1:8000/readyz; durations
      # are nanoseconds (Docker image spec, config.Healthcheck).
      Healthcheck = {
        Test = [ "CMD" "/bin/lagprobe" "healthcheck" ];
        Interval = 5 * 1000000000;
        Timeout = 3 * 1000000000;
        StartPeriod = 10 * 1000000000;
        Retries = 6;
      };
      Labels = {
        "org.opencontainers.image.title" = "lagprobe";
        "org.opencontainers.image.description" = lagprobe.meta.description;
        "org.opencontainers.image.version" = lagprobe.version;
      };
    };
  };

  netem-image = dockerTools.streamLayeredImage {
    name = "lagprobe-netem";
    inherit (cfg.image) tag;
    # binSh gives `docker exec ... sh` and shell healthchecks a /bin/sh.
    contents = [
      netem
      iproute2
      iputils
      unixtools.getent
      coreutils
      dockerTools.binSh
    ];
    config = {
      # tc needs CAP_NET_ADMIN: the compose file grants it to this service.
      Entrypoint = [ "/bin/lagprobe-netem" ];
      Env = [
        "PATH=/bin"
        "NETEM_DELAY_MS=${toString cfg.netem.delayMs}"
        "NETEM_JITTER_MS=${toString cfg.netem.jitterMs}"
      ];
      Labels = {
        "org.opencontainers.image.title" = "lagprobe-netem";
        "org.opencontainers.image.description" = "netem sidecar delaying the lagprobe replication link by ${toString cfg.netem.delayMs} ms (jitter ${toString cfg.netem.jitterMs} ms)";
      };
    };
  };
}
