//! Raw TCP through the tunnel: a real redis-server behind an agent started with `--tcp`, reached
//! through an edge started with `--tcp-service PORT=SERVICE`, one QUIC stream per TCP connection.
//! The test speaks RESP over a plain socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use meridian_tests::dev::Proc;
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use meridian_tests::{
    dev::{DevNetwork, is_alive, kill9},
    have_tool, meridian_bin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The sin edge's address, where the restarted edge listens for the TCP service.
const EDGE_TCP: &str = "127.0.0.13:6390";
/// redis-server on a port no other suite uses.
const REDIS_PORT: u16 = 6391;

fn snapshot_process(pid: i32) -> (Vec<String>, Vec<(String, String)>) {
    let split = |raw: Vec<u8>| -> Vec<String> {
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap());
    let env = split(std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    (argv, env)
}

/// RESP array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads until `want` bytes arrived (or EOF/timeout) and returns them.
async fn read_exactly(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut buf = vec![0u8; want];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

/// One PING through the edge; `true` once an agent carries it to redis.
async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    if s.write_all(&command(&[b"PING"])).await.is_err() {
        return false;
    }
    read_exactly(&mut s, 7).await == b"+PONG\r\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_set_get_through_the_tunnel() {
    if !have_tool("redis-server") {
        return;
    }
    let net = DevNetwork::start();
    let redis_dir = tempfile::tempdir().unwrap();
    let _redis = Proc(
        Command::new("redis-server")
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(redis_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server"),
    );

    net.ctl(&["service", "create", "redis"]);
    let token = net.ctl(&["token", "create", "redis"])["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // Restart the sin edge exactly as dev started it, plus a TCP service.
    let sin = net.pid("edge-sin");
    let (argv, env) = snapshot_process(sin);
    kill9(sin);
    let t = Instant::now();
    while is_alive(sin) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _edge = Proc(
        Command::new(&argv[0])
            .args(&argv[1..])
            .args(["--tcp-service", "6390=redis"])
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart edge-sin"),
    );
    // A raw-TCP-only agent: no --to.
    let _agent = Proc(
        Command::new(meridian_bin())
            .args(["agent", "--edge", "127.0.0.13:7443", "--ca"])
            .arg(net.ca())
            .args(["--service", "redis", "--regions", "1"])
            .args(["--tcp", &format!("127.0.0.1:{REDIS_PORT}")])
            .args(["--agent-id", "redis-agent"])
            .env("MERIDIAN_AGENT_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent"),
    );

    let addr: SocketAddr = EDGE_TCP.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ping(addr).await {
        assert!(
            Instant::now() < deadline,
            "PING through the edge never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SET then GET on one connection, a value large enough to span many Data-sized chunks.
    let value: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&command(&[b"SET", b"greeting", b"hello tunnel"]))
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"+OK\r\n");
    s.write_all(&command(&[b"SET", b"big", &value]))
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"+OK\r\n");
    s.write_all(&command(&[b"GET", b"greeting"])).await.unwrap();
    assert_eq!(read_exactly(&mut s, 19).await, b"$12\r\nhello tunnel\r\n");

    // A second connection sees the first one's writes: both reached the same redis.
    let mut s2 = TcpStream::connect(addr).await.unwrap();
    s2.write_all(&command(&[b"GET", b"big"])).await.unwrap();
    let head = b"$1000000\r\n";
    let reply = read_exactly(&mut s2, head.len() + value.len() + 2).await;
    assert_eq!(&reply[..head.len()], head);
    assert!(reply[head.len()..].starts_with(&value), "GET big matches");

    // QUIT: redis closes, and the close reaches the client through the tunnel.
    s.write_all(&command(&[b"QUIT"])).await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"+OK\r\n");
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(eof, Ok(Ok(0))), "EOF after QUIT: {eof:?}");
}
