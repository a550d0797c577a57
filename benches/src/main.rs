//! `redpacket-bench`: the load generator. Starts its own 3-node cluster and payment ledger on
//! loopback (or drives `--endpoints`), runs a workload, prints a table and one JSON line.

use std::path::PathBuf;

use clap::Parser;
use clap::Subcommand;
use redpacket_bench::load;
use redpacket_bench::local::LocalCluster;
use redpacket_client::Client;

#[derive(Parser)]
#[command(name = "redpacket-bench", about = "Load generator for redpacket")]
struct Cli {
    /// Drive these nodes instead of starting a local cluster (their ledger must be --ledger).
    #[arg(long, global = true)]
    endpoints: Option<String>,
    #[arg(long, global = true, default_value = "127.0.0.1:7100")]
    ledger: String,
    /// Concurrent clients.
    #[arg(long, global = true, default_value_t = 256)]
    concurrency: usize,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One packet of S shares raced by C distinct users until sold out.
    Hot {
        #[arg(long, default_value_t = 10_000)]
        shares: u32,
    },
    /// P packets of S shares; clients grab random unfinished packets until all are sold out.
    Many {
        #[arg(long, default_value_t = 2_000)]
        packets: u64,
        #[arg(long, default_value_t = 10)]
        shares: u32,
    },
    #[command(hide = true)]
    ServeNode {
        #[arg(long)]
        config: PathBuf,
    },
    #[command(hide = true)]
    ServePayment {
        #[arg(long)]
        listen_addr: std::net::SocketAddr,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::ServeNode { config } => {
            let config = redpacket_node::config::NodeConfig::load(&config)?;
            tokio::runtime::Runtime::new()?.block_on(redpacket_node::node::run(config, redpacket_node::node::shutdown_signal()))
        }
        Cmd::ServePayment { listen_addr, data_dir } => {
            let config = redpacket_node::ledger::service::LedgerConfig { listen_addr, data_dir, faults: Default::default() };
            tokio::runtime::Runtime::new()?.block_on(redpacket_node::ledger::service::run(config, redpacket_node::node::shutdown_signal()))
        }
        command => tokio::runtime::Runtime::new()?.block_on(async move {
            let (local, endpoints, ledger_addr) = match &cli.endpoints {
                Some(e) => (None, e.split(',').map(String::from).collect::<Vec<_>>(), cli.ledger.clone()),
                None => {
                    eprintln!("starting a local 3-node cluster and payment ledger…");
                    let c = LocalCluster::start(3, 16).await?;
                    let (e, l) = (c.endpoints.clone(), c.ledger.clone());
                    (Some(c), e, l)
                }
            };
            let client = Client::connect(&endpoints)?;
            let ledger = redpacket_client::ledger::Ledger::connect(&ledger_addr)?;
            ledger.deposit(&format!("bench-{}", rand::random::<u64>()), "bench-sender", 1_000_000_000_000).await?;
            let outcome = match command {
                Cmd::Hot { shares } => load::race(&client, "hot", 1, shares, cli.concurrency, true).await?,
                Cmd::Many { packets, shares } => load::race(&client, "many", packets, shares, cli.concurrency, true).await?,
                _ => unreachable!("serve commands handled above"),
            };
            println!("{}", outcome.table());
            println!("{}", outcome.json());
            drop(local);
            anyhow::ensure!(outcome.verified, "the run lost or invented money: void");
            Ok(())
        }),
    }
}
