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
, gawk
, gnused
, gnugrep
, iproute2
, iputils
, unixtools
, cfg
, lagprobe
, netemScript
}:
let
  uid = toString cfg.image.uid;

  # The netem sidecar: the compose stack's POSIX sh script, run by dash (as
  # Debian's /bin/sh runs it in postgresql/Dockerfile) with what it calls on
  # PATH: tc and ip (iproute2), getent, awk, sort, tr, sed, grep, sleep, and
  # ping (iputils) for `docker compose exec netem ping`. Installed as
  # `netem-delay`, the name the compose healthcheck runs. Its defaults come
  # from the flake option; the environment (the compose file, `docker run
  # -e`) still overrides them.
  netemDelay = runCommand "netem-delay"
    {
      nativeBuildInputs = [ makeWrapper ];
      meta.mainProgram = "netem-delay";
    }
    ''
      install -D -m 0755 ${netemScript} "$out/libexec/lagprobe/netem-delay.sh"
      makeWrapper ${dash}/bin/dash "$out/bin/netem-delay" \
        --add-flags "$out/libexec/lagprobe/netem-delay.sh" \
        --prefix PATH : ${lib.makeBinPath netemTools} \
        --set-default NETEM_DELAY_MS ${toString cfg.netem.delayMs} \
        --set-default NETEM_JITTER_MS ${toString cfg.netem.jitterMs}
    '';

  netemTools = [
    iproute2
    iputils
    unixtools.getent
    gawk
    coreutils
    gnused
    gnugrep
  ];
in
{
  image = dockerTools.streamLayeredImage {
    name = "lagprobe";
    inherit (cfg.image) tag;
    contents = [
      lagprobe
      # /bin/sh: docker-compose.yml's delay-link service starts through
      # `/bin/sh -c`, as it can with the Dockerfile's Debian base.
      dockerTools.binSh
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
    name = cfg.image.netemName;
    tag = cfg.image.netemTag;
    contents = [
      netemDelay
      # /etc/passwd (root), and /etc/nsswitch.conf so that getent reads
      # /etc/hosts before DNS.
      fakeNss
      # `docker compose exec netem sh`
      dockerTools.binSh
    ] ++ netemTools;
    config = {
      # Runs as root: tc needs CAP_NET_ADMIN, the capability docker-compose.yml
      # grants this service (with NET_RAW for ping) after dropping all others.
      Entrypoint = [ "/bin/netem-delay" ];
      Cmd = [ "run" ];
      Env = [
        "PATH=/bin"
        "NETEM_DELAY_MS=${toString cfg.netem.delayMs}"
        "NETEM_JITTER_MS=${toString cfg.netem.jitterMs}"
      ];
      Labels = {
        "org.opencontainers.image.title" = "lagprobe-netem";
        "org.opencontainers.image.description" = "netem sidecar delaying the lagprobe replication link (default ${toString cfg.netem.delayMs} ms, jitter ${toString cfg.netem.jitterMs} ms)";
      };
    };
  };
}
