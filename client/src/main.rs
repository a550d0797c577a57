//! `redpacket`: the command-line client. Amounts are shown and typed as yuan ("12.34").

use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use clap::Parser;
use clap::Subcommand;
use redpacket_client::Client;
use redpacket_client::NewPacket;
use redpacket_client::Packet;
use redpacket_client::ReadConsistency;
use redpacket_client::Recipients;
use redpacket_client::money::format_yuan;
use redpacket_client::money::parse_yuan;

#[derive(Parser)]
#[command(name = "redpacket", version, about = "Send, grab and open red packets; administer a redpacket cluster")]
struct Cli {
    /// Comma-separated node addresses; any node serves any request.
    #[arg(long, env = "REDPACKET_ENDPOINTS", default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003", global = true)]
    endpoints: String,
    /// Bearer token, when the cluster requires one (admin commands need an admin token).
    #[arg(long, env = "REDPACKET_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA that signed the nodes' certificates: connect with TLS.
    #[arg(long, env = "REDPACKET_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Name the nodes' certificates are valid for.
    #[arg(long, env = "REDPACKET_TLS_SERVER_NAME", default_value = "localhost", global = true)]
    tls_server_name: String,
    /// The payment ledger (for `wallet`).
    #[arg(long, env = "REDPACKET_PAYMENT", default_value = "127.0.0.1:7100", global = true)]
    payment: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a red packet.
    Send {
        #[arg(long)]
        from: String,
        /// Total in yuan, e.g. 12.34.
        #[arg(long)]
        total: String,
        #[arg(long, default_value_t = 1)]
        shares: u32,
        /// Equal shares instead of lucky (random) ones.
        #[arg(long)]
        equal: bool,
        /// An exclusive packet for one user.
        #[arg(long, conflicts_with_all = ["group", "anyone"])]
        to: Option<String>,
        /// Comma-separated group members who may grab.
        #[arg(long, conflicts_with = "anyone")]
        group: Option<String>,
        /// Anyone with the packet id may grab.
        #[arg(long)]
        anyone: bool,
        #[arg(long, default_value = "")]
        message: String,
        /// Time to live in seconds (default: the server's, 24 h).
        #[arg(long)]
        expires_in: Option<u64>,
        /// Idempotency key: repeating a send with the same id returns the same packet.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Grab a share of a packet.
    Grab {
        #[arg(long)]
        packet: String,
        #[arg(long)]
        user: String,
        /// Also open it (one round trip).
        #[arg(long)]
        open: bool,
    },
    /// Open the share you grabbed.
    Open {
        #[arg(long)]
        packet: String,
        #[arg(long)]
        user: String,
    },
    /// Show a packet and its claims.
    Show {
        #[arg(long)]
        packet: String,
        /// Read the first endpoint's own replica instead of going through the leader.
        #[arg(long)]
        local: bool,
    },
    /// Check that every cent is where it should be; exits non-zero on any mismatch.
    Reconcile,
    /// Money in the payment ledger (the stand-in for the bank).
    Wallet {
        #[command(subcommand)]
        command: WalletCommand,
    },
    /// Cluster administration.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum WalletCommand {
    /// Add money to an account (opening it if needed).
    Deposit {
        #[arg(long)]
        account: String,
        /// Yuan, e.g. 100.00.
        #[arg(long)]
        amount: String,
        /// Idempotency key (default: random).
        #[arg(long)]
        deposit_id: Option<String>,
    },
    /// Show accounts' balances.
    Balance {
        /// Account ids.
        #[arg(required = true)]
        accounts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Bootstrap a new cluster from the nodes at --endpoints (each must be running).
    Init,
    /// Every node's view of every group: role, term, leader, log and applied indexes.
    Status,
    /// Add a node (started with its own config and empty data) to every group.
    AddNode {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Move leaderships off a node and remove it from every group; its id is retired.
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Make a node the leader of a group.
    TransferLeader {
        #[arg(long)]
        group: u32,
        #[arg(long)]
        to: u64,
    },
    /// Hand every leadership to its group's preferred node now.
    BalanceLeaders,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let endpoints: Vec<&str> = cli.endpoints.split(',').filter(|s| !s.trim().is_empty()).collect();
    let tls_ca_pem = match &cli.tls_ca {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    let options = redpacket_client::ConnectOptions {
        token: cli.token.clone(),
        tls_ca_pem,
        tls_server_name: Some(cli.tls_server_name.clone()),
    };
    let client = Client::connect_with(&endpoints, options)?;
    match cli.command {
        Command::Send { from, total, shares, equal, to, group, anyone, message, expires_in, request_id } => {
            let total_cents = parse_yuan(&total)?;
            let recipients = match (to, group, anyone) {
                (Some(u), None, false) => Recipients::User(u),
                (None, Some(g), false) => Recipients::Group(g.split(',').map(|s| s.trim().to_string()).collect()),
                (None, None, true) => Recipients::Anyone,
                _ => bail!("say who may grab: --to USER, --group A,B,C, or --anyone"),
            };
            let mut new = if equal {
                NewPacket::equal(&from, total_cents, shares, recipients)
            } else {
                NewPacket::lucky(&from, total_cents, shares, recipients)
            };
            new.message = message;
            new.request_id = request_id;
            new.expires_in = expires_in.map(Duration::from_secs);
            let packet = client.create_packet(new).await?;
            println!("packet {}", packet.packet_id);
            print_packet(&packet);
        }
        Command::Grab { packet, user, open: true } => {
            let share = client.grab_and_open(&packet, &user).await?;
            println!("{user} opened share #{}: {} yuan", share.share_index + 1, format_yuan(share.amount_cents));
        }
        Command::Grab { packet, user, open: false } => {
            let share = client.grab(&packet, &user).await?;
            println!("{user} grabbed share #{} ({} left); open it to see the amount", share.share_index + 1, share.shares_left);
        }
        Command::Open { packet, user } => {
            let share = client.open(&packet, &user).await?;
            println!("{user} opened share #{}: {} yuan", share.share_index + 1, format_yuan(share.amount_cents));
        }
        Command::Show { packet, local } => {
            let consistency = if local { ReadConsistency::Local } else { ReadConsistency::Linearizable };
            let packet = client.get_packet_with(&packet, consistency).await?;
            print_packet(&packet);
        }
        Command::Admin { command: AdminCommand::Init } => {
            let mut members = Vec::new();
            for (addr, status) in client.cluster_status().await {
                let status = status.with_context(|| format!("node at {addr} is not answering"))?;
                members.push((status.node_id, status.addr));
            }
            let groups = client.init_cluster(&members).await?;
            let ids: Vec<String> = members.iter().map(|(id, a)| format!("{id}@{a}")).collect();
            println!("initialized {groups} groups on nodes {}", ids.join(", "));
        }
        Command::Admin { command: AdminCommand::Status } => print_status(&client).await,
        Command::Admin { command: AdminCommand::AddNode { id, addr } } => {
            let bar = progress_bar(&format!("adding node {id}"));
            client.add_node(id, &addr, |p| show_progress(&bar, p)).await?;
            bar.finish_with_message(format!("node {id} is a voter of every group"));
        }
        Command::Admin { command: AdminCommand::RemoveNode { id } } => {
            let bar = progress_bar(&format!("removing node {id}"));
            client.remove_node(id, |p| show_progress(&bar, p)).await?;
            bar.finish_with_message(format!("node {id} left every group; its id is retired (stop the process now)"));
        }
        Command::Admin { command: AdminCommand::TransferLeader { group, to } } => {
            client.transfer_leader(group, to).await?;
            println!("node {to} leads group {group}");
        }
        Command::Admin { command: AdminCommand::BalanceLeaders } => {
            let n = client.balance_leaders().await?;
            println!("{n} leaderships handed to their preferred nodes");
        }
        Command::Reconcile => {
            let r = client.reconcile().await?;
            println!(
                "{} packets, {} transfers ({} pending) · funded {} · paid {} · refunded {} · in escrow {} (escrow account holds {}) · ledger {}",
                r.packets,
                r.transfers,
                r.pending_transfers,
                format_yuan(r.funded_cents),
                format_yuan(r.paid_cents),
                format_yuan(r.refunded_cents),
                format_yuan(r.in_escrow_cents),
                format_yuan(r.escrow_balance_cents),
                if r.ledger_conserved { "conserved" } else { "NOT CONSERVED" }
            );
            for m in &r.mismatches {
                println!("MISMATCH packet={} transfer={}: {}", m.packet_id, m.transfer_id, m.problem);
            }
            if !r.mismatches.is_empty() {
                bail!("{} mismatches", r.mismatches.len());
            }
            println!("reconcile: clean");
        }
        Command::Wallet { command } => {
            let ledger = redpacket_client::ledger::Ledger::connect(&cli.payment)?;
            match command {
                WalletCommand::Deposit { account, amount, deposit_id } => {
                    let cents = parse_yuan(&amount)?;
                    let id = deposit_id.unwrap_or_else(|| format!("cli:{:032x}", rand::random::<u128>()));
                    let b = ledger.deposit(&id, &account, cents).await?;
                    println!("{account}: {} yuan available", format_yuan(b.available_cents));
                }
                WalletCommand::Balance { accounts } => {
                    for account in accounts {
                        let b = ledger.balance(&account).await?;
                        println!("{account:<20} {:>12} available {:>12} held", format_yuan(b.available_cents), format_yuan(b.held_cents));
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_packet(p: &Packet) {
    let kind = if p.kind == redpacket_proto::v1::PacketKind::Equal as i32 { "equal" } else { "lucky" };
    println!(
        "  from {} · {} yuan in {} {} shares · group {} · {}",
        p.sender,
        format_yuan(p.total_cents),
        p.shares,
        kind,
        p.group,
        if p.message.is_empty() { "(no message)" } else { &p.message }
    );
    println!(
        "  {} · grabbed {}/{} · opened {} · unopened {} yuan{}",
        stage_name(p.stage),
        p.shares_grabbed,
        p.shares,
        p.shares_opened,
        format_yuan(p.remaining_cents),
        if p.refunded_cents > 0 {
            format!(" · refunded {} yuan ({})", format_yuan(p.refunded_cents), settlement_name(p.refund))
        } else {
            String::new()
        }
    );
    for c in &p.claims {
        let amount = c.amount_cents.map(format_yuan).unwrap_or_else(|| "(unopened)".into());
        let best = if c.best_luck { "  ★ best luck" } else { "" };
        let paid = if c.amount_cents.is_some() { settlement_name(c.payment) } else { "" };
        println!("  #{:<4} {:<20} {:>10}  {paid:<8}{best}", c.share_index + 1, c.user, amount);
    }
}

fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} groups · {msg}")
            .expect("progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

fn show_progress(bar: &indicatif::ProgressBar, p: &redpacket_client::MembershipProgress) {
    bar.set_length(u64::from(p.groups_total));
    bar.set_position(u64::from(p.done));
    bar.set_message(format!("group {}: {}", p.group, p.step));
}

fn stage_name(stage: i32) -> &'static str {
    match redpacket_client::PacketStage::try_from(stage) {
        Ok(redpacket_client::PacketStage::Funding) => "funding",
        Ok(redpacket_client::PacketStage::Open) => "open",
        Ok(redpacket_client::PacketStage::FundingFailed) => "funding failed",
        Ok(redpacket_client::PacketStage::Closed) => "closed",
        _ => "?",
    }
}

fn settlement_name(s: i32) -> &'static str {
    match redpacket_client::Settlement::try_from(s) {
        Ok(redpacket_client::Settlement::Pending) => "pending",
        Ok(redpacket_client::Settlement::Settled) => "paid",
        Ok(redpacket_client::Settlement::Failed) => "failed",
        _ => "",
    }
}

async fn print_status(client: &Client) {
    for (addr, status) in client.cluster_status().await {
        match status {
            Err(e) => println!("node at {addr}: DOWN ({e})"),
            Ok(s) => {
                let leads = s.groups.iter().filter(|g| g.role == "leader").count();
                let worst_lag = s.groups.iter().flat_map(|g| g.lag.iter().filter_map(|l| l.entries)).max().unwrap_or(0);
                println!(
                    "node {} at {} · {} groups · leads {} · max follower lag {} · {}",
                    s.node_id,
                    s.addr,
                    s.groups_total,
                    leads,
                    worst_lag,
                    if s.initialized { "initialized" } else { "NOT initialized" }
                );
                println!(
                    "  {:>5} {:<9} {:>5} {:>6} {:>9} {:>9} {:>9} {:>7}  voters",
                    "group", "role", "term", "leader", "last_log", "applied", "snapshot", "max_lag"
                );
                let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
                for g in &s.groups {
                    let lag = g.lag.iter().filter_map(|l| l.entries).max();
                    println!(
                        "  {:>5} {:<9} {:>5} {:>6} {:>9} {:>9} {:>9} {:>7}  {:?}",
                        g.group,
                        g.role,
                        g.term,
                        opt(g.leader),
                        opt(g.last_log_index),
                        opt(g.last_applied),
                        opt(g.snapshot_index),
                        opt(lag),
                        g.voters
                    );
                }
            }
        }
    }
}
