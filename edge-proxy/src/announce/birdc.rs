//! BIRD's control-socket protocol (what `birdc` speaks), sans-IO parser plus a thin async client.
//!
//! Each reply line is `DDDD-text` (more lines follow), `DDDD text` (last line) or ` text` (more
//! of the previous code). Codes 0xxx are success, 8xxx runtime errors, 9xxx syntax errors; the
//! server greets with `0001 BIRD x.y ready.`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest reply line accepted; BIRD's are far shorter.
const MAX_LINE: usize = 4096;
/// Largest whole reply accepted (a `show protocols all` of a small daemon fits easily).
const MAX_REPLY: usize = 256 * 1024;

/// Why talking to BIRD failed.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error("BIRD control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BIRD control socket {0}: no reply in time")]
    Timeout(String),
    #[error("BIRD closed the control connection mid-reply")]
    Closed,
    #[error("malformed BIRD reply: {0}")]
    Malformed(String),
    #[error("BIRD refused `{command}`: {code:04} {text}")]
    Refused {
        command: String,
        code: u16,
        text: String,
    },
    #[error("invalid BIRD protocol name {0:?} (letters, digits and _ only)")]
    BadName(String),
}

/// One reply line: its code and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub code: u16,
    pub text: String,
}

/// A complete reply: every line, the last one being the final (`DDDD text`) line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<Line>,
}

impl Reply {
    /// The first error line (8xxx/9xxx), if any.
    pub fn error(&self) -> Option<&Line> {
        self.lines.iter().find(|l| l.code >= 8000)
    }

    /// Whether any line carries `code`.
    pub fn has(&self, code: u16) -> bool {
        self.lines.iter().any(|l| l.code == code)
    }
}

/// Accumulates bytes into replies.
#[derive(Debug, Default)]
pub struct ReplyParser {
    buf: Vec<u8>,
    lines: Vec<Line>,
    size: usize,
}

impl ReplyParser {
    /// Feeds bytes; returns a reply once its final line arrived. Bytes after it stay buffered.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Reply>, BirdError> {
        self.buf.extend_from_slice(bytes);
        self.next_reply()
    }

    /// The next complete reply already buffered.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, BirdError> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
            self.size += line.len();
            if line.len() > MAX_LINE || self.size > MAX_REPLY {
                return Err(BirdError::Malformed("reply too long".into()));
            }
            if let Some(text) = line.strip_prefix(' ') {
                let code = self.lines.last().map(|l| l.code).ok_or_else(|| {
                    BirdError::Malformed("continuation line before any code".into())
                })?;
                self.lines.push(Line {
                    code,
                    text: text.to_owned(),
                });
                continue;
            }
            let b = line.as_bytes();
            if b.len() < 5 || !b[..4].iter().all(u8::is_ascii_digit) {
                return Err(BirdError::Malformed(format!("{line:?}")));
            }
            // Four ASCII digits, checked above.
            let code = b[..4]
                .iter()
                .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
            let text = line[5..].to_owned();
            match b[4] {
                b'-' => self.lines.push(Line { code, text }),
                b' ' => {
                    self.lines.push(Line { code, text });
                    self.size = 0;
                    return Ok(Some(Reply {
                        lines: std::mem::take(&mut self.lines),
                    }));
                }
                _ => return Err(BirdError::Malformed(format!("{line:?}"))),
            }
        }
        if self.buf.len() > MAX_LINE {
            return Err(BirdError::Malformed("line too long".into()));
        }
        Ok(None)
    }
}

/// Protocol names go into a command line, so only BIRD symbol characters are allowed.
pub fn check_name(name: &str) -> Result<(), BirdError> {
    if !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
    {
        Ok(())
    } else {
        Err(BirdError::BadName(name.to_owned()))
    }
}

async fn read_reply(stream: &mut UnixStream, parser: &mut ReplyParser) -> Result<Reply, BirdError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(r) = parser.next_reply()? {
            return Ok(r);
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|source| BirdError::Io {
                path: String::new(),
                source,
            })?;
        if n == 0 {
            return Err(BirdError::Closed);
        }
        parser.buf.extend_from_slice(&buf[..n]);
    }
}

/// Runs one command on a fresh connection (cheap on a local socket, and survives BIRD restarts).
pub async fn command(socket: &Path, command: &str, limit: Duration) -> Result<Reply, BirdError> {
    let path = socket.display().to_string();
    let io = |source| BirdError::Io {
        path: path.clone(),
        source,
    };
    let run = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let mut parser = ReplyParser::default();
        let hello = read_reply(&mut stream, &mut parser).await?;
        if !hello.has(1) {
            return Err(BirdError::Malformed(format!(
                "unexpected greeting {hello:?}"
            )));
        }
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        read_reply(&mut stream, &mut parser).await
    };
    let reply = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| BirdError::Timeout(path.clone()))??;
    if let Some(e) = reply.error() {
        return Err(BirdError::Refused {
            command: command.to_owned(),
            code: e.code,
            text: e.text.clone(),
        });
    }
    Ok(reply)
}

/// `enable NAME` / `disable NAME`; "already enabled/disabled" counts as success.
pub async fn set_protocol(
    socket: &Path,
    protocol: &str,
    enabled: bool,
    limit: Duration,
) -> Result<(), BirdError> {
    check_name(protocol)?;
    let verb = if enabled { "enable" } else { "disable" };
    let cmd = format!("{verb} {protocol}");
    let reply = command(socket, &cmd, limit).await?;
    // 0010/0011 already enabled/enabled, 0008/0009 already disabled/disabled.
    let ok = if enabled {
        reply.has(10) || reply.has(11)
    } else {
        reply.has(8) || reply.has(9)
    };
    if ok {
        Ok(())
    } else {
        let last = reply.lines.last().map(|l| (l.code, l.text.clone()));
        let (code, text) = last.unwrap_or((0, String::new()));
        Err(BirdError::Refused {
            command: cmd,
            code,
            text: format!("unexpected reply: {text}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_greeting_and_multi_line_replies_split_anywhere() {
        let wire = b"0001 BIRD 2.0.12 ready.\n0011-vip: enabled\n0000 \n2002-Name       Proto\n1002-vip        Direct\n1006-  Channel ipv4\n     State:          UP\n0000 \n";
        for split in 0..wire.len() {
            let mut p = ReplyParser::default();
            let mut replies = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                if let Some(r) = p.push(chunk).unwrap() {
                    replies.push(r);
                }
                while let Some(r) = p.next_reply().unwrap() {
                    replies.push(r);
                }
            }
            assert_eq!(replies.len(), 3, "split at {split}");
            assert!(replies[0].has(1));
            assert!(replies[1].has(11) && replies[1].error().is_none());
            let show = &replies[2];
            assert_eq!(show.lines.len(), 5);
            assert_eq!(show.lines[3].code, 1006);
            assert_eq!(show.lines[3].text, "    State:          UP");
        }
    }

    #[test]
    fn reports_errors() {
        let mut p = ReplyParser::default();
        let r = p
            .push(b"9001 syntax error, unexpected CF_SYM_UNDEFINED\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.error().unwrap().code, 9001);
        let r = p.push(b"8003 No protocols match\n").unwrap().unwrap();
        assert_eq!(r.error().unwrap().code, 8003);
    }

    #[test]
    fn rejects_malformed_and_oversized_input() {
        for bad in [
            &b"hello\n"[..],
            b"12345\n",
            b"0001x\n",
            b" orphan continuation\n",
        ] {
            assert!(ReplyParser::default().push(bad).is_err(), "{bad:?}");
        }
        assert!(ReplyParser::default().push(&[b'0'; MAX_LINE + 1]).is_err());
        let mut p = ReplyParser::default();
        let line = format!("1002-{}\n", "x".repeat(1000));
        let mut failed = false;
        for _ in 0..(MAX_REPLY / 1000 + 2) {
            if p.push(line.as_bytes()).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "an endless reply must be cut off");
    }

    #[test]
    fn protocol_names_cannot_inject_commands() {
        assert!(check_name("vip").is_ok());
        assert!(check_name("static_vip4").is_ok());
        for bad in ["", "vip\ndown", "vip; restart", "a b", "4vip", "\"x\""] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn talks_to_a_fake_bird() {
        let dir = std::env::temp_dir().join(format!("mer-birdc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("bird.ctl");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in [
                &b"0009-vip: disabled\n0000 \n"[..],
                b"0010-vip: already enabled\n0000 \n",
                b"9001 syntax error\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"0001 BIRD 2.0.12 ready.\n").await.unwrap();
                let mut buf = vec![0u8; 256];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(reply).await.unwrap();
            }
            seen
        });
        let t = Duration::from_secs(2);
        set_protocol(&sock, "vip", false, t).await.unwrap();
        set_protocol(&sock, "vip", true, t).await.unwrap();
        let err = set_protocol(&sock, "vip", true, t).await.unwrap_err();
        assert!(
            matches!(err, BirdError::Refused { code: 9001, .. }),
            "{err}"
        );
        assert_eq!(
            server.await.unwrap(),
            ["disable vip\n", "enable vip\n", "enable vip\n"]
        );
        assert!(set_protocol(&sock, "bad name", true, t).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
