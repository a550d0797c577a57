//! `redpacket-payment`: the payment ledger stub (a stand-in for the bank) as its own process.
fn main() -> anyhow::Result<()> {
    redpacket_node::ledger::service::main()
}
