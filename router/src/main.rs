//! `orchard-router`: the router process.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("orchard-router: not built yet")
}
