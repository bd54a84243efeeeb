//! No acknowledged write is ever lost: a real `meridian coordinator` process is killed with
//! SIGKILL in the middle of a concurrent write burst, restarted on the same data directory, and
//! every write it acknowledged must be there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use coordinator_api::Client;
use meridian_tests::durability::{present, write_burst_then_kill};
use meridian_tests::{dev::eventually, meridian_bin};

const ADMIN: &str = "mrd_api_durable_durabilitysecret";

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start(addr: SocketAddr, data: &std::path::Path) -> Child {
    Command::new(meridian_bin())
        .args(["coordinator", "--listen", &addr.to_string(), "--data-dir"])
        .arg(data)
        .env("MERIDIAN_ADMIN_TOKEN", ADMIN)
        .env("MERIDIAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start meridian coordinator")
}

async fn ready(c: &Client) {
    eventually(Duration::from_secs(30), || async {
        c.list_services().await.ok().map(drop)
    })
    .await
    .expect("coordinator did not come up");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_write_burst_loses_no_acknowledged_write() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let url = format!("http://{addr}");
    let c = Client::new(&url, ADMIN).unwrap();
    let mut total_acked = 0;

    for round in 0..2 {
        let mut child = start(addr, data.path());
        ready(&c).await;
        let acked = write_burst_then_kill(&c, round, 150, &mut child).await;
        total_acked += acked.len();

        let mut child = start(addr, data.path());
        ready(&c).await;
        let present = present(&c).await;
        let lost: Vec<&String> = acked.iter().filter(|w| !present.contains(*w)).collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} acknowledged writes lost, e.g. {:?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(5)]
        );
        // The revision counts every committed change, so it can only be at least the acked ones.
        let snap = c.snapshot().await.unwrap();
        assert!(snap.revision as usize >= total_acked, "{}", snap.revision);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
