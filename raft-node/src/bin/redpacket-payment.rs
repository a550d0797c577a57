//! `redpacket-payment`: the payment ledger stub (a stand-in for the bank) as its own process.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use redpacket_node::ledger::service::LedgerConfig;
use redpacket_proto::payment::Faults;

#[derive(Parser)]
#[command(name = "redpacket-payment", version, about = "The payment ledger stub: accounts and two-phase transfers")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen_addr: SocketAddr,
    #[arg(long, default_value = "data/payment")]
    data_dir: PathBuf,
    /// Fail this fraction of calls before doing anything (tests only).
    #[arg(long, default_value_t = 0.0)]
    fail_before_ratio: f64,
    /// Do this fraction of calls, then fail them as if the reply were lost (tests only).
    #[arg(long, default_value_t = 0.0)]
    fail_after_ratio: f64,
    /// Delay this fraction of calls by --delay-ms (tests only).
    #[arg(long, default_value_t = 0.0)]
    delay_ratio: f64,
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

fn main() -> anyhow::Result<()> {
    redpacket_node::cli::init_logging();
    let cli = Cli::parse();
    let config = LedgerConfig {
        listen_addr: cli.listen_addr,
        data_dir: cli.data_dir,
        faults: Faults {
            fail_before_ratio: cli.fail_before_ratio,
            fail_after_ratio: cli.fail_after_ratio,
            delay_ratio: cli.delay_ratio,
            delay_ms: cli.delay_ms,
        },
    };
    tokio::runtime::Runtime::new()?.block_on(redpacket_node::ledger::service::run(config, redpacket_node::node::shutdown_signal()))
}
