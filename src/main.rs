//! The `lagprobe` binary: the command line in [`cli`], over the library.

mod cli;

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so that every thread inherits the mask: a
    // SIGINT or SIGTERM arriving before the command has installed its handlers waits for
    // them instead of killing the process half-way through starting a lab.
    cli::hold_stop_signals();
    cli::main()
}
