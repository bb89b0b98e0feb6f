//! Optional authentication and encryption of every message under a shared
//! 256-bit key (`PRAGMA walcast_key`, kept in `<db>-walcast-key`).
//!
//! A sealed message is an envelope around the plain message of `wire.rs`:
//!
//! ```text
//! "WCE1" | nonce (24 random bytes) | XChaCha20-Poly1305 ciphertext of the message | tag (16)
//! ```
//!
//! The associated data is `"WCE1" | channel u8 | bound nonce (24 bytes)`: the
//! channel (1 live stream, 2 catch-up request, 3 catch-up reply) keeps a message
//! of one channel from being accepted on another, and a reply is bound to the
//! nonce of the request it answers (zeros elsewhere), so a recorded reply cannot
//! be replayed as the answer to a later request. Replayed live messages are
//! harmless by construction: a frame is applied only at the next frame_no and
//! only if it continues the replica's checksum chain.
//!
//! Without a key nothing is sealed, and an envelope is refused with a message
//! that says a key is missing; with a key, anything not sealed is refused.

use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const ENVELOPE_MAGIC: &[u8; 4] = b"WCE1";
pub const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Bytes a sealed message has on top of the plain one.
pub const OVERHEAD: usize = 4 + NONCE_LEN + TAG_LEN;

pub type Nonce = [u8; NONCE_LEN];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The PUB stream: frames and heartbeats.
    Live = 1,
    Request = 2,
    Reply = 3,
}

pub fn key_path(db_path: &str) -> PathBuf {
    PathBuf::from(format!("{db_path}-walcast-key"))
}

/// Parses a key as given to `PRAGMA walcast_key`: 64 hex digits. The error
/// never repeats the value (it may be a key with one typo).
pub fn parse_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let bad = || format!("invalid walcast_key: expected 64 hex digits (a 256-bit key), got {} characters", s.chars().count());
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(k)
}

/// Seals and opens messages; a `Sealer` without a key passes them through.
#[derive(Clone, Default)]
pub struct Sealer {
    cipher: Option<Arc<XChaCha20Poly1305>>,
}

impl Sealer {
    pub fn with_key(key: &[u8; 32]) -> Sealer {
        Sealer { cipher: Some(Arc::new(XChaCha20Poly1305::new(Key::from_slice(key)))) }
    }

    /// The key of the database at `db_path`, if its key file exists.
    pub fn load(db_path: &str) -> Result<Sealer, String> {
        let path = key_path(db_path);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key = parse_key(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(Sealer::with_key(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Sealer::default()),
            Err(e) => Err(format!("cannot read the key file {}: {e}", path.display())),
        }
    }

    pub fn is_on(&self) -> bool {
        self.cipher.is_some()
    }

    /// A short public name for the key, to compare two nodes' keys: a MAC of
    /// a fixed text under the key, which reveals nothing about the key.
    pub fn fingerprint(&self) -> Option<String> {
        let c = self.cipher.as_ref()?;
        let tag = c.encrypt_in_place_detached(&XNonce::default(), b"walcast key fingerprint", &mut []).ok()?;
        Some(crate::log::hex(&tag[..8]))
    }

    fn aad(channel: Channel, bound: &Nonce) -> [u8; 4 + 1 + NONCE_LEN] {
        let mut a = [0u8; 4 + 1 + NONCE_LEN];
        a[..4].copy_from_slice(ENVELOPE_MAGIC);
        a[4] = channel as u8;
        a[5..].copy_from_slice(bound);
        a
    }

    /// Seals `msg` for `channel` (a reply: bound to its request's nonce).
    /// Returns the message to send and its nonce (zeros without a key).
    pub fn seal<'a>(&self, channel: Channel, bound: &Nonce, msg: &'a [u8]) -> (Cow<'a, [u8]>, Nonce) {
        // Without a key the message goes as it is: no copy on the publish path.
        let Some(c) = &self.cipher else { return (Cow::Borrowed(msg), [0; NONCE_LEN]) };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(msg.len() + OVERHEAD);
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(msg);
        let tag = c
            .encrypt_in_place_detached(&nonce, &Self::aad(channel, bound), &mut out[4 + NONCE_LEN..])
            .expect("a message under 4 MiB is within XChaCha20's limits");
        out.extend_from_slice(&tag);
        (Cow::Owned(out), nonce.into())
    }

    /// Opens a message received on `channel`: the plain message and the
    /// envelope's nonce. The error says what is wrong and never includes data.
    pub fn open<'a>(&self, channel: Channel, bound: &Nonce, m: &'a [u8]) -> Result<(Cow<'a, [u8]>, Nonce), String> {
        let sealed = m.len() >= OVERHEAD && &m[..4] == ENVELOPE_MAGIC;
        let Some(c) = &self.cipher else {
            if sealed {
                return Err("an encrypted message arrived, but no walcast_key is set here: set the same key as the sender's".into());
            }
            return Ok((Cow::Borrowed(m), [0; NONCE_LEN]));
        };
        if !sealed {
            return Err(match crate::wire::decode(m) {
                Ok((_, crate::wire::Body::Error { reason })) => {
                    format!("refused an unauthenticated message (a walcast_key is set here); it said: {reason}")
                }
                _ => "refused an unauthenticated message: a walcast_key is set here, and the sender did not use one".into(),
            });
        }
        let nonce: Nonce = m[4..4 + NONCE_LEN].try_into().unwrap();
        let body = &m[4 + NONCE_LEN..m.len() - TAG_LEN];
        let tag = Tag::from_slice(&m[m.len() - TAG_LEN..]);
        let mut plain = body.to_vec();
        c.decrypt_in_place_detached(XNonce::from_slice(&nonce), &Self::aad(channel, bound), &mut plain, tag).map_err(|_| {
            "a message failed authentication: the sender has another walcast_key, or the message was forged, replayed or damaged"
                .to_string()
        })?;
        Ok((Cow::Owned(plain), nonce))
    }
}

/// Writes the key file (mode 0600, replaced atomically), or removes it.
pub fn store_key(db_path: &str, key: Option<&[u8; 32]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = key_path(db_path);
    let Some(key) = key else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    };
    let tmp = crate::conf::temp_beside(&path);
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{}\n", crate::log::hex(key)).as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = Path::new(&path).parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// What identifies the key file's current content, to notice a key changed by
/// another process (None: no key file).
pub fn key_stamp(db_path: &str) -> Option<(u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(key_path(db_path)).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: [u8; 32] = [1; 32];
    const K2: [u8; 32] = [2; 32];
    const ZERO: Nonce = [0; NONCE_LEN];

    #[test]
    fn sealed_messages_open_only_with_the_key_on_their_channel_and_binding() {
        let (a, b, none) = (Sealer::with_key(&K1), Sealer::with_key(&K2), Sealer::default());
        let msg = crate::wire::heartbeat([3; 16], 1, 10, 11, 12);
        let (sealed, nonce) = a.seal(Channel::Live, &ZERO, &msg);
        assert_eq!(sealed.len(), msg.len() + OVERHEAD);
        assert!(!sealed.windows(msg.len()).any(|w| w == &msg[..]), "the message is not readable in the envelope");
        assert_eq!(a.open(Channel::Live, &ZERO, &sealed).unwrap(), (Cow::Borrowed(&msg[..]), nonce));
        assert!(b.open(Channel::Live, &ZERO, &sealed).unwrap_err().contains("failed authentication"));
        assert!(none.open(Channel::Live, &ZERO, &sealed).unwrap_err().contains("no walcast_key is set here"));
        assert!(a.open(Channel::Reply, &ZERO, &sealed).is_err(), "another channel");
        assert!(a.open(Channel::Live, &[9; NONCE_LEN], &sealed).is_err(), "another binding");
        assert!(a.open(Channel::Live, &ZERO, &msg).unwrap_err().contains("unauthenticated"));
        for i in 0..sealed.len() {
            let mut bad = sealed.to_vec();
            bad[i] ^= 0x10;
            assert!(a.open(Channel::Live, &ZERO, &bad).is_err(), "a flipped bit at byte {i} was accepted");
        }
        assert!(a.open(Channel::Live, &ZERO, &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn a_reply_is_bound_to_its_request() {
        let k = Sealer::with_key(&K1);
        let (_, req1) = k.seal(Channel::Request, &ZERO, b"first");
        let (_, req2) = k.seal(Channel::Request, &ZERO, b"second");
        assert_ne!(req1, req2, "nonces are random");
        let (reply1, _) = k.seal(Channel::Reply, &req1, b"answer to the first");
        assert!(k.open(Channel::Reply, &req1, &reply1).is_ok());
        assert!(k.open(Channel::Reply, &req2, &reply1).unwrap_err().contains("replayed"));
    }

    #[test]
    fn keys_parse_without_echoing_and_have_stable_fingerprints() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        assert_eq!(parse_key(hex).unwrap()[1], 0x11);
        let e = parse_key("00112233445566778899aabbccddeeff").unwrap_err();
        assert!(e.contains("64 hex digits") && !e.contains("0011"), "{e}");
        assert!(parse_key(&hex.replace('f', "g")).is_err());
        let f1 = Sealer::with_key(&K1).fingerprint().unwrap();
        assert_eq!(f1, Sealer::with_key(&K1).fingerprint().unwrap());
        assert_ne!(f1, Sealer::with_key(&K2).fingerprint().unwrap());
        assert_eq!(f1.len(), 16);
        assert!(Sealer::default().fingerprint().is_none());
    }
}
