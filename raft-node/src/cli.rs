//! The `redpacket-node` command line.

use std::path::PathBuf;

use clap::Parser;
use clap::Subcommand;

use crate::config::NodeConfig;

#[derive(Parser)]
#[command(name = "redpacket-node", version, about = "A redpacket cluster node")]
struct Cli {
    /// The node's configuration file (see config/local/node-1.toml).
    #[arg(long, global = false)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cluster on 127.0.0.1 with the embedded defaults, bootstrapped.
    Dev {
        /// Where the nodes keep their data (reused on the next start).
        #[arg(long, default_value = ".redpacket-dev")]
        data_dir: PathBuf,
        /// Port of node 1; node N listens on base_port + N - 1.
        #[arg(long, default_value_t = 7001)]
        base_port: u16,
        #[arg(long, default_value_t = 3)]
        nodes: u64,
    },
}

/// Entry point of the binary (also used by the end-to-end tests' copy of it).
pub fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match (cli.command, cli.config) {
            (Some(Command::Dev { data_dir, base_port, nodes }), _) => crate::dev::run(data_dir, base_port, nodes).await,
            (None, Some(path)) => {
                let config = NodeConfig::load(&path)?;
                crate::node::run(config, crate::node::shutdown_signal()).await
            }
            (None, None) => anyhow::bail!("give --config FILE to run one node, or `dev` to run a local cluster"),
        }
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info,openraft=warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}
