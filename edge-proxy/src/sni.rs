//! Reads the SNI from a TLS ClientHello without terminating TLS, sans-IO: the HTTPS listener
//! peeks the first record and passes the raw bytes through by name (see `passthrough`).

/// Largest ClientHello record looked at (TLS caps a record at 16 KiB plus header).
pub(crate) const MAX_PEEK: usize = 5 + 16 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Not enough bytes yet: peek again with more.
    NeedMore,
    /// Not a TLS handshake record.
    NotTls,
    /// A ClientHello without a (host name) SNI, or one split over several records.
    NoSni,
    /// The lower-cased host name.
    Sni(String),
}

fn u16_at(b: &[u8], i: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *b.get(i)?,
        *b.get(i + 1)?,
    ])))
}

/// Parses the SNI out of `buf`, the connection's first bytes.
pub(crate) fn peek(buf: &[u8]) -> Peek {
    if buf.len() < 5 {
        return if buf.first().is_some_and(|&b| b != 22) {
            Peek::NotTls
        } else {
            Peek::NeedMore
        };
    }
    if buf[0] != 22 || buf[1] != 3 {
        return Peek::NotTls;
    }
    let Some(len) = u16_at(buf, 3) else {
        return Peek::NeedMore;
    };
    if len > 16 * 1024 + 2048 {
        return Peek::NotTls;
    }
    if buf.len() < 5 + len {
        return Peek::NeedMore;
    }
    match client_hello_sni(&buf[5..5 + len]) {
        Some(Some(name)) => Peek::Sni(name),
        _ => Peek::NoSni,
    }
}

/// `None`: malformed or truncated; `Some(None)`: no host name.
fn client_hello_sni(h: &[u8]) -> Option<Option<String>> {
    if *h.first()? != 1 {
        return None;
    }
    let hs_len = (usize::from(*h.get(1)?) << 16) | u16_at(h, 2)?;
    let body = h.get(4..4 + hs_len)?;
    // client_version (2) + random (32)
    let mut i = 34;
    let sid = usize::from(*body.get(i)?);
    i += 1 + sid;
    let suites = u16_at(body, i)?;
    i += 2 + suites;
    let comp = usize::from(*body.get(i)?);
    i += 1 + comp;
    let Some(ext_len) = u16_at(body, i) else {
        return Some(None);
    };
    i += 2;
    let exts = body.get(i..i + ext_len)?;
    let mut j = 0;
    while j + 4 <= exts.len() {
        let typ = u16_at(exts, j)?;
        let len = u16_at(exts, j + 2)?;
        let data = exts.get(j + 4..j + 4 + len)?;
        if typ == 0 {
            // server_name_list: u16 length, then (type u8, u16 length, name) entries.
            let mut k = 2;
            while k + 3 <= data.len() {
                let kind = data[k];
                let n = u16_at(data, k + 1)?;
                let name = data.get(k + 3..k + 3 + n)?;
                if kind == 0 {
                    let name = std::str::from_utf8(name).ok()?;
                    if name.is_empty()
                        || name.len() > 253
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                    {
                        return None;
                    }
                    return Some(Some(name.to_ascii_lowercase()));
                }
                k += 3 + n;
            }
            return Some(None);
        }
        j += 4 + len;
    }
    Some(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello from rustls for `name` (also used by the passthrough tests).
    pub(crate) fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), server).unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    #[test]
    fn finds_the_sni_of_a_real_client_hello() {
        let hello = client_hello("Secure.Example.test");
        assert_eq!(peek(&hello), Peek::Sni("secure.example.test".into()));
        for cut in [0, 3, 5, 40, hello.len() - 1] {
            assert_eq!(peek(&hello[..cut]), Peek::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn no_sni_and_not_tls() {
        // rustls sends no SNI for an IP address.
        assert_eq!(peek(&client_hello("192.0.2.1")), Peek::NoSni);
        assert_eq!(peek(b"GET / HTTP/1.1\r\n"), Peek::NotTls);
        assert_eq!(peek(b"G"), Peek::NotTls);
        // A handshake record whose body is garbage: no panic, no name.
        let mut junk = vec![22, 3, 1, 0, 10];
        junk.extend_from_slice(&[1, 0, 0, 200, 9, 9, 9, 9, 9, 9]);
        assert_eq!(peek(&junk), Peek::NoSni);
    }
}
