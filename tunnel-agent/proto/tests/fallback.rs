//! QUIC over the TCP fallback sockets: one quinn server endpoint on a [`MuxSocket`] serves a
//! client over real UDP and a client over TCP ([`StreamSocket`]) at the same time, each echoing
//! a megabyte on a stream.
#![cfg(feature = "io")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::crypto::ring;
use tunnel_proto::io::fallback::{MuxSocket, StreamSocket};

fn configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let provider = Arc::new(ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![tunnel_proto::ALPN.to_vec()];
    (
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap(),
        )),
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap(),
        )),
    )
}

async fn echo_a_megabyte(conn: &quinn::Connection) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&sent).await.unwrap();
        send.finish().unwrap();
    });
    let back = recv.read_to_end(2_000_000).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_endpoint_serves_udp_and_tcp_peers() {
    let (server_cfg, client_cfg) = configs();
    let runtime = quinn::default_runtime().unwrap();
    // UDP and TCP on the same port number (retry if the TCP one is taken).
    let (udp, tcp) = loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let udp_addr = udp.local_addr().unwrap();
    let mux = MuxSocket::new(runtime.wrap_udp_socket(udp).unwrap());
    let server = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        mux.clone(),
        runtime.clone(),
    )
    .unwrap();
    let mux2 = mux.clone();
    tokio::spawn(async move {
        loop {
            let (s, peer) = tcp.accept().await.unwrap();
            let (_fake, pump) = mux2.add_stream(s, peer);
            tokio::spawn(pump);
        }
    });
    // Echo server; reports each connection's remote address.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                seen_tx.send(conn.remote_address()).unwrap();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        tokio::io::copy(&mut recv, &mut send).await.unwrap();
                        send.finish().unwrap();
                    });
                }
            });
        }
    });

    // Over UDP.
    let mut udp_client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    udp_client.set_default_client_config(client_cfg.clone());
    let c1 = udp_client
        .connect(udp_addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();

    // Over TCP, to the same port.
    let stream = tokio::net::TcpStream::connect(udp_addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (socket, pump) = StreamSocket::new(stream, local, udp_addr);
    tokio::spawn(pump);
    let tcp_client = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )
    .unwrap();
    let c2 = tcp_client
        .connect_with(client_cfg, udp_addr, "127.0.0.1")
        .unwrap()
        .await
        .unwrap();

    let (a, b) = (seen.recv().await.unwrap(), seen.recv().await.unwrap());
    assert_eq!(
        [a, b].iter().filter(|x| MuxSocket::is_tcp_peer(x)).count(),
        1,
        "one UDP and one TCP peer: {a} {b}"
    );
    assert_eq!(mux.tcp_peers(), 1);
    // The fake address resolves to the TCP connection's real peer (the client's local address);
    // UDP peers are their own address.
    let (fake, udp_peer) = if MuxSocket::is_tcp_peer(&a) {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(MuxSocket::real_peer(fake), local);
    assert_eq!(MuxSocket::real_peer(udp_peer), udp_peer);
    tokio::join!(echo_a_megabyte(&c1), echo_a_megabyte(&c2));
    // Detached once the TCP connection ends: the fake address no longer resolves.
    drop((c2, tcp_client));
    let gone = async {
        while mux.tcp_peers() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), gone)
        .await
        .expect("TCP peer detached");
    assert_eq!(MuxSocket::real_peer(fake), fake);
}
