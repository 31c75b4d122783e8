//! `orchard-worker`: serves the engine over gRPC, or runs one generation from the command line.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("orchard-worker: not built yet")
}
