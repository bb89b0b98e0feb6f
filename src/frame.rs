//! The walcast frame: the unit of replication, and its rolling CRC-64 chain.
//!
//! A frame is a 24-byte header followed by one database page. All integers are
//! little-endian:
//!
//! | offset | size | field        |
//! |--------|------|--------------|
//! | 0      | 8    | `frame_no`   |
//! | 8      | 4    | `page_no`    |
//! | 12     | 4    | `size_after` |
//! | 16     | 8    | `checksum`   |
//! | 24     | page | page bytes   |
//!
//! `checksum(n) = CRC-64/XZ(le64(checksum(n-1)) || le64(frame_no) || le32(page_no)
//! || le32(size_after) || page)`, and the chain starts from
//! `checksum(0) = CRC-64/XZ("walcast-chain-v1" || db_id)`. Because the previous
//! checksum and every header field are covered, a frame whose page_no, frame_no or
//! size_after was altered, or that was moved, fails the chain.

pub const FRAME_HEADER_LEN: usize = 24;

/// No real history gets near this frame_no; a log header, snapshot or frame
/// that names a bigger one is refused, so that no "next frame_no" computed from
/// it can overflow.
pub const MAX_FRAME_NO: u64 = 1 << 62;

/// A page size SQLite can use: a power of two from 512 to 65536.
pub fn is_page_size(p: u32) -> bool {
    (512..=65536).contains(&p) && p.is_power_of_two()
}

/// Domain separator for the chain seed, so a seed can never equal a frame checksum
/// computed over the same bytes by accident.
const CHAIN_SEED_DOMAIN: &[u8] = b"walcast-chain-v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_no: u64,
    pub page_no: u32,
    /// Database size in pages after the transaction, on its last frame; 0 otherwise.
    pub size_after: u32,
    pub checksum: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..8].copy_from_slice(&self.frame_no.to_le_bytes());
        b[8..12].copy_from_slice(&self.page_no.to_le_bytes());
        b[12..16].copy_from_slice(&self.size_after.to_le_bytes());
        b[16..24].copy_from_slice(&self.checksum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            frame_no: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            page_no: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            size_after: u32::from_le_bytes(b[12..16].try_into().unwrap()),
            checksum: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        }
    }

    /// True when `checksum` is the right link after `prev` for this header and page.
    pub fn chains_from(&self, prev: u64, page: &[u8]) -> bool {
        frame_checksum(prev, self.frame_no, self.page_no, self.size_after, page) == self.checksum
    }
}

/// The checksum that starts the chain of the database with this identity.
pub fn chain_seed(db_id: &[u8; 16]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(CHAIN_SEED_DOMAIN);
    d.write(db_id);
    d.sum64()
}

/// The checksum of one frame, given the checksum of the frame before it.
pub fn frame_checksum(prev: u64, frame_no: u64, page_no: u32, size_after: u32, page: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    let mut head = [0u8; 24];
    head[0..8].copy_from_slice(&prev.to_le_bytes());
    head[8..16].copy_from_slice(&frame_no.to_le_bytes());
    head[16..20].copy_from_slice(&page_no.to_le_bytes());
    head[20..24].copy_from_slice(&size_after.to_le_bytes());
    d.write(&head);
    d.write(page);
    d.sum64()
}

/// Builds the next frame of a chain.
pub fn make_frame(prev: u64, frame_no: u64, page_no: u32, size_after: u32, page: &[u8]) -> FrameHeader {
    FrameHeader { frame_no, page_no, size_after, checksum: frame_checksum(prev, frame_no, page_no, size_after, page) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = FrameHeader { frame_no: 0x0102030405060708, page_no: 7, size_after: 9, checksum: u64::MAX - 3 };
        assert_eq!(FrameHeader::decode(&h.encode()), h);
    }

    #[test]
    fn crc64_is_the_xz_variant() {
        // The standard check value of CRC-64/XZ, so the README's definition can be
        // reproduced with any CRC library.
        let mut d = crc64fast::Digest::new();
        d.write(b"123456789");
        assert_eq!(d.sum64(), 0x995D_C9BB_DF19_39FA);
    }

    #[test]
    fn chain_covers_every_header_field_and_the_previous_checksum() {
        let page = vec![0xABu8; 512];
        let seed = chain_seed(&[1u8; 16]);
        let f = make_frame(seed, 1, 3, 10, &page);
        assert!(f.chains_from(seed, &page));
        assert!(!f.chains_from(seed ^ 1, &page), "previous checksum must be covered");
        let mut moved = f;
        moved.page_no = 4;
        assert!(!moved.chains_from(seed, &page), "page_no must be covered (libSQL misses this)");
        let mut renumbered = f;
        renumbered.frame_no = 2;
        assert!(!renumbered.chains_from(seed, &page));
        let mut resized = f;
        resized.size_after = 11;
        assert!(!resized.chains_from(seed, &page));
        let mut other = page.clone();
        other[511] ^= 1;
        assert!(!f.chains_from(seed, &other));
        assert_ne!(chain_seed(&[1u8; 16]), chain_seed(&[2u8; 16]));
    }
}
