//! Bounded chaos runs, so CI catches a regression: three short scenarios with different
//! faults and seeds. Long runs: `redpacket-chaos --duration 10m` (see docs/TESTING.md).

use std::time::Duration;

use redpacket_tests::chaos;
use redpacket_tests::chaos::nemesis::Fault;

async fn scenario(nodes: u64, faults: Vec<Fault>, seed: u64) {
    let out_dir = std::env::temp_dir().join(format!("redpacket-chaos-{seed}-{}", std::process::id()));
    let s = chaos::Scenario { nodes, duration: Duration::from_secs(20), faults, seed, workers: 8, out_dir: out_dir.clone() };
    let report = chaos::run(&s).await.unwrap();
    println!("{}", report.summary());
    assert!(report.ok(), "seed {seed}: {}\nhistory: {}", report.summary(), out_dir.display());
    assert!(report.acknowledged > 100, "the workload ran: {}", report.summary());
    assert!(report.faults.values().sum::<u32>() >= 2, "faults were injected: {}", report.summary());
    let _ = std::fs::remove_dir_all(out_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_scenarios_leave_every_cent_in_place() {
    scenario(3, vec![Fault::KillLeader, Fault::Pause, Fault::Partition], 1).await;
    scenario(3, vec![Fault::KillFollower, Fault::Ledger, Fault::Membership], 2).await;
    scenario(5, vec![Fault::KillTwo, Fault::KillLeader], 3).await;
}
