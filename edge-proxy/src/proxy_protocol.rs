//! PROXY protocol v2 header (haproxy.org/download/2.9/doc/proxy-protocol.txt), sans-IO: written
//! first on a TCP/passthrough stream so the origin learns the client's address.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte v2 signature.
pub(crate) const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Appends a v2 `PROXY` header for a TCP connection from `client` to `local` (the address the
/// client connected to). Mixed families are sent as IPv6 (IPv4-mapped).
pub(crate) fn encode_v2(client: SocketAddr, local: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // TCP over IPv4
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21); // TCP over IPv6
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
}

/// Appends a v2 `LOCAL` header (no address: health checks, unknown client).
pub(crate) fn encode_v2_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    out.push(0x20);
    out.push(0x00);
    out.extend_from_slice(&0u16.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_spec_layout() {
        let mut out = Vec::new();
        let client: SocketAddr = "192.0.2.10:51000".parse().unwrap_or_else(|_| panic!());
        let local: SocketAddr = "198.51.100.1:443".parse().unwrap_or_else(|_| panic!());
        encode_v2(client, local, &mut out);
        assert_eq!(out.len(), 16 + 12);
        assert_eq!(&out[..12], &SIGNATURE);
        assert_eq!(out[12], 0x21);
        assert_eq!(out[13], 0x11);
        assert_eq!(&out[14..16], &[0, 12]);
        assert_eq!(&out[16..20], &[192, 0, 2, 10]);
        assert_eq!(&out[20..24], &[198, 51, 100, 1]);
        assert_eq!(&out[24..26], &51000u16.to_be_bytes());
        assert_eq!(&out[26..28], &443u16.to_be_bytes());
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let mut out = Vec::new();
        let client: SocketAddr = "[2001:db8::7]:1234".parse().unwrap_or_else(|_| panic!());
        let local: SocketAddr = "127.0.0.1:443".parse().unwrap_or_else(|_| panic!());
        encode_v2(client, local, &mut out);
        assert_eq!(out.len(), 16 + 36);
        assert_eq!(out[13], 0x21);
        assert_eq!(&out[14..16], &[0, 36]);
        assert_eq!(
            &out[32..48],
            &std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets()
        );
        // An IPv4-mapped client is sent as plain IPv4.
        let mut out = Vec::new();
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:9".parse().unwrap_or_else(|_| panic!());
        encode_v2(mapped, local, &mut out);
        assert_eq!(out[13], 0x11);
        let mut out = Vec::new();
        encode_v2_local(&mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(out[12], 0x20);
    }
}
