//! The `tailkitd` command line: parse, pick the subcommand, map errors to
//! exit codes. Everything else lives in the library.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
