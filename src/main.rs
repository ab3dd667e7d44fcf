//! The `lagprobe` binary: the command line in [`cli`], over the library.

mod cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::main().await
}
