fn main() -> anyhow::Result<()> {
    redpacket_node::cli::main()
}
