//! Real clients for the end-to-end suites: HTTPS with the dev CA, DNS over UDP/TCP, and a raw
//! tunnel client that speaks tunnel-proto over QUIC like an agent would.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use hickory_proto::{
    op::{Edns, Message, ResponseCode},
    rr::{
        Name, RData, RecordType,
        rdata::opt::{ClientSubnet, EdnsOption},
    },
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn tls_client_config(ca: &Path, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// `curl --cacert CA --resolve HOST:PORT:IP https://HOST:PORT/PATH` with extra headers.
pub async fn https_get(
    ca: &Path,
    ip: IpAddr,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await?;
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(ca, &[b"http/1.1"])?);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let tls = connector.connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new())?)
        .await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// Sends raw bytes on a plain TCP connection and returns what comes back before close or timeout.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A DNS query for `name`/`rtype`, optionally with an EDNS Client Subnet option.
pub fn dns_query(name: &str, rtype: RecordType, subnet: Option<(IpAddr, u8)>) -> Message {
    let mut m = Message::query();
    m.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).expect("valid name"),
        rtype,
    ));
    m.metadata.recursion_desired = true;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some((addr, prefix)) = subnet {
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(addr, prefix, 0)));
    }
    m.set_edns(edns);
    m
}

/// Sends a query over UDP and waits up to 2 s for the answer.
pub async fn dns_udp(server: SocketAddr, query: &Message) -> anyhow::Result<Message> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(&query.to_vec()?, server).await?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
        .await
        .context("no DNS answer within 2 s")??;
    Ok(Message::from_vec(&buf[..n])?)
}

/// Sends a query over TCP (two-byte length prefix).
pub async fn dns_tcp(server: SocketAddr, query: &Message) -> anyhow::Result<Message> {
    let mut s = tokio::net::TcpStream::connect(server).await?;
    let bytes = query.to_vec()?;
    s.write_all(&(bytes.len() as u16).to_be_bytes()).await?;
    s.write_all(&bytes).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut len)).await??;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(Message::from_vec(&buf)?)
}

/// The A/AAAA addresses in an answer.
pub fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

pub fn rcode(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

/// The ECS option echoed in a response, as (source prefix, scope prefix).
pub fn echoed_subnet(m: &Message) -> Option<ClientSubnet> {
    match m
        .edns
        .as_ref()?
        .option(hickory_proto::rr::rdata::opt::EdnsCode::Subnet)?
    {
        EdnsOption::Subnet(s) => Some(*s),
        _ => None,
    }
}

/// Connects to an edge's tunnel listener like an agent, sends `Hello`, returns the edge's answer.
pub async fn tunnel_hello(
    ca: &Path,
    edge: SocketAddr,
    token: &str,
    service: &str,
) -> anyhow::Result<tunnel_proto::Frame> {
    let tls = tls_client_config(ca, &[tunnel_proto::ALPN])?;
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from((*tls).clone())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic_tls)));
    let conn = endpoint.connect(edge, &edge.ip().to_string())?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = BytesMut::new();
    tunnel_proto::encode(
        &tunnel_proto::Frame::Hello {
            version: tunnel_proto::VERSION,
            token: token.to_owned(),
            agent_id: "e2e-probe".to_owned(),
            services: vec![service.to_owned()],
        },
        &mut buf,
    )?;
    send.write_all(&buf).await?;
    let mut decoder = tunnel_proto::Decoder::default();
    let mut inbox = BytesMut::new();
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(frame) = decoder.decode(&mut inbox)? {
            return Ok(frame);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut chunk))
            .await
            .context("no answer to Hello within 5 s")??
            .context("control stream closed before an answer")?;
        inbox.extend_from_slice(&chunk[..n]);
    }
}

/// One plain-HTTP GET to `ip:8080` over a fresh connection, for `host`: the status, or `None`
/// when nothing answers (a transport error).
pub async fn http_status(ip: IpAddr, host: &str, path: &str) -> Option<u16> {
    let tcp = tokio::net::TcpStream::connect(SocketAddr::new(ip, 8080))
        .await
        .ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}
