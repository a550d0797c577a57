//! `redpacket-chaos`: a chaos run against a cluster of real processes (see docs/TESTING.md).
//! Exits non-zero when any check fails; the history and verdict are written to --out.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use redpacket_tests::chaos;
use redpacket_tests::chaos::nemesis::Fault;

#[derive(Parser)]
#[command(name = "redpacket-chaos", about = "Run a workload under injected faults and check that nothing was lost")]
struct Cli {
    /// How long the workload and the nemesis run, e.g. 30s, 10m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Faults to inject (comma-separated): kill-leader, kill-follower, kill-two, pause, ledger,
    /// partition, membership.
    #[arg(long, default_value = "kill-leader,kill-follower,kill-two,pause,ledger,partition,membership")]
    nemesis: String,
    /// Seed of the workload and the fault schedule (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Where the history and the verdict go (default: chaos-runs/<seed>).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let faults = cli
        .nemesis
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| Fault::parse(s.trim()).ok_or_else(|| anyhow::anyhow!("nemesis: unknown fault {s:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seed = cli.seed.unwrap_or_else(rand::random);
    let out_dir = cli.out.unwrap_or_else(|| PathBuf::from("chaos-runs").join(seed.to_string()));
    let scenario = chaos::Scenario { nodes: cli.nodes, duration: cli.duration, faults, seed, workers: cli.workers, out_dir };
    println!("chaos run: seed {seed}, {:?}, {} nodes, faults {:?}; replay with --seed {seed}", scenario.duration, scenario.nodes, cli.nemesis);
    let report = tokio::runtime::Runtime::new()?.block_on(chaos::run(&scenario))?;
    println!("{}", report.summary());
    println!("history: {}", scenario.out_dir.join("history.jsonl").display());
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}
