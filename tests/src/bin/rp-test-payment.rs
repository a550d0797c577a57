//! `redpacket-payment`, built inside the test crate so the tests always run the current code.
fn main() -> anyhow::Result<()> {
    redpacket_node::ledger::service::main()
}
